"""Per-destination shaping for direct delivery: limits, built-in provider defaults, reply rules.

A *destination* is what a limit applies to: a large provider (all of Gmail, whatever the
recipient domain: ``googlemail.com`` and every Google Workspace domain deliver to MX
hosts under ``google.com``), a ``[direct.domains."X"]`` entry, or else one recipient
domain. :meth:`Shaper.destination` picks it from the recipient domain and its MX host
names; the :class:`Destination` object is shared by every domain that maps to it, so its
connections and rate hold across the whole run.

The built-in numbers (:data:`PROVIDERS`) are ours, chosen to be safe for a sender
without a warmed-up reputation; the sources each one leans on are cited beside it.
Providers publish few hard numbers: they ask senders to ramp up slowly and to back off
when told to, which :data:`REPLY_RULES` does. A config entry with the provider's
domain (``[direct.domains."gmail.com"]``) replaces its numbers.

Reply rules (the idea of KumoMTA's "automation" rules; the patterns here are the reply
codes the providers document) match a deferral's text and either *throttle* the
destination (fewer connections, a lower rate) or *suspend* it (no new transaction) for
a time, at the first matching reply or once a rule's trigger (N matching replies within
a period) is reached. Rules are data: a config adds its own (``[[direct.rules]]``,
:func:`reply_rules`), tried before the built-in ones.
"""

from __future__ import annotations

import re
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..core.streams import DirectConfig

__all__ = [
    "PROVIDERS",
    "REPLY_RULES",
    "Destination",
    "Provider",
    "ReplyRule",
    "Shaper",
    "is_reputation_deferral",
    "match_reply_rule",
    "reply_rules",
]


@dataclass(frozen=True)
class Provider:
    """Built-in limits of one provider: matched on recipient domain or MX host suffix."""

    name: str
    domains: tuple[str, ...]
    mx_suffixes: tuple[str, ...]
    connections: int
    rate: float | None  # messages per second, None: no own limit
    per_connection: int  # messages before a fresh connection
    source: str  # where the numbers come from


#: The large providers. Sources read 2026-12; the numbers are our own conservative choices.
PROVIDERS: tuple[Provider, ...] = (
    Provider(
        "gmail",
        ("gmail.com", "googlemail.com"),
        (".google.com", ".googlemail.com"),
        connections=5,
        rate=20.0,
        per_connection=50,
        source=(
            "Google's sender guidelines (support.google.com/mail/answer/81126: ramp up slowly, "
            "back off on 421/4.7.28); KumoMTA's policy-extras shaping file gives Google 5 connections "
            "per provider and 50 messages per connection; the 20/s rate is ours"
        ),
    ),
    Provider(
        "outlook",
        ("outlook.com", "hotmail.com", "live.com", "msn.com", "hotmail.co.uk", "outlook.fr"),
        (".olc.protection.outlook.com", ".mail.protection.outlook.com", ".mx.microsoft"),
        connections=5,
        rate=10.0,
        per_connection=50,
        source=(
            "Microsoft's sender support policies (sendersupport.olc.protection.outlook.com/pm/Policies); "
            "KumoMTA's shaping file: 5 connections per provider, 50 per connection; the 10/s rate is ours"
        ),
    ),
    Provider(
        "yahoo",
        ("yahoo.com", "aol.com", "ymail.com", "rocketmail.com", "yahoo.co.uk", "yahoo.fr"),
        (".yahoodns.net",),
        connections=5,
        rate=10.0,
        per_connection=20,
        source=(
            "Yahoo's sender best practices (senders.yahooinc.com/best-practices), relayed by KumoMTA's "
            "shaping file: 20 messages per connection; TSS04 means back off; connections and rate are ours"
        ),
    ),
    Provider(
        "icloud",
        ("icloud.com", "me.com", "mac.com"),
        (".icloud.com",),
        connections=10,
        rate=10.0,
        per_connection=5,
        source=(
            "Apple's postmaster page (support.apple.com/102322); KumoMTA's shaping file: 10 connections, "
            "5 messages per connection; the rate is ours"
        ),
    ),
    Provider(
        "gmx-webde",
        ("gmx.de", "gmx.net", "gmx.at", "gmx.ch", "gmx.com", "web.de", "mail.com"),
        (".gmx.net", ".web.de", ".mail.com"),
        connections=4,
        rate=5.0,
        per_connection=100,
        source=(
            "United Internet's postmaster pages (postmaster.gmx.net, postmaster.web.de) publish no numbers; "
            "KumoMTA's shaping file gives mail.com 100 per connection; connections and rate are ours"
        ),
    ),
    Provider(
        "mailru",
        ("mail.ru", "inbox.ru", "list.ru", "bk.ru", "internet.ru"),
        (".mail.ru",),
        connections=4,
        rate=5.0,
        per_connection=100,
        source="Mail.ru's postmaster guidelines (postmaster.mail.ru) publish no numbers; all ours, conservative",
    ),
)


