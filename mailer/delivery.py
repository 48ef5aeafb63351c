"""The SMTP delivery engine: a throttled pool of persistent connections, with retries.

Data in, results out. :func:`deliver` pulls :class:`Outgoing` messages from an iterator
in the calling thread, hands them through a bounded queue to ``send.connections``
worker threads (each owns one persistent SMTP connection, from the stdlib's
``smtplib``), and reports every step through a :class:`DeliveryListener`. It never
prints or logs: the caller turns the listener calls into its send log and progress.

Reply classification (:func:`classify_reply`, :func:`classify_exception`,
:func:`is_hard_bounce`) and the relay settings check (:func:`check_relay_settings`)
are pure and usable alone. :func:`probe_relay` is the network half of ``mailer check``.

The password is used only for AUTH. It never appears in an exception message, a
:class:`Result` or a probe step: texts that come back from the relay during login are
scrubbed, and smtplib's debug output (which prints the AUTH exchange) is never enabled.
"""

from __future__ import annotations

import base64
import functools
import heapq
import ipaddress
import random
import re
import smtplib
import socket
import ssl
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator, Protocol

from .config import SMTPConfig, SendConfig, parse_rate
from .errors import (
    ConnectionSetupError,
    DeliveryError,
    ExitCode,
    PermanentDeliveryError,
    TemporaryDeliveryError,
)
from .throttle import RateLimiter, backoff_delay

__all__ = [
    "SENT",
    "FAILED",
    "DEFERRED",
    "Outgoing",
    "Result",
    "DeliveryListener",
    "DeliveryStats",
    "deliver",
    "classify_reply",
    "classify_exception",
    "closes_connection",
    "is_hard_bounce",
    "is_loopback_host",
    "check_relay_settings",
    "make_ssl_context",
    "tls_verification_warning",
    "TLS_VERIFY_DISABLED_WARNING",
    "ProbeStep",
    "RelayProbe",
    "probe_relay",
]

SENT = "sent"
FAILED = "failed"
DEFERRED = "deferred"

#: What the CLI prints (on stderr) when ``[smtp] tls_verify = false``.
TLS_VERIFY_DISABLED_WARNING = (
    "TLS certificate verification is OFF ([smtp] tls_verify = false): the connection is "
    "encrypted, but anyone on the network path can impersonate the relay and read the "
    "password and the messages. Use this only for a relay you reach over a trusted network."
)

# How long to wait for the reply to QUIT when closing: a stalled relay must not hold up
# the end of a run for the whole command timeout.
_QUIT_TIMEOUT = 5.0
# Workers and the feeder wake at least this often to notice the stop event.
_POLL = 0.25
# Besides at most ``queue_size`` messages, the engine holds at most about this many
# bytes of them (queued, in flight or waiting for a retry): 1,000 messages with a
# 5 MB attachment each would otherwise take 5 GB.
_MAX_OUTSTANDING_BYTES = 64 * 1024 * 1024


@dataclass(slots=True)
class Outgoing:
    """One message to deliver.

    ``data`` is the whole message with CRLF line endings, not dot-stuffed (the engine
    does that). ``smtputf8`` marks a message whose envelope or headers need the
    SMTPUTF8 extension; an envelope address that is not ASCII implies it.
    """

    key: object  # opaque to the engine; the caller uses it to find its log row
    sender: str  # envelope MAIL FROM
    recipients: list[str]  # envelope RCPT TO (usually one)
    data: bytes
    message_id: str
    smtputf8: bool = False


@dataclass(frozen=True, slots=True)
class Result:
    """The outcome of one attempt (``final=False``) or of the whole delivery.

    ``status`` is ``"sent"``, ``"failed"`` (permanent) or ``"deferred"`` (temporary).
    ``final=False`` means a temporary failure that will be retried in this run after a
    backoff. ``smtp_reply`` is the relay's reply text, or a description of the error.
    """

    status: str
    final: bool
    attempts: int
    smtp_code: int | None
    smtp_reply: str


class DeliveryListener(Protocol):
    """How :func:`deliver` reports. Both methods are called from worker threads, one
    call at a time (the engine serializes them), so an implementation needs no locking
    of its own; it must be quick, since the other workers wait meanwhile. A listener
    with a true ``thread_safe`` attribute is called concurrently instead. An exception
    raised here stops the whole run and comes out of :func:`deliver`."""

    def on_sending(self, item: Outgoing, attempt: int) -> None:
        """Just before the transaction starts (MAIL FROM): write "sending" durably here.

        If the process dies after this call, the outcome of the message is unknown."""

    def on_result(self, item: Outgoing, result: Result) -> None:
        """After an attempt. ``result.final`` is False for a temporary failure that will
        be retried; exactly one final result follows for each item that got one."""


@dataclass
class DeliveryStats:
    """What a :func:`deliver` run did. ``sent + failed + deferred`` items got a final
    result; ``waiting_retry`` items were deferred and were to be retried when the run
    stopped; ``untouched`` items were taken from the iterator but never attempted (the
    run stopped first): they never got ``on_sending`` nor ``on_result``."""

    items: int = 0
    sent: int = 0
    failed: int = 0
    deferred: int = 0
    waiting_retry: int = 0
    untouched: int = 0
    attempts: int = 0
    retries: int = 0
    connections_opened: int = 0
    stale_reconnects: int = 0
    elapsed: float = 0.0
    interrupted: bool = False

    @property
    def by_status(self) -> dict[str, int]:
        return {SENT: self.sent, FAILED: self.failed, DEFERRED: self.deferred}

    @property
    def messages_per_second(self) -> float:
        done = self.sent + self.failed + self.deferred
        return done / self.elapsed if self.elapsed > 0 else 0.0


# --------------------------------------------------------------------------------------
# Reply classification (pure)

