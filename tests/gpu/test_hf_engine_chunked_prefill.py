"""Chunked prefill in HFEngine: prompts longer than the iteration's prefill budget are fed a
chunk per iteration, latency-sensitive ones first, and the tokens still equal generate()."""

from __future__ import annotations

import dataclasses
import math

import pytest
from gpu_helpers import check_events, make_engine, make_requests, reference_tokens, run_until_idle, tokens_of

from qlmserve.backends.engine import EngineRequest, PreemptionMode
from qlmserve.operations.batching import ls_prefill_budget

pytestmark = pytest.mark.gpu


def _mixed_requests() -> list[EngineRequest]:
    """Long and short prompts, latency-sensitive and best-effort, one continuing an
    earlier run (its kept tokens are prefilled with its prompt)."""
    be = make_requests(4, max_tokens=6, seed=31, min_prompt=20, max_prompt=70)
    ls = [dataclasses.replace(r, request_id=f"ls{i}", latency_sensitive=True)
          for i, r in enumerate(make_requests(3, max_tokens=5, seed=32, min_prompt=3, max_prompt=45))]
    return [be[0], ls[0], be[1], be[2], ls[1], be[3], ls[2]]


@pytest.mark.parametrize(("mode", "budget"), [
    (PreemptionMode.NONE, 1),
    (PreemptionMode.NONE, 16),
    (PreemptionMode.ITERATION, 7),
    (PreemptionMode.ITERATION, 33),
    (PreemptionMode.EXPERT, 10),
    (PreemptionMode.EXPERT, 2048),
])
def test_chunked_prefill_matches_generate(tiny_models, device, mode, budget):
    """This test verifies that: 1. with prefill budgets from 1 token to larger than every
    prompt, in each preemption mode, requests arriving over several steps (LS and BE
    mixed, prompts up to 70 tokens, more requests than batch slots) each produce exactly
    HF generate()'s greedy tokens for that request alone; 2. no prefill pass feeds more
    than the budget, and prompts longer than it did go in chunks; 3. event indices are
    consecutive and only the last is finished; 4. all KV is released afterwards."""
    folder = tiny_models["mixtral"]
    engine = make_engine({"m": ("mixtral", folder)}, device, max_batch_size=3, preemption=mode,
                         max_prefill_tokens=budget)
    reqs = _mixed_requests()

    def feed(step: int) -> None:
        for r in reqs[step * 2: step * 2 + 2] if step < 4 else []:
            engine.add_request(r)

    events = run_until_idle(engine, on_step=feed)
    got = tokens_of(events)
    for r in reqs:
        assert got[r.request_id] == reference_tokens(folder, device, r), (r.request_id, budget, mode)
        check_events(events[r.request_id])
    prefill = [p for p in engine.pass_log if p.prefill]
    # an LS-only pass may take LS_PREFILL_FACTOR x the budget (operations/batching.py)
    assert prefill and all(p.new_tokens <= (ls_prefill_budget(budget) if p.ls_rows == p.batch else budget)
                           for p in prefill)
    longest = max(len(r.prompt_token_ids) for r in reqs)
    assert len(prefill) >= math.ceil(longest / ls_prefill_budget(budget))  # the longest prompt alone needs these
    assert engine.stats().kv_used_tokens == 0


