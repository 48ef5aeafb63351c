"""The send log in PostgreSQL (``[log] url = "postgresql://..."``), for sends from several machines.

The same tables, statuses and guarantees as the SQLite log (:mod:`mailer.store.sqlite`):
``sending`` is recorded before each SMTP transaction and the outcome after it (through
the local delivery journal, :mod:`mailer.send.journal`, whose batches arrive here as one
transaction each), so a killed run leaves ``sending`` rows — unknown outcomes — and
nothing is sent twice. Questions come in bulk (``= ANY(array)``), writes in pipelined
batches: no round trip per contact.

The schema version lives in ``mailer_schema``; the steps are those of
:mod:`mailer.store.migrations`, in PostgreSQL's dialect (:data:`PG_MIGRATIONS`).

The delivery journals and the campaign lock files are local files (beside ``[log] path``).
Sends of one campaign cooperate (:mod:`mailer.store.pg_work`: claims, leases, the shared
rate); the campaign lock, also a session advisory lock in the database (dropped by the
server when the holder's connection ends, even when it is killed), guards only what
needs one holder: applying the journal an earlier, single-run send left.

Errors: a server that cannot be reached, a bad password or a missing database is a
:class:`SendLogError` naming host, port and database (exit 2, before anything is sent);
a connection lost later is a :class:`StoreUnavailableError` (exit 75). Passwords never
appear in either.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import re
import socket
import threading
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, TextIO
from urllib.parse import urlsplit

import psycopg

if TYPE_CHECKING:
    from psycopg_pool import ConnectionPool

from ..core.addresses import address_key, address_problem, domain_of
from ..core.config import LogConfig
from ..core.errors import ContactsError, LockedError, SendLogError, StoreUnavailableError, UsageError
from ..core.outcomes import RESULT_STATUSES, SKIPPED_STATUSES, STATUS_BY_VALUE, DeliveryEvent, Status
from ..core.tokens import recipient_tag
from .imports import parse_address_file
from .locks import CampaignLock, campaign_file_path, campaign_lock_path
from .migrations import PG_MIGRATIONS, SCHEMA_VERSION
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
    delivery_from_row,
)

__all__ = ["PostgresStore", "connect", "read_schema_version"]


_EVENT_SQL = """
    INSERT INTO deliveries AS d (campaign, recipient, address, domain, status, attempts, smtp_code, smtp_reply,
                                 message_id, line, first_at, updated_at, recipient_tag)
    VALUES (%s, %s, %s, %s, %s, 1, %s, %s, %s, %s, %s, %s, %s)
    ON CONFLICT (campaign, recipient) DO UPDATE SET
        address = excluded.address,
        status = excluded.status,
        attempts = d.attempts + (excluded.status = 'sending')::int,
        smtp_code = CASE WHEN excluded.status = 'sending' THEN d.smtp_code ELSE excluded.smtp_code END,
        smtp_reply = CASE WHEN excluded.status = 'sending' THEN d.smtp_reply ELSE excluded.smtp_reply END,
        message_id = coalesce(excluded.message_id, d.message_id),
        line = coalesce(excluded.line, d.line),
        reason = CASE WHEN excluded.status = 'sending' THEN NULL ELSE d.reason END,
        recipient_tag = coalesce(d.recipient_tag, excluded.recipient_tag),
        updated_at = excluded.updated_at
"""
_SKIPPED_SQL = """
    INSERT INTO deliveries AS d (campaign, recipient, address, domain, status, line, reason, first_at, updated_at,
                                 recipient_tag)
    VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s)
    ON CONFLICT (campaign, recipient) DO UPDATE SET
        address = excluded.address,
        status = excluded.status,
        line = coalesce(excluded.line, d.line),
        reason = excluded.reason,
        updated_at = excluded.updated_at
    WHERE d.status NOT IN ('sent', 'failed', 'sending')
"""
_SUPPRESSION_SQL = (
    "INSERT INTO suppressions (address, reason, source, added_at) VALUES (%s, %s, %s, %s) "
    "ON CONFLICT (address) DO NOTHING"
)
_FEEDBACK_SQL = """
    INSERT INTO feedback (campaign, recipient, kind, at, detail, source, ref) VALUES (%s, %s, %s, %s, %s, %s, %s)
    ON CONFLICT (kind, ref) WHERE ref IS NOT NULL DO NOTHING
