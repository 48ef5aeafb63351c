"""Rate limiting and retry backoff for delivery.

Pure arithmetic over a clock that is passed in: nothing here touches the network, and
tests drive both classes with a fake clock and a fake sleep.
"""

from __future__ import annotations

import math
import random
import threading
import time
from collections.abc import Callable

__all__ = ["MAX_BACKOFF", "RateLimiter", "backoff_delay"]


#: The longest wait before a retry, in seconds (before jitter is added).
MAX_BACKOFF = 300.0


class RateLimiter:
    """A smooth, thread-safe limit of ``rate_per_second`` transaction starts.

    The schedule is a virtual clock (the GCRA, "generic cell rate algorithm"): slots
    are spaced exactly ``1 / rate`` apart, and :meth:`acquire` blocks until the
    caller's slot. After idle time the schedule restarts at "now", so at most one
    caller goes through at once: there is no saved-up burst.

    Sleeping overshoots by a little (tens of microseconds, more under load); if every
    late wake-up pushed the schedule back, a high rate would lose that overshoot on
    every message. So a caller may go up to ``tolerance`` seconds *before* its slot.
    Over any window of ``L`` seconds at most ``(L + tolerance) * rate + 1`` slots are
    granted; the default tolerance is half of what keeps that below ``rate + 1`` for a
    one-second window (``0.5 * (1 - frac(rate)) / rate``), which is the guarantee the
    product makes: never more than one message over the rate in any one second.

    ``rate_per_second == 0`` means unlimited: :meth:`acquire` never waits.
    """

    def __init__(
        self,
        rate_per_second: float,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], object] = time.sleep,
        tolerance: float | None = None,
    ) -> None:
        if not math.isfinite(rate_per_second) or rate_per_second < 0:
            raise ValueError(f"rate must be a finite number >= 0, not {rate_per_second!r}")
        self.rate = float(rate_per_second)
        self.interval = 1.0 / self.rate if self.rate else 0.0
        if not self.rate:
            tolerance = 0.0
        elif tolerance is None:
            headroom = 1.0 - (self.rate - math.floor(self.rate))  # in (0, 1]
            tolerance = 0.5 * headroom * self.interval
        elif not 0 <= tolerance < self.interval:
            raise ValueError("tolerance must be >= 0 and shorter than one interval")
        self.tolerance = tolerance
        self._clock = clock
        self._sleep = sleep
        self._lock = threading.Lock()
        self._next = -math.inf  # the theoretical time of the next slot

    def acquire(self, cancel: threading.Event | None = None) -> float | None:
        """Block until the caller may start one transaction; return the clock reading then.

        With ``cancel``: return None, without taking a slot, as soon as the event is set
        (checked around every sleep). The sleep function should then return early when
        the event is set (``sleep=event.wait`` does).
        """
        if not self.interval:
            return self._clock()
        while True:
            with self._lock:
                now = self._clock()
                earliest = self._next - self.tolerance
                if now >= earliest:
                    # Granting from the schedule (not from "now") when a caller is a
                    # little late keeps the average rate; max() restarts it after idle.
                    self._next = max(self._next, now) + self.interval
                    return now
                wait = earliest - now
            # Another thread may take this slot while we sleep; then we loop and wait
            # for the next one. Waiting outside the lock keeps the others moving.
            if cancel is not None and cancel.is_set():
                return None
            self._sleep(wait)
            if cancel is not None and cancel.is_set():
                return None

    def acquire_with(self, other: RateLimiter, cancel: threading.Event | None = None) -> float | None:
        """:meth:`acquire` a slot of this limiter and one of ``other`` at the same instant.

        A relay's own rate and the run's rate both hold: taking one slot and then
        waiting for the other would let transactions bunch up behind the second wait
        and exceed the first. ``other`` must share this limiter's clock; its lock is
        always taken second (the run's limiter is ``other`` for every relay).
        """
        while True:
            with self._lock, other._lock:
                now = self._clock()
                wait = max(self._wait(now), other._wait(now))
                if wait <= 0:
                    self._take(now)
                    other._take(now)
                    return now
            if cancel is not None and cancel.is_set():
                return None
            self._sleep(wait)
            if cancel is not None and cancel.is_set():
                return None

    def try_acquire(self) -> float:
        """Take a slot if one is free now (0.0), else say how many seconds until one may be.

        For callers that wait without blocking a thread (the direct engine's event loop):
        ``while (wait := limiter.try_acquire()) > 0: await asyncio.sleep(wait)``.
        """
        with self._lock:
            now = self._clock()
            wait = self._wait(now)
            if wait <= 0:
                self._take(now)
                return 0.0
            return wait

    def _wait(self, now: float) -> float:
        """How long before a slot is free at ``now`` (0: free now); lock held."""
        if not self.interval:
            return 0.0
        return max(0.0, self._next - self.tolerance - now)

    def _take(self, now: float) -> None:
        if self.interval:
            self._next = max(self._next, now) + self.interval


def backoff_delay(
    attempt: int,
    *,
    base: float,
    rng: Callable[[], float] = random.random,
    max_delay: float = MAX_BACKOFF,
) -> float:
    """Seconds to wait before retry number ``attempt`` (1 for the first retry).

    Exponential: ``d = base * 2 ** (attempt - 1)``, capped at ``max_delay``, plus up to
    50 % positive jitter: the delay is uniform in ``[d, 1.5 d)`` (``rng()`` in [0, 1)).
    The jitter only ever adds, so ``[send] retry_backoff`` keeps its documented meaning
    ("seconds before the first retry") as a minimum, while messages that failed together
    (a relay's 421 burst) spread out instead of coming back at the same instant.
    """
    if attempt < 1:
        raise ValueError(f"attempt counts from 1, not {attempt!r}")
    if base < 0:
        raise ValueError(f"base must be >= 0, not {base!r}")
    # The exponent is clamped so that a huge attempt number cannot overflow a float.
    delay = min(base * 2.0 ** min(attempt - 1, 64), max_delay)
    return delay * (1.0 + 0.5 * rng())
