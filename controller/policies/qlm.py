"""QLM: SLO-aware queue management by a stochastic program over request groups."""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from functools import cached_property

import numpy as np

from qlmserve.controller.estimator import Forecaster, GroupForecast, QueueCursor, meets_all
from qlmserve.controller.policies.base import SchedulingPolicy
from qlmserve.controller.policies.heuristics import QueueTails, eligible_mask, list_schedule
from qlmserve.controller.policies.op_rules import (EXPERT, PREEMPTION_MODES, ModelChange, derive_operations,
                                                   ls_requests_needing_slots, protection_cost_s,
                                                   protection_mechanism, removal_mechanism, victim_cost_s)
from qlmserve.controller.policies.qlm_program import (Option, Pair, Program, ProgramGroup, ProgramModel,
                                                      ProgramSolution, ProgramWorker, build_model, solve_program)
from qlmserve.controller.policies.registry import register
from qlmserve.controller.snapshot import ClusterSnapshot, GroupState, WorkerState, leading_latency_sensitive
from qlmserve.operations.plan import Plan

# Program size per millisecond of budget (pairs of group x candidate worker). At 256 groups
# a 50 ms budget then takes about 12 groups at risk per tick (plus the kept groups they
# could push late); the rest wait for the next tick (_unsettled). 2 pairs/ms gave larger
# programs that HiGHS stopped on at its time limit, and no better plans in `qlm
# bench-solver`. SAA programs are scaled down by scenarios / 4.
PAIRS_PER_MS = 1.0
MIN_PAIRS = 24
# Below this many (group, worker) pairs every group enters the program and every worker is
# a candidate (the program is then exact up to its order restriction; see the NOTE).
FULL_PROGRAM_PAIRS = 48
# With drop_hopeless off, a group the program cannot make meet its SLO still keeps its
# deadline place unless that costs another group its SLO (Program.place_reward).
PLACE_REWARD = 0.01
# What HiGHS and the local search (repair) may take on a partial program: by the size of
# the work, at least ALLOWANCE_FLOOR of the budget. HiGHS seldom proves optimality on
# programs of more than ~30 groups within a tick (it stops at its time limit with an
# incumbent, which the MIP start keeps at least as good as the base plan), and repair's
# cost is per program group still missing (about 15 exact evaluations of one queue each).
# Shares of the budget alone gave a tick at 256 groups far more than it needs (the p50
# target) and one at 2,000 groups less (its plans fell below EDF's in `qlm bench-solver`).
# A small instance, all of it in the program (ctx.full), gets what is left of the budget:
# it is solved exactly, whatever the machine's speed (deterministic plans, the exhaustive
# tests).
MILP_S_PER_PAIR = 0.08e-3
REPAIR_S_PER_MISS = 0.3e-3
ALLOWANCE_FLOOR = 0.05
# The EDF base is built every tick while it costs at most this share of the budget (~7 ms
# at 256 groups); else as QlmPolicy._edf_worth_it says.
EDF_BASE_SHARE = 0.25
# Repair tries every position in queues up to this long, else a few (_repair_positions).
REPAIR_ALL_POSITIONS = 4


@dataclass
class Decision:
    """A candidate plan: virtual queues plus the worker-level choices they rely on."""

    queues: dict[str, list[str]]
    protected: dict[str, str] = field(default_factory=dict)  # worker_id -> EXPERT / ITERATION / EVICT / SWAP
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

    def __init__(self) -> None:
        self.ms: dict[str, float] = {}
        self.events: list[str] = []
        self._t = time.perf_counter()

    def lap(self, phase: str) -> None:
        """The time since the previous lap goes to `phase`."""
        t = time.perf_counter()
        self.ms[phase] = self.ms.get(phase, 0.0) + (t - self._t) * 1e3
        self._t = t


