"""SimEngine semantics on an injected event clock (no sleeping)."""

from __future__ import annotations

import pytest

from qlmserve.backends.engine import EngineError, EngineRequest, FinishReason, PreemptionMode
from qlmserve.backends.sim_engine import OutputLengths, SimEngine, SimModel
from qlmserve.operations.costs import WorkerProfile
from qlmserve.sim.clock import EventClock

PROFILE = WorkerProfile(prefill_base_s=0.01, prefill_per_token_s=0.0001, decode_base_s=0.2, decode_per_seq_s=0.001,
                        kv_bytes_per_token=1000, kv_swap_bytes_per_s=1e6, load_cold_bytes_per_s=1e9,
                        load_warm_bytes_per_s=1e10, load_fixed_s=0.5)


def make(mode=PreemptionMode.NONE, kv=10_000, seed=0, lengths=None, host_ram=10**10):
    clock = EventClock()
    eng = SimEngine(PROFILE, [SimModel("m", 2 * 10**9, num_layers=32), SimModel("n", 4 * 10**9)],
                    active_model="m", clock=clock, preemption=mode, kv_capacity_tokens=kv, seed=seed,
                    output_lengths=lengths, host_ram_bytes=host_ram)
    return clock, eng


def req(rid, prompt=100, max_tokens=10, ls=False, gen=(), model="m"):
    return EngineRequest(rid, model, list(range(prompt)), max_tokens=max_tokens, latency_sensitive=ls,
                         generated_token_ids=list(gen))


def drain(eng):
    out = []
    while eng.has_work():
        out.extend(eng.step())
    return out


def test_step_time_tokens_and_determinism():
    """This test verifies that:
    1. one iteration takes the cost model's time (prefill, then decode steps) on the injected clock;
    2. a request runs to max_tokens with finish reason LENGTH, one event per token, indices in order;
    3. tokens are a function of (seed, request id, index): equal for equal seeds, different otherwise."""
    clock, eng = make()
    eng.add_request(req("a", prompt=100, max_tokens=5))
    ev = eng.step()
    assert clock.now() == pytest.approx(PROFILE.prefill_time(100))
    assert [e.index for e in ev] == [0]
    ev += drain(eng)
    assert [e.index for e in ev] == [0, 1, 2, 3, 4]
    assert ev[-1].finished and ev[-1].finish_reason == FinishReason.LENGTH
    ctx = [101, 102, 103, 104]
    expect = PROFILE.prefill_time(100) + sum(PROFILE.decode_step_time(1, c) for c in ctx)
    assert clock.now() == pytest.approx(expect)
    _, eng2 = make()
    eng2.add_request(req("a", prompt=100, max_tokens=5))
    assert [e.token_id for e in drain(eng2)] == [e.token_id for e in ev]
    _, eng3 = make(seed=1)
    eng3.add_request(req("a", prompt=100, max_tokens=5))
    assert [e.token_id for e in drain(eng3)] != [e.token_id for e in ev]


def test_seeded_length_distribution_and_stop_token():
    """This test verifies that:
    1. with a lognormal length distribution a request stops before max_tokens (reason STOP) at a length
       fixed by its id, emitting its stop token last;
    2. the draw is the same in another engine (so a resumed request stops at the same place)."""
    lengths = OutputLengths(kind="lognormal", mean=20, std=10)
    n = lengths.draw(0, "r1", 1000)
    assert 1 <= n < 1000 and n == lengths.draw(0, "r1", 1000)
    _, eng = make(lengths=lengths)
    r = req("r1", max_tokens=1000)
    r.stop_token_ids = (2,)
    eng.add_request(r)
    ev = drain(eng)
    assert len(ev) == n and ev[-1].finish_reason == FinishReason.STOP and ev[-1].token_id == 2
    assert all(e.token_id != 2 for e in ev[:-1])


def test_kv_capacity_admission_and_errors():
    """This test verifies that:
    1. a prompt that cannot fit the KV capacity, or a request for another model, is refused with EngineError;
    2. requests that do not fit together wait until KV frees (FCFS), and all finish."""
    clock, eng = make(kv=300)
    with pytest.raises(EngineError, match="KV capacity"):
        eng.add_request(req("big", prompt=400))
    with pytest.raises(EngineError, match="active model"):
        eng.add_request(req("other", model="n"))
    eng.add_request(req("a", prompt=200, max_tokens=3))
    eng.add_request(req("b", prompt=200, max_tokens=3))
    eng.step()
    st = eng.stats()
    assert st.running == ["a"] and st.waiting == ["b"] and st.kv_used_tokens <= 300
    done = [e.request_id for e in drain(eng) if e.finished]
    assert done == ["a", "b"]