_ENHANCED_STATUS = re.compile(r"\b([245])\.(\d{1,3})\.(\d{1,3})\b")
_UNKNOWN_USER_TEXT = re.compile(
    r"user unknown|unknown user|no such user|no such mailbox|mailbox unavailable"
    r"|mailbox not found|does not exist|doesn't exist|address rejected: user unknown"
    r"|recipient not found|invalid recipient|unknown recipient",
    re.IGNORECASE,
)


def classify_reply(code: int, text: str, *, recipient: str | None = None) -> DeliveryError | None:
    """None for a 2xx or 3xx reply; otherwise the error it means.

    4xx is temporary; 5xx is permanent; anything else (a garbled reply) is treated as a
    temporary failure, since the next connection may well behave.
    """
    if 200 <= code < 400:
        return None
    message = f"{code} {text}".strip()
    if 500 <= code < 600:
        return PermanentDeliveryError(message, smtp_code=code, recipient=recipient)
    return TemporaryDeliveryError(message, smtp_code=code if code > 0 else None, recipient=recipient)


def classify_exception(exc: BaseException, *, recipient: str | None = None) -> TemporaryDeliveryError:
    """The temporary failure behind a dropped connection, a timeout or a socket error."""
    if isinstance(exc, (TimeoutError, socket.timeout)) or isinstance(exc.__context__, TimeoutError):
        return TemporaryDeliveryError("timed out waiting for the relay", recipient=recipient)
    if isinstance(exc, smtplib.SMTPServerDisconnected):
        return TemporaryDeliveryError("the relay closed the connection", recipient=recipient)
    detail = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
    return TemporaryDeliveryError(f"connection error: {detail}", recipient=recipient)


def closes_connection(code: int) -> bool:
    """Whether a reply means the relay is closing this connection (RFC 5321: 421)."""
    return code == 421


