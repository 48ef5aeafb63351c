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
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Protocol

from ..core.config import SendConfig, SMTPConfig, parse_rate
from ..core.errors import ConnectionSetupError, PermanentDeliveryError, TemporaryDeliveryError
from ..core.outcomes import Outgoing, Result, Status
from ..smtp.policy import check_relay_settings
from ..smtp.session import Setup, SourceAddresses
from ..smtp.transaction import OK, PERM, STALE, TEMP, UNKNOWN, Connection, Envelope
from .routes import Relay
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
    sent_by_relay: dict[str, int] = field(default_factory=dict)  # relay name -> messages it accepted
    # Several relays: each one that could not be reached at some point -> (its last
    # error, whether it was still down at the end).
    relay_troubles: dict[str, tuple[str, bool]] = field(default_factory=dict)
    elapsed: float = 0.0
    interrupted: bool = False
    peak_sessions: int = 0  # direct delivery: the most SMTP sessions open at once

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
    """The run stopped before the job's attempt (STOPPED), or the job's relay could not
    be reached and the job went back to the queue of another one, with no attempt
    counted (HANDED_BACK)."""

    STOPPED = "stopped"
    HANDED_BACK = "handed back"


_STOPPED = _Stopped.STOPPED
_HANDED_BACK = _Stopped.HANDED_BACK

# What a worker did with a job: a final status, a retry time, or stopped before trying.
# Decided once per message; the engine tells them apart by type (a cheap isinstance).
_Disposition = Status | _RetryAt | _Stopped


class _Probe(Enum):
    """What :meth:`_Engine.next_job` hands a worker of a relay that is down when it is
    time to see whether the relay is back: open a connection, send nothing."""

    PROBE = "probe"


_PROBE = _Probe.PROBE


class _Job:
    __slots__ = ("announced", "attempts", "envelope", "item")

    def __init__(self, item: Outgoing[Any]) -> None:
        self.item = item
        self.attempts = 0  # attempts made so far
        self.envelope: Envelope | None = None
        self.announced = False  # on_sending was called and no on_result yet


class _Lane:
    """One relay of the run: its session setup, its own rate, its queue and its health.

    With one relay (``[smtp]``, or a stream of one) the lane is the whole pool, as
    before streams existed. With several, each new message goes to one lane by smooth
    weighted round robin (nginx's: exact shares, no randomness); a lane that cannot
    open a connection while it has none open is *down*: it gets nothing new, its queue
    moves to the others, and one of its workers probes it (a connection, no message)
    after a growing pause until it answers again.
    """

    __slots__ = (
        "connect_failures",
        "connections",
        "current",
        "data_timeout",
        "down",
        "fresh",
        "last_error",
        "limiter",
        "name",
        "no_smtputf8",
        "open_connections",
        "probe_at",
        "probing",
        "ready",
        "setup",
        "weight",
    )

    def __init__(
        self,
        relay: Relay,
        setup: Setup,
        limiter: RateLimiter | None,
        connections: int,
        ready: threading.Condition,
    ) -> None:
        self.name = relay.name
        self.weight = relay.weight
        self.setup = setup
        self.data_timeout = relay.smtp.data_timeout
        self.limiter = limiter  # the relay's own rate; None: only the run's
        self.connections = connections
        self.fresh: deque[_Job] = deque()
        self.ready = ready  # on the engine's lock: this lane's workers wait here
        self.open_connections = 0
        self.connect_failures = 0  # connection attempts that failed in a row
        self.last_error: TemporaryDeliveryError | ConnectionSetupError | None = None
        self.down = False
        self.probe_at = 0.0
        self.probing = False
        self.current = 0.0  # the weighted round robin's running credit
        self.no_smtputf8 = False  # the relay did not offer SMTPUTF8 (RFC 6531)