@register
class QlmPolicy(SchedulingPolicy):
    """QLM's global scheduler: a chance-constrained or sample-average stochastic program
    over request groups, solved each tick within `planner.solve_budget_ms`."""

    name = "qlm"

    def __init__(self, config) -> None:
        super().__init__(config)
        self.last_plan: Plan | None = None
        self.last_decision: Decision | None = None  # the last plan's protection and swaps (for tools)
        self.last_phases: Stopwatch | None = None  # where the last solve's time went (for tools)
        self._edf_s_per_group = 4e-5  # measured cost of the EDF base per group (moving average)
        self._finish_s = 0.0  # measured time from the chosen decision to the returned plan
        self._edf_losses = 0  # consecutive ticks the EDF base lost to the last plan
        self._edf_builds = 0
        self._solves = 0
        self._last_solve_at: float | None = None
        # Groups at risk that the last program could not make meet their SLO -> when: the
        # next ticks leave them where they are (see _unsettled) until max_plan_age_s passed.
        self._settled: dict[str, tuple[float, int]] = {}  # group -> (when, its size then)
        # Candidate workers per group at risk (the group's own worker is always one).
        self.candidates = 3
        # Re-solve at least this often even when nothing is predicted to miss.
        self.max_plan_age_s = max(1.0, 10 * config.tick_interval_ms / 1000.0)

    # ---- the controller's two calls -------------------------------------------------------

    def needs_replan(self, snapshot: ClusterSnapshot, last_plan: Plan | None) -> bool:
        """Whether this tick must solve, or the last plan may stand: yes when a group has no
        place yet, a queue's worker stopped taking work, the plan is older than
        `max_plan_age_s`, an idle worker could take queued work (load balancing), or the
        estimator now predicts that a group the last plan expected to meet its SLO misses."""
        if last_plan is None or not last_plan.virtual_queues:
            return bool(snapshot.groups)
        if self._last_solve_at is None or snapshot.now - self._last_solve_at >= self.max_plan_age_s:
            return True
        queued = {gid for q in last_plan.virtual_queues.values() for gid in q}
        if any(g.group_id not in queued for g in snapshot.groups):
            return True
        workers = {w.worker_id: w for w in snapshot.workers}
        for wid, q in last_plan.virtual_queues.items():
            w = workers.get(wid)
            if q and (w is None or not w.accepts_work):
                return True
        if self.config.planner.ls_fast_path and self._ls_waits_for_slots(snapshot, last_plan, workers):
            return True
        if self.operation_enabled("load_balance"):
            live = {g.group_id for g in snapshot.groups}
            has_work = {wid for wid, q in last_plan.virtual_queues.items() if live.intersection(q)}
            if has_work and any(w.accepts_work and w.free_slots > 0 and w.worker_id not in has_work
                                for w in snapshot.workers):
                return True  # an idle worker could take queued work
        fc = Forecaster(snapshot, self.config.max_running_per_worker)
        protected = [w.worker_id for w in snapshot.workers if w.preemption_mode in PREEMPTION_MODES]
        forecast = fc.evaluate(last_plan.virtual_queues, protected)
        beta = self.config.planner.beta
        for gid, f in forecast.items():
            if last_plan.predicted_attainment.get(gid, 0.0) >= 0.5 and not f.meets(beta):
                return True
        return False

    @staticmethod
    def _ls_waits_for_slots(snapshot: ClusterSnapshot, last_plan: Plan, workers: Mapping[str, WorkerState]) -> bool:
        """Whether latency-sensitive requests wait at the head of a queue whose worker has no
        free slot for them (e.g. they joined a group the kept plan had already placed): the
        fast path must free slots now, not when a best-effort request happens to finish."""
        groups = {g.group_id: g for g in snapshot.groups}
        for wid, q in last_plan.virtual_queues.items():
            w = workers.get(wid)
            head = groups.get(q[0]) if q else None
            if w is not None and head is not None and head.latency_sensitive and w.ls_free_slots < head.size:
                return True
        return False

    def solve(self, snapshot: ClusterSnapshot) -> Plan:
        # NOTE(qlm): the algorithm, once.
        #
        # What is optimised. Requests are planned as groups (same model and SLO class,
        # arrived close together). A group "meets its SLO" on a worker when the
        # beta-quantile of its last request's TTFT, from the RWT estimator (running work,
        # work queued ahead, prefill stalls, model drains and loads, all with their
        # variance), is within its oldest request's deadline. Method "chance" maximises
        # the weight x size of the groups that meet it (the deterministic equivalent of a
        # chance constraint at beta); method "saa" maximises the same averaged over
        # `scenarios` draws of every group's output lengths. Both subtract the lost work
        # of the operations they use (evicted or swapped-out requests' recompute / copy
        # seconds, valued at what the worker would serve in that time).
        #
        # How it stays small. (1) Base plan: the last plan's queues (from the snapshot,
        # else the policy's own last plan) with new groups inserted by deadline on the
        # worker that frees first; on a cold start, and whenever it is cheap against the
        # budget or won last time (or the last plan misses a fifth of the value), EDF list
        # scheduling from scratch too; the better one is the base. (2) Groups that meet their SLO in the
        # base keep their place; groups that cannot meet it even at the head of their
        # best workers (with protection or a cleared batch) are hopeless: served last
        # when drop_hopeless, else left where they are. (3) The program takes the groups
        # at risk (the rest, most valuable first, as many as the budget allows; not those
        # it already tried and could not rescue within max_plan_age_s), each with its K
        # best candidate workers, plus the kept groups whose slack they could consume;
        # all other groups are constants. On each worker the program's groups
        # run in deadline order among themselves (for a fixed set of on-time jobs on one
        # machine deadline order is optimal: Moore-Hodgson's exchange argument) and go
        # among the kept ones at their deadline position, so the order is not a variable
        # and the MILP (qlm_program.py) is an assignment: y[g,w] (g meets on w),
        # u[w,option] (a worker with no kept queue keeps its model, or drains / clears
        # its batch and loads another), p[w] (protect latency-sensitive groups from
        # best-effort running work: expert preemption on MoE workers, else eviction or KV
        # swap of the fewest, cheapest requests). Work a group adds ahead of others is
        # linear in y (absorbed by free slots first: a max with zero); its variance enters
        # through a tangent of the square root (an upper bound, so the chance constraint
        # stays conservative). Small instances (<= FULL_PROGRAM_PAIRS pairs) put every
        # group and worker in the program. (4) HiGHS solves it in-process, from a MIP
        # start as good as the base plan, for a time that grows with the program
        # (MILP_S_PER_PAIR); unless the exact estimator agrees with an optimal solution
        # on every program group, a local search with the exact estimator then moves
        # program groups while it helps (REPAIR_S_PER_MISS per group still missing).
        # (5) Every candidate plan is scored exactly by the estimator; the best stands.
        # When the budget runs out before the program is solved, or it has no integer
        # solution, the base plan stands (Plan.source "last-plan", or "fallback-edf" when
        # the base came from EDF) and Plan.note says why. (6) The operations follow from
        # the chosen plan (op_rules.py), only those the policy enables.
        #
        # What it does not optimise: the order among kept groups, more than one model
        # swap per worker within a plan, where hopeless groups go (kept, or served last),
        # groups at risk beyond the budget's program size (they keep their base place),
        # and the cost of pausing best-effort work (bounded by max_pause_s, not priced).
        t0 = time.perf_counter()
        planner = self.config.planner
        # Keep back what turning the chosen decision into a plan took last time.
        deadline = t0 + planner.solve_budget_ms / 1000.0 - min(self._finish_s, planner.solve_budget_ms / 4000.0)
        sw = self.last_phases = Stopwatch()
        tick = _Tick(self, snapshot)
        sw.lap("estimator")
        best, cold = tick.base_decision(self.last_plan)
        best_score = tick.score(best)
        sw.lap("base")
        if not cold and best_score.primary < tick.max_value - 1e-9 and self._edf_worth_it(
                len(snapshot.groups), best_score.primary / tick.max_value, t0, deadline):
            # EDF list scheduling from scratch may start better than the last plan.
            t_edf = time.perf_counter()
            edf = tick.edf_decision()
            edf_score = tick.score(edf)
            per_group = (time.perf_counter() - t_edf) / max(1, len(snapshot.groups))
            self._edf_s_per_group = 0.7 * self._edf_s_per_group + 0.3 * per_group
            self._edf_losses += 1
            self._edf_builds += 1
            if edf_score.better_than(best_score):
                best, best_score, cold = edf, edf_score, True
                self._edf_losses = 0
            sw.events.append("edf base won" if cold else "edf base lost")
            sw.lap("edf base")
        source, note = self._improve(tick, best, best_score, cold, deadline, sw)
        t_finish = time.perf_counter()
        best, best_score = tick.best, tick.best_score
        if planner.ls_fast_path:
            best = tick.ls_fast_path(best)
        self.last_decision = best
        ops = derive_operations(snapshot, self.config, tick.fc, best.queues, best.protected, best.changes)
        plan = Plan(virtual_queues=best.queues, operations=ops, source=source,
                    predicted_attainment={gid: f.attainment() for gid, f in best_score.forecasts.items()},
                    objective=best_score.primary, note=note, solve_time_s=time.perf_counter() - t0)
        self._finish_s = 0.7 * self._finish_s + 0.3 * (time.perf_counter() - t_finish)
        sw.lap("operations")
        self.last_plan = plan
        self._last_solve_at = snapshot.now
        return plan

    def _edf_worth_it(self, groups: int, share_met: float, t0: float, deadline: float) -> bool:
        """Whether to also build the EDF plan as a base: when it is cheap against the budget
        (its measured cost per group), or when it won the last time or the last plan
        misses a fifth of the value, and half the budget is still left after it; after
        three losses in a row, one tick in five. (EDF from scratch often beats the last
        plan, `qlm bench-solver --phases`: the queues a plan leaves drift as requests
        start, and EDF rebalances them.)"""
        self._solves += 1
        if self._edf_losses >= 3 and self._solves % 5:
            return False  # it lost the last three times: try it one tick in five
        budget = deadline - t0
        cost = self._edf_s_per_group * groups
        if cost <= EDF_BASE_SHARE * budget:
            return True
        won_last = self._edf_builds > 0 and self._edf_losses == 0
        return (won_last or share_met < 0.8) and time.perf_counter() + cost <= t0 + 0.5 * budget

    def _unsettled(self, tick: _Tick, at_risk: list[str]) -> tuple[list[str], int]:
        """(groups at risk the program should take this tick, how many it skips): those it
        already tried within max_plan_age_s and could not make meet their SLO stay where
        they are. Re-solving them every tick repeats the same hard program for no gain
        (between ticks only a few requests finish); the plan-age re-solve, or the group
        growing, brings them back."""
        now = tick.snap.now
        self._settled = {gid: (t, n) for gid, (t, n) in self._settled.items()
                         if gid in tick.groups and now - t < self.max_plan_age_s and tick.groups[gid].size == n}
        keep = [gid for gid in at_risk if gid not in self._settled]
        return keep, len(at_risk) - len(keep)

    def _settle(self, tick: _Tick, tried: list[str]) -> None:
        """Remember the groups the program took that still miss in the chosen plan."""
        for gid in tried:
            f = tick.best_score.forecasts.get(gid)
            if f is None or not f.meets(tick.beta):
                self._settled[gid] = (tick.snap.now, tick.groups[gid].size)

    def _improve(self, tick: _Tick, base: Decision, base_score: Score, cold: bool,
                 deadline: float, sw: Stopwatch) -> tuple[str, str]:
        """Steps (2)-(5) of the NOTE on top of the base decision; leaves the best decision in
        `tick.best` and returns (Plan.source, Plan.note)."""
        planner = self.config.planner
        tick.best, tick.best_score = base, base_score
        solved = f"qlm-{planner.method}"
        fallback = "fallback-edf" if cold else "last-plan"
        if base_score.primary >= tick.max_value - 1e-9:
            return solved, "every group meets its SLO in the base plan"
        at_risk, hopeless = tick.at_risk(base, base_score)
        if planner.drop_hopeless and hopeless:
            moved = tick.hopeless_last(base, hopeless)
            if moved.queues != base.queues:
                tick.best, tick.best_score = moved, tick.score(moved, like=(base, tick.best_score))
                base = moved
        if not at_risk:
            return solved, "no group at risk that can still meet its SLO"
        at_risk, settled = self._unsettled(tick, at_risk)
        sw.lap("risk")
        if not at_risk:
            return solved, f"the {settled} groups at risk were tried less than {self.max_plan_age_s:g} s ago"
        if time.perf_counter() >= deadline:
            return fallback, f"timeout: the {planner.solve_budget_ms:g} ms budget was spent before the program"
        cap = max(MIN_PAIRS, int(PAIRS_PER_MS * planner.solve_budget_ms))
        if planner.method == "saa":
            cap = max(MIN_PAIRS, int(cap * 4 / max(4, planner.scenarios)))
        built = tick.program(base, tick.best_score, at_risk, cap)
        sw.lap("program")
        if built is None:
            return solved, "no group at risk has a candidate worker"
        left = deadline - time.perf_counter()
        if left <= 0:
            return fallback, "timeout: the budget was spent building the program"
        floor = ALLOWANCE_FLOOR * planner.solve_budget_ms / 1000.0
        limit = left * 0.85
        if not built.ctx.full:  # a small instance is solved exactly; else by the size of the program
            limit = min(limit, max(floor, MILP_S_PER_PAIR * len(built.ctx.program.pairs)))
        sol, why = tick.solve_program(built, base, limit, tick.best_score)
        sw.lap("highs")
        sw.events.append(f"program {sol.status}" if sol is not None else "program unsolved")
        if sol is None:
            return fallback, why
        assembled = tick.assemble(built, sol)
        assembled_score = tick.score(assembled, like=(tick.best, tick.best_score))
        ids = built.ctx.group_ids
        fcs = assembled_score.forecasts
        exact = {gid for gid in ids if gid in fcs and fcs[gid].meets(tick.beta)}
        if sol.status == "optimal" and exact == {ids[i] for i in sol.on_time}:
            # The exact estimator agrees with the solved program on every program group:
            # nothing for the local search to correct (it seldom found a gain in such
            # ticks, about half the time otherwise: `qlm bench-solver --phases`).
            cand, cand_score = assembled, assembled_score
            sw.events.append("repair skipped")
        else:
            cand = tick.repair(assembled, assembled_score, built, deadline, floor)
            cand_score = tick.score(cand, like=(assembled, assembled_score))
            sw.events.append("repair gained" if cand_score.better_than(assembled_score) else "repair no gain")
        sw.lap("repair")
        size = f"{len(built.ctx.program.groups)} groups, {len(built.ctx.program.pairs)} pairs"
        better = cand_score.better_than(tick.best_score)
        if better:
            tick.best, tick.best_score = cand, cand_score
        tried = set(built.ctx.group_ids) | set(built.ctx.unplaced)
        self._settle(tick, [gid for gid in at_risk if gid in tried])
        if not better:
            return solved, f"program {sol.status} ({size}) scored no better than the base plan"
        return solved, f"program {sol.status}: {size}, {sol.solve_s * 1e3:.1f} ms"

    # ---- for tests and tools --------------------------------------------------------------

    def build_model(self, snapshot: ClusterSnapshot) -> ProgramModel:
        """The program this snapshot would solve (all groups not meeting their SLO in the
        base plan at risk, no size cap): for `.lp` dumps (ProgramModel.to_pulp) and tests."""
        tick = _Tick(self, snapshot)
        base, _ = tick.base_decision(self.last_plan)
        score = tick.score(base)
        at_risk, _hopeless = tick.at_risk(base, score)
        built = tick.program(base, score, at_risk or [g.group_id for g in snapshot.groups], 10**9)
        if built is None:
            return ProgramModel()
        return built.model

    def plan_value(self, snapshot: ClusterSnapshot, virtual_queues: Mapping[str, list[str]],
                   protected: Mapping[str, str] | None = None) -> float:
        """The objective of given virtual queues, scored exactly as `solve` scores its plans."""
        tick = _Tick(self, snapshot)
        return tick.score(Decision({k: list(v) for k, v in virtual_queues.items()}, dict(protected or {}))).primary


