"""The plumbing shared by the two kinds of forked child: the delivery process and the signers.

Both are forked (``fork``: they inherit the loaded key, the config and the open pipe
ends without pickling), both die with their parent, both leave Ctrl-C and SIGTERM to
the parent (the terminal sends them to the whole process group, and only the parent
knows what the run has done), and both receive messages in batches cut by count and
by bytes, so that neither a million small messages nor a few large ones make a pipe
round trip per message or an unbounded buffer.
"""

from __future__ import annotations

import ctypes
import multiprocessing
import signal
import threading
from multiprocessing.context import ForkContext, ForkProcess
from typing import Generic, TypeVar

__all__ = ["FORK", "Batch", "become_child", "start_child"]

_PR_SET_PDEATHSIG = 1  # linux/prctl.h

#: The start method of every child: the children need what the parent has loaded.
FORK: ForkContext = multiprocessing.get_context("fork")

T = TypeVar("T")


def become_child() -> None:
    """The first step of every forked child: die with the parent, ignore SIGINT and SIGTERM.

    A child of a killed ``mailer send`` must stop at once, exactly as a single process
    would (``PR_SET_PDEATHSIG``); outside Linux the end of file on its pipe still stops it.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        pass


def start_child(process: ForkProcess, *, ignore: tuple[signal.Signals, ...] = ()) -> None:
    """Start ``process`` with ``ignore`` set to "ignore" for the instant of the fork.

    A child installs its own handlers only once it runs; a signal it is sent before
    that (a stop request by SIGUSR1, say) must not kill it by the default action.
    """
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = {signum: signal.signal(signum, signal.SIG_IGN) for signum in ignore} if in_main_thread else {}
    try:
        process.start()
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


class Batch(Generic[T]):
    """Items gathered for one pipe write, full at ``count`` items or ``size`` bytes."""

    __slots__ = ("_count", "_size", "bytes", "items")

    def __init__(self, *, count: int, size: int) -> None:
        self.items: list[T] = []
        self.bytes = 0
        self._count = count
        self._size = size

    def add(self, item: T, size: int) -> bool:
        """Add ``item`` of ``size`` bytes; True when the batch is now full."""
        self.items.append(item)
        self.bytes += size
        return len(self.items) >= self._count or self.bytes >= self._size

    def take(self) -> list[T]:
        """The items gathered so far; the batch starts empty again."""
        items, self.items, self.bytes = self.items, [], 0
        return items

    def __len__(self) -> int:
        return len(self.items)
