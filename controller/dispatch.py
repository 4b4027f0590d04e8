"""From a plan to concrete work: which waiting requests each worker takes now.

Pure: a function of the plan and the snapshot. A worker takes requests from the head
of its virtual queue while it has free batch slots, in queue order, and only for its
active model; when the head group needs another model and the worker has nothing of
its own model left running, a model load is issued (every policy needs that to serve
several models; planner-chosen swaps arrive as plan operations instead).
"""

from __future__ import annotations

from dataclasses import dataclass

from qlmserve.controller.snapshot import ClusterSnapshot
from qlmserve.operations.ops import LoadModel, Operation
from qlmserve.operations.plan import Plan


@dataclass(frozen=True)
class Assignment:
    worker_id: str
    group_id: str
    request_id: str


def dispatch(plan: Plan, snapshot: ClusterSnapshot, max_running_per_worker: int) -> tuple[list[Assignment], list[Operation]]:
    groups = {g.group_id: g for g in snapshot.groups}
    planned_loads = {op.worker_id: op.model for op in plan.operations if isinstance(op, LoadModel)}
    assignments: list[Assignment] = []
    ops: list[Operation] = []
    for w in snapshot.workers:
        if not w.accepts_work or w.loading_model is not None:
            continue
        active = sum(1 for r in w.running if not r.swapped)
        slots = min(w.max_batch_size, max_running_per_worker) - active
        target_model = planned_loads.get(w.worker_id, w.active_model)
        if target_model != w.active_model:
            continue  # a planned model swap comes first; requests follow once it is done
        for gid in plan.virtual_queues.get(w.worker_id, []):
            if slots <= 0:
                break
            g = groups.get(gid)
            if g is None:
                continue
            if g.model != w.active_model:
                own_running = any(r.model == w.active_model for r in w.running if not r.swapped)
                if not own_running and not any(a.worker_id == w.worker_id for a in assignments):
                    ops.append(LoadModel(w.worker_id, g.model, reason=f"head group {gid} needs {g.model}"))
                break  # strict queue order: later groups wait for this one
            for rid in g.request_ids:
                if slots <= 0:
                    break
                assignments.append(Assignment(w.worker_id, gid, rid))
                slots -= 1
    return assignments, ops
