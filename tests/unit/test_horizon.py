"""The planning head of deep queues (controller/policies/horizon.py)."""

from __future__ import annotations

from qlmserve.controller.policies.horizon import HEAD_PER_WORKER, MIN_HEAD, planning_head
from qlmserve.controller.snapshot import ClusterSnapshot, GroupState, WorkerState
from qlmserve.operations.costs import WorkerProfile
from qlmserve.operations.plan import Plan

NOW = 1000.0


def _group(gid: str, arrival: float, ttft_s: float = 600.0, size: int = 2, model: str = "m") -> GroupState:
    return GroupState(group_id=gid, model=model, slo_class="c", request_ids=tuple(f"{gid}-{i}" for i in range(size)),
                      arrivals=(arrival,) * size, prompt_tokens=(10,) * size, max_tokens=(10,) * size, ttft_s=ttft_s,
                      priority=0, weight=1.0, latency_sensitive=False)


def _worker(wid: str, healthy: bool = True, serves: frozenset[str] | None = None) -> WorkerState:
    return WorkerState(wid, "m", frozenset(), 10**6, 0, 8, (), WorkerProfile(), healthy=healthy,
                       servable_models=serves)


def test_head_tails_and_new_groups():
    """This test verifies that:
    1. with few groups (up to twice the head) everything is planned (no head);
    2. deep queues: the head is the first HEAD_PER_WORKER groups of each worker's queue,
       the tails keep the last plan's order, and `extend` puts each tail behind the
       head's plan;
    3. a new group due before every tail deadline still ahead joins the head; a later one
       joins the shortest tail of a worker serving its model; a worker that stopped
       taking work has all its groups planned."""
    workers = (_worker("w0"), _worker("w1"), _worker("w2", serves=frozenset({"other"})))
    size = max(MIN_HEAD, HEAD_PER_WORKER * len(workers))
    few = [_group(f"g{i}", NOW - 100 + i) for i in range(2 * size)]
    last = Plan(virtual_queues={"w0": [g.group_id for g in few]})
    assert planning_head(ClusterSnapshot(NOW, tuple(few), workers), last) is None

    n = 3 * size
    old = [_group(f"g{i:03d}", NOW - 500 + i) for i in range(n)]  # deadlines NOW + 100 + i
    q0 = [g.group_id for g in old[: 2 * n // 3]]  # w1 gets the shorter tail
    q1 = [g.group_id for g in old[2 * n // 3:]]
    last = Plan(virtual_queues={"w0": q0, "w1": q1})
    urgent = _group("new-urgent", NOW - 1, ttft_s=5.0)  # deadline NOW + 4: before every tail
    late = _group("new-late", NOW, ttft_s=600.0, size=50)  # deadline NOW + 600: after them
    snap = ClusterSnapshot(NOW, tuple(old) + (urgent, late), workers)
    head = planning_head(snap, last)
    assert head is not None
    planned = {g.group_id for g in head.snapshot.groups}
    assert planned == set(q0[:HEAD_PER_WORKER]) | set(q1[:HEAD_PER_WORKER]) | {"new-urgent"}
    assert head.tails["w0"] == q0[HEAD_PER_WORKER:]
    assert head.tails["w1"][:-1] == q1[HEAD_PER_WORKER:] and head.tails["w1"][-1] == "new-late"
    assert "w2" not in head.tails  # it does not serve model m
    plan = head.extend(Plan(virtual_queues={"w0": ["new-urgent", *q0[:HEAD_PER_WORKER]],
                                            "w1": q1[:HEAD_PER_WORKER]}))
    assert plan.virtual_queues["w0"] == ["new-urgent", *q0]
    assert plan.virtual_queues["w1"] == [*q1, "new-late"]

    # w1 went away: its whole queue is planned again.
    gone = (workers[0], _worker("w1", healthy=False), workers[2])
    head = planning_head(ClusterSnapshot(NOW, tuple(old), gone), last)
    assert {g.group_id for g in head.snapshot.groups} >= set(q1) and "w1" not in head.tails