# ---- one solve --------------------------------------------------------------------------


@dataclass
class _ProgramContext:
    program: Program
    kept: dict[str, list[str]]  # worker -> kept queue (groups outside the program)
    group_ids: list[str]
    worker_ids: list[str]
    protect_of: dict[str, str]  # worker -> mechanism its p variable stands for
    unplaced: dict[str, str]  # groups at risk with no feasible pair -> the worker whose tail they go to
    full: bool = False  # every group and worker is in the program (a small instance)


@dataclass
class _Built:
    ctx: _ProgramContext
    model: ProgramModel


class _Tick:
    """Everything one solve computes from the snapshot (estimator, values, candidates)."""

    def __init__(self, policy: QlmPolicy, snapshot: ClusterSnapshot) -> None:
        self.policy = policy
        self.cfg = policy.config
        self.snap = snapshot
        self.beta = self.cfg.planner.beta
        self.method = self.cfg.planner.method
        self.fc = Forecaster(snapshot, self.cfg.max_running_per_worker)
        self.live = [w for w in snapshot.workers if w.accepts_work]
        self.workers = {w.worker_id: w for w in self.live}
        self.windex = {w.worker_id: i for i, w in enumerate(self.live)}
        self.groups = {g.group_id: g for g in snapshot.groups}
        self.value = {g.group_id: g.weight * g.size for g in snapshot.groups}
        self.max_value = sum(self.value.values())
        n_req = sum(g.size for g in snapshot.groups)
        self.value_per_request = self.max_value / n_req if n_req else 1.0
        self.ops = set(self.cfg.planner.operations)
        self.hopeless: set[str] = set()  # groups that cannot meet their SLO anywhere (set by at_risk)
        self.best: Decision = Decision({})  # the best decision so far and its score
        self.best_score: Score = Score(float("-inf"), float("-inf"), {})

    # -- scoring ---------------------------------------------------------------------------

    def _effective_protected(self, d: Decision) -> set[str]:
        out = set(d.protected)
        for wid, q in d.queues.items():
            w = self.workers.get(wid)
            if w is not None and w.preemption_mode in PREEMPTION_MODES and any(
                    self.groups[g].latency_sensitive for g in q if g in self.groups):
                out.add(wid)
        return out

    def score(self, d: Decision, like: tuple[Decision, Score] | None = None) -> Score:
        """The decision's exact score. With `like` (another decision and its score), only
        the workers whose queue, protection or cleared batch differ are evaluated again:
        a group's forecast depends on its own worker alone."""
        cleared = {wid for wid, c in d.changes.items() if c.clear is not None}
        prot = self._effective_protected(d)
        if like is None:
            return self._score_forecasts(self.fc.evaluate(d.queues, prot, cleared), d.cost)
        other, other_score = like
        o_cleared = {wid for wid, c in other.changes.items() if c.clear is not None}
        o_prot = self._effective_protected(other)
        changed = {wid for wid in set(d.queues) | set(other.queues)
                   if d.queues.get(wid, []) != other.queues.get(wid, [])
                   or (wid in prot) != (wid in o_prot) or (wid in cleared) != (wid in o_cleared)}
        fc = {gid: f for gid, f in other_score.forecasts.items() if f.worker_id not in changed}
        new = self.fc.evaluate({wid: d.queues.get(wid, []) for wid in changed}, prot, cleared)
        fc.update(new)
        # Both objectives are sums over groups: move other's by what the changed workers add.
        was = self._score_forecasts({gid: f for gid, f in other_score.forecasts.items() if f.worker_id in changed},
                                    0.0)
        now = self._score_forecasts(new, 0.0)
        return Score(other_score.primary + other.cost + now.primary - was.primary - d.cost,
                     other_score.expected + now.expected - was.expected, fc)

    def _score_forecasts(self, fc: dict[str, GroupForecast], cost: float) -> Score:
        expected = sum(self.value[g] * f.attainment() for g, f in fc.items())
        if self.method == "saa":
            primary = expected - cost
        else:
            primary = sum(self.value[g] for g, ok in zip(fc, meets_all(fc.values(), self.beta)) if ok) - cost
        return Score(primary, expected, fc)

    # -- base plan ---------------------------------------------------------------------------

    @cached_property
    def heads(self) -> QueueTails:
        """Every worker with an empty queue: where a group could start at the head."""
        return QueueTails(self.snap, self.fc, self.live)

    def eligible(self, g: GroupState, w: WorkerState) -> bool:
        if not w.can_serve(g.model):
            return False
        if w.kv_capacity_tokens > 0:
            mean_out = self.snap.lengths(g.model, g.slo_class).mean
            if max(g.prompt_tokens) + mean_out > w.kv_capacity_tokens:
                return False
        return True

    def base_decision(self, last_plan: Plan | None) -> tuple[Decision, bool]:
        """(the base decision, whether it is a cold start built by EDF list scheduling)."""
        where: dict[str, tuple[str, int]] = {}
        if last_plan is not None:
            for wid, q in last_plan.virtual_queues.items():
                for i, gid in enumerate(q):
                    where[gid] = (wid, i)
        placed: dict[str, list[tuple[int, str]]] = {wid: [] for wid in self.workers}
        new: list[GroupState] = []
        for g in self.snap.groups:
            wid, pos = (g.worker_id, g.position) if g.worker_id is not None else where.get(g.group_id, (None, 0))
            if wid in self.workers and self.eligible(g, self.workers[wid]):
                placed[wid].append((pos, g.group_id))
            else:
                new.append(g)
        allow_swap = "model_swap" in self.ops
        if not any(placed.values()):
            return self.edf_decision(), True
        queues = {wid: [gid for _, gid in sorted(items)] for wid, items in placed.items()}
        if new:
            # Where a new group could start soonest: the worker's head plus its queued work
            # spread over its slots (the program corrects this for groups at risk).
            heads = self.heads
            queued = np.array([sum(self._add_mean(gid, wid) for gid in queues[wid]) for wid in heads.wids])
            for g in sorted(new, key=lambda g: (g.deadline, g.group_id)):
                start = heads.start(g)
                ok = eligible_mask(heads, g, allow_swap, start)
                t = np.where(ok, start + queued, np.inf)
                if not np.isfinite(t).any():
                    t = np.where(ok, queued, np.inf)
                i = int(np.argmin(t))
                q = queues[heads.wids[i]]
                at = next((k for k, gid in enumerate(q) if self.groups[gid].deadline > g.deadline), len(q))
                q.insert(at, g.group_id)
                queued[i] += self._add_mean(g.group_id, heads.wids[i])
        return Decision(queues), False

    def edf_decision(self) -> Decision:
        """EDF list scheduling (the fallback heuristic) under this policy's operations."""
        order = sorted(self.snap.groups, key=lambda g: (g.deadline, g.group_id))
        queues = list_schedule(self.snap, order, sticky="load_balance" not in self.ops,
                               allow_swap="model_swap" in self.ops, forecaster=self.fc)
        return Decision(queues)

    # -- risk -----------------------------------------------------------------------------------

    def at_risk(self, d: Decision, score: Score) -> tuple[list[str], list[str]]:
        """(groups that miss in the base plan but could meet somewhere, hopeless ones)."""
        missing = [gid for gid, f in score.forecasts.items() if not f.meets(self.beta)]
        queued = {gid for q in d.queues.values() for gid in q}
        missing += [gid for gid in self.groups if gid not in queued]
        risky, hopeless = [], []
        for gid in missing:
            g = self.groups[gid]
            if self._best_case_meets(g):
                risky.append(gid)
            else:
                hopeless.append(gid)
        risky.sort(key=lambda gid: (-self.value[gid], self.groups[gid].deadline, gid))
        self.hopeless = set(hopeless)
        return risky, hopeless

    def candidates_of(self, g: GroupState, k: int) -> list[WorkerState]:
        """The `k` workers where `g` could start soonest at the head of the queue (its own
        worker too); only its own worker when load balancing is off."""
        start = self.heads.start(g)
        ok = eligible_mask(self.heads, g, "model_swap" in self.ops, start)
        t = np.where(ok, start, np.inf)
        if not np.isfinite(t).any():
            return []
        own = self.windex.get(g.worker_id) if g.worker_id is not None else None
        if "load_balance" not in self.ops and own is not None and np.isfinite(t[own]):
            return [self.live[own]]
        k = min(k, int(np.isfinite(t).sum()))
        top = np.argpartition(t, k - 1)[:k] if k < len(t) else np.arange(len(t))
        top = sorted((int(i) for i in top if np.isfinite(t[i])), key=lambda i: (t[i], self.live[i].worker_id))
        if own is not None and own not in top and np.isfinite(t[own]):
            top.append(own)
        return [self.live[i] for i in top]

    def _best_case_meets(self, g: GroupState) -> bool:
        """Whether `g` keeps a fair chance (at least 1 - beta) of meeting its SLO at the head
        of one of its two best workers (with protection or a cleared batch where those
        are possible); if not it is hopeless."""
        gw = self.fc.groups[g.group_id]
        slack = min(gw.slack_s)
        if slack <= 0:
            return False
        for w in self.candidates_of(g, 2):
            for protect, cleared in ((False, False), (True, False), (False, True)):
                if protect and protection_mechanism(self.cfg, w) is None:
                    continue
                if cleared and not self._can_clear(w):
                    continue
                t = self.fc.cursor(w.worker_id, protect, cleared).timing(gw).last
                if t.prob_within(slack) >= 1.0 - self.beta:
                    return True
        return False

    def _can_clear(self, w: WorkerState) -> bool:
        """Whether the worker's batch may be taken off the device for a model swap now."""
        running = [r for r in w.running if not r.swapped]
        return "model_swap" in self.ops and removal_mechanism(self.cfg, w, running, all_must_fit=True) is not None

    def hopeless_last(self, d: Decision, hopeless: Iterable[str]) -> Decision:
        """drop_hopeless: groups that cannot meet their SLO anywhere go to the tail."""
        hs = set(hopeless)
        queues = {}
        for wid, q in d.queues.items():
            keep = [gid for gid in q if gid not in hs]
            late = sorted((gid for gid in q if gid in hs), key=lambda gid: (self.groups[gid].deadline, gid))
            queues[wid] = keep + late
        return replace(d, queues=queues)

    # -- the program -----------------------------------------------------------------------------

    def _lambda(self, w: WorkerState) -> float:
        """Objective units per worker-second: the weighted requests it serves in a second."""
        wm = self.fc.workers[w.worker_id]
        item_mean = wm.table.item_mean
        per_request = item_mean * wm.step_s + w.profile.prefill_time(512)
        return wm.slots / max(per_request, 1e-6) * self.value_per_request

    def _options(self, w: WorkerState, models: set[str], base_models: set[str]) -> list[Option]:
        """A worker with no kept queue: keep its model (index 0), or swap to another."""
        current = w.loading_model or w.active_model
        opts = [Option("stay", current, 0.0, None)]
        running = [r for r in w.running if not r.swapped]
        swap_ok = "model_swap" in self.ops
        for m in sorted(models):
            if m == current or not w.can_serve(m):
                continue
            if swap_ok or current is None or m in base_models:
                change = None if running or w.loading_model else ModelChange(m)
                opts.append(Option(f"{'drain' if running else 'load'}:{m}", m, 0.0, change))
            mech = removal_mechanism(self.cfg, w, running, all_must_fit=True) if swap_ok else None
            if mech is not None and w.loading_model is None:
                lost = sum(victim_cost_s(w, r, mech) for r in running)
                opts.append(Option(f"clear:{m}", m, lost * self._lambda(w), ModelChange(m, mech)))
        return opts

    def program(self, base: Decision, score: Score, at_risk: list[str], cap_pairs: int) -> _Built | None:
        groups_n, workers_n = len(self.groups), len(self.workers)
        full = groups_n * workers_n <= FULL_PROGRAM_PAIRS
        k = workers_n if full else self.policy.candidates
        risky = list(self.groups) if full else at_risk[: max(1, cap_pairs // (k + 1))]
        risky_set = set(risky)
        cand = {gid: self.candidates_of(self.groups[gid], k) for gid in risky}
        cand = {gid: ws for gid, ws in cand.items() if ws}
        if not cand:
            return None
        kept0 = {wid: [gid for gid in q if gid not in risky_set] for wid, q in base.queues.items()}

        # Kept groups the risky ones could push past their deadline join the program.
        pulled: dict[str, str] = {}
        for wid in {w.worker_id for ws in cand.values() for w in ws}:
            q = kept0.get(wid, [])
            if not q:
                continue
            incoming = sorted(((self.groups[gid].deadline, self._add_mean(gid, wid)) for gid, ws in cand.items()
                               if any(w.worker_id == wid for w in ws)))
            for gid in q:
                f = score.forecasts.get(gid)
                if f is None:
                    continue
                margin = min(f.slack_s) - f.timing.last.quantile(self.beta)
                push = 1.5 * sum(a for dl, a in incoming if dl <= self.groups[gid].deadline + 1e-9)
                if push > margin:
                    pulled[gid] = wid
        for gid, wid in pulled.items():
            cand[gid] = [self.workers[wid]]
        return self._build(base, cand, full)

    def _build(self, base: Decision, cand: dict[str, list[WorkerState]], full: bool) -> _Built | None:
        """The program for these candidates. A candidate group with no feasible pair (it
        cannot meet its SLO on any candidate, or no candidate can take its model) stays
        out of the program and is served last (`_ProgramContext.unplaced`)."""
        in_program = set(cand)
        kept = {wid: [gid for gid in q if gid not in in_program] for wid, q in base.queues.items()}
        base_worker = {gid: wid for wid, q in base.queues.items() for gid in q}
        gids = sorted(cand, key=lambda gid: (self.groups[gid].deadline, gid))
        gindex = {gid: i for i, gid in enumerate(gids)}
        wids = sorted({w.worker_id for ws in cand.values() for w in ws})
        windex = {wid: j for j, wid in enumerate(wids)}
        models = {self.groups[gid].model for gid in gids}

        pworkers: list[ProgramWorker] = []
        protect_of: dict[str, str] = {}
        starts: dict[str, list[QueueCursor]] = {}
        for wid in wids:
            w = self.workers[wid]
            wm = self.fc.workers[wid]
            fixed = bool(kept.get(wid))
            if fixed:
                cur = self.fc.cursor(wid)
                states = [replace(cur)]
                for gid in kept[wid]:
                    cur.push(self.fc.groups[gid])
                    states.append(replace(cur))
                starts[wid] = states
                opts = [Option("kept", None, 0.0, None)]
            else:
                base_models = {self.groups[g].model for g in base.queues.get(wid, [])}
                opts = self._options(w, models, base_models)
            mech = protection_mechanism(self.cfg, w)
            ls_here = [gid for gid, ws in cand.items() if self.groups[gid].latency_sensitive and w in ws]
            pcost, cap = 0.0, None
            if mech is not None and ls_here:
                protect_of[wid] = mech
                pcost = protection_cost_s(self.cfg, w, [self.groups[g] for g in ls_here], wm.slots, mech) * self._lambda(w)
                cap = self.cfg.planner.max_pause_s if mech == EXPERT else None
            else:
                mech = None
            pworkers.append(ProgramWorker(wid, opts, fixed, mech, pcost, cap, wm.step_s / wm.slots))

        pairs: list[Pair] = []
        index: dict[tuple[str, str], int] = {}
        for gid in gids:
            g = self.groups[gid]
            gw = self.fc.groups[gid]
            for w in cand[gid]:
                wid = w.worker_id
                j = windex[wid]
                pw = pworkers[j]
                wm = self.fc.workers[wid]
                ref: dict[int, tuple[float, float]] = {}
                ref_ls = None
                state = None
                if pw.fixed:
                    at = self._insertion(g, kept[wid], starts[wid], base.queues[wid] if base_worker.get(gid) == wid
                                         else None, in_program)
                    if at is None:
                        continue
                    state = starts[wid][at]
                    t = state.timing(gw).last
                    ref[0] = (t.mean_s, t.var_s2)
                    if pw.protect is not None:
                        t = replace(state, protect_ls=True).timing(gw).last
                        ref_ls = (t.mean_s, t.var_s2)
                    index[gid, wid] = at
                else:
                    for kk, opt in enumerate(pw.options):
                        if opt.model != g.model:
                            continue
                        cleared = opt.change is not None and opt.change.clear is not None
                        t = self.fc.cursor(wid, False, cleared).timing(gw).last
                        ref[kk] = (t.mean_s, t.var_s2)
                    if not ref:
                        continue
                    if pw.protect is not None and 0 in ref:
                        t = self.fc.cursor(wid, True).timing(gw).last
                        ref_ls = (t.mean_s, t.var_s2)
                    index[gid, wid] = 0
                    if 0 in ref:
                        state = self.fc.cursor(wid)
                work = gw.work
                free_s = 0.0
                if state is not None:  # slots still free at the reference absorb work ahead
                    free = state.table.free - state.queued.count - (work.count - 1)
                    free_s = max(0, free) * state.table.item_mean * wm.step_s / wm.slots
                pairs.append(Pair(
                    gi=gindex[gid], wj=j, order=(index[gid, wid], g.deadline, gid),
                    add_mean=self._add_mean(gid, wid), add_var=work.var * (wm.step_s / wm.slots) ** 2,
                    prefill_s=wm.prefill_s(work), free_s=free_s, ref=ref, ref_ls=ref_ls,
                    current=base_worker.get(gid) == wid))
        if not pairs:
            return None
        with_pair = sorted({pr.gi for pr in pairs})
        unplaced = [gid for gid in gids if gindex[gid] not in set(with_pair)]
        if unplaced:
            remap = {old: new for new, old in enumerate(with_pair)}
            gids = [gids[i] for i in with_pair]
            pairs = [replace(pr, gi=remap[pr.gi]) for pr in pairs]
        pgroups = [ProgramGroup(gid, self.value[gid], min(self.fc.groups[gid].slack_s),
                                self.groups[gid].latency_sensitive, self.fc.groups[gid].work.tokens,
                                self.fc.groups[gid].work.var) for gid in gids]
        planner = self.cfg.planner
        program = Program(planner.method, self.beta, pgroups, pworkers, pairs, scenarios=planner.scenarios,
                          seed=int(self.snap.now * 1000) % (2**31),
                          place_reward=0.0 if planner.drop_hopeless else PLACE_REWARD)
        ctx = _ProgramContext(program, kept, gids, wids, protect_of,
                              {gid: base_worker.get(gid) or cand[gid][0].worker_id for gid in unplaced}, full)
        return _Built(ctx, build_model(program))

    def _insertion(self, g: GroupState, kept: list[str], states: list[QueueCursor], own_queue: list[str] | None,
                   in_program: set[str]) -> int | None:
        """Where `g` goes among a worker's kept groups: where it was (its own worker), else
        at its deadline among the groups that can still meet theirs; moved earlier if
        needed so that it joins a block of its own model (no extra model swap)."""
        if own_queue is not None:
            return sum(1 for h in own_queue[: own_queue.index(g.group_id)] if h not in in_program)
        at = next((i for i, h in enumerate(kept) if h in self.hopeless or self.groups[h].deadline > g.deadline),
                  len(kept))
        for i in range(at, -1, -1):
            if states[i].model in (g.model, None) or (i < len(kept) and self.groups[kept[i]].model == g.model):
                return i
        return None

    def _add_mean(self, gid: str, wid: str) -> float:
        wm = self.fc.workers[wid]
        work = self.fc.groups[gid].work
        return work.tokens * wm.step_s / wm.slots + wm.prefill_s(work)

    def mip_start(self, built: _Built, base: Decision, base_score: Score) -> np.ndarray:
        """The program's columns for the base plan: every group where the base plan has it,
        meeting its SLO where the base plan's forecast says so and the program's
        (conservative) rows agree. A feasible incumbent as good as the base plan lets
        HiGHS prune from its first node."""
        m = built.model
        ctx = built.ctx
        where = {gid: wid for wid, q in base.queues.items() for gid in q}
        start = np.zeros(m.num_cols)
        meets = base_score.forecasts
        ys = set()
        stays = {(pr.gi, pr.wj) for pr in ctx.program.pairs if 0 in pr.ref}  # option 0: the worker keeps its model
        for (i, j), c in m.vars.x.items():
            gid = ctx.group_ids[i]
            if where.get(gid) == ctx.worker_ids[j] and (i, j) in stays:
                start[c] = 1.0
                f = meets.get(gid)
                if f is not None and f.meets(self.beta):
                    y = m.vars.y[i, j]
                    start[y] = 1.0
                    ys.add(y)
        for (j, k), c in m.vars.u.items():
            start[c] = 1.0 if k == 0 else 0.0
        for _ in range(3):  # y only tightens the rows it is in: drop those of violated rows
            bad = m.violated(start)
            if not len(bad):
                break
            for r in bad:
                for c in m.row_cols(int(r)):
                    if c in ys:
                        start[c] = 0.0
        return start

    def solve_program(self, built: _Built, base: Decision, limit_s: float,
                      base_score: Score) -> tuple[ProgramSolution | None, str]:
        m = built.model
        start = self.mip_start(built, base, base_score)
        try:
            sol = solve_program(m, limit_s, start=start)
        except RuntimeError as exc:
            return None, f"solver error: {exc}"
        if sol is None:
            return None, f"no integer solution within {limit_s * 1e3:.0f} ms"
        return sol, ""

    def assemble(self, built: _Built, sol: ProgramSolution) -> Decision:
        ctx = built.ctx
        program = ctx.program
        inserts: dict[str, list[tuple[tuple, str]]] = {}
        order_of = {(pr.gi, pr.wj): pr.order for pr in program.pairs}
        for gi, wj in sol.placed.items():
            inserts.setdefault(ctx.worker_ids[wj], []).append((order_of[gi, wj], ctx.group_ids[gi]))
        queues: dict[str, list[str]] = {}
        for wid in self.workers:
            kept = ctx.kept.get(wid, [])
            ins = sorted(inserts.get(wid, []))
            q: list[str] = []
            k = 0
            for i, gid in enumerate(kept):
                while k < len(ins) and ins[k][0][0] <= i:
                    q.append(ins[k][1])
                    k += 1
                q.append(gid)
            q.extend(gid for _, gid in ins[k:])
            queues[wid] = q
        # Groups queued nowhere (they miss their SLO wherever they would go): served last.
        tail = dict(ctx.unplaced)
        placed = {ctx.group_ids[gi] for gi in sol.placed}
        for pr in program.pairs:
            gid = ctx.group_ids[pr.gi]
            if gid not in placed and (pr.current or gid not in tail):
                tail[gid] = ctx.worker_ids[pr.wj]
        for gid, wid in sorted(tail.items(), key=lambda kv: (self.groups[kv[0]].deadline, kv[0])):
            queues.setdefault(wid, []).append(gid)
        changes: dict[str, ModelChange] = {}
        cost = 0.0
        for wj, k in sol.options.items():
            pw = program.workers[wj]
            opt = pw.options[k]
            cost += opt.cost
            if opt.change is not None:
                changes[pw.worker_id] = opt.change
        protected = {}
        for wj in sol.protected:
            wid = program.workers[wj].worker_id
            mech = ctx.protect_of[wid]
            w = self.workers[wid]
            q = [self.groups[g] for g in queues.get(wid, [])]
            slots = self.fc.workers[wid].slots
            if mech not in PREEMPTION_MODES and not ls_requests_needing_slots(w, q, slots, mech):
                continue  # free slots suffice: nothing to evict, nothing to credit
            protected[wid] = mech
            cost += protection_cost_s(self.cfg, w, q, slots, mech) * self._lambda(w)
        return Decision(queues, protected, changes, cost)

    def ls_fast_path(self, d: Decision) -> Decision:
        """planner.ls_fast_path: protect every worker whose queue starts with latency-sensitive
        groups by expert-level (MoE) or iteration-level (dense) preemption: LS requests join
        beyond the batch limit and go first, no best-effort work is lost (a KV swap-out, only
        past that room, costs two copies), when that costs best-effort work no more than
        those groups' own prefill, whether or not the program needed it for their SLO."""
        protected = dict(d.protected)
        cost = d.cost
        for wid, queue in d.queues.items():
            w = self.workers.get(wid)
            if w is None or wid in protected or not queue or not self.groups[queue[0]].latency_sensitive:
                continue
            mech = protection_mechanism(self.cfg, w)
            if mech not in PREEMPTION_MODES:
                continue  # eviction / KV swap alone cost best-effort throughput: only when the SLO needs it
            lead = leading_latency_sensitive(self.groups[gid] for gid in queue)
            slots = self.fc.workers[wid].slots
            lost = protection_cost_s(self.cfg, w, lead, slots, mech)
            if lost > sum(self.fc.workers[wid].prefill_s(self.fc.groups[g.group_id].work) for g in lead):
                continue
            protected[wid] = mech
            cost += lost * self._lambda(w)
        return d if protected == d.protected else replace(d, protected=protected, cost=cost)

    def _repair_positions(self, gid: str, q: list[str]) -> Iterable[int]:
        """Where repair tries `gid` in queue `q`: everywhere in a short queue; else the head,
        the tail and around its deadline position (the program's order), which is where
        the linearisation's errors move a group."""
        if len(q) <= REPAIR_ALL_POSITIONS:
            return range(len(q) + 1)
        dl = self.groups[gid].deadline
        at = next((k for k, h in enumerate(q) if self.groups[h].deadline > dl), len(q))
        return sorted({0, max(0, at - 1), at, min(len(q), at + 1), len(q)})

    def repair(self, d: Decision, d_score: Score, built: _Built, deadline: float, floor_s: float = 0.0) -> Decision:
        """Local search with the exact estimator, while time is left: move a program group
        (those that miss first, most valuable first) to the position on one of its candidate
        workers that raises the objective most; repeat until no move helps. It corrects
        what the program's linearisation got wrong (free slots, variance tangents, order).
        `d_score` is d's score: a worker's forecasts are evaluated again only once its
        queue changes. It stops at `deadline`, or on a partial program after
        REPAIR_S_PER_MISS per group that may move (at least `floor_s`)."""
        ctx = built.ctx
        cleared = {wid for wid, c in d.changes.items() if c.clear is not None}
        cands: dict[str, list[str]] = {}
        for pr in ctx.program.pairs:
            cands.setdefault(ctx.group_ids[pr.gi], []).append(ctx.worker_ids[pr.wj])
        queues = {wid: list(q) for wid, q in d.queues.items()}
        prot = self._effective_protected(d)
        where = {gid: wid for wid, q in queues.items() for gid in q}

        def worker_score(wid: str, q: list[str]) -> tuple[float, float, dict[str, GroupForecast]]:
            if not q:
                return 0.0, 0.0, {}
            fc = self.fc.evaluate({wid: q}, prot, cleared)
            s = self._score_forecasts(fc, 0.0)
            return s.primary, s.expected, fc

        def gain(new: tuple, old: tuple) -> tuple[float, float]:
            return new[0] - old[0], new[1] - old[1]

        by_worker: dict[str, dict[str, GroupForecast]] = {}
        for gid, f in d_score.forecasts.items():
            by_worker.setdefault(f.worker_id, {})[gid] = f
        current: dict[str, tuple[float, float, dict[str, GroupForecast]]] = {}

        def score_of(wid: str) -> tuple[float, float, dict[str, GroupForecast]]:
            if wid not in current:
                fc = by_worker.get(wid, {})
                s = self._score_forecasts(fc, 0.0)
                current[wid] = (s.primary, s.expected, fc)
            return current[wid]

        exhaustive = ctx.full
        first = True
        improved = True
        while improved and time.perf_counter() < deadline:
            improved = False
            meets = {}
            for g in ctx.group_ids:
                f = score_of(where[g])[2].get(g) if g in where else None
                meets[g] = f.meets(self.beta) if f is not None else True
            # Small instances: every group may move (a local optimum); else those missing.
            movable = ctx.group_ids if exhaustive else [g for g in ctx.group_ids if not meets[g]]
            if first and not exhaustive:
                deadline = min(deadline, time.perf_counter() + max(floor_s, REPAIR_S_PER_MISS * len(movable)))
            first = False
            for gid in sorted(movable, key=lambda g: (meets[g], -self.value[g], g)):
                if time.perf_counter() >= deadline:
                    break
                src = where[gid]
                src_q = [h for h in queues[src] if h != gid]
                src_new = worker_score(src, src_q)
                best, best_gain = None, (1e-9, 1e-9)
                for wid in cands.get(gid, []):
                    q = src_q if wid == src else queues.get(wid, [])
                    for pos in self._repair_positions(gid, q):
                        if time.perf_counter() >= deadline:
                            break
                        trial = q[:pos] + [gid] + q[pos:]
                        if wid == src and trial == queues[src]:
                            continue
                        new = worker_score(wid, trial)
                        if wid == src:
                            g = gain(new, score_of(src))
                        else:
                            g1, g2 = gain(new, score_of(wid)), gain(src_new, score_of(src))
                            g = (g1[0] + g2[0], g1[1] + g2[1])
                        if g[0] > best_gain[0] + 1e-9 or (g[0] > best_gain[0] - 1e-9 and g[1] > best_gain[1]):
                            best, best_gain = (wid, trial, new), g
                if best is not None and best_gain[0] >= -1e-9:
                    wid, trial, new = best
                    if wid != src:
                        queues[src] = src_q
                        current[src] = src_new
                    queues[wid] = trial
                    current[wid] = new
                    where[gid] = wid
                    improved = True
        return replace(d, queues=queues)
