"""The bounce rules: which permanent failures mean "this mailbox does not exist".

Such addresses go on the suppression list; policy rejections (spam, a blocked IP)
never do, whatever their text says.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from ..core.outcomes import DeliveryEvent, Status

__all__ = ["bounces_of", "is_bounce", "is_hard_bounce"]


# --------------------------------------------------------------------------------------
# Reply classification (pure)

_ENHANCED_STATUS = re.compile(r"\b([245])\.(\d{1,3})\.(\d{1,3})\b")
_UNKNOWN_USER_TEXT = re.compile(
    r"user unknown|unknown user|no such user|no such mailbox|mailbox unavailable"
    r"|mailbox not found|does not exist|doesn't exist|address rejected: user unknown"
    r"|recipient not found|invalid recipient|unknown recipient",
    re.IGNORECASE,
)
# Yahoo's "no such mailbox" is a bare 554 (no enhanced code), so only this exact text of
# theirs counts; a reply that also speaks of policy stays a policy rejection.
_NO_ACCOUNT_TEXT = re.compile(r"\bdd this user doesn['\u2019]t have an? [a-z0-9.-]{1,64} account\b", re.IGNORECASE)
_POLICY_TEXT = re.compile(r"block|spam|policy|reputation|blacklist|denied", re.IGNORECASE)


def is_hard_bounce(code: int, reply_text: str) -> bool:
    """Whether a permanent failure says the mailbox does not exist ("user unknown").

    Such addresses belong on the suppression list. With an enhanced status code
    (RFC 3463) the code decides: 5.1.x "addressing" statuses, except 5.1.7 / 5.1.8
    which blame the *sender's* address, and 5.2.1 "mailbox disabled". Without one,
    550 / 551 / 553 with a "no such user"-type text, or Yahoo's bare 554 "dd This user
    doesn't have a yahoo.com account" (unless it also speaks of a block or spam).
    Policy rejections (5.7.x: spam, blocked IP) are never hard bounces, whatever their
    text says.
    """
    if code not in (550, 551, 553, 554):
        return False
    match = _ENHANCED_STATUS.search(reply_text)
    if match:
        klass, subject, detail = match.groups()
        if klass != "5":
            return False
        if subject == "1":
            return detail not in ("7", "8")
        return subject == "2" and detail == "1"
    if _NO_ACCOUNT_TEXT.search(reply_text):
        return not _POLICY_TEXT.search(reply_text)
    return code != 554 and bool(_UNKNOWN_USER_TEXT.search(reply_text))


def is_bounce(status: str, code: int | None, reply: str | None) -> bool:
    """Whether an outcome puts the address on the suppression list (a permanent "user unknown")."""
    return status == Status.FAILED and code is not None and is_hard_bounce(code, reply or "")


def bounces_of(events: Iterable[DeliveryEvent]) -> list[tuple[str, str]]:
    """``(recipient, reason)`` for each permanent "user unknown" failure among ``events``."""
    return [
        (recipient, f"{code} {reply}"[:500])
        for recipient, status, code, reply, _message_id, _line in events
        if is_bounce(status, code, reply)
    ]
