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

import fcntl
import json
import os
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from ..bounces.rules import bounces_of
from ..core.errors import LockedError, SendLogError
from ..core.outcomes import RESULT_STATUSES, DeliveryEvent, Status
from ..store.base import SendStore
from ..store.locks import CampaignLock, campaign_file_path
from ..store.pg_work import LostClaimError

__all__ = ["FORMAT_VERSION", "JournalWriter", "recover", "recover_all", "recover_run_journals", "run_journal_path"]


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

    def __init__(
        self,
        log: SendStore,
        campaign: str,
        run_id: int,
        *,
        path: Path | None = None,
        apply: Callable[[list[DeliveryEvent], int], set[str]] | None = None,
        durable_sending: bool = False,
    ) -> None:
        """``path``: the journal file (default: the campaign's); ``apply``: how a batch
        reaches the send log, returning the recipients whose ``sending`` it refused
        (default: :meth:`SendStore.record_events`); ``durable_sending``: :meth:`append`
        of a ``sending`` event returns only once the send log has it (cooperating runs:
        a run on another host must see it before the transaction starts). With a
        ``path`` of its own, the file is also locked (``flock``) while this writer lives,
        so that :func:`recover_run_journals` knows a live run's journal from a dead one's."""
        self.log = log
        self.campaign = campaign
        self.run_id = run_id
        self.path = path if path is not None else log.journal_path(campaign)
        self._apply_batch = apply
        self._durable = durable_sending
        header = json.dumps({"mailer_journal": FORMAT_VERSION, "campaign": campaign, "run": run_id}).encode() + b"\n"
        try:
            # The caller holds the campaign lock and has recovered any earlier journal.
            # Written beside it and renamed, so a journal always has its header: an empty
            # or headless one was damaged (recover() refuses it).
            fresh = self.path.with_name(self.path.name + ".new")
            self._fd = os.open(fresh, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND, 0o600)
            if path is not None:
                fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
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
        self._appended = 0  # events appended so far
        self._taken = 0  # of which the writer has taken this many
        self._applied_count = 0  # of which the send log has this many (in order)
        self._urgent = 0  # appends waiting for their commit (durable_sending)
        self._committed = threading.Condition(self._lock)
        self._refused: set[str] = set()
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
            self._appended += 1
            if self._durable and event[1] == Status.SENDING:
                self._wait_for_commit(event[0], self._appended)
            elif len(self._pending) >= _BATCH_EVENTS:
                self._wake.notify()

    def _wait_for_commit(self, recipient: str, count: int) -> None:
        """Called with the lock held: wake the writer now and wait until the send log has
        the first ``count`` events."""
        self._urgent += 1
        self._wake.notify()
        try:
            while self._applied_count < count and self._error is None:
                self._committed.wait()
        finally:
            self._urgent -= 1
        if self._applied_count < count and self._error is not None:
            raise self._error
        if recipient in self._refused:
            self._refused.discard(recipient)
            raise LostClaimError(
                f"this run no longer holds the part of the list {recipient} is in: another run took it over "
                "after this one's lease ran out (stalled, or cut off from the database); the message was not sent.",
                hint="The other runs send the rest; run again to resume.",
            )

    def _take(self) -> tuple[list[DeliveryEvent], int]:
        events, self._pending = self._pending, []
        self._taken = self._appended
        return events, self._written

    def _store(self, events: list[DeliveryEvent], offset: int) -> set[str]:
        if self._apply_batch is not None:
            return self._apply_batch(events, offset)
        self.log.record_events(self.campaign, events, journal=(self.run_id, offset), bounces=bounces_of(events))
        return set()

    def _applied(self, refused: set[str], count: int) -> None:
        """Called with the lock held: the send log has the first ``count`` events."""
        self._refused |= refused
        self._applied_count = max(self._applied_count, count)
        self._committed.notify_all()

    def _apply(self, events: list[DeliveryEvent], offset: int) -> None:
        count = self._taken
        refused = self._store(events, offset)
        with self._lock:
            self._applied(refused, count)

    def _apply_locked(self, events: list[DeliveryEvent], offset: int) -> None:
        self._applied(self._store(events, offset), self._taken)

    def _run(self) -> None:
        while True:
            with self._lock:
                # A durable append waits for its commit: no batching delay then.
                if not self._closed and not (self._urgent and self._pending):
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
                    self._committed.notify_all()
                return
            if closed:
                return

    def _cut_back(self) -> None:
        """Empty the file back to its header; appends wait meanwhile (a few ms)."""
        with self._lock:
            events, offset = self._take()
            if events:
                self._apply_locked(events, offset)
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


def run_journal_path(log: SendStore, campaign: str, run_id: int) -> Path:
    """The journal of one of several cooperating runs of ``campaign`` (PostgreSQL): one file per run."""
    return campaign_file_path(log.path, campaign, f"run{run_id}.journal")


def recover_run_journals(log: SendStore, campaign: str) -> int:
    """Apply what dead cooperating runs of ``campaign`` on this host left in their journals.

    A live run holds a ``flock`` on its journal: those are left alone. Only the outcomes
    are applied: a cooperating run commits each ``sending`` to the send log before the
    transaction starts, so a ``sending`` line the log lacks was never followed by one
    (and must not overwrite what another run did for that recipient since)."""
    pattern = campaign_file_path(log.path, campaign, "run*.journal").name
    total = 0
    for path in sorted(log.path.parent.glob(pattern)):
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            continue
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue  # a live run's
            try:
                if not os.path.samestat(os.fstat(fd), os.stat(path)):
                    continue  # another run applied and removed it meanwhile
            except FileNotFoundError:
                continue
            data = path.read_bytes()
            try:
                run_id, events, offset = _events_to_apply(log, campaign, data)
            except _Untrusted as why:
                raise SendLogError(
                    f"the delivery journal of a run of campaign {campaign!r} is damaged and cannot be trusted: {why}.",
                    path=str(path),
                    hint="Keep the file; `mailer report` shows what the send log knows. To go on anyway, accepting "
                    "that some recipients of that run may get a second message, remove the file and run again.",
                ) from None
            outcomes = [event for event in events if event[1] != Status.SENDING]
            if outcomes or events:
                log.record_events(campaign, outcomes, journal=(run_id, offset), bounces=bounces_of(outcomes))
            path.unlink(missing_ok=True)
            total += len(outcomes)
        finally:
            os.close(fd)
    return total


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
        elif isinstance(campaign, str) and path.name.endswith(".journal") and ".run" in path.name:
            total += recover_run_journals(log, campaign)  # a dead cooperating run's (PostgreSQL)
    return total
