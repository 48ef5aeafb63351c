"""The records the store hands out: delivery rows, reports, runs, suppressions."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any, NamedTuple

from ..core.outcomes import STATUS_BY_VALUE, Status

__all__ = [
    "DELIVERY_COLUMNS",
    "FAILED_CSV_HEADER",
    "SUPPRESSION_SOURCES",
    "CampaignSummary",
    "Delivery",
    "DomainCount",
    "FeedbackEvent",
    "FeedbackKind",
    "ImportResult",
    "InvalidEntry",
    "RecipientHistory",
    "ReplyCount",
    "Report",
    "Run",
    "SkippedRow",
    "Suppression",
    "TimeCount",
    "delivery_from_row",
    "utc_now",
]

# web: an unsubscribe through `mailer serve`.
SUPPRESSION_SOURCES = ("manual", "import", "bounce", "web")
FAILED_CSV_HEADER = ("email", "status", "smtp_code", "smtp_reply")


def utc_now() -> datetime:
    return datetime.now(UTC)


# --- records ------------------------------------------------------------------------


class SkippedRow(NamedTuple):
    """A contact that is not mailed: ``invalid`` (a bad row) or ``suppressed``.

    ``recipient`` may be any string (the raw value of a bad address); an empty one is
    logged as ``"line N"``."""

    recipient: str
    status: Status
    reason: str
    line: int | None


class FeedbackKind(StrEnum):
    """What came back after a message was sent (the ``feedback`` table's ``kind``)."""

    UNSUBSCRIBED = "unsubscribed"
    OPENED = "opened"
    CLICKED = "clicked"
    BOUNCED_HARD = "bounced_hard"
    BOUNCED_SOFT = "bounced_soft"
    # A permanent failure that is not about the mailbox (blocked, spam, policy): never a
    # reason to suppress, nor part of a soft-bounce streak (mailer.bounces.run).
    BOUNCED_POLICY = "bounced_policy"
    COMPLAINED = "complained"


@dataclass(frozen=True, slots=True)
class FeedbackEvent:
    """One event after sending, for :meth:`SendStore.record_feedback`.

    ``address`` as the token or report gave it (the store keys it by ``address_key``);
    ``detail`` the clicked URL, the bounce's status and diagnostic, the report id;
    ``source`` who saw it (``web``, ``bounces``, ...). ``ref`` makes an event idempotent:
    a second event with the same kind and ref is not recorded (a bounce's Message-ID,
    so a mailbox read twice counts once); None for events that may repeat (opens).
    ``at`` is a UTC ISO 8601 time, None for now."""

    campaign: str
    address: str
    kind: FeedbackKind
    detail: str | None = None
    source: str = "web"
    ref: str | None = None
    at: str | None = None


@dataclass(frozen=True, slots=True)
class RecipientHistory:
    """What ``mailer bounces`` needs to know of one address: ``sends`` are its
    ``(campaign, status, first_at)`` rows in every campaign, oldest first (``invalid``
    and ``suppressed`` rows left out); ``soft_bounced`` the campaigns with a
    ``bounced_soft`` event for it."""

    sends: tuple[tuple[str, str, str], ...] = ()
    soft_bounced: frozenset[str] = frozenset()


@dataclass(frozen=True)
class Delivery:
    """One (campaign, recipient) row of the send log."""

    campaign: str
    recipient: str
    status: Status
    attempts: int
    smtp_code: int | None
    smtp_reply: str | None
    message_id: str | None
    line: int | None
    reason: str | None
    first_at: str
    updated_at: str


DELIVERY_COLUMNS = (
    "campaign, recipient, status, attempts, smtp_code, smtp_reply, message_id, line, reason, first_at, updated_at"
)


def delivery_from_row(row: tuple[Any, ...]) -> Delivery:
    """A :class:`Delivery` from a row of :data:`DELIVERY_COLUMNS`."""
    values = list(row)
    values[2] = STATUS_BY_VALUE[values[2]]
    return Delivery(*values)


@dataclass(frozen=True)
class DomainCount:
    """How many recipients of one domain ended in each status."""

    domain: str
    total: int
    by_status: dict[str, int]


@dataclass(frozen=True)
class ReplyCount:
    """How many recipients got one SMTP reply code last, with one example reply text; or,
    with ``code`` None, how many ended with one reason that had no reply (``cannot
    connect to HOST:PORT: connection refused``), that reason being the example."""

    code: int | None
    count: int
    example_reply: str | None


@dataclass(frozen=True)
class TimeCount:
    """How many recipients reached ``sent`` within one hour (``start``: UTC ISO, ``YYYY-MM-DDTHH``)."""

    start: str
    sent: int


@dataclass(frozen=True)
class Report:
    """What happened in one campaign (or in all of them when ``campaign`` is None)."""

    campaign: str | None
    total: int
    by_status: dict[str, int]
    by_domain: list[DomainCount]
    by_smtp_code: list[ReplyCount]
    unknown_outcome: list[Delivery] = field(default_factory=list)
    sends_over_time: list[TimeCount] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serializable form, with a ``version`` for consumers of ``--json``."""
        data = dataclasses.asdict(self)
        for row in data["unknown_outcome"]:
            row["status"] = str(row["status"])
        return {"version": 1, **data}


@dataclass(frozen=True)
class CampaignSummary:
    """A campaign known to the send log, with its row count and last activity (UTC ISO)."""

    name: str
    recipients: int
    last_activity: str


@dataclass(frozen=True)
class Run:
    """One ``mailer send`` run, as recorded by :meth:`SendLog.start_run`."""

    id: int
    campaign: str
    template: str | None
    contacts: str | None
    pid: int
    host: str
    started_at: str
    finished_at: str | None
    interrupted: bool | None
    counts: dict[str, int] | None


@dataclass(frozen=True)
class Suppression:
    """An address that is never mailed again."""

    address: str
    reason: str | None
    source: str
    added_at: str


class InvalidEntry(NamedTuple):
    """A line of an imported suppression file that holds no valid address."""

    line: int
    value: str


@dataclass(frozen=True)
class ImportResult:
    """The outcome of :meth:`SendLog.import_suppressions`."""

    added: int
    already_present: int
    invalid: list[InvalidEntry]
