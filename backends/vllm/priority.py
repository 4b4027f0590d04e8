"""QLM's precedence in vLLM's terms.

vLLM's priority scheduler (`scheduling_policy="priority"`) runs the LOWEST value first
and, when KV runs out, preempts the running request with the highest value (ties by
arrival). QLM runs latency-sensitive requests first, then higher `priority`
(backends.engine.precedence), and only under ITERATION; under NONE every request gets
the same value, which is FCFS.
"""

from __future__ import annotations

from qlmserve.backends.engine import EngineRequest, PreemptionMode, precedence

# Best-effort requests sit this far above latency-sensitive ones, whatever their priority:
# class priorities are small integers, clamped into half of it.
BEST_EFFORT_OFFSET = 1 << 20
_PRIORITY_BOUND = BEST_EFFORT_OFFSET // 2 - 1


def vllm_priority(mode: PreemptionMode, request: EngineRequest) -> int:
    """The `priority` argument of vLLM's generate() for `request` under `mode`."""
    if PreemptionMode(mode) is PreemptionMode.NONE:
        return 0
    best_effort, neg_priority = precedence(request)
    return (BEST_EFFORT_OFFSET if best_effort else 0) + max(-_PRIORITY_BOUND, min(_PRIORITY_BOUND, neg_priority))
