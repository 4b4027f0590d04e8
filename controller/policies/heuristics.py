"""Baseline policies: an order over groups plus one greedy list scheduler.

Each baseline differs only in the key it sorts groups by; `list_schedule` then
places groups, in that order, on the worker where the RWT estimator predicts they
start soonest (a model swap counted where the worker's queue has another model).
With operations enabled the baselines use the same rules as the QLM policy
(op_rules.py): load balancing makes placement non-sticky, model_swap lets a group go
to a worker of another model, preempt/evict/kv_swap protect latency-sensitive groups
that would otherwise miss behind best-effort running work; warm start and swap-in
follow the queues. Each operation's contribution is then visible by switching it off.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import numpy as np

from qlmserve.controller.estimator import Forecaster
from qlmserve.controller.policies.base import SchedulingPolicy
from qlmserve.controller.policies.op_rules import derive_operations, rule_protection
from qlmserve.controller.policies.registry import register
from qlmserve.controller.snapshot import ClusterSnapshot, GroupState, WorkerState
from qlmserve.operations.plan import Plan


class QueueTails:
    """The tail of every worker's virtual queue, and when a group of each model could
    start its first request there (numpy arrays, so picking a worker is one argmin).

    `same[w]`: the next slot at w's tail; `switch[w, m]`: the start of a new block of
    model m after w's tail (its work drained, then the load); inf where w cannot hold m."""

    def __init__(self, snapshot: ClusterSnapshot, fc: Forecaster, workers: list[WorkerState],
                 queues: dict[str, list[str]] | None = None, kv_check: bool = True) -> None:
        self.fc = fc
        self.workers = workers
        self.wids = [w.worker_id for w in workers]
        self.models = sorted({g.model for g in snapshot.groups} | {m for w in workers for m in
                                                                   (w.active_model, w.loading_model) if m})
        self.midx = {m: i for i, m in enumerate(self.models)}
        n, k = len(workers), len(self.models)
        self.cursors = []
        for w in workers:
            cur = fc.cursor(w.worker_id)
            for gid in (queues or {}).get(w.worker_id, []):
                if gid in fc.groups:
                    cur.push(fc.groups[gid])
            self.cursors.append(cur)
        self.serve = np.array([[w.can_serve(m) for m in self.models] for w in workers], dtype=bool).reshape(n, k)
        self.barred = np.where(self.serve, 0.0, np.inf)  # added to a start: inf where w cannot serve m
        self.kv = np.array([w.kv_capacity_tokens if w.kv_capacity_tokens > 0 else np.inf for w in workers])
        self.kv_min = float(self.kv.min()) if n else np.inf
        self.kv_check = kv_check
        self.same = np.empty(n)
        self.switch = np.empty((n, k))
        self.tail_model = np.full(n, -1)
        for i in range(n):
            self._refresh(i)

    def _refresh(self, i: int) -> None:
        cur = self.cursors[i]
        self.same[i] = cur.free_at().mean_s
        self.tail_model[i] = self.midx.get(cur.model, -1) if cur.model is not None else -1
        for m, j in self.midx.items():
            self.switch[i, j] = cur.switch_base(m).mean_s if self.serve[i, j] else np.inf

    def start(self, g: GroupState, model_aware: bool = True) -> np.ndarray:
        """When `g`'s first request could start at each worker's tail (inf: not allowed)."""
        if self.fc.meter is not None:
            self.fc.meter.charge("tail_start")
        j = self.midx[g.model]
        t = np.where(self.tail_model == j, self.same, self.switch[:, j]) if model_aware else self.same
        t = t + self.barred[:, j]
        if self.kv_check:
            need = max(g.prompt_tokens) + self.fc.snapshot.lengths(g.model, g.slo_class, g.length_band).mean
            if need > self.kv_min:
                t[self.kv < need] = np.inf
        return t

    def push(self, i: int, gid: str) -> None:
        self.cursors[i].push(self.fc.groups[gid])
        self._refresh(i)


def eligible_mask(tails: QueueTails, g: GroupState, allow_swap: bool, start: np.ndarray) -> np.ndarray:
    """Workers that may take group `g`: healthy, able to hold it (model, KV), and (without
    model swaps) already on its model or empty. If none is, swaps are allowed for it
    (otherwise it would never run); if no worker can hold it at all, any worker may.
    `start` is tails.start(g), which every caller goes on to use."""
    ok = np.isfinite(start)
    if not ok.any():
        return np.ones(len(tails.wids), dtype=bool)
    if allow_swap:
        return ok
    j = tails.midx[g.model]
    same = ok & ((tails.tail_model == j) | (tails.tail_model == -1))
    return same if same.any() else ok


