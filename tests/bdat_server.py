"""A small SMTP server with CHUNKING (RFC 3030, BDAT) for the tests and the benchmark.

aiosmtpd does not offer BDAT, so this one speaks just enough ESMTP to receive mail:
EHLO/HELO, MAIL, RCPT, DATA, BDAT, RSET, NOOP, QUIT, with PIPELINING, CHUNKING,
8BITMIME, SMTPUTF8 and SIZE each offered or not. It runs its own asyncio loop in a
thread on 127.0.0.1 and a free port, and records every accepted message.

Like a real pipelining server (Postfix's smtpd does the same), it holds its replies
back while the client's input is still coming in and writes them as one group when it
has read all there is (never in the middle of a BDAT chunk or a command line). Each
such group is one round trip for the client; :attr:`Received.round_trips` counts them
for a message, from its MAIL to its final reply. ``delay`` waits that long before
writing each group, as a network round trip would (the benchmark's delayed relay).

Faults (:meth:`BDATServer.set_fault`) replace a reply, drop the connection instead of
answering, or drop it in the middle of a BDAT chunk, per stage ("mail", "rcpt",
"data": the reply to the end of the message, DATA's or BDAT LAST's; "chunk": as a
BDAT command arrives, before its chunk is read) and optionally per address, the first N times, or on reused
connections only. :meth:`BDATServer.close_connections_after` hangs up after N
messages, as a relay's idle timeout does.
"""

from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass, field

__all__ = ["BDATServer", "Received", "ServerFault"]


@dataclass
class Received:
    """One message the server accepted."""

    connection: int
    mail_from: str
    rcpt_tos: list[str]
    data: bytes
    mail_options: list[str]
    command: str  # "BDAT" or "DATA": how the content came
    chunks: int  # BDAT commands that carried it (0 for DATA)
    round_trips: int = 0  # reply groups written from its MAIL to its final reply
    mark: int = 0


@dataclass
class ServerFault:
    """How the server misbehaves at one stage (see the module docstring)."""

    stage: str
    reply: str | None = None
    drop: bool = False
    silent: bool = False  # never answer (the client times out)
    address: str = "*"
    times: int | None = None
    reused_only: bool = False
    hits: int = 0


class _Drop(Exception):
    """Close the connection now, answering nothing more."""


class _Silent(Exception):
    """Answer nothing more, and keep the connection open until the client closes it."""


@dataclass
class _Session:
    number: int
    messages: int = 0
    flushes: int = 0
    mail_from: str | None = None
    mail_options: list[str] = field(default_factory=list)
    rcpt_tos: list[str] = field(default_factory=list)
    chunks: list[bytes] = field(default_factory=list)
    mark: int = 0
    pending: list[Received] = field(default_factory=list)

    def reset(self) -> None:
        self.mail_from = None
        self.mail_options = []
        self.rcpt_tos = []
        self.chunks = []


