"""The delivery process: the SMTP pool (or, for a direct stream, the direct engine) and its
journal in a forked child."""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from ..bounces.rules import is_bounce
from ..core.config import parse_rate
from ..core.errors import ExitCode, MailerError, ProcessEndedError, StoreUnavailableError
from ..core.outcomes import DeliveryEvent, Outgoing, Result, Status
from ..delivery.pool import DeliveryStats, RateSource, deliver
from ..delivery.routes import Relay
from ..store import open_store
from .forking import FORK, Batch, become_child, start_child
from .journal import JournalWriter

if TYPE_CHECKING:
    from ..delivery.direct import DirectSettings

__all__ = ["Cooperation", "DeliveryProcess", "SendKey"]

#: The key of a send's :class:`Outgoing`: the recipient's address key and its line in the contact file.
SendKey = tuple[str, int]


@dataclass(frozen=True)
class Cooperation:
    """How the delivery process of one of several cooperating runs (PostgreSQL) differs:
    its own journal file, ``sending`` committed before each transaction for chunks the
    run still holds, and the campaign's rate shared with the other runs."""

    journal_path: Path
    chunk_lines: int


class _Counters:
    """Counts shared between the delivery process (writer) and this one (reader)."""

    # ``in_flight``: messages in a transaction now (``sending`` on record, no outcome yet);
    # ``retrying``: deferred ones waiting for another attempt. If the process dies, they
    # say how many outcomes are unknown and how many are deferred.
    NAMES = ("sent", "failed", "deferred", "unknown", "bounced_suppressed", "in_flight", "retrying")

    def __init__(self, context: Any) -> None:
        self.values = context.Array("q", len(self.NAMES), lock=False)
        # Only the child's threads write (+= is a read and a write); the parent reads.
        self._lock = threading.Lock()

    def add(self, name: str, amount: int = 1) -> None:
        with self._lock:
            self.values[self.NAMES.index(name)] += amount

    def set(self, name: str, value: int) -> None:
        self.values[self.NAMES.index(name)] = value

    def as_dict(self) -> dict[str, int]:
        return {name: self.values[index] for index, name in enumerate(self.NAMES)}


