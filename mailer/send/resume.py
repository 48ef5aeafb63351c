"""The resume rule: which recipients an earlier run, or the suppression list, settles."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence

from ..compose.contacts import Contact
from ..core.outcomes import Skip, Status
from ..store.base import SendStore

__all__ = ["BATCH", "Resume", "resume_rule"]

# Contacts per question to the store: one round trip for this many (a point query per
# contact cost 15-30 µs on SQLite, a batch of 500 about 1-5 µs a contact).
BATCH = 500


def resume_rule(status: Status | None, *, suppressed: bool, resend_unknown: bool) -> Skip | None:
    """The resume rule: why a recipient with this logged ``status`` is not mailed now, or None.

    ``sent`` and ``failed`` settle a recipient for good (:attr:`Skip.ALREADY_DONE`);
    ``sending`` (outcome unknown) is left out unless ``resend_unknown``
    (:attr:`Skip.UNKNOWN`). Never logged, ``deferred``, ``invalid`` and ``suppressed``
    recipients are mailed unless the suppression list holds them now
    (:attr:`Skip.SUPPRESSED`): a row fixed in the CSV, or an address taken off the
    suppression list, is mailed by the next run.
    """
    if status is Status.SENT or status is Status.FAILED:
        return Skip.ALREADY_DONE
    if status is Status.SENDING and not resend_unknown:
        return Skip.UNKNOWN
    if suppressed:
        return Skip.SUPPRESSED
    return None


class Resume:
    """Applies :func:`resume_rule` to contacts, asking the store about a batch at a time."""

    def __init__(self, store: SendStore, campaign: str, *, resend_unknown: bool, batch: int = BATCH) -> None:
        self.store = store
        self.campaign = campaign
        self.resend_unknown = resend_unknown
        self.batch = batch
        self.waiting = 0

    def classify(self, contacts: Sequence[Contact]) -> list[Skip | None]:
        """Why each contact is not mailed now, or None, in order (two store queries)."""
        envelopes = [contact.envelope for contact in contacts]
        statuses = self.store.statuses(self.campaign, envelopes)
        suppressed = self.store.suppressed(envelopes)
        resend_unknown = self.resend_unknown
        return [
            resume_rule(status, suppressed=is_suppressed, resend_unknown=resend_unknown)
            for status, is_suppressed in zip(statuses, suppressed)
        ]

    def settle(self, contacts: Iterable[Contact]) -> Iterator[tuple[Contact, Skip | None]]:
        """Each contact with its decision, classified in batches of :attr:`batch`.

        :attr:`waiting` counts the contacts read from ``contacts`` and not handed on yet:
        a run that stops early counts them as not attempted.
        """
        batch: list[Contact] = []
        for contact in contacts:
            batch.append(contact)
            self.waiting += 1
            if len(batch) >= self.batch:
                yield from self._decided(batch)
                batch = []
        if batch:
            yield from self._decided(batch)

    def _decided(self, batch: list[Contact]) -> Iterator[tuple[Contact, Skip | None]]:
        for pair in zip(batch, self.classify(batch)):
            self.waiting -= 1
            yield pair
