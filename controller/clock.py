"""Time comes from an injected clock; controller code never calls time.time() itself."""

from __future__ import annotations

import time
from typing import Protocol


class Clock(Protocol):
    def now(self) -> float: ...


class WallClock:
    """Seconds since the epoch: arrival times must mean the same thing to a restarted controller."""

    def now(self) -> float:
        return time.time()
