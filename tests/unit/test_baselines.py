"""The baseline policies (FCFS model-aware and model-oblivious, EDF, SJF with aging, strict
priority) with operations on and off, and the one list scheduler they share."""

from __future__ import annotations

from dataclasses import replace

import pytest

from qlmserve.bench.instances import ALL_OPERATIONS, InstanceSpec, make_policy, random_snapshot
from qlmserve.controller.policies import create_policy, policy_names
from qlmserve.controller.policies.op_rules import enabled_kinds
from qlmserve.controller.snapshot import ClusterSnapshot, GroupState, LengthStats, RunningRequest, WorkerState
from qlmserve.operations.costs import WorkerProfile
from qlmserve.operations.ops import SetPreemption

pytestmark = pytest.mark.unit

BASELINES = ("fcfs", "fcfs-oblivious", "edf", "sjf", "priority")
NOW = 500.0


def test_registry_lists_every_policy_and_rejects_unknown_names():
    """This test verifies that:
    1. the registry holds QLM and every baseline;
    2. an unknown name raises a ValueError that lists the valid names."""
    assert set(policy_names()) >= {"qlm", *BASELINES}
    with pytest.raises(ValueError, match="valid policies: .*edf"):
        create_policy("nope", make_policy(1))


@pytest.mark.parametrize("name", BASELINES)
def test_baselines_place_every_group_with_operations_on_or_off(name: str):
    """This test verifies that:
    1. each baseline queues every group exactly once, on a worker that can hold its model;
    2. it only uses enabled operations, and none when none are enabled;
    3. its plan names the policy and predicts an attainment for every group."""
    for ops in (ALL_OPERATIONS, ("evict",), ()):
        cfg = make_policy(2, policy=name, operations=ops)
        for seed in range(3):
            snap = random_snapshot(cfg, InstanceSpec(groups=30, workers=5, load=1.5), seed)
            plan = create_policy(name, cfg).solve(snap)
            placed = [g for q in plan.virtual_queues.values() for g in q]
            assert sorted(placed) == sorted(g.group_id for g in snap.groups)
            workers = {w.worker_id: w for w in snap.workers}
            groups = {g.group_id: g for g in snap.groups}
            for wid, q in plan.virtual_queues.items():
                assert all(workers[wid].can_serve(groups[g].model) for g in q)
            kinds = enabled_kinds(cfg)
            assert all(op.kind in kinds for op in plan.operations)
            if not ops:
                assert plan.operations == []
            assert plan.source == name and set(plan.predicted_attainment) == set(groups)


def _one_worker_snapshot(cfg) -> ClusterSnapshot:
    """Four single-request groups on one idle worker: arrival, deadline, priority and
    prompt length each order them differently."""
    w = WorkerState("w0", "llama-8b", frozenset(), 0, 0, 1, (), WorkerProfile())
    rows = [  # id, class, arrived (s before now), prompt tokens
        ("a", "batch", 9.0, 50), ("b", "interactive", 1.5, 900), ("c", "standard", 6.0, 10), ("d", "batch", 3.0, 400)]
    groups = []
    for gid, cls, age, prompt in rows:
        sc = cfg.slo_classes[cls]
        groups.append(GroupState(gid, "llama-8b", cls, (gid,), (NOW - age,), (prompt,), (64,), sc.ttft_s,
                                 sc.priority, sc.weight, sc.latency_sensitive, worker_id="w0"))
    stats = {("llama-8b", c, 0): LengthStats(64.0, 32.0**2, 50) for c in cfg.slo_classes}
    return ClusterSnapshot(NOW, tuple(groups), (w,), stats, {})


def test_each_baseline_orders_by_its_key():
    """This test verifies that:
    1. FCFS serves in arrival order, EDF by deadline, strict priority by class priority then
       arrival, and SJF by prompt length;
    2. SJF promotes a group that has waited past `aging_s` ahead of shorter ones."""
    cfg = make_policy(1, operations=())
    snap = _one_worker_snapshot(cfg)
    order = {name: create_policy(name, cfg).solve(snap).virtual_queues["w0"] for name in BASELINES}
    assert order["fcfs"] == ["a", "c", "d", "b"]
    assert order["edf"] == ["b", "c", "a", "d"]  # deadlines from now: b +0.5 s, c +4 s, a +111 s, d +117 s
    assert order["priority"] == ["b", "c", "a", "d"]
    aged = make_policy(1, operations=()).model_copy(
        update={"planner": cfg.planner.model_copy(update={"aging_s": 100.0})})
    assert create_policy("sjf", aged).solve(snap).virtual_queues["w0"] == ["c", "a", "d", "b"]
    assert order["sjf"] == ["a", "c", "d", "b"]  # aging 5 s: a (9 s) and c (6 s) are promoted, oldest first