def is_hard_bounce(code: int, reply_text: str) -> bool:
    """Whether a permanent failure says the mailbox does not exist ("user unknown").

    Such addresses belong on the suppression list. With an enhanced status code
    (RFC 3463) the code decides: 5.1.x "addressing" statuses, except 5.1.7 / 5.1.8
    which blame the *sender's* address, and 5.2.1 "mailbox disabled". Without one,
    550 / 551 / 553 with a "no such user"-type text. Policy rejections (5.7.x: spam,
    blocked IP) are never hard bounces, whatever their text says.
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
    return code != 554 and bool(_UNKNOWN_USER_TEXT.search(reply_text))


# --------------------------------------------------------------------------------------
# Relay settings (pure)


def is_loopback_host(host: str) -> bool:
    """Whether ``host`` names this machine: 127.0.0.0/8, ::1 or ``localhost``.

    Names are not resolved: a DNS answer must not be able to turn a remote relay into
    a "local" one that gets the password in clear text.
    """
    name = host.strip().lower().rstrip(".")
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name.strip("[]")).is_loopback
    except ValueError:
        return False


def _setup_error(message: str, hint: str | None = None) -> ConnectionSetupError:
    # The relay cannot be used as configured: the user must fix something before a
    # re-run can help, so this is a usage error, not "try again later".
    error = ConnectionSetupError(message, hint=hint)
    error.exit_code = ExitCode.USAGE
    return error


def check_relay_settings(smtp: SMTPConfig, password: str | None) -> None:
    """Refuse settings that must not be used, before any connection is made.

    Raises :class:`ConnectionSetupError` (exit code USAGE) when a username is set but
    no password is available, or when the password would go over an unencrypted
    connection to a host that is not this machine.
    """
    if smtp.security not in ("starttls", "tls", "none"):
        raise _setup_error(f"unknown [smtp] security {smtp.security!r}.", 'Use "starttls", "tls" or "none".')
    if not smtp.username:
        return
    if not password:
        where = f"the environment variable {smtp.password_env}" if smtp.password_env else "[smtp] password_env"
        raise _setup_error(
            f"[smtp] username is set to {smtp.username!r} but no password is available.",
            f"Set {where} to the relay password (or remove the username if the relay needs no login).",
        )
    if smtp.security == "none" and not is_loopback_host(smtp.host):
        raise _setup_error(
            f"refusing to send the password to {smtp.host} over an unencrypted connection "
            '([smtp] security = "none").',
            'Use security = "starttls" (port 587) or "tls" (port 465); '
            '"none" with a login is allowed only for a relay on this machine.',
        )


def make_ssl_context(smtp: SMTPConfig) -> ssl.SSLContext:
    """The TLS context for the relay: certificates verified, unless ``tls_verify`` is off."""
    context = ssl.create_default_context()
    if not smtp.tls_verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


def tls_verification_warning(smtp: SMTPConfig) -> str | None:
    """The warning the CLI must show for these settings, or None."""
    if not smtp.tls_verify and smtp.security in ("starttls", "tls"):
        return TLS_VERIFY_DISABLED_WARNING
    return None


@functools.lru_cache(maxsize=1)
def _local_hostname() -> str:
    # smtplib would do this (a reverse DNS lookup) on every connection. RFC 5321 wants
    # a fully qualified name in EHLO, or else an address literal.
    fqdn = socket.getfqdn()
    if "." in fqdn:
        return fqdn
    try:
        return f"[{socket.gethostbyname(socket.gethostname())}]"
    except OSError:
        return "[127.0.0.1]"


def _scrub(text: str, secrets: tuple[str, ...]) -> str:
    for secret in secrets:
        if secret:
            text = text.replace(secret, "********")
    return text


def _secret_forms(username: str | None, password: str | None) -> tuple[str, ...]:
    """The password and the encodings of it that AUTH puts on the wire."""
    if not password:
        return ()
    forms = [password, base64.b64encode(password.encode()).decode()]
    if username:
        forms.append(base64.b64encode(f"\0{username}\0{password}".encode()).decode())
    return tuple(forms)


def _reply_text(raw: bytes | str) -> str:
    if isinstance(raw, bytes):
        raw = raw.decode("utf-8", "replace")
    return raw.replace("\n", " ").strip()


# --------------------------------------------------------------------------------------
# Connection setup (shared by deliver and probe_relay)


@dataclass(frozen=True)
class ProbeStep:
    """One step of :func:`probe_relay`: what was tried, whether it worked, and details."""

    name: str
    ok: bool
    detail: str


@dataclass
class RelayProbe:
    """What :func:`probe_relay` found. ``ok`` is True when every step worked."""

    host: str
    port: int
    security: str
    steps: list[ProbeStep] = field(default_factory=list)
    extensions: dict[str, str] = field(default_factory=dict)  # EHLO keyword (upper) -> parameters
    auth_mechanisms: list[str] = field(default_factory=list)
    tls_version: str | None = None

    @property
    def ok(self) -> bool:
        return bool(self.steps) and all(step.ok for step in self.steps)


class _Setup:
    """Everything needed to open a connection, computed once per run."""

    def __init__(self, smtp: SMTPConfig, password: str | None, ssl_context: ssl.SSLContext | None) -> None:
        self.smtp = smtp
        self.host = smtp.host
        self.port = smtp.effective_port
        self.where = f"{smtp.host}:{self.port}"
        self.password = password
        self.secrets = _secret_forms(smtp.username, password)
        self.helo = smtp.helo or _local_hostname()
        self.context = None
        if smtp.security != "none":
            self.context = ssl_context if ssl_context is not None else make_ssl_context(smtp)

    def tls_error(self, exc: ssl.SSLError) -> ConnectionSetupError:
        if isinstance(exc, ssl.SSLCertVerificationError):
            reason = exc.verify_message or exc.reason or str(exc)
            return _setup_error(
                f"the TLS certificate of {self.where} could not be verified: {reason}.",
                "Fix the relay's certificate (or the host name in [smtp] host, which must match it); "
                "set [smtp] tls_verify = false only for a relay on a trusted network.",
            )
        hint = (
            'Port 465 usually wants security = "tls" and port 587 security = "starttls".'
            if self.smtp.security in ("tls", "starttls")
            else None
        )
        return _setup_error(f"TLS with {self.where} failed: {exc.reason or exc}.", hint)

    def open(self, step: Callable[[str, bool, str], None] | None = None) -> smtplib.SMTP:
        """Connect, EHLO, (STARTTLS, EHLO), AUTH. Returns the ready client.

        Raises TemporaryDeliveryError for what may pass (refused, timeout, 4xx) and
        ConnectionSetupError (USAGE) for what will not (TLS, login, missing STARTTLS).
        ``step`` is called as each step ends, for :func:`probe_relay`.
        """
        note = step or (lambda name, ok, detail: None)
        smtp = self.smtp
        try:
            if smtp.security == "tls":
                client = smtplib.SMTP_SSL(local_hostname=self.helo, timeout=smtp.timeout, context=self.context)
            else:
                client = smtplib.SMTP(local_hostname=self.helo, timeout=smtp.timeout)
            # smtplib takes the TLS server name (for certificate checks) from the host
            # given to the constructor, which would also connect before we can catch
            # a TLS error apart from a refused connection; so set it here.
            client._host = self.host
            code, greeting = client.connect(self.host, self.port)
        except ssl.SSLError as exc:
            note("connect", True, f"connected to {self.where}")
            note("tls", False, self.tls_error(exc).message)
            raise self.tls_error(exc) from None
        except OSError as exc:
            error = classify_exception(exc)
            error.message = f"cannot connect to {self.where}: {error.message}"
            note("connect", False, error.message)
            raise error from None
        try:
            return self._greet(client, code, greeting, note)
        except BaseException:
            client.close()
            raise

    def _greet(self, client: smtplib.SMTP, code: int, greeting: bytes, note) -> smtplib.SMTP:
        smtp = self.smtp
        text = _scrub(_reply_text(greeting), self.secrets)
        if code != 220:
            note("connect", False, f"{self.where} refused the session: {code} {text}")
            if 500 <= code < 600:
                raise _setup_error(f"{self.where} refused the session: {code} {text}.")
            raise TemporaryDeliveryError(f"{self.where} refused the session: {code} {text}", smtp_code=code)
        if smtp.security == "tls":
            version = client.sock.version() if isinstance(client.sock, ssl.SSLSocket) else None
            note("connect", True, f"connected to {self.where} with TLS ({version}): {code} {text}")
        else:
            note("connect", True, f"connected to {self.where}: {code} {text}")
        try:
            self._ehlo(client, note)
            if smtp.security == "starttls":
                if not client.has_extn("starttls"):
                    message = f"{self.where} does not offer STARTTLS."
                    note("starttls", False, message)
                    raise _setup_error(
                        message,
                        'If it speaks TLS from the start (port 465), use security = "tls"; '
                        'use "none" only for a relay on this machine.',
                    )
                try:
                    client.starttls(context=self.context)
                except ssl.SSLError as exc:
                    note("starttls", False, self.tls_error(exc).message)
                    raise self.tls_error(exc) from None
                except smtplib.SMTPResponseException as exc:
                    reply = _scrub(_reply_text(exc.smtp_error), self.secrets)
                    note("starttls", False, f"STARTTLS refused: {exc.smtp_code} {reply}")
                    if 400 <= exc.smtp_code < 500:
                        raise TemporaryDeliveryError(f"STARTTLS refused by {self.where}: {exc.smtp_code} {reply}",
                                                     smtp_code=exc.smtp_code) from None
                    raise _setup_error(f"{self.where} refused STARTTLS: {exc.smtp_code} {reply}.") from None
                note("starttls", True, f"TLS {client.sock.version()}, certificate "
                     + ("verified" if self.context.verify_mode != ssl.CERT_NONE else "NOT verified"))
                self._ehlo(client, note)
            if smtp.username:
                self._login(client, note)
        except (smtplib.SMTPServerDisconnected, OSError) as exc:
            if isinstance(exc, ssl.SSLError):
                raise self.tls_error(exc) from None
            error = classify_exception(exc)
            error.message = f"{self.where}: {error.message} during connection setup"
            note("setup", False, error.message)
            raise error from None
        return client

    def _ehlo(self, client: smtplib.SMTP, note) -> None:
        code, reply = client.ehlo()
        if code == 250:
            note("ehlo", True, "extensions: " + (", ".join(sorted(k.upper() for k in client.esmtp_features)) or "none"))
            return
        text = _scrub(_reply_text(reply), self.secrets)
        if self.smtp.security == "starttls" or self.smtp.username or code == 421 or code < 0:
            # Without ESMTP there is no STARTTLS and no AUTH; 421 means "go away".
            note("ehlo", False, f"EHLO refused: {code} {text}")
            if 400 <= code < 500 or code < 0:
                raise TemporaryDeliveryError(f"{self.where} refused EHLO: {code} {text}", smtp_code=code)
            raise _setup_error(f"{self.where} refused EHLO: {code} {text}.")
        code, reply = client.helo()
        text = _scrub(_reply_text(reply), self.secrets)
        if code != 250:
            note("helo", False, f"HELO refused: {code} {text}")
            if 500 <= code < 600:
                raise _setup_error(f"{self.where} refused HELO: {code} {text}.")
            raise TemporaryDeliveryError(f"{self.where} refused HELO: {code} {text}", smtp_code=code)
        note("helo", True, "the relay speaks plain SMTP (no extensions)")

    def _login(self, client: smtplib.SMTP, note) -> None:
        smtp = self.smtp
        try:
            client.login(smtp.username, self.password)
        except smtplib.SMTPAuthenticationError as exc:
            reply = _scrub(_reply_text(exc.smtp_error), self.secrets)
            note("auth", False, f"login as {smtp.username!r} rejected: {exc.smtp_code} {reply}")
            if 400 <= exc.smtp_code < 500:
                raise TemporaryDeliveryError(f"{self.where} could not log in now: {exc.smtp_code} {reply}",
                                             smtp_code=exc.smtp_code) from None
            where = f"${smtp.password_env}" if smtp.password_env else "the password"
            raise _setup_error(
                f"{self.where} rejected the login as {smtp.username!r}: {exc.smtp_code} {reply}.",
                f"Check [smtp] username and {where}.",
            ) from None
        except smtplib.SMTPNotSupportedError:
            note("auth", False, "the relay does not offer AUTH on this connection")
            raise _setup_error(
                f"{self.where} does not offer AUTH (login) on this connection.",
                "Remove [smtp] username if the relay needs no login; some relays offer AUTH only after STARTTLS.",
            ) from None
        except smtplib.SMTPServerDisconnected:
            raise
        except smtplib.SMTPException:
            offered = client.esmtp_features.get("auth", "").strip() or "none"
            note("auth", False, f"no usable AUTH mechanism (offered: {offered})")
            raise _setup_error(
                f"{self.where} offers no AUTH mechanism mailer can use (offered: {offered}; "
                "supported: PLAIN, LOGIN, CRAM-MD5)."
            ) from None
        finally:
            # smtplib keeps the credentials on the object; drop them once used.
            client.user = client.password = None
        note("auth", True, f"logged in as {smtp.username!r}")


# --------------------------------------------------------------------------------------
# One connection and one transaction

# The longest reply line we accept (as smtplib: RFC 5321 says 512, relays exceed it).
_MAX_LINE = 8192

# Outcomes of a transaction.
_OK, _TEMP, _PERM, _STALE = range(4)

_LEADING_DOT = re.compile(rb"(?m)^\.")
_BARE_EOL = re.compile(rb"\r\n|\r|\n")
_BAD_ADDRESS_CHARS = re.compile(r"[\r\n\0<>]")


def _wire_body(data: bytes) -> bytes:
    """The message as it goes after DATA: CRLF line ends, dot-stuffed, with the final dot."""
    # A bare LF (from a caller that broke the CRLF contract) would be rejected or
    # mangled by many relays; two C-level counts are cheap enough to check every time.
    if data.count(b"\n") != data.count(b"\r\n"):
        data = _BARE_EOL.sub(b"\r\n", data)
    # RFC 5321 4.5.2: a line that starts with "." gets one more. Most messages have
    # none, and the two C-level searches are far cheaper than the regex.
    if data[:1] == b"." or b"\n." in data:
        data = _LEADING_DOT.sub(b"..", data)
    if data and not data.endswith(b"\r\n"):
        data += b"\r\n"
    return data + b".\r\n"


class _Envelope:
    """An item's wire form, computed once and kept across retries."""

    __slots__ = ("sender", "recipients", "body", "utf8", "eightbit", "size")

    def __init__(self, item: Outgoing) -> None:
        if not item.recipients:
            raise PermanentDeliveryError("the message has no recipient")
        joined = item.sender + " " + " ".join(item.recipients)
        if _BAD_ADDRESS_CHARS.search(joined):
            # CR/LF in an address would let a contact list inject SMTP commands.
            bad = next(a for a in (item.sender, *item.recipients) if _BAD_ADDRESS_CHARS.search(a))
            raise PermanentDeliveryError(f"invalid envelope address {bad!r}", recipient=item.recipients[0])
        self.utf8 = item.smtputf8 or not joined.isascii()
        encoding = "utf-8" if self.utf8 else "ascii"
        self.sender = item.sender.encode(encoding)
        self.recipients = [r.encode(encoding) for r in item.recipients]
        self.eightbit = not item.data.isascii()
        self.size = len(item.data)
        self.body = _wire_body(item.data)


