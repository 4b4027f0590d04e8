"""Workers that do not support every operation (a vLLM worker: no KV swap, no expert-level
preemption, no warm start on request): the planner never asks them for one."""

from __future__ import annotations

from dataclasses import replace

import pytest

from qlmserve.backends.engine import EngineRequest, PreemptionMode, precedence
from qlmserve.backends.vllm.ops import SUPPORTED_OPS as VLLM_OPS
from qlmserve.backends.vllm.priority import BEST_EFFORT_OFFSET, vllm_priority
from qlmserve.bench.instances import InstanceSpec, make_policy, random_snapshot
from qlmserve.controller.cluster_view import worker_state
from qlmserve.controller.dispatch import dispatch
from qlmserve.controller.policies import create_policy
from qlmserve.controller.service.convert import report_from_pb
from qlmserve.controller.snapshot import ClusterSnapshot, GroupState, LengthStats, RunningRequest, WorkerState
from qlmserve.controller.workers import WorkerHandle
from qlmserve.operations.costs import WorkerProfile
from qlmserve.operations.ops import Capability, OpKind, SetPreemption, SwapIn, SwapOut, WarmModel
from qlmserve.operations.plan import Plan
from qlmserve.pb import worker_pb2

pytestmark = pytest.mark.unit

LLAMA, MIXTRAL = "llama-8b", "mixtral-8x7b"  # a dense model and an MoE one (make_policy)
NOW = 1000.0
FORBIDDEN = (OpKind.SWAP_OUT, OpKind.SWAP_IN, OpKind.WARM_MODEL, OpKind.DROP_WARM)


def _busy(model: str, supported: frozenset[Capability] | None, wid: str = "w0") -> WorkerState:
    """A worker whose batch is full of long best-effort requests, with room in host memory."""
    running = tuple(RunningRequest(f"{wid}-be{i}", "old", model, "batch", 500 + i, 5 + i, 2048, False, NOW - 30,
                                   NOW - 20) for i in range(16))
    return WorkerState(wid, model, frozenset(), 10**6, 10**5, 16, running, WorkerProfile(),
                       host_kv_capacity_tokens=10**6, supported_ops=supported)


def _case(model: str, ops: tuple[str, ...], supported: frozenset[Capability] | None):
    cfg = make_policy(2, operations=ops)
    sc = cfg.slo_classes["interactive"]
    group = GroupState("ls", model, "interactive", ("ls-0", "ls-1"), (NOW - 0.5,) * 2, (200,) * 2, (512,) * 2,
                       sc.ttft_s, sc.priority, sc.weight, sc.latency_sensitive)
    stats = {(m, c, 0): LengthStats(400.0, 20.0**2, 100) for m in cfg.models for c in cfg.slo_classes}
    return cfg, ClusterSnapshot(NOW, (group,), (_busy(model, supported),), stats, {m: 16 * 2**30 for m in cfg.models})


def _kinds(plan) -> list[tuple[str, str]]:
    return [(op.kind.value, getattr(op, "mode", "")) for op in plan.operations]


@pytest.mark.parametrize("policy", ["qlm", "edf"])
def test_an_moe_worker_without_expert_preemption_gets_iteration_level(policy: str):
    """This test verifies that:
    1. on an MoE model, a worker that supports every operation is protected by expert-level
       preemption (qlm and the baselines' rule alike);
    2. the same worker reporting vLLM's operations gets iteration-level preemption instead,
       never expert, and no KV swap although kv_swap is enabled and host memory is free."""
    ops = ("preempt", "evict", "kv_swap")
    cfg, snap = _case(MIXTRAL, ops, None)
    assert ("set_preemption", "expert") in _kinds(create_policy(policy, cfg).solve(snap))
    cfg, snap = _case(MIXTRAL, ops, VLLM_OPS)
    kinds = _kinds(create_policy(policy, cfg).solve(snap))
    assert ("set_preemption", "iteration") in kinds
    assert not [k for k in kinds if k[1] == "expert" or k[0] in ("swap_out", "swap_in")]


def test_a_worker_without_kv_swap_is_evicted_from_or_left_alone():
    """This test verifies that, to free batch slots for latency-sensitive requests:
    1. a worker that supports KV swap, with only kv_swap enabled, swaps best-effort requests out;
    2. a vLLM worker gets no swap: with evict enabled too it is evicted from, with kv_swap
       alone it is left alone."""
    cfg, snap = _case(LLAMA, ("kv_swap",), None)
    assert [op for op in create_policy("qlm", cfg).solve(snap).operations if isinstance(op, SwapOut)]
    cfg, snap = _case(LLAMA, ("kv_swap", "evict"), VLLM_OPS)
    kinds = _kinds(create_policy("qlm", cfg).solve(snap))
    assert ("evict", "") in kinds and not [k for k in kinds if k[0] in ("swap_out", "swap_in")]
    cfg, snap = _case(LLAMA, ("kv_swap",), VLLM_OPS)
    assert create_policy("qlm", cfg).solve(snap).operations == []


