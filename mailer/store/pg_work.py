"""Cooperating runs on PostgreSQL: several ``mailer send`` runs of one campaign share its work.

Every run reads the same contact file (the same bytes: its SHA-256 is recorded with
the campaign, and a run given another file is refused while a pass is unfinished). The
file's data lines are cut into chunks of ``chunk_lines`` consecutive lines; a run
claims one chunk at a time, ``FOR UPDATE SKIP LOCKED``, with a lease that a heartbeat
renews. Only the holder of a chunk mails its rows, and every ``sending`` event is
committed, in the same transaction that checks the run still holds the chunk, before
its SMTP transaction starts (:func:`record_held_events`): a run whose lease ran out
(stalled, or cut off from the database) cannot hand a recipient to its relay that
another run has taken over, and the run that takes a dead run's chunk sees that run's
``sending`` rows (unknown outcomes, never resent without ``--resend-unknown``) and
mails only the rest. A chunk becomes ``done`` when the run that held it ends having
handled all of it; a run that stops early releases its chunks to the others.

A pass over the list ends when every chunk is done; the next run then starts a new
pass (the resume rule skips what is settled and retries the deferred).

The campaign's rate is one token bucket for all runs (:class:`SharedRate`): a run
takes a few slots at a time from the campaign's row, ``1 / rate`` apart on the server's
clock, so the runs together never go faster than the rate however many there are.
"""

from __future__ import annotations

import functools
import hashlib
import math
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..bounces.rules import bounces_of
from ..core.addresses import address_key, domain_of
from ..core.errors import ContactsError, LockedError, StoreUnavailableError
from ..core.outcomes import RESULT_STATUSES, DeliveryEvent, Status
from ..core.tokens import recipient_tag

if TYPE_CHECKING:
    import psycopg

    from .postgres import PostgresStore

__all__ = [
    "CampaignWork",
    "LostClaimError",
    "SharedRate",
    "chunk_lines_for",
    "contacts_fingerprint",
    "record_held_events",
]


class LostClaimError(StoreUnavailableError):
    """This run no longer holds the part of the list a message belongs to (its lease ran out)."""


def contacts_fingerprint(path: str | Path) -> tuple[str, int]:
    """``(SHA-256 of the file's bytes, number of lines)``: what makes two runs' lists one list."""
    digest = hashlib.sha256()
    lines = 0
    last = b""
    try:
        with open(path, "rb") as file:
            while block := file.read(1 << 20):
                digest.update(block)
                lines += block.count(b"\n")
                last = block[-1:]
    except OSError as exc:
        raise ContactsError(f"cannot read the contact file ({exc.strerror}).", path=str(path)) from None
    if last and last != b"\n":
        lines += 1
    return digest.hexdigest(), lines


def chunk_lines_for(lines: int) -> int:
    """Lines per chunk: about 200 chunks a list, from 5 to 200 lines each (one claim per chunk)."""
    return max(5, min(200, math.ceil(lines / 200)))


