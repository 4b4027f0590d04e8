"""From virtual queues to the serving operations that carry them out.

Shared by every policy, so that an operation does the same thing whichever policy
asks for it and its contribution can be measured by switching it off:

  - protection of latency-sensitive (LS) groups from best-effort (BE) running work:
    expert-level preemption on MoE workers (pause the BE batch; free), else eviction
    or GPU-CPU KV swap of the fewest, cheapest BE requests (lost work);
  - load balancing: a MoveGroup for every group whose worker changed;
  - model swap: LoadModel when the plan swaps a worker's model now (after evicting or
    swapping out what runs, when that is the plan), warm start of the model a queue
    needs next (swapped-out requests resume through dispatch, every tick).

The QLM policy decides protection and swaps in its program; baselines use the
simple rule `rule_protection`. Only operations enabled in the policy file are made,
and a worker is asked only for what its engine supports (WorkerState.supported_ops:
a vLLM worker, for one, has no KV swap and no expert-level preemption).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from qlmserve.controller.estimator import Forecaster, model_kind_is_moe
from qlmserve.controller.policy import PolicyConfig
from qlmserve.controller.snapshot import (
    ClusterSnapshot,
    GroupState,
    RunningRequest,
    WorkerState,
    leading_latency_sensitive,
)
from qlmserve.operations.batching import PreemptionMode, batch_limit
from qlmserve.operations.ops import (
    OPS_BY_POLICY_NAME,
    Capability,
    DropWarm,
    Evict,
    LoadModel,
    MoveGroup,
    Operation,
    OpKind,
    SetPreemption,
    SwapOut,
    WarmModel,
)

# Protections that change the worker's preemption mode instead of taking requests off the
# device: LS requests join beyond the batch limit and are prefilled first (and, PreemptionMode.EXPERT,
# inside a paused best-effort pass); no best-effort work is lost.
PREEMPTION_MODES = (PreemptionMode.EXPERT, PreemptionMode.ITERATION)
EVICT = "evict"
SWAP = "swap"


def enabled_kinds(config: PolicyConfig) -> frozenset[OpKind]:
    return frozenset(k for name in config.planner.operations for k in OPS_BY_POLICY_NAME[name])


def _be_running(w: WorkerState) -> list[RunningRequest]:
    return [r for r in w.running if not r.latency_sensitive and not r.swapped]


def _host_kv_free(w: WorkerState) -> float:
    if w.host_kv_capacity_tokens is None:
        return float("inf")
    return max(0, w.host_kv_capacity_tokens - w.host_kv_used_tokens)


def victim_cost_s(w: WorkerState, r: RunningRequest, mechanism: str) -> float:
    """Worker seconds lost by taking `r` off the device: eviction recomputes its KV
    (prompt + generated tokens) later; a KV swap copies it out and back."""
    tokens = r.prompt_tokens + r.generated_tokens
    if mechanism == SWAP:
        return 2.0 * w.profile.kv_swap_time(tokens)
    return w.profile.prefill_time(tokens)


def removal_mechanism(config: PolicyConfig, w: WorkerState, requests: Sequence[RunningRequest],
                      model_change: bool = False) -> str | None:
    """The cheaper enabled way to take these requests off the device, EVICT (recompute
    their KV later) or SWAP (copy it to host memory and back), or None. A swap needs host
    memory for the smallest of them. To clear a batch for a model change only EVICT: KV
    swapped out there could resume only once the worker served its model again (requests
    were stranded on a worker the placement kept on the new model)."""
    if not requests:
        return None
    ops = set(config.planner.operations)
    tokens = [r.prompt_tokens + r.generated_tokens for r in requests]
    mean_tokens = int(sum(tokens) / len(tokens))
    best, best_cost = None, float("inf")
    # Both costs are affine in the tokens: the mean cost is the cost of the mean.
    for name, mech, cost in (("evict", EVICT, w.profile.prefill_time(mean_tokens)),
                             ("kv_swap", SWAP, 2.0 * w.profile.kv_swap_time(mean_tokens))):
        if name not in ops or not w.supports(Capability(name)):
            continue
        if mech == SWAP and (model_change or _host_kv_free(w) < min(tokens)):
            continue
        if cost < best_cost:
            best, best_cost = mech, cost
    return best


def protection_mechanism(config: PolicyConfig, w: WorkerState) -> str | None:
    """How this worker can keep its BE running work from delaying LS groups, or None."""
    be = _be_running(w)
    if not be:
        return None
    if "preempt" in config.planner.operations:
        # A dense model has no expert boundary to pause at: iteration-level preemption
        # (LS first at the next iteration, beyond the batch limit) costs it no lost work,
        # where an eviction or a KV swap-out costs recompute or two copies. An engine
        # without expert-level preemption (vLLM) gets iteration-level on MoE models too.
        if model_kind_is_moe(config, w.active_model) and w.supports(Capability.EXPERT_PREEMPTION):
            return PreemptionMode.EXPERT
        if w.supports(Capability.ITERATION_PREEMPTION):
            return PreemptionMode.ITERATION
    return removal_mechanism(config, w, be)


def slot_mechanism(config: PolicyConfig, w: WorkerState, mechanism: str) -> str | None:
    """How BE running requests leave the device to give LS requests batch slots under a
    protection `mechanism`: itself for EVICT / SWAP; under PreemptionMode.EXPERT / PreemptionMode.ITERATION (which frees
    no slot; LS requests join beyond the batch limit) the cheaper enabled removal, if any."""
    if mechanism not in PREEMPTION_MODES:
        return mechanism
    return removal_mechanism(config, w, _be_running(w))


def victims(w: WorkerState, needed: int, mechanism: str | None) -> list[RunningRequest]:
    """The `needed` BE running requests that are cheapest to take off the device (host
    memory permitting, for a swap)."""
    if needed <= 0 or mechanism is None or mechanism in PREEMPTION_MODES:
        return []
    out, host = [], _host_kv_free(w)
    # Only requests that have started: one not yet prefilled holds no KV to move, and the
    # engine admits latency-sensitive requests ahead of it anyway.
    started = [r for r in _be_running(w) if r.first_token_at is not None]
    for r in sorted(started, key=lambda r: (victim_cost_s(w, r, mechanism), r.request_id)):
        if len(out) >= needed:
            break
        tokens = r.prompt_tokens + r.generated_tokens
        if mechanism == SWAP:
            if tokens > host:
                continue
            host -= tokens
        out.append(r)
    return out


def ls_requests_needing_slots(w: WorkerState, queue: Sequence[GroupState], slots: int,
                              mechanism: str | None = None) -> int:
    """LS requests of the queue's leading run (up to the first BE group) beyond the slots
    they may take: under PreemptionMode.EXPERT / PreemptionMode.ITERATION protection, or a worker already in one of those
    modes, LS requests join beyond the batch limit (operations.batching.batch_limit)."""
    ls = sum(g.size for g in leading_latency_sensitive(queue))
    mode = mechanism if mechanism in PREEMPTION_MODES else w.preemption_mode
    limit = batch_limit(mode, True, slots)
    return max(0, ls - max(0, limit - w.active))


def protection_cost_s(config: PolicyConfig, w: WorkerState, queue: Sequence[GroupState], slots: int,
                      mechanism: str) -> float:
    """Worker seconds of BE work lost by protecting: the removed requests' recompute or
    copies (a pause by expert-level preemption loses none)."""
    removal = slot_mechanism(config, w, mechanism)
    needed = ls_requests_needing_slots(w, queue, slots, mechanism)
    return sum(victim_cost_s(w, r, removal) for r in victims(w, needed, removal))


def rule_protection(snapshot: ClusterSnapshot, config: PolicyConfig, fc: Forecaster,
                    queues: Mapping[str, list[str]]) -> dict[str, str]:
    """The baselines' rule: protect a worker when an LS group in its queue would miss its
    deadline (at beta) behind BE running work and would not with protection."""
    beta = config.planner.beta
    out: dict[str, str] = {}
    for w in snapshot.workers:
        queue = queues.get(w.worker_id, [])
        if not queue or not w.accepts_work:
            continue
        mech = protection_mechanism(config, w)
        if mech is None:
            continue
        plain = fc.evaluate({w.worker_id: queue})
        ls = [gid for gid in queue if gid in plain and fc.groups[gid].group.latency_sensitive
              and not plain[gid].meets(beta)]
        if not ls:
            continue
        if mech not in PREEMPTION_MODES and not ls_requests_needing_slots(
                w, [fc.groups[g].group for g in queue], fc.workers[w.worker_id].slots):
            continue  # free slots suffice for the leading LS groups: nothing to evict
        prot = fc.evaluate({w.worker_id: queue}, protected=[w.worker_id])
        if any(prot[gid].meets(beta) for gid in ls):
            out[w.worker_id] = mech
    return out


@dataclass(frozen=True)
class ModelChange:
    """A model swap the plan makes now on one worker."""

    model: str
    clear: str | None = None  # EVICT or SWAP: take the running requests off first; None: nothing runs


def derive_operations(snapshot: ClusterSnapshot, config: PolicyConfig, fc: Forecaster,
                      queues: Mapping[str, list[str]], protected: Mapping[str, str],
                      changes: Mapping[str, ModelChange] | None = None) -> list[Operation]:
    """The operations that carry out `queues` with the given protection and model swaps,
    ordered per worker (take work off the device before loading a model), restricted to
    the enabled kinds and to what each worker supports."""
    changes = changes or {}
    kinds = enabled_kinds(config)
    groups = {g.group_id: g for g in snapshot.groups}
    max_pause = config.planner.max_pause_s
    ops: list[Operation] = []
    for w in snapshot.workers:
        wid = w.worker_id
        queue = [groups[gid] for gid in queues.get(wid, []) if gid in groups]
        slots = fc.workers[wid].slots if wid in fc.workers else w.max_batch_size
        swaps = w.supports(Capability.MODEL_SWAP)
        change = changes.get(wid) if swaps else None
        if change is None and swaps and queue and w.loading_model is None and queue[0].model != w.active_model \
                and not any(not r.swapped for r in w.running) and w.accepts_work:
            # Nothing runs and the head group needs another model: load it now (what dispatch
            # would do lazily, made explicit so that warm starts and the plan agree).
            change = ModelChange(queue[0].model)
        mech = protected.get(wid)
        if change is not None and change.clear is not None:
            running = [r for r in w.running if not r.swapped]
            ids = tuple(r.request_id for r in running)
            if ids:
                op = SwapOut(wid, ids, reason=f"model swap to {change.model}") if change.clear == SWAP else \
                    Evict(wid, ids, reason=f"model swap to {change.model}")
                ops.append(op)
        elif mech is not None:
            removal = slot_mechanism(config, w, mech)
            vs = victims(w, ls_requests_needing_slots(w, queue, slots, mech), removal)
            if vs:
                ids = tuple(r.request_id for r in vs)
                reason = "latency-sensitive groups need batch slots held by best-effort requests"
                ops.append(SwapOut(wid, ids, reason=reason) if removal == SWAP else Evict(wid, ids, reason=reason))
        if change is not None and change.model != (w.loading_model or w.active_model):
            ops.append(LoadModel(wid, change.model, reason="planned model swap"))
        # LS work queued, or handed over and not started yet (it joins under the mode in force)
        has_ls = any(g.latency_sensitive for g in queue) or any(
            r.latency_sensitive and r.first_token_at is None and not r.swapped for r in w.running)
        if mech in PREEMPTION_MODES and w.preemption_mode != mech:
            ops.append(SetPreemption(wid, mech, max_pause_s=max_pause,
                                     reason="latency-sensitive groups wait behind a best-effort batch"))
        elif mech not in PREEMPTION_MODES and w.preemption_mode in PREEMPTION_MODES and not has_ls:
            ops.append(SetPreemption(wid, PreemptionMode.NONE, max_pause_s=max_pause, reason="no latency-sensitive work queued"))
        ops.extend(_warm(w, queue, change))
    for wid, queue in queues.items():
        for gid in queue:
            g = groups.get(gid)
            if g is not None and g.worker_id is not None and g.worker_id != wid:
                ops.append(MoveGroup(gid, g.worker_id, wid, reason="load balance"))
    workers = {w.worker_id: w for w in snapshot.workers}
    return [op for op in ops if op.kind in kinds and (op.worker_id not in workers
                                                      or workers[op.worker_id].can_carry_out(op))]


def _warm(w: WorkerState, queue: Sequence[GroupState], change: ModelChange | None) -> list[Operation]:
    """Keep the next model the queue needs warm in host RAM (dropping one it does not need)."""
    current = change.model if change is not None else (w.loading_model or w.active_model)
    needed: list[str] = []
    for g in queue:
        if g.model != current and g.model not in needed:
            needed.append(g.model)
    want = next((m for m in needed if m not in w.warm_models), None)
    if want is None or w.host_ram_models <= 0 or not w.supports(Capability.WARM_START):
        return []
    out: list[Operation] = []
    if len(w.warm_models) >= w.host_ram_models:
        spare = sorted(m for m in w.warm_models if m not in needed and m != current)
        if not spare:
            return []
        out.append(DropWarm(w.worker_id, spare[0], reason=f"make room for {want}"))
    out.append(WarmModel(w.worker_id, want, reason="next model in the virtual queue"))
    return out