@pytest.mark.parametrize("seed", range(4))
def test_plans_for_a_mixed_fleet_ask_vllm_workers_only_for_what_they_support(seed: int):
    """This test verifies that on random instances with every operation enabled, half the
    workers reporting vLLM's operations, QLM's plans and dispatch give those workers no KV
    swap, no warm start and no expert-level preemption, while the others may get them."""
    cfg = make_policy(2)
    snap = random_snapshot(cfg, InstanceSpec(groups=24, workers=6, load=1.6), seed)
    vllm_ids = {w.worker_id for w in snap.workers[::2]}
    snap = replace(snap, workers=tuple(replace(w, supported_ops=VLLM_OPS) if w.worker_id in vllm_ids else w
                                       for w in snap.workers))
    plan = create_policy("qlm", cfg).solve(snap)
    _, mechanism_ops = dispatch(plan, snap, cfg.max_running_per_worker)
    for op in list(plan.operations) + mechanism_ops:
        if op.worker_id in vllm_ids:
            assert op.kind not in FORBIDDEN and getattr(op, "mode", "") != "expert", (seed, op)


def test_a_worker_answers_by_capability_and_dispatch_asks_no_model_swap_it_cannot_make():
    """This test verifies that:
    1. a worker with vLLM's operations can carry out iteration-level preemption and
       switching it off, but no KV swap, warm start or expert-level preemption; a worker
       that names no operations can carry out every one;
    2. dispatch loads no model on a worker that cannot swap models (its head group waits)."""
    w = _busy(LLAMA, VLLM_OPS)
    assert not w.can_carry_out(SwapOut("w0", ("a",))) and not w.can_carry_out(SwapIn("w0", ("a",)))
    assert not w.can_carry_out(WarmModel("w0", LLAMA)) and not w.can_carry_out(SetPreemption("w0", "expert"))
    assert w.can_carry_out(SetPreemption("w0", "iteration")) and w.can_carry_out(SetPreemption("w0", "none"))
    assert replace(w, supported_ops=None).can_carry_out(SwapOut("w0", ("a",)))
    # a model swap the worker cannot make is not asked for either
    no_swap = replace(w, running=(), supported_ops=frozenset({Capability.EVICT}))
    g = GroupState("g", MIXTRAL, "batch", ("r",), (NOW,), (10,), (10,), 600.0, 0, 1.0, False)
    assert dispatch(Plan({"w0": ["g"]}), ClusterSnapshot(NOW, (g,), (no_swap,)), 16) == ([], [])


def test_supported_ops_travel_in_the_state_report():
    """This test verifies that the operations a worker names in its state report reach the
    planner's snapshot, that a report naming none means every operation (workers from before
    the field), and that names this controller does not know offer nothing."""
    pb = worker_pb2.WorkerState(active_model="m", supported_ops=["evict", "model_swap", "iteration_preemption"])
    handle = WorkerHandle("w0", "vllm", "cpu", ["m"], session=1, last_seen=0.0, report=report_from_pb(pb))
    cfg = make_policy(2)

    def state():  # as the controller builds it (controller/cluster_view.py)
        return worker_state(handle.view((), True), cfg, {})

    assert state().supported_ops == VLLM_OPS
    handle.report = report_from_pb(worker_pb2.WorkerState(active_model="m"))
    assert state().supported_ops is None
    handle.report = report_from_pb(worker_pb2.WorkerState(supported_ops=["evict", "teleport"]))
    assert state().supported_ops == frozenset({Capability.EVICT})


def test_vllm_priorities_follow_qlm_precedence():
    """This test verifies that vLLM's priority value (lower runs first) orders requests as
    QLM's precedence does under ITERATION: latency-sensitive first whatever the class
    priority, then higher class priority; and that under NONE every request gets the same
    value (vLLM then serves in arrival order, FCFS)."""
    reqs = [EngineRequest(f"r{i}", "m", [1], 4, latency_sensitive=ls, priority=p)
            for i, (ls, p) in enumerate([(False, 1), (True, 10), (False, 50), (True, -3), (False, -10**9)])]
    by_qlm = sorted(reqs, key=precedence)
    by_vllm = sorted(reqs, key=lambda r: vllm_priority(PreemptionMode.ITERATION, r))
    assert [r.request_id for r in by_vllm] == [r.request_id for r in by_qlm]
    assert all(vllm_priority(PreemptionMode.ITERATION, r) < BEST_EFFORT_OFFSET for r in reqs if r.latency_sensitive)
    assert {vllm_priority(PreemptionMode.NONE, r) for r in reqs} == {0}


def test_a_vllm_worker_started_without_vllm_says_where_vllm_lives(capsys):
    """This test verifies that `qlm worker --engine vllm` run from a Python without vLLM (the
    main virtualenv) exits at once with code 2 and an error naming the field and the vLLM
    virtualenv, instead of dialing the controller with an engine it cannot build."""
    import importlib.util

    from qlmserve.cli import main

    if importlib.util.find_spec("vllm") is not None:
        pytest.skip("this Python has vLLM")  # the tests run from the main virtualenv, which has none
    assert main(["worker", "--engine", "vllm", "--controller", "127.0.0.1:1"]) == 2
    err = capsys.readouterr().err
    assert "field 'engine'" in err and "make vllm" in err and ".venv-vllm/bin/qlm" in err