def test_latency_sensitive_prompt_goes_first_and_be_is_chunked_behind(tiny_models, device):
    """This test verifies that: 1. under ITERATION, with a long BE prompt prefilling in
    chunks, an LS request that arrives gets its whole prompt prefilled in the next
    iterations (LS-only ones, each within 4x the budget) and its first token before the
    BE request's; 2. the BE prompt then continues where its chunks stopped; 3. an LS
    prompt longer than that is chunked too; 4. both equal generate()."""
    folder = tiny_models["mixtral"]
    engine = make_engine({"m": ("mixtral", folder)}, device, preemption=PreemptionMode.ITERATION,
                         max_prefill_tokens=12)
    be = make_requests(1, max_tokens=4, seed=33, min_prompt=60, max_prompt=60)[0]
    ls = dataclasses.replace(make_requests(1, max_tokens=4, seed=34, min_prompt=60, max_prompt=60)[0],
                             request_id="ls", latency_sensitive=True)
    engine.add_request(be)
    got: dict[str, list[int]] = {}
    order: list[str] = []
    for step in range(200):
        if step == 2:  # BE has had two 12-token chunks
            engine.add_request(ls)
        if not engine.has_work():
            break
        for e in engine.step():
            got.setdefault(e.request_id, []).append(e.token_id)
            if e.index == 0:
                order.append(e.request_id)
    assert order == ["ls", be.request_id]
    chunks = [(p.new_tokens, p.ls_rows) for p in engine.pass_log if p.prefill]
    # BE 12, 12; LS 48, 12 (LS-only iterations, 4 x 12); BE 12, 12, 12 (the rest of its 60)
    assert chunks == [(12, 0), (12, 0), (48, 1), (12, 1), (12, 0), (12, 0), (12, 0)]
    for r in (be, ls):
        assert got[r.request_id] == reference_tokens(folder, device, r)


def test_budget_of_one_token_with_requeued_request(tiny_models, device):
    """This test verifies that: 1. a requeued request (earlier generated tokens kept) fed
    one token per iteration continues after them with generate()'s tokens; 2. its event
    indices count the kept tokens."""
    folder = tiny_models["qwen2_moe"]
    engine = make_engine({"m": ("qwen2_moe", folder)}, device, max_prefill_tokens=1)
    base = make_requests(1, max_tokens=8, seed=35)[0]
    full = reference_tokens(folder, device, base)
    engine.add_request(dataclasses.replace(base, request_id="cont", generated_token_ids=full[:3]))
    events = run_until_idle(engine)
    assert [e.token_id for e in events["cont"]] == full[3:]
    check_events(events["cont"], first_index=3)


def test_expert_pause_of_a_chunk_pass_runs_ls_chunks(tiny_models, device):
    """This test verifies that: 1. under EXPERT an LS request arriving while a BE prefill
    chunk pass runs pauses it at the next stage boundary; 2. an LS prompt longer than an
    LS-only iteration's budget (4x the budget) is then prefilled a chunk per step while
    the BE pass stays paused (a chunk that is not its last returns no token); 3. the
    paused BE chunk pass then resumes where it stopped, and every request equals
    generate()."""
    folder = tiny_models["mixtral"]
    engine = make_engine({"m": ("mixtral", folder)}, device, preemption=PreemptionMode.EXPERT,
                         max_prefill_tokens=16)
    be = make_requests(2, max_tokens=5, seed=36, min_prompt=24, max_prompt=24)
    ls = dataclasses.replace(make_requests(1, max_tokens=4, seed=37, min_prompt=70, max_prompt=70)[0],
                             request_id="ls", latency_sensitive=True)
    for r in be:
        engine.add_request(r)
    got: dict[str, list[int]] = {}

    def collect() -> list[str]:
        ids = []
        for e in engine.step():
            got.setdefault(e.request_id, []).append(e.token_id)
            ids.append(e.request_id)
        return ids

    assert collect() == []  # be0: its first 16 prompt tokens
    fired = []

    def arrive(module, args, kwargs):  # noqa: ANN001, ANN202 - LS arrives inside the 2-row chunk pass
        if not fired and kwargs["hidden_states"].shape[0] == 2:
            fired.append(True)
            engine.add_request(ls)

    handle = engine.model.model.layers[3].self_attn.register_forward_pre_hook(arrive, with_kwargs=True)
    assert collect() == []  # be0 8 + be1 8 paused at layer 3; LS chunk 1 (64 of 70 tokens)
    handle.remove()
    assert fired and engine.paused_stage == (3, "moe")
    assert collect() == ["ls"]  # its last 6 tokens, still paused
    assert engine.paused_stage == (3, "moe")
    rest = tokens_of(run_until_idle(engine))
    for r in [*be, ls]:
        assert got.get(r.request_id, []) + rest.get(r.request_id, []) == reference_tokens(folder, device, r)
    passes = [(p.new_tokens, p.pauses) for p in engine.pass_log if p.prefill]
    assert passes[:4] == [(16, 0), (64, 0), (6, 0), (16, 1)]
