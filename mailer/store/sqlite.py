"""The send log in SQLite: what happened to whom, so that a re-run can resume.

One row per (campaign, recipient) holds the status, the number of attempts, the last
SMTP reply, the Message-ID and the times. The same database keeps the run history
and the suppression list (WAL journal, ``synchronous=NORMAL``: a killed process
loses nothing it already committed).

A :class:`SendLog` holds one connection shared by threads behind a lock.
"""

from __future__ import annotations

import csv
import json
import os
import socket
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Any, TextIO

from ..core.addresses import address_key, address_problem, domain_of
from ..core.errors import ContactsError, SendLogError, UsageError
from ..core.outcomes import RESULT_STATUSES, SKIPPED_STATUSES, STATUS_BY_VALUE, DeliveryEvent, Status
from ..core.tokens import recipient_tag
from .imports import parse_address_file
from .locks import CampaignLock, campaign_file_path, campaign_lock_path
from .migrations import migrate
from .records import (
    DELIVERY_COLUMNS,
    FAILED_CSV_HEADER,
    SUPPRESSION_SOURCES,
    CampaignSummary,
    DomainCount,
    FeedbackEvent,
    FeedbackKind,
    ImportResult,
    InvalidEntry,
    RecipientHistory,
    ReplyCount,
    Report,
    Run,
    SkippedRow,
    Suppression,
    TimeCount,
    delivery_from_row,
    utc_now,
)

__all__ = ["SendLog"]


# One statement for both kinds of delivery event, so that a batch of them runs in order
# through one executemany. "sending" counts an attempt and keeps the last reply; an
# outcome records the reply and keeps the attempts.
_EVENT_SQL = """
    INSERT INTO deliveries (campaign, recipient, address, domain, status, attempts, smtp_code, smtp_reply,
                            message_id, line, first_at, updated_at, recipient_tag)
    VALUES (?, ?, ?, ?, ?, 1, ?, ?, ?, ?, ?, ?, ?)
    ON CONFLICT (campaign, recipient) DO UPDATE SET
        address = excluded.address,
        status = excluded.status,
        attempts = attempts + (excluded.status = 'sending'),
        smtp_code = CASE WHEN excluded.status = 'sending' THEN smtp_code ELSE excluded.smtp_code END,
        smtp_reply = CASE WHEN excluded.status = 'sending' THEN smtp_reply ELSE excluded.smtp_reply END,
        message_id = coalesce(excluded.message_id, message_id),
        line = coalesce(excluded.line, line),
        reason = CASE WHEN excluded.status = 'sending' THEN NULL ELSE reason END,
        updated_at = excluded.updated_at
"""
_SKIPPED_SQL = """
    INSERT INTO deliveries (campaign, recipient, address, domain, status, line, reason, first_at, updated_at,
                            recipient_tag)
    VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
    ON CONFLICT (campaign, recipient) DO UPDATE SET
        address = excluded.address,
        status = excluded.status,
        line = coalesce(excluded.line, line),
        reason = excluded.reason,
        updated_at = excluded.updated_at
    WHERE status NOT IN ('sent', 'failed', 'sending')
"""
# Addresses per bulk query: well under SQLite's limit of 32,766 parameters, and a batch
# of contacts (mailer.send.run) fits in one or two queries.
_BULK = 500
_FEEDBACK_SQL = """
    INSERT INTO feedback (campaign, recipient, kind, at, detail, source, ref) VALUES (?, ?, ?, ?, ?, ?, ?)
    ON CONFLICT (kind, ref) WHERE ref IS NOT NULL DO NOTHING
"""
_FEEDBACK_KINDS = frozenset(kind.value for kind in FeedbackKind)
# A writer that finds the log locked waits (busy timeout) and then tries again this many
# times, so that `mailer serve` and `mailer bounces` never show "database is locked"
# while a send of the same campaign commits its batches.
_BUSY_RETRIES = 3
_BUSY_TIMEOUT = 10.0
_SUPPRESSION_SQL = (
    "INSERT INTO suppressions (address, reason, source, added_at) VALUES (?, ?, ?, ?) ON CONFLICT (address) DO NOTHING"
)


# --- errors -------------------------------------------------------------------------

# Primary SQLite result codes (the low byte of an extended code).
_SQLITE_PERM, _SQLITE_BUSY, _SQLITE_LOCKED, _SQLITE_READONLY = 3, 5, 6, 8
_SQLITE_IOERR, _SQLITE_CORRUPT, _SQLITE_FULL, _SQLITE_CANTOPEN, _SQLITE_NOTADB = 10, 11, 13, 14, 26


