"""Before a send: how many messages go to each top destination domain, and how long the
stream's limits make the send take (the confirmation prompt and the dry-run summary).

Pure arithmetic over counts. With several relays each gets its weight's share of the
messages (smooth weighted round robin, :mod:`mailer.delivery.pool`), so a relay with
its own rate caps the whole stream at ``rate / share``; the campaign's rate caps it too.
For a direct stream, each destination's own rate (``[direct.domains."X"]``, else
``rate_per_domain``) bounds the time its messages need.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

from ..core.config import Config
from ..delivery.routes import Route

__all__ = ["Estimate", "estimate_send", "format_duration", "format_rate", "route_rate"]


@dataclass(frozen=True)
class Estimate:
    """``top``: the largest destination domains with their counts; ``others``: how many
    messages go elsewhere; ``rate``: the stream's limit in messages per second (None: no
    limit is configured); ``seconds``: the time the limits make it take (None: unknown)."""

    messages: int
    top: tuple[tuple[str, int], ...]
    others: int
    other_domains: int
    rate: float | None
    seconds: float | None

    def describe(self) -> str:
        """``40 % gmail.com (8,000), 20 % yahoo.com (4,000), 2 others (1,000); ETA 6 min at 20/s``."""
        if not self.messages:
            return "no messages"
        parts = [f"{_percent(count, self.messages)} {domain} ({count:,})" for domain, count in self.top]
        if self.others:
            parts.append(
                f"{self.other_domains:,} other domain{'s' if self.other_domains > 1 else ''} ({self.others:,})"
            )
        text = ", ".join(parts)
        if self.seconds is not None and self.rate is not None:
            text += f"; ETA {format_duration(self.seconds)} at {format_rate(self.rate)}"
        elif self.seconds is not None:
            text += f"; ETA {format_duration(self.seconds)} at the destinations' limits"
        else:
            text += "; no rate limit configured: as fast as the relay takes them"
        return text

    def to_dict(self) -> dict[str, object]:
        return {
            "messages": self.messages,
            "top_domains": [{"domain": d, "messages": n} for d, n in self.top],
            "other_messages": self.others,
            "rate_per_second": self.rate,
            "eta_seconds": None if self.seconds is None else round(self.seconds, 1),
        }


def _percent(count: int, total: int) -> str:
    share = 100.0 * count / total
    return f"{share:.0f} %" if share >= 1 else "<1 %"


def format_duration(seconds: float) -> str:
    """``45 s``, ``6 min``, ``2.5 h``, ``3.1 days``."""
    if seconds < 90:
        return f"{max(seconds, 1):.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min"
    if seconds < 48 * 3600:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"


def format_rate(per_second: float) -> str:
    """``20/s``, ``2.5/s``, ``30/min``, ``100/h``."""
    if per_second >= 10:
        return f"{per_second:.0f}/s"
    if per_second >= 1:
        return f"{per_second:.3g}/s"
    if per_second * 60 >= 1:
        return f"{per_second * 60:.3g}/min"
    return f"{per_second * 3600:.3g}/h"


def route_rate(route: Route, *, campaign_rate: float) -> float | None:
    """The messages per second the route's limits allow (None: no limit is set).

    ``campaign_rate`` is ``--rate`` / ``[send] rate`` in messages per second (0: unlimited).
    """
    limits = [campaign_rate] if campaign_rate > 0 else []
    total_weight = sum(relay.weight for relay in route.relays)
    for relay in route.relays:
        own = relay.rate_per_second
        if own:
            limits.append(own * total_weight / relay.weight)  # its share of the messages at its own rate
    return min(limits) if limits else None


def estimate_send(
    domains: Counter[str],
    *,
    route: Route,
    config: Config,
    top: int = 5,
    domain_rate: Callable[[str], float | None] | None = None,
) -> Estimate:
    """The estimate of sending ``domains`` (recipient domain -> messages) through ``route``.

    ``domain_rate``: a direct stream's limit for one destination (default: its
    ``[direct.domains."X"]`` rate, else ``rate_per_domain``).
    """
    messages = sum(domains.values())
    largest = tuple(domains.most_common(top))
    others = messages - sum(count for _, count in largest)
    rate = route_rate(route, campaign_rate=config.send.rate_per_second)
    seconds = messages / rate if rate else None
    if route.direct:
        lookup = domain_rate or _direct_rate(config)
        slowest = max(
            (count / limit for domain, count in domains.items() if (limit := lookup(domain))),
            default=None,
        )
        if slowest is not None:
            seconds = max(seconds or 0.0, slowest)
    return Estimate(
        messages=messages,
        top=largest,
        others=others,
        other_domains=max(0, len(domains) - len(largest)),
        rate=rate,
        seconds=seconds,
    )


def _direct_rate(config: Config) -> Callable[[str], float | None]:
    direct = config.direct

    def lookup(domain: str) -> float | None:
        entry = direct.domain(domain)
        if entry is not None and entry.rate_per_second:
            return entry.rate_per_second
        return direct.rate_per_domain_per_second

    return lookup
