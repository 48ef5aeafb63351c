"""DKIM signing in worker processes, so that a signed send uses every core.

An RSA-2048 DKIM signature costs several times what rendering a message does, and a
Python process signs on one core at a time (the canonicalization holds the
interpreter lock). :class:`SigningPool` forks worker processes that inherit the
loaded key, hands them batches of messages round-robin, and gives the signed
messages back in the order they came, with a bounded number of batches in flight.
"""

from __future__ import annotations

import ctypes
import multiprocessing
import signal
from collections import deque
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

from .delivery import Outgoing
from .errors import DKIMError

_PR_SET_PDEATHSIG = 1  # linux/prctl.h
BATCH = 16
IN_FLIGHT_PER_WORKER = 2


def _worker(signer: Any, conn: Any) -> None:
    """Sign each batch received; ``None`` ends. Runs in a forked process."""
    # Ctrl-C reaches the whole process group: the parent decides what happens.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):  # not Linux: the pipe's end-of-file still stops us
        pass
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


class SigningPool:
    """``workers`` signing processes. Create it before any thread of the caller starts."""

    def __init__(self, signer: Any, workers: int) -> None:
        context = multiprocessing.get_context("fork")
        self._connections = []
        self._processes = []
        for _ in range(workers):
            mine, theirs = context.Pipe()
            process = context.Process(target=_worker, args=(signer, theirs), name="mailer-dkim", daemon=True)
            process.start()
            theirs.close()
            self._connections.append(mine)
            self._processes.append(process)
        self.dropped = 0  # messages taken in but never given back (the consumer stopped)

    def signed(self, items: Iterator[Outgoing]) -> Iterator[Outgoing]:
        """``items`` with their data DKIM-signed, in the same order."""
        in_flight: deque[tuple[Any, list[Outgoing]]] = deque()
        ready: deque[Outgoing] = deque()
        limit = len(self._connections) * IN_FLIGHT_PER_WORKER
        turn = 0
        batch: list[Outgoing] = []
        try:
            exhausted = False
            while not exhausted or batch or in_flight:
                if not exhausted:
                    item = next(items, None)
                    if item is None:
                        exhausted = True
                    else:
                        batch.append(item)
                if batch and (len(batch) >= BATCH or exhausted):
                    if len(in_flight) >= limit:
                        ready.extend(self._collect(in_flight))
                    connection = self._connections[turn % len(self._connections)]
                    turn += 1
                    connection.send([message.data for message in batch])
                    in_flight.append((connection, batch))
                    batch = []
                elif exhausted and in_flight:
                    ready.extend(self._collect(in_flight))
                while ready:
                    yield ready.popleft()
        finally:
            # Stopped early (Ctrl-C): what was taken in and not given back.
            self.dropped += len(batch) + len(ready) + sum(len(taken) for _, taken in in_flight)

    def _collect(self, in_flight: deque) -> list[Outgoing]:
        """The oldest batch in flight, signed."""
        connection, items = in_flight[0]
        try:
            kind, payload = connection.recv()
        except EOFError:
            raise DKIMError("a DKIM signing process ended unexpectedly; nothing it held was sent.") from None
        if kind == "error":
            raise DKIMError(payload)
        in_flight.popleft()
        return [replace(item, data=data) for item, data in zip(items, payload)]

    def close(self) -> None:
        """Stop the workers (idempotent)."""
        for connection in self._connections:
            try:
                connection.send(None)
            except OSError:
                pass
            connection.close()
        for process in self._processes:
            process.join(timeout=5)
            if process.is_alive():
                process.kill()
                process.join()
        self._connections = []
        self._processes = []
