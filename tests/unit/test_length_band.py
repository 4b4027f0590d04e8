"""Length bands (controller/length_band.py): the band of a prompt, output lengths learned
per band, and the groups of one (model, class) split by band in the simulator."""

from __future__ import annotations

import pytest

from qlmserve.bench.instances import make_policy
from qlmserve.controller.cluster_view import ClusterView, build_snapshot
from qlmserve.controller.estimator import LengthLearner, with_running
from qlmserve.controller.estimator.lengths import parse_moments_key
from qlmserve.controller.length_band import CLASS_WIDE, length_band
from qlmserve.controller.policy import PolicyConfig
from qlmserve.controller.snapshot import ClusterSnapshot, RunningRequest
from qlmserve.sim.request import SimRequest
from qlmserve.sim.waiting import WaitingGroups

pytestmark = pytest.mark.unit

MODEL, CLASS = "llama-8b", "batch"


def test_bands_are_half_open_in_log2_of_the_prompt():
    """This test verifies that:
    1. with 2 bands per octave, 512-724 tokens share a band (2^9.5 = 724.1), 725 starts the next;
    2. banding off (0) puts every prompt in the class-wide band;
    3. a prompt of one token (or none) has the lowest band, never the class-wide one;
    4. latency-sensitive requests are not banded (their groups stay whole)."""
    assert length_band(512, 2) == length_band(724, 2) == 19
    assert length_band(725, 2) == 20 and length_band(1024, 2) == 21
    assert length_band(5000, 0) == length_band(1, 0) == CLASS_WIDE
    assert length_band(1, 2) == length_band(0, 2) == 1
    assert length_band(5000, 2, latency_sensitive=True) == CLASS_WIDE


def test_a_band_learns_its_own_lengths_and_an_unseen_band_reads_the_class():
    """This test verifies that:
    1. a band's figure is the prior plus that band's observations only;
    2. the class-wide figure (band 0) is the prior plus every band's observations, and the
       snapshot reads it for a band with nothing learned;
    3. a request still running counts (right-censored) in its band and in the class;
    4. a moments key written before bands ([model, class]) reads as the class-wide band."""
    cfg = make_policy(1)
    prior = cfg.models[MODEL].output_prior
    learner = LengthLearner(cfg)
    for _ in range(prior.weight):
        learner.observe(MODEL, CLASS, 400, band=20)
        learner.observe(MODEL, CLASS, 40, band=18)
    assert learner.stats(MODEL, CLASS, 20).mean == pytest.approx((prior.mean + 400) / 2)
    assert learner.stats(MODEL, CLASS, 18).mean == pytest.approx((prior.mean + 40) / 2)
    assert learner.stats(MODEL, CLASS).mean == pytest.approx((prior.mean + 440) / 3)
    stats = learner.length_stats()
    snap = ClusterSnapshot(0.0, (), (), stats, {})
    assert snap.lengths(MODEL, CLASS, 20) == stats[(MODEL, CLASS, 20)]
    assert snap.lengths(MODEL, CLASS, 7) == stats[(MODEL, CLASS, CLASS_WIDE)]  # unseen band
    long_runner = RunningRequest("r", "g", MODEL, CLASS, 40, 900, 4096, False, 0.0, 1.0, length_band=18)
    fixed = with_running(stats, [long_runner])
    assert fixed[(MODEL, CLASS, 18)].mean > stats[(MODEL, CLASS, 18)].mean
    assert fixed[(MODEL, CLASS, CLASS_WIDE)].mean > stats[(MODEL, CLASS, CLASS_WIDE)].mean
    assert fixed[(MODEL, CLASS, 20)] == stats[(MODEL, CLASS, 20)]
    assert parse_moments_key('["m", "c"]') == ("m", "c", CLASS_WIDE)
    assert parse_moments_key('["m", "c", 5]') == ("m", "c", 5)


def _req(rid: str, prompt: int, band: int) -> SimRequest:
    return SimRequest(rid=rid, model="m", slo_class="c", group_id="", prompt_tokens=prompt, output_tokens=10,
                      max_tokens=100, arrival=0.0, ttft_s=30.0, tpot_s=None, latency_sensitive=False, priority=0,
                      length_band=band)


def test_requests_of_one_class_group_by_band():
    """This test verifies that:
    1. requests of one (model, class) in one window join one group per band;
    2. the snapshot's groups carry their band (what the estimator reads lengths by)."""
    cfg = PolicyConfig.model_validate({
        "slo_classes": {"c": {"ttft_s": 30.0}}, "models": {"m": {"max_context": 4096}},
        "grouping": {"length_bands_per_octave": 2}, "planner": {"policy": "fcfs", "operations": []}})
    w = WaitingGroups(cfg)
    per = cfg.grouping.length_bands_per_octave
    for rid, p in (("a", 600), ("b", 800), ("c", 700), ("d", 1000)):
        w.join(_req(rid, p, length_band(p, per)), 0.0)
    views = w.views()
    assert [[r.request_id for r in v.waiting] for v in views] == [["a", "c"], ["b", "d"]]
    snap = build_snapshot(ClusterView(0.0, views, (), {}), cfg, {}, {})
    assert [g.length_band for g in snap.groups] == [length_band(600, per), length_band(800, per)]
