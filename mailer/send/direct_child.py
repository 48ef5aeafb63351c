"""Direct delivery in the delivery process: the asyncio engine fed from the parent's pipe.

A ``direct = true`` stream is sent by the same delivery process as a relay stream (the
same journal, counters, stop request and report, :mod:`mailer.send.child`); only the
engine differs: :func:`mailer.delivery.direct.deliver_direct_async` in an event loop
instead of the threaded pool.

The pipe is read with blocking reads. Inside the event loop one such read would hold
every SMTP session still until the parent's next batch, so a thread reads the pipe and
hands each batch to the loop through a small bounded queue (:class:`PipeFeed`): when the
engine holds ``queue_size`` messages it stops taking, the queue fills, the reader thread
waits, the pipe fills, and the parent (the renderer) waits too, so memory stays bounded
end to end.

A stop request (SIGUSR1 from the parent, on Ctrl-C) must reach the loop even when it
sleeps in ``epoll`` with nothing else to do and the signal landed on another thread:
:func:`deliver_from_pipe` points the signal wake-up fd (:func:`signal.set_wakeup_fd`) at
a socket the loop watches, as asyncio's own signal handling does, while keeping the
process's Python handler (which only sets the stop event), so no signal can arrive
between two handlers and kill the process by the default action.
"""

from __future__ import annotations

import asyncio
import queue
import signal
import socket
import threading
from collections.abc import AsyncIterator, Callable
from typing import Any

from ..core.config import Config, parse_rate
from ..core.outcomes import Outgoing
from ..delivery.direct import DirectSettings, deliver_direct_async
from ..delivery.mx import MXResolver, make_async_resolver
from ..delivery.pool import DeliveryListener, DeliveryStats
from ..delivery.routes import Route
from ..delivery.shaping import DomainLimit, Shaper, reply_rules
from ..delivery.throttle import RateLimiter

__all__ = ["PipeFeed", "deliver_from_pipe", "direct_settings", "make_shaper"]

# Batches waiting between the reader thread and the loop (each at most 64 messages and
# about 1 MB: mailer.send.child.DeliveryProcess.BATCH).
_QUEUED_BATCHES = 4
_END = object()  # the parent's end marker
_EOF = object()  # the parent's end of the pipe closed without one (it stopped feeding)


def direct_settings(config: Config, route: Route) -> DirectSettings:
    """The engine's settings for a direct stream: ``[direct]``, the stream's source
    addresses and HELO, and the retries of ``[send]``: ``retries`` attempts after the
    first, the first after ``retry_backoff`` seconds, doubling; a destination that
    answers 421 or "too many connections" pauses for ``retry_backoff`` too (with one
    connection fewer). Longer waits are the reply rules' (a suspension past
    ``max_wait`` defers that destination's messages to a later run at once).

    Checks ``[dns]`` now (a :class:`~mailer.core.errors.ConfigError`, exit 2, before
    anything is sent), so that the delivery process does not find it broken."""
    from ..smtp.session import _local_hostname

    make_async_resolver(config.dns)

    return DirectSettings(
        port=config.direct.port,
        helo=route.helo or _local_hostname(),
        tls=config.direct.tls,
        source_addresses=route.source_addresses,
        attempts=config.send.retries + 1,
        retry_delay=config.send.retry_backoff,
        backoff_pause=config.send.retry_backoff,
        rules=reply_rules(config.direct),
    )


def make_shaper(config: Config) -> Shaper:
    """Per-destination limits: ``connections_per_domain``, ``rate_per_domain`` and the
    ``[direct.domains."X"]`` entries over the built-in provider defaults."""
    direct = config.direct
    return Shaper(
        connections_per_domain=direct.connections_per_domain,
        rate_per_domain=direct.rate_per_domain_per_second,
        domains=[
            DomainLimit(entry.name, connections=entry.connections, rate=entry.rate_per_second)
            for entry in direct.domains
        ],
    )


