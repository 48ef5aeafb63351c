"""An asyncio SMTP client session for direct delivery: connect, EHLO, STARTTLS, transactions.

Direct delivery talks to thousands of MX hosts with long round trips; a session here is
a coroutine and two buffers, not a thread, so waiting on many at once is cheap. The
transaction goes out like the threaded client's (:mod:`mailer.smtp.transaction`): with
PIPELINING and CHUNKING, MAIL, RCPT(s) and ``BDAT <size> LAST`` with the message in one
write, one round trip per message; with PIPELINING alone MAIL, RCPT(s) and DATA in one
write, then the content (two round trips); without either, step by step. The message's
wire form is the same :class:`~mailer.smtp.transaction.Envelope`.

TLS (RFC 7435, opportunistic security): STARTTLS is used whenever offered; with
``tls="opportunistic"`` the certificate is not verified (an unverifiable certificate
still protects against passive listening), and the session says so in
:attr:`AsyncSession.tls`; ``tls="required"`` refuses a host that offers no STARTTLS;
``tls="verify"`` (an MTA-STS ``enforce`` policy) requires STARTTLS and a certificate
valid for the MX host name.

No AUTH: an MX accepts mail for its own domains without one.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
from dataclasses import dataclass

from .replies import reply_text
from .transaction import OK, PERM, TEMP, UNKNOWN, Envelope

__all__ = ["AsyncSession", "GreetingRefused", "SessionError", "open_session"]

_MAX_LINE = 8192
_QUIT_TIMEOUT = 5.0

# (outcome, code or None, reply text), as mailer.smtp.transaction's.
_Result = tuple[int, int | None, str]


class SessionError(Exception):
    """A session could not be opened or broke: connection refused, timeout, TLS, EOF.

    ``code`` is the server's reply code when there was one; ``reputation`` is True for a
    reply that says the sending address is not welcome for now (421/4.7.x)."""

    def __init__(self, message: str, *, code: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.code = code


class GreetingRefused(SessionError):
    """The server answered the connection (or EHLO) with 4xx/5xx: try the next MX host."""


@dataclass(frozen=True)
class _Features:
    pipelining: bool
    chunking: bool
    starttls: bool
    smtputf8: bool
    eightbitmime: bool
    size: bool


def _features(lines: list[bytes]) -> _Features:
    words = {line.split(b" ", 1)[0].upper() for line in lines[1:]}
    return _Features(
        pipelining=b"PIPELINING" in words,
        chunking=b"CHUNKING" in words,
        starttls=b"STARTTLS" in words,
        smtputf8=b"SMTPUTF8" in words,
        eightbitmime=b"8BITMIME" in words,
        size=b"SIZE" in words,
    )


class AsyncSession:
    """One open SMTP session to an MX host (see :func:`open_session`)."""

    def __init__(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, host: str, address: str, timeout: float
    ) -> None:
        self.reader = reader
        self.writer = writer
        self.host = host
        self.address = address
        self.timeout = timeout
        self.features = _Features(False, False, False, False, False, False)
        #: "none", "unverified" (opportunistic STARTTLS) or "verified"
        self.tls = "none"
        self.source: str | None = None
        self.transactions = 0
        self.broken = False

    async def _reply(self) -> tuple[int, list[bytes]]:
        lines: list[bytes] = []
        while True:
            try:
                line = await asyncio.wait_for(self.reader.readline(), self.timeout)
            except TimeoutError:
                raise SessionError("timed out waiting for the server") from None
            except (OSError, ValueError, asyncio.LimitOverrunError) as exc:
                raise SessionError(f"connection failed: {exc}") from None
            if not line:
                raise SessionError("the server closed the connection")
            if len(line) > _MAX_LINE or not line[:3].isdigit():
                raise SessionError("the server sent a reply that is not SMTP")
            lines.append(line[4:].rstrip(b"\r\n"))
            if line[3:4] != b"-":
                return int(line[:3]), lines

    async def _command(self, data: bytes) -> tuple[int, list[bytes]]:
        self.writer.write(data)
        return await self._reply()

    async def _ehlo(self, helo: str) -> None:
        code, lines = await self._command(b"EHLO " + helo.encode("idna") + b"\r\n")
        if code == 250:
            self.features = _features(lines)
            return
        if 400 <= code < 500:
            raise GreetingRefused(f"{code} {reply_text(b' '.join(lines))} (to EHLO)", code=code)
        code, lines = await self._command(b"HELO " + helo.encode("idna") + b"\r\n")
        if code != 250:
            raise GreetingRefused(f"{code} {reply_text(b' '.join(lines))} (to HELO)", code=code)
        self.features = _Features(False, False, False, False, False, False)

    async def _starttls(self, context: ssl.SSLContext, helo: str, *, verified: bool) -> None:
        code, lines = await self._command(b"STARTTLS\r\n")
        if code != 220:
            raise SessionError(f"STARTTLS refused: {code} {reply_text(b' '.join(lines))}", code=code)
        try:
            await asyncio.wait_for(
                self.writer.start_tls(context, server_hostname=self.host if verified else None), self.timeout
            )
        except TimeoutError:
            raise SessionError("timed out in the TLS handshake") from None
        except (OSError, ssl.SSLError) as exc:
            raise SessionError(f"TLS handshake failed: {exc}") from None
        self.tls = "verified" if verified else "unverified"
        await self._ehlo(helo)  # RFC 3207: forget what the server said before TLS

    async def transact(self, envelope: Envelope) -> _Result:
        """One transaction: (OK/TEMP/PERM/UNKNOWN, code, reply text). A broken session
        (421, EOF, timeout) has :attr:`broken` set and must be closed."""
        self.transactions += 1
        features = self.features
        params = b""
        if envelope.utf8:
            if not features.smtputf8:
                return PERM, None, "the server does not offer SMTPUTF8, which this message needs"
            params += b" SMTPUTF8"
        if envelope.eightbit and (features.eightbitmime or envelope.utf8):
            params += b" BODY=8BITMIME"
        if features.size:
            params += b" SIZE=%d" % envelope.size
        mail = b"MAIL FROM:<" + envelope.sender + b">" + params + b"\r\n"
        rcpts = [b"RCPT TO:<" + r + b">\r\n" for r in envelope.recipients]
        sent_content = False
        try:
            replies: list[int | tuple[int, list[bytes]]] = []
            if features.pipelining:
                if features.chunking:
                    self.writer.write(mail + b"".join(rcpts) + b"BDAT %d LAST\r\n" % len(envelope.content))
                    self.writer.write(envelope.content)
                    sent_content = True
                    expected = len(rcpts) + 2
                else:
                    self.writer.write(mail + b"".join(rcpts) + b"DATA\r\n")
                    expected = len(rcpts) + 2
                got = []
                for _ in range(expected):
                    reply = await self._reply()
                    got.append(reply)
                    if reply[0] == 421:
                        break
                replies = list(got)
            else:
                got = [await self._command(mail)]
                if got[0][0] == 250:
                    for rcpt in rcpts:
                        got.append(await self._command(rcpt))
                    if any(r[0] in (250, 251) for r in got[1:]):
                        if features.chunking:
                            self.writer.write(b"BDAT %d LAST\r\n" % len(envelope.content) + envelope.content)
                            sent_content = True
                            got.append(await self._reply())
                        else:
                            got.append(await self._command(b"DATA\r\n"))
                replies = list(got)
            return await self._conclude(envelope, replies, len(rcpts), sent_content)  # type: ignore[arg-type]
        except SessionError as exc:
            self.broken = True
            if sent_content:
                return TEMP, None, exc.message + " after the message was sent (it may have been accepted)"
            return TEMP, None, exc.message

    async def _conclude(
        self, envelope: Envelope, replies: list[tuple[int, list[bytes]]], recipients: int, sent_content: bool
    ) -> _Result:
        mail = replies[0]
        if mail[0] == 421 or any(r[0] == 421 for r in replies):
            self.broken = True
            bad = next(r for r in replies if r[0] == 421)
            if sent_content and len(replies) == recipients + 2 and 200 <= replies[-1][0] < 300:
                return OK, replies[-1][0], reply_text(b" ".join(replies[-1][1]))
            return TEMP, 421, reply_text(b" ".join(bad[1]))
        if not 200 <= mail[0] < 300:
            return await self._failed(mail, reset=not sent_content or len(replies) == recipients + 2)
        rcpt_replies = replies[1 : 1 + recipients]
        accepted = [r for r in rcpt_replies if 200 <= r[0] < 300]
        last = replies[1 + recipients] if len(replies) > 1 + recipients else None
        if not accepted:
            refused = next((r for r in rcpt_replies if not 500 <= r[0] < 600), rcpt_replies[0])
            if last is not None and last[0] == 354:
                # DATA was taken although no recipient was (RFC 2920 says it must not be):
                # end an empty message to keep the session in step.
                self.writer.write(b".\r\n")
                await self._reply()
            return await self._failed(refused)
        if sent_content:
            final = last
        else:
            if last is None or last[0] != 354:
                return await self._failed(last or replies[-1])
            self.writer.write(envelope.data_body())
            sent_content = True
            try:
                final = await self._reply()
            except SessionError as exc:
                self.broken = True
                if exc.message.startswith("timed out"):
                    return UNKNOWN, None, "no reply after the end of the message: it may have been accepted"
                return TEMP, None, exc.message + " after the message was sent (it may have been accepted)"
        assert final is not None
        if not 200 <= final[0] < 300:
            return await self._failed(final)
        text = reply_text(b" ".join(final[1]))
        refused_some = [
            (r, rep) for r, rep in zip(envelope.recipients, rcpt_replies, strict=False) if not 200 <= rep[0] < 300
        ]
        if refused_some:
            text += " (refused: " + "; ".join(
                f"{r.decode('utf-8', 'replace')}: {rep[0]} {reply_text(b' '.join(rep[1]))}" for r, rep in refused_some
            )
            text += ")"
        return OK, final[0], text

    async def _failed(self, reply: tuple[int, list[bytes]], *, reset: bool = True) -> _Result:
        code, lines = reply
        text = reply_text(b" ".join(lines))
        if code == 421:
            self.broken = True
        elif reset and not self.broken:
            try:
                if (await self._command(b"RSET\r\n"))[0] != 250:
                    self.broken = True
            except SessionError:
                self.broken = True
        return (PERM if 500 <= code < 600 else TEMP), code, text

    async def close(self) -> None:
        """QUIT (briefly) and close."""
        if not self.broken:
            try:
                self.writer.write(b"QUIT\r\n")
                await asyncio.wait_for(self.reader.readline(), _QUIT_TIMEOUT)
            except (OSError, TimeoutError, ValueError):
                pass
        self.broken = True
        self.writer.close()
        try:
            await asyncio.wait_for(self.writer.wait_closed(), _QUIT_TIMEOUT)
        except (OSError, TimeoutError, ssl.SSLError):
            pass


def _unverified_context() -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


_UNVERIFIED: ssl.SSLContext | None = None


async def open_session(
    host: str,
    address: str,
    port: int,
    *,
    helo: str,
    source: str | None = None,
    timeout: float = 30.0,
    tls: str = "opportunistic",
    verify_context: ssl.SSLContext | None = None,
) -> AsyncSession:
    """Connect to ``address`` (of MX ``host``), read the greeting, EHLO, STARTTLS as ``tls`` says.

    ``tls``: "opportunistic" (STARTTLS when offered, certificate not verified),
    "required" (no STARTTLS: :class:`SessionError`), "verify" (STARTTLS and a certificate
    valid for ``host``, checked with ``verify_context``, default the system's CAs).
    Raises :class:`GreetingRefused` for a 4xx/5xx greeting, :class:`SessionError` otherwise."""
    global _UNVERIFIED
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    try:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(
                address, port, family=family, local_addr=(source, 0) if source else None, limit=_MAX_LINE * 2
            ),
            timeout,
        )
    except TimeoutError:
        raise SessionError(f"cannot connect to {host} [{address}]:{port}: timed out") from None
    except OSError as exc:
        detail = (exc.strerror or str(exc)).lower()
        raise SessionError(f"cannot connect to {host} [{address}]:{port}: {detail}") from None
    session = AsyncSession(reader, writer, host=host, address=address, timeout=timeout)
    session.source = source
    try:
        code, lines = await session._reply()
        if code != 220:
            raise GreetingRefused(f"{code} {reply_text(b' '.join(lines))} (greeting of {host})", code=code)
        await session._ehlo(helo)
        if tls == "verify":
            if not session.features.starttls:
                raise SessionError(f"{host} does not offer STARTTLS, which the domain's MTA-STS policy requires")
            await session._starttls(verify_context or ssl.create_default_context(), helo, verified=True)
        elif session.features.starttls:
            if _UNVERIFIED is None:
                _UNVERIFIED = _unverified_context()
            await session._starttls(_UNVERIFIED, helo, verified=False)
        elif tls == "required":
            raise SessionError(f'{host} does not offer STARTTLS and [direct] tls = "required": not sent in clear')
    except BaseException:
        session.broken = True
        writer.close()
        raise
    return session
