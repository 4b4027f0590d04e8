"""The discrete-event simulator: the controller's tick on simulated workers.

Each tick does what controller/core.py does against Redis, here against memory:

    snapshot = self._snapshot(now)            # groups + worker states (ClusterSnapshot)
    plan = self.scheduler.solve(snapshot)     # the registered policy, unchanged
    self._apply(plan, snapshot)               # operations, then controller/dispatch.py

Requests join groups with controller/grouping.py's `choose_group` (qlmserve/sim/waiting.py
keeps the groups and their views as they change); finished requests
feed the learned output-length distribution the RWT estimator reads; a request at risk
(latency-sensitive, or a TTFT target under ten ticks) wakes the tick at once, as in the
controller. Time is the `EventClock`'s. The planner runs on a WorkSolveClock
(controller/solve_budget.py): its budget is modelled work, the same on any machine, and
each plan takes effect once its modelled solve time has passed on the simulated clock,
as a controller's plan does once its tick ends; the next regular tick starts a tick
interval after that. So a seed gives the same result on any machine, under any load.
With `charge_solve_time` the planner runs on the wall clock instead and its measured time
is charged (the old mode, which depends on the machine). The wall clock is read only to
report how long the run and the planner took.
"""

from __future__ import annotations

import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from qlmserve.controller.cluster_view import (
    ClusterView,
    RequestView,
    StateCache,
    WorkerView,
    build_snapshot,
    learned_lengths,
    missed_while_waiting,
    without,
)
from qlmserve.controller.dispatch import dispatch
from qlmserve.controller.estimator import LengthLearner, RecentMoments
from qlmserve.controller.estimator.service_model import reset_table_cache
from qlmserve.controller.length_band import LengthKey, length_band
from qlmserve.controller.policies import SchedulingPolicy, create_policy
from qlmserve.controller.policy import PolicyConfig
from qlmserve.controller.snapshot import ClusterSnapshot, LengthStats, WorkerState
from qlmserve.controller.solve_budget import SolveClock, WallSolveClock, WorkSolveClock
from qlmserve.operations.ops import OPS_BY_POLICY_NAME, MoveGroup, Operation
from qlmserve.operations.plan import Plan
from qlmserve.operations.prefix_cache import PrefixReport
from qlmserve.sim.clock import EventClock, Timer
from qlmserve.sim.fleet import Fleet
from qlmserve.sim.metrics import SimResult
from qlmserve.sim.request import SimRequest, SimStatus
from qlmserve.sim.waiting import WaitingGroups
from qlmserve.sim.worker import SimWorker
from qlmserve.traces import WorkloadRequest

PlanObserver = Callable[["Simulation", ClusterSnapshot, Plan], None]


@dataclass
class SimOptions:
    tick_interval_s: float | None = None  # default: the policy's tick_interval_ms
    wake_on_urgent: bool = True  # tick at once when a request at risk arrives (as the controller does)
    # Plan on the wall clock and charge the planner's measured time (depends on the machine
    # and its load); default: modelled work on a WorkSolveClock, charged (deterministic).
    charge_solve_time: bool = False
    drain_s: float | None = None  # stop this long after the last arrival; None: when all have finished
    max_prefill_tokens: int | None = None  # prompt tokens one iteration may prefill; default: the policy's
    max_tokens: int | None = None  # max_tokens a client asks for; default: the model's context left
    state_refresh_s: float = 0.5  # token counts of an unchanged worker, and length stats, refresh this often
    wake_min_gap_s: float = 0.05  # a wake-up tick follows the previous tick no sooner than this
    probe_times: Sequence[float] = ()  # record tokens produced by these times (SimResult.tokens_at)
    observers: Sequence[PlanObserver] = ()
    progress: Callable[[float, int, int], None] | None = None  # (sim time, finished, total) each tick