class _Connection:
    """One open SMTP session and what its EHLO said."""

    __slots__ = ("client", "readline", "transactions", "pipelining", "smtputf8", "eightbitmime", "size", "broken")

    def __init__(self, client: smtplib.SMTP) -> None:
        self.client = client
        if client.file is None:
            client.file = client.sock.makefile("rb")
        self.readline = client.file.readline
        self.transactions = 0
        features = client.esmtp_features
        self.pipelining = "pipelining" in features
        self.smtputf8 = "smtputf8" in features
        self.eightbitmime = "8bitmime" in features
        self.size = "size" in features
        self.broken = False  # must not be reused: closed, 421, or in an unknown state

    def close(self, *, polite: bool) -> None:
        client = self.client
        if polite and not self.broken and client.sock is not None:
            try:
                client.sock.settimeout(min(_QUIT_TIMEOUT, client.timeout or _QUIT_TIMEOUT))
                client.quit()
            except (OSError, smtplib.SMTPException):
                pass
        client.close()
        self.broken = True

    def reply(self) -> tuple[int, bytes]:
        """Read one reply: (code, text); the lines of a multi-line reply joined by "\\n".

        smtplib's getreply() does the same with more overhead per line; this is on the
        path of every message (four replies each)."""
        line = self.readline(_MAX_LINE + 1)
        if line[3:4] == b" " and len(line) <= _MAX_LINE:
            code = line[:3]
            if code.isdigit():
                return int(code), line[4:].strip()
        lines = []
        while True:
            if not line:
                raise smtplib.SMTPServerDisconnected("Connection unexpectedly closed")
            if len(line) > _MAX_LINE:
                raise smtplib.SMTPResponseException(500, "Line too long.")
            lines.append(line[4:].strip())
            if not line[:3].isdigit():
                return -1, b"\n".join(lines)  # garbage: the caller drops the connection
            if line[3:4] != b"-":
                return int(line[:3]), b"\n".join(lines)
            line = self.readline(_MAX_LINE + 1)

    def transact(self, envelope: _Envelope) -> tuple[int, int | None, str]:
        """One MAIL / RCPT / DATA transaction. Returns (outcome, code, reply text).

        ``_STALE`` means the pooled connection turned out dead before anything that
        could deliver the message reached the relay: safe to redo at once elsewhere.
        """
        client = self.client
        reused = self.transactions > 0
        self.transactions += 1
        params = b""
        if envelope.utf8:
            params += b" SMTPUTF8"
        if envelope.eightbit and (self.eightbitmime or envelope.utf8):
            params += b" BODY=8BITMIME"
        if self.size:
            params += b" SIZE=%d" % envelope.size
        mail = b"MAIL FROM:<" + envelope.sender + b">" + params + b"\r\n"
        rcpts = [b"RCPT TO:<" + r + b">\r\n" for r in envelope.recipients]
        replies: list[tuple[int, bytes]] = []
        stage = 0  # 0: envelope, 1: sending the content, 2: waiting for the final reply
        try:
            if self.pipelining:
                self._envelope_pipelined(mail, rcpts, replies)
            else:
                self._envelope_stepwise(mail, rcpts, replies)
            failure = self._envelope_failure(replies, len(rcpts), reused)
            if failure is not None:
                return failure
            stage = 1
            client.sock.sendall(envelope.body)
            stage = 2
            code, text = self.reply()
        except (OSError, smtplib.SMTPException) as exc:
            self.broken = True
            client.close()
            error = classify_exception(exc)
            if stage == 0:
                # Nothing that could deliver the message reached the relay. On a pooled
                # connection this is the usual sign of a relay that closed it while idle.
                if reused and not error.message.startswith("timed out"):
                    return _STALE, None, error.message
                return _TEMP, None, error.message
            if stage == 1:
                # sendall() failed, so the final "." (the last bytes) never left: the
                # relay cannot have accepted a message it did not see end.
                return _TEMP, None, error.message + " while sending the message"
            # The content went out but the final reply never came: the relay may have
            # queued the message. Retrying risks a duplicate, not retrying risks a loss;
            # we retry, because a relay that drops a session mid-DATA has almost always
            # not queued it, and the reply text records the doubt for the report.
            return _TEMP, None, error.message + " after the message was sent (the relay may have accepted it)"
        if not 200 <= code < 300:
            return self._failure(code, text)
        reply = _reply_text(text)
        refused = [(r, rep) for r, rep in zip(envelope.recipients, replies[1:]) if not 200 <= rep[0] < 300]
        if refused:
            # Several recipients, some refused: the message went to the others, and a
            # retry would send them a second copy. So it is "sent", with the refusals noted.
            reply += " (refused: " + "; ".join(
                f"{r.decode('utf-8', 'replace')}: {c} {_reply_text(t)}" for r, (c, t) in refused
            ) + ")"
        return _OK, code, reply

    def _envelope_pipelined(self, mail: bytes, rcpts: list[bytes], replies: list) -> None:
        # RFC 2920: MAIL, every RCPT and DATA in one write, then read one reply each.
        self.client.sock.sendall(mail + b"".join(rcpts) + b"DATA\r\n")
        getreply = self.reply
        for _ in range(len(rcpts) + 2):
            reply = getreply()
            replies.append(reply)
            if reply[0] == 421:  # the relay is closing: no more replies will come
                return

    def _envelope_stepwise(self, mail: bytes, rcpts: list[bytes], replies: list) -> None:
        sock = self.client.sock
        getreply = self.reply
        sock.sendall(mail)
        reply = getreply()
        replies.append(reply)
        if not 200 <= reply[0] < 300:
            return
        accepted = 0
        for rcpt in rcpts:
            sock.sendall(rcpt)
            reply = getreply()
            replies.append(reply)
            if reply[0] == 421:
                return
            accepted += 200 <= reply[0] < 300
        if accepted:
            sock.sendall(b"DATA\r\n")
            replies.append(getreply())

    def _envelope_failure(self, replies: list, recipients: int, reused: bool):
        """None when the relay said 354 to DATA; else the transaction's outcome."""
        mail_code = replies[0][0]
        if reused and mail_code in (421, 503):
            # 503 to MAIL: the session still holds an old transaction; 421 to MAIL on a
            # pooled connection: the relay's idle timeout fired while we were away. No
            # message was accepted either way: start over on a fresh connection.
            self.broken = True
            return _STALE, mail_code, _reply_text(replies[0][1])
        rcpt_replies = replies[1 : 1 + recipients]
        data_reply = replies[1 + recipients] if len(replies) > 1 + recipients else None
        if not 200 <= mail_code < 300:
            failure = replies[0]
        elif not any(200 <= r[0] < 300 for r in rcpt_replies):
            # With one recipient, its refusal is the message's result. With several, a
            # temporary refusal wins over a permanent one: a retry may get through.
            refused = rcpt_replies or replies[-1:]
            failure = next((r for r in refused if not 500 <= r[0] < 600), refused[0])
        elif data_reply is None or data_reply[0] != 354:
            failure = data_reply or replies[-1]
        else:
            return None
        if data_reply is not None and data_reply[0] == 354:
            # The relay took DATA although the envelope failed (RFC 2920 says it must
            # not): end an empty message to keep the session in step.
            try:
                self.client.sock.sendall(b".\r\n")
                self.reply()
            except (OSError, smtplib.SMTPException):
                self.broken = True
        return self._failure(*failure)

    def _failure(self, code: int, text: bytes) -> tuple[int, int | None, str]:
        reply = _reply_text(text)
        if closes_connection(code) or not 200 <= code < 600:
            self.broken = True  # 421, or a reply we cannot make sense of
        elif not self.broken:
            self._reset()
        if 500 <= code < 600:
            return _PERM, code, reply
        return _TEMP, (code if code > 0 else None), reply

    def _reset(self) -> None:
        """RSET after a failed transaction, so the session is clean for the next one."""
        try:
            self.client.sock.sendall(b"RSET\r\n")
            if self.reply()[0] != 250:
                self.broken = True
        except (OSError, smtplib.SMTPException):
            self.broken = True
            self.client.close()


