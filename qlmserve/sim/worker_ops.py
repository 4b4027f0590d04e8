"""How a simulated worker carries out the planner's operations: eviction, KV swap out and
in, model load (cold or warm) and warm start, each changing the worker's state and
charged on its profile. Operations that take time run as units (qlmserve/sim/unit.py)
at the worker's next step boundary; the worker's batching is in worker.py."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING

from qlmserve.operations.ops import Evict, LoadModel, Operation, SwapIn, SwapOut
from qlmserve.sim.request import SimRequest, SimStatus
from qlmserve.sim.unit import Unit

if TYPE_CHECKING:
    from qlmserve.sim.worker import SimWorker


def begin_op(w: SimWorker, op: Operation, now: float) -> bool:
    """Carry out a queued operation; True when it occupies the worker (a unit started)."""
    handler = _BEGIN.get(type(op))
    if handler is None:
        w.counters.failed_ops += 1
        return False
    return handler(w, op, now)


def _find(w: SimWorker, rid: str) -> SimRequest | None:
    for lst in (w.running, w.joining):
        for r in lst:
            if r.rid == rid:
                return r
    return w.swapped.get(rid)


def _evict(w: SimWorker, op: Evict, now: float) -> bool:
    for rid in op.request_ids:
        r = _find(w, rid)
        if r is None:
            w.counters.failed_ops += 1
            continue
        _hand_back(w, r, now, "evict")
    w.changed()
    return False


def _swap_out(w: SimWorker, op: SwapOut, now: float) -> bool:
    reqs = []
    for rid in op.request_ids:
        r = _find(w, rid)
        if r is None or r.status != SimStatus.RUNNING or not r.prefilled:
            w.counters.failed_ops += 1
            continue
        reqs.append(r)
    cap = w.spec.host_kv_tokens
    if cap is not None:
        room = cap - w.host_kv_used
        kept = []
        for r in reqs:
            if r.kv_tokens <= room:
                kept.append(r)
                room -= r.kv_tokens
            else:
                w.counters.failed_ops += 1
        reqs = kept
    if not reqs:
        return False
    dur = w.profile.kv_swap_time(sum(r.kv_tokens for r in reqs))
    w.schedule(Unit("op", now, now + dur, op=op, op_reqs=reqs))
    return True


def _swap_in(w: SimWorker, op: SwapIn, now: float) -> bool:
    reqs = []
    slots = w.spec.max_batch_size - len(w.running)
    free = w.kv_capacity - w.kv_used
    for rid in op.request_ids:
        r = w.swapped.get(rid)
        if r is None or r.model != w.active_model or slots <= 0 or r.kv_tokens + 1 > free:
            w.counters.failed_ops += 1
            continue
        reqs.append(r)
        slots -= 1
        free -= r.kv_tokens + 1
    if not reqs:
        return False
    for r in reqs:  # reserve their KV now
        del w.swapped[r.rid]
        r.status = SimStatus.RUNNING
        w.running.append(r)
    dur = w.profile.kv_swap_time(sum(r.kv_tokens for r in reqs))
    w.schedule(Unit("op", now, now + dur, op=op, op_reqs=reqs))
    return True


def _load(w: SimWorker, op: LoadModel, now: float) -> bool:
    if op.model == w.active_model:
        w.loading_model = None
        w.changed()
        return False
    # The batch of the old model goes back to the queue, tokens kept (the worker
    # hands it back, as the real worker does on a model swap).
    for r in [r for r in w.running + w.joining if r.model != op.model]:
        _hand_back(w, r, now, "model swap")
    rt = w.spec.models[op.model]
    warm = w.warm.get(op.model, math.inf) <= now
    dur = rt.profile.model_load_time(rt.weight_bytes, warm)
    w.loading_model = op.model
    if warm:
        w.counters.loads_warm += 1
    else:
        w.counters.loads_cold += 1
    w.counters.load_s += dur
    w.changed()
    w.schedule(Unit("op", now, now + dur, op=op))
    return True


_BEGIN: dict[type, Callable[[SimWorker, Operation, float], bool]] = {
    Evict: _evict, SwapOut: _swap_out, SwapIn: _swap_in, LoadModel: _load,
}


def complete_op(w: SimWorker, u: Unit, now: float) -> None:
    op = u.op
    w.counters.op_s += u.end - u.start
    if isinstance(op, SwapOut):
        for r in u.op_reqs:
            if r.status != SimStatus.RUNNING or r.worker_id != w.worker_id:
                continue
            w.running.remove(r)
            r.status = SimStatus.SWAPPED
            r.swaps += 1
            w.swapped[r.rid] = r
            w.counters.swaps_out += 1
    elif isinstance(op, SwapIn):
        w.counters.swaps_in += len(u.op_reqs)
    elif isinstance(op, LoadModel):
        w.active_model = op.model
        w.loading_model = None
        w.prefix.clear()  # the cached blocks were the old model's KV
        w.prefix.resize(w.kv_capacity // w.prefix.block_tokens)
    w.changed()


def _hand_back(w: SimWorker, r: SimRequest, now: float, reason: str) -> None:
    """Take a request off the worker (its KV is dropped; its tokens stay with it) and give
    it back to the queue."""
    if r in w.running:
        w.running.remove(r)
    elif r in w.joining:
        w.joining.remove(r)
    else:
        w.swapped.pop(r.rid, None)
    r.prefilled = False
    r.prefill_done = 0
    r.status = SimStatus.WAITING
    r.worker_id = None  # a unit still holding it in its batch skips it from now on
    r.evictions += 1
    w.counters.evictions += 1
    w.sink.on_requeue(r, now, reason)


def warm_model(w: SimWorker, model: str, now: float) -> bool:
    """Start a warm copy of a model's weights in host RAM (ready once read from disk)."""
    rt = w.spec.models.get(model)
    if rt is None:
        w.counters.failed_ops += 1
        return False
    if model in w.warm:
        return True
    used = sum(w.spec.models[m].weight_bytes for m in w.warm)
    if used + rt.weight_bytes > w.spec.host_ram_bytes:
        w.counters.failed_ops += 1
        return False
    w.warm[model] = now + rt.weight_bytes / rt.profile.load_cold_bytes_per_s
    w.counters.warm_starts += 1
    w.changed()
    return True
