"""Engines by name: `qlm worker --engine hf|sim|vllm`."""

from __future__ import annotations

from collections.abc import Mapping

from qlmserve.backends.engine import Engine
from qlmserve.controller.policy import ModelSpec

ENGINE_NAMES = ("hf", "sim", "vllm")


def create_engine(kind: str, models: Mapping[str, ModelSpec], *, device: str = "auto", max_batch_size: int = 16,
                  kv_capacity_tokens: int | None = None, sim_profile: str | None = None, seed: int = 0,
                  threads: int = 1) -> Engine:
    if kind == "hf":
        from qlmserve.backends.hf.engine import HFEngine

        return HFEngine(dict(models), device=device, max_batch_size=max_batch_size,
                        kv_capacity_tokens=kv_capacity_tokens)
    if kind == "vllm":
        # Only in the vLLM virtualenv (make vllm): vLLM pins its own torch and transformers.
        from qlmserve.backends.vllm.engine import VLLMEngine
        from qlmserve.backends.vllm.options import VLLMOptions

        return VLLMEngine(dict(models), max_batch_size=max_batch_size, kv_capacity_tokens=kv_capacity_tokens,
                          options=VLLMOptions(device=device, threads=threads, seed=seed))
    if kind == "sim":
        from qlmserve.backends.sim_engine import OutputLengths, SimEngine, SimModel
        from qlmserve.operations.costs import WorkerProfile
        from qlmserve.operations.profiles import load_profile_file

        profile = load_profile_file(sim_profile) if sim_profile else WorkerProfile()
        sim_models = [SimModel(name, weight_bytes=spec.weight_bytes or 0) for name, spec in models.items()]
        # A simulated request runs to its max_tokens: replayed traces set max_tokens to the
        # trace's true output length, so the fleet sees the real length distribution.
        return SimEngine(profile, sim_models, max_batch_size=max_batch_size,
                         kv_capacity_tokens=kv_capacity_tokens or 100_000, seed=seed,
                         output_lengths=OutputLengths(kind="max_tokens"))
    raise ValueError(f"unknown engine {kind!r}; valid engines: {', '.join(ENGINE_NAMES)}")