def _explain(exc: sqlite3.Error, path: Path) -> SendLogError:
    """Turn a SQLite error into a SendLogError that says what to do."""
    code = (getattr(exc, "sqlite_errorcode", None) or 0) & 0xFF
    detail = str(exc)
    where = str(path)
    if code == _SQLITE_NOTADB:
        return SendLogError(
            f"this file is not a SQLite database ({detail}), so it cannot be a send log.",
            path=where,
            hint=_START_AFRESH_HINT,
        )
    if code == _SQLITE_CORRUPT:
        return SendLogError(
            f"the send log is damaged ({detail}).",
            path=where,
            hint=f"Try `sqlite3 {where} .recover | sqlite3 recovered.sqlite3` and point [log] path at the new "
            "file; moving this one away starts a fresh log that no longer knows who was already mailed.",
        )
    if code in (_SQLITE_CANTOPEN, _SQLITE_PERM, _SQLITE_READONLY):
        return SendLogError(
            f"cannot open the send log for writing ({detail}).",
            path=where,
            hint="Check that the file and its folder exist and are writable by this user; "
            f"SQLite also writes {where}-wal and {where}-shm beside it.",
        )
    if code in (_SQLITE_BUSY, _SQLITE_LOCKED):
        return SendLogError(
            f"the send log stayed locked by another process ({detail}).",
            path=where,
            hint="Wait for the other mailer or sqlite3 session to finish and try again.",
        )
    if code == _SQLITE_FULL:
        return SendLogError(
            f"cannot write the send log: {detail}.", path=where, hint="Free some disk space and run again."
        )
    if code == _SQLITE_IOERR:
        return SendLogError(
            f"I/O error on the send log ({detail}).", path=where, hint="Check the disk and the file system."
        )
    return SendLogError(f"send log error: {detail}.", path=where)


_START_AFRESH_HINT = (
    "If the earlier send log is somewhere else, point [log] path at it. To start afresh on purpose "
    "(everyone in the contacts is mailed again), remove this file; mailer creates a new send log "
    "where there is none."
)


def _is_empty(path: Path) -> bool:
    """Whether the file at ``path`` is empty, with no write-ahead log that holds its content."""
    try:
        if path.stat().st_size:
            return False
        wal = path.with_name(path.name + "-wal")
        return not wal.exists() or wal.stat().st_size == 0
    except OSError:
        return False  # let SQLite say what is wrong with it


