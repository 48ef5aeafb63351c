"""``[relays.NAME]``, ``[streams.NAME]``, ``[direct]``, ``[direct.domains."X"]`` and ``[[direct.rules]]``.

A *stream* says how one kind of mail leaves: through its named relays (a weighted
choice among them) or, with ``direct = true``, straight to each recipient domain's MX
servers; from which local addresses (``source_addresses``), with which EHLO name
(``helo``) and which envelope sender (``return_path``, ``{token}`` being the
per-recipient VERP token). ``[smtp]`` alone keeps working: it is the relay of every
stream that names none, and the route of a campaign that selects no stream.

Everything is validated here, once, into frozen dataclasses; the errors name the file
and the key (``relays.ses.rate``) like the rest of :mod:`mailer.core.config`, which
calls :func:`parse_relays`, :func:`parse_streams` and :func:`parse_direct`.
"""

from __future__ import annotations

import ipaddress
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .config import SMTPConfig
    from .errors import ConfigError

__all__ = [
    "DIRECT_TLS_MODES",
    "DirectConfig",
    "DirectDomainConfig",
    "DirectRuleConfig",
    "RelayConfig",
    "StreamConfig",
    "parse_direct",
    "parse_duration",
    "parse_relays",
    "parse_streams",
    "parse_trigger",
]

#: ``[direct] tls``: "mta-sts" (RFC 8461 where published, opportunistic elsewhere),
#: "opportunistic" (RFC 7435) or "required" (no delivery in clear).
DIRECT_TLS_MODES = ("mta-sts", "opportunistic", "required")

# Relay and stream names are TOML keys that also appear in errors, logs and --stream.
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
_DURATION_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhd])\s*$")
# A queue lifetime longer than this is a typo (Postfix's maximal_queue_lifetime is 5d).
_MAX_DURATION = 365 * 86400.0
_DOMAIN_LABEL = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?|_[a-z0-9-]+")
# An address local part: dot-atom characters, plus the {token} placeholder.
_LOCAL_PART = re.compile(r"[A-Za-z0-9!#$%&'*+/=?^_`|~.-]+")
_DOMAIN_PART = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?|\[[0-9A-Fa-f:.]+\]")
_TOKEN = "{token}"
# The VERP token's length (mailer.core.tokens.VERP_TOKEN_LENGTH; not imported, so that
# config loading does not pull in the cryptography package).
_VERP_TOKEN_LENGTH = 32
_MAX_LOCAL_PART = 64  # RFC 5321 4.5.3.1.1
# ``[[direct.rules]] trigger``: "N/period", N matching replies within the period.
_TRIGGER = re.compile(r"^\s*(\d{1,6})\s*/\s*(s|min|m|h|hour|d|day)\s*$")
_TRIGGER_UNITS = {"s": 1.0, "m": 60.0, "min": 60.0, "h": 3600.0, "hour": 3600.0, "d": 86400.0, "day": 86400.0}
_RULE_ACTIONS = ("suspend", "throttle")
_MAX_RULE_PATTERN = 500  # characters: a reply-text pattern, not a program

Fail = Callable[..., "ConfigError"]
CheckKeys = Callable[[str, Any, dict[str, tuple[tuple[type, ...], str]]], dict[str, Any]]


def parse_duration(text: str) -> float:
    """``"90s"``, ``"15m"``, ``"12h"`` or ``"5d"`` in seconds (more than zero, at most a year).

    Raises ``ValueError`` with a human reason otherwise.
    """
    match = _DURATION.match(text.lower())
    if not match:
        raise ValueError(f"{text!r} is not a duration; write a number and s, m, h or d (for example 5d)")
    seconds = float(match.group(1)) * _DURATION_UNITS[match.group(2)]
    if not 0 < seconds <= _MAX_DURATION or not math.isfinite(seconds):
        raise ValueError(f"{text!r} is out of range; a duration may be more than 0s and at most 365d")
    return seconds


def parse_trigger(text: str) -> tuple[int, float]:
    """``"5/h"`` (five matching replies within an hour) as ``(5, 3600.0)``.

    Raises ``ValueError`` with a human reason otherwise.
    """
    match = _TRIGGER.match(text.lower())
    if not match:
        raise ValueError(f"{text!r} is not a trigger; write N/s, N/min, N/h or N/day (for example 5/h)")
    count = int(match.group(1))
    if count < 1:
        raise ValueError(f"{text!r} must count at least one reply")
    return count, _TRIGGER_UNITS[match.group(2)]