# --------------------------------------------------------------------------------------
# The pool

# What a worker did with a job, besides a final status string.
_UNTOUCHED = None


class _Job:
    __slots__ = ("item", "attempts", "envelope", "announced")

    def __init__(self, item: Outgoing) -> None:
        self.item = item
        self.attempts = 0  # attempts made so far
        self.envelope: _Envelope | None = None
        self.announced = False  # on_sending was called and no on_result yet


class _Engine:
    """The shared state of one :func:`deliver` run: the queue, the retry heap, the
    rate limiter and the listener. One lock guards the queue, the heap and the counts."""

    def __init__(
        self,
        *,
        smtp: SMTPConfig,
        send: SendConfig,
        password: str | None,
        listener: DeliveryListener,
        stop: threading.Event,
        clock: Callable[[], float],
        sleep: Callable[[float], object] | None,
        rng: Callable[[], float],
        queue_size: int,
        ssl_context: ssl.SSLContext | None,
    ) -> None:
        self.setup = _Setup(smtp, password, ssl_context)
        self.max_per_connection = send.max_per_connection
        self.retries = send.retries
        self.retry_backoff = send.retry_backoff
        self.listener = listener
        self.stop = stop
        self.clock = clock
        self.rng = rng
        self.halt = threading.Event()  # stop, or a fatal error: no new transactions
        # Without an injected sleep, waiting for a rate slot ends as soon as the run halts.
        self.limiter = RateLimiter(parse_rate(send.rate), clock=clock, sleep=sleep or self.halt.wait)
        self.lock = threading.Lock()
        self.work_ready = threading.Condition(self.lock)
        self.room = threading.Condition(self.lock)
        self.fresh: deque[_Job] = deque()
        self.retry_heap: list[tuple[float, int, _Job]] = []
        self.sequence = 0
        self.outstanding = 0  # taken from the iterator and without a final result
        self.outstanding_bytes = 0  # their sizes: messages with attachments can be large
        self.limit = max(1, queue_size)
        # Once the queue is full the feeder sleeps until it has drained to half: one
        # wake-up per limit/2 messages instead of a thread switch for every message.
        self.low_water = self.limit // 2
        self.feeding_done = False
        self.fatal: BaseException | None = None
        self.stats = DeliveryStats()
        self.listener_lock = threading.Lock()
        # A listener that declares ``thread_safe = True`` is called concurrently: it can
        # then group the log writes of several workers into one commit.
        self.listener_is_thread_safe = bool(getattr(listener, "thread_safe", False))

    # -- called by the feeding (calling) thread

    def feed(self, items: Iterable[Outgoing]) -> None:
        iterator: Iterator[Outgoing] = iter(items)
        stop, halt, lock, room, work_ready = self.stop, self.halt, self.lock, self.room, self.work_ready
        fresh, stats, limit = self.fresh, self.stats, self.limit
        while True:
            if stop.is_set() or halt.is_set():
                self.halt_all()
                return
            try:
                item = next(iterator)
            except StopIteration:
                return
            job = _Job(item)
            with lock:
                stats.items += 1
                # The bound covers the queue, the retry heap and the items in flight, so
                # memory stays flat even when every message is being deferred.
                if self.outstanding >= limit or self.outstanding_bytes >= _MAX_OUTSTANDING_BYTES:
                    while (
                        self.outstanding > self.low_water or self.outstanding_bytes > _MAX_OUTSTANDING_BYTES // 2
                    ) and not (stop.is_set() or halt.is_set()):
                        room.wait(_POLL)
                if stop.is_set() or halt.is_set():
                    stats.untouched += 1
                    continue  # the loop's first check halts everything
                fresh.append(job)
                self.outstanding += 1
                self.outstanding_bytes += len(item.data)
                work_ready.notify()

    def halt_all(self) -> None:
        self.halt.set()
        with self.lock:
            self.work_ready.notify_all()
            self.room.notify_all()

    def finish_feeding(self) -> None:
        with self.lock:
            self.feeding_done = True
            self.work_ready.notify_all()

    # -- called by the workers

    def next_job(self, finished: _Job | None, disposition: object) -> _Job | None:
        """Account for the job just handled, then wait for the next one (None: exit)."""
        stop, halt, heap = self.stop, self.halt, self.retry_heap
        with self.lock:
            if finished is not None:
                self._account(finished, disposition)
            while True:
                if stop.is_set() or halt.is_set():
                    return None
                if heap:
                    now = self.clock()
                    ready_at = heap[0][0]
                    if ready_at <= now:
                        return heapq.heappop(heap)[2]
                if self.fresh:
                    return self.fresh.popleft()
                if self.feeding_done and not self.outstanding:
                    self.work_ready.notify_all()
                    return None
                # A retry that is not due yet: wait for it (or for new work), never spin.
                timeout = min(_POLL, ready_at - now) if heap else _POLL
                self.work_ready.wait(timeout)

    def _account(self, job: _Job, disposition: object) -> None:
        stats = self.stats
        if isinstance(disposition, float):
            self.sequence += 1
            heapq.heappush(self.retry_heap, (disposition, self.sequence, job))
            stats.retries += 1
            self.work_ready.notify()
            return
        self.outstanding -= 1
        self.outstanding_bytes -= len(job.item.data)
        if self.outstanding <= self.low_water and self.outstanding_bytes <= _MAX_OUTSTANDING_BYTES // 2:
            self.room.notify()
        if disposition == SENT:
            stats.sent += 1
        elif disposition == FAILED:
            stats.failed += 1
        elif disposition == DEFERRED:
            stats.deferred += 1
        elif job.attempts:
            stats.waiting_retry += 1  # a retry the run stopped before starting
        else:
            stats.untouched += 1

    def fail(self, error: BaseException, job: _Job | None) -> None:
        """A worker hit something that ends the run (fatal setup error, listener error)."""
        with self.lock:
            if self.fatal is None:
                self.fatal = error
        if job is not None:
            if job.announced:
                # on_sending said "sending"; leave the caller's log saying something true.
                try:
                    self.report(job, Result(DEFERRED, False, job.attempts, None, f"the run stopped: {error}"))
                except Exception:
                    pass
            with self.lock:
                self._account(job, _UNTOUCHED)
        self.halt_all()

    def announce(self, job: _Job, attempt: int) -> None:
        if self.listener_is_thread_safe:
            self.listener.on_sending(job.item, attempt)
        else:
            with self.listener_lock:
                self.listener.on_sending(job.item, attempt)
        job.announced = True

    def report(self, job: _Job, result: Result) -> None:
        job.announced = False
        if self.listener_is_thread_safe:
            self.listener.on_result(job.item, result)
        else:
            with self.listener_lock:
                self.listener.on_result(job.item, result)

    def finish(self, job: _Job, result: Result) -> str:
        self.report(job, result)
        return result.status

    def temporary(self, job: _Job, attempt: int, code: int | None, text: str) -> object:
        """A temporary failure: schedule a retry (return its time) or give up (DEFERRED)."""
        job.attempts = attempt
        if attempt <= self.retries:
            ready_at = self.clock() + backoff_delay(attempt, base=self.retry_backoff, rng=self.rng)
            self.report(job, Result(DEFERRED, False, attempt, code, text))
            return float(ready_at)
        return self.finish(job, Result(DEFERRED, True, attempt, code, text))


