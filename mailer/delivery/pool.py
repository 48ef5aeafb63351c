"""The delivery pool for one destination: persistent connections, a global rate, retries.

Data in, results out. :func:`deliver` pulls :class:`~mailer.core.outcomes.Outgoing`
messages from an iterator in the calling thread, hands them through a bounded
queue to ``send.connections`` worker threads (each owns one persistent SMTP
connection) and reports every step through a :class:`DeliveryListener`. It never
prints or logs: the caller turns the listener calls into its send log and progress.
"""

from __future__ import annotations

import heapq
import random
import ssl
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from enum import Enum
from typing import Any, Protocol

from ..core.config import SendConfig, SMTPConfig, parse_rate
from ..core.errors import PermanentDeliveryError, TemporaryDeliveryError
from ..core.outcomes import Outgoing, Result, Status
from ..smtp.policy import check_relay_settings
from ..smtp.session import Setup
from ..smtp.transaction import OK, PERM, STALE, TEMP, UNKNOWN, Connection, Envelope
from .throttle import RateLimiter, backoff_delay

__all__ = ["DeliveryListener", "DeliveryStats", "RateSource", "deliver"]

# Workers and the feeder wake at least this often to notice the stop event.
_POLL = 0.25
# Besides at most ``queue_size`` messages, the engine holds at most about this many
# bytes of them (queued, in flight or waiting for a retry): 1,000 messages with a
# 5 MB attachment each would otherwise take 5 GB.
_MAX_OUTSTANDING_BYTES = 64 * 1024 * 1024


class RateSource(Protocol):
    """What hands out transaction starts: :class:`RateLimiter`, or a rate shared by several runs."""

    def acquire(self, cancel: threading.Event | None = None) -> float | None: ...


class DeliveryListener(Protocol):
    """How :func:`deliver` reports. Both methods are called from worker threads, one
    call at a time (the engine serializes them), so an implementation needs no locking
    of its own; it must be quick, since the other workers wait meanwhile. A listener
    with a true ``thread_safe`` attribute is called concurrently instead. An exception
    raised here stops the whole run and comes out of :func:`deliver`."""

    # The engine never looks at an item's key: a listener may declare the key type its
    # own items carry (the send's is (recipient, line)).
    def on_sending(self, item: Outgoing[Any], attempt: int) -> None:
        """Just before the transaction starts (MAIL FROM): write "sending" durably here.

        If the process dies after this call, the outcome of the message is unknown."""

    def on_result(self, item: Outgoing[Any], result: Result) -> None:
        """After an attempt. ``result.final`` is False for a temporary failure that will
        be retried; exactly one final result follows for each item that got one."""


@dataclass
class DeliveryStats:
    """What a :func:`deliver` run did. ``sent + failed + deferred + unknown`` items got
    a final result (``unknown``: status ``sending``, the final reply never came); ``waiting_retry`` items were deferred and were to be retried when the run
    stopped; ``untouched`` items were taken from the iterator but never attempted (the
    run stopped first): they never got ``on_sending`` nor ``on_result``."""

    items: int = 0
    sent: int = 0
    failed: int = 0
    deferred: int = 0
    unknown: int = 0  # the final reply never came: left as "sending", never retried
    waiting_retry: int = 0
    unreachable: str | None = None  # why the run stopped: no connection could be opened
    untouched: int = 0
    attempts: int = 0
    retries: int = 0
    connections_opened: int = 0
    stale_reconnects: int = 0
    elapsed: float = 0.0
    interrupted: bool = False

    @property
    def by_status(self) -> dict[str, int]:
        return {Status.SENT: self.sent, Status.FAILED: self.failed, Status.DEFERRED: self.deferred}

    @property
    def messages_per_second(self) -> float:
        done = self.sent + self.failed + self.deferred
        return done / self.elapsed if self.elapsed > 0 else 0.0


# --------------------------------------------------------------------------------------
# The pool


@dataclass(frozen=True, slots=True)
class _RetryAt:
    """The job had a temporary failure: try it again at ``when`` (the engine's clock)."""

    when: float