@dataclass(frozen=True)
class RelayConfig:
    """``[relays.NAME]``: a relay with the keys of ``[smtp]`` (in ``smtp``), plus its
    share of its streams' traffic (``weight``), its own limit (``rate``, never exceeded;
    None: only the campaign's rate) and its connections (None: ``[send] connections``)."""

    name: str
    smtp: SMTPConfig
    weight: float = 1.0
    rate: str | None = None
    connections: int | None = None

    @property
    def rate_per_second(self) -> float | None:
        """The relay's own limit in messages per second; None when it has none."""
        if self.rate is None:
            return None
        from .config import parse_rate

        return parse_rate(self.rate) or None  # "unlimited": no own limit


@dataclass(frozen=True)
class StreamConfig:
    """``[streams.NAME]``. ``relays`` empty and ``direct`` false: the ``[smtp]`` relay."""

    name: str
    relays: tuple[str, ...] = ()
    direct: bool = False
    source_addresses: tuple[str, ...] = ()
    helo: str | None = None
    return_path: str | None = None  # an address; "{token}" in its local part is the VERP token

    @property
    def uses_smtp_section(self) -> bool:
        """Whether this stream's relay is ``[smtp]`` (it names none and is not direct)."""
        return not self.relays and not self.direct

    @property
    def verp(self) -> bool:
        """Whether ``return_path`` carries a per-recipient token."""
        return self.return_path is not None and _TOKEN in self.return_path


@dataclass(frozen=True)
class DirectDomainConfig:
    """``[direct.domains."X"]``: the limits of one destination, matched on the recipient
    domain or on the MX host's suffix (``name`` lower case, IDNA, no final dot)."""

    name: str
    connections: int | None = None
    rate: str | None = None

    @property
    def rate_per_second(self) -> float | None:
        if self.rate is None:
            return None
        from .config import parse_rate

        return parse_rate(self.rate) or None


@dataclass(frozen=True)
class DirectRuleConfig:
    """``[[direct.rules]]``: a reply rule of the config's own, tried before the built-in ones.

    ``match``: a regular expression searched (case-insensitively) in a destination's
    deferral reply; ``action``: "suspend" (no new transaction for ``duration``) or
    "throttle" (at most ``connections`` connections and ``rate`` for ``duration``);
    ``trigger``: "N/period", act only once N replies of that destination matched within
    the period (default: at the first)."""

    match: str
    action: str
    duration: str
    connections: int = 1
    rate: str | None = None
    trigger: str | None = None

    @property
    def duration_seconds(self) -> float:
        return parse_duration(self.duration)

    @property
    def rate_per_second(self) -> float | None:
        if self.rate is None:
            return None
        from .config import parse_rate

        return parse_rate(self.rate) or None

    @property
    def trigger_count_and_period(self) -> tuple[int, float]:
        return parse_trigger(self.trigger) if self.trigger is not None else (1, 0.0)


@dataclass(frozen=True)
class DirectConfig:
    """``[direct]``: the settings of direct delivery (used by streams with ``direct = true``).

    ``rate_per_domain`` None: no limit per destination beyond the built-in provider
    defaults and ``domains``. ``domains`` keeps the file's order.
    """

    port: int = 25
    tls: str = "mta-sts"
    queue_lifetime: str = "5d"
    connections_per_domain: int = 4
    rate_per_domain: str | None = None
    domains: tuple[DirectDomainConfig, ...] = field(default_factory=tuple)
    rules: tuple[DirectRuleConfig, ...] = field(default_factory=tuple)

    @property
    def queue_lifetime_seconds(self) -> float:
        return parse_duration(self.queue_lifetime)

    @property
    def rate_per_domain_per_second(self) -> float | None:
        if self.rate_per_domain is None:
            return None
        from .config import parse_rate

        return parse_rate(self.rate_per_domain) or None

    def domain(self, name: str) -> DirectDomainConfig | None:
        """The ``[direct.domains."name"]`` entry written for exactly this name, if any."""
        wanted = name.strip().rstrip(".").lower()
        return next((entry for entry in self.domains if entry.name == wanted), None)


# --------------------------------------------------------------------------------------
# Parsing (called by mailer.core.config.parse_config with its helpers)