class DeliveryProcess:
    """The SMTP pool and its log writes in a child process.

    Rendering and delivery both need the CPU, and Python threads share one core (the
    GIL): in one process each slows the other down threefold. So this process renders
    and a forked child delivers; messages cross a pipe in batches (the pipe's buffer is
    the bounded queue between them). The child records ``sending`` and the outcome in
    the delivery journal, and applies it to the send log through its own SQLite
    connection (:mod:`mailer.journal`). It dies with its parent (``PR_SET_PDEATHSIG``),
    so a killed ``mailer send`` stops sending at once, exactly as a single process
    would; the log then says ``sending`` for the messages in flight.
    """

    BATCH = 64  # messages at most per batch
    BATCH_BYTES = 1024 * 1024  # and about this many bytes

    def __init__(
        self,
        config: Any,
        *,
        relays: list[Relay],
        ssl_context: Any,
        campaign: str,
        run_id: int,
        source_addresses: tuple[str, ...] = (),
        helo: str | None = None,
        debug: bool = False,
        cooperation: Cooperation | None = None,
        direct: DirectSettings | None = None,
    ) -> None:
        """``direct``: a direct stream's settings; the child then runs the direct engine
        (:mod:`mailer.send.direct_child`) instead of the pool over ``relays``."""
        self.shared = _Counters(FORK)
        self.fed = 0
        items_reader, self.items = FORK.Pipe(duplex=False)
        self.events, events_writer = FORK.Pipe(duplex=False)
        self.process = FORK.Process(
            target=_delivery_child,
            args=(
                items_reader,
                self.items,
                events_writer,
                self.shared,
                config,
                relays,
                ssl_context,
                campaign,
                run_id,
                source_addresses,
                helo,
                debug,
                cooperation,
                direct,
            ),
            name="mailer-delivery",
            daemon=True,
        )
        # Until the child has its own SIGUSR1 handler, a stop request must not kill it.
        start_child(self.process, ignore=(signal.SIGUSR1,))
        items_reader.close()
        events_writer.close()

    def counts(self) -> dict[str, int]:
        return self.shared.as_dict()

    def backlog(self) -> int:
        """Messages sent over to the delivery process whose first transaction has not started
        (0 once the process has ended: nothing will start them)."""
        if not self.process.is_alive():
            return 0
        counts = self.shared.as_dict()
        started = sum(counts[name] for name in ("sent", "failed", "deferred", "unknown", "in_flight", "retrying"))
        return max(0, self.fed - started)

    def stop(self) -> None:
        """Ask the child to stop handing out messages (in flight ones finish)."""
        if self.process.pid and self.process.is_alive():
            os.kill(self.process.pid, signal.SIGUSR1)

    def kill(self) -> None:
        if self.process.pid and self.process.is_alive():
            os.kill(self.process.pid, signal.SIGKILL)

    def feed(self, outgoing: Iterator[Outgoing[SendKey]], *, stopped: Callable[[], bool]) -> dict[str, int]:
        """Send every message to the child; returns how many were produced but never sent over.

        When ``outgoing`` raises (a signing process died, the send log is full), the
        child is told to stop and given the end marker, so that :meth:`wait` gets its
        report, then the error goes on to the caller; :attr:`unsent` has the count.
        """
        batch: Batch[tuple[Any, ...]] = Batch(count=self.BATCH, size=self.BATCH_BYTES)
        self.fed = 0
        try:
            for item in outgoing:
                wire = (item.key, item.sender, item.recipients, item.data, item.message_id, item.smtputf8)
                if batch.add(wire, len(item.data)) and not self._send(batch):
                    break
                if stopped():
                    break
            if len(batch) and not stopped():
                self._send(batch)
        except BaseException:
            self.stop()
            self._send_end()
            raise
        finally:
            self.unsent = len(batch)
        self._send_end()
        return {"unsent": len(batch)}

    def _send(self, batch: Batch[tuple[Any, ...]]) -> bool:
        """Send the batch over; False when the child has ended (wait() says why)."""
        count = len(batch)
        try:
            self.items.send(batch.items)
        except (BrokenPipeError, ConnectionResetError):
            return False  # the child ended early (a fatal relay error): wait() reports why
        batch.take()
        self.fed += count
        return True

    def _send_end(self) -> None:
        try:
            self.items.send(None)
        except (BrokenPipeError, ConnectionResetError):
            pass

    def wait(self) -> dict[str, Any]:
        """The child's final report; raises the child's fatal error in this process."""
        try:
            message = self.events.recv()
        except EOFError:
            self.process.join()
            code = self.process.exitcode
            how = f"killed by signal {-code}" if code is not None and code < 0 else f"exit code {code}"
            raise ProcessEndedError(
                f"the delivery process (pid {self.process.pid}) ended unexpectedly ({how}).",
                hint="The send log holds every outcome it recorded; see `mailer report`, then re-run to resume.",
            ) from None
        kind, payload = message
        if kind == "error":
            # The send log's server went away: the same type here, so the run says where outcomes are.
            error = (StoreUnavailableError if payload.get("lost_store") else MailerError)(payload["message"])
            error.exit_code = ExitCode(payload["exit_code"])
            error.debug_traceback = payload["traceback"]
            raise error
        report: dict[str, Any] = payload
        return report

    def close(self) -> None:
        try:
            self.items.close()
        except OSError:
            pass
        self.process.join(timeout=30)
        if self.process.is_alive():
            self.kill()
            self.process.join()


class _ChildRecorder:
    """The delivery listener in the child: the send log (through the journal) and the shared counts.

    ``on_sending`` returns once its ``sending`` line is in the delivery journal, so it
    is on record before the SMTP transaction starts; the outcome is appended the same
    way. The send log itself is brought up to date from the journal in batches
    (:class:`mailer.journal.JournalWriter`), which costs far less than a commit each.
    """

    thread_safe = True

    def __init__(self, journal: JournalWriter, shared: _Counters) -> None:
        self.journal = journal
        # Cooperating runs: the append of "sending" returns once the shared log has it.
        self.shared = shared
        self._lock = threading.Lock()
        self._in_flight: set[object] = set()
        self._retrying: set[object] = set()

    def on_sending(self, item: Outgoing[SendKey], attempt: int) -> None:
        recipient, line = item.key
        self.journal.append((recipient, Status.SENDING.value, None, None, item.message_id, line))
        with self._lock:
            self._in_flight.add(recipient)
            self._retrying.discard(recipient)
            self._count()

    def on_result(self, item: Outgoing[SendKey], result: Result) -> None:
        recipient, _ = item.key
        if result.status is Status.SENDING:
            # The final reply never came: the log keeps "sending" (outcome unknown), which
            # only --resend-unknown sends again.
            with self._lock:
                self._in_flight.discard(recipient)
                self._count()
            self.shared.add("unknown")
            return
        self.journal.append((recipient, str(result.status), result.smtp_code, result.smtp_reply, item.message_id, None))
        with self._lock:
            self._in_flight.discard(recipient)
            if result.final:
                self._retrying.discard(recipient)
            else:
                self._retrying.add(recipient)
            self._count()
        if result.final:
            if is_bounce(result.status, result.smtp_code, result.smtp_reply):
                # The journal's writer suppresses it with the same rule (mailer.journal).
                self.shared.add("bounced_suppressed")
            self.shared.add(result.status)

    def _count(self) -> None:
        self.shared.set("in_flight", len(self._in_flight))
        self.shared.set("retrying", len(self._retrying))


