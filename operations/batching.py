"""How an engine batches: the preemption modes and the rules every engine shares (the
HF engine, the simulated engine inside a worker, the simulator's event-driven worker),
and that the controller's dispatch and planner count on."""

from __future__ import annotations

import enum


class PreemptionMode(str, enum.Enum):
    NONE = "none"  # iteration-level FCFS: a new request joins at the next iteration
    ITERATION = "iteration"  # latency-sensitive requests go first at each iteration boundary
    EXPERT = "expert"  # QLLM: pause a best-effort batch between layers / attention and experts


# Under ITERATION and EXPERT a latency-sensitive request may join beyond max_batch_size, up
# to this factor times it (KV must still fit): making it wait for a best-effort request to
# finish, or taking one off the device for it, would put back the head-of-line blocking
# these modes exist to remove. Every engine, the simulator and the controller share it.
LS_BATCH_FACTOR = 2


def batch_limit(mode: PreemptionMode | str, latency_sensitive: bool, max_batch_size: int) -> int:
    """How many running sequences a request may join under `mode`."""
    if latency_sensitive and PreemptionMode(mode) is not PreemptionMode.NONE:
        return max_batch_size * LS_BATCH_FACTOR
    return max_batch_size