class CampaignWork:
    """One run's share of a campaign: its claims, its heartbeat, and how it ends.

    Uses the store's connection (thread-safe behind the store's lock)."""

    def __init__(
        self, store: PostgresStore, campaign: str, run_id: int, *, chunk_lines: int, chunks: int, lease: float
    ) -> None:
        self.store = store
        self.campaign = campaign
        self.run_id = run_id
        self.chunk_lines = chunk_lines
        self.chunks = chunks
        self.lease = lease
        self._heartbeat: threading.Thread | None = None
        self._stop = threading.Event()
        self.heartbeat_error: BaseException | None = None

    def chunk_of(self, line: int) -> int:
        return chunk_of(line, self.chunk_lines)

    # --- joining ---

    @staticmethod
    def check_contacts(store: PostgresStore, campaign: str, fingerprint: str) -> None:
        """Refuse (exit 2) a contact file other than the one the campaign's unfinished pass reads."""

        def work(conn: psycopg.Connection[Any]) -> Any:
            return conn.execute(
                "SELECT w.contacts_sha256, w.contacts, EXISTS (SELECT 1 FROM work_chunks c "
                "WHERE c.campaign = w.campaign AND NOT c.done) FROM campaign_work w WHERE w.campaign = %s",
                (campaign,),
            ).fetchone()

        row = store._run(work)
        if row is not None and row[0] != fingerprint and row[2]:
            raise _different_file(campaign, row[1])

    @classmethod
    def join(
        cls,
        store: PostgresStore,
        campaign: str,
        run_id: int,
        *,
        fingerprint: str,
        lines: int,
        contacts: str | None,
        lease: float,
    ) -> CampaignWork:
        """Register this run with the campaign (creating its chunks, or a new pass, if need be)."""

        def work(conn: psycopg.Connection[Any]) -> tuple[int, int]:
            with conn.transaction():
                conn.execute(
                    "INSERT INTO campaign_work (campaign, contacts_sha256, contacts, lines, chunk_lines, chunks, "
                    "created_at) VALUES (%s, '', NULL, 0, 1, 0, %s) ON CONFLICT (campaign) DO NOTHING",
                    (campaign, time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime())),
                )
                known = conn.execute(
                    "SELECT contacts_sha256, contacts, chunk_lines, chunks FROM campaign_work "
                    "WHERE campaign = %s FOR UPDATE",
                    (campaign,),
                ).fetchone()
                assert known is not None  # inserted above if it was not there
                sha, known_contacts, chunk_lines, chunks = known
                counted = conn.execute(
                    "SELECT count(*) FROM work_chunks WHERE campaign = %s AND NOT done", (campaign,)
                ).fetchone()
                unfinished = 0 if counted is None else int(counted[0])
                if sha != fingerprint:
                    if unfinished:
                        raise _different_file(campaign, known_contacts)
                    # A first run, or a new list once the last pass is over: a fresh set of chunks.
                    chunk_lines = chunk_lines_for(lines)
                    chunks = max(1, math.ceil(max(lines - 1, 0) / chunk_lines))
                    conn.execute("DELETE FROM work_chunks WHERE campaign = %s", (campaign,))
                    conn.execute(
                        "INSERT INTO work_chunks (campaign, chunk) SELECT %s, generate_series(0, %s - 1)",
                        (campaign, chunks),
                    )
                    conn.execute(
                        "UPDATE campaign_work SET contacts_sha256 = %s, contacts = %s, lines = %s, chunk_lines = %s, "
                        "chunks = %s, pass = pass + 1 WHERE campaign = %s",
                        (fingerprint, contacts, lines, chunk_lines, chunks, campaign),
                    )
                elif not unfinished:
                    # The last pass is over: a new one (deferred recipients are retried).
                    conn.execute(
                        "UPDATE work_chunks SET done = false, run_id = NULL, lease_until = NULL WHERE campaign = %s",
                        (campaign,),
                    )
                    conn.execute("UPDATE campaign_work SET pass = pass + 1 WHERE campaign = %s", (campaign,))
                conn.execute(
                    "INSERT INTO work_runs (run_id, campaign, lease_until) "
                    "VALUES (%s, %s, now() + make_interval(secs => %s))",
                    (run_id, campaign, lease),
                )
                return int(chunk_lines), int(chunks)

        chunk_lines, chunks = store._run(work)
        joined = cls(store, campaign, run_id, chunk_lines=chunk_lines, chunks=chunks, lease=lease)
        joined._start_heartbeat()
        return joined

    # --- claims ---

    def claim(self, *, position: int = 0, count: int = 1) -> list[int]:
        """Claim up to ``count`` chunks nobody holds (or whose holder's lease ran out),
        those at or after ``position`` first; marks this run as not draining."""
        self._raise_heartbeat_error()

        def work(conn: psycopg.Connection[Any]) -> list[int]:
            with conn.transaction():
                rows = conn.execute(
                    """
                    UPDATE work_chunks AS w SET run_id = %(run)s, lease_until = now() + make_interval(secs => %(lease)s)
                    FROM (SELECT chunk FROM work_chunks
                          WHERE campaign = %(campaign)s AND NOT done AND (run_id IS NULL OR lease_until < now())
                          ORDER BY chunk < %(position)s, chunk LIMIT %(count)s FOR UPDATE SKIP LOCKED) AS free
                    WHERE w.campaign = %(campaign)s AND w.chunk = free.chunk
                    RETURNING w.chunk
                    """,
                    {"run": self.run_id, "lease": self.lease, "campaign": self.campaign, "position": position,
                     "count": count},
                ).fetchall()  # fmt: skip
                if rows:
                    conn.execute("UPDATE work_runs SET draining = false WHERE run_id = %s", (self.run_id,))
                return sorted(int(chunk) for (chunk,) in rows)

        claimed: list[int] = self.store._run(work)
        return claimed

    def others_pending(self) -> int:
        """Chunks not done that this run may yet have to take: free ones, expired ones and
        those of live runs still reading the list (not those of live runs that are draining)."""
        self._raise_heartbeat_error()

        def work(conn: psycopg.Connection[Any]) -> int:
            with conn.transaction():
                conn.execute("UPDATE work_runs SET draining = true WHERE run_id = %s", (self.run_id,))
                row = conn.execute(
                    """
                    SELECT count(*) FROM work_chunks AS c
                    WHERE c.campaign = %s AND NOT c.done AND c.run_id IS DISTINCT FROM %s
                      AND NOT EXISTS (SELECT 1 FROM work_runs AS r WHERE r.run_id = c.run_id AND r.draining
                                      AND r.lease_until > now() AND c.lease_until > now())
                    """,
                    (self.campaign, self.run_id),
                ).fetchone()
                return 0 if row is None else int(row[0])

        pending: int = self.store._run(work)
        return pending

    # --- the heartbeat ---

    def _start_heartbeat(self) -> None:
        self._heartbeat = threading.Thread(target=self._beat, name="mailer-heartbeat", daemon=True)
        self._heartbeat.start()

    def _beat(self) -> None:
        interval = max(0.2, self.lease / 4)
        while not self._stop.wait(interval):
            try:
                self.store._run(self._renew)
            except BaseException as exc:  # the claims and the sends say so at their next step
                self.heartbeat_error = exc
                return

    def _renew(self, conn: psycopg.Connection[Any]) -> None:
        with conn.transaction():
            params = (self.lease, self.run_id)
            conn.execute(
                "UPDATE work_runs SET lease_until = now() + make_interval(secs => %s) WHERE run_id = %s", params
            )
            conn.execute(
                "UPDATE work_chunks SET lease_until = now() + make_interval(secs => %s) WHERE run_id = %s AND NOT done",
                params,
            )

    def check_heartbeat(self) -> None:
        """Raise the heartbeat's error, if it had one (the database is unusable)."""
        if self.heartbeat_error is not None:
            raise self.heartbeat_error

    _raise_heartbeat_error = check_heartbeat

    # --- the end of the run ---

    def finish(self, *, complete: bool) -> None:
        """Mark this run's chunks done (``complete``: every row of them handled) or give
        them back to the others; this run's lease ends."""
        self._stop.set()
        if self._heartbeat is not None:
            self._heartbeat.join()

        def work(conn: psycopg.Connection[Any]) -> None:
            with conn.transaction():
                if complete:
                    conn.execute(
                        "UPDATE work_chunks SET done = true, lease_until = NULL WHERE run_id = %s AND NOT done",
                        (self.run_id,),
                    )
                else:
                    conn.execute(
                        "UPDATE work_chunks SET run_id = NULL, lease_until = NULL WHERE run_id = %s AND NOT done",
                        (self.run_id,),
                    )
                conn.execute("DELETE FROM work_runs WHERE run_id = %s", (self.run_id,))

        self.store._run(work)

    def abandon(self) -> None:
        """Stop the heartbeat without touching the claims (they expire with the lease)."""
        self._stop.set()


