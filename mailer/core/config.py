"""Load, validate and write ``mailer.toml``.

The file is read once (``tomllib``) into frozen dataclasses; every unknown key and
every wrong type is a :class:`ConfigError` naming the file and the key. Secrets never
live in the file: ``[smtp] password_env`` names the environment variable that holds
the password.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import math
import os
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomli_w

from . import streams as _streams
from .errors import ConfigError
from .streams import DirectConfig, DirectDomainConfig, DirectRuleConfig, RelayConfig, StreamConfig, parse_duration

__all__ = [
    "DEFAULT_CONFIG_NAME",
    "MAX_CONNECTIONS",
    "BouncesConfig",
    "Config",
    "DKIMConfig",
    "DNSConfig",
    "DirectConfig",
    "DirectDomainConfig",
    "DirectRuleConfig",
    "LogConfig",
    "MessageConfig",
    "RelayConfig",
    "SMTPConfig",
    "SendConfig",
    "StreamConfig",
    "TrackingConfig",
    "WebConfig",
    "find_config_path",
    "load_config",
    "parse_config",
    "parse_duration",
    "parse_rate",
    "write_config",
]

MAX_CONNECTIONS = 1000  # more SMTP connections than any relay accepts from one client


DEFAULT_CONFIG_NAME = "mailer.toml"
# The rates a run can keep: below one a day the throttle's clock arithmetic overflows,
# above 100,000/s no relay takes mail.
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_RATE_MIN = 1 / 86400
_RATE_MAX = 100_000.0
# A host name or IP address literal (no port, no spaces); an EHLO name (RFC 5321 4.1.1.1:
# a domain, or an address literal in brackets).
_HOST_NAME = re.compile(r"[A-Za-z0-9_](?:[A-Za-z0-9_.-]*[A-Za-z0-9_.])?")
_HELO_NAME = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9.])?|\[[0-9A-Fa-f:.]+\]|\[IPv6:[0-9A-Fa-f:.]+\]")
_RATE_UNITS = {"s": 1.0, "sec": 1.0, "min": 60.0, "m": 60.0, "h": 3600.0, "hour": 3600.0, "day": 86400.0, "d": 86400.0}
_RATE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*/\s*([a-z]+)\s*$")


def parse_rate(text: str) -> float:
    """Turn ``"10/s"``, ``"600/min"``, ``"5000/h"`` or ``"50000/day"`` into messages per second.

    ``"unlimited"`` (for benchmarks into a local sink) gives ``0.0``, meaning no limit;
    nothing else does (``"0"`` or ``"none"`` could as well mean "send nothing").
    Raises ``ValueError`` with a human reason otherwise.
    """
    if text.strip().lower() == "unlimited":
        return 0.0
    match = _RATE_RE.match(text.lower())
    if not match or match.group(2) not in _RATE_UNITS:
        raise ValueError(f"{text!r} is not a rate; write N/s, N/min, N/h or N/day (for example 600/min), or unlimited")
    count = float(match.group(1))
    if count <= 0:
        raise ValueError(f"{text!r} must be more than zero messages")
    per_second = count / _RATE_UNITS[match.group(2)]
    if not _RATE_MIN <= per_second <= _RATE_MAX:
        raise ValueError(f"{text!r} is out of range; a rate may be from 1/day to 100000/s")
    return per_second


@dataclass(frozen=True)
class SMTPConfig:
    host: str = "localhost"
    port: int | None = None  # None: 587 for starttls, 465 for tls, 25 for none
    security: str = "starttls"  # "starttls" | "tls" | "none"
    username: str | None = None
    password_env: str | None = None
    timeout: float = 30.0
    # The wait for the reply to the end of a message (RFC 5321 4.5.3.2.6: 10 minutes).
    data_timeout: float = 600.0
    tls_verify: bool = True
    helo: str | None = None  # EHLO name; default: the local host's FQDN

    @property
    def effective_port(self) -> int:
        if self.port is not None:
            return self.port
        return {"starttls": 587, "tls": 465, "none": 25}[self.security]

    def password(self) -> str | None:
        """The password from the environment variable named by ``password_env``, or None."""
        if not self.password_env:
            return None
        return os.environ.get(self.password_env)


@dataclass(frozen=True)
class SendConfig:
    rate: str = "10/s"
    connections: int = 4
    max_per_connection: int = 100
    retries: int = 3
    retry_backoff: float = 2.0
    render_timeout: float = 10.0  # seconds one message's rendering may take
    render_max_bytes: int = 10_000_000  # characters one message's rendering may produce

    @property
    def rate_per_second(self) -> float:
        return parse_rate(self.rate)


@dataclass(frozen=True)
class MessageConfig:
    from_: str | None = None
    reply_to: str | None = None
    list_unsubscribe: str | None = None
    list_unsubscribe_mailto: str | None = None
    kind: str = "marketing"  # "marketing" | "transactional"
    feedback_id: str | None = None
    list_id: str | None = None  # RFC 2919; default for marketing: <campaign.from-domain>


@dataclass(frozen=True)
class DKIMConfig:
    domain: str
    selector: str
    private_key: Path


@dataclass(frozen=True)
class LogConfig:
    """``[log]``: the SQLite file at ``path`` (the default), or PostgreSQL at ``url``.

    With ``url`` the password comes from PGPASSWORD or the variable ``password_env``
    names (never from the file); ``path`` then only says where the local delivery
    journals and campaign lock files go (beside it).
    """

    path: Path = Path("mailer.sqlite3")
    url: str | None = None
    password_env: str | None = None
    # PostgreSQL: how long a run's claim on part of a campaign outlives its last heartbeat.
    lease: float = 30.0

    @property
    def password(self) -> str | None:
        """The database password from ``password_env`` or PGPASSWORD, or None."""
        if self.password_env:
            return os.environ.get(self.password_env)
        return os.environ.get("PGPASSWORD")

    @property
    def where(self) -> str:
        """The store as a user would name it: the file, or the URL without any password."""
        if self.url is None:
            return str(self.path)
        from urllib.parse import urlsplit

        parts = urlsplit(self.url)
        netloc = parts.hostname or ""
        if parts.port:
            netloc += f":{parts.port}"
        if parts.username:
            netloc = f"{parts.username}@{netloc}"
        return f"{parts.scheme}://{netloc}{parts.path}"


@dataclass(frozen=True)
class DNSConfig:
    nameservers: tuple[str, ...] = ()
    port: int = 53
    timeout: float = 5.0


@dataclass(frozen=True)
class WebConfig:
    """``[web]``: where ``mailer serve`` is reached and which variables hold its signing keys.

    ``secret_env`` names the variable with the current key; ``previous_secret_envs`` the
    variables of keys that still verify (while links minted with them are out there) but
    sign nothing new. Only names are kept here, never a key.
    """

    base_url: str | None = None
    secret_env: str = "MAILER_WEB_SECRET"
    previous_secret_envs: tuple[str, ...] = ()
    listen: str = "127.0.0.1:8025"

    @property
    def listen_address(self) -> tuple[str, int]:
        """``listen`` as ``(host, port)`` (checked when the config was loaded)."""
        host, _, port = self.listen.rpartition(":")
        return host.strip("[]"), int(port)


@dataclass(frozen=True)
class TrackingConfig:
    """``[tracking]``: all off by default. ``utm`` maps a query key to a Jinja template
    (``{{ campaign }}`` is the campaign's name), rendered once per run."""

    opens: bool = False
    clicks: bool = False
    utm: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class BouncesConfig:
    """``[bounces]``: ``soft_bounce_limit`` soft bounces in that many campaigns in a row
    (no campaign without one in between) put an address on the suppression list."""

    soft_bounce_limit: int = 3


@dataclass(frozen=True)
class Config:
    """The whole validated configuration. ``path`` is None when no file was read."""

    path: Path | None = None
    smtp: SMTPConfig = field(default_factory=SMTPConfig)
    send: SendConfig = field(default_factory=SendConfig)
    message: MessageConfig = field(default_factory=MessageConfig)
    dkim: DKIMConfig | None = None
    log: LogConfig = field(default_factory=LogConfig)
    dns: DNSConfig = field(default_factory=DNSConfig)
    web: WebConfig | None = None
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    bounces: BouncesConfig = field(default_factory=BouncesConfig)
    relays: tuple[RelayConfig, ...] = ()
    streams: tuple[StreamConfig, ...] = ()
    direct: DirectConfig = field(default_factory=DirectConfig)

    def relay(self, name: str) -> RelayConfig | None:
        """The ``[relays.NAME]`` of that name, or None."""
        return next((relay for relay in self.relays if relay.name == name), None)

    def stream(self, name: str) -> StreamConfig | None:
        """The ``[streams.NAME]`` of that name, or None."""
        return next((stream for stream in self.streams if stream.name == name), None)

    def replace_send(self, **changes: Any) -> Config:
        """A copy with some ``[send]`` values overridden (CLI flags win over the file)."""
        return dataclasses.replace(self, send=dataclasses.replace(self.send, **changes))


# Sections made of named tables ([relays.NAME], [streams.NAME], [direct.domains."X"]):
# mailer.core.streams checks them.
_NESTED_SECTIONS = ("relays", "streams", "direct")
# The schema: section -> key -> (accepted Python types, dataclass field name).
_SCHEMA: dict[str, dict[str, tuple[tuple[type, ...], str]]] = {
    "smtp": {
        "host": ((str,), "host"),
        "port": ((int,), "port"),
        "security": ((str,), "security"),
        "username": ((str,), "username"),
        "password_env": ((str,), "password_env"),
        "timeout": ((int, float), "timeout"),
        "data_timeout": ((int, float), "data_timeout"),
        "tls_verify": ((bool,), "tls_verify"),
        "helo": ((str,), "helo"),
    },
    "send": {
        "rate": ((str,), "rate"),
        "connections": ((int,), "connections"),
        "max_per_connection": ((int,), "max_per_connection"),
        "retries": ((int,), "retries"),
        "retry_backoff": ((int, float), "retry_backoff"),
        "render_timeout": ((int, float), "render_timeout"),
        "render_max_bytes": ((int,), "render_max_bytes"),
    },
    "message": {
        "from": ((str,), "from_"),
        "reply_to": ((str,), "reply_to"),
        "list_unsubscribe": ((str,), "list_unsubscribe"),
        "list_unsubscribe_mailto": ((str,), "list_unsubscribe_mailto"),
        "kind": ((str,), "kind"),
        "feedback_id": ((str,), "feedback_id"),
        "list_id": ((str,), "list_id"),
    },
    "dkim": {
        "domain": ((str,), "domain"),
        "selector": ((str,), "selector"),
        "private_key": ((str,), "private_key"),
    },
    "log": {
        "path": ((str,), "path"),
        "url": ((str,), "url"),
        "password_env": ((str,), "password_env"),
        "lease": ((str,), "lease"),
    },
    "dns": {
        "nameservers": ((list,), "nameservers"),
        "port": ((int,), "port"),
        "timeout": ((int, float), "timeout"),
    },
    "web": {
        "base_url": ((str,), "base_url"),
        "secret_env": ((str,), "secret_env"),
        "previous_secret_envs": ((list,), "previous_secret_envs"),
        "listen": ((str,), "listen"),
    },
    "bounces": {
        "soft_bounce_limit": ((int,), "soft_bounce_limit"),
    },
    "tracking": {
        "opens": ((bool,), "opens"),
        "clicks": ((bool,), "clicks"),
        "utm": ((dict,), "utm"),
    },
}
_TYPE_NAMES = {
    str: "a string",
    int: "an integer",
    float: "a number",
    bool: "true or false",
    list: "a list",
    dict: "a table",
}


def _looks_like_password(name: str) -> bool:
    # Variable names are written in one case (MAILER_SMTP_PASSWORD, smtp_pass); a value
    # mixing upper case, lower case and digits (Tr0ub4dor3) is a password pasted in.
    return any(c.islower() for c in name) and any(c.isupper() for c in name) and any(c.isdigit() for c in name)


def find_config_path(explicit: str | os.PathLike[str] | None) -> tuple[Path | None, bool]:
    """Where the config is: ``--config``, else ``$MAILER_CONFIG``, else ``./mailer.toml``.

    Returns the path and whether the user asked for it explicitly (an explicit path
    that does not exist is an error; a missing default file is fine).
    """
    if explicit:
        return Path(explicit), True
    env = os.environ.get("MAILER_CONFIG")
    if env:
        return Path(env), True
    default = Path(DEFAULT_CONFIG_NAME)
    return (default if default.exists() else None), False


def load_config(explicit: str | os.PathLike[str] | None = None) -> Config:
    """Find, read and validate the config file. No file at the default place gives defaults."""
    path, _was_explicit = find_config_path(explicit)
    if path is None:
        return Config()
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(
            "config file not found.",
            path=str(path),
            hint="Create one with `mailer init`, or point --config / MAILER_CONFIG at an existing file.",
        ) from None
    except OSError as exc:
        raise ConfigError(f"cannot read the config file ({exc.strerror}).", path=str(path)) from None
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise ConfigError("the config file is not valid UTF-8.", path=str(path), hint="Re-save it as UTF-8.") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(
            f"not valid TOML: {exc}.", path=str(path), hint="Check the quoting and the [section] lines."
        ) from None
    return parse_config(data, path=path)


def parse_config(data: dict[str, Any], *, path: Path | None) -> Config:
    """Validate a parsed TOML document into a :class:`Config`."""
    where = str(path) if path else "<config>"
    base = path.parent if path else Path(".")
    sections: dict[str, dict[str, Any]] = {}
    nested: dict[str, Any] = {}
    for section, values in data.items():
        if section in _NESTED_SECTIONS:
            nested[section] = values  # tables of tables: checked below, key by key
            continue
        if section not in _SCHEMA:
            raise ConfigError(
                f"unknown section [{section}].",
                path=where,
                key=section,
                hint=f"Known sections: {', '.join('[' + s + ']' for s in (*_SCHEMA, *_NESTED_SECTIONS))}.",
            )
        sections[section] = _checked_keys(section, values, _SCHEMA[section], where)

    def fail(key: str, message: str, hint: str | None = None) -> ConfigError:
        return ConfigError(f"'{key}' {message}", path=where, key=key, hint=hint)

    def check_range(key: str, value: float, low: float, high: float, unit: str = "", *, low_open: bool = False) -> None:
        _check_range(fail, key, value, low, high, unit, low_open=low_open)

    smtp = _make_smtp(sections.get("smtp", {}), "smtp", fail)
    relays = _streams.parse_relays(
        nested.get("relays", {}),
        fail=fail,
        check_keys=lambda label, values, schema: _checked_keys(label, values, schema, where),
        smtp_keys=_SCHEMA["smtp"],
        make_smtp=lambda values, prefix: _make_smtp(values, prefix, fail),
    )
    streams = _streams.parse_streams(
        nested.get("streams", {}),
        fail=fail,
        check_keys=lambda label, values, schema: _checked_keys(label, values, schema, where),
        relays=relays,
        helo_pattern=_HELO_NAME,
    )
    direct = (
        _streams.parse_direct(
            nested["direct"],
            fail=fail,
            check_keys=lambda label, values, schema: _checked_keys(label, values, schema, where),
        )
        if "direct" in nested
        else DirectConfig()
    )

    send = SendConfig(**sections.get("send", {}))
    try:
        parse_rate(send.rate)
    except ValueError as exc:
        raise fail("send.rate", f"is invalid: {exc}.") from None
    for key, high in (("connections", MAX_CONNECTIONS), ("max_per_connection", 1_000_000)):
        value = getattr(send, key)
        if value < 1:
            raise fail(f"send.{key}", f"must be at least 1 (and at most {high:,}), not {value}.")
        if value > high:
            raise fail(f"send.{key}", f"must be from 1 to {high:,}, not {value}.")
    if send.retries < 0:
        raise fail("send.retries", "must be 0 or more (at most 100).")
    check_range("send.retries", send.retries, 0, 100)
    check_range("send.retry_backoff", send.retry_backoff, 0, 3600, " seconds")
    check_range("send.render_timeout", send.render_timeout, 0, 3600, " seconds", low_open=True)
    check_range("send.render_max_bytes", send.render_max_bytes, 1000, 1_000_000_000)

    message = MessageConfig(**sections.get("message", {}))
    if message.kind not in {"marketing", "transactional"}:
        raise fail("message.kind", f'must be "marketing" or "transactional", not {message.kind!r}.')
    if message.list_unsubscribe is not None and not message.list_unsubscribe.lower().startswith("https://"):
        raise fail("message.list_unsubscribe", "must be an https:// URL (RFC 8058 one-click unsubscribe needs HTTPS).")

    dkim = None
    if "dkim" in sections:
        values = sections["dkim"]
        missing = [k for k in ("domain", "selector", "private_key") if k not in values]
        if missing:
            raise fail(f"dkim.{missing[0]}", "is required when [dkim] is present.")
        dkim = DKIMConfig(
            domain=values["domain"], selector=values["selector"], private_key=base / values["private_key"]
        )

    log_values = sections.get("log", {})
    log = LogConfig(
        path=base / log_values.get("path", "mailer.sqlite3"),
        url=log_values.get("url"),
        password_env=log_values.get("password_env"),
    )
    if "lease" in log_values:
        try:
            lease = parse_duration(log_values["lease"])
        except ValueError as exc:
            raise fail("log.lease", f"is invalid: {exc}.") from None
        check_range("log.lease", lease, 1, 86400, " seconds")
        log = dataclasses.replace(log, lease=lease)
    if log.url is not None:
        from urllib.parse import urlsplit

        try:
            url_parts = urlsplit(log.url)
            url_parts.port  # noqa: B018 - raises on a bad port
        except ValueError:
            raise fail(
                "log.url", "is not a valid URL.", 'Write it as "postgresql://user@host:5432/database".'
            ) from None
        if url_parts.scheme not in ("postgresql", "postgres"):
            raise fail(
                "log.url",
                "must be a postgresql:// URL (the SQLite send log is set with [log] path).",
                'Write it as "postgresql://user@host:5432/database".',
            )
        if url_parts.password is not None:
            raise fail(
                "log.url",
                "must not hold the password.",
                "Remove it from the URL and give it through PGPASSWORD or the variable [log] password_env names.",
            )
        if not url_parts.path.strip("/"):
            raise fail("log.url", "names no database.", 'Write it as "postgresql://user@host:5432/database".')
    if log.password_env is not None and (
        not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", log.password_env) or _looks_like_password(log.password_env)
    ):
        raise fail(
            "log.password_env",
            "must be the NAME of an environment variable (letters, digits, _), never the password itself.",
        )

    dns_values = dict(sections.get("dns", {}))
    nameservers = dns_values.pop("nameservers", [])
    if not all(isinstance(n, str) for n in nameservers):
        raise fail("dns.nameservers", "must be a list of IP address strings.")
    dns = DNSConfig(nameservers=tuple(nameservers), **dns_values)
    if not 0 < dns.port < 65536:
        raise fail("dns.port", f"must be between 1 and 65535, not {dns.port}.")
    check_range("dns.timeout", dns.timeout, 0, 300, " seconds", low_open=True)

    web = _parse_web(sections["web"], fail) if "web" in sections else None
    tracking = _parse_tracking(sections.get("tracking", {}), web, fail)
    bounces = BouncesConfig(**sections.get("bounces", {}))
    check_range("bounces.soft_bounce_limit", bounces.soft_bounce_limit, 1, 100)

    return Config(
        path=path,
        smtp=smtp,
        send=send,
        message=message,
        dkim=dkim,
        log=log,
        dns=dns,
        web=web,
        tracking=tracking,
        bounces=bounces,
        relays=relays,
        streams=streams,
        direct=direct,
    )


def _check_range(
    fail: Any, key: str, value: float, low: float, high: float, unit: str = "", *, low_open: bool = False
) -> None:
    # NaN compares false both ways and inf is past any bound: both end here.
    inside = (low < value if low_open else low <= value) and value <= high and math.isfinite(value)
    if not inside:
        above = f"more than {low:g}" if low_open else f"from {low:g}"
        raise fail(key, f"must be {above} to {high:g}{unit}, not {value!r}.")


def _make_smtp(values: dict[str, Any], prefix: str, fail: Any) -> SMTPConfig:
    """Validate the ``[smtp]`` keys of ``[smtp]`` or of one ``[relays.NAME]`` (errors name ``prefix.key``)."""

    smtp = SMTPConfig(**values)
    if smtp.security not in {"starttls", "tls", "none"}:
        raise fail(f"{prefix}.security", f'must be "starttls", "tls" or "none", not {smtp.security!r}.')
    if smtp.port is not None and not 0 < smtp.port < 65536:
        raise fail(f"{prefix}.port", f"must be between 1 and 65535, not {smtp.port}.")
    _check_range(fail, f"{prefix}.timeout", smtp.timeout, 0, 3600, " seconds", low_open=True)
    _check_host(smtp.host, fail, key=f"{prefix}.host")
    if smtp.helo is not None and not _HELO_NAME.fullmatch(smtp.helo):
        raise fail(
            f"{prefix}.helo",
            f"must be a domain name or an address literal such as [192.0.2.1], not {smtp.helo!r}.",
        )
    if not 0 < smtp.data_timeout <= 86400:  # also refuses nan and inf
        raise fail(f"{prefix}.data_timeout", "must be more than zero seconds and at most 86400 (RFC 5321 says 600).")
    if smtp.password_env is not None and (
        not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", smtp.password_env) or _looks_like_password(smtp.password_env)
    ):
        raise fail(
            f"{prefix}.password_env",
            "must be the NAME of an environment variable (letters, digits, _), never the password itself.",
        )

    return smtp


def _checked_keys(
    section: str, values: Any, schema: dict[str, tuple[tuple[type, ...], str]], where: str
) -> dict[str, Any]:
    """One table's keys checked against ``schema`` (unknown keys, types, NUL), by field name."""
    if not isinstance(values, dict):
        raise ConfigError(f"{section!r} must be a [section] table.", path=where, key=section)
    checked: dict[str, Any] = {}
    for key, value in values.items():
        spec = schema.get(key)
        if spec is None:
            raise ConfigError(
                f"unknown key '{section}.{key}'.",
                path=where,
                key=f"{section}.{key}",
                hint=f"Known keys in [{section}]: {', '.join(schema)}.",
            )
        types, name = spec
        # bool is a subclass of int in Python; TOML keeps them apart, and so do we.
        if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
            expected = _TYPE_NAMES[float] if float in types else _TYPE_NAMES[types[0]]
            shown = "" if key == "password_env" else f" {value!r}"  # it may be a password pasted in
            raise ConfigError(
                f"'{section}.{key}' must be {expected}, not {type(value).__name__}{shown}.",
                path=where,
                key=f"{section}.{key}",
            )
        if isinstance(value, str) and "\x00" in value:
            raise ConfigError(f"'{section}.{key}' contains a NUL character.", path=where, key=f"{section}.{key}")
        if section == "message" and isinstance(value, str) and _CONTROL.search(value):
            # These become header values: a line break would add a header (Bcc:).
            raise ConfigError(
                f"'{section}.{key}' contains a line break or control character, which a header cannot hold.",
                path=where,
                key=f"{section}.{key}",
            )
        checked[name] = value
    return checked


_UTM_KEY = re.compile(r"[A-Za-z0-9_.-]{1,64}")


def _parse_tracking(values: dict[str, Any], web: WebConfig | None, fail: Any) -> TrackingConfig:
    """Check ``[tracking]``: opens and clicks need ``[web] base_url``; utm is a table of strings."""
    utm = values.get("utm", {})
    for key, value in utm.items():
        if not _UTM_KEY.fullmatch(key):
            raise fail("tracking.utm", f"{key!r} is not a query parameter name (letters, digits, _ . -).")
        if not isinstance(value, str) or _CONTROL.search(value):
            raise fail(f"tracking.utm.{key}", "must be a string on one line.")
    tracking = TrackingConfig(
        opens=values.get("opens", False), clicks=values.get("clicks", False), utm=tuple(utm.items())
    )
    for key, enabled in (("tracking.opens", tracking.opens), ("tracking.clicks", tracking.clicks)):
        if enabled and (web is None or web.base_url is None):
            raise fail(key, "needs [web] base_url: the address where `mailer serve` records opens and clicks.")
    return tracking


_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def _parse_web(values: dict[str, Any], fail: Any) -> WebConfig:
    """Check ``[web]``: variable names (never keys), an http(s) base URL, a HOST:PORT to listen on."""
    values = dict(values)
    previous = values.pop("previous_secret_envs", [])
    if not all(isinstance(name, str) for name in previous):
        raise fail("web.previous_secret_envs", "must be a list of environment variable names.")
    web = WebConfig(previous_secret_envs=tuple(previous), **values)
    for key, name in [("web.secret_env", web.secret_env)] + [("web.previous_secret_envs", n) for n in previous]:
        if not _ENV_NAME.fullmatch(name) or _looks_like_password(name):
            # Never echo the value: it may be the key pasted in.
            raise fail(
                key,
                "must be the NAME of an environment variable (letters, digits, _), never the signing key itself.",
                hint='For example secret_env = "MAILER_WEB_SECRET", and export MAILER_WEB_SECRET=... before running.',
            )
    if web.base_url is not None:
        scheme, sep, rest = web.base_url.partition("://")
        host = rest.split("/", 1)[0]
        if not sep or scheme.lower() not in ("http", "https") or not host or _CONTROL.search(web.base_url):
            raise fail(
                "web.base_url",
                f"must be an https:// URL where `mailer serve` is reached, not {web.base_url!r}.",
                hint='For example base_url = "https://mail.example.com" (your TLS reverse proxy in front of it).',
            )
        if "?" in web.base_url or "#" in web.base_url or " " in web.base_url:
            raise fail("web.base_url", "must be a plain URL without a query, fragment or spaces.")
    host, colon, port = web.listen.rpartition(":")
    if not colon or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise fail("web.listen", f"must be HOST:PORT, for example 127.0.0.1:8025, not {web.listen!r}.")
    return web


def _check_host(host: str, fail: Any, *, key: str = "smtp.host") -> None:
    """A host name or an IP address, without a port or anything else."""
    try:
        ipaddress.ip_address(host.strip("[]"))
        return
    except ValueError:
        pass
    if _HOST_NAME.fullmatch(host) and len(host) <= 253:
        return
    if host.count(":") == 1 and _HOST_NAME.fullmatch(host.partition(":")[0]):
        raise fail(key, f"must be a host name without a port, not {host!r}.", hint="Put the port in port = ...")
    raise fail(key, f"must be a host name or an IP address, not {host!r}.")


def write_config(path: Path, data: dict[str, Any]) -> None:
    """Write a config document with tomli-w (used by ``mailer init``)."""
    path.write_text(tomli_w.dumps(data), encoding="utf-8")
