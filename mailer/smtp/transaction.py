"""One SMTP transaction on an open session: MAIL, RCPT, then DATA or BDAT (RFC 3030).

With PIPELINING (RFC 2920) and CHUNKING (RFC 3030) both offered, MAIL, every RCPT and
``BDAT <size> LAST`` with the message itself go out in one write, and the replies are
read after it: a transaction on a reused connection costs one round trip, where DATA
costs two (the 354 must come back before the content may follow). BDAT sends the
message as it is, with an exact byte count and no dot-stuffing. Without CHUNKING the
transaction uses DATA, pipelined when PIPELINING is offered.

The message's CRLF form is computed once and kept across retries; replies are read
with less overhead than smtplib's, since this is on the path of every message.
"""

from __future__ import annotations

import re
import select
import smtplib
from collections.abc import Callable
from typing import Any, Protocol

from ..core.errors import PermanentDeliveryError
from ..core.outcomes import Outgoing
from .replies import classify_exception, closes_connection, reply_text
from .trace import Trace, TracedSocket

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


def _crlf_content(data: bytes) -> bytes:
    """The message with CRLF line ends, ending with one: what the relay will store.

    BDAT sends exactly this; DATA sends it dot-stuffed with the final dot, which the
    relay removes again, so both carry the same bytes. BODY=7BIT and 8BITMIME content
    must be CRLF lines (RFC 3030 keeps BINARYMIME for anything else, which the message
    builder never makes).
    """
    # A bare LF (from a caller that broke the CRLF contract) would be rejected or
    # mangled by many relays; two C-level counts are cheap enough to check every time.
    if data.count(b"\n") != data.count(b"\r\n"):
        data = _BARE_EOL.sub(b"\r\n", data)
    if data and not data.endswith(b"\r\n"):
        data += b"\r\n"
    return data


def _dot_stuffed(content: bytes) -> bytes:
    """CRLF content as it goes after DATA: dot-stuffed, with the final dot."""
    # RFC 5321 4.5.2: a line that starts with "." gets one more. Most messages have
    # none, and the two C-level searches are far cheaper than the regex.
    if content[:1] == b"." or b"\n." in content:
        content = _LEADING_DOT.sub(b"..", content)
    return content + b".\r\n"


class Envelope:
    """An item's wire form, computed once and kept across retries.

    ``content`` is the message in CRLF form (what BDAT sends); :meth:`data_body` is
    the DATA form, made when a transaction needs it rather than kept beside it (it
    would double the memory of the messages in flight)."""

    __slots__ = ("content", "eightbit", "recipients", "sender", "size", "utf8")

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
        self.content = _crlf_content(item.data)

    def data_body(self) -> bytes:
        """The message as it goes after DATA: dot-stuffed, ending with the final dot."""
        return _dot_stuffed(self.content)