class _Guarded:
    """Holds the connection lock and turns SQLite errors into SendLogError."""

    __slots__ = ("_log",)

    def __init__(self, log: SendLog) -> None:
        self._log = log

    def __enter__(self) -> sqlite3.Connection:
        self._log._lock.acquire()
        conn = self._log._conn
        if conn is None:
            self._log._lock.release()
            raise SendLogError("the send log is closed.", path=str(self._log.path))
        return conn

    def __exit__(self, exc_type: type | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self._log._lock.release()
        if isinstance(exc, sqlite3.Error) and not isinstance(exc, sqlite3.ProgrammingError):
            raise _explain(exc, self._log.path) from exc


# --- the send log -------------------------------------------------------------------


class SendLog:
    """The SQLite send log, run history and suppression list of one ``[log] path``.

    Open it with :meth:`SendLog.open`; it is a context manager. Every method is
    thread-safe and every write is committed before it returns.
    """

    def __init__(self, path: Path, conn: sqlite3.Connection, *, clock: Callable[[], datetime] = utc_now) -> None:
        self.path = path
        self._conn: sqlite3.Connection | None = conn
        self._point_cursor: sqlite3.Cursor | None = conn.cursor()
        self._lock = threading.Lock()
        self._guard = _Guarded(self)
        self._now_second = -1
        self._now_prefix = ""
        self._clock = clock

    # --- opening, closing, migrating ---

    @classmethod
    def open(cls, path: Path, *, create: bool = True, clock: Callable[[], datetime] = utc_now) -> SendLog:
        """Open (and create or migrate) the send log at ``path``.

        With ``create=False`` a missing file is an error (for ``mailer report``).
        ``clock`` returns the current time as an aware datetime (tests pass a fake).
        Raises :class:`SendLogError` when the file cannot be used.
        """
        path = Path(path)
        if not path.exists():
            if not create:
                raise SendLogError(
                    "there is no send log here yet.",
                    path=str(path),
                    hint="It is created by the first `mailer send`; check [log] path in mailer.toml or --config.",
                )
            if not path.parent.is_dir():
                raise SendLogError(
                    f"the folder {str(path.parent)!r} of the send log does not exist.",
                    path=str(path),
                    hint="Create it, or change [log] path in mailer.toml.",
                )
        if path.is_dir():
            raise SendLogError(
                "this is a folder, not a send log file.",
                path=str(path),
                hint="Set [log] path in mailer.toml to a file name, for example mailer.sqlite3.",
            )
        if path.exists() and _is_empty(path):
            # SQLite would take an empty file for a new database, and a send log that
            # knows nobody mails everyone again. Only mailer's own first open creates one,
            # and it writes the schema at once.
            raise SendLogError(
                "the send log is an empty file (0 bytes): it is not the log of the earlier runs, "
                "so it does not know who was already mailed.",
                path=str(path),
                hint=_START_AFRESH_HINT,
            )
        try:
            conn = sqlite3.connect(path, timeout=_BUSY_TIMEOUT, isolation_level=None, check_same_thread=False)
        except sqlite3.Error as exc:
            raise _explain(exc, path) from None
        try:
            conn.execute("PRAGMA journal_mode = WAL").fetchone()
            # In WAL mode NORMAL keeps every commit across a process crash; only a power
            # loss can drop the last few, and it never corrupts the file.
            conn.execute("PRAGMA synchronous = NORMAL")
            migrate(conn, path)
        except sqlite3.Error as exc:
            conn.close()
            raise _explain(exc, path) from None
        except BaseException:
            conn.close()
            raise
        # The campaign lock and the journal are files named after the send log: name them
        # after the file itself, not the path it was reached by, so that a symlink or a
        # "dir/../log" cannot give a second run its own lock and mail everyone twice.
        # (Hard links are no way to share a log: SQLite names its -wal file by path too.)
        return cls(Path(os.path.realpath(path)), conn, clock=clock)

    def close(self) -> None:
        """Close the database (idempotent)."""
        with self._lock:
            conn, self._conn = self._conn, None
            self._point_cursor = None
        if conn is not None:
            conn.close()

    def __enter__(self) -> SendLog:
        return self

    def __exit__(self, exc_type: type | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    @property
    def schema_version(self) -> int:
        """The schema version of the open database."""
        with self._guard as conn:
            version: int = conn.execute("PRAGMA user_version").fetchone()[0]
            return version

    def _fetch_one(self, sql: str, params: tuple[object, ...]) -> tuple[Any, ...] | None:
        """One row of a point query (same guarantees as ``_guard``, on a reused cursor).

        No longer on the path of every contact: resume and suppression are asked in bulk
        (:meth:`statuses`, :meth:`suppressed`).
        """
        self._lock.acquire()
        try:
            cursor = self._point_cursor
            if cursor is None:
                raise SendLogError("the send log is closed.", path=str(self.path))
            row: tuple[Any, ...] | None = cursor.execute(sql, params).fetchone()
            return row
        except sqlite3.Error as exc:
            if isinstance(exc, sqlite3.ProgrammingError):
                raise
            raise _explain(exc, self.path) from exc
        finally:
            self._lock.release()

    def _now(self) -> str:
        if self._clock is not utc_now:  # a test's clock
            return self._clock().astimezone(UTC).isoformat(timespec="milliseconds")
        # Called twice per message on the delivery path: format the date and time once
        # per second and append the milliseconds (datetime costs ~10 µs a call here).
        now = time.time()
        second = int(now)
        if second != self._now_second:
            self._now_second = second
            self._now_prefix = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        return f"{self._now_prefix}.{int((now - second) * 1000):03d}+00:00"

    # --- deliveries ---

    # --- resume and suppression, in bulk ---

    def statuses(self, campaign: str, addresses: Sequence[str]) -> list[Status | None]:
        """The logged status of each address in ``campaign`` (None: never logged), in order.

        One query per :data:`_BULK` addresses: about 1 µs an address when few are
        logged and 5 µs when all are, against 15-30 µs for a point query each.
        """
        keys = [address_key(address) for address in addresses]
        found: dict[str, Status] = {}
        for start in range(0, len(keys), _BULK):
            chunk = keys[start : start + _BULK]
            sql = (
                "SELECT recipient, status FROM deliveries WHERE campaign = ? "
                f"AND recipient IN ({', '.join('?' * len(chunk))})"
            )
            with self._guard as conn:
                rows = conn.execute(sql, (campaign, *chunk)).fetchall()
            for recipient, status in rows:
                found[recipient] = STATUS_BY_VALUE[status]
        return [found.get(key) for key in keys]

    def suppressed(self, addresses: Sequence[str]) -> list[bool]:
        """Whether each address is on the suppression list, in order (compared by
        :func:`~mailer.core.addresses.address_key`: without case, either IDNA form)."""
        keys = [address_key(address) for address in addresses]
        asked = sorted(set(keys))
        found: set[str] = set()
        for start in range(0, len(asked), _BULK):
            chunk = asked[start : start + _BULK]
            sql = f"SELECT address FROM suppressions WHERE address IN ({', '.join('?' * len(chunk))})"
            with self._guard as conn:
                found.update(address for (address,) in conn.execute(sql, chunk))
        return [key in found for key in keys]

    def record_events(
        self,
        campaign: str,
        events: Iterable[DeliveryEvent],
        *,
        journal: tuple[int, int] | None = None,
        bounces: Iterable[tuple[str, str]] = (),
    ) -> None:
        """Apply delivery events in order, in ONE transaction (one commit for them all).

        Each event is ``(recipient, status, smtp_code, smtp_reply, message_id, line)``:
        status ``sending`` records that the message is about to be handed to the server
        (one more attempt; the last reply is kept), ``sent`` / ``failed`` / ``deferred``
        the outcome of a transaction (its reply; ``smtp_code`` None when there was none). The
        delivery process groups the events of several workers this way: a commit each
        would cost more than the SMTP transaction itself.

        ``journal=(run_id, offset)`` records, in the same transaction, that the run's
        journal is applied up to ``offset`` (:mod:`mailer.journal`); ``bounces`` are
        ``(address, reason)`` pairs for the suppression list (source ``bounce``).
        """
        now = self._now()
        rows = []
        for recipient, status, smtp_code, smtp_reply, message_id, line in events:
            if status != Status.SENDING and status not in RESULT_STATUSES:
                raise ValueError(f"a delivery event is sending, sent, failed or deferred, not {status!r}")
            key = address_key(recipient)
            rows.append(
                (
                    campaign,
                    key,
                    recipient.strip(),
                    domain_of(key),
                    str(status),
                    smtp_code,
                    smtp_reply,
                    message_id,
                    line,
                    now,
                    now,
                    recipient_tag(key),
                )
            )
        suppressions = [(address_key(address), reason, "bounce", now) for address, reason in bounces]
        if not rows and journal is None:
            return
        with self._guard as conn:
            if len(rows) == 1 and journal is None and not suppressions:
                conn.execute(_EVENT_SQL, rows[0])
                return
            conn.execute("BEGIN IMMEDIATE")
            try:
                conn.executemany(_EVENT_SQL, rows)
                if suppressions:
                    conn.executemany(_SUPPRESSION_SQL, suppressions)
                if journal is not None:
                    conn.execute("UPDATE runs SET journal_applied = ? WHERE id = ?", (journal[1], journal[0]))
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")

    # --- what comes back after sending ---

    def record_feedback(
        self,
        events: Iterable[FeedbackEvent],
        *,
        suppress: Iterable[tuple[str, str | None, str]] = (),
    ) -> int:
        """Record events after sending and add suppressions ``(address, reason, source)``,
        in ONE transaction; returns how many events were new (an event whose kind and
        ``ref`` are already recorded is skipped; a suppression already present stays as
        it was).

        Safe while a ``mailer send`` of the same campaign writes to the log: the write
        waits for the send's transaction (busy timeout) and retries a few times, so a
        busy log is slower, never an error, unless it stays locked for half a minute.
        """
        now = self._now()
        rows = []
        for event in events:
            kind = str(event.kind)
            if kind not in _FEEDBACK_KINDS:
                raise ValueError(f"unknown feedback kind {kind!r}")
            rows.append(
                (
                    event.campaign,
                    address_key(event.address),
                    kind,
                    event.at or now,
                    event.detail,
                    event.source,
                    event.ref,
                )
            )
        suppressions = []
        for address, reason, source in suppress:
            if source not in SUPPRESSION_SOURCES:
                raise ValueError(f"source must be one of {', '.join(SUPPRESSION_SOURCES)}, not {source!r}")
            suppressions.append((address_key(address), reason, source, now))
        if not rows and not suppressions:
            return 0

        def write(conn: sqlite3.Connection) -> int:
            before = conn.total_changes
            conn.executemany(_FEEDBACK_SQL, rows)
            added = conn.total_changes - before
            if suppressions:
                conn.executemany(_SUPPRESSION_SQL, suppressions)
            return added

        return self._write_retrying(write)

    def _write_retrying(self, write: Callable[[sqlite3.Connection], int]) -> int:
        """Run ``write`` in a BEGIN IMMEDIATE transaction, again when the log was busy."""
        for attempt in range(_BUSY_RETRIES + 1):
            with self._guard as conn:
                try:
                    conn.execute("BEGIN IMMEDIATE")
                    try:
                        result = write(conn)
                        conn.execute("COMMIT")
                        return result
                    except BaseException:
                        if conn.in_transaction:
                            conn.execute("ROLLBACK")
                        raise
                except sqlite3.OperationalError as exc:
                    code = (getattr(exc, "sqlite_errorcode", None) or 0) & 0xFF
                    if code not in (_SQLITE_BUSY, _SQLITE_LOCKED) or attempt == _BUSY_RETRIES:
                        raise
            time.sleep(0.05 * (attempt + 1))
        raise AssertionError("unreachable")

    def feedback_counts(self, campaign: str | None = None) -> dict[str, int]:
        """Events after sending by kind (every kind, zeros included), of one campaign or all;
        ``unique_*`` keys count recipients with at least one event of that kind."""
        where, params = ("WHERE campaign = ?", (campaign,)) if campaign is not None else ("", ())
        with self._guard as conn:
            rows = conn.execute(
                f"SELECT kind, count(*), count(DISTINCT campaign || char(0) || recipient) FROM feedback {where} "
                "GROUP BY kind",
                params,
            ).fetchall()
        found = {kind: (total, unique) for kind, total, unique in rows}
        counts: dict[str, int] = {}
        for kind in FeedbackKind:
            total, unique = found.get(kind.value, (0, 0))
            counts[kind.value] = total
            counts[f"unique_{kind.value}"] = unique
        return counts

    def engagement_history(self) -> dict[str, tuple[int, int, int, int, str | None, str | None, str | None]]:
        """Every recipient's history over all campaigns, in one query: address key ->
        ``(sent, opens, clicks, bounces, last_open, last_click, last_sent)`` (times UTC ISO)."""
        with self._guard as conn:
            rows = conn.execute(
                """
                SELECT recipient, sum(sent), sum(opens), sum(clicks), sum(bounces),
                       max(last_open), max(last_click), max(last_sent) FROM (
                    SELECT recipient, count(*) AS sent, 0 AS opens, 0 AS clicks, 0 AS bounces,
                           NULL AS last_open, NULL AS last_click, max(updated_at) AS last_sent
                        FROM deliveries WHERE status = 'sent' GROUP BY recipient
                    UNION ALL
                    SELECT recipient, 0, sum(kind = 'opened'), sum(kind = 'clicked'),
                           sum(kind IN ('bounced_hard', 'bounced_soft')),
                           max(CASE WHEN kind = 'opened' THEN at END), max(CASE WHEN kind = 'clicked' THEN at END), NULL
                        FROM feedback GROUP BY recipient
                ) GROUP BY recipient
                """
            ).fetchall()
        return {row[0]: tuple(row[1:]) for row in rows}

    def clicks_by_link(self, campaign: str | None = None, *, limit: int = 100) -> list[tuple[str, int, int]]:
        """``(url, recipients who clicked it, clicks)`` for the most clicked links, most first."""
        where, params = ("AND campaign = ?", (campaign,)) if campaign is not None else ("", ())
        with self._guard as conn:
            rows = conn.execute(
                f"""
                SELECT detail, count(DISTINCT campaign || char(0) || recipient) AS people, count(*) FROM feedback
                WHERE kind = 'clicked' AND detail IS NOT NULL {where}
                GROUP BY detail ORDER BY people DESC, detail LIMIT ?
                """,
                (*params, limit),
            ).fetchall()
        return [(url, people, clicks) for url, people, clicks in rows]

    def list_feedback(self, campaign: str | None = None) -> list[tuple[str, str, str, str, str | None, str]]:
        """Every event ``(campaign, recipient key, kind, at, detail, source)``, oldest first."""
        where, params = ("WHERE campaign = ?", (campaign,)) if campaign is not None else ("", ())
        with self._guard as conn:
            rows = conn.execute(
                f"SELECT campaign, recipient, kind, at, detail, source FROM feedback {where} ORDER BY id", params
            ).fetchall()
        return [tuple(row) for row in rows]

    def find_by_recipient_tag(self, tag: int) -> list[tuple[str, str]]:
        """The ``(campaign, address)`` rows whose recipient tag is ``tag`` (a VERP token's;
        :meth:`mailer.core.tokens.TokenSigner.resolve_verp` picks the one it names)."""
        with self._guard as conn:
            rows = conn.execute(
                "SELECT campaign, coalesce(address, recipient) FROM deliveries WHERE recipient_tag = ?", (tag,)
            ).fetchall()
        return [(campaign, address) for campaign, address in rows]

    def find_by_message_ids(self, message_ids: Sequence[str]) -> dict[str, tuple[str, str]]:
        """The ``(campaign, address)`` each Message-ID was sent to, for those in the log
        (as written in the header, angle brackets included)."""
        # A bounce may quote it with or without the brackets, with spaces around.
        wanted: dict[str, list[str]] = {}
        for given in message_ids:
            bare = given.strip().strip("<>").strip()
            if bare:
                wanted.setdefault(f"<{bare}>", []).append(given)
        asked = sorted(wanted)
        found: dict[str, tuple[str, str]] = {}
        for start in range(0, len(asked), _BULK):
            chunk = asked[start : start + _BULK]
            sql = (
                "SELECT message_id, campaign, coalesce(address, recipient) FROM deliveries "
                f"WHERE message_id IN ({', '.join('?' * len(chunk))})"
            )
            with self._guard as conn:
                for message_id, campaign, address in conn.execute(sql, chunk):
                    for given in wanted[message_id]:
                        found[given] = (campaign, address)
        return found

    def known_feedback_refs(self, refs: Sequence[str]) -> set[str]:
        """Which of these event refs are already recorded (of any kind)."""
        asked = sorted(set(refs))
        kinds = sorted(_FEEDBACK_KINDS)
        found: set[str] = set()
        for start in range(0, len(asked), _BULK):
            chunk = asked[start : start + _BULK]
            # kind IN (...) lets SQLite use the (kind, ref) unique index.
            sql = (
                f"SELECT ref FROM feedback WHERE kind IN ({', '.join('?' * len(kinds))}) "
                f"AND ref IN ({', '.join('?' * len(chunk))})"
            )
            with self._guard as conn:
                found.update(ref for (ref,) in conn.execute(sql, kinds + chunk))
        return found

    def bounce_history(self, addresses: Sequence[str]) -> dict[str, RecipientHistory]:
        """Sends and soft-bounced campaigns of each address, in bulk (see SendStore)."""
        keys = sorted({address_key(address) for address in addresses})
        sends: dict[str, list[tuple[str, str, str]]] = {}
        soft: dict[str, set[str]] = {}
        for start in range(0, len(keys), _BULK):
            chunk = keys[start : start + _BULK]
            tags = [recipient_tag(key) for key in chunk]
            wanted = set(chunk)
            marks = ", ".join("?" * len(chunk))
            with self._guard as conn:
                rows = conn.execute(
                    "SELECT recipient, campaign, status, first_at FROM deliveries "
                    f"WHERE recipient_tag IN ({marks}) AND status NOT IN ('invalid', 'suppressed') "
                    "ORDER BY first_at, campaign",
                    tags,
                ).fetchall()
                bounced = conn.execute(
                    f"SELECT recipient, campaign FROM feedback WHERE recipient IN ({marks}) AND kind = 'bounced_soft'",
                    chunk,
                ).fetchall()
            for recipient, campaign, status, first_at in rows:
                if recipient in wanted:
                    sends.setdefault(recipient, []).append((campaign, status, first_at))
            for recipient, campaign in bounced:
                soft.setdefault(recipient, set()).add(campaign)
        return {key: RecipientHistory(tuple(rows), frozenset(soft.get(key, ()))) for key, rows in sends.items()}

    def journal_applied(self, run_id: int) -> int | None:
        """How far the run's delivery journal is applied (None: not at all yet)."""
        row = self._fetch_one("SELECT journal_applied FROM runs WHERE id = ?", (run_id,))
        if row is None:
            raise ValueError(f"no run with id {run_id} in {self.path}")
        applied: int | None = row[0]
        return applied

    def set_journal_applied(self, run_id: int, offset: int) -> None:
        """Record that run ``run_id``'s journal is applied up to ``offset``."""
        with self._guard as conn:
            conn.execute("UPDATE runs SET journal_applied = ? WHERE id = ?", (offset, run_id))

    def record_skipped(self, campaign: str, rows: Iterable[SkippedRow]) -> None:
        """Record contacts that are not mailed (``invalid``, ``suppressed``), in one transaction.

        A row never overwrites what happened to a real message: a ``sent``, ``failed`` or
        ``sending`` row stays as it is.
        """
        now = self._now()
        values = []
        for recipient, status, reason, line in rows:
            if status not in SKIPPED_STATUSES:
                raise ValueError(f"record_skipped() takes invalid or suppressed, not {status!r}")
            key = address_key(recipient)
            if not key:
                key = f"line {line}" if line is not None else "(empty)"
            tag = recipient_tag(key) if status == Status.SUPPRESSED else None
            values.append(
                (campaign, key, recipient.strip() or None, domain_of(key), str(status), line, reason, now, now, tag)
            )
        if not values:
            return
        with self._guard as conn:
            conn.execute("BEGIN IMMEDIATE")
            try:
                conn.executemany(_SKIPPED_SQL, values)
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")

    def counts(self, campaign: str) -> dict[str, int]:
        """The number of recipients of ``campaign`` in each status (every status, zeros included)."""
        with self._guard as conn:
            rows = conn.execute(
                "SELECT status, count(*) FROM deliveries WHERE campaign = ? GROUP BY status", (campaign,)
            ).fetchall()
        found = dict(rows)
        return {status.value: found.get(status.value, 0) for status in Status}

    # --- reports ---

    def report(self, campaign: str | None = None, *, max_domains: int | None = None) -> Report:
        """Counts by status, by recipient domain and by SMTP reply code, and the rows whose
        outcome is unknown (``sending``), for one campaign or (None) for all of them.

        ``max_domains`` keeps only the domains with the most recipients.
        """
        where, params = ("WHERE campaign = ?", (campaign,)) if campaign is not None else ("", ())
        with self._guard as conn:
            status_rows = conn.execute(
                f"SELECT status, count(*) FROM deliveries {where} GROUP BY status", params
            ).fetchall()
            domain_rows = conn.execute(
                f"SELECT domain, status, count(*) FROM deliveries {where} GROUP BY domain, status", params
            ).fetchall()
            code_rows = conn.execute(
                f"""
                SELECT smtp_code, count(*), max(smtp_reply) FROM deliveries
                {where + (" AND" if where else "WHERE")} smtp_code IS NOT NULL
                GROUP BY smtp_code ORDER BY count(*) DESC, smtp_code
                """,
                params,
            ).fetchall()
            # Failures without a reply (the relay could not be reached, timed out) still
            # have a reason: group those by its text.
            reason_rows = conn.execute(
                f"""
                SELECT NULL, count(*), smtp_reply FROM deliveries
                {where + (" AND" if where else "WHERE")} smtp_code IS NULL AND smtp_reply IS NOT NULL
                GROUP BY smtp_reply ORDER BY count(*) DESC, smtp_reply LIMIT 50
                """,
                params,
            ).fetchall()
            code_rows = sorted(code_rows + reason_rows, key=lambda row: -row[1])
            # updated_at of a sent row is when its final reply came: hours, in UTC.
            hour_rows = conn.execute(
                f"""
                SELECT substr(updated_at, 1, 13), count(*) FROM deliveries
                {where + (" AND" if where else "WHERE")} status = 'sent'
                GROUP BY 1 ORDER BY 1
                """,
                params,
            ).fetchall()
            unknown_rows = conn.execute(
                f"""
                SELECT {DELIVERY_COLUMNS} FROM deliveries
                {where + (" AND" if where else "WHERE")} status = 'sending'
                ORDER BY campaign, line, recipient
                """,
                params,
            ).fetchall()
        found = dict(status_rows)
        by_status = {status.value: found.get(status.value, 0) for status in Status}
        domains: dict[str, dict[str, int]] = {}
        for domain, status, count in domain_rows:
            domains.setdefault(domain, {})[status] = count
        by_domain = [
            DomainCount(
                domain=domain,
                total=sum(statuses.values()),
                by_status={s.value: statuses[s.value] for s in Status if s.value in statuses},
            )
            for domain, statuses in domains.items()
        ]
        by_domain.sort(key=lambda d: (-d.total, d.domain))
        if max_domains is not None:
            by_domain = by_domain[:max_domains]
        return Report(
            campaign=campaign,
            total=sum(by_status.values()),
            by_status=by_status,
            by_domain=by_domain,
            by_smtp_code=[ReplyCount(code=c, count=n, example_reply=text) for c, n, text in code_rows],
            unknown_outcome=[delivery_from_row(row) for row in unknown_rows],
            sends_over_time=[TimeCount(start=hour, sent=count) for hour, count in hour_rows],
        )

    def campaigns(self) -> list[CampaignSummary]:
        """Every campaign in the log (deliveries or runs), most recently active first."""
        with self._guard as conn:
            rows = conn.execute(
                """
                SELECT campaign, sum(recipients), max(last_at) FROM (
                    SELECT campaign, count(*) AS recipients, max(updated_at) AS last_at
                        FROM deliveries GROUP BY campaign
                    UNION ALL
                    SELECT campaign, 0, max(coalesce(finished_at, started_at)) FROM runs GROUP BY campaign
                ) GROUP BY campaign ORDER BY max(last_at) DESC, campaign
                """
            ).fetchall()
        return [CampaignSummary(name=name, recipients=count, last_activity=last) for name, count, last in rows]

    def write_failed_csv(self, campaign: str, file: TextIO) -> int:
        """Write the ``failed`` and ``deferred`` rows of ``campaign`` as CSV to ``file``.

        The header is ``email,status,smtp_code,smtp_reply``, so the file can be given
        back to ``mailer send`` as a contacts file. Returns the number of rows written.
        """
        with self._guard as conn:
            rows = conn.execute(
                """
                SELECT coalesce(address, recipient), status, smtp_code, smtp_reply FROM deliveries
                WHERE campaign = ? AND status IN ('failed', 'deferred')
                ORDER BY line IS NULL, line, recipient
                """,
                (campaign,),
            ).fetchall()
        writer = csv.writer(file, lineterminator="\n")
        writer.writerow(FAILED_CSV_HEADER)
        for recipient, status, code, reply in rows:
            writer.writerow((recipient, status, "" if code is None else code, reply or ""))
        return len(rows)

    # --- runs ---

    def start_run(self, campaign: str, *, template: str | None, contacts: str | None) -> int:
        """Record the start of a ``mailer send`` run; returns its id for :meth:`finish_run`."""
        with self._guard as conn:
            cursor = conn.execute(
                "INSERT INTO runs (campaign, template, contacts, pid, host, started_at) VALUES (?, ?, ?, ?, ?, ?)",
                (campaign, template, contacts, os.getpid(), socket.gethostname(), self._now()),
            )
            run_id = cursor.lastrowid
        if run_id is None:  # sqlite3 sets it after every successful INSERT
            raise SendLogError("the send log did not return the new run's id.", path=str(self.path))
        return run_id

    def finish_run(self, run_id: int, *, counts: Mapping[str, int], interrupted: bool) -> None:
        """Record the end of a run with its counts by status and whether it was interrupted."""
        with self._guard as conn:
            cursor = conn.execute(
                "UPDATE runs SET finished_at = ?, interrupted = ?, counts = ? WHERE id = ?",
                (self._now(), int(interrupted), json.dumps(dict(counts)), run_id),
            )
        if cursor.rowcount != 1:
            raise ValueError(f"no run with id {run_id} in {self.path}")

    def list_runs(self, campaign: str | None = None) -> list[Run]:
        """The recorded runs, oldest first, of one campaign or of all."""
        where, params = ("WHERE campaign = ?", (campaign,)) if campaign is not None else ("", ())
        with self._guard as conn:
            rows = conn.execute(
                "SELECT id, campaign, template, contacts, pid, host, started_at, finished_at, interrupted, counts "
                f"FROM runs {where} ORDER BY id",
                params,
            ).fetchall()
        return [
            Run(
                id=row[0],
                campaign=row[1],
                template=row[2],
                contacts=row[3],
                pid=row[4],
                host=row[5],
                started_at=row[6],
                finished_at=row[7],
                interrupted=None if row[8] is None else bool(row[8]),
                counts=None if row[9] is None else json.loads(row[9]),
            )
            for row in rows
        ]

    # --- the campaign lock and the journal ---

    def journal_path(self, campaign: str) -> Path:
        """The delivery journal of ``campaign``, beside the send log."""
        return campaign_file_path(self.path, campaign, "journal")

    def acquire_lock(self, campaign: str) -> CampaignLock:
        """Lock ``campaign`` against a second run on this send log, or raise :class:`LockedError`."""
        return CampaignLock.acquire(campaign_lock_path(self.path, campaign), campaign, clock=self._clock)

    # --- suppressions ---

    def add_suppressions(
        self, addresses: Iterable[str], *, reason: str | None = None, source: str = "manual"
    ) -> tuple[int, int]:
        """Add addresses to the suppression list; returns ``(added, already_present)``.

        Every address is checked first: an invalid one raises :class:`UsageError` and
        nothing is added. ``source`` is ``manual``, ``import`` or ``bounce``.
        """
        if isinstance(addresses, str):
            addresses = [addresses]
        entries = []
        for address in addresses:
            problem = address_problem(address)
            if problem:
                raise UsageError(
                    f"{address!r} is not a valid email address ({problem}).",
                    hint="Nothing was added; fix or drop that address and run again.",
                )
            entries.append((address_key(address), reason))
        return self._insert_suppressions(entries, source=source)

    def _insert_suppressions(self, entries: list[tuple[str, str | None]], *, source: str) -> tuple[int, int]:
        if source not in SUPPRESSION_SOURCES:
            raise ValueError(f"source must be one of {', '.join(SUPPRESSION_SOURCES)}, not {source!r}")
        now = self._now()
        with self._guard as conn:
            before = conn.total_changes
            conn.execute("BEGIN IMMEDIATE")
            try:
                conn.executemany(_SUPPRESSION_SQL, ((address, reason, source, now) for address, reason in entries))
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
            added = conn.total_changes - before
        return added, len(entries) - added

    def remove_suppressions(self, addresses: Iterable[str]) -> int:
        """Take addresses off the suppression list; returns how many were on it."""
        if isinstance(addresses, str):
            addresses = [addresses]
        keys = {address_key(address) for address in addresses}
        removed = 0
        with self._guard as conn:
            conn.execute("BEGIN IMMEDIATE")
            try:
                for key in keys:
                    removed += conn.execute("DELETE FROM suppressions WHERE address = ?", (key,)).rowcount
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
        return removed

    def list_suppressions(self, *, batch_size: int = 1000) -> Iterator[Suppression]:
        """Every suppressed address, in address order.

        Reads in batches, each a short query of its own, so a long listing neither
        holds the lock nor keeps a read transaction open while the caller works.
        """
        last = ""
        while True:
            with self._guard as conn:
                rows = conn.execute(
                    "SELECT address, reason, source, added_at FROM suppressions WHERE address > ? "
                    "ORDER BY address LIMIT ?",
                    (last, batch_size),
                ).fetchall()
            for row in rows:
                yield Suppression(*row)
            if len(rows) < batch_size:
                return
            last = rows[-1][0]

    def import_suppressions(
        self, file_path: Path, *, reason: str | None = None, source: str = "import"
    ) -> ImportResult:
        """Add the addresses of a file to the suppression list.

        The file is either a CSV whose header has an ``email`` (or ``e-mail``, ``mail``)
        column, found case-insensitively, with an optional ``reason`` column; or one
        address per line, where blank lines and ``#`` comments are ignored. Lines with no
        valid address are returned in ``invalid`` and the others are still added.
        """
        file_path = Path(file_path)
        try:
            text = file_path.read_text(encoding="utf-8-sig")
        except FileNotFoundError:
            raise ContactsError("file not found.", path=str(file_path)) from None
        except UnicodeDecodeError as exc:
            raise ContactsError(
                f"not valid UTF-8 (byte {exc.start}).", path=str(file_path), hint="Re-save the file as UTF-8."
            ) from None
        except OSError as exc:
            raise ContactsError(f"cannot read the file ({exc.strerror}).", path=str(file_path)) from None
        parsed = parse_address_file(text, path=file_path, default_reason=reason)
        entries: list[tuple[str, str | None]] = []
        invalid: list[InvalidEntry] = []
        for line, value, row_reason in parsed:
            if address_problem(value):
                invalid.append(InvalidEntry(line, value))
            else:
                entries.append((address_key(value), row_reason))
        added, already = self._insert_suppressions(entries, source=source)
        return ImportResult(added=added, already_present=already, invalid=invalid)
