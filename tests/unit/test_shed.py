"""QLM under overload (controller/policies/qlm/shed.py): the arrival history it learns from,
and the costly groups Moore-Hodgson serves last, with and without the work expected next."""

from __future__ import annotations

import pytest

from qlmserve.bench.instances import make_policy
from qlmserve.controller.policies import create_policy
from qlmserve.controller.policies.qlm.shed import ArrivalHistory, costly_groups
from qlmserve.controller.policies.qlm.tick import Tick
from qlmserve.controller.snapshot import ClusterSnapshot, GroupState, LengthStats, RunningRequest, WorkerState
from qlmserve.controller.solve_budget import WorkSolveClock
from qlmserve.operations.costs import WorkerProfile

pytestmark = pytest.mark.unit

MODEL = "llama-8b"
NOW = 1000.0


def _group(gid: str, cls: str, arrivals: tuple[float, ...], prompt: int, cfg) -> GroupState:
    sc = cfg.slo_classes[cls]
    n = len(arrivals)
    return GroupState(gid, MODEL, cls, tuple(f"{gid}-{i}" for i in range(n)), arrivals, (prompt,) * n, (64,) * n,
                      sc.ttft_s, sc.priority, sc.weight, sc.latency_sensitive)


def _snapshot(now: float, groups, running=()) -> ClusterSnapshot:
    # Outputs of 8 tokens: the cost of a request is its prefill (0.2 ms a prompt token).
    stats = {(MODEL, c, 0): LengthStats(8.0, 1.0, 100) for c in ("interactive", "standard", "batch")}
    w = WorkerState("w0", MODEL, frozenset(), 10**7, 0, 16, tuple(running), WorkerProfile())
    return ClusterSnapshot(now, tuple(groups), (w,), stats, {MODEL: 16 * 2**30})


def test_history_counts_each_arrival_once_and_forgets_old_ones():
    """This test verifies that:
    1. a request is counted in the snapshot whose clock first passes its arrival, whether it
       waits in a group or already runs, and not again in later snapshots;
    2. seconds older than the horizon are forgotten, from the running sums too;
    3. the expected arrivals repeat a history shorter than the horizon as often as it fits."""
    cfg = make_policy(1)
    h = ArrivalHistory(horizon_s=60.0)
    h.observe(_snapshot(10.0, [_group("g", "standard", (5.0, 9.0), 100, cfg)]))
    running = RunningRequest("r", "g0", MODEL, "standard", 300, 1, 64, False, 11.5, 11.6)
    h.observe(_snapshot(12.0, [_group("g", "standard", (5.0, 9.0, 11.0), 100, cfg)], [running]))
    counts = {sec: sum(b[0] for b in buckets.values()) for sec, buckets in h.seconds}
    assert counts == {5: 1, 9: 1, 11: 2}
    assert h.seconds[-1][1][(MODEL, "standard", 0)] == [2, 400]  # requests, prompt tokens
    assert h.totals == {(MODEL, "standard", 0): [4, 600]}
    # Two seconds seen, less than MIN_SPAN_S: the 10 s are repeated six times over 60 s.
    ahead = sorted(a for a, _k, _b in h.expected(12.0))
    assert len(ahead) == 18 and ahead[0] == pytest.approx(3.0) and ahead[-1] <= 60.0
    h.observe(_snapshot(80.0, []))
    assert [sec for sec, _ in h.seconds] == [] and h.totals == {}


