"""The error tree and the exit codes of mailer.

Every error the user can cause or meet derives from :class:`MailerError`, carries
what the user needs to fix it (file, line, key, recipient, SMTP reply) and knows
its exit code. The CLI turns any of them into one paragraph on stderr in one place.
"""

from __future__ import annotations

from enum import IntEnum
from typing import TypedDict, Unpack

__all__ = [
    "AttachmentError",
    "ConfigError",
    "ConnectionSetupError",
    "ContactsError",
    "DKIMError",
    "DeliveryError",
    "ExitCode",
    "LockedError",
    "MailerError",
    "PermanentDeliveryError",
    "ProcessEndedError",
    "RowError",
    "SendLogError",
    "StoreUnavailableError",
    "TemplateError",
    "TemporaryDeliveryError",
    "UsageError",
]


class ExitCode(IntEnum):
    """Process exit codes, as fixed by the product contract."""

    OK = 0
    PARTIAL = 1  # the run finished; some recipients failed permanently or were invalid
    USAGE = 2  # bad usage or bad input found before sending: nothing was sent
    TEMPFAIL = 75  # try again later (deferred recipients remain, or the log is locked)
    INTERRUPTED = 130


class _Where(TypedDict, total=False):
    """The keyword arguments every :class:`MailerError` takes, passed on by its subclasses."""

    path: str | None
    line: int | None
    hint: str | None


class MailerError(Exception):
    """Root of every error mailer reports to the user.

    ``message`` says what is wrong; ``path`` and ``line`` say where; ``hint`` says how
    to fix it. ``str()`` gives the whole one-paragraph message. ``debug_traceback``
    is set on an error raised in the delivery process: its traceback there, for --debug.
    """

    exit_code: ExitCode = ExitCode.USAGE
    debug_traceback: str | None = None

    def __init__(
        self,
        message: str,
        *,
        path: str | None = None,
        line: int | None = None,
        hint: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.path = path
        self.line = line
        self.hint = hint

    def __str__(self) -> str:
        where = ""
        if self.path is not None:
            where = f"{self.path}:{self.line}: " if self.line is not None else f"{self.path}: "
        text = where + self.message
        if self.hint:
            text += f" {self.hint}"
        return text


class UsageError(MailerError):
    """Bad command-line usage (conflicting or invalid options)."""


class ConfigError(MailerError):
    """A missing, unreadable or invalid config file or key."""

    def __init__(self, message: str, *, key: str | None = None, **kwargs: Unpack[_Where]) -> None:
        super().__init__(message, **kwargs)
        self.key = key


class ContactsError(MailerError):
    """A contact file that cannot be read at all (encoding, header, missing column)."""


class TemplateError(MailerError):
    """A template that cannot be parsed or rendered (syntax, undefined variable)."""


class AttachmentError(MailerError):
    """An attachment that is missing or unreadable."""


class DKIMError(MailerError):
    """A DKIM key or configuration that cannot be used for signing."""


class SendLogError(MailerError):
    """The send log cannot be opened, read or migrated."""


class StoreUnavailableError(SendLogError):
    """The send log's server went away during a run (PostgreSQL): try again later."""

    exit_code = ExitCode.TEMPFAIL


class LockedError(MailerError):
    """Another run holds the lock for this send log and campaign (cron overlap)."""

    exit_code = ExitCode.TEMPFAIL


class DeliveryError(MailerError):
    """A delivery attempt failed; carries the SMTP reply when there was one."""

    exit_code = ExitCode.PARTIAL

    def __init__(
        self,
        message: str,
        *,
        smtp_code: int | None = None,
        recipient: str | None = None,
        **kwargs: Unpack[_Where],
    ) -> None:
        super().__init__(message, **kwargs)
        self.smtp_code = smtp_code
        self.recipient = recipient


class TemporaryDeliveryError(DeliveryError):
    """4xx reply, dropped connection or timeout: worth retrying later."""

    exit_code = ExitCode.TEMPFAIL


class PermanentDeliveryError(DeliveryError):
    """5xx reply: recorded once, never retried."""


class ConnectionSetupError(MailerError):
    """The relay cannot be used at all (connect, TLS, AUTH refused): nothing can be sent."""

    exit_code = ExitCode.TEMPFAIL


class ProcessEndedError(MailerError):
    """A process of the run (the delivery process, a DKIM signer) died: the run stops.

    Waiting and re-running helps (the send log resumes), so it is "try again later".
    """

    exit_code = ExitCode.TEMPFAIL


class RowError(MailerError):
    """One contact's message cannot be built (header injection, missing attachment).

    The row is recorded as invalid with this reason; the run goes on.
    """

    exit_code = ExitCode.PARTIAL
