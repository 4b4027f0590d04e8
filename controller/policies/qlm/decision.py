"""A candidate plan (Decision) and its exact score; Stopwatch, where a solve's time went."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from qlmserve.controller.estimator import GroupForecast
from qlmserve.controller.policies.op_rules import ModelChange
from qlmserve.controller.solve_budget import SolveClock


@dataclass
class Decision:
    """A candidate plan: virtual queues plus the worker-level choices they rely on."""

    queues: dict[str, list[str]]
    protected: dict[str, str] = field(default_factory=dict)  # worker_id -> PreemptionMode.EXPERT / PreemptionMode.ITERATION / EVICT / SWAP
    changes: dict[str, ModelChange] = field(default_factory=dict)  # worker_id -> model swap now
    cost: float = 0.0  # objective units spent on operations (lost work)


@dataclass
class Score:
    primary: float  # the method's objective
    expected: float  # weighted expected requests meeting their SLO (ties, reporting)
    forecasts: dict[str, GroupForecast]

    def better_than(self, other: Score, eps: float = 1e-9) -> bool:
        if self.primary > other.primary + eps:
            return True
        return self.primary > other.primary - eps and self.expected > other.expected + eps


class Stopwatch:
    """Milliseconds per phase of one solve, and what happened in it (QlmPolicy.last_phases;
    `qlm bench-solver --phases`)."""

    def __init__(self, clock: SolveClock) -> None:
        self.clock = clock
        self.ms: dict[str, float] = {}  # phase -> milliseconds on the policy's clock
        self.wall_ms: dict[str, float] = {}  # phase -> wall milliseconds (the same live)
        self.units: dict[str, dict[str, float]] = {}  # phase -> units of work counted (solve_budget)
        self.events: list[str] = []
        self._t = clock.now()
        self._wall = time.perf_counter()
        self._counts = dict(clock.meter.counts)

    def lap(self, phase: str) -> None:
        """The time since the previous lap goes to `phase`."""
        t, wall = self.clock.now(), time.perf_counter()
        self.ms[phase] = self.ms.get(phase, 0.0) + (t - self._t) * 1e3
        self.wall_ms[phase] = self.wall_ms.get(phase, 0.0) + (wall - self._wall) * 1e3
        counts = self.clock.meter.counts
        units = self.units.setdefault(phase, {})
        for k, v in counts.items():
            d = v - self._counts.get(k, 0.0)
            if d:
                units[k] = units.get(k, 0.0) + d
        self._t, self._wall, self._counts = t, wall, dict(counts)