class _Stopped(Enum):
    """The run stopped before the job's attempt: it had no result in this attempt."""

    STOPPED = "stopped"


_STOPPED = _Stopped.STOPPED

# What a worker did with a job: a final status, a retry time, or stopped before trying.
# Decided once per message; the engine tells them apart by type (a cheap isinstance).
_Disposition = Status | _RetryAt | _Stopped


class _Job:
    __slots__ = ("announced", "attempts", "envelope", "item")

    def __init__(self, item: Outgoing[Any]) -> None:
        self.item = item
        self.attempts = 0  # attempts made so far
        self.envelope: Envelope | None = None
        self.announced = False  # on_sending was called and no on_result yet


class _Engine:
    """The shared state of one :func:`deliver` run: the queue, the retry heap, the
    rate limiter and the listener. One lock guards the queue, the heap and the counts."""

    def __init__(
        self,
        *,
        smtp: SMTPConfig,
        send: SendConfig,
        password: str | None,
        listener: DeliveryListener,
        stop: threading.Event,
        clock: Callable[[], float],
        sleep: Callable[[float], object] | None,
        rng: Callable[[], float],
        queue_size: int,
        ssl_context: ssl.SSLContext | None,
        trace: Callable[[str], None] | None,
        limiter: RateSource | None = None,
    ) -> None:
        self.setup = Setup(smtp, password, ssl_context, trace=trace)
        self.data_timeout = smtp.data_timeout
        self.max_per_connection = send.max_per_connection
        self.retries = send.retries
        self.retry_backoff = send.retry_backoff
        self.listener = listener
        self.stop = stop
        self.clock = clock
        self.rng = rng
        self.halt = threading.Event()  # stop, or a fatal error: no new transactions
        # Without an injected sleep, waiting for a rate slot ends as soon as the run halts.
        self.limiter: RateSource = limiter or RateLimiter(
            parse_rate(send.rate), clock=clock, sleep=sleep or self.halt.wait
        )
        self.lock = threading.Lock()
        self.work_ready = threading.Condition(self.lock)
        self.room = threading.Condition(self.lock)
        self.fresh: deque[_Job] = deque()
        self.retry_heap: list[tuple[float, int, _Job]] = []
        self.sequence = 0
        self.outstanding = 0  # taken from the iterator and without a final result
        self.outstanding_bytes = 0  # their sizes: messages with attachments can be large
        self.limit = max(1, queue_size)
        # Once the queue is full the feeder sleeps until it has drained to half: one
        # wake-up per limit/2 messages instead of a thread switch for every message.
        self.low_water = self.limit // 2
        self.feeding_done = False
        self.fatal: BaseException | None = None
        # The relay's reachability: connections open now, connection attempts failed in
        # a row (any worker), and why the run gave up on it.
        self.open_connections = 0
        self.connect_failures = 0
        self.unreachable: str | None = None
        self.stats = DeliveryStats()
        self.listener_lock = threading.Lock()
        # A listener that declares ``thread_safe = True`` is called concurrently: it can
        # then group the log writes of several workers into one commit.
        self.listener_is_thread_safe = bool(getattr(listener, "thread_safe", False))

    # -- called by the feeding (calling) thread

    def feed(self, items: Iterable[Outgoing[Any]]) -> None:
        iterator: Iterator[Outgoing[Any]] = iter(items)
        stop, halt, lock, room, work_ready = self.stop, self.halt, self.lock, self.room, self.work_ready
        fresh, stats, limit = self.fresh, self.stats, self.limit
        while True:
            if stop.is_set() or halt.is_set():
                self.halt_all()
                return
            try:
                item = next(iterator)
            except StopIteration:
                return
            job = _Job(item)
            with lock:
                stats.items += 1
                # The bound covers the queue, the retry heap and the items in flight, so
                # memory stays flat even when every message is being deferred.
                if self.outstanding >= limit or self.outstanding_bytes >= _MAX_OUTSTANDING_BYTES:
                    while (
                        self.outstanding > self.low_water or self.outstanding_bytes > _MAX_OUTSTANDING_BYTES // 2
                    ) and not (stop.is_set() or halt.is_set()):
                        room.wait(_POLL)
                if stop.is_set() or halt.is_set():
                    stats.untouched += 1
                    continue  # the loop's first check halts everything
                fresh.append(job)
                self.outstanding += 1
                self.outstanding_bytes += len(item.data)
                work_ready.notify()

    def halt_all(self) -> None:
        self.halt.set()
        with self.lock:
            self.work_ready.notify_all()
            self.room.notify_all()

    def finish_feeding(self) -> None:
        with self.lock:
            self.feeding_done = True
            self.work_ready.notify_all()

    # -- called by the workers

    def next_job(self, finished: _Job | None, disposition: _Disposition) -> _Job | None:
        """Account for the job just handled, then wait for the next one (None: exit)."""
        stop, halt, heap = self.stop, self.halt, self.retry_heap
        with self.lock:
            if finished is not None:
                self._account(finished, disposition)
            while True:
                if stop.is_set() or halt.is_set():
                    return None
                if heap:
                    now = self.clock()
                    ready_at = heap[0][0]
                    if ready_at <= now:
                        return heapq.heappop(heap)[2]
                # While no connection can be opened, the retries pending probe the relay:
                # new messages wait rather than each failing to connect in turn.
                if self.fresh and not (heap and self.connect_failures and not self.open_connections):
                    return self.fresh.popleft()
                if self.feeding_done and not self.outstanding:
                    self.work_ready.notify_all()
                    return None
                # A retry that is not due yet: wait for it (or for new work), never spin.
                timeout = min(_POLL, ready_at - now) if heap else _POLL
                self.work_ready.wait(timeout)

    def _account(self, job: _Job, disposition: _Disposition) -> None:
        stats = self.stats
        if isinstance(disposition, _RetryAt):
            self.sequence += 1
            heapq.heappush(self.retry_heap, (disposition.when, self.sequence, job))
            stats.retries += 1
            self.work_ready.notify()
            return
        self.outstanding -= 1
        self.outstanding_bytes -= len(job.item.data)
        if self.outstanding <= self.low_water and self.outstanding_bytes <= _MAX_OUTSTANDING_BYTES // 2:
            self.room.notify()
        if disposition is Status.SENT:
            stats.sent += 1
        elif disposition is Status.FAILED:
            stats.failed += 1
        elif disposition is Status.DEFERRED:
            stats.deferred += 1
        elif disposition is Status.SENDING:
            stats.unknown += 1
        elif job.attempts:
            stats.waiting_retry += 1  # a retry the run stopped before starting
        else:
            stats.untouched += 1

    def fail(self, error: BaseException, job: _Job | None) -> None:
        """A worker hit something that ends the run (fatal setup error, listener error)."""
        with self.lock:
            if self.fatal is None:
                self.fatal = error
        if job is not None:
            if job.announced:
                # on_sending said "sending"; leave the caller's log saying something true.
                try:
                    self.report(job, Result(Status.DEFERRED, False, job.attempts, None, f"the run stopped: {error}"))
                except Exception:
                    pass
            with self.lock:
                self._account(job, _STOPPED)
        self.halt_all()

    def announce(self, job: _Job, attempt: int) -> None:
        if self.listener_is_thread_safe:
            self.listener.on_sending(job.item, attempt)
        else:
            with self.listener_lock:
                self.listener.on_sending(job.item, attempt)
        job.announced = True

    def report(self, job: _Job, result: Result) -> None:
        job.announced = False
        if self.listener_is_thread_safe:
            self.listener.on_result(job.item, result)
        else:
            with self.listener_lock:
                self.listener.on_result(job.item, result)

    def finish(self, job: _Job, result: Result) -> Status:
        self.report(job, result)
        return result.status

    def temporary(self, job: _Job, attempt: int, code: int | None, text: str) -> _RetryAt | Status:
        """A temporary failure: schedule a retry (return its time) or give up (deferred)."""
        job.attempts = attempt
        if attempt <= self.retries:
            ready_at = self.clock() + backoff_delay(attempt, base=self.retry_backoff, rng=self.rng)
            self.report(job, Result(Status.DEFERRED, False, attempt, code, text))
            return _RetryAt(float(ready_at))
        return self.finish(job, Result(Status.DEFERRED, True, attempt, code, text))

    def connected(self, opened: bool) -> None:
        with self.lock:
            self.open_connections += 1 if opened else -1
            if opened:
                self.connect_failures = 0

    def connect_failed(self, job: _Job, attempt: int, error: TemporaryDeliveryError) -> _Disposition:
        """A connection could not be opened for ``job``: retry it later, or give up on it,
        and on the relay too once every attempt in a row failed to connect and no
        connection is open: the rest of the list is left for a later run, untouched."""
        with self.lock:
            self.connect_failures += 1
        disposition = self.temporary(job, attempt, error.smtp_code, error.message)
        if disposition is Status.DEFERRED:
            with self.lock:
                unreachable = self.connect_failures > self.retries and not self.open_connections
                if unreachable and self.unreachable is None:
                    self.unreachable = f"{error.message} ({attempt} attempt{'s' if attempt > 1 else ''})"
            if unreachable:
                self.halt_all()
        return disposition


