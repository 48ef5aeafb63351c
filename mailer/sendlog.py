"""The send log: what happened to whom, kept in SQLite so a re-run can resume.

One row per (campaign, recipient) holds the status, the number of attempts, the last
SMTP reply, the Message-ID and the times. The same database keeps the run history
and the suppression list. Every write is committed at once (WAL journal,
``synchronous=NORMAL``), so a killed process loses nothing it already recorded; a row
left in status ``sending`` means the process died during the SMTP transaction and
the outcome is unknown.

A :class:`SendLog` holds one connection shared by the delivery worker threads behind
a lock. :meth:`SendLog.acquire_lock` takes an exclusive ``flock`` per campaign so two
runs of the same campaign (cron overlap) cannot interleave.

The schema has a version (``PRAGMA user_version``) and migrates forward through
:data:`MIGRATIONS`; to change the schema, append a step.
"""

from __future__ import annotations

import csv
import dataclasses
import fcntl
import hashlib
import io
import json
import os
import re
import socket
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from enum import StrEnum
from pathlib import Path
from types import TracebackType
from typing import Any, NamedTuple, TextIO

from email_validator import EmailNotValidError, validate_email

from .contacts import check_address as check_contact_address
from .errors import ContactsError, LockedError, SendLogError, UsageError

__all__ = [
    "Status",
    "SendLog",
    "CampaignLock",
    "Delivery",
    "Report",
    "DomainCount",
    "ReplyCount",
    "CampaignSummary",
    "Run",
    "Suppression",
    "ImportResult",
    "InvalidEntry",
    "MIGRATIONS",
    "SCHEMA_VERSION",
    "SUPPRESSION_SOURCES",
    "FAILED_CSV_HEADER",
    "normalize_address",
    "check_address",
    "should_send",
    "campaign_lock_path",
]


class Status(StrEnum):
    """The status of one recipient in one campaign (compares equal to its string)."""

    SENT = "sent"
    FAILED = "failed"  # permanent failure (5xx)
    DEFERRED = "deferred"  # temporary failure, retries used up
    INVALID = "invalid"  # the contact row could not be used
    SUPPRESSED = "suppressed"  # on the suppression list
    SENDING = "sending"  # handed to the server, outcome unknown


_STATUS_BY_VALUE = {status.value: status for status in Status}
_RESULT_STATUSES = frozenset({Status.SENT, Status.FAILED, Status.DEFERRED})

# One statement for both kinds of delivery event, so that a batch of them runs in order
# through one executemany. "sending" counts an attempt and keeps the last reply; an
# outcome records the reply and keeps the attempts.
_EVENT_SQL = """
    INSERT INTO deliveries (campaign, recipient, domain, status, attempts, smtp_code, smtp_reply,
                            message_id, line, first_at, updated_at)
    VALUES (?, ?, ?, ?, 1, ?, ?, ?, ?, ?, ?)
    ON CONFLICT (campaign, recipient) DO UPDATE SET
        status = excluded.status,
        attempts = attempts + (excluded.status = 'sending'),
        smtp_code = CASE WHEN excluded.status = 'sending' THEN smtp_code ELSE excluded.smtp_code END,
        smtp_reply = CASE WHEN excluded.status = 'sending' THEN smtp_reply ELSE excluded.smtp_reply END,
        message_id = coalesce(excluded.message_id, message_id),
        line = coalesce(excluded.line, line),
        reason = CASE WHEN excluded.status = 'sending' THEN NULL ELSE reason END,
        updated_at = excluded.updated_at
"""
_SUPPRESSION_SQL = (
    "INSERT INTO suppressions (address, reason, source, added_at) VALUES (?, ?, ?, ?) ON CONFLICT (address) DO NOTHING"
)
_SKIPPED_STATUSES = frozenset({Status.INVALID, Status.SUPPRESSED})
SUPPRESSION_SOURCES = ("manual", "import", "bounce")
FAILED_CSV_HEADER = ("email", "status", "smtp_code", "smtp_reply")