_RELAY_EXTRA: dict[str, tuple[tuple[type, ...], str]] = {
    "weight": ((int, float), "weight"),
    "rate": ((str,), "rate"),
    "connections": ((int,), "connections"),
}
_STREAM_SCHEMA: dict[str, tuple[tuple[type, ...], str]] = {
    "relays": ((list,), "relays"),
    "direct": ((bool,), "direct"),
    "source_addresses": ((list,), "source_addresses"),
    "helo": ((str,), "helo"),
    "return_path": ((str,), "return_path"),
}
_DIRECT_SCHEMA: dict[str, tuple[tuple[type, ...], str]] = {
    "port": ((int,), "port"),
    "tls": ((str,), "tls"),
    "queue_lifetime": ((str,), "queue_lifetime"),
    "connections_per_domain": ((int,), "connections_per_domain"),
    "rate_per_domain": ((str,), "rate_per_domain"),
    "domains": ((dict,), "domains"),
    "rules": ((list,), "rules"),
}
_DIRECT_RULE_SCHEMA: dict[str, tuple[tuple[type, ...], str]] = {
    "match": ((str,), "match"),
    "action": ((str,), "action"),
    "duration": ((str,), "duration"),
    "connections": ((int,), "connections"),
    "rate": ((str,), "rate"),
    "trigger": ((str,), "trigger"),
}
_DIRECT_DOMAIN_SCHEMA: dict[str, tuple[tuple[type, ...], str]] = {
    "connections": ((int,), "connections"),
    "rate": ((str,), "rate"),
}


def _check_name(kind: str, name: str, fail: Fail) -> None:
    if not _NAME.fullmatch(name):
        raise fail(
            f"{kind}.{name}",
            f"is not a usable {kind[:-1]} name: use letters, digits and _ . - (at most 64, starting with a "
            "letter or digit).",
        )


def _check_rate(key: str, value: str | None, fail: Fail) -> None:
    if value is None:
        return
    from .config import parse_rate

    try:
        parse_rate(value)
    except ValueError as exc:
        raise fail(key, f"is invalid: {exc}.") from None


def _check_connections(key: str, value: int | None, fail: Fail) -> None:
    from .config import MAX_CONNECTIONS

    if value is not None and not 1 <= value <= MAX_CONNECTIONS:
        raise fail(key, f"must be from 1 to {MAX_CONNECTIONS:,}, not {value}.")


def parse_relays(
    values: Any,
    *,
    fail: Fail,
    check_keys: CheckKeys,
    smtp_keys: dict[str, tuple[tuple[type, ...], str]],
    make_smtp: Callable[[dict[str, Any], str], SMTPConfig],
) -> tuple[RelayConfig, ...]:
    """``[relays.NAME]`` tables, in the file's order. ``make_smtp(values, prefix)``
    validates the ``[smtp]`` keys of one relay (errors named ``relays.NAME.key``)."""
    if not isinstance(values, dict):
        raise fail("relays", "must be a table of [relays.NAME] tables.")
    relays = []
    for name, table in values.items():
        _check_name("relays", name, fail)
        prefix = f"relays.{name}"
        if name == "smtp":
            raise fail(prefix, "is a reserved name: a stream that names no relay uses [smtp]; name this one otherwise.")
        if not isinstance(table, dict):
            raise fail(prefix, "must be a [relays.NAME] table (host = ..., port = ...).")
        checked = check_keys(prefix, table, {**smtp_keys, **_RELAY_EXTRA})
        extra = {key: checked.pop(key) for key in ("weight", "rate", "connections") if key in checked}
        if "host" not in checked:
            raise fail(f"{prefix}.host", "is required: the relay's host name or IP address.")
        smtp = make_smtp(checked, prefix)
        weight = float(extra.get("weight", 1.0))
        if not 0 < weight <= 1_000_000 or not math.isfinite(weight):
            raise fail(f"{prefix}.weight", f"must be more than 0 and at most 1,000,000, not {extra['weight']!r}.")
        _check_rate(f"{prefix}.rate", extra.get("rate"), fail)
        _check_connections(f"{prefix}.connections", extra.get("connections"), fail)
        relays.append(
            RelayConfig(
                name=name, smtp=smtp, weight=weight, rate=extra.get("rate"), connections=extra.get("connections")
            )
        )
    return tuple(relays)


