"""What can happen to a message: the statuses of the send log and the delivery values.

:class:`Status` is used from the store to the summary. :class:`Outgoing` is one
message handed to delivery; :class:`Result` is the outcome of an attempt.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Generic, TypeVar

__all__ = [
    "RESULT_STATUSES",
    "SKIPPED_STATUSES",
    "STATUS_BY_VALUE",
    "DeliveryEvent",
    "KeyT",
    "Outgoing",
    "Result",
    "Skip",
    "Status",
]


#: The type of :attr:`Outgoing.key`: whatever its producer needs to find the message again.
KeyT = TypeVar("KeyT")


@dataclass(slots=True)
class Outgoing(Generic[KeyT]):
    """One message to deliver.

    ``data`` is the whole message with CRLF line endings, not dot-stuffed (the engine
    does that). ``smtputf8`` marks a message whose envelope or headers need the
    SMTPUTF8 extension; an envelope address that is not ASCII implies it.
    """

    key: KeyT  # opaque to the engine; the caller uses it to find its log row
    sender: str  # envelope MAIL FROM
    recipients: list[str]  # envelope RCPT TO (usually one)
    data: bytes
    message_id: str
    smtputf8: bool = False


@dataclass(frozen=True, slots=True)
class Result:
    """The outcome of one attempt (``final=False``) or of the whole delivery.

    ``status`` is :attr:`Status.SENT`, :attr:`Status.FAILED` (permanent) or
    :attr:`Status.DEFERRED` (temporary), or :attr:`Status.SENDING` (final: the message
    went out and its final reply never came, so its outcome is unknown).
    ``final=False`` means a temporary failure that will be retried in this run after a
    backoff. ``smtp_reply`` is the relay's reply text, or a description of the error.
    """

    status: Status
    final: bool
    attempts: int
    smtp_code: int | None
    smtp_reply: str


class Status(StrEnum):
    """The status of one recipient in one campaign (compares equal to its string)."""

    SENT = "sent"
    FAILED = "failed"  # permanent failure (5xx)
    DEFERRED = "deferred"  # temporary failure, retries used up
    INVALID = "invalid"  # the contact row could not be used
    SUPPRESSED = "suppressed"  # on the suppression list
    SENDING = "sending"  # handed to the server, outcome unknown


STATUS_BY_VALUE = {status.value: status for status in Status}
RESULT_STATUSES = frozenset({Status.SENT, Status.FAILED, Status.DEFERRED})
SKIPPED_STATUSES = frozenset({Status.INVALID, Status.SUPPRESSED})

#: One delivery event, as the delivery process journals it and the send log applies it:
#: ``(recipient, status, smtp_code, smtp_reply, message_id, line)``. ``status`` is a
#: :class:`Status` value (a plain string once read back from the journal); ``line`` is
#: set on ``sending`` events.
DeliveryEvent = tuple[str, str, int | None, str | None, str | None, int | None]


class Skip(StrEnum):
    """Why a selected contact is not mailed in this run (a count of the run's summary)."""

    ALREADY_DONE = "already_done"  # sent or failed for good in an earlier run
    UNKNOWN = "unknown"  # an earlier run handed it over and died: outcome unknown
    SUPPRESSED = "suppressed"  # on the suppression list