class _Worker:
    """One thread with one persistent connection."""

    def __init__(self, engine: _Engine) -> None:
        self.engine = engine
        self.connection: _Connection | None = None
        self.attempts = 0
        self.connections = 0
        self.stale = 0

    def run(self) -> None:
        engine = self.engine
        job = finished = disposition = None
        try:
            while True:
                job = engine.next_job(finished, disposition)
                finished = None
                if job is None:
                    return
                disposition = self.handle(job)
                finished = job
        except BaseException as exc:  # noqa: BLE001 - handed to the calling thread
            engine.fail(exc, job if finished is None else None)
        finally:
            if self.connection is not None:
                self.connection.close(polite=True)
                self.connection = None

    def handle(self, job: _Job) -> object:
        engine = self.engine
        item = job.item
        attempt = job.attempts + 1
        envelope = job.envelope
        if envelope is None:
            try:
                envelope = job.envelope = _Envelope(item)
            except PermanentDeliveryError as exc:
                return engine.finish(job, Result(FAILED, True, job.attempts, None, exc.message))
        stale_retried = False
        while True:
            connection = self.connection
            if connection is not None and (connection.broken or connection.transactions >= engine.max_per_connection):
                connection.close(polite=True)
                connection = self.connection = None
            if connection is None:
                try:
                    connection = self.connection = _Connection(engine.setup.open())
                except TemporaryDeliveryError as exc:
                    self.attempts += 1
                    return engine.temporary(job, attempt, exc.smtp_code, exc.message)
                self.connections += 1
            if envelope.utf8 and not connection.smtputf8:
                needy = next((a for a in (item.sender, *item.recipients) if not a.isascii()), item.recipients[0])
                return engine.finish(job, Result(
                    FAILED, True, job.attempts, None,
                    f"the relay does not support SMTPUTF8, needed for {needy}",
                ))
            if engine.limiter.acquire(engine.halt) is None or engine.halt.is_set() or engine.stop.is_set():
                if job.announced:  # halted between a stale connection and its redo
                    return engine.temporary(job, attempt, None, "the run stopped before the message was sent")
                return _UNTOUCHED
            if not job.announced:  # a redo after a stale connection is still "sending"
                engine.announce(job, attempt)
            outcome, code, text = connection.transact(envelope)
            if outcome == _STALE:
                self.stale += 1
                if not stale_retried:
                    stale_retried = True
                    continue
                outcome = _TEMP
            self.attempts += 1
            if outcome == _OK:
                return engine.finish(job, Result(SENT, True, attempt, code, text))
            if outcome == _PERM:
                return engine.finish(job, Result(FAILED, True, attempt, code, text))
            return engine.temporary(job, attempt, code, text)