def parse_streams(
    values: Any,
    *,
    fail: Fail,
    check_keys: CheckKeys,
    relays: tuple[RelayConfig, ...],
    helo_pattern: re.Pattern[str],
) -> tuple[StreamConfig, ...]:
    """``[streams.NAME]`` tables: each names known relays, or is direct, or uses ``[smtp]``."""
    if not isinstance(values, dict):
        raise fail("streams", "must be a table of [streams.NAME] tables.")
    known = [relay.name for relay in relays]
    streams = []
    for name, table in values.items():
        _check_name("streams", name, fail)
        prefix = f"streams.{name}"
        if not isinstance(table, dict):
            raise fail(prefix, "must be a [streams.NAME] table (relays = [...] or direct = true).")
        checked = check_keys(prefix, table, _STREAM_SCHEMA)
        names = checked.get("relays", [])
        if not all(isinstance(item, str) for item in names):
            raise fail(f"{prefix}.relays", "must be a list of relay names (strings).")
        for relay in names:
            if relay not in known:
                listed = ", ".join(known) if known else "none: add a [relays.NAME] table"
                raise fail(
                    f"{prefix}.relays",
                    f"names the relay {relay!r}, which is not defined (relays defined: {listed}).",
                )
        if len(set(names)) != len(names):
            raise fail(f"{prefix}.relays", "names a relay twice (give it a weight instead).")
        direct = checked.get("direct", False)
        if direct and names:
            raise fail(
                f"{prefix}.direct",
                "cannot go with relays: a stream either hands its mail to relays or delivers it itself.",
            )
        if "relays" in checked and not names:
            raise fail(f"{prefix}.relays", "is empty; name at least one relay, or remove the key to use [smtp].")
        sources = checked.get("source_addresses", [])
        addresses: list[str] = []
        for item in sources:
            try:
                if not isinstance(item, str):
                    raise ValueError
                addresses.append(str(ipaddress.ip_address(item.strip())))
            except ValueError:
                raise fail(
                    f"{prefix}.source_addresses",
                    f'must be a list of local IP addresses such as "192.0.2.10", not {item!r}.',
                ) from None
        if len(set(addresses)) != len(addresses):
            raise fail(f"{prefix}.source_addresses", "lists an address twice.")
        helo = checked.get("helo")
        if helo is not None and not helo_pattern.fullmatch(helo):
            raise fail(
                f"{prefix}.helo",
                f"must be a domain name or an address literal such as [192.0.2.1], not {helo!r}.",
                "It should be the name the source addresses' PTR records give.",
            )
        return_path = checked.get("return_path")
        if return_path is not None:
            _check_return_path(f"{prefix}.return_path", return_path, fail)
        streams.append(
            StreamConfig(
                name=name,
                relays=tuple(names),
                direct=direct,
                source_addresses=tuple(addresses),
                helo=helo,
                return_path=return_path,
            )
        )
    return tuple(streams)


def _check_return_path(key: str, value: str, fail: Fail) -> None:
    """An envelope sender: ``local@domain``, with at most one ``{token}``, in the local part."""
    local, at, domain = value.strip().rpartition("@")
    example = 'Write it as "bounces+{token}@example.com".'
    if not at or not local or not domain:
        raise fail(key, f"must be an address such as bounces+{{token}}@example.com, not {value!r}.", example)
    if _TOKEN in domain or value.count(_TOKEN) > 1:
        raise fail(key, "may hold {token} once, in the part before the @.", example)
    bare = local.replace(_TOKEN, "")
    if (bare and not _LOCAL_PART.fullmatch(bare)) or "{" in bare or "}" in bare:
        raise fail(
            key,
            f"has a character an envelope sender cannot hold before the @: {local!r} "
            "(letters, digits and ! # $ % & ' * + / = ? ^ _ ` | ~ . - ; the only placeholder is {token}).",
            example,
        )
    if local.startswith(".") or local.endswith(".") or ".." in local:
        raise fail(key, f"has a misplaced dot before the @: {local!r}.", example)
    if not _DOMAIN_PART.fullmatch(domain):
        raise fail(key, f"has no valid domain after the @: {domain!r}.", example)
    length = len(bare) + (_VERP_TOKEN_LENGTH if _TOKEN in local else 0)
    if length > _MAX_LOCAL_PART:
        raise fail(
            key,
            f"would have a local part of {length} characters with the token; at most {_MAX_LOCAL_PART} (RFC 5321).",
            "Shorten the part before the @.",
        )


def _domain_key(raw: str, fail: Fail) -> str:
    """A ``[direct.domains."X"]`` name: a domain or an MX host suffix, as IDNA, lower case."""
    name = raw.strip().rstrip(".").lower()
    if name.startswith("."):
        name = name[1:]  # ".google.com" and "google.com" mean the same suffix
    try:
        ascii_name = name.encode("idna").decode("ascii") if not name.isascii() else name
    except UnicodeError:
        ascii_name = ""
    labels = ascii_name.split(".")
    if not ascii_name or len(ascii_name) > 253 or not all(_DOMAIN_LABEL.fullmatch(label) for label in labels):
        raise fail(
            f'direct.domains."{raw}"',
            'is not a domain name; write a recipient domain or an MX host suffix such as "gmail.com" or "google.com".',
        )
    return ascii_name


