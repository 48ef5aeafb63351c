"""The direct-delivery engine: one asyncio loop, many SMTP sessions to recipients' MX hosts.

Messages are queued per recipient domain. Each domain's MX route is looked up once
(:mod:`mailer.delivery.mx`, cached with its TTL), its :class:`~.shaping.Destination`
chosen (shared by every domain behind the same provider), and up to that destination's
connection limit of workers deliver the domain's queue over persistent sessions
(:mod:`mailer.smtp.aio`, PIPELINING and BDAT where offered). A worker is a coroutine:
waiting on a slow MX costs a few kilobytes, not a thread, so thousands of sessions can
wait at once. At most ``queue_size`` messages are held (queued, waiting, in flight).

Rules (RFC 5321 section 5, and what operators of sending MTAs expect):

* each MX host (each of its addresses) is tried in turn on connection failure or a 4xx
  (or 5xx) greeting; all failing is a temporary failure of the message;
* a 421 or "too many connections" backs off *that destination* (one connection fewer, a
  pause); a reply matching a :data:`~.shaping.REPLY_RULES` rule throttles or suspends
  it; a suspension longer than ``max_wait`` defers its messages at once, so that they
  wait for the next run, not this one;
* after a reputation deferral (421 or 4.7.x) the destination's next connection leaves
  from the next source address of the stream;
* a domain that defers or is slow holds only its own workers: fresh mail to other
  domains goes on;
* temporary failures are retried in the run after a growing delay, up to ``attempts``
  tries, then the message ends ``deferred``.

The listener interface is the threaded pool's (:class:`~.pool.DeliveryListener`), and
so is the result (:class:`~.pool.DeliveryStats`), so the send path can use either.
"""

from __future__ import annotations

import asyncio
import random
import threading
import time
from collections import deque
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from ..core.errors import DeliveryError, PermanentDeliveryError
from ..core.outcomes import Outgoing, Result, Status
from ..smtp.aio import AsyncSession, SessionError, open_session
from ..smtp.transaction import OK, PERM, UNKNOWN, Envelope
from .mx import MailRoute, MXResolver, NoMailRouteError, RouteLookupDeferred
from .pool import DeliveryListener, DeliveryStats
from .shaping import (
    REPLY_RULES,
    Destination,
    ReplyRule,
    Shaper,
    is_reputation_deferral,
    is_too_many_connections,
    match_reply_rule,
)

__all__ = ["DirectSettings", "deliver_direct", "deliver_direct_async"]


@dataclass(frozen=True)
class DirectSettings:
    """How the engine delivers (the ``[direct]`` and stream settings, as plain values).

    ``tls``: "opportunistic" or "required" (see :func:`mailer.smtp.aio.open_session`);
    "mta-sts" is treated as opportunistic until MTA-STS policies are fetched (the seam is
    :attr:`tls_for_domain`). ``attempts``: tries per message in this run. ``retry_delay``:
    the first retry's delay, doubling. ``backoff_pause``: the pause after a 421 / too
    many connections. ``max_wait``: a destination paused longer than this defers its
    messages now. ``max_sessions``: sessions open at once over all destinations."""

    port: int = 25
    helo: str = "localhost"
    tls: str = "opportunistic"
    source_addresses: tuple[str, ...] = ()
    attempts: int = 3
    retry_delay: float = 60.0
    backoff_pause: float = 60.0
    max_wait: float = 300.0
    max_sessions: int = 1000
    timeout: float = 60.0
    queue_size: int = 20000
    rules: tuple[ReplyRule, ...] = REPLY_RULES
    tls_for_domain: Callable[[str], str] | None = None  # MTA-STS seam: the mode for one domain
    # The campaign's rate over all destinations: awaited just before each transaction
    # (after the destination's own slot); None: no limit beyond the destinations'.
    pace: Callable[[], Awaitable[None]] | None = None


@dataclass
class _Job:
    item: Outgoing[Any]
    envelope: Envelope | None = None
    attempts: int = 0
    not_before: float = 0.0
    last: tuple[int | None, str] = (None, "")


@dataclass
class _DomainQueue:
    domain: str
    jobs: deque[_Job] = field(default_factory=deque)
    workers: int = 0
    route: MailRoute | None = None
    destination: Destination | None = None
    resolving: bool = False


def _domain_of(item: Outgoing[Any]) -> str:
    address = item.recipients[0]
    return address.rpartition("@")[2].strip().rstrip(".").lower()


