"""Tests for mailer.throttle: the rate limiter and the retry backoff, on a fake clock."""

from __future__ import annotations

import math
import threading
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mailer.delivery.throttle import MAX_BACKOFF, RateLimiter, backoff_delay


class FakeClock:
    """A clock that moves only when slept on (plus a chosen oversleep) or told to."""

    def __init__(self, start: float = 1000.0) -> None:
        self.now = start
        self.sleeps: list[float] = []
        self.oversleep = 0.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        assert seconds > 0, "the limiter must never ask for a zero or negative sleep"
        self.sleeps.append(seconds)
        self.now += seconds + self.oversleep

    def advance(self, seconds: float) -> None:
        self.now += seconds


def max_in_any_window(times: list[float], width: float = 1.0) -> int:
    """The most events in any closed window [t, t + width] (windows start at an event)."""
    times = sorted(times)
    best = 0
    end = 0
    for start_index, start in enumerate(times):
        while end < len(times) and times[end] <= start + width:
            end += 1
        best = max(best, end - start_index)
    return best


def test_unlimited_never_sleeps():
    clock = FakeClock()
    limiter = RateLimiter(0, clock=clock, sleep=clock.sleep)
    grants = [limiter.acquire() for _ in range(1000)]
    assert clock.sleeps == []
    assert grants == [clock.now] * 1000


def test_slots_are_spaced_one_interval_apart():
    clock = FakeClock()
    limiter = RateLimiter(10, clock=clock, sleep=clock.sleep, tolerance=0)
    grants = [limiter.acquire() for _ in range(5)]
    assert grants[0] == 1000.0  # the first goes at once
    assert [round(b - a, 9) for a, b in zip(grants, grants[1:])] == [0.1] * 4


def test_no_burst_after_idle_time():
    clock = FakeClock()
    limiter = RateLimiter(10, clock=clock, sleep=clock.sleep)
    limiter.acquire()
    clock.advance(60)  # a long pause must not have saved up a minute of slots
    resumed_at = clock.now
    first = limiter.acquire()
    second = limiter.acquire()
    assert first == resumed_at  # one goes at once...
    assert second - first >= limiter.interval - limiter.tolerance - 1e-9  # ...and only one


def test_late_wakeups_within_tolerance_do_not_slow_the_rate():
    clock = FakeClock()
    limiter = RateLimiter(1000, clock=clock, sleep=clock.sleep)
    clock.oversleep = limiter.tolerance * 0.9  # every sleep overshoots
    grants = [limiter.acquire() for _ in range(1001)]
    # 1000 intervals in 1.0 s: the schedule held, give or take one tolerance.
    assert grants[-1] - grants[0] == pytest.approx(1.0, abs=limiter.tolerance)


def test_cancel_returns_none_without_taking_a_slot():
    clock = FakeClock()
    cancel = threading.Event()

    def sleep(seconds):
        cancel.set()  # stop arrives while waiting

    limiter = RateLimiter(1, clock=clock, sleep=sleep)
    assert limiter.acquire(cancel) == 1000.0
    assert limiter.acquire(cancel) is None
    cancel.clear()
    clock.advance(1)
    assert limiter.acquire(cancel) == 1001.0


def test_interruptible_wait_with_a_real_event():
    stop = threading.Event()
    limiter = RateLimiter(1 / 60, sleep=stop.wait)  # one a minute
    limiter.acquire(stop)
    threading.Timer(0.05, stop.set).start()
    started = time.monotonic()
    assert limiter.acquire(stop) is None
    assert time.monotonic() - started < 1.0


@pytest.mark.parametrize("bad", [-1, math.inf, math.nan])
def test_rejects_bad_rates(bad):
    with pytest.raises(ValueError):
        RateLimiter(bad)


@settings(max_examples=200, deadline=None)
@given(
    rate=st.one_of(st.integers(1, 200).map(float), st.floats(0.05, 200)),
    gaps=st.lists(st.floats(0, 0.5), min_size=1, max_size=300),
    oversleep=st.floats(0, 0.02),
)
def test_never_more_than_rate_plus_one_in_any_second(rate, gaps, oversleep):
    clock = FakeClock()
    clock.oversleep = oversleep
    limiter = RateLimiter(rate, clock=clock, sleep=clock.sleep)
    grants = []
    for gap in gaps:
        clock.advance(gap)
        grants.append(limiter.acquire())
    assert max_in_any_window(grants) <= rate + 1
    # Smooth: two grants are never closer than one interval less the tolerance.
    spacing = [b - a for a, b in zip(grants, grants[1:])]
    assert all(s >= limiter.interval - limiter.tolerance - 1e-9 for s in spacing)


def test_thread_safe_under_contention():
    limiter = RateLimiter(400)
    grants: list[float] = []
    lock = threading.Lock()

    def work():
        for _ in range(40):
            granted = limiter.acquire()
            with lock:
                grants.append(granted)

    threads = [threading.Thread(target=work) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    grants.sort()
    assert len(grants) == 320
    gaps = [b - a for a, b in zip(grants, grants[1:])]
    assert min(gaps) >= limiter.interval - limiter.tolerance - 1e-9
    assert max_in_any_window(grants, 0.25) <= 400 * 0.25 + 1


def test_backoff_doubles_from_the_base_with_positive_jitter():
    assert [backoff_delay(a, base=2.0, rng=lambda: 0.0) for a in (1, 2, 3, 4)] == [2.0, 4.0, 8.0, 16.0]
    assert backoff_delay(1, base=2.0, rng=lambda: 0.999999) == pytest.approx(3.0, rel=1e-5)


def test_backoff_is_capped_and_survives_huge_attempts():
    assert backoff_delay(30, base=2.0, rng=lambda: 0.0) == MAX_BACKOFF
    assert backoff_delay(10_000, base=2.0, rng=lambda: 0.5) == MAX_BACKOFF * 1.25
    assert backoff_delay(3, base=1.0, rng=lambda: 0.0, max_delay=3.0) == 3.0


def test_backoff_zero_base_means_retry_at_once():
    assert backoff_delay(5, base=0.0) == 0.0


@pytest.mark.parametrize("attempt,base", [(0, 1.0), (-1, 1.0), (1, -0.5)])
def test_backoff_rejects_nonsense(attempt, base):
    with pytest.raises(ValueError):
        backoff_delay(attempt, base=base)


@given(attempt=st.integers(1, 100), base=st.floats(0, 60), r=st.floats(0, 1, exclude_max=True))
def test_backoff_stays_within_its_band(attempt, base, r):
    d = min(base * 2.0 ** min(attempt - 1, 64), MAX_BACKOFF)
    delay = backoff_delay(attempt, base=base, rng=lambda: r)
    assert d <= delay <= 1.5 * d