# "MLR1": marks the file as a mailer send log (``PRAGMA application_id``).
_APPLICATION_ID = 0x4D4C5231

# Each step takes the schema from version N to N + 1 and runs in the same transaction
# as the ``user_version`` update. Never edit a released step; append a new one.
MIGRATIONS: tuple[tuple[str, ...], ...] = (
    # 1: deliveries, runs, suppressions.
    (
        f"PRAGMA application_id = {_APPLICATION_ID}",
        """
        CREATE TABLE deliveries (
            campaign    TEXT NOT NULL,
            recipient   TEXT NOT NULL,   -- normalize_address(), or the raw value of an invalid row
            domain      TEXT NOT NULL,   -- lower-cased part after the last '@'; '' when there is none
            status      TEXT NOT NULL,
            attempts    INTEGER NOT NULL DEFAULT 0,
            smtp_code   INTEGER,
            smtp_reply  TEXT,
            message_id  TEXT,
            line        INTEGER,         -- line in the contacts file
            reason      TEXT,            -- why a row is invalid or suppressed
            first_at    TEXT NOT NULL,   -- UTC ISO 8601
            updated_at  TEXT NOT NULL,
            PRIMARY KEY (campaign, recipient)
        ) WITHOUT ROWID
        """,
        """
        CREATE TABLE runs (
            id           INTEGER PRIMARY KEY,
            campaign     TEXT NOT NULL,
            template     TEXT,
            contacts     TEXT,
            pid          INTEGER NOT NULL,
            host         TEXT NOT NULL,
            started_at   TEXT NOT NULL,
            finished_at  TEXT,
            interrupted  INTEGER,
            counts       TEXT            -- JSON object: status -> count
        )
        """,
        # NOCASE: an unsubscribe from jane@ must also stop mail to Jane@, even though the
        # local part is case-sensitive in theory (RFC 5321 2.4); mailing someone who
        # opted out is the worse mistake.
        """
        CREATE TABLE suppressions (
            address   TEXT NOT NULL PRIMARY KEY COLLATE NOCASE,
            reason    TEXT,
            source    TEXT NOT NULL,
            added_at  TEXT NOT NULL
        ) WITHOUT ROWID
        """,
    ),
    # 2: counts, report and the retry CSV select by status within a campaign.
    (
        "CREATE INDEX deliveries_campaign_status ON deliveries (campaign, status)",
        "CREATE INDEX runs_campaign ON runs (campaign)",
    ),
    # 3: how much of a run's delivery journal is applied (mailer.journal). The index on
    # every status made each log write 30-40 % dearer in a micro-benchmark (each message
    # changes its status twice); only the rare statuses the retry CSV selects keep one.
    (
        "ALTER TABLE runs ADD COLUMN journal_applied INTEGER",
        "DROP INDEX deliveries_campaign_status",
        "CREATE INDEX deliveries_campaign_retry ON deliveries (campaign, status) "
        "WHERE status IN ('failed', 'deferred')",
    ),
)
SCHEMA_VERSION = len(MIGRATIONS)

_EMAIL_COLUMNS = ("email", "e-mail", "mail", "email address", "e-mail address")
_CSV_DELIMITERS = ",;\t"


# --- pure helpers -----------------------------------------------------------------


def normalize_address(address: str) -> str:
    """The key of an address in the send log and the suppression list.

    Surrounding white space is dropped and the domain (after the last ``@``) is
    lower-cased; the local part is kept as written. ``Jane@Example.COM`` gives
    ``Jane@example.com``. A value without ``@`` comes back stripped but otherwise
    unchanged, so invalid rows can be logged under their raw value.
    """
    address = address.strip()
    local, at, domain = address.rpartition("@")
    if not at:
        return address
    return f"{local}@{domain.lower()}"