def _write_stderr(line: str) -> None:
    """One trace line in one write(), so that the lines of several connections never mix."""
    os.write(2, line.encode("utf-8", "replace"))


def _delivery_child(
    items: Any,
    items_writer: Any,
    events: Any,
    shared: _Counters,
    config: Any,
    relays: list[Relay],
    ssl_context: Any,
    campaign: str,
    run_id: int,
    source_addresses: tuple[str, ...] = (),
    helo: str | None = None,
    debug: bool = False,
    cooperation: Cooperation | None = None,
    direct: DirectSettings | None = None,
) -> None:
    """Body of the delivery process (runs after fork; reports through ``events``)."""
    # The fork copied the parent's end of the items pipe: without closing it here, a
    # parent that stops feeding on an error (and closes its end) would never be seen
    # to, and this process would wait for more messages.
    items_writer.close()
    # The parent decides what Ctrl-C means, and tells this process with SIGUSR1.
    become_child()
    stop = threading.Event()
    signal.signal(signal.SIGUSR1, lambda signum, frame: stop.set())
    untouched = 0
    ended = threading.Event()  # the parent's end marker (or end of file) was read
    left_in_batch = [0]  # items of the batch being unpacked that deliver() has not taken

    def received() -> Iterator[Outgoing[SendKey]]:
        while True:
            try:
                batch = items.recv()
            except EOFError:
                stop.set()
                ended.set()
                return
            if batch is None:
                ended.set()
                return
            left_in_batch[0] = len(batch)
            for key, sender, recipients, data, message_id, smtputf8 in batch:
                left_in_batch[0] -= 1
                yield Outgoing(
                    key=key, sender=sender, recipients=recipients, data=data, message_id=message_id, smtputf8=smtputf8
                )

    try:
        with ExitStack() as stores:
            log = stores.enter_context(open_store(config.log))
            limiter: RateSource | None = None
            if cooperation is None:
                journal = JournalWriter(log, campaign, run_id)
            else:
                from ..store.pg_work import SharedRate, record_held_events
                from ..store.postgres import PostgresStore

                held = cooperation
                pg = cast(PostgresStore, log)

                def apply(batch: list[DeliveryEvent], offset: int) -> set[str]:
                    return record_held_events(
                        pg, campaign, batch, run_id=run_id, chunk_lines=held.chunk_lines, journal=(run_id, offset)
                    )

                journal = JournalWriter(
                    log,
                    campaign,
                    run_id,
                    path=cooperation.journal_path,
                    apply=apply,
                    durable_sending=True,
                )
                rate = parse_rate(config.send.rate)
                if rate:
                    # A connection of its own: a slot is never queued behind a journal commit.
                    limiter = SharedRate(
                        cast(PostgresStore, stores.enter_context(open_store(config.log))), campaign, rate
                    )
            stats: DeliveryStats
            feed = None
            try:
                if direct is not None:
                    from .direct_child import PipeFeed, deliver_from_pipe

                    feed = PipeFeed(items, stop=stop)
                    stats = deliver_from_pipe(
                        feed,
                        config=config,
                        settings=direct,
                        listener=_ChildRecorder(journal, shared),
                        stop=stop,
                        limiter=limiter,
                    )
                else:
                    stats = deliver(
                        received(),
                        relays=relays,
                        send=config.send,
                        source_addresses=source_addresses,
                        helo=helo,
                        listener=_ChildRecorder(journal, shared),
                        stop=stop,
                        ssl_context=ssl_context,
                        trace=_write_stderr if debug else None,
                        limiter=limiter,
                    )
            finally:
                journal.close()
        untouched = stats.untouched + (feed.left_in_batch if feed is not None else left_in_batch[0])
        if feed is not None:
            untouched += feed.drain()
            ended.set()
        # Stopped early: take what the parent still sends, so that it never blocks on a full pipe.
        while not ended.is_set():
            try:
                batch = items.recv()
            except EOFError:
                break
            if batch is None:
                ended.set()
                break
            untouched += len(batch)
        report = {
            "untouched": untouched,
            "waiting_retry": stats.waiting_retry,
            "unreachable": stats.unreachable,
            "sent_by_relay": stats.sent_by_relay,
            "relay_troubles": stats.relay_troubles,
        }
        events.send(("done", report))
    except BaseException as exc:  # every failure goes to the parent, which reports it
        import traceback

        code = getattr(exc, "exit_code", ExitCode.TEMPFAIL)
        payload = {"message": str(exc), "exit_code": int(code), "traceback": traceback.format_exc()}
        payload["lost_store"] = isinstance(exc, StoreUnavailableError)
        events.send(("error", payload))
