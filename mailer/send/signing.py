"""DKIM signing in worker processes, so that a signed send uses every core.

An RSA-2048 DKIM signature (about 0.3 ms, mostly OpenSSL) costs more than rendering
a message does, so a signing process beside the rendering one lets a signed send use
a second core; the forked process also keeps signing off the interpreter lock of the
process that renders. :class:`SigningPool` forks worker processes that inherit the
loaded key, hands them batches of messages round-robin, and gives the signed
messages back in the order they came, with a bounded number of batches in flight.
:class:`Signing` is how a run signs (a real send and a dry run alike): in that pool
when there is more than one core, else in the calling process.
"""

from __future__ import annotations

import os
import queue
import threading
from collections import deque
from collections.abc import Generator, Iterator
from dataclasses import replace
from multiprocessing.context import ForkProcess
from typing import TYPE_CHECKING, Literal, Protocol

from ..core.errors import DKIMError, ProcessEndedError
from ..core.outcomes import KeyT, Outgoing
from .forking import FORK, Batch, become_child

__all__ = ["BATCH", "BATCH_BYTES", "IN_FLIGHT_PER_WORKER", "Signing", "SigningPool", "signing_workers"]

BATCH = 16  # messages at most in one batch
BATCH_BYTES = 256 * 1024  # and about this many bytes (messages with attachments are large)
IN_FLIGHT_PER_WORKER = 2


class MessageSigner(Protocol):
    """What signs one message (:class:`mailer.dkim.DKIMSigner` is one)."""

    def sign(self, message: bytes) -> bytes: ...


if TYPE_CHECKING:
    from multiprocessing.connection import Connection

    # A worker's answer for one batch, or its receiver's note that the worker is gone.
    _Reply = tuple[Literal["ok"], list[bytes]] | tuple[Literal["error"], str] | tuple[Literal["ended"], None]
    # The parent's end of a worker's pipe (batches of message data; None ends) and the worker's.
    _ToWorker = Connection[list[bytes] | None, _Reply]
    _FromParent = Connection[_Reply, list[bytes] | None]


def _worker(signer: MessageSigner, conn: _FromParent) -> None:
    """Sign each batch received; ``None`` ends. Runs in a forked process."""
    become_child()
    while True:
        try:
            batch = conn.recv()
        except EOFError:
            return
        if batch is None:
            return
        try:
            conn.send(("ok", [signer.sign(data) for data in batch]))
        except DKIMError as exc:
            conn.send(("error", exc.message))


def _receive(connection: _ToWorker, results: queue.SimpleQueue[_Reply]) -> None:
    """Move one worker's results into ``results`` as they arrive, until it ends."""
    while True:
        try:
            results.put(connection.recv())
        except (EOFError, OSError):
            results.put(("ended", None))
            return