def deliver(
    items: Iterable[Outgoing],
    *,
    smtp: SMTPConfig,
    send: SendConfig,
    password: str | None,
    listener: DeliveryListener,
    stop: threading.Event,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], object] | None = None,
    rng: Callable[[], float] = random.random,
    queue_size: int = 1000,
    ssl_context: ssl.SSLContext | None = None,
) -> DeliveryStats:
    """Deliver every item of ``items`` through a pool of ``send.connections`` connections.

    ``items`` is iterated in the calling thread (render lazily there); at most
    ``queue_size`` items are held at once, queued, waiting for a retry or in flight.
    Every item that gets ``listener.on_sending`` also gets a ``listener.on_result``;
    each item ends with exactly one final result unless the run stops first.

    Temporary failures (4xx, dropped connections, timeouts, connection refused) are
    retried up to ``send.retries`` times after :func:`~mailer.throttle.backoff_delay`,
    on any connection; permanent ones (5xx) are final at once. The global rate
    ``send.rate`` is never exceeded by more than one message in any second.

    When ``stop`` is set: no new items are taken, transactions in flight finish, no
    retry starts, connections are closed, and the stats come back with
    ``interrupted=True``. Raises :class:`ConnectionSetupError` (after the same orderly
    stop) when the relay cannot be used at all: TLS or certificate failure, missing
    STARTTLS, login refused, or a password that would travel unencrypted. An exception
    from the listener or from ``items`` also stops the run and comes out unchanged.

    ``clock`` drives the rate limiter and retry times; ``sleep`` waits for a rate slot
    (default: a wait that ends early on stop); ``rng`` is the backoff jitter;
    ``ssl_context`` replaces the context built from ``smtp.tls_verify`` (tests use it
    to trust a throwaway CA).
    """
    check_relay_settings(smtp, password)
    engine = _Engine(
        smtp=smtp, send=send, password=password, listener=listener, stop=stop, clock=clock,
        sleep=sleep, rng=rng, queue_size=queue_size, ssl_context=ssl_context,
    )
    started = clock()
    workers = [_Worker(engine) for _ in range(send.connections)]
    threads = [
        threading.Thread(target=worker.run, name=f"mailer-smtp-{index}", daemon=True)
        for index, worker in enumerate(workers, 1)
    ]
    for thread in threads:
        thread.start()
    try:
        engine.feed(items)
    except BaseException:
        engine.halt_all()
        raise
    finally:
        engine.finish_feeding()
        for thread in threads:
            while thread.is_alive():
                thread.join(_POLL)
                if stop.is_set() and not engine.halt.is_set():
                    engine.halt_all()
    stats = engine.stats
    stats.untouched += len(engine.fresh)
    stats.waiting_retry += len(engine.retry_heap)
    for worker in workers:
        stats.attempts += worker.attempts
        stats.connections_opened += worker.connections
        stats.stale_reconnects += worker.stale
    stats.interrupted = stop.is_set()
    stats.elapsed = clock() - started
    if engine.fatal is not None:
        raise engine.fatal
    return stats


