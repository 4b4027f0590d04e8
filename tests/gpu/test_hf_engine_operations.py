"""Operations of HFEngine on real tiny models: evict, KV swap, model swap, warm start."""

from __future__ import annotations

import dataclasses

import pytest
from gpu_helpers import make_engine, make_requests, reference_tokens, run_until_idle, tokens_of

from qlmserve.backends.engine import EngineError

pytestmark = pytest.mark.gpu


def _step_collect(engine, n: int, into: dict[str, list[int]]) -> None:
    for _ in range(n):
        for e in engine.step():
            into.setdefault(e.request_id, []).append(e.token_id)


@pytest.mark.parametrize("kind", ["mixtral", "qwen2_moe"])
def test_evict_and_requeue_is_exact(tiny_models, device, kind):
    """This test verifies that: 1. evict() returns the tokens generated so far and frees
    the request's KV; 2. requeued with those tokens, the request continues to exactly
    generate()'s output; 3. the requests that kept running are unaffected."""
    folder = tiny_models[kind]
    engine = make_engine({"m": (kind, folder)}, device)
    reqs = make_requests(3, max_tokens=12, seed=10)
    for r in reqs:
        engine.add_request(r)
    got: dict[str, list[int]] = {}
    _step_collect(engine, 5, got)
    victim = reqs[1]
    kept = engine.evict(victim.request_id)
    assert kept == got[victim.request_id] and 0 < len(kept) < 12
    assert victim.request_id not in engine.stats().running
    _step_collect(engine, 2, got)
    engine.add_request(dataclasses.replace(victim, generated_token_ids=kept))
    rest = tokens_of(run_until_idle(engine))
    for r in reqs:
        got.setdefault(r.request_id, []).extend(rest.get(r.request_id, []))
        assert got[r.request_id] == reference_tokens(folder, device, r)
    assert engine.stats().kv_used_tokens == 0


@pytest.mark.parametrize("kind", ["mixtral", "qwen2_moe"])
def test_kv_swap_out_and_in_is_exact(tiny_models, device, kind):
    """This test verifies that: 1. swap_out moves a running request's KV to host memory
    (bytes reported, device KV freed, listed as swapped, no tokens while swapped); 2.
    other requests reuse the freed KV blocks meanwhile; 3. after swap_in it continues to
    exactly generate()'s output."""
    folder = tiny_models[kind]
    engine = make_engine({"m": (kind, folder)}, device, kv_capacity_tokens=128)
    reqs = make_requests(2, max_tokens=14, seed=11, min_prompt=20, max_prompt=30)
    for r in reqs:
        engine.add_request(r)
    got: dict[str, list[int]] = {}
    _step_collect(engine, 4, got)
    victim = reqs[0]
    used_before = engine.stats().kv_used_tokens
    cost = engine.swap_out(victim.request_id)
    assert cost.bytes_moved > 0 and cost.seconds > 0
    stats = engine.stats()
    assert stats.swapped == [victim.request_id] and stats.kv_used_tokens < used_before
    assert not engine.has_work() or victim.request_id not in stats.running
    with pytest.raises(EngineError):
        engine.swap_out(victim.request_id)
    # A newcomer takes the freed blocks (capacity 128 fits only two of these requests).
    newcomer = make_requests(1, model="m", max_tokens=14, seed=12, min_prompt=20, max_prompt=30)[0]
    newcomer = dataclasses.replace(newcomer, request_id="newcomer")
    engine.add_request(newcomer)
    count = len(got[victim.request_id])
    _step_collect(engine, 4, got)
    assert len(got[victim.request_id]) == count
    with pytest.raises(EngineError):
        engine.swap_in(victim.request_id)  # no room while the other two run
    _step_collect(engine, 20, got)
    assert engine.swap_in(victim.request_id).bytes_moved == cost.bytes_moved
    rest = tokens_of(run_until_idle(engine))
    for r in [*reqs, newcomer]:
        got.setdefault(r.request_id, []).extend(rest.get(r.request_id, []))
        assert got[r.request_id] == reference_tokens(folder, device, r), r.request_id


def test_model_swap_warm_and_cold_is_exact(tiny_models, device):
    """This test verifies that: 1. load_model refuses while requests of the active model
    run; 2. with them swapped out, another model loads (cold, from disk), serves its own
    requests, and the first model comes back warm from host RAM, measured and recorded as
    warm; 3. the swapped requests then continue to exactly generate()'s output; 4. after
    drop_warm the next load of that model is cold again."""
    a, b = tiny_models["mixtral"], tiny_models["qwen2_moe"]
    engine = make_engine({"A": ("mixtral", a), "B": ("qwen2_moe", b)}, device, active="A")
    reqs_a = make_requests(2, model="A", max_tokens=10, seed=13)
    reqs_b = make_requests(2, model="B", max_tokens=6, seed=14)
    for r in reqs_a:
        engine.add_request(r)
    got: dict[str, list[int]] = {}
    _step_collect(engine, 3, got)
    with pytest.raises(EngineError):
        engine.load_model("B")
    for r in reqs_a:
        engine.swap_out(r.request_id)
    warm_cost = engine.warm_model("A")
    assert warm_cost.bytes_moved > 0 and engine.stats().warm_models == ["A"]
    cold = engine.load_model("B")
    assert engine.stats().active_model == "B" and "cold" in cold.detail
    for r in reqs_b:
        engine.add_request(r)
    with pytest.raises(EngineError):
        engine.swap_in(reqs_a[0].request_id)  # its model is not active
    got.update(tokens_of(run_until_idle(engine)))
    warm = engine.load_model("A")
    assert "warm" in warm.detail and warm.bytes_moved == warm_cost.bytes_moved
    for r in reqs_a:
        engine.swap_in(r.request_id)
    rest = tokens_of(run_until_idle(engine))
    for r in reqs_a:
        got[r.request_id] += rest[r.request_id]
        assert got[r.request_id] == reference_tokens(a, device, r)
    for r in reqs_b:
        assert got[r.request_id] == reference_tokens(b, device, r)

    engine.drop_warm("A")
    engine.load_model("B")
    engine.load_model("A")
    history = [(rec.model, rec.warm) for rec in engine.load_history]
    assert history == [("A", False), ("B", False), ("A", True), ("B", False), ("A", False)]
    # The reloaded model still generates correctly from disk.
    r = make_requests(1, model="A", max_tokens=5, seed=15)[0]
    engine.add_request(r)
    assert tokens_of(run_until_idle(engine))[r.request_id] == reference_tokens(a, device, r)
