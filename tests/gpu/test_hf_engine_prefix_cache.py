"""The HF engine's prefix cache: full KV blocks stay findable by their token chain, a prompt
that starts with them skips their prefill, and the output still equals generate()."""

from __future__ import annotations

import dataclasses

import pytest
from gpu_helpers import check_events, make_engine, make_requests, reference_tokens, run_until_idle, tokens_of

from qlmserve.backends.engine import EngineRequest, PreemptionMode

pytestmark = pytest.mark.gpu

BS = 16  # kv_cache.BLOCK_SIZE


def _sharing(n: int, prefix_len: int, seed: int, max_tokens: int = 6) -> list[EngineRequest]:
    """Requests whose prompts start with one shared prefix, each with a suffix of its own."""
    head = make_requests(1, seed=seed, min_prompt=prefix_len, max_prompt=prefix_len)[0].prompt_token_ids
    tails = make_requests(n, seed=seed + 1, min_prompt=5, max_prompt=30, max_tokens=max_tokens)
    return [dataclasses.replace(r, request_id=f"p{i}", prompt_token_ids=list(head) + list(r.prompt_token_ids))
            for i, r in enumerate(tails)]


def _fed(engine) -> int:
    """Tokens every pass so far fed (prompt chunks and decode steps)."""
    return sum(p.new_tokens for p in engine.pass_log)


def _expected_fed(reqs, got: dict[str, list[int]], cached: dict[str, int]) -> int:
    """What the requests must feed: their prompts less the cached tokens, and every
    generated token but the last (never fed)."""
    return sum(len(r.prompt_token_ids) - cached.get(r.request_id, 0) + len(got[r.request_id]) - 1 for r in reqs)


@pytest.mark.parametrize("mode", [PreemptionMode.NONE, PreemptionMode.EXPERT])
def test_cache_hits_give_generate_tokens_and_skip_prefill(tiny_models, device, mode):
    """This test verifies that:
    1. requests sharing a 50-token prefix, the first alone and the rest arriving while it and
       each other run, each produce exactly generate()'s greedy tokens for that request alone;
    2. the later ones found the shared full blocks (48 tokens) cached: the engine prefilled
       that many fewer tokens for each, and its hit counters say so;
    3. once all finish no KV is held, the cached blocks stay (idle) and the report lists them."""
    folder = tiny_models["mixtral"]
    engine = make_engine({"m": ("mixtral", folder)}, device, max_batch_size=3, preemption=mode,
                         prefix_cache=True, max_prefill_tokens=24)
    reqs = _sharing(5, 50, seed=41)
    engine.add_request(reqs[0])
    first = run_until_idle(engine)
    assert _fed(engine) == _expected_fed(reqs[:1], tokens_of(first), {})

    def feed(step: int) -> None:
        if step < 4:
            engine.add_request(reqs[1 + step])

    events = {**first, **run_until_idle(engine, on_step=feed)}
    got = tokens_of(events)
    for r in reqs:
        assert got[r.request_id] == reference_tokens(folder, device, r), r.request_id
        check_events(events[r.request_id])
    shared = 48  # the prefix's full blocks
    assert _fed(engine) == _expected_fed(reqs, got, {r.request_id: shared for r in reqs[1:]})
    kv = engine._kv
    assert kv.prefix.hit_tokens >= 4 * shared
    st = engine.stats()
    assert st.kv_used_tokens == 0 and len(kv.prefix.idle) > 0
    assert st.prefix is not None and st.prefix.block_tokens == BS and len(st.prefix.blocks) == len(kv.prefix.idle)


def test_eviction_swap_and_memory_pressure_keep_the_cache_consistent(tiny_models, device):
    """This test verifies that:
    1. a request evicted mid-decode and re-added with its tokens continues exactly as
       generate() (its prompt and the blocks its decode filled are found cached);
    2. a request swapped out and back in (its blocks shared with another running one)
       continues exactly as generate();
    3. under memory pressure (a pool of 16 blocks) idle cached blocks are taken back least
       recently used first, and later requests sharing the evicted prefix still equal
       generate() (no stale block is found);
    4. nothing stays held at the end and the reference counts are empty."""
    folder = tiny_models["mixtral"]
    engine = make_engine({"m": ("mixtral", folder)}, device, max_batch_size=2, prefix_cache=True,
                         kv_capacity_tokens=16 * BS)
    a, b = _sharing(2, 40, seed=43, max_tokens=24)
    engine.add_request(a)
    engine.add_request(b)
    produced: dict[str, list[int]] = {a.request_id: [], b.request_id: []}
    for _ in range(6):
        for e in engine.step():
            produced[e.request_id].append(e.token_id)
    kept = engine.evict(b.request_id)
    assert kept == produced[b.request_id]
    engine.swap_out(a.request_id)
    engine.swap_in(a.request_id)
    engine.add_request(dataclasses.replace(b, generated_token_ids=kept))
    for rid, toks in tokens_of(run_until_idle(engine)).items():
        produced[rid] += toks
    for r in (a, b):
        assert produced[r.request_id] == reference_tokens(folder, device, r), r.request_id
    # Pressure: unrelated long prompts take the pool back, then the shared prefix again.
    others = make_requests(3, seed=45, min_prompt=100, max_prompt=120, max_tokens=4)
    again = _sharing(2, 40, seed=43, max_tokens=5)
    for r in others + [dataclasses.replace(r, request_id=f"again{i}") for i, r in enumerate(again)]:
        engine.add_request(r)
        got = tokens_of(run_until_idle(engine))[r.request_id]
        assert got == reference_tokens(folder, device, r), r.request_id
    kv = engine._kv
    assert kv.prefix.evicted_blocks > 0
    assert engine.stats().kv_used_tokens == 0 and not kv.prefix.refs
    assert len(kv._free) + len(kv.prefix.idle) == kv.num_blocks


def test_model_swap_starts_an_empty_cache(tiny_models, device):
    """This test verifies that:
    1. after a model swap and back, a prompt the old pool had cached is prefilled whole (the
       new pool has no blocks of it) and still equals generate()."""
    folder = tiny_models["mixtral"]
    engine = make_engine({"m": ("mixtral", folder), "d": ("llama", tiny_models["llama"])}, device,
                         prefix_cache=True)
    r = _sharing(1, 40, seed=47)[0]
    engine.add_request(r)
    run_until_idle(engine)
    engine.load_model("d")
    engine.load_model("m")
    before = _fed(engine)
    r2 = dataclasses.replace(r, request_id="again")
    engine.add_request(r2)
    got = tokens_of(run_until_idle(engine))
    assert got["again"] == reference_tokens(folder, device, r2)
    assert _fed(engine) - before == _expected_fed([r2], got, {}) and engine._kv.prefix.hit_tokens == 0