class _Engine:
    """The shared state of one :func:`deliver` run: the queues, the retry heap, the
    rate limiters and the listener. One lock guards the queues, the heap and the counts."""

    def __init__(
        self,
        *,
        relays: Sequence[Relay],
        send: SendConfig,
        listener: DeliveryListener,
        stop: threading.Event,
        clock: Callable[[], float],
        sleep: Callable[[float], object] | None,
        rng: Callable[[], float],
        queue_size: int,
        ssl_context: ssl.SSLContext | None,
        trace: Callable[[str], None] | None,
        limiter: RateSource | None = None,
        source_addresses: Sequence[str],
        helo: str | None,
    ) -> None:
        self.max_per_connection = send.max_per_connection
        self.retries = send.retries
        self.retry_backoff = send.retry_backoff
        self.listener = listener
        self.stop = stop
        self.clock = clock
        self.rng = rng
        self.halt = threading.Event()  # stop, or a fatal error: no new transactions
        # Without an injected sleep, waiting for a rate slot ends as soon as the run halts.
        wait = sleep or self.halt.wait
        self.limiter: RateSource = limiter or RateLimiter(parse_rate(send.rate), clock=clock, sleep=wait)
        self.lock = threading.Lock()
        self.room = threading.Condition(self.lock)
        sources = SourceAddresses(source_addresses)  # one rotation over all the relays
        self.lanes = [
            _Lane(
                relay,
                Setup(relay.smtp, relay.password, ssl_context, trace=trace, helo=helo, sources=sources),
                RateLimiter(relay.rate, clock=clock, sleep=wait) if relay.rate else None,
                relay.connections or send.connections,
                threading.Condition(self.lock),
            )
            for relay in relays
        ]
        self.single = len(self.lanes) == 1
        # With one relay, its queue and condition are the engine's (the path of every
        # message stays what it was before streams).
        self.fresh = self.lanes[0].fresh
        self.work_ready = self.lanes[0].ready
        self.parked: deque[_Job] = deque()  # several relays, all down: waiting for one
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
        self.unreachable: str | None = None  # why the run gave up on the relay(s)
        self.stats = DeliveryStats()
        self.listener_lock = threading.Lock()
        # A listener that declares ``thread_safe = True`` is called concurrently: it can
        # then group the log writes of several workers into one commit.
        self.listener_is_thread_safe = bool(getattr(listener, "thread_safe", False))

    # -- called by the feeding (calling) thread

    def feed(self, items: Iterable[Outgoing[Any]]) -> None:
        iterator: Iterator[Outgoing[Any]] = iter(items)
        stop, halt, lock, room, work_ready = self.stop, self.halt, self.lock, self.room, self.work_ready
        fresh, stats, limit, single = self.fresh, self.stats, self.limit, self.single
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
                self.outstanding += 1
                self.outstanding_bytes += len(item.data)
                if single:
                    fresh.append(job)
                    work_ready.notify()
                else:
                    self._place(job)

    def _pick(self, *, smtputf8: bool = False) -> _Lane | None:
        """The lane of the next new message: smooth weighted round robin over the lanes
        that are up (each gets its weight's share exactly, interleaved), or None.
        ``smtputf8``: only among the relays not known to lack SMTPUTF8."""
        best: _Lane | None = None
        total = 0.0
        for lane in self.lanes:
            if lane.down or (smtputf8 and lane.no_smtputf8):
                continue
            lane.current += lane.weight
            total += lane.weight
            if best is None or lane.current > best.current:
                best = lane
        if best is not None:
            best.current -= total
        return best

    def _place(self, job: _Job, *, front: bool = False) -> None:
        """Queue a job on a lane that is up (lock held); parked when every one is down."""
        lane = self._pick()
        if lane is None:
            if front:
                self.parked.appendleft(job)
            else:
                self.parked.append(job)
            return
        if front:
            lane.fresh.appendleft(job)
        else:
            lane.fresh.append(job)
        lane.ready.notify()

    def hand_to_smtputf8_relay(self, lane: _Lane, job: _Job) -> bool:
        """``lane``'s relay does not offer SMTPUTF8, which ``job`` needs: give the job to
        another relay that is up and not known to lack it (False: there is none)."""
        with self.lock:
            lane.no_smtputf8 = True
            other = self._pick(smtputf8=True)
            if other is None:
                return False
            other.fresh.appendleft(job)
            other.ready.notify()
            return True

    def _notify_lanes(self) -> None:
        for lane in self.lanes:
            lane.ready.notify_all()

    def halt_all(self) -> None:
        self.halt.set()
        with self.lock:
            self._notify_lanes()
            self.room.notify_all()

    def finish_feeding(self) -> None:
        with self.lock:
            self.feeding_done = True
            self._notify_lanes()

    # -- called by the workers

    def next_job(self, lane: _Lane, finished: _Job | None, disposition: _Disposition) -> _Job | _Probe | None:
        """Account for the job just handled, then wait for the next one (None: exit;
        :data:`_PROBE`: the lane is down and it is time to see whether it is back)."""
        stop, halt, heap, fresh = self.stop, self.halt, self.retry_heap, lane.fresh
        with self.lock:
            if finished is not None:
                self._account(finished, disposition)
            while True:
                if stop.is_set() or halt.is_set():
                    return None
                if lane.down:
                    if self.feeding_done and not self.outstanding:
                        self._notify_lanes()
                        return None
                    now = self.clock()
                    if not lane.probing and now >= lane.probe_at:
                        lane.probing = True
                        return _PROBE
                    lane.ready.wait(min(_POLL, max(0.0, lane.probe_at - now)))
                    continue
                if heap:
                    now = self.clock()
                    ready_at = heap[0][0]
                    if ready_at <= now:
                        return heapq.heappop(heap)[2]
                # While no connection can be opened, the retries pending probe the relay:
                # new messages wait rather than each failing to connect in turn.
                if fresh and not (heap and lane.connect_failures and not lane.open_connections):
                    return fresh.popleft()
                if self.feeding_done and not self.outstanding:
                    self._notify_lanes()
                    return None
                # A retry that is not due yet: wait for it (or for new work), never spin.
                timeout = min(_POLL, ready_at - now) if heap else _POLL
                lane.ready.wait(timeout)

    def _account(self, job: _Job, disposition: _Disposition) -> None:
        stats = self.stats
        if isinstance(disposition, _RetryAt):
            self.sequence += 1
            heapq.heappush(self.retry_heap, (disposition.when, self.sequence, job))
            stats.retries += 1
            if self.single:
                self.work_ready.notify()
            else:
                for lane in self.lanes:
                    lane.ready.notify()
            return
        if disposition is _HANDED_BACK:
            return  # queued again on another lane: still outstanding
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

    def connected(self, lane: _Lane, opened: bool) -> None:
        with self.lock:
            lane.open_connections += 1 if opened else -1
            if opened:
                lane.connect_failures = 0

    def connect_failed(self, lane: _Lane, job: _Job, attempt: int, error: TemporaryDeliveryError) -> _Disposition:
        """A connection could not be opened for ``job`` (one relay): retry it later, or
        give up on it, and on the relay too once every attempt in a row failed to
        connect and no connection is open: the rest of the list is left for a later
        run, untouched."""
        with self.lock:
            lane.connect_failures += 1
        disposition = self.temporary(job, attempt, error.smtp_code, error.message)
        if disposition is Status.DEFERRED:
            with self.lock:
                unreachable = lane.connect_failures > self.retries and not lane.open_connections
                if unreachable and self.unreachable is None:
                    self.unreachable = f"{error.message} ({attempt} attempt{'s' if attempt > 1 else ''})"
            if unreachable:
                self.halt_all()
        return disposition

    def lane_failed(self, lane: _Lane, job: _Job | None, error: TemporaryDeliveryError | ConnectionSetupError) -> float:
        """One of several relays could not be reached (refused, timed out, TLS or login
        refused): ``job`` goes back to the front of another relay's queue, with no
        attempt counted and nothing reported (no transaction started). A relay with no
        connection open is then down until a probe finds it back. When every relay is
        down and each has failed more than ``[send] retries`` times in a row, the run
        stops handing out messages (or ends with the setup error, when every relay
        refused the setup). Returns how long the failed worker should pause."""
        with self.lock:
            lane.connect_failures += 1
            lane.last_error = error
            lane.probing = False
            pause = backoff_delay(lane.connect_failures, base=self.retry_backoff, rng=self.rng)
            lane.probe_at = self.clock() + pause
            if not lane.down and not lane.open_connections:
                lane.down = True
                moved = list(lane.fresh)
                lane.fresh.clear()
                for waiting in moved:
                    self._place(waiting)
            if job is not None:
                self._place(job, front=True)
            if all(other.down for other in self.lanes):
                errors = [other.last_error for other in self.lanes]
                if all(isinstance(e, ConnectionSetupError) for e in errors):
                    if self.fatal is None:
                        self.fatal = errors[0]
                    give_up = True
                else:
                    give_up = all(other.connect_failures > self.retries for other in self.lanes)
                    if give_up and self.unreachable is None:
                        self.unreachable = "; ".join(
                            f"relay {other.name}: {other.last_error.message if other.last_error else 'unknown'} "
                            f"({other.connect_failures} attempts)"
                            for other in self.lanes
                        )
            else:
                give_up = False
        if give_up:
            self.halt_all()
        return pause

    def lane_back(self, lane: _Lane) -> None:
        """A probe connected: the relay is up again. The messages queued meanwhile (on
        the other relays, or parked while every relay was down) are dealt out again by
        weight, so it takes its share of them too, not only of those still to come."""
        with self.lock:
            lane.down = False
            lane.probing = False
            lane.connect_failures = 0
            lane.open_connections += 1
            queued = list(self.parked)
            self.parked.clear()
            for other in self.lanes:
                queued.extend(other.fresh)
                other.fresh.clear()
                other.current = 0.0
            for job in queued:
                self._place(job)
            lane.ready.notify_all()

    def leftover(self) -> list[_Job]:
        """The jobs still queued when the run ends (never attempted, or waiting to be)."""
        jobs = list(self.parked)
        for lane in self.lanes:
            jobs.extend(lane.fresh)
        return jobs