@dataclass(frozen=True)
class ReplyRule:
    """A deferral text pattern and what it does to its destination for ``duration`` seconds.

    ``action`` "suspend": no new transaction until then; "throttle": at most
    ``connections`` connections and ``rate`` messages/s until then. ``threshold`` and
    ``period``: act only once ``threshold`` replies of one destination matched within
    ``period`` seconds (the default, 1: at the first)."""

    pattern: str
    action: str  # "suspend" | "throttle"
    duration: float
    connections: int = 1
    rate: float | None = None
    source: str = ""
    threshold: int = 1
    period: float = 0.0

    def matches(self, text: str) -> bool:
        return re.search(self.pattern, text, re.IGNORECASE) is not None


#: Built-in rules, first match wins. Patterns are the providers' documented codes.
REPLY_RULES: tuple[ReplyRule, ...] = (
    ReplyRule(
        r"\[TS?S04\]",
        "suspend",
        2 * 3600.0,
        source="Yahoo: TSS04 'messages temporarily deferred due to unexpected volume or user complaints'",
    ),
    ReplyRule(
        r"\[TS?S0[123]\]", "throttle", 3600.0, connections=1, rate=1.0, source="Yahoo: TSS01-03 rate-limit deferrals"
    ),
    ReplyRule(
        r"\bS3150\b|\bS3140\b|\bS775\b",
        "suspend",
        3600.0,
        source="Outlook.com: S3150/S3140 'temporarily rate limited due to IP reputation'",
    ),
    ReplyRule(
        r"4\.7\.28\b",
        "throttle",
        3600.0,
        connections=1,
        rate=1.0,
        source="Gmail: 421-4.7.28 'unusual rate of unsolicited mail originating from your IP'",
    ),
    ReplyRule(
        r"4\.7\.0\b.*(rate|try again later)|temporarily rate limited|temporarily deferred",
        "throttle",
        1800.0,
        connections=1,
        rate=1.0,
        source="generic reputation deferrals (Gmail 4.7.0, the texts KumoMTA's defaults match)",
    ),
)

# "Too many connections" in any provider's wording: fewer connections, not the whole run.
_TOO_MANY_CONNECTIONS = re.compile(
    r"too many (concurrent |simultaneous )?(connections|sessions)|connection limit", re.I
)


def match_reply_rule(text: str, rules: Sequence[ReplyRule] = REPLY_RULES) -> ReplyRule | None:
    """The first rule whose pattern is found in ``text``, or None."""
    return next((rule for rule in rules if rule.matches(text)), None)


def reply_rules(direct: DirectConfig) -> tuple[ReplyRule, ...]:
    """The config's ``[[direct.rules]]`` (in the file's order), then the built-in rules."""
    own = []
    for index, rule in enumerate(direct.rules, 1):
        threshold, period = rule.trigger_count_and_period
        own.append(
            ReplyRule(
                rule.match,
                rule.action,
                rule.duration_seconds,
                connections=rule.connections,
                rate=rule.rate_per_second,
                source=f"[[direct.rules]] #{index} of the config",
                threshold=threshold,
                period=period,
            )
        )
    return (*own, *REPLY_RULES)


def is_reputation_deferral(code: int | None, text: str) -> bool:
    """421 or an enhanced code 4.7.x: the receiver does not welcome this sender address now."""
    return code == 421 or re.search(r"\b4\.7\.\d{1,3}\b", text) is not None


def is_too_many_connections(code: int | None, text: str) -> bool:
    """A reply that says this sender has too many sessions open."""
    return _TOO_MANY_CONNECTIONS.search(text) is not None


