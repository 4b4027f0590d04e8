"""QLM's global scheduler: the controller's two calls (needs_replan, solve) and the NOTE
that explains the algorithm once; each stage lives in its own module of this package."""

from __future__ import annotations

from collections.abc import Mapping

from qlmserve.controller.estimator import Forecaster
from qlmserve.controller.policies.base import SchedulingPolicy
from qlmserve.controller.policies.op_rules import PREEMPTION_MODES, derive_operations
from qlmserve.controller.policies.placement import PlacementState, backlog_rule, restrict_to_targets
from qlmserve.controller.policies.qlm.base_plan import base_decision, edf_decision
from qlmserve.controller.policies.qlm.decision import Decision, Score, Stopwatch
from qlmserve.controller.policies.qlm.fast_path import ls_fast_path
from qlmserve.controller.policies.qlm.program import ProgramModel
from qlmserve.controller.policies.qlm.program_build import assemble, program, run_solver
from qlmserve.controller.policies.qlm.repair import repair
from qlmserve.controller.policies.qlm.risk import groups_at_risk, hopeless_last
from qlmserve.controller.policies.qlm.shed import ArrivalHistory, costly_groups
from qlmserve.controller.policies.qlm.tick import Tick
from qlmserve.controller.policies.registry import register
from qlmserve.controller.policy import PolicyConfig
from qlmserve.controller.snapshot import ClusterSnapshot, WorkerState
from qlmserve.controller.solve_budget import SolveClock
from qlmserve.operations.plan import Plan

# Program size per millisecond of budget (pairs of group x candidate worker). At 256 groups
# a 50 ms budget then takes about 12 groups at risk per tick (plus the kept groups they
# could push late); the rest wait for the next tick (_unsettled). 2 pairs/ms gave larger
# programs that HiGHS stopped on at its time limit, and no better plans in `qlm
# bench-solver`. SAA programs are scaled down by scenarios / 4.
PAIRS_PER_MS = 1.0
MIN_PAIRS = 24
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
ALLOWANCE_FLOOR = 0.05
# The EDF base is built every tick while it costs at most this share of the budget (~7 ms
# at 256 groups); else as QlmPolicy._edf_worth_it says.
EDF_BASE_SHARE = 0.25