def test_evict_keeps_tokens_and_resume_continues():
    """This test verifies that:
    1. evict returns the generated tokens and frees the request's KV;
    2. re-adding it with those tokens continues at the next index, with the same tokens an
       uninterrupted run produces."""
    _, ref = make()
    ref.add_request(req("a", max_tokens=6))
    full = [e.token_id for e in drain(ref)]
    _, eng = make()
    eng.add_request(req("a", max_tokens=6))
    eng.step()
    eng.step()
    kept = eng.evict("a")
    assert kept == full[:2] and eng.stats().kv_used_tokens == 0 and not eng.has_work()
    eng.add_request(req("a", max_tokens=6, gen=kept))
    rest = drain(eng)
    assert [e.index for e in rest] == [2, 3, 4, 5]
    assert kept + [e.token_id for e in rest] == full


def test_swap_out_in_restores_and_charges_copy_time():
    """This test verifies that:
    1. swap_out moves a running request's KV to host (it stops decoding, KV freed) at kv_swap_time;
    2. swap_in brings it back at the same cost and it continues exactly where it stopped."""
    clock, eng = make()
    eng.add_request(req("a", prompt=100, max_tokens=5))
    eng.step()
    t0 = clock.now()
    cost = eng.swap_out("a")
    assert cost.seconds == pytest.approx(PROFILE.kv_swap_time(101)) and clock.now() == pytest.approx(t0 + cost.seconds)
    st = eng.stats()
    assert st.swapped == ["a"] and st.running == [] and st.kv_used_tokens == 0 and not eng.has_work()
    back = eng.swap_in("a")
    assert back.seconds == pytest.approx(cost.seconds)
    assert [e.index for e in drain(eng)] == [1, 2, 3, 4]


def test_model_load_warm_cold_and_host_ram():
    """This test verifies that:
    1. loading a model while requests of the active one run is refused;
    2. a cold load costs fixed + bytes / disk rate, a warm one fixed + bytes / host rate (cheaper);
    3. a warm copy is usable only once its background read is done, and host RAM bounds warm copies."""
    clock, eng = make(host_ram=5 * 10**9)
    eng.add_request(req("a", max_tokens=2))
    eng.step()
    with pytest.raises(EngineError, match="still hold"):
        eng.load_model("n")
    drain(eng)
    cold = eng.load_model("n")
    assert cold.seconds == pytest.approx(0.5 + 4.0) and cold.detail.startswith("cold")
    w = eng.warm_model("m")
    assert "m" not in eng.stats().warm_models
    clock.sleep(w.seconds)
    assert "m" in eng.stats().warm_models
    warm = eng.load_model("m")
    assert warm.seconds == pytest.approx(0.5 + 0.2) and warm.seconds < cold.seconds
    with pytest.raises(EngineError, match="host RAM"):
        eng.warm_model("n")  # 2 GB + 4 GB > 5 GB


def _ls_ttft(mode: PreemptionMode) -> float:
    clock, eng = make(mode=mode)
    for i in range(4):
        eng.add_request(req(f"be{i}", prompt=100, max_tokens=40))
    arrive = 1.05
    clock.call_at(arrive, lambda: eng.add_request(req("ls", prompt=50, max_tokens=3, ls=True)))
    first = None
    while eng.has_work():
        for e in eng.step():
            if e.request_id == "ls" and e.index == 0:
                first = clock.now()
    assert first is not None
    return first - arrive


def test_preemption_modes_cut_latency_sensitive_ttft():
    """This test verifies that:
    1. under NONE a latency-sensitive request waits for the running iteration and shares the next one;
    2. ITERATION prefills it alone at the next boundary (lower TTFT);
    3. EXPERT pauses the best-effort pass at the next layer boundary: TTFT is at most one layer
       (pass / 32) plus its own prefill, far below the others;
    4. every best-effort request still finishes with all its tokens."""
    none, it, ex = (_ls_ttft(m) for m in (PreemptionMode.NONE, PreemptionMode.ITERATION, PreemptionMode.EXPERT))
    step = PROFILE.decode_step_time(4, 4 * 130)
    assert ex <= step / 32 + PROFILE.prefill_time(50) + 1e-9
    assert ex < it < none
    assert none > 10 * ex
    clock, eng = make(mode=PreemptionMode.EXPERT)
    for i in range(4):
        eng.add_request(req(f"be{i}", prompt=100, max_tokens=40))
    clock.call_at(1.05, lambda: eng.add_request(req("ls", prompt=50, max_tokens=3, ls=True)))
    ev = drain(eng)
    assert eng.counters.expert_preemptions == 1
    for rid, n in [("ls", 3)] + [(f"be{i}", 40) for i in range(4)]:
        assert [e.index for e in ev if e.request_id == rid] == list(range(n))