def chunk_of(line: int, chunk_lines: int) -> int:
    """The chunk of a row that starts on ``line`` (line 1 is the header)."""
    return max(0, line - 2) // chunk_lines


def _different_file(campaign: str, contacts: str | None) -> ContactsError:
    where = f" ({contacts})" if contacts else ""
    return ContactsError(
        f"campaign {campaign!r} is being sent by other runs from a different contact file{where}: every run of a "
        "campaign must read the same file, byte for byte.",
        hint="Copy the same file to every host, or wait for the current pass to finish before changing the list "
        "(`mailer report --campaign` shows how far it is), or use another --campaign.",
    )


# --- in the delivery process ---------------------------------------------------------


def record_held_events(
    store: PostgresStore,
    campaign: str,
    events: Sequence[DeliveryEvent],
    *,
    run_id: int,
    chunk_lines: int,
    journal: tuple[int, int],
) -> set[str]:
    """Apply a journal batch, the ``sending`` events only for chunks this run still holds;
    returns the recipients whose ``sending`` was refused (another run holds their chunk
    now: they must not be sent).

    Each ``sending`` waits for this commit, so it costs one statement (one round trip):
    the rows go in as arrays, the chunks are share-locked for the statement (a claim
    skips a locked chunk; one that committed first makes the row refused), and the
    journal offset is set by the same statement. A batch that names a recipient twice
    (an outcome, then a retry's ``sending``) is applied event by event, in order."""
    from .postgres import _EVENT_SQL, _SUPPRESSION_SQL, _now

    now = _now()
    rows = []
    for recipient, status, smtp_code, smtp_reply, message_id, line in events:
        if status != Status.SENDING and status not in RESULT_STATUSES:
            raise ValueError(f"a delivery event is sending, sent, failed or deferred, not {status!r}")
        key = address_key(recipient)
        chunk = chunk_of(line, chunk_lines) if status == Status.SENDING and line is not None else None
        rows.append((key, recipient.strip(), domain_of(key), str(status), smtp_code, smtp_reply, message_id, line,
                     recipient_tag(key), chunk))  # fmt: skip
    sending = {row[0]: event[0] for row, event in zip(rows, events) if row[3] == Status.SENDING}
    chunks = sorted({row[9] for row in rows if row[9] is not None})
    bounces = list(bounces_of(events))
    repeated = len({row[0] for row in rows}) < len(rows)

    def one_statement(conn: psycopg.Connection[Any]) -> set[str]:
        columns = list(zip(*rows)) if rows else [()] * 10
        found = conn.execute(
            _held_events_sql(),
            {"campaign": campaign, "run": run_id, "chunks": chunks, "now": now, "applied": journal[1],
             "journal_run": journal[0], "keys": list(columns[0]), "addresses": list(columns[1]),
             "domains": list(columns[2]), "statuses": list(columns[3]), "codes": list(columns[4]),
             "replies": list(columns[5]), "message_ids": list(columns[6]), "lines": list(columns[7]),
             "tags": list(columns[8]), "row_chunks": list(columns[9])},
        ).fetchall()  # fmt: skip
        kept = {key for (key,) in found}
        return {address for key, address in sending.items() if key not in kept}

    def in_order(conn: psycopg.Connection[Any]) -> set[str]:
        with conn.transaction(), conn.cursor() as cursor:
            held: set[int] = set()
            if chunks:
                found = cursor.execute(
                    "SELECT chunk FROM work_chunks WHERE campaign = %s AND run_id = %s AND chunk = ANY(%s) "
                    "AND NOT done FOR SHARE",
                    (campaign, run_id, chunks),
                ).fetchall()
                held = {int(chunk) for (chunk,) in found}
            refused: set[str] = set()
            values = []
            for row, event in zip(rows, events):
                if row[9] is not None and row[9] not in held:
                    refused.add(event[0])
                    continue
                values.append((campaign, *row[:4], *row[4:8], now, now, row[8]))
            if values:
                cursor.executemany(_EVENT_SQL, values)
            kept = [event for event in events if event[0] not in refused or event[1] != Status.SENDING]
            suppressions = [(address_key(a), reason, "bounce", now) for a, reason in bounces_of(kept)]
            if suppressions:
                cursor.executemany(_SUPPRESSION_SQL, suppressions)
            cursor.execute("UPDATE runs SET journal_applied = %s WHERE id = %s", (journal[1], journal[0]))
            return refused

    refused: set[str] = store._run(in_order if repeated or bounces else one_statement)
    return refused


