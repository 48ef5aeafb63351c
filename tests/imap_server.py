"""A small IMAP4rev1 server on loopback for the tests of the IMAP bounce source.

It speaks enough of RFC 3501 for imapclient, unmodified, to log in, select a mailbox,
search, fetch, flag, copy, move (RFC 6851) and expunge (UIDPLUS' UID EXPUNGE too,
RFC 4315), over plain TCP, STARTTLS or implicit TLS with the test certificate. One
thread per connection; mailboxes live in memory and are shared by all connections.

Fault injection, as options: ``bad_login`` (every LOGIN refused), ``drop_after``
(close the connection once that many message bodies went out in this server's life,
``drop_times`` times), ``move`` / ``uidplus`` (offer the capability or not),
``starttls`` (offer STARTTLS), ``implicit_tls`` (TLS from the first byte).
Every command line is recorded in ``commands`` (tag removed) so a test can see what
the client sent: the batch sizes of its fetches, a MOVE or its fallback.
"""

from __future__ import annotations

import datetime as dt
import re
import socket
import ssl
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["IMAPTestServer", "StoredMessage"]

_MONTHS = ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"]


@dataclass
class StoredMessage:
    uid: int
    raw: bytes
    flags: set[str] = field(default_factory=set)
    internal_date: dt.datetime = field(default_factory=lambda: dt.datetime.now(dt.UTC))


@dataclass
class Mailbox:
    uid_validity: int
    uid_next: int = 1
    messages: list[StoredMessage] = field(default_factory=list)


class _Dropped(Exception):
    """The fault injection closes this connection now."""


class IMAPTestServer:
    """Listens on 127.0.0.1, port 0; ``port`` tells which. ``stop()`` ends it."""

    def __init__(
        self,
        *,
        username: str = "bounces@acme.example",
        password: str = "secret",
        bad_login: bool = False,
        drop_after: int | None = None,
        drop_times: int = 1,
        move: bool = True,
        uidplus: bool = True,
        starttls: bool = False,
        implicit_tls: bool = False,
        tls_files: Any = None,
        host: str = "127.0.0.1",
    ) -> None:
        self.username = username
        self.password = password
        self.bad_login = bad_login
        self.drop_after = drop_after
        self.drop_times = drop_times
        self.move = move
        self.uidplus = uidplus
        self.starttls = starttls
        self.implicit_tls = implicit_tls
        self.mailboxes: dict[str, Mailbox] = {}
        self.commands: list[str] = []
        self.logins: list[tuple[str, str]] = []
        self.bodies_sent = 0
        self.lock = threading.RLock()
        self._context: ssl.SSLContext | None = None
        if starttls or implicit_tls:
            self._context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            self._context.load_cert_chain(Path(tls_files.cert), Path(tls_files.key))
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind((host, 0))
        self._listener.listen(16)
        self.host = host
        self.port: int = self._listener.getsockname()[1]
        self._connections: list[socket.socket] = []
        self._stopped = False
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()
        self.create_mailbox("INBOX")

    # ---------------------------------------------------------------- mailbox content

    def create_mailbox(self, name: str, *, uid_validity: int | None = None) -> Mailbox:
        with self.lock:
            if name not in self.mailboxes:
                validity = uid_validity if uid_validity is not None else 3_000_000 + len(self.mailboxes)
                self.mailboxes[name] = Mailbox(uid_validity=validity)
            return self.mailboxes[name]

    def add_message(
        self,
        raw: bytes,
        *,
        mailbox: str = "INBOX",
        flags: tuple[str, ...] = (),
        internal_date: dt.datetime | None = None,
    ) -> int:
        """Append a message; returns its UID."""
        with self.lock:
            box = self.create_mailbox(mailbox)
            uid = box.uid_next
            box.uid_next += 1
            message = StoredMessage(uid=uid, raw=raw, flags=set(flags))
            if internal_date is not None:
                message.internal_date = internal_date
            box.messages.append(message)
            return uid

    def messages(self, mailbox: str = "INBOX") -> list[StoredMessage]:
        with self.lock:
            return list(self.mailboxes[mailbox].messages)

    # ---------------------------------------------------------------- life cycle

    def stop(self) -> None:
        self._stopped = True
        try:
            self._listener.close()
        except OSError:
            pass
        with self.lock:
            for connection in self._connections:
                try:
                    connection.close()
                except OSError:
                    pass

    def _accept(self) -> None:
        while not self._stopped:
            try:
                connection, _ = self._listener.accept()
            except OSError:
                return
            with self.lock:
                self._connections.append(connection)
            threading.Thread(target=self._serve, args=(connection,), daemon=True).start()

    def _serve(self, connection: socket.socket) -> None:
        connection.settimeout(60)
        # Replies go out line by line: without this, Nagle holds the tagged line until the
        # client ACKs the previous one, which it delays (40 ms a command on Linux).
        connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            if self.implicit_tls:
                assert self._context is not None
                connection = self._context.wrap_socket(connection, server_side=True)
                with self.lock:
                    self._connections.append(connection)
            _Session(self, connection).run()
        except (OSError, ssl.SSLError, _Dropped, ValueError):
            pass
        finally:
            try:
                connection.close()
            except OSError:
                pass

    def capabilities(self, *, tls_active: bool) -> list[str]:
        names = ["IMAP4rev1"]
        if self.starttls and not tls_active:
            names.append("STARTTLS")
        if self.move:
            names.append("MOVE")
        if self.uidplus:
            names.append("UIDPLUS")
        return names


