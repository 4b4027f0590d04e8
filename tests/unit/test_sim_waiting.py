"""The simulator's waiting groups, kept up to date from what changed, and the snapshot
builder's reuse of unchanged groups (issue 13)."""

from __future__ import annotations

from dataclasses import replace

from qlmserve.controller.cluster_view import ClusterView, GroupView, RequestView, StateCache, build_snapshot
from qlmserve.controller.policy import PolicyConfig
from qlmserve.sim.driver import SimOptions, Simulation
from qlmserve.sim.fleet import uniform_fleet
from qlmserve.sim.request import SimRequest
from qlmserve.sim.waiting import WaitingGroups
from qlmserve.traces import WorkloadRequest

MODELS = ("llama-2-7b", "mistral-7b")


def _cfg(policy: str = "fcfs") -> PolicyConfig:
    return PolicyConfig.model_validate({
        "max_running_per_worker": 4, "slo_classes": {"c": {"ttft_s": 30.0}},
        "models": {m: {"max_context": 4096} for m in MODELS},
        "grouping": {"window_s": 2.0, "max_group_size": 64}, "planner": {"policy": policy, "operations": []}})


def _req(rid: str, model: str, arrival: float) -> SimRequest:
    return SimRequest(rid=rid, model=model, slo_class="c", group_id="", prompt_tokens=100, output_tokens=10,
                      max_tokens=100, arrival=arrival, ttft_s=30.0, tpot_s=None, latency_sensitive=False, priority=0)


def _ids(views: tuple[GroupView, ...]) -> list[list[str]]:
    return [[r.request_id for r in v.waiting] for v in views]


def test_waiting_groups_keep_opening_order_and_unchanged_views():
    """This test verifies that:
    1. views list the groups with requests waiting in the order they opened;
    2. an open group that emptied and refills comes back at its place, not at the end;
    3. a group that did not change keeps its view object (its cached state stays);
    4. an empty group is forgotten once closed, and a request requeued to it reopens it
       at the end of the order."""
    w = WaitingGroups(_cfg())
    r1, r2, r3, r4 = _req("r1", MODELS[0], 0.0), _req("r2", MODELS[1], 0.1), _req("r3", MODELS[0], 0.5), \
        _req("r4", MODELS[0], 3.0)
    w.join(r1, 0.0)
    w.join(r2, 0.1)
    first = w.views()
    assert _ids(first) == [["r1"], ["r2"]]
    w.remove(r1)
    assert w.forget_empty() == [] and _ids(w.views()) == [["r2"]]  # empty but still open
    w.join(r3, 0.5)
    again = w.views()
    assert _ids(again) == [["r3"], ["r2"]] and again[1] is first[1]
    w.join(r4, 3.0)  # the window passed: a new group opens, r3's group closes
    w.remove(r3)
    assert w.forget_empty() == [r1.group_id] and _ids(w.views()) == [["r2"], ["r4"]]
    w.requeue(r1)
    assert _ids(w.views()) == [["r2"], ["r4"], ["r1"]]


def test_state_cache_moves_an_unchanged_group_without_rebuilding_it():
    """This test verifies that:
    1. the same view at the same place gives the same state object;
    2. at another place it gives the state dataclasses.replace would, deadline included."""
    cfg = _cfg()
    g = GroupView("g", MODELS[0], "c", 0.0, (RequestView("a", "g", MODELS[0], "c", 1.0, 100, 50),))
    view = ClusterView(5.0, (g,), (), {})
    cache = StateCache()
    s1 = build_snapshot(view, cfg, {"g": ("w0", 2)}, {}, cache).groups[0]
    assert s1.deadline == 31.0
    assert build_snapshot(view, cfg, {"g": ("w0", 2)}, {}, cache).groups[0] is s1
    s2 = build_snapshot(view, cfg, {"g": ("w1", 0)}, {}, cache).groups[0]
    assert s2 == replace(s1, worker_id="w1", position=0) and s2.deadline == 31.0
    assert (s1.worker_id, s1.position) == ("w0", 2)


def test_every_snapshot_matches_the_groups_the_simulator_holds():
    """This test verifies that:
    1. on an overloaded run (groups open, empty, close and requests come back), every
       snapshot holds exactly the simulator's groups with requests waiting, in opening
       order, each with its waiting requests and its place in the last plan."""
    fleet = uniform_fleet(2, "A100-80GB", list(MODELS), max_batch_size=4)
    wl = [WorkloadRequest(f"r{i}", 0.05 * i, MODELS[i % 2], "c", 200 + 37 * (i % 11), 40 + 13 * (i % 7), "", None, i, 0)
          for i in range(400)]
    checked = []

    def check(sim: Simulation, snap, plan) -> None:
        want = [g for g in sim.waiting.groups.values() if g.waiting]
        assert [g.group_id for g in snap.groups] == [g.group_id for g in want]
        assert [list(g.request_ids) for g in snap.groups] == [[r.rid for r in g.waiting] for g in want]
        for g in snap.groups:
            assert (g.worker_id, g.position) == sim._positions.get(g.group_id, (None, 0))
        checked.append(len(snap.groups))

    Simulation(_cfg("edf"), fleet, wl, options=SimOptions(observers=[check], drain_s=5.0)).run()
    assert max(checked) > 5
