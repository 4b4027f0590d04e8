"""Stage 1 of the NOTE: the base decision, the last plan's queues with new groups inserted
by deadline, or EDF list scheduling from scratch."""

from __future__ import annotations

import numpy as np

from qlmserve.controller.policies.heuristics import eligible_mask, list_schedule
from qlmserve.controller.policies.qlm.decision import Decision
from qlmserve.controller.policies.qlm.tick import Tick
from qlmserve.controller.snapshot import GroupState
from qlmserve.operations.plan import Plan


def base_decision(tick: Tick, last_plan: Plan | None) -> tuple[Decision, bool]:
    """(the base decision, whether it is a cold start built by EDF list scheduling)."""
    where: dict[str, tuple[str, int]] = {}
    if last_plan is not None:
        for wid, q in last_plan.virtual_queues.items():
            for i, gid in enumerate(q):
                where[gid] = (wid, i)
    placed: dict[str, list[tuple[int, str]]] = {wid: [] for wid in tick.workers}
    new: list[GroupState] = []
    for g in tick.snap.groups:
        wid, pos = (g.worker_id, g.position) if g.worker_id is not None else where.get(g.group_id, (None, 0))
        if wid in tick.workers and tick.eligible(g, tick.workers[wid]):
            placed[wid].append((pos, g.group_id))
        else:
            new.append(g)
    allow_swap = "model_swap" in tick.ops
    if not any(placed.values()):
        return edf_decision(tick), True
    queues = {wid: [gid for _, gid in sorted(items)] for wid, items in placed.items()}
    if new:
        # Where a new group could start soonest: the worker's head plus its queued work
        # spread over its slots (the program corrects this for groups at risk).
        heads = tick.heads
        queued = np.array([sum(tick.add_mean(gid, wid) for gid in queues[wid]) for wid in heads.wids])
        for g in sorted(new, key=lambda g: (g.deadline, g.group_id)):
            start = heads.start(g)
            ok = eligible_mask(heads, g, allow_swap, start)
            t = np.where(ok, start + queued, np.inf)
            if not np.isfinite(t).any():
                t = np.where(ok, queued, np.inf)
            i = int(np.argmin(t))
            q = queues[heads.wids[i]]
            at = next((k for k, gid in enumerate(q) if tick.groups[gid].deadline > g.deadline), len(q))
            q.insert(at, g.group_id)
            queued[i] += tick.add_mean(g.group_id, heads.wids[i])
    return Decision(queues), False


def edf_decision(tick: Tick) -> Decision:
    """EDF list scheduling (the fallback heuristic) under this policy's operations."""
    order = sorted(tick.snap.groups, key=lambda g: (g.deadline, g.group_id))
    queues = list_schedule(tick.snap, order, sticky="load_balance" not in tick.ops,
                           allow_swap="model_swap" in tick.ops, forecaster=tick.fc)
    return Decision(queues)
