"""The simulated prefix cache: the LRU model, the simulated worker's saved prefill, and the
trace's block ids reaching the requests."""

from __future__ import annotations

import json

import pytest

from qlmserve.operations.prefix_cache import (
    MOONCAKE_BLOCK_TOKENS,
    PrefixCache,
    PrefixReport,
    leading_hits,
    saved_prefill_tokens,
)
from qlmserve.sim.clock import EventClock
from qlmserve.sim.fleet import uniform_fleet
from qlmserve.sim.request import SimRequest
from qlmserve.sim.worker import SimWorker
from qlmserve.traces import WorkloadSpec, build_workload, load_trace


def test_prefix_cache_is_a_bounded_lru_over_leading_blocks():
    """This test verifies that:
    1. a hit counts leading blocks only (the first miss ends it) and never the whole prompt;
    2. past its capacity the least recently used blocks go, and a lookup refreshes the blocks it hit;
    3. the summary a worker reports holds at most its bound, the most recent blocks;
    4. counters give the token hit rate; clear() empties it."""
    assert leading_hits([1, 2, 3], {1, 3}) == 1
    assert saved_prefill_tokens([1, 2], {1, 2}, 512, 1024) == 1023  # one token is always prefilled
    c = PrefixCache(capacity_blocks=4, block_tokens=512)
    c.insert([1, 2, 3])
    assert c.lookup([1, 2, 9], 3 * 512) == 2 * 512
    c.insert([7, 8])  # 5 blocks: the oldest (3; 1 and 2 were just refreshed) goes
    assert 3 not in c and {1, 2, 7, 8} <= set(c.summary(10))
    assert c.summary(2) == frozenset({7, 8})
    assert c.peek([1, 2, 3], 5000) == 1024
    assert c.hit_rate == pytest.approx(2 / 3)
    c.clear()
    assert len(c) == 0 and c.peek([1], 600) == 0
    rep = PrefixReport(512, frozenset({5, 6}), 100)
    assert rep.saved([5, 6, 7], 2000) == 1024 and rep.saved([7, 5], 2000) == 0


class _Sink:
    def __init__(self) -> None:
        self.finished: list[SimRequest] = []

    def on_finished(self, r, now):
        self.finished.append(r)

    def on_requeue(self, r, now, reason):
        pass

    def on_worker_changed(self, w):
        pass


def _req(rid: str, blocks: tuple[int, ...], prompt: int, arrival: float) -> SimRequest:
    return SimRequest(rid=rid, model="mistral-7b", slo_class="be", group_id="g", prompt_tokens=prompt,
                      output_tokens=4, max_tokens=100, arrival=arrival, ttft_s=60.0, tpot_s=None,
                      latency_sensitive=False, priority=0, hash_ids=blocks)


def test_simulated_worker_skips_the_prefill_of_cached_prefix_blocks():
    """This test verifies that:
    1. a request whose prompt starts with blocks an earlier request computed on the same worker
       prefills only the rest: its TTFT is shorter than the first one's by about the cached
       blocks' prefill time, and its prefill tokens are counted net of the hit;
    2. the worker's counters and the request say how many tokens were found cached;
    3. its reported backlog (queued prefill) counts a handed-over request net of its hit;
    4. a model load empties the cache (the blocks were the old model's KV)."""
    fleet = uniform_fleet(1, "A100-80GB", ["mistral-7b", "llama-2-7b"], max_batch_size=8)
    clock, sink = EventClock(), _Sink()
    w = SimWorker(fleet.workers[0], clock, sink)
    prompt = 16 * MOONCAKE_BLOCK_TOKENS
    blocks = tuple(range(16))
    a = _req("a", blocks, prompt, 0.0)
    w.assign([a], 0.0)
    w.poke(0.0)
    clock.advance_to(30.0)
    assert sink.finished == [a] and w.counters.prefix_hit_tokens == 0
    shared = blocks[:12] + (100, 101, 102, 103)  # the first 12 blocks are a's
    b = _req("b", shared, prompt, 30.0)
    w.assign([b], 30.0)
    assert w.queued_prefill_tokens() == prompt - 12 * MOONCAKE_BLOCK_TOKENS
    before = w.counters.prefill_tokens
    w.poke(30.0)
    clock.advance_to(60.0)
    assert b.cached_tokens == 12 * MOONCAKE_BLOCK_TOKENS
    assert w.counters.prefill_tokens - before == prompt - 12 * MOONCAKE_BLOCK_TOKENS
    assert w.counters.prefix_hit_tokens == 12 * MOONCAKE_BLOCK_TOKENS
    assert w.counters.prefix_lookup_tokens == 2 * prompt  # each prompt once
    def prefill_s(n: int) -> float:  # in chunks of the iteration budget, as the worker runs it
        k = w.max_prefill_tokens
        return sum(w.profile.prefill_time(min(k, n - i)) for i in range(0, n, k))

    saved_s = prefill_s(prompt) - prefill_s(prompt - 12 * MOONCAKE_BLOCK_TOKENS)
    assert a.ttft - b.ttft == pytest.approx(saved_s, rel=0.05)
    w.prefix.insert([1, 2])
    from qlmserve.sim.worker_ops import complete_op
    from qlmserve.sim.unit import Unit
    from qlmserve.operations.ops import LoadModel

    complete_op(w, Unit("op", 60.0, 61.0, op=LoadModel(w.worker_id, "llama-2-7b")), 61.0)
    assert len(w.prefix) == 0 and w.prefix.capacity_blocks == w.kv_capacity // MOONCAKE_BLOCK_TOKENS