def list_schedule(snapshot: ClusterSnapshot, order: Iterable[GroupState], *, model_aware: bool = True,
                  sticky: bool = True, allow_swap: bool = True,
                  forecaster: Forecaster | None = None) -> dict[str, list[str]]:
    """Place groups in the given order, each on the worker with the earliest estimated start.

    model_aware: a group's start on a worker counts the model swap it would cause there
        (vLLM/TGI per-model deployments behave so). When False, the group goes to the
        worker that frees first, whatever it has loaded (model-oblivious).
    sticky: a group already queued on a healthy worker stays there (no load balancing).
    allow_swap: a group may go to a worker whose queue runs another model.
    """
    fc = forecaster or Forecaster(snapshot)
    workers = [w for w in snapshot.workers if w.accepts_work]
    queues: dict[str, list[str]] = {w.worker_id: [] for w in workers}
    if not workers:
        return queues
    tails = QueueTails(snapshot, fc, workers)
    index = {wid: i for i, wid in enumerate(tails.wids)}
    for g in order:
        if g.group_id not in fc.groups:
            continue
        start = tails.start(g)
        ok = eligible_mask(tails, g, allow_swap, start)
        if sticky and g.worker_id in index and ok[index[g.worker_id]]:
            i = index[g.worker_id]
        else:
            t = np.where(ok, start if model_aware else tails.start(g, False), np.inf)
            if not np.isfinite(t).any():
                t = np.where(ok, tails.same, np.inf)
            i = int(np.argmin(t))
        tails.push(i, g.group_id)
        queues[tails.wids[i]].append(g.group_id)
    return queues


class OrderPolicy(SchedulingPolicy):
    """A baseline defined by a sort key over groups."""

    model_aware: bool = True
    # Whether this order puts latency-sensitive groups first, so that dispatch may give
    # their requests room on any worker before best-effort work (Plan.latency_sensitive_first).
    latency_sensitive_first: bool = False

    def key(self, snapshot: ClusterSnapshot) -> Callable[[GroupState], tuple]:
        raise NotImplementedError

    def solve(self, snapshot: ClusterSnapshot) -> Plan:
        t0 = self.clock.now()
        self.charge_bookkeeping(snapshot)
        fc = Forecaster(snapshot, self.config.max_running_per_worker, self.clock.meter)
        order = sorted(snapshot.groups, key=self.key(snapshot))
        queues = list_schedule(snapshot, order, model_aware=self.model_aware,
                               sticky=not self.operation_enabled("load_balance"),
                               allow_swap=self.operation_enabled("model_swap") or not self.model_aware,
                               forecaster=fc)
        protected = rule_protection(snapshot, self.config, fc, queues)
        ops = derive_operations(snapshot, self.config, fc, queues, protected)
        forecast = fc.evaluate(queues, protected)
        return Plan(virtual_queues=queues, operations=ops, source=self.name,
                    latency_sensitive_first=self.latency_sensitive_first,
                    predicted_attainment={gid: f.attainment() for gid, f in forecast.items()},
                    solve_time_s=self.clock.now() - t0)


@register
class FcfsPolicy(OrderPolicy):
    """Model-aware FCFS: groups in arrival order; a worker keeps serving its loaded model."""

    name = "fcfs"

    def key(self, snapshot):
        return lambda g: (min(g.arrivals), g.group_id)


@register
class FcfsObliviousPolicy(FcfsPolicy):
    """Model-oblivious FCFS: the head of the queue goes to the worker that frees first,
    swapping its model if needed."""

    name = "fcfs-oblivious"
    model_aware = False


@register
class EdfPolicy(OrderPolicy):
    """Earliest deadline first over groups (the default of QLM's released code)."""

    name = "edf"
    latency_sensitive_first = True  # their deadlines come first

    def key(self, snapshot):
        return lambda g: (g.deadline, g.group_id)


@register
class PriorityPolicy(OrderPolicy):
    """Strict priority by SLO class, FCFS within a class."""

    name = "priority"
    latency_sensitive_first = True

    def key(self, snapshot):
        return lambda g: (-g.priority, min(g.arrivals), g.group_id)


@register
class SjfAgingPolicy(OrderPolicy):
    """Shortest job first by prompt length, with priority aging: a group whose oldest
    request has waited past `planner.aging_s` is promoted ahead of all unaged ones
    (multi-layer MoE scheduling paper, request level)."""

    name = "sjf"

    def key(self, snapshot):
        aging = self.config.planner.aging_s
        now = snapshot.now

        def k(g: GroupState) -> tuple:
            aged = now - min(g.arrivals) >= aging
            return (0 if aged else 1, min(g.arrivals) if aged else g.total_prompt_tokens / g.size, g.group_id)

        return k