"""
_FEEDBACK_KINDS = frozenset(kind.value for kind in FeedbackKind)
_CONNECT_TIMEOUT = 10


def _lock_key(campaign: str) -> int:
    """The advisory lock number of a campaign: 63 bits of a hash of its name."""
    return int.from_bytes(hashlib.sha256(b"mailer campaign " + campaign.encode()).digest()[:8], "big") >> 1


def _now() -> str:
    now = time.time()
    second = int(now)
    return f"{time.strftime('%Y-%m-%dT%H:%M:%S', time.gmtime(second))}.{int((now - second) * 1000):03d}+00:00"


class _Target:
    """Host, port and database of a URL, for messages (never the password)."""

    def __init__(self, url: str) -> None:
        parts = urlsplit(url)
        self.host = parts.hostname or os.environ.get("PGHOST") or "localhost"
        self.port = parts.port or int(os.environ.get("PGPORT") or 5432)
        self.database = parts.path.lstrip("/") or os.environ.get("PGDATABASE") or ""
        self.user = parts.username or os.environ.get("PGUSER") or ""

    def __str__(self) -> str:
        return f"PostgreSQL at {self.host}:{self.port}, database {self.database!r}"


def _scrub(text: str, password: str | None) -> str:
    text = " ".join(text.split()).rstrip(".")  # the caller ends the sentence
    if password:
        text = text.replace(password, "***")
    return text


def connect(config: LogConfig) -> tuple[psycopg.Connection[Any], _Target]:
    """One autocommit connection to ``config.url``, and what to call the database in messages.

    A server that cannot be reached, a bad password or a missing database is a
    :class:`SendLogError` naming host, port and database, never the password.
    """
    if config.url is None:
        raise ValueError("PostgreSQL needs [log] url")
    target = _Target(config.url)
    password = config.password
    try:
        conn = psycopg.connect(
            config.url,
            password=password,
            connect_timeout=_CONNECT_TIMEOUT,
            application_name="mailer",
            autocommit=True,
        )
    except psycopg.Error as exc:
        raise SendLogError(
            f"cannot connect to {target}: {_scrub(str(exc), password)}.",
            hint="Check that the server runs and is reachable, that the database exists "
            f"(createdb {target.database}), and the user and password "
            f"(PGPASSWORD or [log] password_env; user {target.user or '(default)'})."
            + ("" if password or config.password_env else " No password was given."),
        ) from None
    return conn, target


def read_schema_version(conn: psycopg.Connection[Any]) -> int | None:
    """The schema version of the send log in this database (None: no send log yet); reads only."""
    if conn.execute("SELECT to_regclass('mailer_schema')").fetchone() == (None,):
        return None
    row = conn.execute("SELECT version FROM mailer_schema").fetchone()
    return None if row is None else int(row[0])


class _HeldLock(CampaignLock):
    """The local campaign lock plus the campaign's advisory lock in the database."""

    def __init__(self, local: CampaignLock, store: PostgresStore, key: int) -> None:
        file = local._file
        if file is None:
            raise ValueError("the local campaign lock is no longer held")
        super().__init__(local.path, local.campaign, file, local.holder)
        local._file = None  # handed over
        self._store: PostgresStore | None = store
        self._key = key

    def release(self) -> None:
        store, self._store = self._store, None
        try:
            if store is not None:
                store._advisory_unlock(self._key)
        finally:
            super().release()