class _Engine:
    def __init__(
        self,
        *,
        settings: DirectSettings,
        listener: DeliveryListener,
        resolver: MXResolver,
        shaper: Shaper,
        stop: threading.Event,
        clock: Callable[[], float],
        sleep: Callable[[float], Awaitable[None]],
        rng: Callable[[], float],
    ) -> None:
        self.settings = settings
        self.listener = listener
        self.resolver = resolver
        self.shaper = shaper
        self.stop = stop
        self.clock = clock
        self.sleep = sleep
        self.rng = rng
        self.stats = DeliveryStats()
        self.queues: dict[str, _DomainQueue] = {}
        self.held = 0
        self.space = asyncio.Event()
        self.done = asyncio.Event()
        self.sessions = asyncio.Semaphore(settings.max_sessions)
        self.open_sessions = 0
        self.peak_sessions = 0
        self.changed = asyncio.Condition()
        self.tasks: set[asyncio.Task[None]] = set()
        self.fatal: BaseException | None = None

    # ---------------------------------------------------------------- feeding

    async def feed(self, items: AsyncIterator[Outgoing[Any]]) -> None:
        count = 0
        async for item in items:
            if self.stop.is_set() or self.fatal is not None:
                self.stats.untouched += 1  # taken from the feed, never queued
                break
            count += 1
            self.stats.items += 1
            self.held += 1
            queue = self.queues.get(_domain_of(item))
            if queue is None:
                queue = self.queues[_domain_of(item)] = _DomainQueue(_domain_of(item))
            queue.jobs.append(_Job(item))
            self._staff(queue)
            if self.held >= self.settings.queue_size:
                self.space.clear()
                await self.space.wait()
            elif count % 200 == 0:
                await asyncio.sleep(0)
        while self.held > 0 and self.fatal is None:
            self.done.clear()
            await self.done.wait()

    def _spawn(self, coroutine: Awaitable[None]) -> None:
        task = asyncio.ensure_future(coroutine)
        self.tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self.tasks.discard(task)
        if not task.cancelled() and task.exception() is not None and self.fatal is None:
            self.fatal = task.exception()
            self.done.set()
            self.space.set()

    def _staff(self, queue: _DomainQueue) -> None:
        """Start the lookup, or as many workers as the destination allows for this queue."""
        if queue.route is None:
            if not queue.resolving:
                queue.resolving = True
                self._spawn(self._resolve(queue))
            return
        destination = queue.destination
        assert destination is not None
        wanted = min(len(queue.jobs), destination.connection_limit(self.clock()))
        while queue.workers < wanted:
            queue.workers += 1
            self._spawn(self._work(queue))

    async def _resolve(self, queue: _DomainQueue) -> None:
        try:
            route = await self.resolver.route(queue.domain)
        except (NoMailRouteError, RouteLookupDeferred) as exc:
            queue.resolving = False
            status = Status.FAILED if isinstance(exc, PermanentDeliveryError) else Status.DEFERRED
            while queue.jobs:
                self._finish(queue.jobs.popleft(), status, None, exc.message)
            return
        queue.route = route
        queue.destination = self.shaper.destination(queue.domain, [h.name for h in route.hosts])
        queue.resolving = False
        self._staff(queue)

    # ---------------------------------------------------------------- results

    def _finish(self, job: _Job, status: Status, code: int | None, text: str) -> None:
        result = Result(status=status, final=True, attempts=job.attempts, smtp_code=code, smtp_reply=text)
        if status is Status.SENT:
            self.stats.sent += 1
        elif status is Status.FAILED:
            self.stats.failed += 1
        elif status is Status.DEFERRED:
            self.stats.deferred += 1
        else:
            self.stats.unknown += 1
        self.listener.on_result(job.item, result)
        self._release()

    def _release(self) -> None:
        self.held -= 1
        if self.held < self.settings.queue_size:
            self.space.set()
        if self.held <= 0:
            self.done.set()

    def _temporary(self, queue: _DomainQueue, job: _Job, code: int | None, text: str) -> None:
        """A temporary failure: retried later in the run, or deferred for good."""
        job.last = (code, text)
        if job.attempts >= self.settings.attempts or self.stop.is_set():
            self._finish(job, Status.DEFERRED, code, text)
            return
        self.stats.retries += 1
        self.listener.on_result(
            job.item,
            Result(status=Status.DEFERRED, final=False, attempts=job.attempts, smtp_code=code, smtp_reply=text),
        )
        delay = self.settings.retry_delay * (2 ** (job.attempts - 1)) * (0.8 + 0.4 * self.rng())
        job.not_before = self.clock() + delay
        queue.jobs.append(job)

    def _defer_paused(self, queue: _DomainQueue, destination: Destination) -> None:
        """The destination is suspended past ``max_wait``: its messages wait for a later run."""
        why = destination.reason or "the destination asked us to wait"
        while queue.jobs:
            job = queue.jobs.popleft()
            code, text = job.last
            self._finish(job, Status.DEFERRED, code, text or f"{queue.domain} suspended: {why}")

    # ---------------------------------------------------------------- workers

    async def _work(self, queue: _DomainQueue) -> None:
        destination = queue.destination
        assert destination is not None and queue.route is not None
        session: AsyncSession | None = None
        slot = False
        try:
            while queue.jobs and not self.stop.is_set():
                now = self.clock()
                if destination.paused_until - now > self.settings.max_wait:
                    self._defer_paused(queue, destination)
                    break
                if session is None:
                    if not await self._connection_slot(destination):
                        continue
                    slot = True
                    session = await self._connect(queue, destination)
                    if session is None:
                        destination.active -= 1
                        slot = False
                        await self._notify()
                        continue
                job = self._next_ready(queue)
                if job is None:
                    if not queue.jobs:
                        break  # another worker took the last one while this one waited
                    wait = min(j.not_before for j in queue.jobs) - self.clock()
                    if wait > 10 and session is not None:
                        await self._close(session)
                        session = None
                        destination.active -= 1
                        slot = False
                        await self._notify()
                    await self.sleep(max(wait, 0.0))
                    continue
                wait = destination.take_slot(self.clock())
                if wait > 0:
                    await self.sleep(wait)
                if self.settings.pace is not None:
                    await self.settings.pace()
                if self.stop.is_set():
                    queue.jobs.appendleft(job)  # not started: counted with the others below
                    break
                kept = await self._transact(queue, destination, session, job)
                if not kept or session.transactions >= destination.per_connection:
                    await self._close(session)
                    session = None
                    destination.active -= 1
                    slot = False
                    await self._notify()
        finally:
            if session is not None:
                await self._close(session)
            if slot:
                destination.active -= 1
                await self._notify()
            queue.workers -= 1
            if self.stop.is_set():
                while queue.jobs:
                    job = queue.jobs.popleft()
                    if job.attempts:
                        self.stats.waiting_retry += 1
                    else:
                        self.stats.untouched += 1
                    self._release()
            elif queue.jobs:
                self._staff(queue)

    async def _close(self, session: AsyncSession) -> None:
        self.open_sessions -= 1
        self.sessions.release()
        await session.close()

    def _next_ready(self, queue: _DomainQueue) -> _Job | None:
        now = self.clock()
        for _ in range(len(queue.jobs)):
            job = queue.jobs.popleft()
            if job.not_before <= now:
                return job
            queue.jobs.append(job)
        return None

    async def _notify(self) -> None:
        async with self.changed:
            self.changed.notify_all()

    async def _connection_slot(self, destination: Destination) -> bool:
        """Wait until the destination may have one more connection; False if the wait was cut short."""
        async with self.changed:
            while True:
                now = self.clock()
                if destination.active < destination.connection_limit(now) and destination.paused_until <= now:
                    destination.active += 1
                    destination.peak_active = max(destination.peak_active, destination.active)
                    return True
                if destination.paused_until - now > self.settings.max_wait or self.stop.is_set():
                    return False
                timeout = max(0.05, min(destination.paused_until - now, 1.0))
                try:
                    await asyncio.wait_for(self.changed.wait(), timeout)
                except TimeoutError:
                    pass

    async def _connect(self, queue: _DomainQueue, destination: Destination) -> AsyncSession | None:
        """A session to the first MX host that takes one; None after a temporary failure of the head job."""
        assert queue.route is not None
        settings = self.settings
        tls = settings.tls_for_domain(queue.domain) if settings.tls_for_domain else settings.tls
        if tls == "mta-sts":
            tls = "opportunistic"
        errors: list[str] = []
        source = destination.next_source(settings.source_addresses)
        # The run-wide cap holds while the session is open: released in _close().
        await self.sessions.acquire()
        for host in queue.route.hosts:
            for address in host.addresses:
                try:
                    session = await open_session(
                        host.name,
                        address,
                        settings.port,
                        helo=settings.helo,
                        source=source,
                        timeout=settings.timeout,
                        tls="required" if tls == "required" else "opportunistic",
                    )
                except SessionError as exc:
                    errors.append(exc.message)
                    if exc.code == 421 or is_too_many_connections(exc.code, exc.message):
                        destination.back_off(self.clock(), pause=settings.backoff_pause, reason=exc.message)
                    continue
                self.stats.connections_opened += 1
                self.open_sessions += 1
                self.peak_sessions = max(self.peak_sessions, self.open_sessions)
                return session
        self.sessions.release()
        # Every MX host failed: the first waiting job takes the failure as an attempt.
        job = self._next_ready(queue) or (queue.jobs.popleft() if queue.jobs else None)
        if job is not None:
            job.attempts += 1
            self.stats.attempts += 1
            self._temporary(queue, job, None, "; ".join(errors) or f"no MX host of {queue.domain} could be reached")
        return None

    async def _transact(self, queue: _DomainQueue, destination: Destination, session: AsyncSession, job: _Job) -> bool:
        """One message on the session; returns whether the session may be reused."""
        if job.envelope is None:
            try:
                job.envelope = Envelope(job.item)
            except DeliveryError as exc:
                job.attempts += 1
                self._finish(job, Status.FAILED, None, exc.message)
                return True
        job.attempts += 1
        self.stats.attempts += 1
        self.listener.on_sending(job.item, job.attempts)
        outcome, code, text = await session.transact(job.envelope)
        tls_note = " (TLS, certificate not verified)" if session.tls == "unverified" else ""
        if outcome == OK:
            job.envelope = None
            self.stats.sent_by_relay[session.host] = self.stats.sent_by_relay.get(session.host, 0) + 1
            self._finish(job, Status.SENT, code, text + tls_note)
        elif outcome == PERM:
            self._finish(job, Status.FAILED, code, text)
        elif outcome == UNKNOWN:
            self._finish(job, Status.SENDING, code, text)
        else:
            now = self.clock()
            rule = match_reply_rule(text, self.settings.rules)
            if rule is not None and not destination.apply(rule, now, reason=f"{code} {text}".strip()):
                rule = None  # its trigger is not reached yet
            if code == 421 or is_too_many_connections(code, text):
                destination.back_off(now, pause=self.settings.backoff_pause, reason=f"{code} {text}".strip())
            reputation = is_reputation_deferral(code, text)
            if reputation:
                destination.avoid_source = session.source  # the retry leaves from another address
            self._temporary(queue, job, code, text)
            if rule is not None or reputation:
                return False  # a fresh connection (from another source address) for the retry
        return not session.broken


