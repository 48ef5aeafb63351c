"""The resume rule: which recipients an earlier run, or the suppression list, settles."""

from __future__ import annotations

from ..compose.contacts import Contact
from ..compose.seen import SeenAddresses
from ..core.addresses import normalize_address
from ..core.outcomes import Skip, Status
from ..store.sqlite import SendLog

__all__ = ["Resume", "resume_rule"]


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
    """Decides, per contact, whether an earlier run or the suppression list settles it.

    In-memory prefilters keep this cheap: a point query per contact costs ~30 µs while
    the delivery process is writing the same database, more than building the
    message. A digest hit is confirmed by the real query, so a (rare) false hit
    changes nothing.
    """

    def __init__(self, log: SendLog, campaign: str, *, resend_unknown: bool) -> None:
        self.log = log
        self.campaign = campaign
        self.resend_unknown = resend_unknown
        self.logged = SeenAddresses()
        for recipient in log.iter_recipients(campaign):
            self.logged.add(recipient.encode("utf-8", "surrogatepass"), 1)
        self.suppressed = SeenAddresses()
        for address in log.iter_suppressed_keys():
            self.suppressed.add(address.encode("utf-8", "surrogatepass"), 1)

    def settled_by(self, contact: Contact) -> Skip | None:
        """Why the contact is not mailed now (:func:`resume_rule`), or None."""
        recipient = normalize_address(contact.envelope)
        status = None
        if len(self.logged) and self.logged.get(recipient.encode("utf-8", "surrogatepass")) is not None:
            status = self.log.status_of(self.campaign, recipient)
        suppressed = (
            len(self.suppressed) > 0
            and self.suppressed.get(contact.envelope.lower().encode("utf-8", "surrogatepass")) is not None
            and self.log.is_suppressed(contact.envelope)
        )
        return resume_rule(status, suppressed=suppressed, resend_unknown=self.resend_unknown)
