"""What a simulated worker runs and counts: its units of work on the event clock, and
its counters.

A unit is an iteration (prefill chunks + one decode step), a segment (k decode steps of
an unchanged batch, whose step times grow linearly with the context, so that its end
and its progress at any time are known in closed form), or an operation (a KV swap or
a model load).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from qlmserve.operations.ops import Operation
from qlmserve.sim.request import SimRequest


@dataclass
class WorkerCounters:
    busy_s: float = 0.0  # time spent in iterations and segments
    op_s: float = 0.0  # time spent in swaps and loads
    tokens: int = 0
    prefill_tokens: int = 0
    iterations: int = 0  # iterations plus decode steps of segments
    loads_cold: int = 0
    loads_warm: int = 0
    load_s: float = 0.0
    swaps_out: int = 0
    swaps_in: int = 0
    evictions: int = 0
    recompute_preemptions: int = 0
    expert_preemptions: int = 0
    failed_ops: int = 0
    warm_starts: int = 0
    prefix_lookup_tokens: int = 0  # prompt tokens at each request's first admission
    prefix_hit_tokens: int = 0  # of them, found in the worker's prefix cache (prefill saved)


@dataclass(eq=False)
class Unit:
    kind: str  # "iter" | "segment" | "op"
    start: float
    end: float
    prefill: list[tuple[SimRequest, int]] = field(default_factory=list)  # (request, chunk tokens)
    decode: list[SimRequest] = field(default_factory=list)
    steps: int = 0  # segment: decode steps
    a: float = 0.0  # segment: duration of its first step
    c: float = 0.0  # segment: growth of the step duration per step
    op: Operation | None = None
    op_reqs: list[SimRequest] = field(default_factory=list)
    pause_s: float = 0.0  # prefill inserted by expert-level preemption
    layers: int = 32

    def elapsed_steps(self, t: float) -> int:
        """Decode steps of a segment completed by time t."""
        e = t - self.start
        if e <= 0:
            return 0
        a, c = self.a, self.c
        if c <= 0:
            n = int(e // a) if a > 0 else self.steps
        else:
            b = a - c / 2
            n = int((-b + math.sqrt(b * b + 2 * c * e)) / c)
        n = max(0, min(n, self.steps))
        while n < self.steps and self.step_end(n + 1) <= t + 1e-12:
            n += 1
        while n > 0 and self.step_end(n) > t + 1e-12:
            n -= 1
        return n

    def step_end(self, i: int) -> float:
        return self.start + i * self.a + self.c * i * (i - 1) / 2
