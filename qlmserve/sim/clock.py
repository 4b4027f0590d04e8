"""Time sources. Simulated code never reads the wall clock: it is handed a clock.

- `RealClock`: monotonic wall time and real sleeps, for a `SimEngine` inside a worker process.
- `EventClock`: a discrete-event clock. Time moves only when it is advanced; callbacks
  scheduled with `call_at` fire in (time, scheduling order) as time passes them. The
  simulator runs on it, and unit tests run a `SimEngine` on it without sleeping
  (`sleep(dt)` advances the clock, firing whatever was due on the way).
"""

from __future__ import annotations

import heapq
import itertools
import time
from collections.abc import Callable
from typing import Protocol


class Clock(Protocol):
    def now(self) -> float:
        """Seconds on this clock (its origin is arbitrary)."""

    def sleep(self, seconds: float) -> None:
        """Let `seconds` pass."""


class RealClock:
    """Wall time (monotonic) and real sleeps."""

    def now(self) -> float:
        return time.monotonic()

    def sleep(self, seconds: float) -> None:
        if seconds > 0:
            time.sleep(seconds)


class Timer:
    """Handle of a scheduled callback; `cancel()` stops it from firing."""

    __slots__ = ("when", "seq", "fn", "cancelled")

    def __init__(self, when: float, seq: int, fn: Callable[[], None]) -> None:
        self.when = when
        self.seq = seq
        self.fn = fn
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True

    def __lt__(self, other: Timer) -> bool:
        return (self.when, self.seq) < (other.when, other.seq)


class EventClock:
    """A discrete-event clock with a callback queue (deterministic: ties fire in the order
    they were scheduled)."""

    def __init__(self, start: float = 0.0) -> None:
        self._now = float(start)
        self._heap: list[Timer] = []
        self._seq = itertools.count()

    def now(self) -> float:
        return self._now

    def call_at(self, when: float, fn: Callable[[], None]) -> Timer:
        """Run `fn` when the clock reaches `when` (at once on the next advance if past)."""
        timer = Timer(max(when, self._now), next(self._seq), fn)
        heapq.heappush(self._heap, timer)
        return timer

    def call_later(self, delay: float, fn: Callable[[], None]) -> Timer:
        return self.call_at(self._now + max(0.0, delay), fn)

    def peek(self) -> float | None:
        """Time of the next pending callback, or None."""
        while self._heap and self._heap[0].cancelled:
            heapq.heappop(self._heap)
        return self._heap[0].when if self._heap else None

    def run_next(self) -> bool:
        """Advance to the next pending callback and run it; False when none is pending."""
        while self._heap:
            timer = heapq.heappop(self._heap)
            if timer.cancelled:
                continue
            self._now = max(self._now, timer.when)
            timer.fn()
            return True
        return False

    def advance_to(self, when: float) -> None:
        """Run every callback due up to `when`, then set the clock to `when`."""
        while True:
            nxt = self.peek()
            if nxt is None or nxt > when:
                break
            self.run_next()
        self._now = max(self._now, when)

    def sleep(self, seconds: float) -> None:
        self.advance_to(self._now + max(0.0, seconds))

    def pending(self) -> int:
        return sum(1 for t in self._heap if not t.cancelled)