def _domain_of(normalized: str) -> str:
    local, at, domain = normalized.rpartition("@")
    return domain if at else ""


def _idna_twin(normalized: str) -> str | None:
    """The address with its domain in the other IDNA form, or None if it has only one.

    ``ann@bücher.example`` <-> ``ann@xn--bcher-kva.example``: contacts are mailed and
    bounce-suppressed under the ASCII form, while people type the Unicode one into
    ``mailer suppress``; both must find the same suppression.
    """
    local, at, domain = normalized.rpartition("@")
    if not at or (domain.isascii() and "xn--" not in domain):
        return None
    try:
        checked = validate_email(f"x@{domain}", check_deliverability=False)
    except EmailNotValidError:
        return None
    other = (checked.domain if domain.isascii() else checked.ascii_domain).lower()
    return f"{local}@{other}" if other and other != domain else None


def check_address(address: str) -> str | None:
    """Why ``address`` is not a syntactically valid email address, or None if it is.

    The same rule as the contacts reader (no DNS lookups): every address mailer can
    mail can be suppressed, including hard bounces at internal domains (``.local``).
    """
    if not address.strip():
        return "the address is empty"
    try:
        check_contact_address(address)
    except ValueError as exc:
        return str(exc)
    return None


def should_send(status: str | None, *, resend_unknown: bool = False) -> bool:
    """The resume rule: may a recipient with this logged ``status`` be mailed now?

    Never logged and ``deferred`` recipients are mailed; ``sending`` ones (outcome
    unknown) only when ``resend_unknown`` is true; ``sent``, ``failed``, ``invalid``
    and ``suppressed`` ones never again.
    """
    if status is None or status == Status.DEFERRED:
        return True
    if status == Status.SENDING:
        return resend_unknown
    if status in _STATUS_BY_VALUE:
        return False
    raise ValueError(f"unknown send-log status {status!r}")


def campaign_file_path(db_path: Path, campaign: str, suffix: str) -> Path:
    """A file of ``campaign`` (its ``lock``, its ``journal``) beside the send log at ``db_path``.

    The name keeps the safe characters of the campaign for people reading the folder
    and adds a hash of the full name, so any campaign name gives a distinct, safe
    file name.
    """
    readable = re.sub(r"[^A-Za-z0-9._-]+", "_", campaign).strip("._")[:40] or "campaign"
    digest = hashlib.sha256(campaign.encode("utf-8")).hexdigest()[:10]
    return db_path.with_name(f"{db_path.name}.{readable}.{digest}.{suffix}")


def campaign_lock_path(db_path: Path, campaign: str) -> Path:
    """The lock file of ``campaign`` beside the send log at ``db_path``."""
    return campaign_file_path(db_path, campaign, "lock")


def _utc_now() -> datetime:
    return datetime.now(timezone.utc)


# --- records ------------------------------------------------------------------------


@dataclass(frozen=True)
class Delivery:
    """One (campaign, recipient) row of the send log."""

    campaign: str
    recipient: str
    status: Status
    attempts: int
    smtp_code: int | None
    smtp_reply: str | None
    message_id: str | None
    line: int | None
    reason: str | None
    first_at: str
    updated_at: str


_DELIVERY_COLUMNS = (
    "campaign, recipient, status, attempts, smtp_code, smtp_reply, message_id, line, reason, first_at, updated_at"
)


def _delivery_from_row(row: tuple) -> Delivery:
    values = list(row)
    values[2] = _STATUS_BY_VALUE[values[2]]
    return Delivery(*values)


@dataclass(frozen=True)
class DomainCount:
    """How many recipients of one domain ended in each status."""

    domain: str
    total: int
    by_status: dict[str, int]


@dataclass(frozen=True)
class ReplyCount:
    """How many recipients got one SMTP reply code last, with one example reply text."""

    code: int
    count: int
    example_reply: str | None