class SigningPool:
    """``workers`` signing processes. Create it before any thread of the caller starts.

    One thread per worker receives its results as they come: a worker is never left
    blocked sending back a large result while the caller is blocked sending it the
    next batch, whatever the size of the messages.
    """

    def __init__(self, signer: MessageSigner, workers: int) -> None:
        self._connections: list[_ToWorker] = []
        self._processes: list[ForkProcess] = []
        for _ in range(workers):
            mine, theirs = FORK.Pipe()
            process = FORK.Process(target=_worker, args=(signer, theirs), name="mailer-dkim", daemon=True)
            process.start()
            theirs.close()
            self._connections.append(mine)
            self._processes.append(process)
        # Threads only now: the workers are forked from a process with a single thread.
        self._results: list[queue.SimpleQueue[_Reply]] = [queue.SimpleQueue() for _ in range(workers)]
        self._receivers = [
            threading.Thread(target=_receive, args=(connection, results), name="mailer-dkim-results", daemon=True)
            for connection, results in zip(self._connections, self._results)
        ]
        for receiver in self._receivers:
            receiver.start()
        self.dropped = 0  # messages taken in but never given back (the consumer stopped)

    def signed(self, items: Iterator[Outgoing[KeyT]]) -> Generator[Outgoing[KeyT], None, None]:
        """``items`` with their data DKIM-signed, in the same order."""
        in_flight: deque[tuple[int, list[Outgoing[KeyT]]]] = deque()
        ready: deque[Outgoing[KeyT]] = deque()
        limit = len(self._connections) * IN_FLIGHT_PER_WORKER
        turn = 0
        batch: Batch[Outgoing[KeyT]] = Batch(count=BATCH, size=BATCH_BYTES)
        try:
            exhausted = False
            while not exhausted or len(batch) or in_flight:
                full = False
                if not exhausted:
                    item = next(items, None)
                    if item is None:
                        exhausted = True
                    else:
                        full = batch.add(item, len(item.data))
                if len(batch) and (full or exhausted):
                    if len(in_flight) >= limit:
                        ready.extend(self._collect(in_flight))
                    worker = turn % len(self._connections)
                    turn += 1
                    taken = batch.take()
                    in_flight.append((worker, taken))
                    self._hand_over(worker, [message.data for message in taken])
                elif exhausted and in_flight:
                    ready.extend(self._collect(in_flight))
                while ready:
                    yield ready.popleft()
        finally:
            # Stopped early (Ctrl-C): what was taken in and not given back.
            self.dropped += len(batch) + len(ready) + sum(len(taken) for _, taken in in_flight)

    def _hand_over(self, worker: int, batch: list[bytes]) -> None:
        try:
            self._connections[worker].send(batch)
        except OSError:
            # A worker that died (kill -9, the OOM killer) before its last results were
            # read: the pipe is broken. Never let that pass for the delivery process's
            # pipe breaking, which the caller reads as "it ended on its own".
            raise self._ended(worker) from None

    def _ended(self, worker: int) -> ProcessEndedError:
        process = self._processes[worker]
        process.join(timeout=1)
        code = process.exitcode
        how = f"killed by signal {-code}" if code is not None and code < 0 else f"exit code {code}"
        return ProcessEndedError(f"a DKIM signing process (pid {process.pid}) ended unexpectedly ({how}).")

    def _collect(self, in_flight: deque[tuple[int, list[Outgoing[KeyT]]]]) -> list[Outgoing[KeyT]]:
        """The oldest batch in flight, signed."""
        worker, items = in_flight[0]
        reply = self._results[worker].get()
        if reply[0] == "ended":
            raise self._ended(worker)
        if reply[0] == "error":
            raise DKIMError(reply[1])
        in_flight.popleft()
        return [replace(item, data=data) for item, data in zip(items, reply[1])]

    def close(self) -> None:
        """Stop the workers (idempotent)."""
        for connection in self._connections:
            try:
                connection.send(None)
            except OSError:
                pass
        for process in self._processes:
            process.join(timeout=5)
            if process.is_alive():
                process.kill()
                process.join()
        for receiver in self._receivers:
            receiver.join(timeout=5)  # each saw its worker's end of the pipe
        for connection in self._connections:
            connection.close()
        self._connections = []
        self._processes = []
        self._receivers = []


def signing_workers() -> int:
    """How many DKIM signing processes: one per core (up to four), none on one core.

    Measured on 2 cores on a quiet machine (``bench.py send --contacts 20000 --dkim
    --signing-workers N``, 2026-12-02): RSA-2048 3,398 and 3,264 msg/s with two
    processes, 2,720 and 2,975 with one; Ed25519 5,337 with two. Under a heavy load
    from other processes one did better than two (817-1,060 against 767-913), since
    the two then compete with rendering and delivery; a send is usually the only
    busy thing on its machine, so the quiet figures set the default. Two cost ~45 MB
    more RSS than one (shared pages mostly: PSS 84 against 80 MB).

    ``MAILER_DKIM_WORKERS`` (0 to 16) overrides it, for measuring.
    """
    override = os.environ.get("MAILER_DKIM_WORKERS", "")
    if override.isdigit() and int(override) <= 16:
        return int(override)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return min(cores, 4) if cores > 1 else 0


class Signing:
    """How one run DKIM-signs its messages: the real send and the dry run both use it.

    With more than one core (``workers`` None: :func:`signing_workers`) the messages
    are signed in a :class:`SigningPool`, else one by one in this process. Create it
    before any thread of the caller starts (the pool forks); close it when done.
    """

    def __init__(self, signer: MessageSigner, *, workers: int | None = None) -> None:
        self.signer = signer
        count = signing_workers() if workers is None else workers
        self._pool = SigningPool(signer, count) if count else None

    @property
    def workers(self) -> int:
        """How many signing processes (0: signed in this process)."""
        return len(self._pool._processes) if self._pool is not None else 0

    @property
    def dropped(self) -> int:
        """Messages taken in but never given back (the consumer stopped early)."""
        return self._pool.dropped if self._pool is not None else 0

    def signed(self, items: Iterator[Outgoing[KeyT]]) -> Generator[Outgoing[KeyT], None, None]:
        """``items`` with their data DKIM-signed, in the same order."""
        if self._pool is not None:
            return self._pool.signed(items)
        sign = self.signer.sign
        return (replace(item, data=sign(item.data)) for item in items)

    def close(self) -> None:
        """Stop the signing processes, if any (idempotent)."""
        if self._pool is not None:
            self._pool.close()

    def __enter__(self) -> Signing:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
