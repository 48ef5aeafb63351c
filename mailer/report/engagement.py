"""What came back after sending, as one record for ``mailer report``: bounces,
complaints (with the rate and its level), unsubscribes, unique opens and clicks, and
click-through per link.

Rates are over the recipients whose status is ``sent`` (what reached a mailbox). The
complaint levels are Gmail's bulk-sender limits: above 0.1 % is a warning, above 0.3 %
fails (``mailer report`` then exits 1, so a cron job or CI step notices). Opens are
always marked inflated: Apple Mail Privacy Protection (and some filters) load the
pixel of every message on arrival, read or not; no per-open test tells them apart
reliably, so the report says so rather than pretend.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..store.base import SendStore

__all__ = ["COMPLAINT_FAIL", "COMPLAINT_WARN", "Engagement", "LinkClicks", "complaint_level", "engagement_of"]

COMPLAINT_WARN = 0.001  # 0.1 %
COMPLAINT_FAIL = 0.003  # 0.3 %


@dataclass(frozen=True)
class LinkClicks:
    """One tracked link: recipients who clicked it, clicks, and click-through (recipients / sent)."""

    url: str
    unique_clicks: int
    clicks: int
    click_through: float


@dataclass(frozen=True)
class Engagement:
    """Events after sending, for one campaign or all of them."""

    sent: int
    bounces_hard: int
    bounces_soft: int
    complaints: int
    complaint_rate: float
    complaint_level: str  # "ok", "warn" or "fail"
    unsubscribes: int
    unique_opens: int
    unique_clicks: int
    opens_inflated: bool = True
    clicks_by_link: list[LinkClicks] = field(default_factory=list)


def complaint_level(rate: float) -> str:
    """``ok``, ``warn`` (above 0.1 %) or ``fail`` (above 0.3 %)."""
    if rate > COMPLAINT_FAIL:
        return "fail"
    if rate > COMPLAINT_WARN:
        return "warn"
    return "ok"


def engagement_of(store: SendStore, campaign: str | None, *, sent: int) -> Engagement:
    """The engagement of ``campaign`` (None: all), ``sent`` being its count of sent recipients."""
    counts = store.feedback_counts(campaign)
    complaints = counts.get("unique_complained", 0)
    rate = complaints / sent if sent else 0.0
    links = [
        LinkClicks(url=url, unique_clicks=people, clicks=clicks, click_through=people / sent if sent else 0.0)
        for url, people, clicks in store.clicks_by_link(campaign)
    ]
    return Engagement(
        sent=sent,
        bounces_hard=counts.get("unique_bounced_hard", 0),
        bounces_soft=counts.get("unique_bounced_soft", 0),
        complaints=complaints,
        complaint_rate=rate,
        complaint_level=complaint_level(rate),
        unsubscribes=counts.get("unique_unsubscribed", 0),
        unique_opens=counts.get("unique_opened", 0),
        unique_clicks=counts.get("unique_clicked", 0),
        clicks_by_link=links,
    )