class Connection:
    """One open SMTP session and what its EHLO said."""

    __slots__ = (
        "broken",
        "chunking",
        "client",
        "command_timeout",
        "data_timeout",
        "eightbitmime",
        "pipelining",
        "poll",
        "raw",
        "readline",
        "size",
        "smtputf8",
        "sock",
        "trace",
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
        self.raw: _Wire = sock
        self.readline: Callable[[int], bytes] = client.file.readline
        # Tells, without blocking, whether the relay has said or closed anything
        # since the last reply: on an idle pooled connection that means it hung up.
        self.poll = select.poll()
        self.poll.register(sock.fileno(), select.POLLIN)
        trace = getattr(client, "mailer_trace", None)
        self.trace: Trace | None = trace
        if trace is not None:  # --debug: the same calls, through the trace
            traced = TracedSocket(sock, trace)
            self.sock = traced
            self.readline = traced.traced_readline(self.readline)
        self.transactions = 0
        features = client.esmtp_features
        self.pipelining = "pipelining" in features
        self.chunking = "chunking" in features
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
        """One MAIL / RCPT / DATA-or-BDAT transaction. Returns (outcome, code, reply text).

        ``STALE`` means the pooled connection turned out dead before anything that
        could deliver the message reached the relay: safe to redo at once elsewhere.
        """
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
        if self.chunking and self.pipelining:
            return self._transact_in_one_write(envelope, mail, rcpts, reused)
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
            if self.chunking:  # RFC 3030 without PIPELINING: the chunk once the envelope is accepted
                self._send_chunk(b"BDAT %d LAST\r\n" % len(envelope.content), envelope.content)
            else:
                self.sock.sendall(envelope.data_body())
            stage = 2
            code, text = self._final_reply()
        except (OSError, smtplib.SMTPException) as exc:
            self.broken = True
            self.client.close()
            error = classify_exception(exc)
            if stage == 0:
                # Nothing that could deliver the message reached the relay. On a pooled
                # connection this is the usual sign of a relay that closed it while idle.
                if reused and not error.message.startswith("timed out"):
                    return STALE, None, error.message
                return TEMP, None, error.message
            if stage == 1:
                # sendall() failed, so the last bytes (the final "." or the end of the
                # chunk) never left: the relay cannot have accepted a message it did not see end.
                return TEMP, None, error.message + " while sending the message"
            return self._lost_final_reply(error.message)
        if not 200 <= code < 300:
            return self._failure(code, text)
        return self._accepted(envelope, replies[1 : 1 + len(rcpts)], code, text)

    def _final_reply(self) -> _Reply:
        """The reply to the end of the message, with the longer wait RFC 5321 gives it."""
        if self.data_timeout is None:
            return self.reply()
        # The relay may be scanning or queueing the message: RFC 5321 gives it far
        # longer for this reply than for any other.
        self.sock.settimeout(self.data_timeout)
        reply = self.reply()
        self.sock.settimeout(self.command_timeout)
        return reply

    def _lost_final_reply(self, message: str) -> _Result:
        """The whole message went out, and the connection failed before its final reply."""
        if message.startswith("timed out"):
            # No reply came in the final-reply time: the relay may well have queued the
            # message (RFC 1047). A retry would risk a second copy, so the outcome is
            # unknown, left for the user to decide.
            waited = self.data_timeout if self.data_timeout is not None else self.command_timeout
            return (
                UNKNOWN,
                None,
                f"no reply within {waited:g} s after the end of the message: the relay may have "
                "accepted it (outcome unknown; not retried)",
            )
        # The connection dropped before the final reply: the relay may have queued
        # the message. Retrying risks a duplicate, not retrying risks a loss; we
        # retry, because a relay that drops a session mid-transaction has almost
        # always not queued it, and the reply text records the doubt for the report.
        return TEMP, None, message + " after the message was sent (the relay may have accepted it)"

    def _accepted(self, envelope: Envelope, rcpt_replies: list[_Reply], code: int, text: bytes) -> _Result:
        reply = reply_text(text)
        refused = [(r, rep) for r, rep in zip(envelope.recipients, rcpt_replies) if not 200 <= rep[0] < 300]
        if refused:
            # Several recipients, some refused: the message went to the others, and a
            # retry would send them a second copy. So it is "sent", with the refusals noted.
            reply += (
                " (refused: "
                + "; ".join(f"{r.decode('utf-8', 'replace')}: {c} {reply_text(t)}" for r, (c, t) in refused)
                + ")"
            )
        return OK, code, reply

    def _send_chunk(self, command: bytes, content: bytes) -> None:
        """``command`` and the message after it in one write; --debug shows the message by its size."""
        if self.trace is None:
            self.sock.sendall(command + content)
            return
        self.trace.client(command)
        self.trace.content(len(content), "the BDAT chunk, sent as it is")
        self.raw.sendall(command + content)

    def _relay_has_hung_up(self) -> bool:
        """Whether the relay sent or closed anything while the connection sat idle.

        Between transactions the relay has nothing to say: readable now means it
        closed the connection (end of file) or said 421 on its idle timeout."""
        return bool(self.poll.poll(0))

    def _transact_in_one_write(self, envelope: Envelope, mail: bytes, rcpts: list[bytes], reused: bool) -> _Result:
        """PIPELINING + CHUNKING: MAIL, RCPT(s) and BDAT LAST with the message in one write.

        The message leaves before any reply is read, so a pooled connection the relay
        has closed while idle is looked for first (one poll(), no round trip): STALE,
        with nothing sent. A RCPT or MAIL the relay refuses does not stop the chunk: the
        relay reads and discards it (RFC 3030 section 2) and answers the BDAT with an
        error, which is read like every other reply, so the session stays in step."""
        content = envelope.content
        replies: list[_Reply] = []
        if reused and self._relay_has_hung_up():
            self.broken = True
            self.client.close()
            return STALE, None, "the relay closed the connection while it was idle"
        sent = False
        try:
            self._send_chunk(mail + b"".join(rcpts) + b"BDAT %d LAST\r\n" % len(content), content)
            sent = True
            # Every reply here may wait for the message to be queued: a relay may hold
            # back the replies to MAIL and RCPT until it has answered the whole group.
            if self.data_timeout is not None:
                self.sock.settimeout(self.data_timeout)
            getreply = self.reply
            for _ in range(len(rcpts) + 2):
                reply = getreply()
                replies.append(reply)
                if reply[0] == 421:  # the relay is closing: no more replies will come
                    break
            if self.data_timeout is not None:
                self.sock.settimeout(self.command_timeout)
        except (OSError, smtplib.SMTPException) as exc:
            self.broken = True
            self.client.close()
            error = classify_exception(exc)
            if not sent:
                # The chunk never left whole: no message can have been accepted.
                if reused and not error.message.startswith("timed out"):
                    return STALE, None, error.message
                return TEMP, None, error.message + " while sending the message"
            if reused and not replies and not error.message.startswith("timed out"):
                # Not even MAIL was answered: almost always a relay that closed the
                # pooled connection just after its last reply, before the poll above
                # could see it. Not proof (a relay may hold its replies until it has
                # queued the message), but a relay that hangs up without a word has
                # almost never queued it: redo it on a fresh connection, as with DATA.
                return STALE, None, error.message
            failure = self._envelope_refused(replies, len(rcpts))
            if failure is not None:
                # MAIL or every RCPT was refused before the connection failed: the
                # relay has no recipient to deliver to, whatever became of the chunk.
                return self._failure(*failure)
            return self._lost_final_reply(error.message)
        mail_code = replies[0][0]
        if reused and mail_code in (421, 503):
            # As with DATA: an idle timeout that fired while we were away, or an old
            # transaction still open. No message was accepted; start over elsewhere.
            self.broken = True
            self.client.close()
            return STALE, mail_code, reply_text(replies[0][1])
        failure = self._envelope_refused(replies, len(rcpts))
        if failure is None:
            bdat_reply = replies[1 + len(rcpts)] if len(replies) > 1 + len(rcpts) else replies[-1]
            if 200 <= bdat_reply[0] < 300 and len(replies) == len(rcpts) + 2:
                return self._accepted(envelope, replies[1 : 1 + len(rcpts)], *bdat_reply)
            failure = bdat_reply
        return self._failure(*failure)

    @staticmethod
    def _envelope_refused(replies: list[_Reply], recipients: int) -> _Reply | None:
        """The reply that failed the envelope (MAIL, or every RCPT), or None."""
        if not replies:
            return None
        if not 200 <= replies[0][0] < 300:
            return replies[0]
        rcpt_replies = replies[1 : 1 + recipients]
        if len(rcpt_replies) < recipients or any(200 <= r[0] < 300 for r in rcpt_replies):
            return None  # some accepted, or not every reply was read
        # With one recipient, its refusal is the message's result. With several, a
        # temporary refusal wins over a permanent one: a retry may get through.
        return next((r for r in rcpt_replies if not 500 <= r[0] < 600), rcpt_replies[0])

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
        if accepted and not self.chunking:
            sock.sendall(b"DATA\r\n")
            replies.append(getreply())

    def _envelope_failure(self, replies: list[_Reply], recipients: int, reused: bool) -> _Result | None:
        """None when the message may follow (354 to DATA, or a recipient accepted before
        BDAT); else the transaction's outcome."""
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
        elif self.chunking:
            if len(replies) == 1 + recipients:
                return None
            failure = replies[-1]  # a 421 to a RCPT: the relay is closing
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
