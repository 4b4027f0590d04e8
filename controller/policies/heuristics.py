"""Baseline policies: an order over groups plus one greedy list scheduler.

Each baseline differs only in the key it sorts groups by; `list_schedule` then
places groups, in that order, on the worker where they would start soonest
(counting a model swap when the worker's last queued model differs).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable

from qlmserve.controller.estimator import group_slot_time, running_backlog, to_wall
from qlmserve.controller.policies.base import SchedulingPolicy
from qlmserve.controller.policies.registry import register
from qlmserve.controller.snapshot import ClusterSnapshot, GroupState, WorkerState
from qlmserve.operations.plan import Plan


def list_schedule(snapshot: ClusterSnapshot, order: Iterable[GroupState], *, model_aware: bool = True,
                  sticky: bool = True) -> dict[str, list[str]]:
    """Place groups in the given order, each on the worker with the earliest estimated start.

    model_aware: a group prefers workers whose active (or last queued) model matches it,
        paying a model-load estimate otherwise (vLLM/TGI per-model deployments behave so).
        When False, the group goes to the worker that frees first, whatever it has loaded.
    sticky: a group already queued on a healthy worker stays there (no load balancing).
    """
    workers = [w for w in snapshot.workers if w.accepts_work]
    queues: dict[str, list[str]] = {w.worker_id: [] for w in workers}
    if not workers:
        return queues
    busy_until = {w.worker_id: to_wall(running_backlog(snapshot, w), w).mean_s for w in workers}
    last_model = {w.worker_id: w.loading_model or w.active_model for w in workers}
    by_id = {w.worker_id: w for w in workers}

    def start_cost(w: WorkerState, g: GroupState, count_swap: bool = True) -> float:
        t = busy_until[w.worker_id]
        if last_model[w.worker_id] != g.model and count_swap:
            warm = g.model in w.warm_models
            t += w.profile.model_load_time(snapshot.model_bytes.get(g.model, 0), warm)
        return t

    for g in order:
        if sticky and g.worker_id in queues:
            w = by_id[g.worker_id]
        else:
            w = min(workers, key=lambda w: (start_cost(w, g, count_swap=model_aware), w.worker_id))
        start = start_cost(w, g)
        busy_until[w.worker_id] = start + to_wall(group_slot_time(snapshot, w, g), w).mean_s
        last_model[w.worker_id] = g.model
        queues[w.worker_id].append(g.group_id)
    return queues


class OrderPolicy(SchedulingPolicy):
    """A baseline defined by a sort key over groups."""

    model_aware: bool = True

    def key(self, snapshot: ClusterSnapshot) -> Callable[[GroupState], tuple]:
        raise NotImplementedError

    def solve(self, snapshot: ClusterSnapshot) -> Plan:
        t0 = time.perf_counter()
        order = sorted(snapshot.groups, key=self.key(snapshot))
        queues = list_schedule(snapshot, order, model_aware=self.model_aware,
                               sticky=not self.operation_enabled("load_balance"))
        return Plan(virtual_queues=queues, source=self.name, solve_time_s=time.perf_counter() - t0)




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