def test_moore_hodgson_serves_the_costly_group_last_under_overload():
    """This test verifies that:
    1. one 40k-token request and twenty 500-token ones cannot all meet a 10 s target on one
       worker (8 s of prefill for the first, 2.5 s for the rest): the costly one is given up
       (it alone would cost every short one its SLO), and the plan serves it after them;
    2. with five short requests there is no overload and nothing is given up;
    3. latency-sensitive groups are never given up, however costly."""
    cfg = make_policy(1)
    big = _group("big", "standard", (NOW - 1.0,), 40_000, cfg)
    small = [_group(f"s{i}", "standard", (NOW - 0.5,), 500, cfg) for i in range(20)]
    policy = create_policy("qlm", cfg, WorkSolveClock())
    snap = _snapshot(NOW, [big, *small])
    assert costly_groups(Tick(policy, snap), set(), None) == {"big"}
    plan = policy.solve(snap)
    assert plan.virtual_queues["w0"][-1] == "big"
    assert all(plan.predicted_attainment[g.group_id] > 0.9 for g in small)
    few = _snapshot(NOW, [big, *small[:5]])
    assert costly_groups(Tick(policy, few), set(), None) == set()
    ls = _group("ls", "interactive", (NOW - 0.1,), 9_000, cfg)
    assert "ls" not in costly_groups(Tick(policy, _snapshot(NOW, [ls, big, *small])), set(), None)


def test_expected_arrivals_make_a_feasible_queue_overloaded():
    """This test verifies that:
    1. a waiting queue the worker can serve in time (one 40k-token request, three short
       ones) gives nothing up when nothing else is expected;
    2. after the policy saw 100 short requests arrive in a second, it expects as many every
       10 s (its history is shorter than MIN_SPAN_S), more than the worker serves beside
       the costly request: that one goes to the tail, behind the short ones that arrived
       after it."""
    cfg = make_policy(1)
    big = _group("big", "standard", (NOW - 1.0,), 40_000, cfg)
    small = [_group(f"s{i}", "standard", (NOW - 0.5,), 500, cfg) for i in range(3)]
    snap = _snapshot(NOW, [big, *small])
    policy = create_policy("qlm", cfg, WorkSolveClock())
    assert costly_groups(Tick(policy, snap), set(), policy.arrivals) == set()
    assert policy.solve(snap).virtual_queues["w0"][0] == "big"
    policy = create_policy("qlm", cfg, WorkSolveClock())
    burst = _group("burst", "standard", (NOW - 3.0,) * 100, 500, cfg)
    policy.observe(_snapshot(NOW - 2.0, [burst]))
    policy.observe(snap)
    assert costly_groups(Tick(policy, snap), set(), policy.arrivals) == {"big"}
    assert policy.solve(snap).virtual_queues["w0"][-1] == "big"


def test_output_heavy_fleets_give_nothing_up():
    """This test verifies that:
    1. where most of the fleet's work is output the requests have not produced yet (outputs
       of 2,000 tokens expected, prompts of 100), nothing is given up, however overloaded:
       the costs are the estimator's guesses;
    2. with shed_costly off, the policy that saw the burst of the test above keeps the
       costly request first: the waiting queue alone is feasible, and the program (which
       finds the same plan as the rule on a queue that is not) is not even run."""
    cfg = make_policy(1)
    groups = [_group(f"g{i}", "standard", (NOW - 0.5,), 100, cfg) for i in range(60)]
    snap = _snapshot(NOW, groups)
    stats = {(MODEL, c, 0): LengthStats(2000.0, 500.0**2, 100) for c in ("interactive", "standard", "batch")}
    heavy = ClusterSnapshot(NOW, snap.groups, snap.workers, stats, snap.model_bytes)
    policy = create_policy("qlm", cfg, WorkSolveClock())
    assert costly_groups(Tick(policy, heavy), set(), None) == set()
    off = cfg.model_copy(update={"planner": cfg.planner.model_copy(update={"shed_costly": False})})
    policy = create_policy("qlm", off, WorkSolveClock())
    burst = _group("burst", "standard", (NOW - 3.0,) * 100, 500, cfg)
    policy.observe(_snapshot(NOW - 2.0, [burst]))
    big = _group("big", "standard", (NOW - 1.0,), 40_000, cfg)
    small = [_group(f"s{i}", "standard", (NOW - 0.5,), 500, cfg) for i in range(3)]
    snap = _snapshot(NOW, [big, *small])
    policy.observe(snap)
    assert policy.solve(snap).virtual_queues["w0"][0] == "big"
