"""A request whose step fails fails alone: the rest of its batch goes on."""

from __future__ import annotations

import dataclasses

import pytest
from gpu_helpers import make_engine, make_requests, reference_tokens, run_until_idle, tokens_of

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("fault", ["temperature=1e-45", "temperature=nan", "token id past the vocabulary"])
def test_a_failing_request_fails_alone(tiny_models, device, fault):
    """This test verifies that:
    1. a request whose sampling cannot work (temperature 1e-45 overflows the softmax; NaN),
       or whose forward pass raises (a prompt id past the embedding table), is reported by
       take_failures and leaves the engine, its KV freed;
    2. every other request of the same batch still gets exactly generate()'s greedy tokens;
    3. no step raises."""
    engine = make_engine({"m": ("mixtral", tiny_models["mixtral"])}, device, max_batch_size=4)
    reqs = make_requests(4, max_tokens=6, seed=3)
    if fault.startswith("temperature"):
        bad = dataclasses.replace(reqs[1], temperature=float(fault.split("=")[1]), seed=7)
    else:
        bad = dataclasses.replace(reqs[1], prompt_token_ids=reqs[1].prompt_token_ids + [10**7])
    reqs[1] = bad
    for r in reqs:
        engine.add_request(r)
    failures: list[tuple[str, str]] = []
    events = run_until_idle(engine, on_step=lambda i: failures.extend(engine.take_failures()))
    failures += engine.take_failures()
    assert [rid for rid, _ in failures] == [bad.request_id]
    assert ("sampling failed" in failures[0][1]) == fault.startswith("temperature")
    got = tokens_of(events)
    assert bad.request_id not in got
    for r in reqs:
        if r is not bad:
            assert got[r.request_id] == reference_tokens(tiny_models["mixtral"], device, r), r.request_id
    assert engine.stats().kv_used_tokens == 0
