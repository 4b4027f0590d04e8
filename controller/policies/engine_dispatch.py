"""Engine-level dispatch: which worker a group goes to, by load, cache and session.

Three policies that differ only in how they pick a worker for a new group (groups are
taken in arrival order; a group already queued on a healthy worker of its model stays
there, so a plan never churns; a worker of the group's model is preferred, any worker
that can hold it otherwise):

  round-robin   the next worker in turn (vLLM's and most routers' default);
  least-loaded  the worker with the fewest requests outstanding (running, handed over,
                queued to it in this plan), ties to the smaller prefill backlog;
  load-aware    the cheapest worker, where a group's cost on a worker is, in prefill
                seconds (tokens x the worker's per-token prefill time):
                  queued prefill there (its report, net of its cache hits)
                  + prefill of groups placed there earlier in this plan
                  + KV use past `dispatch.kv_saturation` of its capacity (token for token)
                  + the group's own prompt tokens - the prefill its cached prefixes save
                    (controller/prefix_affinity.py: the worker's reported block ids, and
                    the blocks of groups placed there earlier in this plan),
                plus a decode step of the worker's outstanding requests for each
                iteration that prefill takes (an iteration prefills at most the worker's
                max_prefill_tokens beside one decode step: operations/batching.py);
                a group whose session a worker served last goes back to it while that
                worker's cost is within `dispatch.sticky_slack_tokens` of the cheapest
                (the multi-layer MoE scheduling paper's engine level).

The plan carries the RWT estimator's predicted attainment, with prefill net of cached
prefixes (Forecaster.work_on). These policies plan no operations: they measure
dispatch alone; controller/dispatch.py still loads a model where a queue needs one.
"""

from __future__ import annotations

from collections.abc import Callable

from qlmserve.controller.estimator import Forecaster
from qlmserve.controller.policies.base import SchedulingPolicy
from qlmserve.controller.policies.registry import register
from qlmserve.controller.policy import PolicyConfig
from qlmserve.controller.prefix_affinity import SessionMemory, queued_prefill, saved_prefill
from qlmserve.controller.snapshot import ClusterSnapshot, GroupState, WorkerState
from qlmserve.controller.solve_budget import SolveClock
from qlmserve.operations.plan import Plan


class _Load:
    """What this plan has put on each worker so far."""

    def __init__(self, workers: list[WorkerState]) -> None:
        self.requests = {w.worker_id: w.active for w in workers}
        self.prefill = {w.worker_id: float(queued_prefill(w)) for w in workers}
        self.kv = {w.worker_id: float(w.kv_used_tokens) for w in workers}
        self.blocks: dict[str, set[int]] = {w.worker_id: set() for w in workers}

    def add(self, g: GroupState, w: WorkerState, prefill: float) -> None:
        wid = w.worker_id
        self.requests[wid] += g.size
        self.prefill[wid] += prefill
        self.kv[wid] += g.total_prompt_tokens
        for b in g.prefix_blocks:
            self.blocks[wid].update(b)


class DispatchPolicy(SchedulingPolicy):
    """Place groups in arrival order with `pick` (see the module doc)."""

    def __init__(self, config: PolicyConfig, clock: SolveClock | None = None) -> None:
        super().__init__(config, clock)
        self.sessions = SessionMemory(config.dispatch.max_sessions)

    def pick(self, g: GroupState, candidates: list[WorkerState], load: _Load) -> WorkerState:
        raise NotImplementedError

    def group_order(self, snapshot: ClusterSnapshot) -> Callable[[GroupState], tuple]:
        return lambda g: (min(g.arrivals), g.group_id)

    def own_prefill(self, g: GroupState, w: WorkerState, load: _Load) -> float:
        return float(g.total_prompt_tokens - saved_prefill(g, w, load.blocks[w.worker_id]))

    def solve(self, snapshot: ClusterSnapshot) -> Plan:
        t0 = self.clock.now()
        self.charge_bookkeeping(snapshot)
        self.sessions.learn(snapshot)
        workers = [w for w in snapshot.workers if w.accepts_work]
        queues: dict[str, list[str]] = {w.worker_id: [] for w in workers}
        load = _Load(workers)
        by_id = {w.worker_id: w for w in workers}
        for g in sorted(snapshot.groups, key=self.group_order(snapshot)):
            same = [w for w in workers if (w.loading_model or w.active_model) == g.model]
            cands = same or [w for w in workers if w.can_serve(g.model)] or workers
            if not cands:
                break
            placed = by_id.get(g.worker_id) if g.worker_id else None
            w = placed if placed is not None and any(c is placed for c in cands) else self.pick(g, cands, load)
            queues[w.worker_id].append(g.group_id)
            load.add(g, w, self.own_prefill(g, w, load))
            for s in g.sessions:
                if s:
                    self.sessions.remember(s, w.worker_id)
        fc = Forecaster(snapshot, self.config.max_running_per_worker, self.clock.meter)
        forecast = fc.evaluate(queues)
        return Plan(virtual_queues=queues, source=self.name,
                    predicted_attainment={gid: f.attainment() for gid, f in forecast.items()},
                    solve_time_s=self.clock.now() - t0)


@register
class RoundRobinPolicy(DispatchPolicy):
    name = "round-robin"

    def __init__(self, config: PolicyConfig, clock: SolveClock | None = None) -> None:
        super().__init__(config, clock)
        self._turn = 0

    def pick(self, g, candidates, load):
        w = candidates[self._turn % len(candidates)]
        self._turn += 1
        return w


@register
class LeastLoadedPolicy(DispatchPolicy):
    name = "least-loaded"

    def pick(self, g, candidates, load):
        return min(candidates, key=lambda w: (load.requests[w.worker_id], load.prefill[w.worker_id], w.worker_id))


@register
class LoadAwarePolicy(DispatchPolicy):
    name = "load-aware"

    def cost(self, g: GroupState, w: WorkerState, load: _Load) -> float:
        """Seconds of prefill ahead of and in `g` on `w` (module doc)."""
        wid = w.worker_id
        cap = w.kv_capacity_tokens
        kv_over = max(0.0, load.kv[wid] - self.config.dispatch.kv_saturation * cap) if cap > 0 else 0.0
        tokens = load.prefill[wid] + kv_over + self.own_prefill(g, w, load)
        # Each iteration of that prefill also runs a decode step of the worker's batch.
        iterations = -(-tokens // max(1, w.max_prefill_tokens))
        step = w.profile.decode_step_time(load.requests[wid], int(load.kv[wid])) if load.requests[wid] else 0.0
        return tokens * w.profile.prefill_per_token_s + iterations * step

    def pick(self, g, candidates, load):
        costs = {w.worker_id: self.cost(g, w, load) for w in candidates}
        best = min(candidates, key=lambda w: (costs[w.worker_id], w.worker_id))
        home = self.sessions.worker_of(g.sessions)
        for w in candidates:
            if w.worker_id == home:
                slack = self.config.dispatch.sticky_slack_tokens * w.profile.prefill_per_token_s
                if costs[home] <= costs[best.worker_id] + slack:
                    return w
        return best
