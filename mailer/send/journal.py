"""The delivery journal: the write-ahead record of a running send.

Before each SMTP transaction a worker appends a ``sending`` line to the campaign's
journal file, and after it the outcome; each append is one ``write()`` that has
returned before the worker goes on, so whatever the kernel holds survives a killed
process, exactly like a committed SQLite transaction in WAL mode with
``synchronous=NORMAL`` (neither survives a power cut before the data reaches disk).
The send log (SQLite) is brought up to date from the same events in large batches,
about every 50 ms, instead of one commit per message: waiting for a commit before
every transaction held a 50,000-message send into smtp-sink at 2,585 msg/s, against
3,492 with no log writes at all (and about 3,600 with this journal).

Each batch commit also stores how far into the journal it got (``runs.journal_applied``),
in the same transaction, so the events after that point are exactly the ones the
database lacks. A killed run leaves them in the file; the next ``mailer send`` or
``mailer report`` on the campaign (once nobody holds its lock) applies them and
removes the file (:func:`recover`). A run that ends normally applies everything and
removes its journal itself. While a run goes on, the file is cut back to its header
whenever every line in it is in the database and it has grown past a few megabytes.

File format: a JSON header line ``{"mailer_journal": 1, "campaign": ..., "run": id}``,
then one JSON array per event: ``[recipient, status, smtp_code, smtp_reply,
message_id, line]`` (:meth:`mailer.store.base.SendStore.record_events`). A last line without its newline
was cut off by the kill: its ``write()`` never returned, so no transaction followed it.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Iterator
from typing import Any

from ..bounces.rules import bounces_of
from ..core.errors import LockedError, SendLogError
from ..core.outcomes import RESULT_STATUSES, DeliveryEvent, Status
from ..store.base import SendStore
from ..store.locks import CampaignLock

__all__ = ["FORMAT_VERSION", "JournalWriter", "recover", "recover_all"]


FORMAT_VERSION = 1
# Cut the file back once this much of it is in the database (bounds its size).
_TRUNCATE_AT = 8 * 1024 * 1024
_BATCH_SECONDS = 0.05
_BATCH_EVENTS = 2048


class JournalWriter:
    """Appends delivery events to the journal and applies them to the send log.

    Thread-safe: any number of workers call :meth:`append`; one background thread
    commits to SQLite. :meth:`append` raises the writer thread's error, if it had
    one, so a broken send log stops the run at the next message.
    """

    def __init__(self, log: SendStore, campaign: str, run_id: int) -> None:
        self.log = log
        self.campaign = campaign
        self.run_id = run_id
        self.path = log.journal_path(campaign)
        header = json.dumps({"mailer_journal": FORMAT_VERSION, "campaign": campaign, "run": run_id}).encode() + b"\n"
        try:
            # The caller holds the campaign lock and has recovered any earlier journal.
            # Written beside it and renamed, so a journal always has its header: an empty
            # or headless one was damaged (recover() refuses it).
            fresh = self.path.with_name(self.path.name + ".new")
            self._fd = os.open(fresh, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND, 0o600)
            os.write(self._fd, header)
            os.rename(fresh, self.path)
        except OSError as exc:
            raise SendLogError(
                f"cannot write the delivery journal ({exc.strerror}).",
                path=str(self.path),
                hint="The send log's folder must be writable by this user, with free space.",
            ) from None
        self._header_size = len(header)
        self._written = len(header)  # the file's size: every append is counted here
        self._pending: list[DeliveryEvent] = []
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._closed = False
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="mailer-journal", daemon=True)
        self._thread.start()

    def append(self, event: DeliveryEvent) -> None:
        """Write one event to the journal; it is on record when this returns."""
        line = json.dumps(event, ensure_ascii=False, separators=(",", ":")).encode("utf-8", "surrogateescape") + b"\n"
        with self._lock:
            if self._error is not None:
                raise self._error
            if self._closed:
                raise RuntimeError("the journal is closed")
            try:
                written = os.write(self._fd, line)
            except OSError as exc:
                self._error = SendLogError(
                    f"cannot write the delivery journal ({exc.strerror}).",
                    path=str(self.path),
                    hint="Free some space; the send log keeps every outcome recorded so far. Re-run to resume.",
                )
                raise self._error from None
            if written != len(line):  # a regular file takes it all, short of a full disk
                self._error = SendLogError(
                    "the disk is full: the delivery journal could not be written.",
                    path=str(self.path),
                    hint="Free some space; the send log keeps every outcome recorded so far. Re-run to resume.",
                )
                raise self._error
            self._written += written
            self._pending.append(event)
            if len(self._pending) >= _BATCH_EVENTS:
                self._wake.notify()

    def _take(self) -> tuple[list[DeliveryEvent], int]:
        events, self._pending = self._pending, []
        return events, self._written

    def _apply(self, events: list[DeliveryEvent], offset: int) -> None:
        self.log.record_events(self.campaign, events, journal=(self.run_id, offset), bounces=bounces_of(events))

    def _run(self) -> None:
        while True:
            with self._lock:
                if not self._closed:
                    self._wake.wait(_BATCH_SECONDS)
                events, offset = self._take()
                closed = self._closed
            try:
                if events:
                    self._apply(events, offset)
                if offset - self._header_size > _TRUNCATE_AT:
                    self._cut_back()
            except BaseException as exc:  # the send log is unusable: stop the run, say why
                with self._lock:
                    self._error = exc
                return
            if closed:
                return

    def _cut_back(self) -> None:
        """Empty the file back to its header; appends wait meanwhile (a few ms)."""
        with self._lock:
            events, offset = self._take()
            if events:
                self._apply(events, offset)
            # The log's offset first: killed before the cut, the log says "from the start"
            # of a file that still holds everything, which recover() applies again (only
            # attempt counts change). The other order would leave the log's offset past
            # the end of the file, which is what a damaged journal looks like.
            self.log.set_journal_applied(self.run_id, self._header_size)
            os.ftruncate(self._fd, self._header_size)
            self._written = self._header_size

    def close(self) -> None:
        """Apply what is left, then remove the journal (kept when anything failed)."""
        with self._lock:
            self._closed = True
            self._wake.notify()
        self._thread.join()
        os.close(self._fd)
        if self._error is not None:
            raise self._error
        self.path.unlink(missing_ok=True)


_EVENT_STATUSES = frozenset({Status.SENDING, *RESULT_STATUSES})


def _optional(value: object, kind: type) -> bool:
    return value is None or isinstance(value, kind)


def _as_event(value: object) -> DeliveryEvent:
    """A decoded journal line as the event :meth:`JournalWriter.append` wrote; ValueError if it is not one."""
    if isinstance(value, list) and len(value) == 6:
        recipient, status, code, reply, message_id, line = value
        if (
            isinstance(recipient, str)
            and isinstance(status, str)
            and status in _EVENT_STATUSES
            and _optional(code, int)
            and _optional(reply, str)
            and _optional(message_id, str)
            and _optional(line, int)
        ):
            return (recipient, status, code, reply, message_id, line)
    raise ValueError(f"a line is not a delivery event: {json.dumps(value)[:200]}")


def _read_events(data: bytes, start: int) -> Iterator[tuple[DeliveryEvent, int]]:
    """Each complete event line from ``start``, with the offset just after it.

    Raises ValueError (or a JSONDecodeError) for a line that is not an event: the file is damaged.
    """
    position = start
    while True:
        end = data.find(b"\n", position)
        if end < 0:
            return  # nothing more, or a line the kill cut off: its transaction never began
        event = _as_event(json.loads(data[position:end].decode("utf-8", "surrogateescape")))
        position = end + 1
        yield event, position


def recover(log: SendStore, campaign: str, lock: CampaignLock | None = None) -> int:
    """Apply what a killed run of ``campaign`` left in its journal; returns how many events.

    Needs the campaign's lock: pass the one held, or None to take it for the call. When
    another run holds it, the journal is that run's, live: nothing is done (returns 0).
    """
    path = log.journal_path(campaign)
    if not path.exists():
        return 0
    if lock is None:
        try:
            taken = log.acquire_lock(campaign)
        except LockedError:  # a live run: its journal is its own business
            return 0
        with taken:
            return recover(log, campaign, taken)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return 0
    try:
        run_id, events, offset = _events_to_apply(log, campaign, data)
    except _Untrusted as why:
        raise SendLogError(
            f"the delivery journal of campaign {campaign!r} is damaged and cannot be trusted: {why}.",
            path=str(path),
            hint="It is the record of a run that was killed: the outcomes of its last messages may be "
            "in it and nowhere else, so a new run could mail those recipients a second time. Nothing "
            f"was sent. Keep the file; `mailer report --campaign {campaign}` shows what the send log "
            "knows. To go on anyway, accepting that some may get a second message, remove the file "
            "and run again.",
        ) from None
    if events:
        log.record_events(campaign, events, journal=(run_id, offset), bounces=bounces_of(events))
    path.unlink()
    return len(events)


class _Untrusted(Exception):
    """Why a journal cannot be applied as it is (the message says what is wrong with it)."""


def _events_to_apply(log: SendStore, campaign: str, data: bytes) -> tuple[int, list[DeliveryEvent], int]:
    """``(run id, the events the send log lacks, the offset after them)``; :class:`_Untrusted` if unsure.

    The writer creates a journal with its header in place (a rename) and moves the send
    log's offset back before it cuts the file back, so the log's offset is never past
    the end of an intact journal: an empty file, a header that does not read, a line
    that is not an event or a file shorter than what the log applied means it was
    damaged, and what it held cannot be known.
    """
    newline = data.find(b"\n")
    if newline < 0:
        raise _Untrusted("it is empty" if not data.strip(b"\0") else "its first line is cut off")
    try:
        header = json.loads(data[:newline])
        run_id = int(header["run"])
        if header.get("mailer_journal") != FORMAT_VERSION or header.get("campaign") != campaign:
            raise ValueError("not this campaign's journal")
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise _Untrusted(f"its first line is not a journal header ({exc})") from None
    try:
        applied = log.journal_applied(run_id)
        known = True
    except ValueError:
        # The send log has no record of this run: it lost its last commits (its -wal
        # file deleted after a kill, say). The journal holds every event of the run
        # since it was last cut back, so apply them all: events the log already had
        # are applied again, which changes only the attempt counts.
        applied, known = None, False
    if applied is not None and applied > len(data):
        raise _Untrusted(f"it holds {len(data)} bytes, but the send log had applied {applied} of them")
    start = newline + 1 if applied is None else applied
    events: list[DeliveryEvent] = []
    offset = start
    try:
        for event, offset in _read_events(data, start):  # noqa: B007 - the last offset is used below
            events.append(event)
    except (ValueError, json.JSONDecodeError) as exc:
        raise _Untrusted(f"a line is not a delivery event ({exc})") from None
    if not known and not events:
        raise _Untrusted(f"the send log has no record of its run {run_id}, and it holds no event to restore it from")
    return run_id, events, offset


def recover_all(log: SendStore) -> int:
    """:func:`recover` every campaign of this send log that left a journal behind."""
    total = 0
    for path in sorted(log.path.parent.glob(f"{log.path.name}.*.journal")):
        try:
            with path.open("rb") as file:
                header: Any = json.loads(file.readline() or b"null")
            campaign = header["campaign"]
        except (OSError, ValueError, KeyError, TypeError):
            continue  # not readable as a journal: recover() of its campaign will say so
        if isinstance(campaign, str) and log.journal_path(campaign) == path:
            total += recover(log, campaign)
    return total