def test_workload_carries_the_trace_block_ids(tmp_path):
    """This test verifies that:
    1. a Mooncake record's hash_ids reach its request, full blocks only;
    2. a prompt cut to the model's context loses them (its kept tokens are not that prefix);
    3. a second replay of the trace gets ids of its own (a loop does not fake reuse), and the
       session key (prefix_id) follows the same rule."""
    f = tmp_path / "t.jsonl"
    rows = [{"timestamp": 0, "input_length": 1300, "output_length": 5, "hash_ids": [0, 1, 2]},
            {"timestamp": 1000, "input_length": 1100, "output_length": 5, "hash_ids": [0, 1, 3]},
            {"timestamp": 2000, "input_length": 5000, "output_length": 5, "hash_ids": list(range(4, 14))}]
    f.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    trace = load_trace(f)
    wl = build_workload(trace, WorkloadSpec(class_mix={"c": 1}, model_mix={"m": 1}, window_s=5.9,
                                            max_context={"m": 4096}))
    assert [r.hash_ids for r in wl[:3]] == [(0, 1), (0, 1), ()]
    assert wl[3].loop == 1 and wl[3].hash_ids == (14, 15) and wl[3].prefix_id == "h14"


def test_live_simulated_engine_models_the_cache_over_prompt_token_chains():
    """This test verifies that:
    1. backends/sim_engine.py with prefix_cache=True keys prompts by their 16-token chain
       (the HF engine's keys): a second prompt sharing the first's 160 leading tokens
       prefills only the rest, on the cost model's clock;
    2. its state report carries the cached keys and the backlog, and a model load empties it;
    3. without prefix_cache nothing is reported."""
    from qlmserve.backends.engine import EngineRequest
    from qlmserve.backends.sim_engine import SimEngine, SimModel
    from qlmserve.operations.costs import WorkerProfile
    from qlmserve.operations.prefix_cache import ENGINE_BLOCK_TOKENS, chain_keys

    prof = WorkerProfile(prefill_base_s=0.01, prefill_per_token_s=1e-4, decode_base_s=0.02, decode_per_seq_s=0.0)
    clock = EventClock()
    eng = SimEngine(prof, [SimModel("m", 10**9), SimModel("n", 10**9)], active_model="m", clock=clock,
                    prefix_cache=True)
    head = list(range(1000, 1160))
    eng.add_request(EngineRequest("a", "m", head + list(range(40)), max_tokens=1))
    eng.step()
    assert clock.now() == pytest.approx(prof.prefill_time(200))
    rep = eng.stats().prefix
    assert rep.block_tokens == ENGINE_BLOCK_TOKENS and set(chain_keys(head, 16)) <= rep.blocks
    eng.add_request(EngineRequest("b", "m", head + list(range(500, 530)), max_tokens=1))
    assert eng.stats().prefix.queued_prefill_tokens == 30
    t0 = clock.now()
    eng.step()
    assert clock.now() - t0 == pytest.approx(prof.prefill_time(30))
    eng.load_model("n")
    assert not eng.stats().prefix.blocks
    plain = SimEngine(prof, [SimModel("m", 10**9)], active_model="m", clock=EventClock())
    assert plain.stats().prefix is None


def test_chain_keys_are_stable_and_match_block_by_block_hashing():
    """This test verifies that:
    1. chain_keys (the prompt packed once) gives the ids chain_key gives block by block;
    2. the ids are the ones earlier code gave (engines and controllers of other versions
       must name a prefix the same way), negative ids and a `blocks` bound included."""
    import random

    from qlmserve.operations.prefix_cache import chain_key, chain_keys

    rng = random.Random(1)
    toks = [rng.randrange(-5, 2**31 - 1) for _ in range(1000)]
    keys = chain_keys(toks, 16)
    parent = 0
    for i, k in enumerate(keys):
        parent = chain_key(parent, toks[i * 16:(i + 1) * 16])
        assert k == parent
    assert len(keys) == 62 and keys[:2] == [3130564252474011210, 4701472027121081301]
    assert keys[-1] == 18218284984112474781 and chain_keys(toks, 7, 5)[-1] == 169502940409767746
    assert chain_key(123, toks[:9]) == 888027325361635665
    assert chain_keys(list(range(1, 257)), 16)[-1] == 12414785487084734828
    assert chain_keys(toks[:15], 16) == []
