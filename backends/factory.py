"""Engines by name: `qlm worker --engine hf|sim`."""

from __future__ import annotations

from collections.abc import Mapping

from qlmserve.backends.engine import Engine
from qlmserve.controller.policy import ModelSpec

ENGINE_NAMES = ("hf", "sim")


def create_engine(kind: str, models: Mapping[str, ModelSpec], *, device: str = "auto", max_batch_size: int = 16,
                  kv_capacity_tokens: int | None = None, sim_profile: str | None = None, seed: int = 0) -> Engine:
    if kind == "hf":
        from qlmserve.backends.hf.engine import HFEngine

        return HFEngine(dict(models), device=device, max_batch_size=max_batch_size,
                        kv_capacity_tokens=kv_capacity_tokens)
    if kind == "sim":
        from qlmserve.backends.sim_engine import SimEngine
        from qlmserve.operations.costs import WorkerProfile, load_profile

        profile = load_profile(sim_profile) if sim_profile else WorkerProfile()
        return SimEngine(dict(models), profile=profile, max_batch_size=max_batch_size,
                         kv_capacity_tokens=kv_capacity_tokens, seed=seed)
    raise ValueError(f"unknown engine {kind!r}; valid engines: {', '.join(ENGINE_NAMES)}")
