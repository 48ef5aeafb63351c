"""Load, validate and write ``mailer.toml``.

The file is read once (``tomllib``) into frozen dataclasses; every unknown key and
every wrong type is a :class:`ConfigError` naming the file and the key. Secrets never
live in the file: ``[smtp] password_env`` names the environment variable that holds
the password.
"""

from __future__ import annotations

import dataclasses
import os
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomli_w

from .errors import ConfigError

__all__ = [
    "DEFAULT_CONFIG_NAME",
    "Config",
    "DKIMConfig",
    "DNSConfig",
    "LogConfig",
    "MessageConfig",
    "SMTPConfig",
    "SendConfig",
    "find_config_path",
    "load_config",
    "parse_config",
    "parse_rate",
    "write_config",
]


DEFAULT_CONFIG_NAME = "mailer.toml"
_RATE_UNITS = {"s": 1.0, "sec": 1.0, "min": 60.0, "m": 60.0, "h": 3600.0, "hour": 3600.0, "day": 86400.0, "d": 86400.0}
_RATE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*/\s*([a-z]+)\s*$")


def parse_rate(text: str) -> float:
    """Turn ``"10/s"``, ``"600/min"``, ``"5000/h"`` or ``"50000/day"`` into messages per second.

    ``"unlimited"`` (for benchmarks into a local sink) gives ``0.0``, meaning no limit.
    Raises ``ValueError`` with a human reason otherwise.
    """
    if text.strip().lower() in {"unlimited", "0", "none"}:
        return 0.0
    match = _RATE_RE.match(text.lower())
    if not match or match.group(2) not in _RATE_UNITS:
        raise ValueError(f"{text!r} is not a rate; write N/s, N/min, N/h or N/day (for example 600/min)")
    count = float(match.group(1))
    if count <= 0:
        raise ValueError(f"{text!r} must be more than zero messages")
    return count / _RATE_UNITS[match.group(2)]


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
    path: Path = Path("mailer.sqlite3")


@dataclass(frozen=True)
class DNSConfig:
    nameservers: tuple[str, ...] = ()
    port: int = 53
    timeout: float = 5.0


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

    def replace_send(self, **changes: Any) -> Config:
        """A copy with some ``[send]`` values overridden (CLI flags win over the file)."""
        return dataclasses.replace(self, send=dataclasses.replace(self.send, **changes))


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
    "log": {"path": ((str,), "path")},
    "dns": {
        "nameservers": ((list,), "nameservers"),
        "port": ((int,), "port"),
        "timeout": ((int, float), "timeout"),
    },
}
_TYPE_NAMES = {str: "a string", int: "an integer", float: "a number", bool: "true or false", list: "a list"}


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
    for section, values in data.items():
        if section not in _SCHEMA:
            raise ConfigError(
                f"unknown section [{section}].",
                path=where,
                key=section,
                hint=f"Known sections: {', '.join('[' + s + ']' for s in _SCHEMA)}.",
            )
        if not isinstance(values, dict):
            raise ConfigError(f"{section!r} must be a [section] table.", path=where, key=section)
        checked: dict[str, Any] = {}
        for key, value in values.items():
            spec = _SCHEMA[section].get(key)
            if spec is None:
                raise ConfigError(
                    f"unknown key '{section}.{key}'.",
                    path=where,
                    key=f"{section}.{key}",
                    hint=f"Known keys in [{section}]: {', '.join(_SCHEMA[section])}.",
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
            checked[name] = value
        sections[section] = checked

    def fail(key: str, message: str, hint: str | None = None) -> ConfigError:
        return ConfigError(f"'{key}' {message}", path=where, key=key, hint=hint)

    smtp = SMTPConfig(**sections.get("smtp", {}))
    if smtp.security not in {"starttls", "tls", "none"}:
        raise fail("smtp.security", f'must be "starttls", "tls" or "none", not {smtp.security!r}.')
    if smtp.port is not None and not 0 < smtp.port < 65536:
        raise fail("smtp.port", f"must be between 1 and 65535, not {smtp.port}.")
    if smtp.timeout <= 0:
        raise fail("smtp.timeout", "must be more than zero seconds.")
    if not 0 < smtp.data_timeout <= 86400:  # also refuses nan and inf
        raise fail("smtp.data_timeout", "must be more than zero seconds and at most 86400 (RFC 5321 says 600).")
    if smtp.password_env is not None and (
        not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", smtp.password_env) or _looks_like_password(smtp.password_env)
    ):
        raise fail(
            "smtp.password_env",
            "must be the NAME of an environment variable (letters, digits, _), never the password itself.",
        )

    send = SendConfig(**sections.get("send", {}))
    try:
        parse_rate(send.rate)
    except ValueError as exc:
        raise fail("send.rate", f"is invalid: {exc}.") from None
    for key in ("connections", "max_per_connection"):
        if getattr(send, key) < 1:
            raise fail(f"send.{key}", "must be at least 1.")
    if send.retries < 0:
        raise fail("send.retries", "must be 0 or more.")
    if send.retry_backoff < 0:
        raise fail("send.retry_backoff", "must be 0 or more seconds.")

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

    log = LogConfig(path=base / sections.get("log", {}).get("path", "mailer.sqlite3"))

    dns_values = dict(sections.get("dns", {}))
    nameservers = dns_values.pop("nameservers", [])
    if not all(isinstance(n, str) for n in nameservers):
        raise fail("dns.nameservers", "must be a list of IP address strings.")
    dns = DNSConfig(nameservers=tuple(nameservers), **dns_values)

    return Config(path=path, smtp=smtp, send=send, message=message, dkim=dkim, log=log, dns=dns)


def write_config(path: Path, data: dict[str, Any]) -> None:
    """Write a config document with tomli-w (used by ``mailer init``)."""
    path.write_text(tomli_w.dumps(data), encoding="utf-8")
