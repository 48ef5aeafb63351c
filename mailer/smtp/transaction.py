"""One SMTP transaction on an open session: MAIL, RCPT, DATA, with PIPELINING (RFC 2920).

The wire form of a message (CRLF, dot-stuffed) is computed once and kept across
retries; replies are read with less overhead than smtplib's, since this is on the
path of every message.
"""

from __future__ import annotations

import re
import smtplib
from collections.abc import Callable
from typing import Any, Protocol

from ..core.errors import PermanentDeliveryError
from ..core.outcomes import Outgoing
from .replies import classify_exception, closes_connection, reply_text
from .trace import TracedSocket

__all__ = ["OK", "PERM", "STALE", "TEMP", "UNKNOWN", "Connection", "Envelope"]


# How long to wait for the reply to QUIT when closing: a stalled relay must not hold up
# the end of a run for the whole command timeout.
_QUIT_TIMEOUT = 5.0


# --------------------------------------------------------------------------------------
# One connection and one transaction

# The longest reply line we accept (as smtplib: RFC 5321 says 512, relays exceed it).
_MAX_LINE = 8192

# Outcomes of a transaction. UNKNOWN: the whole message went out and its final reply
# did not come in time; the relay may have queued it (RFC 1047), so it is not retried.
OK, TEMP, PERM, STALE, UNKNOWN = range(5)


class _Wire(Protocol):
    """What a transaction writes to: the session's socket, or its trace (--debug)."""

    def sendall(self, data: bytes, /) -> None: ...

    def settimeout(self, value: float | None, /) -> None: ...


# A reply: its code (-1 for one that does not parse) and its text.
_Reply = tuple[int, bytes]
# What a transaction came to: (outcome, reply code or None, reply text).
_Result = tuple[int, int | None, str]

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


class Envelope:
    """An item's wire form, computed once and kept across retries."""

    __slots__ = ("body", "eightbit", "recipients", "sender", "size", "utf8")

    def __init__(self, item: Outgoing[Any]) -> None:
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