async def _as_async(items: Iterable[Outgoing[Any]]) -> AsyncIterator[Outgoing[Any]]:
    for item in items:
        yield item


async def deliver_direct_async(
    items: Iterable[Outgoing[Any]] | AsyncIterable[Outgoing[Any]],
    *,
    settings: DirectSettings,
    listener: DeliveryListener,
    resolver: MXResolver,
    shaper: Shaper,
    stop: threading.Event | None = None,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    rng: Callable[[], float] = random.random,
) -> DeliveryStats:
    """Deliver ``items`` straight to their recipients' MX hosts (see the module docstring).

    ``items`` may be an asynchronous iterable: a feed that waits for its next message
    (the send's pipe, read in a thread) must not block the loop the sessions run on."""
    engine = _Engine(
        settings=settings,
        listener=listener,
        resolver=resolver,
        shaper=shaper,
        stop=stop or threading.Event(),
        clock=clock,
        sleep=sleep,
        rng=rng,
    )
    started = clock()
    try:
        await engine.feed(aiter(items) if isinstance(items, AsyncIterable) else _as_async(items))
    finally:
        if engine.fatal is not None:
            engine.stop.set()
        while engine.tasks:
            await asyncio.gather(*list(engine.tasks), return_exceptions=True)
    engine.stats.elapsed = clock() - started
    engine.stats.interrupted = engine.stop.is_set()
    engine.stats.peak_sessions = engine.peak_sessions
    if engine.fatal is not None:
        raise engine.fatal
    return engine.stats


def deliver_direct(items: Iterable[Outgoing[Any]], **options: Any) -> DeliveryStats:
    """:func:`deliver_direct_async` in a fresh event loop, from synchronous code."""
    return asyncio.run(deliver_direct_async(items, **options))