class PostgresStore:
    """The send log, run history and suppression list in one PostgreSQL database.

    Open it with :meth:`PostgresStore.open`; it is a context manager. One connection
    shared by threads behind a lock (what a ``send`` needs: its advisory lock and claims
    live on that session), or, opened with ``pool_size`` (``mailer serve``), a pool of
    connections that concurrent requests use at once and that replaces a connection the
    server dropped. Every write is committed before it returns.
    """

    def __init__(self, config: LogConfig, conn: psycopg.Connection[Any], target: _Target) -> None:
        self._config = config
        self._conn: psycopg.Connection[Any] | None = conn
        self._target = target
        self._lock = threading.Lock()
        self._pool: ConnectionPool[Any] | None = None
        # The journals and lock files of this database's campaigns, beside [log] path.
        digest = hashlib.sha256(f"{target.host}:{target.port}/{target.database}".encode()).hexdigest()[:10]
        readable = re.sub(r"[^A-Za-z0-9._-]+", "_", f"{target.host}_{target.database}")[:40]
        self.path = Path(os.path.realpath(config.path)).with_name(f"mailer-pg.{readable}.{digest}")

    # --- opening, closing, migrating ---

    @classmethod
    def open(cls, config: LogConfig, *, create: bool = True, pool_size: int | None = None) -> PostgresStore:
        """Connect to ``config.url`` and create or migrate the schema.

        With ``create=False`` a database without the schema is an error (for ``report``).
        With ``pool_size``, the store then works through a pool of up to that many
        connections (for a long-running server with concurrent requests); the first
        connection is still made alone, so that a bad URL or password gets its message.
        """
        conn, target = connect(config)
        store = cls(config, conn, target)
        try:
            store._migrate(create=create)
            if pool_size:
                store._use_pool(pool_size)
        except BaseException:
            store.close()
            raise
        return store

    def _use_pool(self, size: int) -> None:
        from psycopg_pool import ConnectionPool

        assert self._config.url is not None
        pool: ConnectionPool[Any] = ConnectionPool(
            self._config.url,
            kwargs={
                "password": self._config.password,
                "connect_timeout": _CONNECT_TIMEOUT,
                "application_name": "mailer",
                "autocommit": True,
            },
            min_size=1,
            max_size=size,
            # A connection the server dropped (restart, killed backend) is found before it
            # is handed out, and replaced: a server does not answer 503 until restarted.
            check=ConnectionPool.check_connection,
            timeout=_CONNECT_TIMEOUT,
            name="mailer",
            open=False,
        )
        pool.open(wait=True, timeout=_CONNECT_TIMEOUT)
        with self._lock:
            conn, self._conn, self._pool = self._conn, None, pool
        if conn is not None:
            conn.close()

    def _error(self, exc: psycopg.Error) -> SendLogError:
        text = _scrub(str(exc), self._config.password)
        if isinstance(exc, psycopg.OperationalError) or (self._conn is not None and self._conn.closed):
            return StoreUnavailableError(
                f"lost the connection to {self._target}: {text}.",
                hint="What was sent is in the local delivery journal; once the database is back, "
                "run the same command again: nobody is mailed twice.",
            )
        return SendLogError(f"{self._target}: {text}.")

    def _run(self, work: Any) -> Any:
        """Call ``work(conn)`` under the lock (or on a connection of the pool), turning
        database errors into ours."""
        pool = self._pool
        if pool is not None:
            try:
                with pool.connection() as conn:
                    return work(conn)
            except psycopg.Error as exc:  # PoolTimeout included: no connection could be had
                raise self._error(exc) from None
        with self._lock:
            conn = self._conn
            if conn is None:
                raise SendLogError(f"the send log ({self._target}) is closed.")
            try:
                return work(conn)
            except psycopg.Error as exc:
                raise self._error(exc) from None

    def _migrate(self, *, create: bool) -> None:
        def work(conn: psycopg.Connection[Any]) -> None:
            with conn.transaction():
                # One migrator at a time: two runs starting at once must not both migrate.
                conn.execute("SELECT pg_advisory_xact_lock(%s)", (_lock_key("\0schema"),))
                conn.execute("CREATE TABLE IF NOT EXISTS mailer_schema (version INTEGER NOT NULL)")
                row = conn.execute("SELECT version FROM mailer_schema").fetchone()
                version = 0 if row is None else int(row[0])
                if version > SCHEMA_VERSION:
                    raise SendLogError(
                        f"the send log in {self._target} has schema version {version}, newer than this mailer "
                        f"knows ({SCHEMA_VERSION}).",
                        hint="A newer mailer wrote it: upgrade mailer, or use another database.",
                    )
                if version == SCHEMA_VERSION:
                    return
                if version == 0:
                    if not create:
                        raise SendLogError(
                            f"there is no send log in {self._target} yet.",
                            hint="It is created by the first `mailer send`; check [log] url in mailer.toml.",
                        )
                    others = conn.execute(
                        "SELECT count(*) FROM information_schema.tables WHERE table_schema = current_schema() "
                        "AND table_name IN ('deliveries', 'runs', 'suppressions')"
                    ).fetchone()
                    if others is not None and others[0]:
                        raise SendLogError(
                            f"{self._target} has tables named like a send log's but no mailer schema version.",
                            hint="Point [log] url at a database (or schema) of its own.",
                        )
                for number, step in enumerate(PG_MIGRATIONS[version:], start=version + 1):
                    for statement in step:
                        conn.execute(statement)
                    if number == 5:
                        self._backfill_recipient_tags(conn)
                conn.execute("DELETE FROM mailer_schema")
                conn.execute("INSERT INTO mailer_schema (version) VALUES (%s)", (SCHEMA_VERSION,))

        self._run(work)

    @staticmethod
    def _backfill_recipient_tags(conn: psycopg.Connection[Any]) -> None:
        """Schema step 5's data part: the recipient tag of every row that is not invalid."""
        keys = [key for (key,) in conn.execute("SELECT DISTINCT recipient FROM deliveries WHERE status <> 'invalid'")]
        for start in range(0, len(keys), 10_000):
            chunk = keys[start : start + 10_000]
            conn.execute(
                "UPDATE deliveries AS d SET recipient_tag = t.tag FROM unnest(%s::text[], %s::bigint[]) AS t(key, tag) "
                "WHERE d.recipient = t.key AND d.status <> 'invalid'",
                (chunk, [recipient_tag(key) for key in chunk]),
            )

    @property
    def schema_version(self) -> int:
        row = self._run(lambda conn: conn.execute("SELECT version FROM mailer_schema").fetchone())
        return 0 if row is None else int(row[0])

    def close(self) -> None:
        with self._lock:
            conn, self._conn = self._conn, None
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.close()
        if conn is not None:
            try:
                conn.close()
            except psycopg.Error:
                pass

    def __enter__(self) -> PostgresStore:
        return self

    def __exit__(self, exc_type: type | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    # --- resume and suppression, in bulk ---

    def statuses(self, campaign: str, addresses: Sequence[str]) -> list[Status | None]:
        keys = [address_key(address) for address in addresses]
        if not keys:
            return []
        rows = self._run(
            lambda conn: conn.execute(
                "SELECT recipient, status FROM deliveries WHERE campaign = %s AND recipient = ANY(%s)",
                (campaign, list(set(keys))),
            ).fetchall()
        )
        found = {recipient: STATUS_BY_VALUE[status] for recipient, status in rows}
        return [found.get(key) for key in keys]

    def suppressed(self, addresses: Sequence[str]) -> list[bool]:
        keys = [address_key(address) for address in addresses]
        if not keys:
            return []
        rows = self._run(
            lambda conn: conn.execute(
                "SELECT address FROM suppressions WHERE address = ANY(%s)", (list(set(keys)),)
            ).fetchall()
        )
        found = {address for (address,) in rows}
        return [key in found for key in keys]

    # --- writes, in batches ---

    def record_events(
        self,
        campaign: str,
        events: Iterable[DeliveryEvent],
        *,
        journal: tuple[int, int] | None = None,
        bounces: Iterable[tuple[str, str]] = (),
    ) -> None:
        """Apply delivery events in order in ONE transaction (executemany is pipelined:
        one round trip for the batch, not one per event)."""
        now = _now()
        rows = []
        for recipient, status, smtp_code, smtp_reply, message_id, line in events:
            if status != Status.SENDING and status not in RESULT_STATUSES:
                raise ValueError(f"a delivery event is sending, sent, failed or deferred, not {status!r}")
            key = address_key(recipient)
            rows.append(
                (campaign, key, recipient.strip(), domain_of(key), str(status), smtp_code, smtp_reply, message_id,
                 line, now, now, recipient_tag(key))
            )  # fmt: skip
        suppressions = [(address_key(address), reason, "bounce", now) for address, reason in bounces]
        if not rows and journal is None:
            return

        def work(conn: psycopg.Connection[Any]) -> None:
            with conn.transaction(), conn.cursor() as cursor:
                if rows:
                    cursor.executemany(_EVENT_SQL, rows)
                if suppressions:
                    cursor.executemany(_SUPPRESSION_SQL, suppressions)
                if journal is not None:
                    cursor.execute("UPDATE runs SET journal_applied = %s WHERE id = %s", (journal[1], journal[0]))

        self._run(work)

    def record_skipped(self, campaign: str, rows: Iterable[SkippedRow]) -> None:
        now = _now()
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

        def work(conn: psycopg.Connection[Any]) -> None:
            with conn.transaction(), conn.cursor() as cursor:
                cursor.executemany(_SKIPPED_SQL, values)

        self._run(work)

    # --- what comes back after sending (mailer serve, mailer bounces) ---

    def record_feedback(
        self,
        events: Iterable[FeedbackEvent],
        *,
        suppress: Iterable[tuple[str, str | None, str]] = (),
    ) -> int:
        """Events after sending and suppressions ``(address, reason, source)`` in ONE
        transaction; returns how many events were new (kind + ``ref`` seen: skipped).
        Row locks only: a send of the campaign never makes this wait for long."""
        now = _now()
        rows = []
        for event in events:
            kind = str(event.kind)
            if kind not in _FEEDBACK_KINDS:
                raise ValueError(f"unknown feedback kind {kind!r}")
            rows.append(
                (event.campaign, address_key(event.address), kind, event.at or now, event.detail, event.source,
                 event.ref)
            )  # fmt: skip
        suppressions = []
        for address, reason, source in suppress:
            if source not in SUPPRESSION_SOURCES:
                raise ValueError(f"source must be one of {', '.join(SUPPRESSION_SOURCES)}, not {source!r}")
            suppressions.append((address_key(address), reason, source, now))
        if not rows and not suppressions:
            return 0

        def work(conn: psycopg.Connection[Any]) -> int:
            added = 0
            with conn.transaction(), conn.cursor() as cursor:
                for row in rows:  # each needs its own count; feedback comes a few at a time
                    cursor.execute(_FEEDBACK_SQL, row)
                    added += max(cursor.rowcount, 0)
                if suppressions:
                    cursor.executemany(_SUPPRESSION_SQL, suppressions)
            return added

        result: int = self._run(work)
        return result

    def feedback_counts(self, campaign: str | None = None) -> dict[str, int]:
        where, params = ("WHERE campaign = %s", (campaign,)) if campaign is not None else ("", ())
        rows = self._run(
            lambda conn: conn.execute(
                f"SELECT kind, count(*), count(DISTINCT (campaign, recipient)) FROM feedback {where} GROUP BY kind",
                params,
            ).fetchall()
        )
        found = {kind: (int(total), int(unique)) for kind, total, unique in rows}
        counts: dict[str, int] = {}
        for kind in FeedbackKind:
            total, unique = found.get(kind.value, (0, 0))
            counts[kind.value] = total
            counts[f"unique_{kind.value}"] = unique
        return counts

    def engagement_history(self) -> dict[str, tuple[int, int, int, int, str | None, str | None, str | None]]:
        """Every recipient's history over all campaigns, in one query (see SendStore)."""
        rows = self._run(
            lambda conn: conn.execute(
                """
                SELECT recipient, sum(sent), sum(opens), sum(clicks), sum(bounces),
                       max(last_open), max(last_click), max(last_sent) FROM (
                    SELECT recipient, count(*) AS sent, 0 AS opens, 0 AS clicks, 0 AS bounces,
                           NULL AS last_open, NULL AS last_click, max(updated_at) AS last_sent
                        FROM deliveries WHERE status = 'sent' GROUP BY recipient
                    UNION ALL
                    SELECT recipient, 0, count(*) FILTER (WHERE kind = 'opened'), count(*) FILTER (WHERE kind = 'clicked'),
                           count(*) FILTER (WHERE kind IN ('bounced_hard', 'bounced_soft')),
                           max(at) FILTER (WHERE kind = 'opened'), max(at) FILTER (WHERE kind = 'clicked'), NULL
                        FROM feedback GROUP BY recipient
                ) AS history GROUP BY recipient
                """
            ).fetchall()
        )

        def iso(value: object) -> str | None:
            return None if value is None else (value if isinstance(value, str) else value.isoformat())  # type: ignore[attr-defined]

        return {
            row[0]: (int(row[1]), int(row[2]), int(row[3]), int(row[4]), iso(row[5]), iso(row[6]), iso(row[7]))
            for row in rows
        }

    def clicks_by_link(self, campaign: str | None = None, *, limit: int = 100) -> list[tuple[str, int, int]]:
        """``(url, recipients who clicked it, clicks)`` for the most clicked links, most first."""
        where, params = ("AND campaign = %s", (campaign,)) if campaign is not None else ("", ())
        rows = self._run(
            lambda conn: conn.execute(
                "SELECT detail, count(DISTINCT (campaign, recipient)) AS people, count(*) FROM feedback "
                f"WHERE kind = 'clicked' AND detail IS NOT NULL {where} "
                "GROUP BY detail ORDER BY people DESC, detail LIMIT %s",
                (*params, limit),
            ).fetchall()
        )
        return [(url, int(people), int(clicks)) for url, people, clicks in rows]

    def list_feedback(self, campaign: str | None = None) -> list[tuple[str, str, str, str, str | None, str]]:
        where, params = ("WHERE campaign = %s", (campaign,)) if campaign is not None else ("", ())
        rows = self._run(
            lambda conn: conn.execute(
                f"SELECT campaign, recipient, kind, at, detail, source FROM feedback {where} ORDER BY id", params
            ).fetchall()
        )
        return [tuple(row) for row in rows]

    def find_by_recipient_tag(self, tag: int) -> list[tuple[str, str]]:
        rows = self._run(
            lambda conn: conn.execute(
                "SELECT campaign, coalesce(address, recipient) FROM deliveries WHERE recipient_tag = %s", (tag,)
            ).fetchall()
        )
        return [(campaign, address) for campaign, address in rows]

    def find_by_message_ids(self, message_ids: Sequence[str]) -> dict[str, tuple[str, str]]:
        wanted: dict[str, list[str]] = {}
        for given in message_ids:
            bare = given.strip().strip("<>").strip()
            if bare:
                wanted.setdefault(f"<{bare}>", []).append(given)
        if not wanted:
            return {}
        rows = self._run(
            lambda conn: conn.execute(
                "SELECT message_id, campaign, coalesce(address, recipient) FROM deliveries WHERE message_id = ANY(%s)",
                (list(wanted),),
            ).fetchall()
        )
        found: dict[str, tuple[str, str]] = {}
        for message_id, campaign, address in rows:
            for given in wanted[message_id]:
                found[given] = (campaign, address)
        return found

    def known_feedback_refs(self, refs: Sequence[str]) -> set[str]:
        asked = sorted(set(refs))
        if not asked:
            return set()
        rows = self._run(
            lambda conn: conn.execute(
                "SELECT ref FROM feedback WHERE kind = ANY(%s) AND ref = ANY(%s)",
                (sorted(_FEEDBACK_KINDS), asked),
            ).fetchall()
        )
        return {ref for (ref,) in rows}

    def bounce_history(self, addresses: Sequence[str]) -> dict[str, RecipientHistory]:
        keys = sorted({address_key(address) for address in addresses})
        if not keys:
            return {}
        tags = [recipient_tag(key) for key in keys]

        def read(conn: psycopg.Connection[Any]) -> tuple[list[Any], list[Any]]:
            rows = conn.execute(
                "SELECT recipient, campaign, status, first_at FROM deliveries "
                "WHERE recipient_tag = ANY(%s) AND status NOT IN ('invalid', 'suppressed') "
                "ORDER BY first_at, campaign",
                (tags,),
            ).fetchall()
            bounced = conn.execute(
                "SELECT recipient, campaign FROM feedback WHERE recipient = ANY(%s) AND kind = 'bounced_soft'",
                (keys,),
            ).fetchall()
            return rows, bounced

        rows, bounced = self._run(read)
        wanted = set(keys)
        sends: dict[str, list[tuple[str, str, str]]] = {}
        for recipient, campaign, status, first_at in rows:
            if recipient in wanted:
                sends.setdefault(recipient, []).append((campaign, status, first_at))
        soft: dict[str, set[str]] = {}
        for recipient, campaign in bounced:
            soft.setdefault(recipient, set()).add(campaign)
        return {key: RecipientHistory(tuple(rows), frozenset(soft.get(key, ()))) for key, rows in sends.items()}

    # --- runs, the campaign lock and the journal offset ---

    def start_run(self, campaign: str, *, template: str | None, contacts: str | None) -> int:
        row = self._run(
            lambda conn: conn.execute(
                "INSERT INTO runs (campaign, template, contacts, pid, host, started_at) "
                "VALUES (%s, %s, %s, %s, %s, %s) RETURNING id",
                (campaign, template, contacts, os.getpid(), socket.gethostname(), _now()),
            ).fetchone()
        )
        return int(row[0])

    def finish_run(self, run_id: int, *, counts: Mapping[str, int], interrupted: bool) -> None:
        updated = self._run(
            lambda conn: (
                conn.execute(
                    "UPDATE runs SET finished_at = %s, interrupted = %s, counts = %s WHERE id = %s",
                    (_now(), int(interrupted), json.dumps(dict(counts)), run_id),
                ).rowcount
            )
        )
        if updated != 1:
            raise ValueError(f"no run with id {run_id} in {self._target}")

    def list_runs(self, campaign: str | None = None) -> list[Run]:
        where, params = ("WHERE campaign = %s", (campaign,)) if campaign is not None else ("", ())
        rows = self._run(
            lambda conn: conn.execute(
                "SELECT id, campaign, template, contacts, pid, host, started_at, finished_at, interrupted, counts "
                f"FROM runs {where} ORDER BY id",
                params,
            ).fetchall()
        )
        return [
            Run(
                id=row[0], campaign=row[1], template=row[2], contacts=row[3], pid=row[4], host=row[5],
                started_at=row[6], finished_at=row[7],
                interrupted=None if row[8] is None else bool(row[8]),
                counts=None if row[9] is None else json.loads(row[9]),
            )
            for row in rows
        ]  # fmt: skip

    def journal_path(self, campaign: str) -> Path:
        """The campaign's delivery journal: a local file, beside ``[log] path``."""
        return campaign_file_path(self.path, campaign, "journal")

    def acquire_lock(self, campaign: str) -> CampaignLock:
        """The local lock file, then the campaign's advisory lock in the database: a second
        run of the campaign is refused on this machine and on any other (exit 75)."""
        local = CampaignLock.acquire(campaign_lock_path(self.path, campaign), campaign)
        key = _lock_key(campaign)
        try:
            got = self._run(lambda conn: conn.execute("SELECT pg_try_advisory_lock(%s)", (key,)).fetchone()[0])
        except BaseException:
            local.release()
            raise
        if not got:
            local.release()
            holder = self._run(
                lambda conn: conn.execute(
                    "SELECT host, pid, started_at FROM runs WHERE campaign = %s AND finished_at IS NULL "
                    "ORDER BY id DESC LIMIT 1",
                    (campaign,),
                ).fetchone()
            )
            who = f" (run started {holder[2]} by pid {holder[1]} on {holder[0]})" if holder else ""
            raise LockedError(
                f"campaign {campaign!r} is being sent by another mailer using {self._target}{who}.",
                hint="Wait for it to finish.",
            )
        return _HeldLock(local, self, key)

    def _advisory_unlock(self, key: int) -> None:
        try:
            self._run(lambda conn: conn.execute("SELECT pg_advisory_unlock(%s)", (key,)))
        except SendLogError:
            pass  # the connection is gone, and the server dropped the lock with it

    def journal_applied(self, run_id: int) -> int | None:
        row = self._run(
            lambda conn: conn.execute("SELECT journal_applied FROM runs WHERE id = %s", (run_id,)).fetchone()
        )
        if row is None:
            raise ValueError(f"no run with id {run_id} in {self._target}")
        return None if row[0] is None else int(row[0])

    def set_journal_applied(self, run_id: int, offset: int) -> None:
        self._run(lambda conn: conn.execute("UPDATE runs SET journal_applied = %s WHERE id = %s", (offset, run_id)))

    # --- reports ---

    def counts(self, campaign: str) -> dict[str, int]:
        rows = self._run(
            lambda conn: conn.execute(
                "SELECT status, count(*) FROM deliveries WHERE campaign = %s GROUP BY status", (campaign,)
            ).fetchall()
        )
        found = dict(rows)
        return {status.value: int(found.get(status.value, 0)) for status in Status}

    def report(self, campaign: str | None = None, *, max_domains: int | None = None) -> Report:
        where, params = ("WHERE campaign = %s", (campaign,)) if campaign is not None else ("", ())
        also = where + (" AND" if where else "WHERE")

        def work(conn: psycopg.Connection[Any]) -> tuple[list[Any], ...]:
            with conn.transaction():  # one snapshot for all the parts
                conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY")
                status_rows = conn.execute(
                    f"SELECT status, count(*) FROM deliveries {where} GROUP BY status",
                    params,
                ).fetchall()
                domain_rows = conn.execute(
                    f"SELECT domain, status, count(*) FROM deliveries {where} GROUP BY domain, status",
                    params,
                ).fetchall()
                code_rows = conn.execute(
                    f"SELECT smtp_code, count(*), max(smtp_reply) FROM deliveries {also} smtp_code IS NOT NULL "
                    "GROUP BY smtp_code ORDER BY count(*) DESC, smtp_code",
                    params,
                ).fetchall()
                reason_rows = conn.execute(
                    f"SELECT NULL, count(*), smtp_reply FROM deliveries {also} smtp_code IS NULL "
                    "AND smtp_reply IS NOT NULL GROUP BY smtp_reply ORDER BY count(*) DESC, smtp_reply LIMIT 50",
                    params,
                ).fetchall()
                unknown_rows = conn.execute(
                    f"SELECT {DELIVERY_COLUMNS} FROM deliveries {also} status = 'sending' "
                    "ORDER BY campaign, line, recipient",
                    params,
                ).fetchall()
            return status_rows, domain_rows, code_rows, reason_rows, unknown_rows

        status_rows, domain_rows, code_rows, reason_rows, unknown_rows = self._run(work)
        code_rows = sorted(code_rows + reason_rows, key=lambda row: -row[1])
        found = dict(status_rows)
        by_status = {status.value: int(found.get(status.value, 0)) for status in Status}
        domains: dict[str, dict[str, int]] = {}
        for domain, status, count in domain_rows:
            domains.setdefault(domain, {})[status] = int(count)
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
            by_smtp_code=[ReplyCount(code=c, count=int(n), example_reply=text) for c, n, text in code_rows],
            unknown_outcome=[delivery_from_row(row) for row in unknown_rows],
        )

    def campaigns(self) -> list[CampaignSummary]:
        rows = self._run(
            lambda conn: conn.execute(
                """
                SELECT campaign, sum(recipients), max(last_at) FROM (
                    SELECT campaign, count(*) AS recipients, max(updated_at) AS last_at
                        FROM deliveries GROUP BY campaign
                    UNION ALL
                    SELECT campaign, 0, max(coalesce(finished_at, started_at)) FROM runs GROUP BY campaign
                ) AS activity GROUP BY campaign ORDER BY max(last_at) DESC, campaign
                """
            ).fetchall()
        )
        return [CampaignSummary(name=name, recipients=int(count), last_activity=last) for name, count, last in rows]

    def write_failed_csv(self, campaign: str, file: TextIO) -> int:
        rows = self._run(
            lambda conn: conn.execute(
                """
                SELECT coalesce(address, recipient), status, smtp_code, smtp_reply FROM deliveries
                WHERE campaign = %s AND status IN ('failed', 'deferred')
                ORDER BY line IS NULL, line, recipient
                """,
                (campaign,),
            ).fetchall()
        )
        writer = csv.writer(file, lineterminator="\n")
        writer.writerow(FAILED_CSV_HEADER)
        for recipient, status, code, reply in rows:
            writer.writerow((recipient, status, "" if code is None else code, reply or ""))
        return len(rows)

    # --- the suppression list ---

    def add_suppressions(
        self, addresses: Iterable[str], *, reason: str | None = None, source: str = "manual"
    ) -> tuple[int, int]:
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
        if not entries:
            return 0, 0
        now = _now()
        unique: dict[str, str | None] = {}
        for address, reason in entries:
            unique.setdefault(address, reason)

        def work(conn: psycopg.Connection[Any]) -> int:
            row = conn.execute(
                "WITH added AS (INSERT INTO suppressions (address, reason, source, added_at) "
                "SELECT a, r, %s, %s FROM unnest(%s::text[], %s::text[]) AS t(a, r) "
                "ON CONFLICT (address) DO NOTHING RETURNING 1) SELECT count(*) FROM added",
                (source, now, list(unique), list(unique.values())),
            ).fetchone()
            return 0 if row is None else int(row[0])

        added: int = self._run(work)
        return added, len(entries) - added

    def remove_suppressions(self, addresses: Iterable[str]) -> int:
        if isinstance(addresses, str):
            addresses = [addresses]
        keys = list({address_key(address) for address in addresses})
        removed: int = self._run(
            lambda conn: conn.execute("DELETE FROM suppressions WHERE address = ANY(%s)", (keys,)).rowcount
        )
        return removed

    def list_suppressions(self, *, batch_size: int = 1000) -> Iterator[Suppression]:
        last = ""
        while True:
            rows = self._run(
                lambda conn, after=last: conn.execute(
                    "SELECT address, reason, source, added_at FROM suppressions WHERE address > %s "
                    "ORDER BY address LIMIT %s",
                    (after, batch_size),
                ).fetchall()
            )
            for row in rows:
                yield Suppression(*row)
            if len(rows) < batch_size:
                return
            last = rows[-1][0]

    def import_suppressions(
        self, file_path: Path, *, reason: str | None = None, source: str = "import"
    ) -> ImportResult:
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