@register
class QlmPolicy(SchedulingPolicy):
    """QLM's global scheduler: a chance-constrained or sample-average stochastic program
    over request groups, solved each tick within `planner.solve_budget_ms`."""

    name = "qlm"
    plans_a_head = True

    def __init__(self, config: PolicyConfig, clock: SolveClock | None = None) -> None:
        super().__init__(config, clock)
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
        self.placement = PlacementState()  # model placement's memory (model_placement "rule")
        self.arrivals = ArrivalHistory()  # what recent arrivals say is coming (shed.py)

    # ---- the controller's calls ------------------------------------------------------------

    def observe(self, snapshot: ClusterSnapshot) -> None:
        self.clock.meter.charge("group", len(snapshot.groups))
        self.arrivals.observe(snapshot)

    def needs_replan(self, snapshot: ClusterSnapshot, last_plan: Plan | None) -> bool:
        """Whether this tick must solve, or the last plan may stand: yes when a group has no
        place yet, a queue's worker stopped taking work, the plan is older than
        `max_plan_age_s`, an idle worker could take queued work (load balancing), or the
        estimator now predicts that a group the last plan expected to meet its SLO misses."""
        if last_plan is None or not last_plan.virtual_queues:
            return bool(snapshot.groups)
        if self._last_solve_at is None or snapshot.now - self._last_solve_at >= self.max_plan_age_s:
            return True
        queued = set().union(*last_plan.virtual_queues.values())  # every queued group: C-speed at depth
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
        fc = Forecaster(snapshot, self.config.max_running_per_worker, self.clock.meter)
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
        # when drop_hopeless, else left where they are. Under overload (shed_costly), the
        # groups Moore-Hodgson's rule gives up on their model's fleet, given the work the
        # recent arrivals say is coming, are served last too, even when every group meets
        # in the base plan (shed.py). (3) The program takes the groups
        # at risk (the rest, most valuable first, as many as the budget allows; not those
        # it already tried and could not rescue within max_plan_age_s), each with its K
        # best candidate workers, plus the kept groups whose slack they could consume;
        # all other groups are constants. On each worker the program's groups
        # run in deadline order among themselves (for a fixed set of on-time jobs on one
        # machine deadline order is optimal: Moore-Hodgson's exchange argument) and go
        # among the kept ones at their deadline position, so the order is not a variable
        # and the MILP (program.py) is an assignment: y[g,w] (g meets on w),
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
        t0 = self.clock.now()
        planner = self.config.planner
        snapshot, placed = self._follow_placement(snapshot)
        # Keep back what turning the chosen decision into a plan took last time.
        deadline = t0 + planner.solve_budget_ms / 1000.0 - min(self._finish_s, planner.solve_budget_ms / 4000.0)
        sw = self.last_phases = Stopwatch(self.clock)
        tick = Tick(self, snapshot)
        sw.lap("estimator")
        best, cold = base_decision(tick, self.last_plan)
        best_score = tick.score(best)
        sw.lap("base")
        if not cold and best_score.primary < tick.max_value - 1e-9 and self._edf_worth_it(
                len(snapshot.groups), best_score.primary / tick.max_value, t0, deadline):
            # EDF list scheduling from scratch may start better than the last plan.
            t_edf = self.clock.now()
            edf = edf_decision(tick)
            edf_score = tick.score(edf)
            per_group = (self.clock.now() - t_edf) / max(1, len(snapshot.groups))
            self._edf_s_per_group = 0.7 * self._edf_s_per_group + 0.3 * per_group
            self._edf_losses += 1
            self._edf_builds += 1
            if edf_score.better_than(best_score):
                best, best_score, cold = edf, edf_score, True
                self._edf_losses = 0
            sw.events.append("edf base won" if cold else "edf base lost")
            sw.lap("edf base")
        source, note = self._improve(tick, best, best_score, cold, deadline, sw)
        t_finish = self.clock.now()
        best, best_score = tick.best, tick.best_score
        if planner.ls_fast_path:
            best = ls_fast_path(tick, best)
        self.last_decision = best
        ops = derive_operations(snapshot, self.config, tick.fc, best.queues, best.protected, best.changes)
        self.charge_bookkeeping(snapshot)  # the operations and the plan's per-group fields
        plan = Plan(virtual_queues=best.queues, operations=ops, source=source, latency_sensitive_first=True,
                    late_last=planner.drop_hopeless,
                    predicted_attainment={gid: f.attainment() for gid, f in best_score.forecasts.items()},
                    objective=best_score.primary, note="; ".join(x for x in (placed, note) if x), solve_time_s=self.clock.now() - t0)
        self._finish_s = 0.7 * self._finish_s + 0.3 * (self.clock.now() - t_finish)
        sw.lap("operations")
        self.last_plan = plan
        self._last_solve_at = snapshot.now
        return plan

    def _follow_placement(self, snapshot: ClusterSnapshot) -> tuple[ClusterSnapshot, str]:
        """Model placement as a stage before the program (model_placement "rule"): the
        backlog rule moves at most one worker per tick to the model with the largest backlog
        per worker, its threshold and cooldown the hysteresis, and every later stage sees
        each worker able to serve only its target model. Not the default: on mm3 (window
        120, load 1.5, `qlm bench --scenario mm3`) it met 57.6% where the program choosing
        swaps itself met 64.6%: the rule moves one worker per tick at most, by queue length
        alone, where the program weighs each swap's drain and load against the deadlines
        of the groups it would serve."""
        if self.config.planner.model_placement != "rule" or not self.operation_enabled("model_swap"):
            return snapshot, ""
        planner = self.config.planner
        switches = backlog_rule(snapshot, self.placement, cooldown_s=planner.switch_cooldown_s,
                                threshold=planner.switch_backlog or self.config.max_running_per_worker)
        return (restrict_to_targets(snapshot, self.placement.targets(snapshot)),
                "; ".join(f"{s.worker_id} -> {s.model}: {s.reason}" for s in switches))

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
        return (won_last or share_met < 0.8) and self.clock.now() + cost <= t0 + 0.5 * budget

    def _unsettled(self, tick: Tick, at_risk: list[str]) -> tuple[list[str], int]:
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

    def _settle(self, tick: Tick, tried: list[str]) -> None:
        """Remember the groups the program took that still miss in the chosen plan."""
        for gid in tried:
            f = tick.best_score.forecasts.get(gid)
            if f is None or not f.meets(tick.beta):
                self._settled[gid] = (tick.snap.now, tick.groups[gid].size)

    def _improve(self, tick: Tick, base: Decision, base_score: Score, cold: bool,
                 deadline: float, sw: Stopwatch) -> tuple[str, str]:
        """Steps (2)-(5) of the NOTE on top of the base decision; leaves the best decision in
        `tick.best` and returns (Plan.source, Plan.note)."""
        planner = self.config.planner
        tick.best, tick.best_score = base, base_score
        solved = f"qlm-{planner.method}"
        fallback = "fallback-edf" if cold else "last-plan"
        all_meet = base_score.primary >= tick.max_value - 1e-9  # then none is at risk or hopeless
        at_risk, hopeless = ([], []) if all_meet else groups_at_risk(tick, base, base_score)
        # Even when every group meets: the base plan may meet them by spending the capacity
        # that the requests arriving next need (shed.py).
        shed = costly_groups(tick, tick.hopeless, self.arrivals) if planner.drop_hopeless and planner.shed_costly \
            else set()
        if all_meet and not shed:
            return solved, "every group meets its SLO in the base plan"
        if shed:
            tick.hopeless |= shed
            hopeless = hopeless + sorted(shed.difference(hopeless))
            at_risk = [gid for gid in at_risk if gid not in shed]
        if planner.drop_hopeless and hopeless:
            moved = hopeless_last(tick, base, hopeless)
            if moved.queues != base.queues:
                tick.best, tick.best_score = moved, tick.score(moved, like=(base, tick.best_score))
                base = moved
        if not at_risk:
            return solved, "no group at risk that can still meet its SLO"
        at_risk, settled = self._unsettled(tick, at_risk)
        sw.lap("risk")
        if not at_risk:
            return solved, f"the {settled} groups at risk were tried less than {self.max_plan_age_s:g} s ago"
        if self.clock.now() >= deadline:
            return fallback, f"timeout: the {planner.solve_budget_ms:g} ms budget was spent before the program"
        cap = max(MIN_PAIRS, int(PAIRS_PER_MS * planner.solve_budget_ms))
        if planner.method == "saa":
            cap = max(MIN_PAIRS, int(cap * 4 / max(4, planner.scenarios)))
        built = program(tick, base, tick.best_score, at_risk, cap)
        sw.lap("program")
        if built is None:
            return solved, "no group at risk has a candidate worker"
        left = deadline - self.clock.now()
        if left <= 0:
            return fallback, "timeout: the budget was spent building the program"
        floor = ALLOWANCE_FLOOR * planner.solve_budget_ms / 1000.0
        limit = left * 0.85
        if not built.ctx.full:  # a small instance is solved exactly; else by the size of the program
            limit = min(limit, max(floor, MILP_S_PER_PAIR * len(built.ctx.program.pairs)))
        sol, why = run_solver(tick, built, base, limit, tick.best_score)
        sw.lap("highs")
        sw.events.append(f"program {sol.status}" if sol is not None else "program unsolved")
        if sol is None:
            return fallback, why
        assembled = assemble(tick, built, sol)
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
            cand = repair(tick, assembled, assembled_score, built, deadline, floor)
            cand_score = tick.score(cand, like=(assembled, assembled_score))
            sw.events.append("repair gained" if cand_score.better_than(assembled_score) else "repair no gain")
        sw.lap("repair")
        size = f"{len(built.ctx.program.groups)} groups, {len(built.ctx.program.pairs)} pairs"
        # The chance method counts groups whose beta-quantile meets; a plan that counts more
        # of them may still meet fewer requests in expectation (under overload it moved at-risk
        # groups ahead of others that then missed). Such a plan is not taken.
        better = cand_score.better_than(tick.best_score) and cand_score.expected >= tick.best_score.expected - 1e-9
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
        tick = Tick(self, snapshot)
        base, _ = base_decision(tick, self.last_plan)
        score = tick.score(base)
        at_risk, _hopeless = groups_at_risk(tick, base, score)
        built = program(tick, base, score, at_risk or [g.group_id for g in snapshot.groups], 10**9)
        if built is None:
            return ProgramModel()
        return built.model

    def plan_value(self, snapshot: ClusterSnapshot, virtual_queues: Mapping[str, list[str]],
                   protected: Mapping[str, str] | None = None) -> float:
        """The objective of given virtual queues, scored exactly as `solve` scores its plans."""
        tick = Tick(self, snapshot)
        return tick.score(Decision({k: list(v) for k, v in virtual_queues.items()}, dict(protected or {}))).primary