@dataclass(frozen=True)
class Report:
    """What happened in one campaign (or in all of them when ``campaign`` is None)."""

    campaign: str | None
    total: int
    by_status: dict[str, int]
    by_domain: list[DomainCount]
    by_smtp_code: list[ReplyCount]
    unknown_outcome: list[Delivery] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serializable form, with a ``version`` for consumers of ``--json``."""
        data = dataclasses.asdict(self)
        for row in data["unknown_outcome"]:
            row["status"] = str(row["status"])
        return {"version": 1, **data}


@dataclass(frozen=True)
class CampaignSummary:
    """A campaign known to the send log, with its row count and last activity (UTC ISO)."""

    name: str
    recipients: int
    last_activity: str


@dataclass(frozen=True)
class Run:
    """One ``mailer send`` run, as recorded by :meth:`SendLog.start_run`."""

    id: int
    campaign: str
    template: str | None
    contacts: str | None
    pid: int
    host: str
    started_at: str
    finished_at: str | None
    interrupted: bool | None
    counts: dict[str, int] | None


@dataclass(frozen=True)
class Suppression:
    """An address that is never mailed again."""

    address: str
    reason: str | None
    source: str
    added_at: str


class InvalidEntry(NamedTuple):
    """A line of an imported suppression file that holds no valid address."""

    line: int
    value: str


@dataclass(frozen=True)
class ImportResult:
    """The outcome of :meth:`SendLog.import_suppressions`."""

    added: int
    already_present: int
    invalid: list[InvalidEntry]


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
            hint="Point [log] path in mailer.toml at another file, or move this one away; "
            "mailer creates a new send log when there is none.",
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


# --- the lock -----------------------------------------------------------------------


class CampaignLock:
    """An exclusive ``flock`` on one campaign of one send log.

    The kernel drops the lock when the holding process exits, even when it is killed,
    so a lock can never be left stale. The file holds the holder's pid, host and start
    time (JSON) for the message the next run shows. Use as a context manager or call
    :meth:`release`.
    """

    def __init__(self, path: Path, campaign: str, file: io.TextIOWrapper, holder: dict[str, Any]) -> None:
        self.path = path
        self.campaign = campaign
        self.holder = holder
        self._file: io.TextIOWrapper | None = file

    @classmethod
    def acquire(cls, path: Path, campaign: str, *, clock: Callable[[], datetime] = _utc_now) -> CampaignLock:
        """Take the lock at ``path`` now or raise :class:`LockedError` naming its holder."""
        try:
            # "a+" creates the file without truncating what the holder wrote.
            file = open(path, "a+", encoding="utf-8")
        except OSError as exc:
            raise SendLogError(
                f"cannot create the lock file for campaign {campaign!r} ({exc.strerror}).",
                path=str(path),
                hint="Check that the send log's folder is writable by this user.",
            ) from None
        try:
            fcntl.flock(file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            file.seek(0)
            text = file.read()
            file.close()
            raise _locked_error(path, campaign, text) from None
        except OSError as exc:
            file.close()
            raise SendLogError(
                f"cannot lock campaign {campaign!r} ({exc.strerror}).",
                path=str(path),
                hint="Keep the send log on a local file system that supports flock.",
            ) from None
        holder = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "campaign": campaign,
            "started_at": clock().isoformat(timespec="seconds"),
        }
        file.seek(0)
        file.truncate()
        file.write(json.dumps(holder))
        file.flush()
        return cls(path, campaign, file, holder)

    @property
    def held(self) -> bool:
        """Whether this object still holds the lock."""
        return self._file is not None

    def release(self) -> None:
        """Give the lock up (idempotent). The file stays: unlinking a lock file races."""
        file, self._file = self._file, None
        if file is None:
            return
        try:
            file.seek(0)
            file.truncate()
            file.flush()
        finally:
            fcntl.flock(file.fileno(), fcntl.LOCK_UN)
            file.close()

    def __enter__(self) -> CampaignLock:
        return self

    def __exit__(self, exc_type: type | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.release()


def _locked_error(path: Path, campaign: str, text: str) -> LockedError:
    try:
        holder = json.loads(text)
        pid, started = holder["pid"], holder["started_at"]
        host = holder.get("host")
    except (ValueError, KeyError, TypeError):
        # The holder took the lock but has not written its details yet.
        pid, started, host = "unknown", "just now", None
    on_host = f" on {host}" if host and host != socket.gethostname() else ""
    return LockedError(
        f"campaign {campaign!r} is already being sent by another run (pid {pid}{on_host}, started {started}).",
        path=str(path),
        hint="Wait for that run to finish, or stop it; the lock is freed as soon as the process exits. "
        "Two runs of one campaign at once could mail the same people twice.",
    )


# --- the send log -------------------------------------------------------------------


class SendLog:
    """The SQLite send log, run history and suppression list of one ``[log] path``.

    Open it with :meth:`SendLog.open`; it is a context manager. Every method is
    thread-safe and every write is committed before it returns.
    """

    def __init__(self, path: Path, conn: sqlite3.Connection, *, clock: Callable[[], datetime] = _utc_now) -> None:
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
    def open(cls, path: Path, *, create: bool = True, clock: Callable[[], datetime] = _utc_now) -> SendLog:
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
        try:
            conn = sqlite3.connect(path, timeout=10.0, isolation_level=None, check_same_thread=False)
        except sqlite3.Error as exc:
            raise _explain(exc, path) from None
        try:
            conn.execute("PRAGMA journal_mode = WAL").fetchone()
            # In WAL mode NORMAL keeps every commit across a process crash; only a power
            # loss can drop the last few, and it never corrupts the file.
            conn.execute("PRAGMA synchronous = NORMAL")
            _migrate(conn, path)
        except sqlite3.Error as exc:
            conn.close()
            raise _explain(exc, path) from None
        except BaseException:
            conn.close()
            raise
        return cls(path, conn, clock=clock)

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
            return conn.execute("PRAGMA user_version").fetchone()[0]

    def _fetch_one(self, sql: str, params: tuple) -> tuple | None:
        """One row of a point query, on the hot path of every contact.

        Same guarantees as ``_guard``, written out and on a reused cursor: at 100k calls
        per run the context-manager and cursor creation overhead is a third of the cost.
        """
        self._lock.acquire()
        try:
            cursor = self._point_cursor
            if cursor is None:
                raise SendLogError("the send log is closed.", path=str(self.path))
            return cursor.execute(sql, params).fetchone()
        except sqlite3.Error as exc:
            if isinstance(exc, sqlite3.ProgrammingError):
                raise
            raise _explain(exc, self.path) from exc
        finally:
            self._lock.release()

    def _now(self) -> str:
        if self._clock is not _utc_now:  # a test's clock
            return self._clock().astimezone(timezone.utc).isoformat(timespec="milliseconds")
        # Called twice per message on the delivery path: format the date and time once
        # per second and append the milliseconds (datetime costs ~10 µs a call here).
        now = time.time()
        second = int(now)
        if second != self._now_second:
            self._now_second = second
            self._now_prefix = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        return f"{self._now_prefix}.{int((now - second) * 1000):03d}+00:00"

    # --- deliveries ---

    def status_of(self, campaign: str, recipient: str) -> Status | None:
        """The logged status of ``recipient`` in ``campaign``, or None if never logged."""
        row = self._fetch_one(
            "SELECT status FROM deliveries WHERE campaign = ? AND recipient = ?",
            (campaign, normalize_address(recipient)),
        )
        return None if row is None else _STATUS_BY_VALUE[row[0]]

    def get_delivery(self, campaign: str, recipient: str) -> Delivery | None:
        """The whole logged row of ``recipient`` in ``campaign``, or None."""
        key = normalize_address(recipient)
        with self._guard as conn:
            row = conn.execute(
                f"SELECT {_DELIVERY_COLUMNS} FROM deliveries WHERE campaign = ? AND recipient = ?", (campaign, key)
            ).fetchone()
        return None if row is None else _delivery_from_row(row)

    def mark_sending(self, campaign: str, recipient: str, *, message_id: str, line: int | None = None) -> None:
        """Record that a message is about to be handed to the server (one more attempt).

        Call it just before the SMTP transaction: if the process dies before
        :meth:`record_result`, the row stays ``sending`` (outcome unknown).
        """
        self.record_events(campaign, [(recipient, Status.SENDING, None, None, message_id, line)])

    def record_result(
        self,
        campaign: str,
        recipient: str,
        *,
        status: str,
        smtp_code: int | None,
        smtp_reply: str | None,
        message_id: str | None = None,
    ) -> None:
        """Record the outcome of an SMTP transaction: ``sent``, ``failed`` or ``deferred``.

        ``smtp_code`` may be None when there was no reply (dropped connection, timeout);
        then ``smtp_reply`` should say what happened.
        """
        if status not in _RESULT_STATUSES:
            raise ValueError(f"record_result() takes sent, failed or deferred, not {status!r}")
        self.record_events(campaign, [(recipient, status, smtp_code, smtp_reply, message_id, None)])

    def record_events(
        self,
        campaign: str,
        events: Iterable[tuple],
        *,
        journal: tuple[int, int] | None = None,
        bounces: Iterable[tuple[str, str]] = (),
    ) -> None:
        """Apply delivery events in order, in ONE transaction (one commit for them all).

        Each event is ``(recipient, status, smtp_code, smtp_reply, message_id, line)``:
        status ``sending`` is :meth:`mark_sending` (one more attempt; the last reply is
        kept), ``sent`` / ``failed`` / ``deferred`` is :meth:`record_result`. The
        delivery process groups the events of several workers this way: a commit each
        would cost more than the SMTP transaction itself.

        ``journal=(run_id, offset)`` records, in the same transaction, that the run's
        journal is applied up to ``offset`` (:mod:`mailer.journal`); ``bounces`` are
        ``(address, reason)`` pairs for the suppression list (source ``bounce``).
        """
        now = self._now()
        rows = []
        for recipient, status, smtp_code, smtp_reply, message_id, line in events:
            if status != Status.SENDING and status not in _RESULT_STATUSES:
                raise ValueError(f"a delivery event is sending, sent, failed or deferred, not {status!r}")
            key = normalize_address(recipient)
            rows.append((campaign, key, _domain_of(key), str(status), smtp_code, smtp_reply, message_id, line, now, now))
        bounces = [(normalize_address(address), reason, "bounce", now) for address, reason in bounces]
        if not rows and journal is None:
            return
        with self._guard as conn:
            if len(rows) == 1 and journal is None and not bounces:
                conn.execute(_EVENT_SQL, rows[0])
                return
            conn.execute("BEGIN IMMEDIATE")
            try:
                conn.executemany(_EVENT_SQL, rows)
                if bounces:
                    conn.executemany(_SUPPRESSION_SQL, bounces)
                if journal is not None:
                    conn.execute("UPDATE runs SET journal_applied = ? WHERE id = ?", (journal[1], journal[0]))
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")

    def journal_applied(self, run_id: int) -> int | None:
        """How far the run's delivery journal is applied (None: not at all yet)."""
        row = self._fetch_one("SELECT journal_applied FROM runs WHERE id = ?", (run_id,))
        if row is None:
            raise ValueError(f"no run with id {run_id} in {self.path}")
        return row[0]

    def set_journal_applied(self, run_id: int, offset: int) -> None:
        with self._guard as conn:
            conn.execute("UPDATE runs SET journal_applied = ? WHERE id = ?", (offset, run_id))

    def record_skipped(self, campaign: str, recipient: str, *, status: str, reason: str, line: int | None) -> None:
        """Record a contact that is not mailed: ``invalid`` (bad row) or ``suppressed``.

        ``recipient`` may be any string (the raw value of a bad address); an empty one
        is logged as ``"line N"``.
        """
        if status not in _SKIPPED_STATUSES:
            raise ValueError(f"record_skipped() takes invalid or suppressed, not {status!r}")
        key = normalize_address(recipient)
        if not key:
            key = f"line {line}" if line is not None else "(empty)"
        now = self._now()
        with self._guard as conn:
            conn.execute(
                """
                INSERT INTO deliveries (campaign, recipient, domain, status, line, reason, first_at, updated_at)
                VALUES (?, ?, ?, ?, ?, ?, ?, ?)
                ON CONFLICT (campaign, recipient) DO UPDATE SET
                    status = excluded.status,
                    line = coalesce(excluded.line, line),
                    reason = excluded.reason,
                    updated_at = excluded.updated_at
                """,
                (campaign, key, _domain_of(key), str(status), line, reason, now, now),
            )

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
                {where + (' AND' if where else 'WHERE')} smtp_code IS NOT NULL
                GROUP BY smtp_code ORDER BY count(*) DESC, smtp_code
                """,
                params,
            ).fetchall()
            unknown_rows = conn.execute(
                f"""
                SELECT {_DELIVERY_COLUMNS} FROM deliveries
                {where + (' AND' if where else 'WHERE')} status = 'sending'
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
            unknown_outcome=[_delivery_from_row(row) for row in unknown_rows],
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
                SELECT recipient, status, smtp_code, smtp_reply FROM deliveries
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
            return cursor.lastrowid

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
                *row[:8],
                interrupted=None if row[8] is None else bool(row[8]),
                counts=None if row[9] is None else json.loads(row[9]),
            )
            for row in rows
        ]

    # --- the campaign lock ---

    def acquire_lock(self, campaign: str) -> CampaignLock:
        """Lock ``campaign`` against a second run on this send log, or raise :class:`LockedError`."""
        return CampaignLock.acquire(campaign_lock_path(self.path, campaign), campaign, clock=self._clock)

    # --- suppressions ---

    def is_suppressed(self, address: str) -> bool:
        """Whether ``address`` is on the suppression list (the local part's case is ignored,
        and so is the form of an internationalized domain)."""
        key = normalize_address(address)
        twin = _idna_twin(key)
        if twin is None:
            return self._fetch_one("SELECT 1 FROM suppressions WHERE address = ?", (key,)) is not None
        return self._fetch_one("SELECT 1 FROM suppressions WHERE address IN (?, ?)", (key, twin)) is not None

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
            problem = check_address(address)
            if problem:
                raise UsageError(
                    f"{address!r} is not a valid email address ({problem}).",
                    hint="Nothing was added; fix or drop that address and run again.",
                )
            entries.append((normalize_address(address), reason))
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
        keys = []
        for address in addresses:
            key = normalize_address(address)
            keys.append((key, _idna_twin(key) or key))
        removed = 0
        with self._guard as conn:
            conn.execute("BEGIN IMMEDIATE")
            try:
                for key in keys:
                    removed += conn.execute("DELETE FROM suppressions WHERE address IN (?, ?)", key).rowcount > 0
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

    def iter_recipients(self, campaign: str, *, batch_size: int = 5000) -> Iterator[str]:
        """Every recipient logged for ``campaign`` (any status), in batches of short queries."""
        last = ""
        while True:
            with self._guard as conn:
                rows = conn.execute(
                    "SELECT recipient FROM deliveries WHERE campaign = ? AND recipient > ? ORDER BY recipient LIMIT ?",
                    (campaign, last, batch_size),
                ).fetchall()
            for (recipient,) in rows:
                yield recipient
            if len(rows) < batch_size:
                return
            last = rows[-1][0]

    def iter_suppressed_keys(self) -> Iterator[str]:
        """Every suppressed address in lower case, in both IDNA forms where it has two.

        For a fast in-memory prefilter; :meth:`is_suppressed` stays the authority.
        """
        for row in self.list_suppressions(batch_size=5000):
            address = row.address.lower()
            yield address
            twin = _idna_twin(address)
            if twin:
                yield twin

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
        parsed = _parse_address_file(text, path=file_path, default_reason=reason)
        entries: list[tuple[str, str | None]] = []
        invalid: list[InvalidEntry] = []
        for line, value, row_reason in parsed:
            if check_address(value):
                invalid.append(InvalidEntry(line, value))
            else:
                entries.append((normalize_address(value), row_reason))
        added, already = self._insert_suppressions(entries, source=source)
        return ImportResult(added=added, already_present=already, invalid=invalid)