def parse_direct(values: Any, *, fail: Fail, check_keys: CheckKeys) -> DirectConfig:
    """``[direct]`` and its ``[direct.domains."X"]`` tables."""
    if not isinstance(values, dict):
        raise fail("direct", "must be a [direct] table.")
    checked = check_keys("direct", values, _DIRECT_SCHEMA)
    port = checked.get("port", 25)
    if not 0 < port < 65536:
        raise fail("direct.port", f"must be between 1 and 65535, not {port}.")
    tls = checked.get("tls", "mta-sts")
    if tls not in DIRECT_TLS_MODES:
        raise fail("direct.tls", f'must be "mta-sts", "opportunistic" or "required", not {tls!r}.')
    lifetime = checked.get("queue_lifetime", "5d")
    try:
        parse_duration(lifetime)
    except ValueError as exc:
        raise fail("direct.queue_lifetime", f"is invalid: {exc}.") from None
    connections = checked.get("connections_per_domain", 4)
    _check_connections("direct.connections_per_domain", connections, fail)
    _check_rate("direct.rate_per_domain", checked.get("rate_per_domain"), fail)
    domains: list[DirectDomainConfig] = []
    seen: dict[str, str] = {}
    for raw, table in checked.get("domains", {}).items():
        prefix = f'direct.domains."{raw}"'
        name = _domain_key(raw, fail)
        if name in seen:
            raise fail(prefix, f'is the same destination as [direct.domains."{seen[name]}"].')
        seen[name] = raw
        if not isinstance(table, dict):
            raise fail(prefix, "must be a table (connections = ..., rate = ...).")
        entry = check_keys(prefix, table, _DIRECT_DOMAIN_SCHEMA)
        _check_connections(f"{prefix}.connections", entry.get("connections"), fail)
        _check_rate(f"{prefix}.rate", entry.get("rate"), fail)
        domains.append(DirectDomainConfig(name=name, connections=entry.get("connections"), rate=entry.get("rate")))
    rules = tuple(
        _parse_rule(index, table, fail=fail, check_keys=check_keys)
        for index, table in enumerate(checked.get("rules", []), 1)
    )
    return DirectConfig(
        port=port,
        tls=tls,
        queue_lifetime=lifetime,
        connections_per_domain=connections,
        rate_per_domain=checked.get("rate_per_domain"),
        domains=tuple(domains),
        rules=rules,
    )


def _parse_rule(index: int, table: Any, *, fail: Fail, check_keys: CheckKeys) -> DirectRuleConfig:
    """One ``[[direct.rules]]`` table (``index``: its place in the file, from 1)."""
    prefix = f"direct.rules[{index}]"
    if not isinstance(table, dict):
        raise fail(prefix, "must be a table (match = ..., action = ..., duration = ...); write it as [[direct.rules]].")
    entry = check_keys(prefix, table, _DIRECT_RULE_SCHEMA)
    for key in ("match", "action", "duration"):
        if key not in entry:
            raise fail(f"{prefix}.{key}", "is missing; a rule needs match, action and duration.")
    pattern = entry["match"]
    if not pattern.strip() or len(pattern) > _MAX_RULE_PATTERN:
        raise fail(f"{prefix}.match", f"must be a regular expression of 1 to {_MAX_RULE_PATTERN} characters.")
    try:
        re.compile(pattern)
    except re.error as exc:
        raise fail(f"{prefix}.match", f"is not a regular expression ({exc}).") from None
    action = entry["action"]
    if action not in _RULE_ACTIONS:
        raise fail(f"{prefix}.action", f'must be "suspend" or "throttle", not {action!r}.')
    try:
        parse_duration(entry["duration"])
    except ValueError as exc:
        raise fail(f"{prefix}.duration", f"is invalid: {exc}.") from None
    if action == "suspend" and ("connections" in entry or "rate" in entry):
        raise fail(prefix, "is a suspend rule: connections and rate belong to throttle rules only.")
    _check_connections(f"{prefix}.connections", entry.get("connections"), fail)
    _check_rate(f"{prefix}.rate", entry.get("rate"), fail)
    if entry.get("trigger") is not None:
        try:
            parse_trigger(entry["trigger"])
        except ValueError as exc:
            raise fail(f"{prefix}.trigger", f"is invalid: {exc}.") from None
    return DirectRuleConfig(
        match=pattern,
        action=action,
        duration=entry["duration"],
        connections=entry.get("connections", 1),
        rate=entry.get("rate"),
        trigger=entry.get("trigger"),
    )
