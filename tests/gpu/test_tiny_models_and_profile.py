"""Tiny seeded models, the profiler and the HF CLI subcommands."""

from __future__ import annotations

import json

import pytest
import torch
from gpu_helpers import make_engine

from qlmserve.backends.hf.profile import ProfileOptions, profile_engine
from qlmserve.cli import main as qlm_main
from qlmserve.operations.profiles import load_profile_file
from qlmserve.tiny_models import MARKER, ensure_tiny_model

pytestmark = pytest.mark.gpu


def test_tiny_model_is_seeded_cached_and_loads_offline(tmp_path):
    """This test verifies that: 1. the same seed gives bit-identical weights, another seed
    different ones; 2. a second call with the same spec does not rebuild, a different spec
    does; 3. AutoTokenizer / AutoModelForCausalLM load the folder offline, the tokenizer
    round-trips text and has pad/bos/eos ids 0/1/2 matching the model config."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    a = ensure_tiny_model("olmoe", tmp_path / "a", seed=3, num_layers=2)
    b = ensure_tiny_model("olmoe", tmp_path / "b", seed=3, num_layers=2)
    c = ensure_tiny_model("olmoe", tmp_path / "c", seed=4, num_layers=2)
    wa, wb, wc = (load_file(p / "model.safetensors") for p in (a, b, c))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert not all(torch.equal(wa[k], wc[k]) for k in wa)

    stamp = (a / "model.safetensors").stat().st_mtime_ns
    ensure_tiny_model("olmoe", a, seed=3, num_layers=2)
    assert (a / "model.safetensors").stat().st_mtime_ns == stamp
    ensure_tiny_model("olmoe", a, seed=3, num_layers=3)
    assert json.loads((a / MARKER).read_text())["num_layers"] == 3

    tok = AutoTokenizer.from_pretrained(a)
    model = AutoModelForCausalLM.from_pretrained(a)
    text = "Queue management, 42 tokens!"
    assert tok.decode(tok(text).input_ids) == text
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)
    assert model.config.num_hidden_layers == 3 and model.config.eos_token_id == 2
    assert len(tok) <= model.config.vocab_size


def test_profile_fits_the_engine_it_measured(tiny_models, tmp_path):
    """This test verifies that: 1. the profiler writes a YAML that load_profile_file reads
    back into the same WorkerProfile; 2. the fitted decode and prefill times are positive
    and within 3x of fresh measurements of the same engine (engine-thread CPU time, so
    other jobs on the machine do not decide the outcome); 3. kv_bytes_per_token is the
    exact KV size of one token (layers x 2 x kv heads x head dim x 4 bytes)."""
    torch.set_num_threads(1)
    engine = make_engine({"m": ("mixtral", tiny_models["mixtral"])}, "cpu", max_batch_size=4)
    opts = ProfileOptions(prefill_lengths=(16, 64, 128), decode_batches=(1, 4), decode_contexts=(16, 64),
                          decode_steps=4, repeats=2, swap_tokens=32, loads=1, clock="cpu")
    result = profile_engine(engine, "m", name="test", opts=opts)
    path = result.write(tmp_path / "p.yaml")
    prof = load_profile_file(path)
    assert prof == result.profile
    cfg = engine.model.config
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    assert prof.kv_bytes_per_token == cfg.num_hidden_layers * 2 * cfg.num_key_value_heads * head_dim * 4
    assert prof.decode_base_s > 0 and prof.prefill_per_token_s > 0 and prof.load_warm_bytes_per_s > 0

    from qlmserve.backends.engine import EngineRequest

    engine.pass_log.clear()
    for i in range(4):
        engine.add_request(EngineRequest(f"x{i}", "m", list(range(3, 35)), max_tokens=6))
    while engine.has_work():
        engine.step()
    # CPU time of the passes: what they cost regardless of other jobs on the machine.
    decode = sorted(p.cpu_seconds for p in engine.pass_log if not p.prefill and p.batch == 4)
    measured = decode[len(decode) // 2]
    predicted = prof.decode_step_time(4, 4 * 34)
    assert measured / 3 < predicted < measured * 3


def test_cli_builds_a_tiny_model(tmp_path):
    """This test verifies that: 1. `qlm models build-tiny` builds the folder with the asked
    kind, seed and config overrides and returns 0; 2. the bench-engine and profile
    subcommands are registered (their help parses)."""
    out = tmp_path / "m"
    assert qlm_main(["models", "build-tiny", "--kind", "llama", "--out", str(out), "--seed", "5",
                     "--layers", "2", "--set", "hidden_size=32"]) == 0
    spec = json.loads((out / MARKER).read_text())
    assert spec["kind"] == "llama" and spec["seed"] == 5 and spec["overrides"] == {"hidden_size": 32}
    for argv in (["bench-engine", "--help"], ["profile", "--help"]):
        with pytest.raises(SystemExit) as exc:
            qlm_main(argv)
        assert exc.value.code == 0


def test_committed_profiles_load():
    """This test verifies that: 1. every measured profile under configs/profiles loads with
    load_profile_file; 2. its name is its file name and its speeds are positive, so the
    simulator can use it."""
    from pathlib import Path

    files = sorted((Path(__file__).resolve().parents[2] / "configs" / "profiles").glob("*.yaml"))
    assert files, "no measured profiles committed"
    for path in files:
        prof = load_profile_file(path)
        assert prof.name == path.stem
        assert prof.decode_step_time(16, 1024) > 0 and prof.prefill_time(64) > 0
        assert prof.kv_bytes_per_token > 0 and prof.kv_swap_bytes_per_s > 0
        assert prof.load_cold_bytes_per_s > 0 and prof.load_warm_bytes_per_s > 0
