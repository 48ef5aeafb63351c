"""The store interface: what ``send``, ``report``, ``suppress``, ``check`` and the journal talk to.

A :class:`SendStore` keeps the send log (one row per campaign and recipient), the run
history, the suppression list, the campaign lock and how far each run's delivery
journal is applied. Its questions come in bulk — "which of these addresses are
settled, which are suppressed" for a batch of contacts, events recorded in batches —
because a store on a server (PostgreSQL) is a network round trip away: one query per
contact would bound the send at a few thousand round trips a second.

Addresses go in as the contacts give them; the store keys them by
:func:`mailer.core.addresses.address_key`.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Protocol, Self, TextIO

from ..core.outcomes import DeliveryEvent, Status
from .locks import CampaignLock
from .records import (
    CampaignSummary,
    FeedbackEvent,
    ImportResult,
    RecipientHistory,
    Report,
    Run,
    SkippedRow,
    Suppression,
)

__all__ = ["SendStore"]


class SendStore(Protocol):
    """A send log with its run history, suppression list, campaign locks and journal offsets."""

    @property
    def path(self) -> Path:
        """Where the store lives (files that belong to it, such as journals, go beside it)."""
        ...

    def close(self) -> None:
        """Close the store (idempotent)."""
        ...

    def __enter__(self) -> Self: ...

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None: ...

    # --- resume and suppression, in bulk ---

    def statuses(self, campaign: str, addresses: Sequence[str]) -> list[Status | None]:
        """The logged status of each address in ``campaign`` (None: never logged), in order."""
        ...

    def suppressed(self, addresses: Sequence[str]) -> list[bool]:
        """Whether each address is on the suppression list, in order."""
        ...

    # --- writes, in batches ---

    def record_events(
        self,
        campaign: str,
        events: Iterable[DeliveryEvent],
        *,
        journal: tuple[int, int] | None = None,
        bounces: Iterable[tuple[str, str]] = (),
    ) -> None:
        """Apply delivery events (``sending``, ``sent``, ``failed``, ``deferred``) in order, in
        one transaction, with the journal offset ``(run_id, offset)`` they bring the run to and
        the hard bounces ``(address, reason)`` to suppress."""
        ...

    def record_skipped(self, campaign: str, rows: Iterable[SkippedRow]) -> None:
        """Record contacts that are not mailed (``invalid``, ``suppressed``), in one transaction.

        A row never overwrites what happened to a real message (``sent``, ``failed``,
        ``sending``)."""
        ...

    # --- what comes back after sending (mailer serve, mailer bounces) ---

    def record_feedback(
        self,
        events: Iterable[FeedbackEvent],
        *,
        suppress: Iterable[tuple[str, str | None, str]] = (),
    ) -> int:
        """Record events after sending (unsubscribed, opened, clicked, bounced_hard,
        bounced_soft, complained) and suppressions ``(address, reason, source)`` in one
        transaction; returns how many events were new (kind + ``ref`` already recorded:
        skipped). Safe, and never a "locked" error, while a send of the campaign runs."""
        ...

    def feedback_counts(self, campaign: str | None = None) -> dict[str, int]:
        """Events by kind, and ``unique_<kind>``: recipients with at least one."""
        ...

    def engagement_history(self) -> dict[str, tuple[int, int, int, int, str | None, str | None, str | None]]:
        """Every recipient's history over all campaigns, in one query (for ``--where``'s
        ``engagement``): address key -> ``(sent, opens, clicks, bounces, last_open,
        last_click, last_sent)``, times as UTC ISO 8601 or None."""
        ...

    def clicks_by_link(self, campaign: str | None = None, *, limit: int = 100) -> list[tuple[str, int, int]]:
        """``(url, recipients who clicked it, clicks)`` for the ``limit`` most clicked links."""
        ...

    def list_feedback(self, campaign: str | None = None) -> list[tuple[str, str, str, str, str | None, str]]:
        """Every event ``(campaign, recipient key, kind, at, detail, source)``, oldest first."""
        ...

    def find_by_recipient_tag(self, tag: int) -> list[tuple[str, str]]:
        """The ``(campaign, address)`` rows with this recipient tag (a VERP token's)."""
        ...

    def find_by_message_ids(self, message_ids: Sequence[str]) -> dict[str, tuple[str, str]]:
        """The ``(campaign, address)`` each logged Message-ID was sent to (brackets optional)."""
        ...

    def known_feedback_refs(self, refs: Sequence[str]) -> set[str]:
        """Which of these event refs are already recorded (of any kind)."""
        ...

    def bounce_history(self, addresses: Sequence[str]) -> dict[str, RecipientHistory]:
        """For each address (keyed by ``address_key``) that the log has sent to: its sends in
        every campaign, oldest first, and the campaigns it soft-bounced in (two queries for
        the whole batch, through the recipient-tag index)."""
        ...

    # --- runs, the campaign lock and the journal offset ---

    def start_run(self, campaign: str, *, template: str | None, contacts: str | None) -> int:
        """Record the start of a run; returns its id."""
        ...

    def finish_run(self, run_id: int, *, counts: Mapping[str, int], interrupted: bool) -> None:
        """Record the end of a run with its counts."""
        ...

    def list_runs(self, campaign: str | None = None) -> list[Run]:
        """The recorded runs, oldest first."""
        ...

    def acquire_lock(self, campaign: str) -> CampaignLock:
        """Lock ``campaign`` against a second run on this store, or raise :class:`LockedError`."""
        ...

    def journal_path(self, campaign: str) -> Path:
        """Where the delivery journal of ``campaign`` is written."""
        ...

    def journal_applied(self, run_id: int) -> int | None:
        """How far into its journal run ``run_id`` is applied (None: not at all)."""
        ...

    def set_journal_applied(self, run_id: int, offset: int) -> None:
        """Record that run ``run_id``'s journal is applied up to ``offset``."""
        ...

    # --- reports ---

    def counts(self, campaign: str) -> dict[str, int]:
        """The number of recipients of ``campaign`` in each status."""
        ...

    def report(self, campaign: str | None = None, *, max_domains: int | None = None) -> Report:
        """Counts by status, domain and reply, and the rows with an unknown outcome."""
        ...

    def campaigns(self) -> list[CampaignSummary]:
        """Every campaign in the store, most recently active first."""
        ...

    def write_failed_csv(self, campaign: str, file: TextIO) -> int:
        """Write the failed and deferred rows of ``campaign`` as a contacts CSV."""
        ...

    # --- the suppression list ---

    def add_suppressions(
        self, addresses: Iterable[str], *, reason: str | None = None, source: str = "manual"
    ) -> tuple[int, int]:
        """Add addresses; returns ``(added, already_present)``."""
        ...

    def remove_suppressions(self, addresses: Iterable[str]) -> int:
        """Take addresses off the list; returns how many were on it."""
        ...

    def list_suppressions(self, *, batch_size: int = 1000) -> Iterator[Suppression]:
        """Every suppressed address, in address order."""
        ...

    def import_suppressions(
        self, file_path: Path, *, reason: str | None = None, source: str = "import"
    ) -> ImportResult:
        """Add the addresses of a CSV or plain list file."""
        ...