class _Worker:
    """One thread with one persistent connection."""

    def __init__(self, engine: _Engine) -> None:
        self.engine = engine
        self.connection: Connection | None = None
        self.attempts = 0
        self.connections = 0
        self.stale = 0

    def run(self) -> None:
        engine = self.engine
        job: _Job | None = None
        finished: _Job | None = None
        disposition: _Disposition = _STOPPED
        try:
            while True:
                job = engine.next_job(finished, disposition)
                finished = None
                if job is None:
                    return
                disposition = self.handle(job)
                finished = job
        except BaseException as exc:
            engine.fail(exc, job if finished is None else None)
        finally:
            self.drop_connection()

    def drop_connection(self) -> None:
        if self.connection is not None:
            self.connection.close(polite=True)
            self.connection = None
            self.engine.connected(False)

    def handle(self, job: _Job) -> _Disposition:
        engine = self.engine
        item = job.item
        attempt = job.attempts + 1
        envelope = job.envelope
        if envelope is None:
            try:
                envelope = job.envelope = Envelope(item)
            except PermanentDeliveryError as exc:
                return engine.finish(job, Result(Status.FAILED, True, job.attempts, None, exc.message))
        stale_retried = False
        while True:
            connection = self.connection
            if connection is not None and (connection.broken or connection.transactions >= engine.max_per_connection):
                self.drop_connection()
                connection = None
            if connection is None:
                try:
                    connection = self.connection = Connection(engine.setup.open(), data_timeout=engine.data_timeout)
                except TemporaryDeliveryError as exc:
                    self.attempts += 1
                    return engine.connect_failed(job, attempt, exc)
                engine.connected(True)
                self.connections += 1
            if envelope.utf8 and not connection.smtputf8:
                needy = next((a for a in (item.sender, *item.recipients) if not a.isascii()), item.recipients[0])
                return engine.finish(
                    job,
                    Result(
                        Status.FAILED,
                        True,
                        job.attempts,
                        None,
                        f"the relay does not support SMTPUTF8, needed for {needy}",
                    ),
                )
            if engine.limiter.acquire(engine.halt) is None or engine.halt.is_set() or engine.stop.is_set():
                if job.announced:  # halted between a stale connection and its redo
                    return engine.temporary(job, attempt, None, "the run stopped before the message was sent")
                return _STOPPED
            if not job.announced:  # a redo after a stale connection is still "sending"
                engine.announce(job, attempt)
            outcome, code, text = connection.transact(envelope)
            if outcome == STALE:
                self.stale += 1
                if not stale_retried:
                    stale_retried = True
                    continue
                outcome = TEMP
            self.attempts += 1
            if outcome == OK:
                return engine.finish(job, Result(Status.SENT, True, attempt, code, text))
            if outcome == PERM:
                return engine.finish(job, Result(Status.FAILED, True, attempt, code, text))
            if outcome == UNKNOWN:
                return engine.finish(job, Result(Status.SENDING, True, attempt, None, text))
            return engine.temporary(job, attempt, code, text)


