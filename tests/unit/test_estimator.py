"""The RWT estimator: learned lengths, remaining lengths, the queue model's calibration
against exact replays, and the agreement of its two evaluation paths."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from qlmserve.bench.instances import InstanceSpec, make_policy, random_snapshot
from qlmserve.bench.replay import gamma_sampler, replay_ttft
from qlmserve.controller.estimator import (
    Forecaster,
    LengthLearner,
    Moments,
    RecentMoments,
    WaitEstimate,
    merge_moments,
    predict_group_wait,
    prob_within_array,
    quantile_array,
    remaining_moments,
    with_running,
)
from qlmserve.controller.policies import create_policy
from qlmserve.controller.snapshot import ClusterSnapshot, GroupState, RunningRequest, WorkerState
from qlmserve.operations.costs import WorkerProfile

pytestmark = pytest.mark.unit

MODEL, CLASS = "llama-8b", "batch"


def test_length_learner_blends_prior_and_observations():
    """This test verifies that:
    1. before any request finishes, the stats are the policy's prior (mean, std);
    2. the prior counts as `weight` pseudo-observations: after as many observations of x,
       the mean is half-way between the prior mean and x;
    3. the persisted state holds observations only, survives dumps/loads and Redis-field
       round trips, and merges by summing (two controllers' deltas add up)."""
    cfg = make_policy(1)
    prior = cfg.models[MODEL].output_prior
    learner = LengthLearner(cfg)
    st = learner.stats(MODEL, CLASS)
    assert st.mean == pytest.approx(prior.mean) and st.std == pytest.approx(prior.std)
    for _ in range(prior.weight):
        learner.observe(MODEL, CLASS, 400)
    assert learner.stats(MODEL, CLASS).mean == pytest.approx((prior.mean + 400) / 2)
    assert learner.state()[(MODEL, CLASS, 0)] == Moments(prior.weight, 400.0 * prior.weight, 160000.0 * prior.weight)
    again = LengthLearner(cfg, LengthLearner.loads(learner.dumps()))
    assert again.stats(MODEL, CLASS) == learner.stats(MODEL, CLASS)
    m = learner.state()[(MODEL, CLASS, 0)]
    assert Moments.from_fields({k: v.encode() for k, v in m.to_fields().items()}) == m
    other = LengthLearner(cfg)
    other.observe(MODEL, CLASS, 10)
    merged = merge_moments(learner.state(), other.state())
    assert merged[(MODEL, CLASS, 0)] == m + Moments.of(10)
    assert set(learner.length_stats()) >= {(m, c, 0) for m in cfg.models for c in cfg.slo_classes}


def test_running_requests_correct_the_short_bias_of_finished_ones():
    """This test verifies that:
    1. lengths learned from the requests finished by time T of a batch that started at once
       are biased short (the long ones still run);
    2. counting the running ones as censored at the tokens they produced (with_running)
       brings the mean and std back to within 5% of the true law's."""
    cfg = make_policy(1)  # its prior (20 pseudo-requests) weighs little against 4,000
    rng = np.random.default_rng(7)
    true_mean, true_std = 300.0, 200.0
    k = (true_mean / true_std) ** 2
    lengths = np.maximum(1, rng.gamma(k, true_mean / k, size=4000).round())
    t = 250  # decode steps so far: every request has produced min(L, t) tokens
    learner = LengthLearner(cfg)
    for x in lengths[lengths <= t]:
        learner.observe(MODEL, CLASS, int(x))
    running = [RunningRequest(f"r{i}", "g", MODEL, CLASS, 100, t, 100_000, False, 0.0, 1.0)
               for i in range(int((lengths > t).sum()))]
    biased = learner.stats(MODEL, CLASS)
    assert biased.mean < 0.7 * true_mean
    fixed = learner.length_stats(running)[(MODEL, CLASS, 0)]
    assert fixed.mean == pytest.approx(true_mean, rel=0.05)
    assert fixed.std == pytest.approx(true_std, rel=0.05)
    assert with_running({}, running) == {}  # nothing learned of that (model, class): nothing to correct


def test_recent_moments_forget_with_the_half_life():
    """This test verifies that:
    1. the first update takes the whole history; with half-life 0 nothing is forgotten;
    2. observations one half-life old count half as much as new ones, so after a shift
       of the lengths the mean moves to the new ones faster than cumulative moments do;
    3. a history that shrinks (a fresh store) restarts the view from it."""
    key = (MODEL, CLASS)
    old = Moments(100.0, 100.0 * 100, 100.0 * 100**2)
    new = old + Moments(100.0, 100.0 * 300, 100.0 * 300**2)
    assert RecentMoments(0).update(50.0, {key: new}) == {key: new}
    view = RecentMoments(60.0)
    assert view.update(0.0, {key: old}) == {key: old}
    got = view.update(60.0, {key: new})[key]
    assert got.count == pytest.approx(150.0)
    assert got.total / got.count == pytest.approx((50 * 100 + 100 * 300) / 150)  # 233 vs 200 cumulative
    assert view.update(61.0, {key: Moments.of(7)})[key] == Moments.of(7)


@pytest.mark.parametrize("shape", [0.5, 1.0, 4.0])
def test_remaining_length_conditions_on_progress(shape: float):
    """This test verifies that:
    1. the mean and variance of a request's remaining tokens, given the tokens it has
       produced and its max_tokens, match a Monte Carlo of the same gamma law;
    2. the memoryless case (shape 1) keeps the full mean whatever was produced, a heavy
       tail (shape < 1) grows it, a light one (shape > 1) shrinks it."""
    rng = np.random.default_rng(1)
    mean = 150.0
    draws = rng.gamma(shape, mean / shape, size=400_000)
    cap = 600.0
    rems = []
    for gen in (0.0, 100.0, 250.0):
        alive = draws[draws > gen]
        truth = np.minimum(alive, cap) - gen
        m, v = remaining_moments(mean, mean**2 / shape, cap, gen)
        assert float(m) == pytest.approx(truth.mean(), rel=0.03)
        assert float(v) == pytest.approx(truth.var(), rel=0.08)
        m_uncapped, _ = remaining_moments(mean, mean**2 / shape, 1e9, gen)
        rems.append(float(m_uncapped))
    if shape == 1.0:
        assert rems == pytest.approx([mean] * 3, rel=1e-3)
    elif shape < 1:
        assert rems[0] < rems[1] < rems[2]
    else:
        assert rems[0] > rems[1] > rems[2]


def _one_worker(groups: list[int], running: int, slots: int, learned: dict) -> ClusterSnapshot:
    rng = np.random.default_rng(3)
    run = tuple(RunningRequest(f"r{i}", "old", MODEL, CLASS, 200, int(rng.integers(1, 150)), 4096, False, -5.0, -1.0)
                for i in range(running))
    w = WorkerState("w0", MODEL, frozenset(), 0, 0, slots, run, WorkerProfile())
    gs = tuple(GroupState(f"g{k}", MODEL, CLASS, tuple(f"q{k}-{j}" for j in range(n)), (0.0,) * n, (300,) * n,
                          (4096,) * n, 1000.0, 0, 1.0, False, worker_id="w0", position=k)
               for k, n in enumerate(groups))
    return ClusterSnapshot(0.0, gs, (w,), learned, {})


@pytest.mark.parametrize("case", ["deep queue", "first free slots", "heavy tail"])
def test_queue_quantiles_are_calibrated_against_exact_replays(case: str):
    """This test verifies that:
    1. with output lengths drawn from a known gamma law and the length distribution
       learned from finished requests (LengthLearner), the estimator's beta-quantile of a
       queued group's TTFT covers the TTFT of exact replays of the same continuous-batching
       service model about beta of the time, for beta = 0.5, 0.9 and 0.99;
    2. this holds deep in a queue (the CLT regime) and for the first slots to free up
       (order statistics of the running requests, right-skewed), for a heavy-tailed law too."""
    mean, std, groups, running, slots = {
        "deep queue": (128.0, 128.0, [6, 6, 6, 6, 6], 8, 8),
        "first free slots": (128.0, 100.0, [2], 8, 8),
        "heavy tail": (128.0, 250.0, [4, 4, 4, 4], 12, 16),
    }[case]
    cfg = make_policy(1)
    learner = LengthLearner(cfg)
    k = (mean / std) ** 2
    for x in np.random.default_rng(11).gamma(k, mean / k, size=4000):
        learner.observe(MODEL, CLASS, float(x))
    snap = _one_worker(groups, running, slots, learner.length_stats())
    queues = {"w0": [g.group_id for g in snap.groups]}
    last = snap.groups[-1].group_id
    timing = Forecaster(snap).evaluate(queues)[last].timing
    truth = gamma_sampler(ClusterSnapshot(0.0, (), (), {(MODEL, CLASS, 0): snap.lengths(MODEL, CLASS)}, {}))
    rng = np.random.default_rng(5)
    runs = [replay_ttft(snap, queues, truth, rng)[last] for _ in range(1500)]
    firsts = np.array([r[0] for r in runs])
    lasts = np.array([r[-1] for r in runs])
    tol = {0.5: 0.09, 0.9: 0.05, 0.99: 0.02}
    for est, real in ((timing.first, firsts), (timing.last, lasts)):
        for beta, t in tol.items():
            coverage = float(np.mean(real <= est.quantile(beta)))
            assert abs(coverage - beta) <= t, (case, beta, coverage)


def test_vectorised_evaluation_matches_the_queue_cursor():
    """This test verifies that:
    1. Forecaster.evaluate (vectorised over every queue at once) gives the same first and
       last TTFT moments and the same attainment as walking each queue with QueueCursor,
       with model swaps inside queues, protected workers and cleared workers;
    2. the elementwise quantile and probability helpers equal their scalar versions."""
    cfg = make_policy(2)
    for seed in range(4):
        snap = random_snapshot(cfg, InstanceSpec(groups=40, workers=5), seed)
        plan = create_policy("fcfs-oblivious", cfg).solve(snap)  # mixes models within queues
        fc = Forecaster(snap)
        prot, cleared = [w.worker_id for w in snap.workers[:2]], [snap.workers[3].worker_id]
        got = fc.evaluate(plan.virtual_queues, prot, cleared)
        assert len(got) == len(snap.groups)
        for wid, queue in plan.virtual_queues.items():
            cur = fc.cursor(wid, wid in prot, wid in cleared)
            for gid in queue:
                t = cur.push(fc.groups[gid])
                f = got[gid]
                for a, b in ((t.first, f.timing.first), (t.last, f.timing.last)):
                    assert a.mean_s == pytest.approx(b.mean_s, abs=1e-9)
                    assert a.var_s2 == pytest.approx(b.var_s2, abs=1e-9)
                n = len(f.slack_s)
                slow = sum(t.request_ttft(i, n).prob_within(s) for i, s in enumerate(f.slack_s)) / n
                assert f.attainment() == pytest.approx(slow, abs=1e-9)
    rng = np.random.default_rng(0)
    mean, var, t = rng.uniform(0, 10, 500), rng.uniform(0, 5, 500) ** 2, rng.uniform(-1, 12, 500)
    var[:20] = 0.0
    for beta in (0.1, 0.5, 0.9, 0.99):
        q = quantile_array(mean, var, beta)
        assert q == pytest.approx([WaitEstimate(m, v).quantile(beta) for m, v in zip(mean, var)])
    p = prob_within_array(mean, var, t)
    assert p == pytest.approx([WaitEstimate(m, v).prob_within(x) for m, v, x in zip(mean, var, t)])


def test_wait_estimate_shape():
    """This test verifies that:
    1. a wait with a large gamma shape has the normal (CLT) quantile mean + z * sd;
    2. a skewed short wait has its median below its mean;
    3. prob_within inverts quantile."""
    deep = WaitEstimate(100.0, 4.0)
    assert deep.quantile(0.9) == pytest.approx(100.0 + 1.2815515655 * 2.0)
    short = WaitEstimate(1.0, 0.8)
    assert short.quantile(0.5) < 1.0
    for w in (deep, short, WaitEstimate(3.0, 9.0)):
        for beta in (0.2, 0.5, 0.9, 0.99):
            assert w.prob_within(w.quantile(beta)) == pytest.approx(beta, abs=1e-6)


def test_predicted_wait_grows_with_work_ahead_and_model_swaps():
    """This test verifies that:
    1. the head group of an idle worker waits only for the prefill pass of its requests
       (all four start on free slots together, so they prefill in one pass);
    2. every group queued ahead delays the next one;
    3. a group of another model waits for the batch to drain and the model to load."""
    cfg = make_policy(2)
    snap = _one_worker([4, 4, 4], 0, 8, {})
    queues = {"w0": [g.group_id for g in snap.groups]}
    waits = [predict_group_wait(snap, queues, g.group_id).mean_s for g in snap.groups]
    assert waits[0] == pytest.approx(4 * WorkerProfile().prefill_time(300))
    assert waits[0] < waits[1] < waits[2]
    other = list(cfg.models)[1]
    g = snap.groups[2]
    swapped = ClusterSnapshot(0.0, snap.groups[:2] + (GroupState(g.group_id, other, CLASS, g.request_ids, g.arrivals,
                                                                 g.prompt_tokens, g.max_tokens, g.ttft_s, 0, 1.0,
                                                                 False),), snap.workers, {},
                              {other: 16 * 2**30})
    load = WorkerProfile().model_load_time(16 * 2**30, warm=False)
    assert predict_group_wait(swapped, queues, g.group_id).mean_s > waits[2] + load


def test_free_slot_start_on_a_busy_device_waits_for_the_iteration_in_flight():
    """This test verifies that:
    1. a request that starts on a free slot of a busy device gets its first token after
       the rest of the in-flight decode step (half a step on average) plus one iteration:
       its prefill and a decode step of the batch it joins;
    2. a latency-sensitive request on a worker in expert mode (prefilled at once, in a
       pass of its own) waits only for its prefill;
    3. the vectorised forecast of many groups agrees with the queue walk."""
    snap = _one_worker([1], 4, 8, {})
    w = snap.workers[0]
    step = w.profile.decode_step_time(4, sum(r.prompt_tokens + r.generated_tokens for r in w.running))
    wait = predict_group_wait(snap, {"w0": ["g0"]}, "g0")
    assert wait.mean_s == pytest.approx(1.5 * step + w.profile.prefill_time(300))
    assert wait.var_s2 == pytest.approx(step * step / 12)
    g = snap.groups[0]
    ls_group = replace(g, latency_sensitive=True)
    expert = ClusterSnapshot(0.0, (ls_group,), (replace(w, preemption_mode="expert"),), {}, {})
    assert predict_group_wait(expert, {"w0": ["g0"]}, "g0").mean_s == pytest.approx(w.profile.prefill_time(300))
    many = _one_worker([3, 1, 2, 5, 1, 4, 2, 3, 1, 2, 6, 1, 2, 3], 5, 8, {})
    fc = Forecaster(many)
    queues = {"w0": [g.group_id for g in many.groups]}
    bulk = fc.evaluate(queues)
    cur = fc.cursor("w0")
    for gid in queues["w0"]:
        t = cur.push(fc.groups[gid])
        assert bulk[gid].timing.first.mean_s == pytest.approx(t.first.mean_s)
        assert bulk[gid].timing.last.mean_s == pytest.approx(t.last.mean_s)
        assert bulk[gid].timing.last.var_s2 == pytest.approx(t.last.var_s2)


def test_a_group_meets_when_each_end_meets_its_own_deadline():
    """This test verifies that the chance constraint judges a group's first and last
    requests against their own deadlines (both grow along the group): a best-effort group
    of 2 s of arrivals whose last request starts 1 s after the oldest one's deadline but
    within its own meets, alone and in bulk (meets_all); one whose first request misses its
    own deadline, or whose last misses its own, does not."""
    from qlmserve.controller.estimator import GroupForecast, GroupTiming, WaitEstimate, meets_all

    def fc(first: float, last: float) -> GroupForecast:
        return GroupForecast("g", "w", GroupTiming(WaitEstimate(first, 0.01), WaitEstimate(last, 0.01)),
                             (10.0, 11.0, 12.0))

    cases = [fc(5.0, 11.0), fc(10.5, 11.0), fc(5.0, 12.5)]
    assert [f.meets(0.9) for f in cases] == [True, False, False]
    assert meets_all(cases, 0.9).tolist() == [True, False, False]