class Connection:
    """One open SMTP session and what its EHLO said."""

    __slots__ = (
        "broken",
        "client",
        "command_timeout",
        "data_timeout",
        "eightbitmime",
        "pipelining",
        "readline",
        "size",
        "smtputf8",
        "sock",
        "transactions",
    )

    def __init__(self, client: smtplib.SMTP, *, data_timeout: float | None = None) -> None:
        """``data_timeout``: how long to wait for the reply to the end of the message
        (RFC 5321 4.5.3.2.6 says 10 minutes), if not the session's command timeout."""
        self.client = client
        self.command_timeout = client.timeout
        self.data_timeout = data_timeout if data_timeout != client.timeout else None
        if client.sock is None:
            raise smtplib.SMTPServerDisconnected("the SMTP client is not connected")
        # The session's socket, as set up (TLS included) before the first transaction.
        sock = client.sock
        if client.file is None:
            client.file = sock.makefile("rb")
        self.sock: _Wire = sock
        self.readline: Callable[[int], bytes] = client.file.readline
        trace = getattr(client, "mailer_trace", None)
        if trace is not None:  # --debug: the same calls, through the trace
            traced = TracedSocket(sock, trace)
            self.sock = traced
            self.readline = traced.traced_readline(self.readline)
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

    def reply(self) -> _Reply:
        """Read one reply: (code, text); the lines of a multi-line reply joined by "\\n".

        smtplib's getreply() does the same with more overhead per line; this is on the
        path of every message (four replies each)."""
        line = self.readline(_MAX_LINE + 1)
        if line[3:4] == b" " and len(line) <= _MAX_LINE:
            code = line[:3]
            if code.isdigit():
                return int(code), line[4:].strip()
        lines: list[bytes] = []
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

    def transact(self, envelope: Envelope) -> _Result:
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
        replies: list[_Reply] = []
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
            self.sock.sendall(envelope.body)
            stage = 2
            if self.data_timeout is None:
                code, text = self.reply()
            else:
                # The relay may be scanning or queueing the message: RFC 5321 gives it far
                # longer for this reply than for any other.
                self.sock.settimeout(self.data_timeout)
                code, text = self.reply()
                self.sock.settimeout(self.command_timeout)
        except (OSError, smtplib.SMTPException) as exc:
            self.broken = True
            client.close()
            error = classify_exception(exc)
            if stage == 0:
                # Nothing that could deliver the message reached the relay. On a pooled
                # connection this is the usual sign of a relay that closed it while idle.
                if reused and not error.message.startswith("timed out"):
                    return STALE, None, error.message
                return TEMP, None, error.message
            if stage == 1:
                # sendall() failed, so the final "." (the last bytes) never left: the
                # relay cannot have accepted a message it did not see end.
                return TEMP, None, error.message + " while sending the message"
            if error.message.startswith("timed out"):
                # The whole message went out and no reply came in the final-reply time:
                # the relay may well have queued it (RFC 1047). A retry would risk a
                # second copy, so the outcome is unknown, left for the user to decide.
                waited = self.data_timeout if self.data_timeout is not None else self.command_timeout
                return (
                    UNKNOWN,
                    None,
                    f"no reply within {waited:g} s after the end of the message: the relay may have "
                    "accepted it (outcome unknown; not retried)",
                )
            # The connection dropped before the final reply: the relay may have queued
            # the message. Retrying risks a duplicate, not retrying risks a loss; we
            # retry, because a relay that drops a session mid-DATA has almost always not
            # queued it, and the reply text records the doubt for the report.
            return TEMP, None, error.message + " after the message was sent (the relay may have accepted it)"
        if not 200 <= code < 300:
            return self._failure(code, text)
        reply = reply_text(text)
        refused = [(r, rep) for r, rep in zip(envelope.recipients, replies[1:]) if not 200 <= rep[0] < 300]
        if refused:
            # Several recipients, some refused: the message went to the others, and a
            # retry would send them a second copy. So it is "sent", with the refusals noted.
            reply += (
                " (refused: "
                + "; ".join(f"{r.decode('utf-8', 'replace')}: {c} {reply_text(t)}" for r, (c, t) in refused)
                + ")"
            )
        return OK, code, reply

    def _envelope_pipelined(self, mail: bytes, rcpts: list[bytes], replies: list[_Reply]) -> None:
        # RFC 2920: MAIL, every RCPT and DATA in one write, then read one reply each.
        self.sock.sendall(mail + b"".join(rcpts) + b"DATA\r\n")
        getreply = self.reply
        for _ in range(len(rcpts) + 2):
            reply = getreply()
            replies.append(reply)
            if reply[0] == 421:  # the relay is closing: no more replies will come
                return

    def _envelope_stepwise(self, mail: bytes, rcpts: list[bytes], replies: list[_Reply]) -> None:
        sock = self.sock
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

    def _envelope_failure(self, replies: list[_Reply], recipients: int, reused: bool) -> _Result | None:
        """None when the relay said 354 to DATA; else the transaction's outcome."""
        mail_code = replies[0][0]
        if reused and mail_code in (421, 503):
            # 503 to MAIL: the session still holds an old transaction; 421 to MAIL on a
            # pooled connection: the relay's idle timeout fired while we were away. No
            # message was accepted either way: start over on a fresh connection.
            self.broken = True
            return STALE, mail_code, reply_text(replies[0][1])
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
                self.sock.sendall(b".\r\n")
                self.reply()
            except (OSError, smtplib.SMTPException):
                self.broken = True
        return self._failure(*failure)

    def _failure(self, code: int, text: bytes) -> _Result:
        reply = reply_text(text)
        if closes_connection(code) or not 200 <= code < 600:
            self.broken = True  # 421, or a reply we cannot make sense of
        elif not self.broken:
            self._reset()
        if 500 <= code < 600:
            return PERM, code, reply
        return TEMP, (code if code > 0 else None), reply

    def _reset(self) -> None:
        """RSET after a failed transaction, so the session is clean for the next one."""
        try:
            self.sock.sendall(b"RSET\r\n")
            if self.reply()[0] != 250:
                self.broken = True
        except (OSError, smtplib.SMTPException):
            self.broken = True
            self.client.close()