@dataclass
class Destination:
    """The live limits of one destination, shared by every domain that maps to it."""

    name: str
    connections: int
    rate: float | None
    per_connection: int = 100
    active: int = 0  # connections open (or being opened) now
    paused_until: float = 0.0
    throttle_until: float = 0.0
    throttled_connections: int = 1
    throttled_rate: float | None = None
    backoffs: int = 0  # 421 / too-many-connections back-offs taken
    avoid_source: str | None = None  # the source address of the last reputation deferral
    next_start: float = 0.0  # the rate's next free slot
    peak_active: int = 0
    reason: str = ""  # why it is paused or throttled
    _opened: int = field(default=0, repr=False)
    # For rules with a trigger: when this destination's replies matched each of them.
    _matched: dict[ReplyRule, deque[float]] = field(default_factory=dict, repr=False)

    def connection_limit(self, now: float) -> int:
        if now < self.throttle_until:
            return max(1, min(self.connections, self.throttled_connections))
        return self.connections

    def rate_limit(self, now: float) -> float | None:
        if now < self.throttle_until and self.throttled_rate is not None:
            return self.throttled_rate if self.rate is None else min(self.rate, self.throttled_rate)
        return self.rate

    def take_slot(self, now: float) -> float:
        """Reserve the next transaction start; returns how long to wait for it (0: now)."""
        rate = self.rate_limit(now)
        start = max(now, self.next_start, self.paused_until)
        if rate:
            self.next_start = start + 1.0 / rate
        return start - now

    def back_off(self, now: float, *, pause: float, reason: str) -> None:
        """421 / too many connections: one connection fewer (at least one) and a pause."""
        self.backoffs += 1
        self.connections = max(1, min(self.connections, max(self.active, 1)) - 1)
        self.paused_until = max(self.paused_until, now + pause)
        self.reason = reason

    def apply(self, rule: ReplyRule, now: float, *, reason: str) -> bool:
        """What a matched reply rule does to this destination; False while its trigger
        (``threshold`` matches within ``period``) is not reached yet."""
        if rule.threshold > 1:
            times = self._matched.setdefault(rule, deque())
            times.append(now)
            while times and times[0] <= now - rule.period:
                times.popleft()
            if len(times) < rule.threshold:
                return False
            times.clear()  # the next action takes a full count again
        self.reason = reason
        if rule.action == "suspend":
            self.paused_until = max(self.paused_until, now + rule.duration)
        else:
            self.throttle_until = max(self.throttle_until, now + rule.duration)
            self.throttled_connections = rule.connections
            self.throttled_rate = rule.rate
        return True

    def next_source(self, sources: Sequence[str]) -> str | None:
        """The source address for a new connection: in turn, skipping the one that last got a
        reputation deferral (421/4.7.x) while another is available."""
        if not sources:
            return None
        source = sources[self._opened % len(sources)]
        self._opened += 1
        if source == self.avoid_source and len(sources) > 1:
            source = sources[self._opened % len(sources)]
            self._opened += 1
        return source


@dataclass(frozen=True)
class DomainLimit:
    """A ``[direct.domains."X"]`` entry: X is a recipient domain or an MX host suffix."""

    name: str
    connections: int | None = None
    rate: float | None = None


class Shaper:
    """Maps recipient domains to shared :class:`Destination` objects (see the module docstring).

    Precedence: a config entry matching the recipient domain, then a config entry matching
    an MX host suffix, then a built-in provider (by domain, then MX suffix), then the
    domain alone with ``connections_per_domain`` / ``rate_per_domain``. A config entry
    naming a provider's domain overrides that provider's numbers."""

    def __init__(
        self,
        *,
        connections_per_domain: int = 4,
        rate_per_domain: float | None = None,
        domains: Iterable[DomainLimit] = (),
        providers: Sequence[Provider] = PROVIDERS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.connections_per_domain = connections_per_domain
        self.rate_per_domain = rate_per_domain
        self.domains = {d.name: d for d in domains}
        self.providers = providers
        self.clock = clock
        self._destinations: dict[str, Destination] = {}

    def _provider(self, domain: str, mx_hosts: Sequence[str]) -> Provider | None:
        for provider in self.providers:
            if domain in provider.domains:
                return provider
        for provider in self.providers:
            if any(_has_suffix(host, suffix) for host in mx_hosts for suffix in provider.mx_suffixes):
                return provider
        return None

    def _config(self, domain: str, mx_hosts: Sequence[str]) -> DomainLimit | None:
        if domain in self.domains:
            return self.domains[domain]
        for name, entry in self.domains.items():
            if any(_has_suffix(host, "." + name) or host == name for host in mx_hosts):
                return entry
        return None

    def destination(self, domain: str, mx_hosts: Sequence[str] = ()) -> Destination:
        """The shared destination of ``domain`` (lower case) whose MX hosts are ``mx_hosts``."""
        mx_hosts = [h.lower().rstrip(".") for h in mx_hosts]
        entry = self._config(domain, mx_hosts)
        provider = self._provider(domain, mx_hosts)
        if entry is None and provider is not None:
            # A config entry naming one of the provider's domains overrides the provider.
            entry = next((self.domains[d] for d in provider.domains if d in self.domains), None)
        if entry is not None and provider is not None and entry.name not in provider.domains:
            provider = None  # an entry of its own (e.g. an MX suffix) wins over the built-in provider
        if provider is not None:
            key = f"provider:{provider.name}"
        elif entry is not None:
            key = f"config:{entry.name}"
        else:
            key = f"domain:{domain}"
        found = self._destinations.get(key)
        if found is not None:
            return found
        connections = self.connections_per_domain
        rate = self.rate_per_domain
        per_connection = 100
        if provider is not None:
            connections, rate, per_connection = provider.connections, provider.rate, provider.per_connection
        if entry is not None:
            connections = entry.connections if entry.connections is not None else connections
            rate = entry.rate if entry.rate is not None else rate
        made = Destination(key.split(":", 1)[1], connections, rate, per_connection)
        self._destinations[key] = made
        return made

    @property
    def destinations(self) -> list[Destination]:
        return list(self._destinations.values())


def _has_suffix(host: str, suffix: str) -> bool:
    suffix = suffix if suffix.startswith(".") else "." + suffix
    return host.endswith(suffix)
