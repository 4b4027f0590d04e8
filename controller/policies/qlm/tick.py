"""What one solve computes once from the snapshot and every stage reads: the estimator,
the value of each group, where groups could start, and the exact score of a decision."""

from __future__ import annotations

from functools import cached_property
from typing import TYPE_CHECKING

from qlmserve.controller.estimator import Forecaster, GroupForecast, meets_all
from qlmserve.controller.policies.heuristics import QueueTails
from qlmserve.controller.policies.op_rules import PREEMPTION_MODES, removal_mechanism
from qlmserve.controller.policies.qlm.decision import Decision, Score
from qlmserve.controller.snapshot import ClusterSnapshot, GroupState, WorkerState

if TYPE_CHECKING:
    from qlmserve.controller.policies.qlm.policy import QlmPolicy

class Tick:
    """Everything one solve computes from the snapshot (estimator, values, candidates)."""

    def __init__(self, policy: QlmPolicy, snapshot: ClusterSnapshot) -> None:
        self.policy = policy
        self.cfg = policy.config
        self.snap = snapshot
        self.beta = self.cfg.planner.beta
        self.method = self.cfg.planner.method
        self.fc = Forecaster(snapshot, self.cfg.max_running_per_worker, policy.clock.meter)
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

    def effective_protected(self, d: Decision) -> set[str]:
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
        prot = self.effective_protected(d)
        if like is None:
            return self.score_forecasts(self.fc.evaluate(d.queues, prot, cleared), d.cost)
        other, other_score = like
        o_cleared = {wid for wid, c in other.changes.items() if c.clear is not None}
        o_prot = self.effective_protected(other)
        # In worker order, not a set's: the sums below then add in the same order in every
        # process (a set of strings iterates by the hash seed, and float sums in another
        # order tipped ties between plans: the same seed gave 85.6-87.8% on ls2).
        order = [wid for wid in sorted(set(d.queues) | set(other.queues))
                 if d.queues.get(wid, []) != other.queues.get(wid, [])
                 or (wid in prot) != (wid in o_prot) or (wid in cleared) != (wid in o_cleared)]
        changed = set(order)
        fc = {gid: f for gid, f in other_score.forecasts.items() if f.worker_id not in changed}
        new = self.fc.evaluate({wid: d.queues.get(wid, []) for wid in order}, prot, cleared)
        fc.update(new)
        # Both objectives are sums over groups: move other's by what the changed workers add.
        was = self.score_forecasts({gid: f for gid, f in other_score.forecasts.items() if f.worker_id in changed},
                                    0.0)
        now = self.score_forecasts(new, 0.0)
        return Score(other_score.primary + other.cost + now.primary - was.primary - d.cost,
                     other_score.expected + now.expected - was.expected, fc)

    def score_forecasts(self, fc: dict[str, GroupForecast], cost: float) -> Score:
        self.policy.clock.meter.charge("score_group", len(fc))
        expected = sum(self.value[g] * f.attainment() for g, f in fc.items())
        if self.method == "saa":
            primary = expected - cost
        else:
            primary = sum(self.value[g] for g, ok in zip(fc, meets_all(fc.values(), self.beta)) if ok) - cost
        return Score(primary, expected, fc)

    @cached_property
    def heads(self) -> QueueTails:
        """Every worker with an empty queue: where a group could start at the head."""
        return QueueTails(self.snap, self.fc, self.live)

    def eligible(self, g: GroupState, w: WorkerState) -> bool:
        if not w.can_serve(g.model):
            return False
        if w.kv_capacity_tokens > 0:
            mean_out = self.snap.lengths(g.model, g.slo_class, g.length_band).mean
            if max(g.prompt_tokens) + mean_out > w.kv_capacity_tokens:
                return False
        return True

    def value_rate(self, w: WorkerState) -> float:
        """Objective units per worker-second: the weighted requests it serves in a second."""
        wm = self.fc.workers[w.worker_id]
        item_mean = wm.table.item_mean
        per_request = item_mean * wm.step_s + w.profile.prefill_time(512)
        return wm.slots / max(per_request, 1e-6) * self.value_per_request

    def add_mean(self, gid: str, wid: str) -> float:
        wm = self.fc.workers[wid]
        work = self.fc.groups[gid].work
        return work.tokens * wm.step_s / wm.slots + wm.prefill_s(work)

    def can_clear(self, w: WorkerState) -> bool:
        """Whether the worker's batch may be taken off the device for a model swap now."""
        running = [r for r in w.running if not r.swapped]
        return "model_swap" in self.ops and removal_mechanism(self.cfg, w, running, model_change=True) is not None