# --------------------------------------------------------------------------------------
# mailer check


def probe_relay(
    smtp: SMTPConfig, *, password: str | None, ssl_context: ssl.SSLContext | None = None
) -> RelayProbe:
    """Connect, EHLO, STARTTLS or TLS (verified), AUTH if configured; send no message.

    Never raises for a relay problem: each step is recorded with ``ok`` and a detail,
    and the probe stops at the first failed step.
    """
    probe = RelayProbe(host=smtp.host, port=smtp.effective_port, security=smtp.security)

    def note(name: str, ok: bool, detail: str) -> None:
        probe.steps.append(ProbeStep(name, ok, detail))

    try:
        check_relay_settings(smtp, password)
    except ConnectionSetupError as exc:
        note("settings", False, str(exc))
        return probe
    setup = _Setup(smtp, password, ssl_context)
    try:
        client = setup.open(note)
    except (ConnectionSetupError, TemporaryDeliveryError) as exc:
        if not probe.steps or probe.steps[-1].ok:
            note("setup", False, str(exc))
        return probe
    try:
        probe.extensions = {k.upper(): v for k, v in client.esmtp_features.items()}
        probe.auth_mechanisms = client.esmtp_features.get("auth", "").upper().split()
        if isinstance(client.sock, ssl.SSLSocket):
            probe.tls_version = client.sock.version()
        if not smtp.username:
            note("auth", True, "no login configured ([smtp] username is not set)")
    finally:
        try:
            client.quit()
        except (OSError, smtplib.SMTPException):
            client.close()
    return probe