class _Lengths:
    """The estimator's LengthLearner, fed with every finished request. Snapshots read its
    stats (old observations forgotten by RecentMoments, running requests counted as
    censored lengths) once per `refresh_s`: one more token moves them by a hair, and
    keeping the same dict between refreshes lets a policy cache what it derives from them."""

    def __init__(self, cfg: PolicyConfig, refresh_s: float) -> None:
        self.cfg = cfg
        self.learner = LengthLearner(cfg)
        self.recent = RecentMoments(cfg.planner.length_half_life_s)
        self.refresh_s = refresh_s
        self._cache: dict[LengthKey, LengthStats] | None = None
        self._read_at = -1e18

    def observe(self, model: str, slo_class: str, band: int, tokens: int) -> None:
        self.learner.observe(model, slo_class, tokens, band)

    def stats(self, now: float, workers: Iterable[WorkerState]) -> dict[LengthKey, LengthStats]:
        if self._cache is None or now - self._read_at >= self.refresh_s:
            self._cache = learned_lengths(self.cfg, self.recent.update(now, self.learner.state()),
                                          [r for w in workers for r in w.running])
            self._read_at = now
        return self._cache


class Simulation:
    """Replays a workload through a policy on a simulated fleet. `run()` once."""

    def __init__(self, policy: PolicyConfig, fleet: Fleet, workload: Sequence[WorkloadRequest], *,
                 policy_name: str | None = None, options: SimOptions | None = None,
                 scheduler: SchedulingPolicy | None = None) -> None:
        """`policy_name` (default: the policy file's) picks a registered policy; `scheduler`
        injects a policy object instead (tests, the simulator's own scale check)."""
        self.cfg = policy
        self.fleet = fleet
        self.options = options or SimOptions()
        self.solve_clock: SolveClock = WallSolveClock() if self.options.charge_solve_time else WorkSolveClock()
        if scheduler is not None:
            self.scheduler = scheduler
            self.scheduler.clock = self.solve_clock
            self.policy_name = scheduler.name
        else:
            self.policy_name = policy_name or policy.planner.policy
            self.scheduler = create_policy(self.policy_name, policy, self.solve_clock)
        self.clock = EventClock()
        self.tick_s = self.options.tick_interval_s or policy.tick_interval_ms / 1000.0
        self.workers: dict[str, SimWorker] = {
            spec.worker_id: SimWorker(spec, self.clock, self,
                                      max_prefill_tokens=self.options.max_prefill_tokens or policy.max_prefill_tokens)
            for spec in fleet.workers
        }
        self.model_bytes = {m: (policy.models[m].weight_bytes if m in policy.models and
                                policy.models[m].weight_bytes else b)
                            for m, b in fleet.model_bytes().items()}
        self.allowed_kinds = {k for name in policy.planner.operations for k in OPS_BY_POLICY_NAME[name]}
        self.requests = self._make_requests(workload)
        self.by_id = {r.rid: r for r in self.requests}
        self.waiting = WaitingGroups(policy)  # the waiting groups and their views (qlmserve/sim/waiting.py)
        self.lengths = _Lengths(policy, self.options.state_refresh_s)
        self.last_plan = Plan.make_empty()
        self._positions: dict[str, tuple[str, int]] = {}
        self._worker_cache: dict[str, tuple[tuple, WorkerView]] = {}
        self._states = StateCache()  # states of unchanged views, reused (controller/cluster_view.py)
        self._next_arrival = 0
        self._finished = 0
        self._wake_pending = False
        self._last_tick_at = -1.0
        self._stop_at: float | None = None
        # results
        self.solve_times: list[float] = []  # wall seconds of each solve (reporting only)
        self.solve_model_s: list[float] = []  # each solve's time on the solve clock (charged)
        self._busy_until = 0.0  # the last tick's plan takes effect then (its solve time charged)
        self._regular_timer: Timer | None = None
        self.plan_sources: Counter[str] = Counter()
        self.ops_applied: Counter[str] = Counter()
        self.ops_rejected: Counter[str] = Counter()
        self.ops_failed: Counter[str] = Counter()
        self.requeued: Counter[str] = Counter()
        self.group_first_dispatch: dict[str, float] = {}
        self.tokens_at: dict[float, int] = {}
        self._solved_plan: Plan | None = None
        self.kept_ticks = 0  # ticks where the policy kept its last plan (needs_replan said no)
        self.planner_wall_s = 0.0  # wall seconds in the policy (solves and needs_replan checks)
        self.ticks = 0

    # ---- set-up ----------------------------------------------------------------------------

    def _make_requests(self, workload: Sequence[WorkloadRequest]) -> list[SimRequest]:
        served = {m for w in self.fleet.workers for m in w.models}
        ctx = self.fleet.max_context()
        out = []
        for w in sorted(workload, key=lambda r: (r.arrival, r.request_id)):
            if w.slo_class not in self.cfg.slo_classes:
                raise ValueError(f"request {w.request_id}: class {w.slo_class!r} is not in the policy "
                                 f"({sorted(self.cfg.slo_classes)})")
            if w.model not in served:
                raise ValueError(f"request {w.request_id}: no worker of the fleet serves {w.model!r} "
                                 f"(fleet models: {sorted(served)})")
            slo = self.cfg.slo_classes[w.slo_class]
            limit = ctx[w.model] - w.prompt_tokens
            if self.options.max_tokens is not None:
                limit = min(limit, self.options.max_tokens)
            if slo.admission.max_tokens is not None:
                limit = min(limit, slo.admission.max_tokens)
            out.append(SimRequest(
                rid=w.request_id, model=w.model, slo_class=w.slo_class, group_id="",
                prompt_tokens=w.prompt_tokens, output_tokens=max(1, min(w.output_tokens, max(1, limit))),
                max_tokens=max(1, limit), arrival=w.arrival, ttft_s=slo.ttft_s, tpot_s=slo.tpot_s,
                latency_sensitive=slo.latency_sensitive, priority=slo.priority, user_id=w.user_id,
                session=w.prefix_id or w.user_id, hash_ids=w.hash_ids,
                length_band=length_band(w.prompt_tokens, self.cfg.grouping.length_bands_per_octave,
                                        slo.latency_sensitive)))
        return out

    # ---- the run -------------------------------------------------------------------------------

    def run(self) -> SimResult:
        wall0 = time.perf_counter()
        reset_table_cache()  # the run's table builds are charged: the same whatever ran before
        if self.requests:
            self.clock.call_at(self.requests[0].arrival, self._on_arrival)
            last = self.requests[-1].arrival
            if self.options.drain_s is not None:
                self._stop_at = last + self.options.drain_s
        self._regular_timer = self.clock.call_at(0.0, self._regular_tick)
        for t in self.options.probe_times:
            self.clock.call_at(t, lambda t=t: self._probe(t))
        while self._finished < len(self.requests):
            nxt = self.clock.peek()
            if nxt is None:
                break
            if self._stop_at is not None and nxt > self._stop_at:
                self.clock.advance_to(self._stop_at)
                break
            self.clock.run_next()
        end = self.clock.now()
        return SimResult(
            policy=self.policy_name, requests=self.requests, end_time=end,
            last_arrival=self.requests[-1].arrival if self.requests else 0.0,
            solve_times=self.solve_times, plan_sources=dict(self.plan_sources),
            ops_applied=dict(self.ops_applied), ops_rejected=dict(self.ops_rejected),
            ops_failed=dict(self.ops_failed), requeued=dict(self.requeued), ticks=self.ticks,
            wall_s=time.perf_counter() - wall0, workers=len(self.workers),
            worker_counters={wid: w.counters for wid, w in self.workers.items()},
            in_flight_tokens=sum(sum(w.progress(end).values()) for w in self.workers.values()),
            tokens_at=dict(self.tokens_at), kept_ticks=self.kept_ticks, planner_wall_s=self.planner_wall_s,
            solve_model_s=self.solve_model_s, solve_clock="wall" if self.options.charge_solve_time else "modelled",
        )

    def _probe(self, t: float) -> None:
        self.tokens_at[t] = sum(r.generated for r in self.requests) + sum(
            sum(w.progress(t).values()) for w in self.workers.values())

    def _on_arrival(self) -> None:
        now = self.clock.now()
        urgent = False
        while self._next_arrival < len(self.requests) and self.requests[self._next_arrival].arrival <= now:
            r = self.requests[self._next_arrival]
            self._next_arrival += 1
            self.waiting.join(r, now)
            slo = self.cfg.slo_classes[r.slo_class]
            if slo.latency_sensitive or slo.ttft_s <= self.tick_s * 10:
                urgent = True
        if self._next_arrival < len(self.requests):
            self.clock.call_at(self.requests[self._next_arrival].arrival, self._on_arrival)
        if urgent and self.options.wake_on_urgent and not self._wake_pending:
            # The controller plans at once for a request at risk, but one tick at a time:
            # wake-ups coalesce within `wake_min_gap_s` of the previous tick.
            self._wake_pending = True
            self.clock.call_at(max(now, self._busy_until + self.options.wake_min_gap_s), self._wake_tick)

    def _regular_tick(self) -> None:
        self._regular_timer = None
        self._run_tick()

    def _wake_tick(self) -> None:
        self._wake_pending = False
        if self.clock.now() - self._last_tick_at >= self.options.wake_min_gap_s - 1e-9:
            self._run_tick()  # else a regular tick ran meanwhile and planned for this arrival

    def _run_tick(self) -> None:
        """A tick, as the controller's loop runs them: one at a time (a tick that starts
        while the last one's solve is still charged waits for it), and the regular timer
        restarts from the end of every tick."""
        now = self.clock.now()
        if now < self._busy_until - 1e-12:
            if self._regular_timer is None:
                self._regular_timer = self.clock.call_at(self._busy_until, self._regular_tick)
            return
        self._tick()
        if self._finished < len(self.requests):
            if self._regular_timer is not None:
                self._regular_timer.cancel()
            self._regular_timer = self.clock.call_at(self._busy_until + self.tick_s, self._regular_tick)

    def _tick(self) -> None:
        now = self.clock.now()
        if now == self._last_tick_at:
            return  # one plan per instant
        self._last_tick_at = now
        self.ticks += 1
        snap = self._snapshot(now)
        cost = 0.0
        if not snap.groups and not any(w.running for w in snap.workers):
            plan = Plan(source="idle")
        else:
            t0 = time.perf_counter()
            # A kept plan's queues are dispatched again, its operations not (SchedulingPolicy.next_plan).
            plan, solved = self.scheduler.next_plan(snap, self._solved_plan)
            wall = time.perf_counter() - t0
            cost = plan.solve_time_s  # on the solve clock: modelled, or wall under charge_solve_time
            if solved:
                self._solved_plan = plan
                self.solve_times.append(wall)
                self.solve_model_s.append(cost)
            else:
                self.kept_ticks += 1
            self.planner_wall_s += wall
        self.plan_sources[plan.source] += 1
        for obs in self.options.observers:
            obs(self, snap, plan)
        self._busy_until = now + cost
        if cost > 0:
            self.clock.call_at(self._busy_until, lambda: self._apply(plan, snap))
        else:
            self._apply(plan, snap)
        if self.options.progress is not None:
            self.options.progress(now, self._finished, len(self.requests))

    # ---- snapshot ----------------------------------------------------------------------------

    def _snapshot(self, now: float) -> ClusterSnapshot:
        """The controller's snapshot rules (controller/cluster_view.py) over this fleet's view.
        Views of unchanged groups and workers are kept, so their states are reused."""
        self._states.discard(self.waiting.forget_empty())
        view = ClusterView(now=now, groups=self.waiting.views(),
                           workers=tuple(self._worker_view(w, now) for w in self.workers.values()),
                           model_bytes=self.model_bytes)
        missed = missed_while_waiting(view, self.cfg)
        for rv in missed:  # a class that fails fast: the controller's rule, applied here
            r = self.by_id[rv.request_id]
            self.waiting.remove(r)
            r.status, r.failed, r.finished_at = SimStatus.FINISHED, True, now
            self._finished += 1
        view = without(view, {rv.request_id for rv in missed})
        workers = [self._states.worker(w, self.cfg, self.model_bytes) for w in view.workers]
        return build_snapshot(view, self.cfg, self._positions, self.lengths.stats(now, workers), self._states)

    def _worker_view(self, w: SimWorker, now: float) -> WorkerView:
        # A worker's view is rebuilt when it changed (a request joined, finished, an
        # operation ran) or, for the token counts of a long decode stretch, once per
        # `state_refresh_s`, the cadence of a real worker's heartbeat.
        cached = self._worker_cache.get(w.worker_id)
        ready = w.warm_ready(now)
        if cached is not None:
            (version, warm, built_at), wv = cached
            if version == w.version and warm == ready and now - built_at < self.options.state_refresh_s:
                return wv
        prog = w.progress(now)

        def rv(r: SimRequest, extra: int = 0, swapped: bool = False) -> RequestView:
            return RequestView(r.rid, r.group_id, r.model, r.slo_class, r.arrival, r.prompt_tokens, r.max_tokens,
                               r.generated + extra, r.first_token_at, swapped, r.ttft_s, r.latency_sensitive,
                               r.hash_ids, r.session, r.length_band)

        running = [rv(r, prog.get(id(r), 0)) for r in w.running]
        running += [rv(r) for r in w.joining]
        running += [rv(r, swapped=True) for r in w.swapped.values()]
        spec = w.spec
        wv = WorkerView(
            worker_id=w.worker_id, healthy=True, draining=False, gpu=spec.gpu, active_model=w.active_model,
            loading_model=w.loading_model, warm_models=ready, kv_capacity_tokens=w.kv_capacity,
            kv_used_tokens=w.kv_used + sum(prog.values()), engine_max_batch=spec.max_batch_size, profile=w.profile,
            preemption_mode=w.mode, servable_models=frozenset(spec.models), host_ram_bytes=spec.host_ram_bytes,
            host_kv_capacity_tokens=spec.host_kv_tokens, host_kv_used_tokens=w.host_kv_used, running=tuple(running),
            max_prefill_tokens=w.max_prefill_tokens,
            prefix=PrefixReport(w.prefix.block_tokens, w.prefix.summary(self.cfg.dispatch.max_reported_blocks),
                                w.queued_prefill_tokens()))
        self._worker_cache[w.worker_id] = ((w.version, ready, now), wv)
        return wv

    # ---- applying a plan ---------------------------------------------------------------------

    def _apply(self, plan: Plan, snap: ClusterSnapshot) -> None:
        now = self.clock.now()
        self.last_plan = plan
        self._positions = plan.placement()
        touched: set[str] = set()
        for op in plan.operations:
            if op.kind not in self.allowed_kinds:
                self.ops_rejected[op.kind.value] += 1
                continue
            self._route(op, now, touched)
        assignments, mechanism_ops = dispatch(plan, snap, self.cfg.max_running_per_worker,
                                               may_preempt="preempt" in self.cfg.planner.operations)
        for op in mechanism_ops:
            self._route(op, now, touched)
        by_worker: dict[str, list[SimRequest]] = defaultdict(list)
        for a in assignments:
            r = self.by_id.get(a.request_id)
            if r is None or a.group_id not in self.waiting.groups or r.status != SimStatus.WAITING \
                    or r.group_id != a.group_id:
                continue  # taken or requeued since the snapshot
            w = self.workers.get(a.worker_id)
            if w is None or r.model != (w.loading_model or w.active_model):
                continue
            self.waiting.remove(r)
            self.group_first_dispatch.setdefault(a.group_id, now)
            by_worker[a.worker_id].append(r)
        for wid, reqs in by_worker.items():
            self.workers[wid].assign(reqs, now)
            touched.add(wid)
        for wid in sorted(touched):
            self.workers[wid].poke(now)

    def _route(self, op: Operation, now: float, touched: set[str]) -> None:
        if isinstance(op, MoveGroup):
            self.ops_applied[op.kind.value] += 1  # the virtual queues carry it out
            return
        w = self.workers.get(op.worker_id)
        if w is None:
            self.ops_failed[op.kind.value] += 1
            return
        if w.submit_op(op, now):
            self.ops_applied[op.kind.value] += 1
            touched.add(w.worker_id)
        else:
            self.ops_failed[op.kind.value] += 1

    # ---- worker callbacks ----------------------------------------------------------------------

    def on_finished(self, req: SimRequest, now: float) -> None:
        self._finished += 1
        self.lengths.observe(req.model, req.slo_class, req.length_band, req.output_tokens)

    def on_requeue(self, req: SimRequest, now: float, reason: str) -> None:
        self.requeued[reason] += 1
        self.waiting.requeue(req)

    def on_worker_changed(self, worker: SimWorker) -> None:
        pass  # snapshots compare worker versions
