"""What a simulation run measured, and the figures a benchmark reports from it.

Conventions (stated in every report):
  - SLO attainment: share of requests whose first token came within their class's TTFT
    target (and TPOT target when the class sets one). A request never served counts as
    a miss.
  - Throughput: output tokens produced / run length (from 0 to the end of the run, the
    drain after the last arrival included). Goodput: output tokens of requests that met
    their SLO / the same run length.
  - TTFT percentiles include requests that never got a first token, at the time they had
    waited when the run ended (a lower bound of their TTFT).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from qlmserve.sim.request import SimRequest
    from qlmserve.sim.worker import WorkerCounters


@dataclass
class SimResult:
    policy: str
    requests: list[SimRequest]
    end_time: float
    last_arrival: float
    solve_times: list[float]  # wall seconds of each planner call
    plan_sources: dict[str, int]  # Plan.source -> ticks
    ops_applied: dict[str, int]  # op kind -> operations carried out (plan and dispatch)
    ops_rejected: dict[str, int]  # op kind -> planned but not allowed by the policy file
    ops_failed: dict[str, int]  # op kind -> could not be carried out (unknown request, no memory)
    requeued: dict[str, int]  # reason -> requests sent back to the queue
    ticks: int
    wall_s: float
    workers: int
    worker_counters: dict[str, WorkerCounters] = field(default_factory=dict)
    in_flight_tokens: int = 0  # tokens of decode stretches still running when the run ended
    tokens_at: dict[float, int] = field(default_factory=dict)  # probe time -> output tokens produced by then
    kept_ticks: int = 0  # ticks where the policy kept its last plan instead of solving
    planner_wall_s: float = 0.0  # wall seconds spent in the policy
    solve_model_s: list[float] = field(default_factory=list)  # each solve's charged time (solve clock)
    solve_clock: str = "modelled"  # what was charged: "modelled" work (deterministic) or "wall" time


# Figures of `summarize` that measure the machine, not the run: everything else is the
# same for a seed on any machine, under any load (the planner's budget is modelled work,
# controller/solve_budget.py), unless the run charged wall time (`charge_solve_time`).
TIMING_KEYS = frozenset({"solve_ms_p50", "solve_ms_p99", "planner_wall_s", "sim_wall_s"})


def _pct(values: list[float], q: float) -> float | None:
    return float(np.percentile(values, q)) if values else None


def summarize(result: SimResult) -> dict:
    """The figures of one run, as plain data (JSON-ready)."""
    reqs = result.requests
    end = result.end_time
    horizon = max(end, 1e-9)
    classes = sorted({r.slo_class for r in reqs})
    per_class = {}
    for cls in classes:
        rs = [r for r in reqs if r.slo_class == cls]
        met = [r for r in rs if r.met_slo()]
        ttfts = [(r.first_token_at if r.first_token_at is not None else end) - r.arrival for r in rs]
        per_class[cls] = {
            "requests": len(rs),
            "met": len(met),
            "attainment": len(met) / len(rs) if rs else None,
            "ttft_p50_s": _pct(ttfts, 50),
            "ttft_p99_s": _pct(ttfts, 99),
            "unserved": sum(1 for r in rs if r.first_token_at is None),
            "failed_fast": sum(1 for r in rs if r.failed),
            "output_tokens_per_s": sum(r.generated for r in rs) / horizon,
        }
    met_all = [r for r in reqs if r.met_slo()]
    missed_ttft = [(r.first_token_at if r.first_token_at is not None else end) - r.arrival
                   for r in reqs if not r.met_slo()]
    tokens = sum(r.generated for r in reqs) + result.in_flight_tokens
    counters = list(result.worker_counters.values())

    def csum(attr: str) -> float:
        return sum(getattr(c, attr) for c in counters)

    ops = dict(result.ops_applied)
    mechanism = {
        "loads_cold": int(csum("loads_cold")),
        "loads_warm": int(csum("loads_warm")),
        "swaps_out": int(csum("swaps_out")),
        "swaps_in": int(csum("swaps_in")),
        "evictions": int(csum("evictions")),
        "recompute_preemptions": int(csum("recompute_preemptions")),
        "expert_preemptions": int(csum("expert_preemptions")),
        "warm_starts": int(csum("warm_starts")),
    }
    busy = csum("busy_s") + csum("op_s")
    return {
        "policy": result.policy,
        "requests": len(reqs),
        "finished": sum(1 for r in reqs if r.finished_at is not None),
        "run_s": end,
        "last_arrival_s": result.last_arrival,
        "attainment": len(met_all) / len(reqs) if reqs else None,
        "classes": per_class,
        "goodput_tok_s": sum(r.output_tokens for r in met_all if r.finished_at is not None) / horizon,
        "throughput_tok_s": tokens / horizon,
        "ttft_p99_missed_s": _pct(missed_ttft, 99),
        "ops": ops,
        "ops_rejected": dict(result.ops_rejected),
        "ops_failed": dict(result.ops_failed),
        "mechanism": mechanism,
        "requeued": dict(result.requeued),
        "solve_clock": result.solve_clock,
        "charged_solve_ms_p50": (_pct(result.solve_model_s, 50) or 0.0) * 1000,
        "charged_solve_ms_p99": (_pct(result.solve_model_s, 99) or 0.0) * 1000,
        "solve_ms_p50": (_pct(result.solve_times, 50) or 0.0) * 1000,
        "solve_ms_p99": (_pct(result.solve_times, 99) or 0.0) * 1000,
        "plan_sources": dict(result.plan_sources),
        "ticks": result.ticks,
        "kept_ticks": result.kept_ticks,
        "planner_wall_s": result.planner_wall_s,
        "utilization": busy / (horizon * max(1, result.workers)),
        "sim_wall_s": result.wall_s,
    }


def ops_used(summary: dict) -> int:
    """Operations that changed what a worker holds: planner/dispatch ops carried out
    (moves of groups excluded) plus engine-level preemptions."""
    n = sum(v for k, v in summary["ops"].items() if k != "move_group")
    m = summary["mechanism"]
    return n + m["recompute_preemptions"] + m["expert_preemptions"]
