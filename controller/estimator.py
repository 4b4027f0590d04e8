"""Request waiting time (RWT) estimation.

A worker serves up to `max_batch_size` sequences at once (continuous batching). A
request waits until the work ahead of it in its worker's virtual queue has freed a
slot. Output lengths are random; the work ahead is a sum of many of them, close to
normal by the central limit theorem, so a wait has a mean and a variance.
"""

from __future__ import annotations

from dataclasses import dataclass

from qlmserve.controller.snapshot import ClusterSnapshot, GroupState, WorkerState


@dataclass(frozen=True)
class WaitEstimate:
    mean_s: float
    var_s2: float

    @property
    def std_s(self) -> float:
        return self.var_s2**0.5

    def quantile(self, beta: float) -> float:
        """The beta-quantile of the (normal, by the CLT) waiting time, floored at zero."""
        from statistics import NormalDist

        if self.var_s2 <= 0:
            return max(0.0, self.mean_s)
        return max(0.0, NormalDist(self.mean_s, self.std_s).inv_cdf(beta))

    def __add__(self, other: WaitEstimate) -> WaitEstimate:
        return WaitEstimate(self.mean_s + other.mean_s, self.var_s2 + other.var_s2)


ZERO = WaitEstimate(0.0, 0.0)


def slot_time(snapshot: ClusterSnapshot, worker: WorkerState, model: str, slo_class: str,
              prompt_tokens: float) -> WaitEstimate:
    """Time one request holds a batch slot on `worker`: prefill plus its decode steps at a
    full batch. Mean and variance come from the learned output-length distribution."""
    stats = snapshot.lengths(model, slo_class)
    batch = max(1, worker.max_batch_size)
    step = worker.profile.decode_step_time(batch)
    mean = worker.profile.prefill_time(int(prompt_tokens)) + stats.mean * step
    return WaitEstimate(mean, stats.var * step * step)


def running_backlog(snapshot: ClusterSnapshot, worker: WorkerState) -> WaitEstimate:
    """Remaining slot-time of what the worker already runs, in aggregate slot-seconds."""
    total = ZERO
    batch = max(1, worker.max_batch_size)
    step = worker.profile.decode_step_time(batch)
    for r in worker.running:
        stats = snapshot.lengths(r.model, r.slo_class)
        # Conditional on having produced `generated_tokens` already, the remaining length is
        # at least 1 and (for a heavy tail) close to the unconditional mean; cap by max_tokens.
        remaining = max(1.0, min(stats.mean, r.max_tokens - r.generated_tokens))
        total = total + WaitEstimate(remaining * step, stats.var * step * step)
    return total


def group_slot_time(snapshot: ClusterSnapshot, worker: WorkerState, group: GroupState) -> WaitEstimate:
    """Aggregate slot-seconds all requests of a group need on `worker`."""
    total = ZERO
    for p in group.prompt_tokens:
        total = total + slot_time(snapshot, worker, group.model, group.slo_class, p)
    return total


def to_wall(slot_seconds: WaitEstimate, worker: WorkerState) -> WaitEstimate:
    """Aggregate slot-seconds served by `max_batch_size` parallel slots -> wall seconds."""
    b = max(1, worker.max_batch_size)
    return WaitEstimate(slot_seconds.mean_s / b, slot_seconds.var_s2 / (b * b))


def queue_wait(snapshot: ClusterSnapshot, worker: WorkerState, groups_ahead: list[GroupState]) -> WaitEstimate:
    """Wall-clock wait until the next group in `worker`'s virtual queue can start, given
    the groups ahead of it. Requests start as slots free, so the wait is the slot-time
    ahead spread over the batch, minus what the free slots absorb at once."""
    ahead = running_backlog(snapshot, worker)
    queued_requests = 0
    for g in groups_ahead:
        ahead = ahead + group_slot_time(snapshot, worker, g)
        queued_requests += g.size
    if queued_requests < worker.free_slots:
        return ZERO
    return to_wall(ahead, worker)


def predict_group_wait(snapshot: ClusterSnapshot, virtual_queues: dict[str, list[str]], group_id: str) -> WaitEstimate:
    """Predicted wait until `group_id` starts under the given virtual queues."""
    groups = {g.group_id: g for g in snapshot.groups}
    for worker_id, queue in virtual_queues.items():
        if group_id in queue:
            idx = queue.index(group_id)
            worker = snapshot.worker(worker_id)
            ahead = [groups[gid] for gid in queue[:idx] if gid in groups]
            wait = queue_wait(snapshot, worker, ahead)
            target = groups[group_id].model
            models_ahead = [g.model for g in ahead] or [worker.active_model]
            if models_ahead[-1] != target and target != worker.active_model:
                load = worker.profile.model_load_time(snapshot.model_bytes.get(target, 0), target in worker.warm_models)
                wait = wait + WaitEstimate(load, 0.0)
            return wait
    raise KeyError(f"group {group_id} is in no virtual queue")