class _Worker:
    """One thread with one persistent connection to its lane's relay."""

    def __init__(self, engine: _Engine, lane: _Lane) -> None:
        self.engine = engine
        self.lane = lane
        self.connection: Connection | None = None
        self.attempts = 0
        self.connections = 0
        self.stale = 0
        self.sent = 0

    def run(self) -> None:
        engine = self.engine
        lane = self.lane
        job: _Job | None = None
        finished: _Job | None = None
        disposition: _Disposition = _STOPPED
        try:
            while True:
                next_job = engine.next_job(lane, finished, disposition)
                finished = None
                if next_job is None:
                    return
                if next_job is _PROBE:
                    job = None
                    self.probe()
                    continue
                job = next_job
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
            self.engine.connected(self.lane, False)

    def probe(self) -> None:
        """See whether the lane's relay is back: open a connection and keep it, send nothing."""
        lane = self.lane
        try:
            connection = Connection(lane.setup.open(), data_timeout=lane.data_timeout)
        except (TemporaryDeliveryError, ConnectionSetupError) as exc:
            self.engine.lane_failed(lane, None, exc)
            return
        self.connection = connection
        self.connections += 1
        self.engine.lane_back(lane)

    def handle(self, job: _Job) -> _Disposition:
        engine = self.engine
        lane = self.lane
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
                    connection = self.connection = Connection(lane.setup.open(), data_timeout=lane.data_timeout)
                except (TemporaryDeliveryError, ConnectionSetupError) as exc:
                    if engine.single:
                        if isinstance(exc, ConnectionSetupError):
                            raise  # the relay cannot be used as configured: the run ends
                        self.attempts += 1
                        return engine.connect_failed(lane, job, attempt, exc)
                    if job.announced:  # a redo after a stale connection: it stays this lane's attempt
                        return engine.temporary(job, attempt, None, exc.message)
                    pause = engine.lane_failed(lane, job, exc)
                    if not lane.down:  # the relay has other connections open (a connection limit?)
                        engine.halt.wait(pause)
                    return _HANDED_BACK
                engine.connected(lane, True)
                self.connections += 1
            if envelope.utf8 and not connection.smtputf8:
                if not engine.single and not job.announced and engine.hand_to_smtputf8_relay(lane, job):
                    return _HANDED_BACK
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
            own_rate = lane.limiter
            run_rate = engine.limiter
            if own_rate is None:
                granted = run_rate.acquire(engine.halt)
            elif isinstance(run_rate, RateLimiter):
                granted = own_rate.acquire_with(run_rate, engine.halt)
            else:  # a rate shared with other runs: the relay's slot first, the shared one last
                granted = own_rate.acquire(engine.halt)
                if granted is not None:
                    granted = run_rate.acquire(engine.halt)
            if granted is None or engine.halt.is_set() or engine.stop.is_set():
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
                self.sent += 1
                return engine.finish(job, Result(Status.SENT, True, attempt, code, text))
            if outcome == PERM:
                return engine.finish(job, Result(Status.FAILED, True, attempt, code, text))
            if outcome == UNKNOWN:
                return engine.finish(job, Result(Status.SENDING, True, attempt, None, text))
            return engine.temporary(job, attempt, code, text)


