"""Which model each worker serves: the model-placement rules of the planners.

A fleet serving several models must move workers between models as demand moves: a
model whose backlog grows needs more workers, one whose backlog is gone can lend one.
Moving costs a drain of the worker's running requests and a model load (cold from
disk, or warm from host RAM), so a rule needs hysteresis, or workers thrash between
models and serve nobody.

`backlog_rule` is the plain rule of the reference simulator (issue 17), the baseline
QLM is judged against: a worker switches to the model whose backlog beyond its free
slots, per worker serving it, is largest, when that backlog exceeds a threshold; the
donor is a worker of the model with the smallest such backlog (after losing it), one
holding the model warm in host RAM first, then the least busy; each
worker switches at most once per cooldown. A model no worker serves has no free slots:
its first waiting request counts.

A switched worker drains: it takes no new work of its old model and loads the new one
once its running requests finish (controller/dispatch.py issues the load when the head
of its queue needs the new model and nothing of the old one runs), so no work is lost.
The switch stays pending (PlacementState.targets) until the worker serves the new model:
without that, the next tick, seeing the draining worker still on its old model, gave it
old work again and a busy worker never switched.

`restrict_to_targets` is how a planner follows the placement: each worker may then serve
only its target model, so every later stage (queues, program, operations) places a
model's groups on that model's workers alone.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from qlmserve.controller.snapshot import ClusterSnapshot, WorkerState
from qlmserve.operations.ops import Capability


@dataclass(frozen=True)
class Switch:
    worker_id: str
    model: str
    reason: str


@dataclass
class PlacementState:
    """What the rule remembers between ticks (its hysteresis)."""

    switched_at: dict[str, float] = field(default_factory=dict)  # worker -> when it last switched
    pending: dict[str, str] = field(default_factory=dict)  # worker -> model it is switching to

    def targets(self, snapshot: ClusterSnapshot) -> dict[str, str | None]:
        """worker -> the model it serves, or switches to. A pending switch ends when the
        worker serves its model, stops taking work, or nothing of that model waits any more."""
        waiting = {g.model for g in snapshot.groups}
        out: dict[str, str | None] = {}
        for w in snapshot.workers:
            now = serving(w)
            p = self.pending.get(w.worker_id)
            if p is not None and (p == now or not w.accepts_work or (p not in waiting and w.loading_model is None)
                                  or w.loading_model is not None):  # done, or another load overrode it
                del self.pending[w.worker_id]
                p = None
            out[w.worker_id] = p or now
        return out


def serving(w: WorkerState) -> str | None:
    """The model a worker serves, or will once the swap in progress is done."""
    return w.loading_model or w.active_model


def per_worker_backlog(snapshot: ClusterSnapshot, target: dict[str, str | None]) -> dict[str, float]:
    """model -> waiting requests beyond the free slots of the workers serving it, per worker
    serving it (`target`: worker -> the model it serves)."""
    waiting: dict[str, int] = {}
    for g in snapshot.groups:
        waiting[g.model] = waiting.get(g.model, 0) + g.size
    out = {}
    for m, n in waiting.items():
        servers = [w for w in snapshot.workers if w.accepts_work and target.get(w.worker_id) == m]
        free = sum(w.free_slots for w in servers if w.active_model == m and w.loading_model is None)
        out[m] = max(0, n - free) / max(1, len(servers))
    return out


def backlog_rule(snapshot: ClusterSnapshot, state: PlacementState, *, threshold: float,
                 cooldown_s: float) -> list[Switch]:
    """At most one switch per call (see the module docstring)."""
    now = snapshot.now
    target = state.targets(snapshot)
    backlog = per_worker_backlog(snapshot, target)
    if not backlog:
        return []
    unserved = {m for m in backlog if not any(t == m for t in target.values())}
    need, b_need = max(((m, b) for m, b in backlog.items()), key=lambda mb: (mb[0] in unserved, mb[1], mb[0]))
    if need not in unserved and b_need <= threshold:
        return []
    best: tuple[float, str, WorkerState] | None = None
    for w in snapshot.workers:
        d = target[w.worker_id]
        if (d == need or not w.accepts_work or w.loading_model is not None or not w.can_serve(need)
                or not w.supports(Capability.MODEL_SWAP)
                or any(r.swapped for r in w.running)  # its swapped-out requests resume only on their model
                or (need not in unserved and now - state.switched_at.get(w.worker_id, -1e18) < cooldown_s)):
            continue
        others = [x for x in snapshot.workers if x.accepts_work and target[x.worker_id] == d and x is not w]
        if d in backlog and not others:
            continue  # the last worker of a model with work waiting stays
        after = per_worker_backlog(snapshot, {**target, w.worker_id: need}).get(d, 0.0) if d else 0.0
        if need not in unserved and after + threshold >= b_need:
            continue  # the donor's own backlog would then be as bad: no switch (hysteresis)
        key = (after, need not in w.warm_models, w.active)  # a warm copy loads in seconds
        if best is None or key < best[0]:
            best = (key, d or "", w)
    if best is None:
        return []
    w = best[2]
    state.switched_at[w.worker_id] = now
    state.pending[w.worker_id] = need
    return [Switch(w.worker_id, need, f"backlog of {need}: {b_need:.1f} per worker (donor {best[1] or 'idle'})")]


def restrict_to_targets(snapshot: ClusterSnapshot, targets: dict[str, str | None]) -> ClusterSnapshot:
    """The snapshot with each worker able to serve only its target model, and any model
    that waits with no worker targeting it (a worker with no target, e.g. empty at
    start-up, keeps what it can serve)."""
    orphans = {g.model for g in snapshot.groups} - set(targets.values())
    workers = tuple(replace(w, servable_models=frozenset(m for m in {t} | orphans if w.can_serve(m)))
                    if (t := targets.get(w.worker_id)) else w for w in snapshot.workers)
    return replace(snapshot, workers=workers)
