"""``mailer bounces``: read reports from sources, attribute them, record them, suppress.

For each report recipient, who and which campaign, in this order:

1. the **VERP token** in the address the report was delivered to (or in the returned
   original's Return-Path): its recipient tag finds the send-log rows, its MAC (with
   the ``[web]`` key) picks the campaign; without the key, the tag still names the
   address and the campaign comes from 2 or 3;
2. the returned original's **Message-ID** (every message mailer sends has its own);
3. the **recipient address** alone: the most recent campaign the log sent it in.

A recipient none of these finds is *unattributed*: counted, not recorded, not
suppressed (an address the log never mailed has nothing to suppress it from).

Events go through :meth:`SendStore.record_feedback` (``bounced_hard``,
``bounced_soft``, ``bounced_policy``, ``complained``), each with the ref
``<report ref>|<address key>`` (the report's own Message-ID, else a SHA-256 of its
bytes), so a report read twice — the same mbox again, a copy in another folder — is
a *duplicate* and counts once. Hard bounces and complaints are suppressed with the
reason (source ``bounce``).

**Soft-bounce streaks.** An address is suppressed when it soft-bounced in
``[bounces] soft_bounce_limit`` (default 3) campaigns in a row: among the campaigns
the log *sent* it (status ``sent`` or ``sending``), oldest first, up to the one this
bounce is about, the last N each have a soft bounce. So a campaign that reached the
address without a soft bounce breaks the streak (the "successful send" that resets
it), several delay notices for one message count as one campaign, and a report that
arrives late is judged at the place of its own campaign, not after later sends.
Campaigns the address failed or deferred in at SMTP time neither extend nor break
it; a policy rejection (5.7.x: our reputation, not their mailbox) does neither.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING

from ..core.addresses import address_key
from ..core.tokens import TokenSigner, parse_verp_token
from ..store.records import FeedbackEvent, FeedbackKind, RecipientHistory
from .reports import BounceKind, Report, ReportError, ReportRecipient, parse_report
from .sources import BounceSource, SourceMessage

if TYPE_CHECKING:
    from ..store.base import SendStore

__all__ = ["BounceSummary", "process_bounces"]

_BATCH = 500
_SENT_STATUSES = ("sent", "sending")
_TOKEN = re.compile(r"(?<![A-Za-z0-9])([A-Za-z2-7]{32})(?![A-Za-z0-9])")
_KINDS = {
    BounceKind.HARD: FeedbackKind.BOUNCED_HARD,
    BounceKind.SOFT: FeedbackKind.BOUNCED_SOFT,
    BounceKind.POLICY: FeedbackKind.BOUNCED_POLICY,
    BounceKind.COMPLAINT: FeedbackKind.COMPLAINED,
}


@dataclass
class BounceSummary:
    """What one ``mailer bounces`` run did.

    ``read`` messages were read; ``reports`` of them were DSN/ARF/known bounces,
    ``foreign`` were not, ``broken`` claimed to be and could not be read. Per report
    recipient: ``hard``, ``soft``, ``policy``, ``complaints`` recorded (new ones only),
    ``duplicates`` already recorded by an earlier run, ``unattributed`` matched to no
    send. ``suppressed``: addresses this run put on the suppression list (hard
    bounces, complaints, soft streaks; ``soft_streaks`` of them for a streak)."""

    read: int = 0
    reports: int = 0
    hard: int = 0
    soft: int = 0
    policy: int = 0
    complaints: int = 0
    suppressed: int = 0
    soft_streaks: int = 0
    unattributed: int = 0
    duplicates: int = 0
    foreign: int = 0
    broken: int = 0
    truncated: int = 0
    sources: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, object]:
        """The ``--json`` object (``version`` 1)."""
        return {"version": 1, **asdict(self)}


def process_bounces(
    store: SendStore,
    sources: Sequence[BounceSource],
    *,
    signer: TokenSigner | None = None,
    soft_bounce_limit: int = 3,
    batch_size: int = _BATCH,
    on_progress: Callable[[BounceSummary], None] | None = None,
) -> BounceSummary:
    """Read every source, record what its reports say, and mark the recorded ones
    processed (see :class:`~mailer.bounces.sources.BounceSource`). Returns the counts.

    Store errors propagate (:class:`~mailer.core.errors.StoreUnavailableError` is exit
    75); broken messages never do."""
    summary = BounceSummary(sources=[source.name for source in sources])
    recorder = _Recorder(store, signer, soft_bounce_limit, summary)
    for source in sources:
        batch: list[tuple[SourceMessage, Report]] = []
        for message in source:
            summary.read += 1
            report = _parse(message, summary)
            if report is not None:
                batch.append((message, report))
            if len(batch) >= batch_size:
                recorder.record(batch)
                source.mark_processed([m.ref for m, _ in batch])
                batch = []
                if on_progress is not None:
                    on_progress(summary)
        if batch:
            recorder.record(batch)
            source.mark_processed([m.ref for m, _ in batch])
        if on_progress is not None:
            on_progress(summary)
    return summary


def _parse(message: SourceMessage, summary: BounceSummary) -> Report | None:
    if message.truncated:
        summary.truncated += 1
    try:
        report = parse_report(message.raw, truncated=message.truncated)
    except ReportError:
        summary.broken += 1
        return None
    if report is None:
        summary.foreign += 1
        return None
    summary.reports += 1
    return report


@dataclass(frozen=True, slots=True)
class _Event:
    campaign: str
    address: str
    recipient: ReportRecipient
    ref: str


class _Recorder:
    """Attributes and records one batch of reports at a time (a few bulk queries each)."""

    def __init__(
        self, store: SendStore, signer: TokenSigner | None, soft_bounce_limit: int, summary: BounceSummary
    ) -> None:
        self._store = store
        self._signer = signer
        self._limit = soft_bounce_limit
        self._summary = summary

    def record(self, batch: list[tuple[SourceMessage, Report]]) -> None:
        reports = [report for _, report in batch]
        by_message_id = self._store.find_by_message_ids(
            sorted({mid for report in reports for mid in report.original_message_ids})
        )
        verp = self._verp_matches(reports)
        # First pass: who each recipient is, with what we know so far.
        pending: list[tuple[Report, ReportRecipient, str | None, str | None]] = []
        for report in reports:
            for recipient in report.recipients:
                campaign, address = self._attribute(report, recipient, by_message_id, verp.get(report.ref))
                pending.append((report, recipient, campaign, address))
        addresses = sorted({address for *_, address in pending if address is not None})
        history = self._store.bounce_history(addresses) if addresses else {}
        events: list[_Event] = []
        for report, recipient, campaign, address in pending:
            if address is None:
                self._summary.unattributed += 1
                continue
            if campaign is None:
                campaign = _most_recent_campaign(history.get(address_key(address)))
                if campaign is None:
                    self._summary.unattributed += 1
                    continue
            events.append(_Event(campaign, address, recipient, f"{report.ref}|{address_key(address)}"))
        self._write(events, history)

    def _verp_matches(self, reports: Iterable[Report]) -> dict[str, tuple[str | None, str]]:
        """report ref -> (campaign or None when the MAC could not be checked, address)."""
        found: dict[str, tuple[str | None, str]] = {}
        candidates_by_tag: dict[int, list[tuple[str, str]]] = {}
        for report in reports:
            for envelope in report.envelope_addresses:
                local = envelope.rpartition("@")[0]
                for match in _TOKEN.finditer(local):
                    token = match.group(1)
                    parsed = parse_verp_token(token)
                    if parsed is None:
                        continue
                    tag = parsed[0]
                    if tag not in candidates_by_tag:
                        candidates_by_tag[tag] = self._store.find_by_recipient_tag(tag)
                    candidates = candidates_by_tag[tag]
                    if not candidates:
                        continue
                    if self._signer is not None:
                        resolved = self._signer.resolve_verp(token, candidates)
                        if resolved is not None:
                            found[report.ref] = resolved
                            break
                    elif len({address_key(address) for _, address in candidates}) == 1:
                        found[report.ref] = (None, candidates[0][1])
                        break
                if report.ref in found:
                    break
        return found

    @staticmethod
    def _attribute(
        report: Report,
        recipient: ReportRecipient,
        by_message_id: dict[str, tuple[str, str]],
        verp: tuple[str | None, str] | None,
    ) -> tuple[str | None, str | None]:
        # mailer sends one message per recipient, so the VERP address or the Message-ID
        # names the recipient; it applies to this report recipient when the report names
        # no address (a redacted complaint), the same one, or only one (a forward may
        # have changed Final-Recipient).
        single = len(report.recipients) == 1

        def fits(address: str) -> bool:
            return single or recipient.address is None or address_key(recipient.address) == address_key(address)

        by_id = next(
            (by_message_id[mid] for mid in report.original_message_ids if mid in by_message_id),
            None,
        )
        if verp is not None and fits(verp[1]):
            campaign, address = verp
            if campaign is None and by_id is not None and address_key(by_id[1]) == address_key(address):
                campaign = by_id[0]
            return campaign, address
        if by_id is not None and fits(by_id[1]):
            return by_id
        return None, recipient.address

    def _write(self, events: list[_Event], history: dict[str, RecipientHistory]) -> None:
        summary = self._summary
        new_events: list[FeedbackEvent] = []
        suppress: list[tuple[str, str | None, str]] = []
        suppressed_keys: set[str] = set()
        known = self._store.known_feedback_refs([event.ref for event in events])
        # Soft bounces this batch adds, for the streaks of later events in it.
        soft_added: dict[str, set[str]] = {}
        seen_refs: set[str] = set()
        for event in events:
            kind = _KINDS[event.recipient.kind]
            if event.ref in known or event.ref in seen_refs:
                summary.duplicates += 1
                continue
            seen_refs.add(event.ref)
            detail = _detail(event.recipient)
            new_events.append(
                FeedbackEvent(event.campaign, event.address, kind, detail=detail, source="bounces", ref=event.ref)
            )
            key = address_key(event.address)
            reason: str | None = None
            if event.recipient.kind is BounceKind.HARD:
                summary.hard += 1
                reason = f"hard bounce: {detail}"
            elif event.recipient.kind is BounceKind.COMPLAINT:
                summary.complaints += 1
                reason = f"complaint: {detail}"
            elif event.recipient.kind is BounceKind.POLICY:
                summary.policy += 1
            else:
                summary.soft += 1
                soft_added.setdefault(key, set()).add(event.campaign)
                streak = _soft_streak(history.get(key), event.campaign, soft_added[key])
                if streak >= self._limit and key not in suppressed_keys:
                    reason = f"soft bounces in {streak} campaigns in a row (last: {detail})"
                    summary.soft_streaks += 1
            if reason is not None and key not in suppressed_keys:
                suppressed_keys.add(key)
                suppress.append((event.address, reason[:500], "bounce"))
        if new_events or suppress:
            self._store.record_feedback(new_events, suppress=suppress)
        summary.suppressed += len(suppress)


def _detail(recipient: ReportRecipient) -> str:
    parts = [part for part in (recipient.status, recipient.diagnostic) if part]
    return " ".join(parts)[:500] or recipient.kind.value


def _most_recent_campaign(history: RecipientHistory | None) -> str | None:
    if history is None:
        return None
    for campaign, status, _first_at in reversed(history.sends):
        if status in _SENT_STATUSES:
            return campaign
    return history.sends[-1][0] if history.sends else None


def _soft_streak(history: RecipientHistory | None, campaign: str, added: set[str]) -> int:
    """How many campaigns in a row, ending with ``campaign``, the address soft-bounced in."""
    bounced = set(added) | (history.soft_bounced if history is not None else frozenset())
    sent = [c for c, status, _ in history.sends if status in _SENT_STATUSES] if history is not None else []
    if campaign in sent:
        sent = sent[: sent.index(campaign) + 1]
    else:
        sent.append(campaign)
    streak = 0
    for name in reversed(sent):
        if name not in bounced:
            break
        streak += 1
    return streak
