"""Mailbox sources of ``mailer bounces``: mbox files, Maildir folders, IMAP mailboxes.

Every source has the same face (:class:`BounceSource`): iterating it yields
:class:`SourceMessage` records — a ``ref`` that names the message in its mailbox
stably across runs, and its raw bytes — one at a time, so a 100,000-message mbox is
read with flat memory; :meth:`~BounceSource.mark_processed` is told which refs were
recorded, and moves or flags them as the options say; :meth:`~BounceSource.close`
lets go of files or connections.

What "processed" does, by source (``--mark-seen`` / ``--move-to FOLDER``):

- **mbox**: nothing, ever. An mbox is appended to by the delivery agent while we
  read it; rewriting it in place could lose a message arriving meanwhile. Options
  that would change it are refused (exit 2). Re-reading is harmless: recording is
  idempotent (the report's own Message-ID, or a hash of its bytes, is the event's ref).
- **Maildir**: without options nothing changes. ``--mark-seen`` moves the message
  from ``new/`` to ``cur/`` with the ``S`` (seen) flag added, as a mail client
  does. ``--move-to NAME`` moves it into the Maildir++ subfolder ``.NAME`` of the
  same Maildir (created if missing) with ``S`` set. Both are one ``rename()``: atomic,
  and a message another client moved meanwhile is skipped.
- **IMAP** (``mailer/bounces/imap.py``): ``--mark-seen`` sets ``\\Seen``,
  ``--move-to`` moves to that mailbox; messages are fetched without setting ``\\Seen``.

Only messages that were recognised as reports are marked; foreign mail (a human's
reply, spam) and broken messages stay where they are for a person to look at.

``--since DATE`` selects by delivery time, the same notion in every source: the
``From `` line's date in an mbox, the file's modification time in a Maildir (when
the delivery agent wrote it), the INTERNALDATE (``SEARCH SINCE``) over IMAP. A
message whose time cannot be read is kept (reading too much is harmless, losing a
bounce is not).

Messages are read bounded: at most :data:`MAX_MESSAGE_BYTES` of one message are kept
(the report parts come first; a huge returned original is cut), the rest is skipped
without being held, and ``truncated`` says so.
"""

from __future__ import annotations

import calendar
import os
import re
import stat
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime
from pathlib import Path
from typing import BinaryIO, Protocol, runtime_checkable

from ..core.errors import UsageError

__all__ = [
    "MAX_MESSAGE_BYTES",
    "BounceSource",
    "MaildirSource",
    "MboxSource",
    "SourceError",
    "SourceMessage",
    "SourceOptions",
    "open_source",
]

# A DSN or ARF report is a few kilobytes plus the returned original; 4 MiB keeps every
# real report part and bounds what one hostile message can make us hold.
MAX_MESSAGE_BYTES = 4 * 1024 * 1024


class SourceError(UsageError):
    """A source that cannot be opened or read (missing path, not a mailbox, bad option): exit 2."""


@dataclass(frozen=True, slots=True)
class SourceMessage:
    """One message of a mailbox.

    ``ref`` names it in its mailbox, stable across runs (an mbox's byte offset, a
    Maildir file's unique name, an IMAP ``UIDVALIDITY:UID``); it is what
    :meth:`BounceSource.mark_processed` takes. ``raw`` is the message's bytes as
    stored, at most :data:`MAX_MESSAGE_BYTES` of them; ``truncated`` says the message
    was longer."""

    ref: str
    raw: bytes
    truncated: bool = False


@dataclass(frozen=True, slots=True)
class SourceOptions:
    """What the command line says about reading sources.

    ``since``: only messages delivered on or after this day (UTC); ``mark_seen`` /
    ``move_to``: what to do with processed messages (see the module docstring);
    ``password_env``: the variable with the IMAP password (IMAP only); ``debug``:
    where ``--debug`` writes the IMAP conversation (password removed), line by line."""

    since: date | None = None
    mark_seen: bool = False
    move_to: str | None = None
    password_env: str = "MAILER_IMAP_PASSWORD"
    debug: Callable[[str], object] | None = None


@runtime_checkable
class BounceSource(Protocol):
    """A mailbox to read reports from (see the module docstring)."""

    @property
    def name(self) -> str:
        """How the source is shown to the user (a path, or an IMAP URL without password)."""
        ...

    def __iter__(self) -> Iterator[SourceMessage]:
        """The messages, one at a time, in mailbox order."""
        ...

    def mark_processed(self, refs: Sequence[str]) -> None:
        """Flag or move these messages as the options say (a no-op when they say nothing)."""
        ...

    def close(self) -> None:
        """Release files and connections (idempotent)."""
        ...