class PipeFeed:
    """The parent's batches, read from the pipe in a thread, as an async iterator of messages.

    ``ended``: the end marker (or the end of the pipe) was read; ``left_in_batch``: the
    messages of the batch being handed out that the engine has not taken yet.
    """

    def __init__(self, items: Any, *, stop: threading.Event) -> None:
        self._items = items
        self._stop = stop
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=_QUEUED_BATCHES)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._ready: asyncio.Event | None = None
        self.ended = False
        self.left_in_batch = 0
        self.on_stop: Callable[[], None] | None = None  # on the loop, when the pipe closed early
        self._thread = threading.Thread(target=self._read, name="mailer-direct-feed", daemon=True)

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._ready = asyncio.Event()
        self._thread.start()

    def wake(self) -> None:
        """On the loop: look at the queue and the stop request again."""
        if self._ready is not None:
            self._ready.set()

    def _read(self) -> None:
        while True:
            try:
                batch = self._items.recv()
            except (EOFError, OSError):
                self._hand_over(_EOF)
                return
            self._hand_over(_END if batch is None else batch)
            if batch is None:
                return

    def _hand_over(self, item: Any) -> None:
        self._queue.put(item)  # waits while the loop has enough to do: the bound
        loop = self._loop
        if loop is not None:
            try:
                loop.call_soon_threadsafe(self.wake)
            except RuntimeError:
                pass  # the loop has ended: drain() takes what is left

    def _take(self, item: Any) -> list[Any] | None:
        if item is _END or item is _EOF:
            self.ended = True
            if item is _EOF:
                self._stop.set()  # nobody will send the rest (mailer.send.child: the same rule)
                if self.on_stop is not None:
                    self.on_stop()
            return None
        batch: list[Any] = item
        return batch

    async def _next_batch(self) -> list[Any] | None:
        assert self._ready is not None
        while not self._stop.is_set():
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                self._ready.clear()
                if self._queue.empty() and not self._stop.is_set():
                    await self._ready.wait()
                continue
            return self._take(item)
        return None

    async def messages(self) -> AsyncIterator[Outgoing[Any]]:
        """Every message the parent sends, until its end marker or a stop request."""
        while not self.ended:
            batch = await self._next_batch()
            if batch is None:
                return
            self.left_in_batch = len(batch)
            for key, sender, recipients, data, message_id, smtputf8 in batch:
                self.left_in_batch -= 1
                yield Outgoing(
                    key=key, sender=sender, recipients=recipients, data=data, message_id=message_id, smtputf8=smtputf8
                )

    def drain(self) -> int:
        """After the engine stopped early: take (and count) what the parent still sends, so
        that it never blocks on a full pipe."""
        count = 0
        while not self.ended:
            batch = self._take(self._queue.get())
            if batch is not None:
                count += len(batch)
        return count


class _Sleeper:
    """``asyncio.sleep`` that returns early once the run is stopped (a retry's wait of a
    minute must not hold up Ctrl-C); the engine checks the stop before it goes on."""

    def __init__(self, stop: threading.Event) -> None:
        self._stop = stop
        self._waiting: set[asyncio.Future[None]] = set()

    async def __call__(self, delay: float) -> None:
        if self._stop.is_set():
            return
        loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()
        timer = loop.call_later(max(delay, 0.0), _resolve, future)
        self._waiting.add(future)
        try:
            await future
        finally:
            timer.cancel()
            self._waiting.discard(future)

    def wake_all(self) -> None:
        for future in list(self._waiting):
            _resolve(future)


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


def _campaign_pace(config: Config, limiter: Any, stop: threading.Event, sleep: _Sleeper) -> Any:
    """The awaitable the engine takes before each transaction for the campaign's rate
    (``--rate`` / ``[send] rate``), or None when it is unlimited.

    ``limiter``: a rate shared by cooperating runs (its ``acquire`` blocks on the
    database, so it runs in a thread of the loop's pool); else a :class:`RateLimiter`."""
    if limiter is not None:

        async def shared() -> None:
            await asyncio.get_running_loop().run_in_executor(None, limiter.acquire, stop)

        return shared
    rate = parse_rate(config.send.rate)
    if not rate:
        return None
    own = RateLimiter(rate)

    async def pace() -> None:
        while (wait := own.try_acquire()) > 0 and not stop.is_set():
            await sleep(wait)

    return pace


def deliver_from_pipe(
    feed: PipeFeed,
    *,
    config: Config,
    settings: DirectSettings,
    listener: DeliveryListener,
    stop: threading.Event,
    limiter: Any = None,
) -> DeliveryStats:
    """Run the direct engine in a new event loop over what ``feed`` reads from the pipe.

    Returns when the feed has ended (or the run was stopped) and every message taken has
    its outcome; ``stop`` is the event the process's SIGUSR1 handler sets."""
    sleeper = _Sleeper(stop)
    pace = _campaign_pace(config, limiter, stop, sleeper)
    if pace is not None:
        from dataclasses import replace

        settings = replace(settings, pace=pace)
    wake_reader, wake_writer = socket.socketpair()
    wake_reader.setblocking(False)
    wake_writer.setblocking(False)
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous_fd = signal.set_wakeup_fd(wake_writer.fileno()) if in_main_thread else -1

    async def run() -> DeliveryStats:
        loop = asyncio.get_running_loop()

        def woken() -> None:
            try:
                while wake_reader.recv(64):
                    pass
            except (BlockingIOError, InterruptedError):
                pass
            if stop.is_set():
                feed.wake()
                sleeper.wake_all()

        loop.add_reader(wake_reader.fileno(), woken)
        feed.on_stop = sleeper.wake_all
        feed.start(loop)
        try:
            return await deliver_direct_async(
                feed.messages(),
                settings=settings,
                listener=listener,
                resolver=MXResolver(make_async_resolver(config.dns)),
                shaper=make_shaper(config),
                stop=stop,
                sleep=sleeper,
            )
        finally:
            loop.remove_reader(wake_reader.fileno())

    try:
        return asyncio.run(run())
    finally:
        if in_main_thread:
            signal.set_wakeup_fd(previous_fd)
        wake_reader.close()
        wake_writer.close()
