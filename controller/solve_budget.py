"""How long a solve may take: wall-clock seconds live, modelled seconds in simulation.

Live, the planner has `planner.solve_budget_ms` of wall time per tick and every phase
reads the wall clock (`WallSolveClock`): a busy machine makes smaller programs, which is
what a controller under load should do. In the simulator the same rule makes plans depend
on the machine and on whatever else it runs, so one seed gives different results (a
4-point swing in SLO attainment was measured on the 2-core development machine). There
the planner runs on a `WorkSolveClock` instead: its work is counted (`WorkMeter`: group
forecasts, queue-walk steps, program size, HiGHS checkpoints and iterations) and turned
into seconds by the per-unit costs in `UNIT_S`, measured on the reference machine. Every
deadline check then reads modelled time, HiGHS stops after a number of its own
checkpoints instead of a time limit, and the simulated clock charges the modelled solve
time: the same seed gives the same plans on any machine, under any load.

The costs were fitted on the 2-core development machine (load average 1-2 from other
jobs) by non-negative least squares of the wall time of each planner phase, and of each
planner call of a short simulation, on its unit counts, minimising relative error
(`qlm bench-solver --calibrate`, which prints the fit and the modelled / wall ratio per
phase: 0.8-1.0 for the planner's phases, about 0.8 for the simulator's ticks); rerun it
after changing the planner's hot paths and update the numbers here. Release tables are
charged per build (cache miss), and the simulator clears their cache at the start of a
run, so that a run's modelled time does not depend on what ran before it.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections import defaultdict

# Modelled seconds per unit of planner work (see the module docstring for how they were
# measured). A unit is charged where the work happens, so that a phase's modelled time
# follows the size of what it touched.
UNIT_S: dict[str, float] = {
    "tick": 500e-6,  # a planner call's fixed cost (next_plan: the replan check, the plan)
    "fc_group": 17e-6,  # Forecaster set-up, per waiting group
    "table_slot": 190e-6,  # a release table's Monte Carlo build (a cache miss), per slot
    "eval_call": 500e-6,  # Forecaster.evaluate over many groups at once (numpy), per call
    "cursor_start": 30e-6,  # Forecaster.cursor: a walk from a queue's head
    "cursor": 25e-6,  # one QueueCursor push or timing (the Python path)
    "tail_start": 32e-6,  # QueueTails.start: one group's start on every worker (numpy)
    "score_group": 11e-6,  # one group in an exact score (attainment, chance constraint)
    "group": 3.5e-6,  # per-group work of a solve around its estimator (operations, plan fields)
    "worker": 20e-6,  # per-worker work of a solve around its estimator
    "pair": 40e-6,  # program build, per (group, candidate worker) pair
    "highs_setup": 1.4e-3,  # HiGHS: model hand-over, presolve, first LP, per solve
    "highs_checkpoint": 2.0e-3,  # HiGHS: one MIP interrupt check (about every 1-10 ms of its work)
}


class WorkMeter:
    """Counts units of planner work and what they cost in modelled seconds."""

    __slots__ = ("seconds", "counts")

    def __init__(self) -> None:
        self.seconds = 0.0
        self.counts: defaultdict[str, float] = defaultdict(float)

    def charge(self, kind: str, n: float = 1.0) -> None:
        self.counts[kind] += n
        self.seconds += n * UNIT_S[kind]


class SolveClock(ABC):
    """What the planner reads to stay within its budget. Each clock owns a WorkMeter (a
    wall clock's counts are what `qlm bench-solver --calibrate` fits the costs on)."""

    deterministic: bool

    def __init__(self) -> None:
        self.meter = WorkMeter()

    @abstractmethod
    def now(self) -> float:
        """Seconds on this clock (only differences mean anything)."""


class WallSolveClock(SolveClock):
    """Live: the wall clock (the planner's phases then depend on the machine's speed)."""

    deterministic = False

    def now(self) -> float:
        return time.perf_counter()


class WorkSolveClock(SolveClock):
    """Simulation: modelled seconds of the work counted so far (the same on any machine)."""

    deterministic = True

    def now(self) -> float:
        return self.meter.seconds


def highs_checkpoints(limit_s: float) -> int:
    """HiGHS checkpoints (MIP interrupt callbacks) a modelled allowance of `limit_s` buys
    after its set-up; at least one, where HiGHS hands back the MIP start or better."""
    return max(1, int((limit_s - UNIT_S["highs_setup"]) / UNIT_S["highs_checkpoint"]))