def open_source(spec: str, options: SourceOptions | None = None) -> BounceSource:
    """The source that ``spec`` names: ``imaps://`` / ``imap://`` URLs go to
    :func:`mailer.bounces.imap.open_imap_source` (same arguments); a directory with
    ``cur/`` and ``new/`` is a Maildir; a file is an mbox.

    Raises :class:`SourceError` (exit 2) for a path that does not exist, cannot be
    read, or is neither, and for options that the source cannot honour."""
    options = options or SourceOptions()
    lowered = spec.lower()
    if lowered.startswith(("imaps://", "imap://")):
        try:
            from . import imap  # type: ignore[attr-defined,unused-ignore]
        except ImportError:
            raise SourceError(
                f"{spec}: IMAP sources are not available in this version.",
                hint="Read the mailbox into an mbox file or Maildir folder (fetchmail, mbsync) and pass its path.",
            ) from None
        source: BounceSource = imap.open_imap_source(spec, options)
        return source
    if "://" in spec:
        raise SourceError(
            f"{spec}: unknown kind of source.",
            hint="Give an mbox file, a Maildir folder, or an imaps://user@host/MAILBOX URL.",
        )
    path = Path(spec)
    try:
        info = path.stat()
    except FileNotFoundError:
        raise SourceError(
            "no such file or directory.", path=spec, hint="Give an mbox file or a Maildir folder."
        ) from None
    except OSError as error:
        raise SourceError(f"cannot be read ({error.strerror}).", path=spec) from None
    if stat.S_ISDIR(info.st_mode):
        if (path / "cur").is_dir() and (path / "new").is_dir():
            return MaildirSource(path, options)
        raise SourceError(
            "is a directory but not a Maildir folder (no cur/ and new/ inside).",
            path=spec,
            hint="Give the Maildir folder itself (the one holding cur/, new/ and tmp/), or an mbox file.",
        )
    if not stat.S_ISREG(info.st_mode):
        raise SourceError("is neither a file nor a directory.", path=spec)
    if options.mark_seen or options.move_to is not None:
        raise SourceError(
            "is an mbox file: --mark-seen and --move-to cannot change it "
            "(rewriting an mbox that mail is delivered to can lose messages).",
            path=spec,
            hint="Drop the option (reading an mbox again counts nothing twice), or deliver bounces to a Maildir.",
        )
    return MboxSource(path, options)


# --- mbox ---------------------------------------------------------------------------

# "From sender Wed Dec  2 14:00:11 2026" (asctime, RFC 4155); some writers add a zone.
_FROM_LINE_DATE = re.compile(rb"([A-Z][a-z]{2}) +(\d{1,2}) +(\d{1,2}):(\d{2})(?::(\d{2}))? +(?:[A-Z+\-0-9]+ +)?(\d{4})")
_MONTHS = {name.encode(): number for number, name in enumerate(calendar.month_abbr) if name}
_ESCAPED_FROM = re.compile(rb">+From ")
_READ_CHUNK = 1 << 16


def _from_line_time(line: bytes) -> float | None:
    match = _FROM_LINE_DATE.search(line)
    if match is None:
        return None
    month = _MONTHS.get(match.group(1))
    if month is None:
        return None
    try:
        stamp = datetime(
            int(match.group(6)),
            month,
            int(match.group(2)),
            int(match.group(3)),
            int(match.group(4)),
            int(match.group(5) or 0),
            tzinfo=UTC,
        )
    except ValueError:
        return None
    return stamp.timestamp()


def _since_timestamp(since: date | None) -> float | None:
    if since is None:
        return None
    return datetime(since.year, since.month, since.day, tzinfo=UTC).timestamp()


