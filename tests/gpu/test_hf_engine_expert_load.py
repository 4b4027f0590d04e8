"""Expert activations counted by the HF engine, per layer and per step."""

from __future__ import annotations

import pytest
from gpu_helpers import make_engine, make_requests, run_until_idle

from qlmserve.backends.hf.expert_load import skew_router

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("kind", ["mixtral", "qwen2_moe"])
def test_engine_counts_expert_activations(tiny_models, device, kind):
    """This test verifies that:
    1. every layer counts top-k activations for every token fed (prompt and decode tokens);
    2. the state report carries them per layer and per expert;
    3. a router skewed on purpose sends expert 0 most activations, and undoing it restores
       the routing (the same counts as before for the same request)."""
    engine = make_engine({"m": (kind, tiny_models[kind])}, device)
    load = engine.expert_load
    assert load is not None and load.num_layers == engine.model.config.num_hidden_layers
    req = make_requests(1, seed=51, min_prompt=20, max_prompt=20, max_tokens=5)[0]
    engine.add_request(req)
    run_until_idle(engine)
    fed = sum(p.new_tokens for p in engine.pass_log)
    top_k = engine.model.config.num_experts_per_tok
    assert load.total.sum(dim=1).tolist() == [fed * top_k] * load.num_layers
    acts = engine.stats().expert_activations
    assert len(acts) == load.num_layers and len(acts[0]) == load.num_experts
    before = load.total.clone()
    undo = skew_router(engine.model, 0, 50.0)
    engine.add_request(make_requests(1, seed=52, min_prompt=20, max_prompt=20, max_tokens=5)[0])
    run_until_idle(engine)
    undo()
    skewed = load.total - before
    assert (skewed[:, 0] == skewed.sum(dim=1) // top_k).all()  # every token picked expert 0
    mid = load.total.clone()
    engine.add_request(type(req)(**{**req.__dict__, "request_id": "again"}))
    run_until_idle(engine)
    assert ((load.total - mid) == before).all()


def test_dense_model_counts_nothing(tiny_models, device):
    """This test verifies that: 1. a dense model has no expert counters and reports none."""
    engine = make_engine({"d": ("llama", tiny_models["llama"])}, device)
    assert engine.expert_load is None and engine.stats().expert_activations is None
