"""The SMTP conversation for ``--debug``: every client and server line, AUTH redacted.

A :class:`Trace` belongs to one connection. It writes ``smtp[N] C: ...`` and
``smtp[N] S: ...`` lines through a writer (stderr, one ``write()`` a line). The
password never gets through: the AUTH command keeps only its mechanism, every client
line of the AUTH exchange (the 334 challenges' answers, where LOGIN sends the
password in base64) is replaced by ``********``, and any line that holds the password
or one of its encodings is scrubbed. A message's content is shown as its size only (after DATA, or as a BDAT chunk).
"""

from __future__ import annotations

import smtplib
import socket
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from _typeshed import ReadableBuffer

__all__ = ["REDACTED", "Trace", "TracedSMTP", "TracedSMTPSSL", "TracedSocket"]

REDACTED = "********"


class Trace:
    """One connection's conversation, written line by line through ``write``."""

    def __init__(self, write: Callable[[str], None], *, number: int, secrets: tuple[str, ...]) -> None:
        self._write = write
        self._prefix = f"smtp[{number}] "
        self._secrets = tuple(secret for secret in secrets if secret)
        self._in_auth = False

    def _emit(self, side: str, text: str) -> None:
        for secret in self._secrets:
            text = text.replace(secret, REDACTED)
        self._write(f"{self._prefix}{side}: {text}\n")

    def note(self, text: str) -> None:
        self._emit("*", text)

    def client(self, data: bytes) -> None:
        """What the client sent: one or more command lines, or a message's content."""
        if data.endswith(b"\r\n.\r\n") and data.count(b"\r\n") > 1 and not self._in_auth:
            self._emit("C", f"(the message: {len(data)} bytes, dot-stuffed, ending with the final '.')")
            return
        for raw in data.split(b"\r\n"):
            if raw:
                self._client_line(raw.decode("utf-8", "replace"))

    def content(self, size: int, how: str) -> None:
        """A message's content went out (shown by its size, never its text)."""
        self._emit("C", f"(the message: {size} bytes, {how})")

    def _client_line(self, line: str) -> None:
        if self._in_auth:
            self._emit("C", REDACTED)
            return
        words = line.split(" ", 2)
        if words[0].upper() == "AUTH":
            self._in_auth = True
            mechanism = words[1] if len(words) > 1 else ""
            self._emit("C", f"AUTH {mechanism} {REDACTED}".replace("  ", " "))
            return
        self._emit("C", line)

    def server(self, line: bytes) -> None:
        """One reply line as read from the relay."""
        text = line.decode("utf-8", "replace").rstrip("\r\n")
        if self._in_auth and not text.startswith("334"):
            self._in_auth = False  # 235 or a refusal: the exchange is over
        self._emit("S", text)

    def reply(self, code: int, message: bytes) -> None:
        """A whole reply as smtplib returns it (lines joined by newlines)."""
        lines = message.split(b"\n") or [b""]
        for index, line in enumerate(lines):
            separator = b" " if index == len(lines) - 1 else b"-"
            self.server(b"%d%s%s" % (code, separator, line))


class _TraceMixin(smtplib.SMTP):
    """smtplib's client with its sends and replies written to a :class:`Trace`."""

    mailer_trace: Trace

    def send(self, s: ReadableBuffer | str) -> None:
        data = s.encode("ascii", "replace") if isinstance(s, str) else bytes(s)
        self.mailer_trace.client(data)
        super().send(s)

    def getreply(self) -> tuple[int, bytes]:
        code, message = super().getreply()
        self.mailer_trace.reply(code, message)
        return code, message


class TracedSMTP(_TraceMixin, smtplib.SMTP):
    """:class:`smtplib.SMTP`, traced."""


class TracedSMTPSSL(_TraceMixin, smtplib.SMTP_SSL):
    """:class:`smtplib.SMTP_SSL`, traced."""


class TracedSocket:
    """The socket of a traced transaction: what is sent goes to the trace first."""

    def __init__(self, sock: socket.socket, trace: Trace) -> None:
        self._sock = sock
        self._trace = trace

    def sendall(self, data: bytes) -> None:
        self._trace.client(data)
        self._sock.sendall(data)

    def settimeout(self, value: float | None) -> None:
        self._sock.settimeout(value)

    def traced_readline(self, readline: Callable[[int], bytes]) -> Callable[[int], bytes]:
        trace = self._trace

        def read(limit: int) -> bytes:
            line = readline(limit)
            if line:
                trace.server(line)
            return line

        return read