def test_model_aware_and_oblivious_fcfs_differ_on_a_busy_fleet():
    """This test verifies that:
    1. model-aware FCFS keeps a group on a worker already running its model, even behind
       a queue, while model-oblivious FCFS sends it to the worker that frees first and
       swaps that worker's model."""
    cfg = make_policy(2, operations=("model_swap", "load_balance"))
    busy = tuple(RunningRequest(f"r{i}", "old", "llama-8b", "batch", 100, 1, 512, False, NOW - 9, NOW - 8)
                 for i in range(4))
    w0 = WorkerState("w0", "llama-8b", frozenset(), 0, 0, 4, busy, WorkerProfile())
    w1 = WorkerState("w1", "mixtral-8x7b", frozenset(), 0, 0, 4, (), WorkerProfile())
    sc = cfg.slo_classes["batch"]
    g = GroupState("g", "llama-8b", "batch", ("q",), (NOW,), (100,), (64,), sc.ttft_s, sc.priority, sc.weight, False)
    stats = {(m, c, 0): LengthStats(64.0, 32.0**2, 50) for m in cfg.models for c in cfg.slo_classes}
    snap = ClusterSnapshot(NOW, (g,), (w0, w1), stats, {m: 26 * 2**30 for m in cfg.models})
    assert create_policy("fcfs", cfg).solve(snap).virtual_queues["w0"] == ["g"]
    assert create_policy("fcfs-oblivious", cfg).solve(snap).virtual_queues["w1"] == ["g"]


def test_placement_is_sticky_without_load_balancing():
    """This test verifies that:
    1. without `load_balance`, every baseline leaves an already-queued group on its worker;
    2. with it, groups may move (and the plan says so with MoveGroup operations)."""
    for name in ("edf", "fcfs"):
        cfg = make_policy(2, policy=name, operations=("evict",))
        snap = random_snapshot(cfg, InstanceSpec(groups=30, workers=5, load=1.5, placed_fraction=1.0), 4)
        plan = create_policy(name, cfg).solve(snap)
        where = {g: wid for wid, q in plan.virtual_queues.items() for g in q}
        assert all(where[g.group_id] == g.worker_id for g in snap.groups if g.worker_id is not None)
        cfg_lb = make_policy(2, policy=name, operations=("load_balance",))
        plan_lb = create_policy(name, cfg_lb).solve(snap)
        moved = {op.group_id for op in plan_lb.operations}
        assert moved == {g.group_id for g in snap.groups
                         if g.worker_id not in (None, plan_lb.queue_of(g.group_id))}


def test_baselines_preempt_for_latency_sensitive_groups_only_when_enabled():
    """This test verifies that:
    1. EDF with `preempt` on switches an MoE worker to expert-level preemption when an
       interactive group would otherwise miss its deadline behind a best-effort batch;
    2. with `preempt` off it does not."""
    for ops, expect in ((("preempt",), True), ((), False)):
        cfg = make_policy(2, policy="edf", operations=ops)
        running = tuple(RunningRequest(f"be{i}", "old", "mixtral-8x7b", "batch", 300, 2, 2048, False, NOW - 30,
                                       NOW - 29) for i in range(8))
        w = WorkerState("w0", "mixtral-8x7b", frozenset(), 10**6, 0, 8, running, WorkerProfile())
        sc = cfg.slo_classes["interactive"]
        g = GroupState("ls", "mixtral-8x7b", "interactive", ("q",), (NOW - 1.0,), (100,), (64,), sc.ttft_s,
                       sc.priority, sc.weight, True)
        stats = {(m, c, 0): LengthStats(400.0, 20.0**2, 100) for m in cfg.models for c in cfg.slo_classes}
        snap = ClusterSnapshot(NOW, (g,), (replace(w),), stats, {})
        ops_out = create_policy("edf", cfg).solve(snap).operations
        assert any(isinstance(op, SetPreemption) and op.mode == "expert" for op in ops_out) == expect