@functools.cache
def _held_events_sql() -> str:
    from .postgres import _EVENT_SQL

    conflict = _EVENT_SQL[_EVENT_SQL.index("ON CONFLICT") :]
    return f"""
    WITH held AS (
        SELECT chunk FROM work_chunks
        WHERE campaign = %(campaign)s AND run_id = %(run)s AND chunk = ANY(%(chunks)s::int[]) AND NOT done
        FOR SHARE
    ), batch AS (
        SELECT * FROM unnest(%(keys)s::text[], %(addresses)s::text[], %(domains)s::text[], %(statuses)s::text[],
                             %(codes)s::int[], %(replies)s::text[], %(message_ids)s::text[], %(lines)s::int[],
                             %(tags)s::bigint[], %(row_chunks)s::int[])
            AS t(recipient, address, domain, status, smtp_code, smtp_reply, message_id, line, tag, chunk)
    ), applied AS (
        UPDATE runs SET journal_applied = %(applied)s WHERE id = %(journal_run)s
    )
    INSERT INTO deliveries AS d (campaign, recipient, address, domain, status, attempts, smtp_code, smtp_reply,
                                 message_id, line, first_at, updated_at, recipient_tag)
    SELECT %(campaign)s, recipient, address, domain, status, 1, smtp_code, smtp_reply, message_id, line,
           %(now)s, %(now)s, tag
        FROM batch WHERE chunk IS NULL OR chunk IN (SELECT chunk FROM held)
    {conflict}
    RETURNING d.recipient
    """


