"""Model placement (controller/policies/placement.py): the backlog rule that the backlog
baseline and QLM's placement stage share."""

from __future__ import annotations

from dataclasses import replace

import pytest

from qlmserve.bench.instances import make_policy
from qlmserve.controller.policies import create_policy
from qlmserve.controller.policies.placement import PlacementState, backlog_rule, restrict_to_targets
from qlmserve.controller.snapshot import ClusterSnapshot, GroupState, LengthStats, RunningRequest, WorkerState
from qlmserve.controller.solve_budget import WorkSolveClock
from qlmserve.operations.costs import WorkerProfile
from qlmserve.operations.ops import LoadModel

pytestmark = pytest.mark.unit

LLAMA, MIXTRAL = "llama-8b", "mixtral-8x7b"
NOW = 1000.0


def _group(gid: str, model: str, size: int, cfg) -> GroupState:
    sc = cfg.slo_classes["standard"]
    return GroupState(gid, model, "standard", tuple(f"{gid}-{i}" for i in range(size)), (NOW - 1,) * size,
                      (200,) * size, (512,) * size, sc.ttft_s, sc.priority, sc.weight, sc.latency_sensitive)


def _running(wid: str, model: str, n: int, swapped: bool = False) -> tuple[RunningRequest, ...]:
    return tuple(RunningRequest(f"{wid}-r{i}", "old", model, "standard", 300, 10, 1024, False, NOW - 20, NOW - 15,
                                swapped=swapped) for i in range(n))


def _worker(wid: str, model: str, running=(), warm=frozenset()) -> WorkerState:
    return WorkerState(wid, model, frozenset(warm), 10**6, 0, 16, tuple(running), WorkerProfile())


def _snap(cfg, groups, workers, now=NOW) -> ClusterSnapshot:
    stats = {(m, c, 0): LengthStats(100.0, 50.0**2, 100) for m in cfg.models for c in cfg.slo_classes}
    return ClusterSnapshot(now, tuple(groups), tuple(workers), stats, {m: 16 * 2**30 for m in cfg.models})


def test_switch_stays_pending_while_the_worker_drains():
    """This test verifies that:
    1. a backlog of one model beyond its workers' free slots moves one busy worker of the
       other model to it, a warm holder of the model first;
    2. while that worker still drains its old requests, the next call keeps it on the new
       model (without the pending switch it went back to its old work and never switched);
    3. the pending switch ends once the worker serves the new model."""
    cfg = make_policy(2)
    busy = [_worker("w0", LLAMA, _running("w0", LLAMA, 4)), _worker("w1", LLAMA, _running("w1", LLAMA, 4), {MIXTRAL}),
            _worker("w2", MIXTRAL, _running("w2", MIXTRAL, 16))]
    groups = [_group(f"g{i}", MIXTRAL, 16, cfg) for i in range(4)] + [_group("l0", LLAMA, 1, cfg)]
    state = PlacementState()
    switches = backlog_rule(_snap(cfg, groups, busy), state, threshold=16, cooldown_s=60)
    assert [(s.worker_id, s.model) for s in switches] == [("w1", MIXTRAL)]
    later = _snap(cfg, groups, busy, NOW + 1)
    assert backlog_rule(later, state, threshold=16, cooldown_s=60) == []
    assert state.targets(later)["w1"] == MIXTRAL
    placed = restrict_to_targets(later, state.targets(later))
    assert not placed.worker("w1").can_serve(LLAMA) and placed.worker("w1").can_serve(MIXTRAL)
    loaded = [busy[0], replace(busy[1], active_model=MIXTRAL, running=()), busy[2]]
    assert state.targets(_snap(cfg, groups, loaded, NOW + 20))["w1"] == MIXTRAL
    assert "w1" not in state.pending


def test_no_model_starves_and_swapped_requests_are_not_stranded():
    """This test verifies that:
    1. a model no worker serves gets a worker even inside the cooldown;
    2. a worker holding swapped-out requests is never the donor (they resume only on their
       own model), so the other worker moves."""
    cfg = make_policy(2)
    workers = [_worker("w0", LLAMA, _running("w0", LLAMA, 2, swapped=True)), _worker("w1", LLAMA)]
    state = PlacementState(switched_at={"w0": NOW - 1, "w1": NOW - 1})
    switches = backlog_rule(_snap(cfg, [_group("m", MIXTRAL, 1, cfg)], workers), state, threshold=16, cooldown_s=60)
    assert [(s.worker_id, s.model) for s in switches] == [("w1", MIXTRAL)]


def test_qlm_follows_the_placement_stage():
    """This test verifies that QLM with model_placement "rule" loads the waiting model on
    the worker the rule chose (the warm one) and queues that model's groups there only."""
    cfg = make_policy(2, operations=("model_swap", "load_balance", "warm_start"))
    cfg = cfg.model_copy(update={"planner": cfg.planner.model_copy(update={"model_placement": "rule"})})
    workers = [_worker("w0", LLAMA), _worker("w1", LLAMA, warm={MIXTRAL})]
    snap = _snap(cfg, [_group(f"g{i}", MIXTRAL, 3, cfg) for i in range(3)], workers)
    plan = create_policy("qlm", cfg, WorkSolveClock()).solve(snap)
    assert [op for op in plan.operations if isinstance(op, LoadModel)] == [
        LoadModel("w1", MIXTRAL, reason="planned model swap")]
    assert sorted(plan.virtual_queues["w1"]) == ["g0", "g1", "g2"] and not plan.virtual_queues["w0"]
    assert "w1 -> mixtral-8x7b" in plan.note
