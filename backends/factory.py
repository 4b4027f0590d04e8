"""Engines by name: `qlm worker --engine hf|sim`."""

from __future__ import annotations

from collections.abc import Mapping

from qlmserve.backends.engine import Engine
from qlmserve.operations.batching import DEFAULT_MAX_PREFILL_TOKENS
from qlmserve.operations.model_spec import ModelSpec

ENGINE_NAMES = ("hf", "sim")


def create_engine(kind: str, models: Mapping[str, ModelSpec], *, device: str = "auto", max_batch_size: int = 16,
                  kv_capacity_tokens: int | None = None, sim_profile: str | None = None, seed: int = 0,
                  max_prefill_tokens: int | None = None) -> Engine:
    """`max_prefill_tokens`: prompt tokens one iteration may prefill (None: the default)."""
    prefill = max_prefill_tokens or DEFAULT_MAX_PREFILL_TOKENS
    if kind == "hf":
        from qlmserve.backends.hf.engine import HFEngine

        return HFEngine(dict(models), device=device, max_batch_size=max_batch_size,
                        kv_capacity_tokens=kv_capacity_tokens, max_prefill_tokens=prefill)
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
                         output_lengths=OutputLengths(kind="max_tokens"), max_prefill_tokens=prefill)
    raise ValueError(f"unknown engine {kind!r}; valid engines: {', '.join(ENGINE_NAMES)}")