def deliver(
    items: Iterable[Outgoing[Any]],
    *,
    smtp: SMTPConfig | None = None,
    send: SendConfig,
    password: str | None = None,
    listener: DeliveryListener,
    stop: threading.Event,
    relays: Sequence[Relay] | None = None,
    source_addresses: Sequence[str] = (),
    helo: str | None = None,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], object] | None = None,
    rng: Callable[[], float] = random.random,
    queue_size: int = 1000,
    ssl_context: ssl.SSLContext | None = None,
    trace: Callable[[str], None] | None = None,
    limiter: RateSource | None = None,
) -> DeliveryStats:
    """Deliver every item of ``items`` through a pool of persistent connections.

    The relay is ``smtp`` (with ``password``), or the ``relays`` of a stream: each gets
    its weight's share of the messages, ``connections`` connections (default
    ``send.connections``) and its own ``rate`` (never exceeded; the run's ``send.rate``
    caps them all together). A relay that cannot be reached while others can is skipped
    until a probe connects again; its messages go to the others, with no attempt
    counted. ``source_addresses`` are the local addresses connections leave from, in
    turn; ``helo`` the EHLO name (default: the relay's ``helo``, else this host's name).

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
    stop) when the relay (every relay) cannot be used at all: TLS or certificate
    failure, missing STARTTLS, login refused, or a password that would travel
    unencrypted. An exception from the listener or from ``items`` also stops the run
    and comes out unchanged.

    ``clock`` drives the rate limiters and retry times; ``sleep`` waits for a rate slot
    (default: a wait that ends early on stop); ``rng`` is the backoff jitter;
    ``ssl_context`` replaces the context built from ``smtp.tls_verify`` (tests use it
    to trust a throwaway CA); ``trace`` receives the SMTP conversation line by line,
    AUTH redacted (``--debug``); ``limiter`` replaces the rate limiter built from
    ``send.rate`` (cooperating runs share one: :class:`mailer.store.pg_work.SharedRate`).
    """
    if relays is None:
        if smtp is None:
            raise TypeError("deliver() needs smtp= or relays=")
        relays = [Relay(name="smtp", smtp=smtp, password=password)]
    if not relays:
        raise ValueError("deliver() needs at least one relay")
    for relay in relays:
        check_relay_settings(relay.smtp, relay.password, section=relay.section)
    engine = _Engine(
        relays=relays,
        send=send,
        listener=listener,
        stop=stop,
        clock=clock,
        sleep=sleep,
        rng=rng,
        queue_size=queue_size,
        ssl_context=ssl_context,
        trace=trace,
        limiter=limiter,
        source_addresses=source_addresses,
        helo=helo,
    )
    started = clock()
    workers = [_Worker(engine, lane) for lane in engine.lanes for _ in range(lane.connections)]
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
    for job in engine.leftover():
        if job.attempts:
            stats.waiting_retry += 1
        else:
            stats.untouched += 1
    stats.waiting_retry += len(engine.retry_heap)
    stats.unreachable = engine.unreachable
    if not engine.single:
        stats.relay_troubles = {
            lane.name: (lane.last_error.message, lane.down) for lane in engine.lanes if lane.last_error is not None
        }
    for worker in workers:
        stats.attempts += worker.attempts
        stats.connections_opened += worker.connections
        stats.stale_reconnects += worker.stale
        stats.sent_by_relay[worker.lane.name] = stats.sent_by_relay.get(worker.lane.name, 0) + worker.sent
    stats.interrupted = stop.is_set()
    stats.elapsed = clock() - started
    if engine.fatal is not None:
        raise engine.fatal
    return stats