def _parse_address_file(text: str, *, path: Path, default_reason: str | None) -> list[tuple[int, str, str | None]]:
    """``(line number, raw value, reason)`` for every entry of a CSV or plain address list."""
    lines = text.splitlines()
    first = next((i for i, line in enumerate(lines) if line.strip() and not line.lstrip().startswith("#")), None)
    if first is None:
        return []
    header_line = lines[first]
    delimiter = max(_CSV_DELIMITERS, key=header_line.count)
    header = [cell.strip().lower() for cell in next(csv.reader([header_line], delimiter=delimiter))]
    email_column = next((header.index(name) for name in _EMAIL_COLUMNS if name in header), None)
    if email_column is None:
        if len(header) > 1:
            raise ContactsError(
                f"this looks like a CSV file but has no email column (columns: {', '.join(header)}).",
                path=str(path),
                line=first + 1,
                hint="Name the address column 'email', or give one address per line.",
            )
        entries = []
        for number, line in enumerate(lines, start=1):
            value = line.strip()
            if value and not value.startswith("#"):
                entries.append((number, value, default_reason))
        return entries
    reason_column = header.index("reason") if "reason" in header else None
    reader = csv.reader(io.StringIO("\n".join(lines[first:])), delimiter=delimiter)
    next(reader)
    entries = []
    for row in reader:
        if not row or (len(row) == 1 and not row[0].strip()) or row[0].lstrip().startswith("#"):
            continue
        number = first + reader.line_num
        value = row[email_column].strip() if email_column < len(row) else ""
        row_reason = default_reason
        if reason_column is not None and reason_column < len(row) and row[reason_column].strip():
            row_reason = row[reason_column].strip()
        entries.append((number, value, row_reason))
    return entries


def _migrate(conn: sqlite3.Connection, path: Path) -> None:
    """Bring the schema up to :data:`SCHEMA_VERSION`, or refuse a file that is not ours."""
    version = conn.execute("PRAGMA user_version").fetchone()[0]
    if version == SCHEMA_VERSION:
        return
    # IMMEDIATE: two processes opening a new log at once must not both migrate it.
    conn.execute("BEGIN IMMEDIATE")
    try:
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        application_id = conn.execute("PRAGMA application_id").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise SendLogError(
                f"the send log has schema version {version}, newer than this mailer knows ({SCHEMA_VERSION}).",
                path=str(path),
                hint="A newer mailer wrote it: upgrade mailer (pip install -U mailer), or use another [log] path.",
            )
        foreign_tables = version == 0 and conn.execute("SELECT count(*) FROM sqlite_master").fetchone()[0] > 0
        if application_id not in (0, _APPLICATION_ID) or foreign_tables:
            raise SendLogError(
                "this is a SQLite database, but not a mailer send log.",
                path=str(path),
                hint="Point [log] path in mailer.toml at a file of its own.",
            )
        for step in MIGRATIONS[version:]:
            for statement in step:
                conn.execute(statement)
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