class SharedRate:
    """The campaign's rate for all its runs together: a token bucket in the campaign's row.

    A caller takes a few slots at a time (about a tenth of a second's worth), ``1 / rate``
    apart on the server's clock after every slot any run took before; it then waits for
    each slot in turn. A slot missed by more than an interval (a stalled run) is dropped,
    never spent late, so that the runs together never go over the rate. Thread-safe, with
    the same ``acquire`` as :class:`mailer.delivery.throttle.RateLimiter`; it uses a
    connection of its own (the delivery process's store).
    """

    def __init__(
        self,
        store: PostgresStore,
        campaign: str,
        rate_per_second: float,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not rate_per_second > 0:
            raise ValueError("a shared rate must be more than 0")
        self.store = store
        self.campaign = campaign
        self.rate = rate_per_second
        self.interval = 1.0 / rate_per_second
        self.block = max(1, min(50, math.ceil(rate_per_second * 0.1)))
        self._clock = clock
        self._slots: deque[float] = deque()
        self._lock = threading.Lock()

    def _refill(self) -> None:
        block, interval = self.block, self.interval

        def work(conn: psycopg.Connection[Any]) -> tuple[float, float]:
            row = conn.execute(
                "UPDATE campaign_work SET rate_next = greatest(rate_next, extract(epoch FROM clock_timestamp())) + %s "
                "WHERE campaign = %s RETURNING rate_next, extract(epoch FROM clock_timestamp())",
                (block * interval, self.campaign),
            ).fetchone()
            if row is None:
                raise LockedError(f"campaign {self.campaign!r} has no cooperating-run record.")
            return float(row[0]), float(row[1])

        end, server_now = self.store._run(work)
        local_now = self._clock()
        start = end - block * interval - server_now + local_now  # the first slot, on our clock
        self._slots.extend(start + index * interval for index in range(block))

    def acquire(self, cancel: threading.Event | None = None) -> float | None:
        """Block until a slot of the campaign's rate; return the clock then (None: cancelled)."""
        while True:
            with self._lock:
                now = self._clock()
                while self._slots and self._slots[0] < now - self.interval:
                    self._slots.popleft()  # missed: spending it now would go over the rate
                if not self._slots:
                    self._refill()
                    continue
                slot = self._slots.popleft()
            wait = slot - self._clock()
            if wait > 0:
                if cancel is not None:
                    if cancel.wait(wait):
                        return None
                else:
                    time.sleep(wait)
            if cancel is not None and cancel.is_set():
                return None
            return self._clock()