class MboxSource:
    """An mbox file (RFC 4155), read as a stream.

    A message starts at a ``From `` line at the start of the file or after an empty
    line (a body line starting with ``From `` that a writer failed to escape does not
    split a message unless a blank line precedes it); ``>From `` lines are unescaped
    (mboxrd). ``ref`` is ``<byte offset of the From line>``: stable while the file is
    only appended to. Nothing is ever changed in the file."""

    def __init__(self, path: Path, options: SourceOptions | None = None) -> None:
        self._path = path
        self._since = _since_timestamp((options or SourceOptions()).since)
        self._file: BinaryIO | None = None

    @property
    def name(self) -> str:
        return str(self._path)

    def __iter__(self) -> Iterator[SourceMessage]:
        try:
            handle = self._path.open("rb")
        except OSError as error:
            raise SourceError(f"cannot be read ({error.strerror}).", path=str(self._path)) from None
        self._file = handle
        try:
            yield from self._messages(handle)
        finally:
            handle.close()
            self._file = None

    def _messages(self, handle: BinaryIO) -> Iterator[SourceMessage]:
        offset = 0
        start: int | None = None
        keep = True
        parts: list[bytes] = []
        size = 0
        truncated = False
        previous_blank = True
        for line in _bounded_lines(handle):
            length = len(line)
            if previous_blank and line.startswith(b"From "):
                if start is not None and keep:
                    yield SourceMessage(str(start), _strip_separator(b"".join(parts)), truncated)
                start = offset
                when = _from_line_time(line)
                keep = self._since is None or when is None or when >= self._since
                parts, size, truncated = [], 0, False
            elif start is not None and keep:
                if _ESCAPED_FROM.match(line):
                    line = line[1:]
                if size + len(line) <= MAX_MESSAGE_BYTES:
                    parts.append(line)
                    size += len(line)
                else:
                    truncated = True
            offset += length
            previous_blank = line in (b"\n", b"\r\n")
        if start is not None and keep:
            yield SourceMessage(str(start), _strip_separator(b"".join(parts)), truncated)

    def mark_processed(self, refs: Sequence[str]) -> None:
        """Nothing: an mbox is never rewritten (see the module docstring)."""

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def _bounded_lines(handle: BinaryIO) -> Iterator[bytes]:
    """The file's lines; a line longer than the read chunk comes in pieces (a hostile
    file without newlines is never held whole). Pieces after the first never start a
    message: only a real line start can be ``From ``."""
    while True:
        line = handle.readline(_READ_CHUNK)
        if not line:
            return
        yield line


def _strip_separator(raw: bytes) -> bytes:
    # The blank line before the next From line belongs to the mbox, not the message.
    if raw.endswith(b"\r\n\r\n"):
        return raw[:-2]
    if raw.endswith(b"\n\n"):
        return raw[:-1]
    return raw


# --- Maildir ------------------------------------------------------------------------


class MaildirSource:
    """A Maildir folder: the files of ``new/`` then ``cur/``, in name order (delivery
    order for the usual ``time.unique.host`` names). ``ref`` is the file's unique name
    (the part before ``:2,``), which survives the moves between ``new/`` and ``cur/``
    and into a ``--move-to`` folder."""

    def __init__(self, path: Path, options: SourceOptions | None = None) -> None:
        self._root = path
        self._options = options or SourceOptions()
        self._since = _since_timestamp(self._options.since)
        self._where: dict[str, Path] = {}

    @property
    def name(self) -> str:
        return str(self._root)

    def __iter__(self) -> Iterator[SourceMessage]:
        for sub in ("new", "cur"):
            folder = self._root / sub
            try:
                names = sorted(entry.name for entry in os.scandir(folder) if not entry.name.startswith("."))
            except OSError as error:
                raise SourceError(f"cannot be read ({error.strerror}).", path=str(folder)) from None
            for file_name in names:
                file_path = folder / file_name
                message = self._read(file_path)
                if message is not None:
                    yield message

    def _read(self, file_path: Path) -> SourceMessage | None:
        try:
            with file_path.open("rb") as handle:
                info = os.fstat(handle.fileno())
                if not stat.S_ISREG(info.st_mode):
                    return None
                if self._since is not None and info.st_mtime < self._since:
                    return None
                raw = handle.read(MAX_MESSAGE_BYTES + 1)
        except FileNotFoundError:
            return None  # another client moved or deleted it meanwhile
        except OSError as error:
            raise SourceError(f"cannot be read ({error.strerror}).", path=str(file_path)) from None
        ref = file_path.name.split(":", 1)[0]
        self._where[ref] = file_path
        truncated = len(raw) > MAX_MESSAGE_BYTES
        return SourceMessage(ref, raw[:MAX_MESSAGE_BYTES], truncated)

    def mark_processed(self, refs: Sequence[str]) -> None:
        """Move each message to ``cur/`` with ``S`` (``--mark-seen``) or into the
        ``.NAME`` subfolder (``--move-to NAME``); nothing without either option."""
        if not self._options.mark_seen and self._options.move_to is None:
            return
        target = self._root
        if self._options.move_to is not None:
            target = self._root / ("." + self._options.move_to.strip("."))
            for sub in ("cur", "new", "tmp"):
                (target / sub).mkdir(parents=True, exist_ok=True)
        for ref in refs:
            current = self._where.pop(ref, None)
            if current is None:
                continue
            unique, _, info = current.name.partition(":")
            flags = info[2:] if info.startswith("2,") else ""
            if "S" not in flags:
                flags = "".join(sorted(flags + "S"))
            try:
                os.rename(current, target / "cur" / f"{unique}:2,{flags}")
            except FileNotFoundError:
                continue  # moved by another client meanwhile

    def close(self) -> None:
        self._where.clear()
