"""Cost models derived from published GPU figures (configs/gpu_profiles.yaml)."""

from __future__ import annotations

import pytest

from qlmserve.operations.profiles import ProfileError, load_gpu_profiles, load_profile, load_profile_file

# NVIDIA NeMo Framework docs, "Llama-2 Results / Inference Performance", TP=1, 128 input
# tokens, 20 output tokens: average latency in ms at batch 1 and batch 8.
NEMO_LLAMA2_7B = {"A100-80GB": (234.0, 329.5), "H100-80GB": (153.8, 199.2)}


def _latency(p, batch: int, prompt: int = 128, out: int = 20) -> float:
    t = p.prefill_time(prompt * batch)
    ctx = prompt + 1
    for _ in range(out - 1):
        t += p.decode_step_time(batch, batch * ctx)
        ctx += 1
    return t * 1000


@pytest.mark.parametrize("gpu", sorted(NEMO_LLAMA2_7B))
def test_derived_profiles_reproduce_a_published_measurement(gpu):
    """This test verifies that:
    1. the Llama-2-7B profile derived from datasheet figures reproduces NVIDIA's measured latency
       (1 prefill + 19 decode passes) within 10% at batch 1 and batch 8."""
    p = load_profile(gpu, "llama-2-7b")
    for batch, ref in zip((1, 8), NEMO_LLAMA2_7B[gpu]):
        assert _latency(p, batch) == pytest.approx(ref, rel=0.10)


def test_every_pair_derives_consistently():
    """This test verifies that:
    1. every (gpu, model) pair whose weights fit yields a positive profile and KV capacity;
    2. H100 is faster than A100, which is faster than A10, for the same model;
    3. a bigger model is slower on the same GPU; KV bytes per token come from the architecture;
    4. tensor parallelism makes room for a model that does not fit one GPU."""
    t = load_gpu_profiles()
    for gpu in t.gpus:
        for model in t.models:
            if t.kv_capacity_tokens(gpu, model) > t.models[model].max_context:
                p = t.profile(gpu, model)
                assert p.decode_base_s > 0 and p.prefill_per_token_s > 0 and p.kv_swap_time(1000) > 0
    d = {g: t.profile(g, "llama-2-7b").decode_step_time(16, 16_000) for g in ("H100-80GB", "A100-80GB", "A10-24GB")}
    assert d["H100-80GB"] < d["A100-80GB"] < d["A10-24GB"]
    assert t.profile("A100-80GB", "llama-2-13b").decode_base_s > t.profile("A100-80GB", "llama-2-7b").decode_base_s
    assert t.profile("A100-80GB", "mistral-7b").kv_bytes_per_token == 2 * 32 * 8 * 128 * 2
    assert t.kv_capacity_tokens("A100-80GB", "llama-2-70b") == 0
    assert t.kv_capacity_tokens("A100-80GB", "llama-2-70b", tensor_parallel=4) > 100_000
    warm, cold = (t.profile("A100-80GB", "llama-2-13b").model_load_time(26_040_000_000, w) for w in (True, False))
    assert warm < cold


def test_unknown_names_and_profile_files(tmp_path):
    """This test verifies that:
    1. an unknown GPU or model names the known ones;
    2. a measured profile file loads, and unknown fields are refused with their names."""
    with pytest.raises(ProfileError, match="known: A10-24GB"):
        load_profile("B200", "llama-2-7b")
    with pytest.raises(ProfileError, match="unknown model 'gpt-5'"):
        load_profile("A100-80GB", "gpt-5")
    f = tmp_path / "p.yaml"
    f.write_text("profile:\n  decode_base_s: 0.03\n  prefill_per_token_s: 0.0001\n  name: cpu\n")
    assert load_profile_file(f).decode_base_s == 0.03
    f.write_text("decode_base_s: 0.03\nturbo: 1\n")
    with pytest.raises(ProfileError, match="turbo"):
        load_profile_file(f)
