"""The request-level policy per SLO class: the order of the requests inside a group."""

from __future__ import annotations

import pytest

from qlmserve.controller.cluster_view import ClusterView, GroupView, RequestView, StateCache, build_snapshot
from qlmserve.controller.policy import PolicyConfig
from qlmserve.controller.request_order import order_requests
from qlmserve.sim.driver import SimOptions, Simulation
from qlmserve.sim.fleet import uniform_fleet
from qlmserve.traces import WorkloadRequest


def _cfg(order: str, aging: float | None = None, batch: int = 16) -> PolicyConfig:
    cls = {"ttft_s": 60.0, "request_order": order}
    if aging is not None:
        cls["aging_s"] = aging
    return PolicyConfig.model_validate({
        "max_running_per_worker": batch, "slo_classes": {"c": cls},
        "models": {"llama-2-7b": {"max_context": 4096}}, "planner": {"policy": "fcfs", "operations": []},
        # one group for prompts of any length: the order inside a group is what is tested
        "grouping": {"length_bands_per_octave": 0}})


def _rv(rid: str, arrival: float, prompt: int) -> RequestView:
    return RequestView(rid, "g", "llama-2-7b", "c", arrival, prompt, 100)


def test_each_order_and_aging():
    """This test verifies that:
    1. fcfs keeps arrival order, sjf sorts by prompt (a requeued request's tokens count);
    2. priority_aging promotes requests waiting past aging_s ahead of shorter unaged ones,
       oldest first, and sorts the rest shortest first;
    3. a bad order names the field."""
    reqs = [_rv("a", 0.0, 900), _rv("b", 1.0, 50), _rv("c", 2.0, 400), _rv("d", 9.0, 10)]
    ids = lambda cfg, now: [r.request_id for r in order_requests(reqs, cfg.slo_classes["c"], cfg, now)]  # noqa: E731
    assert ids(_cfg("fcfs"), 10.0) == ["a", "b", "c", "d"]
    assert ids(_cfg("sjf"), 10.0) == ["d", "b", "c", "a"]
    requeued = [_rv("x", 0.0, 40), RequestView("y", "g", "llama-2-7b", "c", 1.0, 30, 100, generated_tokens=20)]
    assert [r.request_id for r in order_requests(requeued, _cfg("sjf").slo_classes["c"], _cfg("sjf"), 5.0)] == ["x", "y"]
    assert ids(_cfg("priority_aging", aging=9.5), 10.0) == ["a", "d", "b", "c"]  # only a has waited 9.5 s
    assert ids(_cfg("priority_aging", aging=8.5), 10.0) == ["a", "b", "d", "c"]  # a and b aged
    with pytest.raises(ValueError, match="request_order"):
        _cfg("lifo")


def test_snapshot_builder_orders_groups_and_reorders_as_they_age():
    """This test verifies that:
    1. build_snapshot (the builder the controller and the simulator share) gives a group's
       requests, arrivals and prompts in the class's order;
    2. with aging, the same cached view is reordered once a request has waited past aging_s."""
    cfg = _cfg("priority_aging", aging=5.0)
    g = GroupView("g", "llama-2-7b", "c", 0.0, (_rv("a", 0.0, 900), _rv("b", 1.0, 50)))
    cache = StateCache()
    s1 = build_snapshot(ClusterView(3.0, (g,), (), {}), cfg, {}, {}, cache)
    assert s1.groups[0].request_ids == ("b", "a") and s1.groups[0].prompt_tokens == (50, 900)
    assert s1.groups[0].arrivals == (1.0, 0.0)
    s2 = build_snapshot(ClusterView(6.0, (g,), (), {}), cfg, {}, {}, cache)
    assert s2.groups[0].request_ids == ("a", "b")


def test_simulator_serves_a_group_in_its_class_order():
    """This test verifies that:
    1. on the simulator, with one batch slot, a group's requests get their first tokens in
       the class's order: by arrival under fcfs, shortest prompt first under sjf."""
    fleet = uniform_fleet(1, "A100-80GB", ["llama-2-7b"], max_batch_size=1)
    prompts = {"r0": 3000, "r1": 100, "r2": 1500}
    wl = [WorkloadRequest(rid, 0.05 + 0.001 * i, "llama-2-7b", "c", p, 20, "", None, i, 0)
          for i, (rid, p) in enumerate(prompts.items())]
    firsts = {}
    for order in ("fcfs", "sjf"):
        res = Simulation(_cfg(order, batch=1), fleet, wl, options=SimOptions(wake_on_urgent=False)).run()
        assert len({r.group_id for r in res.requests}) == 1  # one group
        firsts[order] = [r.rid for r in sorted(res.requests, key=lambda r: r.first_token_at)]
    assert firsts == {"fcfs": ["r0", "r1", "r2"], "sjf": ["r1", "r2", "r0"]}
