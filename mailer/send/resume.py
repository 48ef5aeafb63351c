"""The resume rule: which recipients an earlier run, or the suppression list, settles."""

from __future__ import annotations

from ..compose.contacts import Contact
from ..compose.seen import SeenAddresses
from ..core.addresses import normalize_address
from ..core.outcomes import STATUS_BY_VALUE, Status
from ..store.sqlite import SendLog

__all__ = ["SETTLED", "Resume", "should_send"]


def should_send(status: str | None, *, resend_unknown: bool = False) -> bool:
    """The resume rule: may a recipient with this logged ``status`` be mailed now?

    Never logged and ``deferred`` recipients are mailed; ``sending`` ones (outcome
    unknown) only when ``resend_unknown`` is true; ``sent``, ``failed``, ``invalid``
    and ``suppressed`` ones never again.
    """
    if status is None or status == Status.DEFERRED:
        return True
    if status == Status.SENDING:
        return resend_unknown
    if status in STATUS_BY_VALUE:
        return False
    raise ValueError(f"unknown send-log status {status!r}")


# Statuses that settle a recipient for good. `invalid` and `suppressed` are not here on
# purpose: a row fixed in the CSV, or an address removed from the suppression list,
# is mailed by the next run; the suppression list itself is checked on every run.
SETTLED = {Status.SENT.value, Status.FAILED.value}


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

    def settled_by(self, contact: Contact) -> str | None:
        """``already_done``, ``unknown`` or ``suppressed`` when the contact is not mailed now."""
        recipient = normalize_address(contact.envelope)
        status = None
        if len(self.logged) and self.logged.get(recipient.encode("utf-8", "surrogatepass")) is not None:
            status = self.log.status_of(self.campaign, recipient)
        if status in SETTLED:
            return "already_done"
        if status == Status.SENDING and not self.resend_unknown:
            return "unknown"
        if (
            len(self.suppressed)
            and self.suppressed.get(contact.envelope.lower().encode("utf-8", "surrogatepass")) is not None
            and self.log.is_suppressed(contact.envelope)
        ):
            return "suppressed"
        return None