class BDATServer:
    """An SMTP server on 127.0.0.1 offering CHUNKING (switch it off to test the DATA fallback)."""

    def __init__(
        self,
        *,
        chunking: bool = True,
        pipelining: bool = True,
        eightbitmime: bool = True,
        smtputf8: bool = True,
        size: int | None = 50_000_000,
        delay: float = 0.0,
        record: bool = True,
    ) -> None:
        self.chunking, self.pipelining, self.eightbitmime, self.smtputf8 = chunking, pipelining, eightbitmime, smtputf8
        self.size = size
        self.delay = delay
        self.record = record  # False: count messages only (the benchmark)
        self.lock = threading.Lock()
        self.messages: list[Received] = []
        self.accepted = 0
        self.commands: list[tuple[int, str]] = []  # (connection, command line) as received
        self.faults: list[ServerFault] = []
        self.connections = 0
        self.quits = 0
        self.close_after: int | None = None
        self.close_notice: str | None = None
        self.host = "127.0.0.1"
        self._loop = asyncio.new_event_loop()
        self._started = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bdat-server", daemon=True)
        self._thread.start()
        self._started.wait(10)
        self.port: int = self._port

    # -- set-up

    def set_fault(self, stage: str, reply: str | None = None, **options: object) -> ServerFault:
        if stage not in ("mail", "rcpt", "data", "chunk"):
            raise ValueError(stage)
        fault = ServerFault(stage=stage, reply=reply, **options)  # type: ignore[arg-type]
        with self.lock:
            self.faults.append(fault)
        return fault

    def close_connections_after(self, count: int, *, notice: str | None = None) -> None:
        self.close_after, self.close_notice = count, notice

    def received_by(self, address: str) -> list[Received]:
        with self.lock:
            return [m for m in self.messages if address in m.rcpt_tos]

    def stop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    # -- the loop

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        server = self._loop.run_until_complete(asyncio.start_server(self._serve, self.host, 0, limit=1 << 20))
        self._port = server.sockets[0].getsockname()[1]
        self._started.set()
        try:
            self._loop.run_forever()
        finally:
            server.close()
            for task in asyncio.all_tasks(self._loop):
                task.cancel()
            self._loop.run_until_complete(asyncio.sleep(0))
            self._loop.close()

    def _fault(self, session: _Session, stage: str, address: str) -> ServerFault | None:
        with self.lock:
            for fault in self.faults:
                if fault.stage != stage or fault.address not in ("*", address):
                    continue
                if fault.reused_only and not session.messages:
                    continue
                if fault.times is not None and fault.hits >= fault.times:
                    continue
                fault.hits += 1
                return fault
        return None

    def _answer(self, session: _Session, stage: str, address: str, normal: str) -> str:
        fault = self._fault(session, stage, address)
        if fault is None:
            return normal
        if fault.drop:
            raise _Drop
        if fault.silent:
            raise _Silent
        return fault.reply or normal

    def _ehlo_lines(self) -> list[str]:
        lines = ["mailer-test-bdat"]
        for offered, name in (
            (self.pipelining, "PIPELINING"),
            (self.chunking, "CHUNKING"),
            (self.eightbitmime, "8BITMIME"),
            (self.smtputf8, "SMTPUTF8"),
            (self.size is not None, f"SIZE {self.size}"),
        ):
            if offered:
                lines.append(name)
        return [f"250{'-' if i < len(lines) - 1 else ' '}{line}" for i, line in enumerate(lines)]

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with self.lock:
            self.connections += 1
            session = _Session(self.connections)
        out: list[str] = ["220 mailer-test-bdat ESMTP"]
        buffer = bytearray()
        in_data = False
        chunk_checked = False
        try:
            while True:
                need_more = False
                hang_up = False
                while not need_more and not hang_up:
                    if in_data:
                        end = buffer.find(b"\r\n.\r\n")
                        if buffer.startswith(b".\r\n"):
                            content, consumed = b"", 3
                        elif end >= 0:
                            content, consumed = bytes(buffer[: end + 2]), end + 5
                        else:
                            need_more = True
                            continue
                        del buffer[:consumed]
                        in_data = False
                        content = content.replace(b"\r\n..", b"\r\n.")
                        if content.startswith(b".."):
                            content = content[1:]
                        hang_up = self._finish(session, out, content, "DATA")
                        continue
                    eol = buffer.find(b"\r\n")
                    if eol < 0:
                        need_more = True
                        continue
                    line = bytes(buffer[:eol]).decode("utf-8", "replace")
                    verb = line.split(" ", 1)[0].upper()
                    if verb == "BDAT":
                        words = line.split()
                        try:
                            size = int(words[1])
                            last = len(words) > 2 and words[2].upper() == "LAST"
                        except (IndexError, ValueError):
                            del buffer[: eol + 2]
                            out.append("501 5.5.4 Syntax: BDAT size [LAST]")
                            continue
                        if not chunk_checked and session.rcpt_tos:
                            chunk_checked = True  # a "chunk" fault drops before the chunk is read
                            self._answer(session, "chunk", session.rcpt_tos[0], "")
                        if len(buffer) - eol - 2 < size:
                            need_more = True  # inside the chunk: no reply before it is all here
                            continue
                        chunk_checked = False
                        chunk = bytes(buffer[eol + 2 : eol + 2 + size])
                        del buffer[: eol + 2 + size]
                        with self.lock:
                            self.commands.append((session.number, line))
                        hang_up = self._bdat(session, out, chunk, last)
                        continue
                    del buffer[: eol + 2]
                    with self.lock:
                        self.commands.append((session.number, line))
                    result = self._command(session, out, line, verb)
                    if result == "data":
                        in_data = True
                        await self._flush(session, writer, out)  # the client waits for 354
                    elif result == "quit":
                        hang_up = True
                if out and not buffer:
                    await self._flush(session, writer, out)
                if hang_up:
                    if out:
                        await self._flush(session, writer, out)
                    break
                data = await reader.read(1 << 16)
                if not data:
                    break
                buffer += data
        except _Silent:
            try:
                while await reader.read(1 << 16):
                    pass
            except ConnectionError:
                pass
        except (_Drop, ConnectionError):
            pass
        finally:
            writer.close()

    async def _flush(self, session: _Session, writer: asyncio.StreamWriter, out: list[str]) -> None:
        if self.delay:
            await asyncio.sleep(self.delay)
        writer.write("".join(line + "\r\n" for line in out).encode())
        out.clear()
        await writer.drain()
        session.flushes += 1
        for message in session.pending:
            message.round_trips = session.flushes - message.mark
        session.pending.clear()

    def _command(self, session: _Session, out: list[str], line: str, verb: str) -> str | None:
        argument = line[len(verb) :].strip()
        if verb == "EHLO":
            session.reset()
            out.extend(self._ehlo_lines())
        elif verb == "HELO":
            session.reset()
            out.append("250 mailer-test-bdat")
        elif verb == "MAIL":
            if session.mail_from is not None:
                out.append("503 5.5.1 Error: nested MAIL command")
                return None
            address, options = _path(argument, "FROM:")
            session.mark = session.flushes
            reply = self._answer(session, "mail", address, "250 2.1.0 Ok")
            if reply.startswith("2"):
                session.mail_from, session.mail_options = address, options
            out.append(reply)
        elif verb == "RCPT":
            if session.mail_from is None:
                out.append("503 5.5.1 Error: need MAIL command")
                return None
            address, _options = _path(argument, "TO:")
            reply = self._answer(session, "rcpt", address, "250 2.1.5 Ok")
            if reply.startswith("2"):
                session.rcpt_tos.append(address)
            out.append(reply)
        elif verb == "DATA":
            if session.mail_from is None or not session.rcpt_tos:
                out.append("554 5.5.1 Error: no valid recipients" if session.mail_from else "503 5.5.1 need MAIL")
                return None
            out.append("354 End data with <CR><LF>.<CR><LF>")
            return "data"
        elif verb == "RSET":
            session.reset()
            out.append("250 2.0.0 Ok")
        elif verb == "NOOP":
            out.append("250 2.0.0 Ok")
        elif verb == "QUIT":
            with self.lock:
                self.quits += 1
            out.append("221 2.0.0 Bye")
            return "quit"
        else:
            out.append("502 5.5.2 Error: command not recognized")
        return None

    def _bdat(self, session: _Session, out: list[str], chunk: bytes, last: bool) -> bool:
        if not self.chunking:
            out.append("502 5.5.2 Error: command not recognized")
            return False
        # RFC 3030 section 2: a chunk after a failed MAIL or RCPT is read and discarded,
        # and the BDAT answered with an error.
        if session.mail_from is None:
            out.append("503 5.5.1 Error: need MAIL command")
            return False
        if not session.rcpt_tos:
            out.append("554 5.5.1 Error: no valid recipients")
            session.reset()
            return False
        session.chunks.append(chunk)
        if not last:
            out.append(f"250 2.0.0 {len(chunk)} octets received")
            return False
        return self._finish(session, out, b"".join(session.chunks), "BDAT")

    def _finish(self, session: _Session, out: list[str], content: bytes, command: str) -> bool:
        """The end of a message: record it and answer (or a fault). True: hang up now."""
        reply = self._answer(session, "data", session.rcpt_tos[0], "250 2.0.0 Ok: queued")
        if reply.startswith("2"):
            message = Received(
                connection=session.number,
                mail_from=session.mail_from or "",
                rcpt_tos=list(session.rcpt_tos),
                data=content,
                mail_options=list(session.mail_options),
                command=command,
                chunks=len(session.chunks),
                mark=session.mark,
            )
            session.messages += 1
            with self.lock:
                self.accepted += 1
                if self.record:
                    self.messages.append(message)
                    session.pending.append(message)
        session.reset()
        out.append(reply)
        if reply.startswith("2") and self.close_after is not None and session.messages >= self.close_after:
            if self.close_notice:
                out.append(self.close_notice)
            return True
        return False


def _path(argument: str, prefix: str) -> tuple[str, list[str]]:
    """("address", [options]) from "FROM:<a@b> SIZE=10" (prefix "FROM:")."""
    rest = argument[len(prefix) :] if argument.upper().startswith(prefix) else argument
    rest = rest.strip()
    if rest.startswith("<"):
        end = rest.find(">")
        return rest[1:end], rest[end + 1 :].split()
    words = rest.split()
    return (words[0] if words else ""), words[1:]