def deliver(
    items: Iterable[Outgoing[Any]],
    *,
    smtp: SMTPConfig,
    send: SendConfig,
    password: str | None,
    listener: DeliveryListener,
    stop: threading.Event,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], object] | None = None,
    rng: Callable[[], float] = random.random,
    queue_size: int = 1000,
    ssl_context: ssl.SSLContext | None = None,
    trace: Callable[[str], None] | None = None,
    limiter: RateSource | None = None,
) -> DeliveryStats:
    """Deliver every item of ``items`` through a pool of ``send.connections`` connections.

    ``items`` is iterated in the calling thread (render lazily there); at most
    ``queue_size`` items are held at once, queued, waiting for a retry or in flight.
    Every item that gets ``listener.on_sending`` also gets a ``listener.on_result``;
    each item ends with exactly one final result unless the run stops first.

    Temporary failures (4xx, dropped connections, timeouts, connection refused) are
    retried up to ``send.retries`` times after :func:`~mailer.throttle.backoff_delay`,
    on any connection; permanent ones (5xx) are final at once. The global rate
    ``send.rate`` is never exceeded by more than one message in any second.

    When ``stop`` is set: no new items are taken, transactions in flight finish, no
    retry starts, connections are closed, and the stats come back with
    ``interrupted=True``. Raises :class:`ConnectionSetupError` (after the same orderly
    stop) when the relay cannot be used at all: TLS or certificate failure, missing
    STARTTLS, login refused, or a password that would travel unencrypted. An exception
    from the listener or from ``items`` also stops the run and comes out unchanged.

    ``clock`` drives the rate limiter and retry times; ``sleep`` waits for a rate slot
    (default: a wait that ends early on stop); ``rng`` is the backoff jitter;
    ``ssl_context`` replaces the context built from ``smtp.tls_verify`` (tests use it
    to trust a throwaway CA); ``trace`` receives the SMTP conversation line by line,
    AUTH redacted (``--debug``); ``limiter`` replaces the rate limiter built from
    ``send.rate`` (cooperating runs share one: :class:`mailer.store.pg_work.SharedRate`).
    """
    check_relay_settings(smtp, password)
    engine = _Engine(
        smtp=smtp,
        send=send,
        password=password,
        listener=listener,
        stop=stop,
        clock=clock,
        sleep=sleep,
        rng=rng,
        queue_size=queue_size,
        ssl_context=ssl_context,
        trace=trace,
        limiter=limiter,
    )
    started = clock()
    workers = [_Worker(engine) for _ in range(send.connections)]
    threads = [
        threading.Thread(target=worker.run, name=f"mailer-smtp-{index}", daemon=True)
        for index, worker in enumerate(workers, 1)
    ]
    for thread in threads:
        thread.start()
    try:
        engine.feed(items)
    except BaseException:
        engine.halt_all()
        raise
    finally:
        engine.finish_feeding()
        for thread in threads:
            while thread.is_alive():
                thread.join(_POLL)
                if stop.is_set() and not engine.halt.is_set():
                    engine.halt_all()
    stats = engine.stats
    stats.untouched += len(engine.fresh)
    stats.waiting_retry += len(engine.retry_heap)
    stats.unreachable = engine.unreachable
    for worker in workers:
        stats.attempts += worker.attempts
        stats.connections_opened += worker.connections
        stats.stale_reconnects += worker.stale
    stats.interrupted = stop.is_set()
    stats.elapsed = clock() - started
    if engine.fatal is not None:
        raise engine.fatal
    return stats
