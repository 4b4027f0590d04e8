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

import time
from collections.abc import Callable, Iterable

from qlmserve.controller.estimator import Forecaster
from qlmserve.controller.policies.base import SchedulingPolicy
from qlmserve.controller.policies.op_rules import derive_operations, rule_protection
from qlmserve.controller.policies.registry import register
from qlmserve.controller.snapshot import ClusterSnapshot, GroupState, WorkerState
from qlmserve.operations.plan import Plan


def eligible_workers(snapshot: ClusterSnapshot, workers: list[WorkerState], g: GroupState,
                     allow_swap: bool, queue_model: dict[str, str | None] | None = None) -> list[WorkerState]:
    """Workers that may take group `g`: healthy, able to hold its model, and (without model
    swaps) already on that model or empty. If no worker has the model at all, swaps are
    allowed for it (otherwise it would never run)."""
    can = [w for w in workers if w.can_serve(g.model)] or workers
    if allow_swap:
        return can
    model_of = queue_model or {w.worker_id: w.loading_model or w.active_model for w in workers}
    same = [w for w in can if model_of[w.worker_id] in (None, g.model)]
    return same or can


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
    cursors = {w.worker_id: fc.cursor(w.worker_id) for w in workers}
    by_id = {w.worker_id: w for w in workers}

    def start(w: WorkerState, g: GroupState) -> tuple[float, str]:
        cur = cursors[w.worker_id]
        t = cur.timing(fc.groups[g.group_id]).first if model_aware else cur.free_at()
        return t.mean_s, w.worker_id

    for g in order:
        if g.group_id not in fc.groups:
            continue
        pool = eligible_workers(snapshot, workers, g, allow_swap, {wid: c.model for wid, c in cursors.items()})
        if sticky and g.worker_id in queues and by_id[g.worker_id] in pool:
            w = by_id[g.worker_id]
        else:
            w = min(pool, key=lambda w: start(w, g))
        cursors[w.worker_id].push(fc.groups[g.group_id])
        queues[w.worker_id].append(g.group_id)
    return queues


class OrderPolicy(SchedulingPolicy):
    """A baseline defined by a sort key over groups."""

    model_aware: bool = True

    def key(self, snapshot: ClusterSnapshot) -> Callable[[GroupState], tuple]:
        raise NotImplementedError

    def solve(self, snapshot: ClusterSnapshot) -> Plan:
        t0 = time.perf_counter()
        fc = Forecaster(snapshot, self.config.max_running_per_worker)
        order = sorted(snapshot.groups, key=self.key(snapshot))
        queues = list_schedule(snapshot, order, model_aware=self.model_aware,
                               sticky=not self.operation_enabled("load_balance"),
                               allow_swap=self.operation_enabled("model_swap") or not self.model_aware,
                               forecaster=fc)
        protected = rule_protection(snapshot, self.config, fc, queues)
        ops = derive_operations(snapshot, self.config, fc, queues, protected)
        forecast = fc.evaluate(queues, protected)
        return Plan(virtual_queues=queues, operations=ops, source=self.name,
                    predicted_attainment={gid: f.attainment() for gid, f in forecast.items()},
                    solve_time_s=time.perf_counter() - t0)


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

    def key(self, snapshot):
        return lambda g: (g.deadline, g.group_id)


@register
class PriorityPolicy(OrderPolicy):
    """Strict priority by SLO class, FCFS within a class."""

    name = "priority"

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