# ---------------------------------------------------------------- the protocol


def _quote(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _flags_text(flags: set[str]) -> str:
    return "(" + " ".join(sorted(flags)) + ")"


def _parse_set(text: str, largest: int) -> set[int]:
    """An IMAP sequence set ("1:4,7,9:*") -> the numbers it names (up to ``largest``)."""
    numbers: set[int] = set()
    for part in text.split(","):
        if ":" in part:
            low_text, high_text = part.split(":", 1)
            low = largest if low_text == "*" else int(low_text)
            high = largest if high_text == "*" else int(high_text)
            low, high = min(low, high), max(low, high)
            numbers.update(range(low, min(high, max(largest, low)) + 1))
        else:
            numbers.add(largest if part == "*" else int(part))
    return numbers


def _parse_date(text: str) -> dt.date:
    day, month, year = text.split("-")
    return dt.date(int(year), _MONTHS.index(month.capitalize()) + 1, int(day))


class _Session:
    def __init__(self, server: IMAPTestServer, connection: socket.socket) -> None:
        self.server = server
        self.connection = connection
        self.reader = connection.makefile("rb")
        self.tls_active = server.implicit_tls
        self.user: str | None = None
        self.selected: str | None = None
        self.read_only = False

    # ------------------------------------------------------------ wire

    def send(self, text: str | bytes) -> None:
        data = text if isinstance(text, bytes) else text.encode("utf-8")
        self.connection.sendall(data)

    def line(self, text: str) -> None:
        self.send(text + "\r\n")

    def read_command(self) -> list[Any] | None:
        """One command as tokens: str atoms/strings, bytes literals, lists for (...)."""
        segments: list[bytes] = []
        literals: list[bytes] = []
        while True:
            raw = self.reader.readline(65536)
            if not raw:
                return None
            text = raw.rstrip(b"\r\n")
            match = re.search(rb"\{(\d+)(\+?)\}$", text)
            if not match:
                segments.append(text)
                break
            segments.append(text[: match.start()])
            if not match.group(2):
                self.line("+ Ready for literal data")
            literals.append(self.reader.read(int(match.group(1))))
        with self.server.lock:
            self.server.commands.append(b"<literal>".join(segments).decode("utf-8", "replace").split(" ", 1)[-1])
        return _tokenize(segments, literals)

    # ------------------------------------------------------------ loop

    def run(self) -> None:
        self.line("* OK [CAPABILITY " + " ".join(self.server.capabilities(tls_active=self.tls_active)) + "] ready")
        while True:
            tokens = self.read_command()
            if tokens is None:
                return
            if len(tokens) < 2 or not isinstance(tokens[0], str) or not isinstance(tokens[1], str):
                self.line("* BAD command not understood")
                continue
            tag, name, arguments = tokens[0], tokens[1].upper(), tokens[2:]
            uid = False
            if name == "UID" and arguments and isinstance(arguments[0], str):
                uid, name, arguments = True, arguments[0].upper(), arguments[1:]
            handler = getattr(self, "do_" + name.lower(), None)
            if handler is None:
                self.line(f"{tag} BAD unknown command {name}")
                continue
            try:
                if handler(tag, arguments, uid=uid) == "logout":
                    return
            except _Dropped:
                raise
            except (ValueError, IndexError, KeyError, TypeError) as exc:
                self.line(f"{tag} BAD {name}: {exc}")

    # ------------------------------------------------------------ any state

    def do_capability(self, tag: str, arguments: list[Any], *, uid: bool) -> None:
        self.line("* CAPABILITY " + " ".join(self.server.capabilities(tls_active=self.tls_active)))
        self.line(f"{tag} OK CAPABILITY completed")

    def do_noop(self, tag: str, arguments: list[Any], *, uid: bool) -> None:
        self.line(f"{tag} OK NOOP completed")

    def do_logout(self, tag: str, arguments: list[Any], *, uid: bool) -> str:
        self.line("* BYE logging out")
        self.line(f"{tag} OK LOGOUT completed")
        return "logout"

    def do_starttls(self, tag: str, arguments: list[Any], *, uid: bool) -> None:
        if not self.server.starttls or self.tls_active:
            self.line(f"{tag} BAD STARTTLS not available")
            return
        self.line(f"{tag} OK Begin TLS negotiation now")
        assert self.server._context is not None
        self.connection = self.server._context.wrap_socket(self.connection, server_side=True)
        with self.server.lock:
            self.server._connections.append(self.connection)
        self.reader = self.connection.makefile("rb")
        self.tls_active = True

    def do_login(self, tag: str, arguments: list[Any], *, uid: bool) -> None:
        user, password = (_text(value) for value in arguments[:2])
        with self.server.lock:
            self.server.logins.append((user, password))
        good = user == self.server.username and password == self.server.password
        if self.server.bad_login or not good:
            self.line(f"{tag} NO [AUTHENTICATIONFAILED] Authentication failed.")
            return
        self.user = user
        self.line(f"{tag} OK LOGIN completed")

    # ------------------------------------------------------------ authenticated

    def _need_auth(self, tag: str) -> bool:
        if self.user is None:
            self.line(f"{tag} BAD log in first")
            return False
        return True

    def do_list(self, tag: str, arguments: list[Any], *, uid: bool) -> None:
        if not self._need_auth(tag):
            return
        pattern = _text(arguments[1])
        expression = re.compile("^" + re.escape(pattern).replace(r"\*", ".*").replace("%", "[^/]*") + "$")
        with self.server.lock:
            names = [name for name in self.server.mailboxes if expression.match(name)]
        for name in names:
            self.line(f'* LIST () "/" {_quote(name)}')
        self.line(f"{tag} OK LIST completed")

    def do_select(self, tag: str, arguments: list[Any], *, uid: bool, read_only: bool = False) -> None:
        if not self._need_auth(tag):
            return
        name = _text(arguments[0])
        if name.upper() == "INBOX":
            name = "INBOX"
        with self.server.lock:
            box = self.server.mailboxes.get(name)
            if box is None:
                self.selected = None
                self.line(f"{tag} NO [NONEXISTENT] Mailbox doesn't exist: {name}")
                return
            self.line(r"* FLAGS (\Answered \Flagged \Deleted \Seen \Draft)")
            self.line(f"* {len(box.messages)} EXISTS")
            self.line("* 0 RECENT")
            self.line(f"* OK [UIDVALIDITY {box.uid_validity}] UIDs valid")
            self.line(f"* OK [UIDNEXT {box.uid_next}] Predicted next UID")
            self.line(r"* OK [PERMANENTFLAGS (\Answered \Flagged \Deleted \Seen \Draft)] Limited")
        self.selected = name
        self.read_only = read_only
        mode = "READ-ONLY" if read_only else "READ-WRITE"
        self.line(f"{tag} OK [{mode}] {'EXAMINE' if read_only else 'SELECT'} completed")

    def do_examine(self, tag: str, arguments: list[Any], *, uid: bool) -> None:
        self.do_select(tag, arguments, uid=uid, read_only=True)

    def _box(self, tag: str) -> Mailbox | None:
        if not self._need_auth(tag):
            return None
        if self.selected is None:
            self.line(f"{tag} BAD no mailbox selected")
            return None
        return self.server.mailboxes[self.selected]

    def _targets(self, box: Mailbox, text: str, *, uid: bool) -> list[tuple[int, StoredMessage]]:
        """(sequence number, message) pairs named by a set of UIDs or sequence numbers."""
        if uid:
            largest = box.messages[-1].uid if box.messages else 0
            wanted = _parse_set(text, largest)
            return [(number, m) for number, m in enumerate(box.messages, 1) if m.uid in wanted]
        wanted = _parse_set(text, len(box.messages))
        return [(number, m) for number, m in enumerate(box.messages, 1) if number in wanted]

    def do_search(self, tag: str, arguments: list[Any], *, uid: bool) -> None:
        with self.server.lock:
            box = self._box(tag)
            if box is None:
                return
            keys = [str(value) if not isinstance(value, bytes) else value.decode() for value in arguments]
            found: list[str] = []
            for number, message in enumerate(box.messages, 1):
                if _matches(message, keys):
                    found.append(str(message.uid if uid else number))
        self.line("* SEARCH" + "".join(" " + value for value in found))
        self.line(f"{tag} OK SEARCH completed")

    def do_fetch(self, tag: str, arguments: list[Any], *, uid: bool) -> None:
        with self.server.lock:
            box = self._box(tag)
            if box is None:
                return
            items = arguments[1] if isinstance(arguments[1], list) else arguments[1:]
            names = [str(item).upper() for item in items]
            targets = self._targets(box, _text(arguments[0]), uid=uid)
        for number, message in targets:
            parts = [f"UID {message.uid}"]
            body: bytes | None = None
            section = "BODY[]"
            for name in names:
                if name == "FLAGS":
                    parts.append("FLAGS " + _flags_text(message.flags))
                elif name == "RFC822.SIZE":
                    parts.append(f"RFC822.SIZE {len(message.raw)}")
                elif name == "INTERNALDATE":
                    stamp = message.internal_date
                    parts.append(f'INTERNALDATE "{stamp.day:02d}-{_MONTHS[stamp.month - 1]}-{stamp:%Y %H:%M:%S} +0000"')
                elif name in ("BODY.PEEK[]", "BODY[]", "RFC822") or name.startswith("BODY.PEEK[]<"):
                    body = message.raw
                    section = "BODY[]"
                    partial = re.fullmatch(r"BODY\.PEEK\[\]<(\d+)\.(\d+)>", name)
                    if partial:
                        offset, length = int(partial.group(1)), int(partial.group(2))
                        body = body[offset : offset + length]
                        section = f"BODY[]<{offset}>"
                    if name != "BODY.PEEK[]" and not self.read_only:
                        message.flags.add(r"\Seen")
                elif name != "UID":
                    raise ValueError(f"fetch item {name} not supported")
            if body is not None:
                with self.server.lock:
                    drop = self.server.drop_after is not None and self.server.drop_times > 0
                    if drop and self.server.bodies_sent >= self.server.drop_after:
                        self.server.drop_times -= 1
                        self.server.bodies_sent = 0
                        self.send(
                            f"* {number} FETCH ({' '.join(parts)} {section} {{{len(body)}}}\r\n".encode() + body[:10]
                        )
                        raise _Dropped
                    self.server.bodies_sent += 1
                self.send(
                    f"* {number} FETCH ({' '.join(parts)} {section} {{{len(body)}}}\r\n".encode() + body + b")\r\n"
                )
            else:
                self.line(f"* {number} FETCH ({' '.join(parts)})")
        self.line(f"{tag} OK FETCH completed")

    def do_store(self, tag: str, arguments: list[Any], *, uid: bool) -> None:
        with self.server.lock:
            box = self._box(tag)
            if box is None:
                return
            if self.read_only:
                self.line(f"{tag} NO mailbox is read-only")
                return
            mode = str(arguments[1]).upper()
            flags = {str(flag) for flag in (arguments[2] if isinstance(arguments[2], list) else arguments[2:])}
            targets = self._targets(box, _text(arguments[0]), uid=uid)
            lines = []
            for number, message in targets:
                if mode.startswith("+"):
                    message.flags |= flags
                elif mode.startswith("-"):
                    message.flags -= flags
                else:
                    message.flags = set(flags)
                lines.append(f"* {number} FETCH (UID {message.uid} FLAGS {_flags_text(message.flags)})")
        if not mode.endswith(".SILENT"):
            for text in lines:
                self.line(text)
        self.line(f"{tag} OK STORE completed")

    def do_copy(self, tag: str, arguments: list[Any], *, uid: bool, move: bool = False) -> None:
        with self.server.lock:
            box = self._box(tag)
            if box is None:
                return
            destination = _text(arguments[1])
            target_box = self.server.mailboxes.get(destination)
            if target_box is None:
                self.line(f"{tag} NO [TRYCREATE] no mailbox {destination}")
                return
            if move and self.read_only:
                self.line(f"{tag} NO mailbox is read-only")
                return
            targets = self._targets(box, _text(arguments[0]), uid=uid)
            for _, message in targets:
                copied = StoredMessage(
                    uid=target_box.uid_next,
                    raw=message.raw,
                    flags=set(message.flags) - ({r"\Deleted"} if move else set()),
                    internal_date=message.internal_date,
                )
                target_box.uid_next += 1
                target_box.messages.append(copied)
            gone = [message for _, message in targets] if move else []
            expunged = self._remove(box, gone)
        for number in expunged:
            self.line(f"* {number} EXPUNGE")
        self.line(f"{tag} OK {'MOVE' if move else 'COPY'} completed")

    def do_move(self, tag: str, arguments: list[Any], *, uid: bool) -> None:
        if not self.server.move:
            self.line(f"{tag} BAD unknown command MOVE")
            return
        self.do_copy(tag, arguments, uid=uid, move=True)

    def do_expunge(self, tag: str, arguments: list[Any], *, uid: bool) -> None:
        with self.server.lock:
            box = self._box(tag)
            if box is None:
                return
            if self.read_only:
                self.line(f"{tag} NO mailbox is read-only")
                return
            if uid and not self.server.uidplus:
                self.line(f"{tag} BAD UID EXPUNGE needs UIDPLUS")
                return
            candidates = self._targets(box, _text(arguments[0]), uid=True) if uid else list(enumerate(box.messages, 1))
            gone = [message for _, message in candidates if r"\Deleted" in message.flags]
            expunged = self._remove(box, gone)
        for number in expunged:
            self.line(f"* {number} EXPUNGE")
        self.line(f"{tag} OK EXPUNGE completed")

    def do_close(self, tag: str, arguments: list[Any], *, uid: bool) -> None:
        self.selected = None
        self.line(f"{tag} OK CLOSE completed")

    @staticmethod
    def _remove(box: Mailbox, gone: list[StoredMessage]) -> list[int]:
        """Remove messages; the EXPUNGE sequence numbers in the order the client must apply them."""
        numbers = []
        for message in gone:
            number = box.messages.index(message) + 1
            box.messages.pop(number - 1)
            numbers.append(number)
        return numbers


def _text(value: Any) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def _matches(message: StoredMessage, keys: list[str]) -> bool:
    position = 0
    while position < len(keys):
        key = keys[position].upper()
        position += 1
        if key == "ALL":
            continue
        if key == "UNSEEN":
            if r"\Seen" in message.flags:
                return False
        elif key == "SEEN":
            if r"\Seen" not in message.flags:
                return False
        elif key == "UNDELETED":
            if r"\Deleted" in message.flags:
                return False
        elif key == "SINCE":
            if message.internal_date.date() < _parse_date(keys[position]):
                return False
            position += 1
        elif key == "BEFORE":
            if message.internal_date.date() >= _parse_date(keys[position]):
                return False
            position += 1
        else:
            raise ValueError(f"search key {key} not supported")
    return True


_TOKEN = re.compile(rb'\s*(?:(\()|(\))|"((?:[^"\\]|\\.)*)"|([^\s()"]+(?:\[[^\]]*\](?:<[^>]*>)?)?))')


def _tokenize(segments: list[bytes], literals: list[bytes]) -> list[Any]:
    """Tokens of a command whose text is ``segments`` with ``literals`` between them."""
    root: list[Any] = []
    stack = [root]
    for index, segment in enumerate(segments):
        position = 0
        while position < len(segment):
            match = _TOKEN.match(segment, position)
            if match is None or match.end() == position:
                if segment[position:].strip():
                    raise ValueError("cannot parse the command")
                break
            position = match.end()
            if match.group(1):
                child: list[Any] = []
                stack[-1].append(child)
                stack.append(child)
            elif match.group(2):
                stack.pop()
            elif match.group(3) is not None:
                stack[-1].append(re.sub(rb"\\(.)", rb"\1", match.group(3)).decode("utf-8"))
            else:
                stack[-1].append(match.group(4).decode("utf-8"))
        if index < len(literals):
            stack[-1].append(literals[index])
    return root
