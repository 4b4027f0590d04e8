"""Shared pieces of the HF-engine benchmarks: the benchmark model shape and trace lengths
scaled to a tiny model (the engine thread and request logs are engine_loop.py's).

Benchmark shape: the test models (hidden 64) run a decode iteration in ~10 ms on one CPU
core, almost all of it Python overhead, which would make every ratio an overhead ratio.
The benchmarks therefore use the same architecture wider (BENCH_SHAPE: hidden 256,
expert intermediate 1024, 8 heads, 8 layers, 8 experts top-2, ~50M parameters), where a
batch-16 decode iteration is ~50 ms and dominated by the expert and attention math.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from qlmserve.backends.engine import PreemptionMode
from qlmserve.backends.hf.engine import HFEngine
from qlmserve.operations.model_spec import ModelSpec
from qlmserve.tiny_models import ensure_tiny_model

from .engine_loop import EngineLoop, TokenLog, percentile, prompt_ids, submit  # noqa: F401 - re-exported

BENCH_SHAPE: dict[str, int] = dict(
    hidden_size=256, intermediate_size=1024, num_attention_heads=8, num_key_value_heads=2
)
BENCH_LAYERS = 8
BENCH_MAX_CONTEXT = 512
DEFAULT_ROOT = Path.home() / ".cache" / "qlmserve" / "bench-models"


def ensure_bench_model(kind: str = "mixtral", root: str | Path | None = None, *, seed: int = 0) -> Path:
    root = Path(root) if root else DEFAULT_ROOT
    return ensure_tiny_model(kind, root / f"{kind}-bench", seed=seed, num_layers=BENCH_LAYERS, **BENCH_SHAPE)


def describe_shape(engine: HFEngine) -> str:
    cfg = engine.model.config
    experts = getattr(cfg, "num_local_experts", None) or getattr(cfg, "num_experts", None)
    params = sum(p.numel() for p in engine.model.parameters())
    return (
        f"{type(engine.model).__name__}: hidden {cfg.hidden_size}, {cfg.num_hidden_layers} layers, "
        f"{experts} experts top-{getattr(cfg, 'num_experts_per_tok', '-')}, {params / 1e6:.1f}M params, "
        f"{engine.dtype}, {engine.device}, {torch.get_num_threads()} torch thread(s)"
    )


def make_bench_engine(path: Path, kind: str, *, device: str = "cpu", max_batch_size: int = 16,
                      preemption: PreemptionMode = PreemptionMode.NONE, max_pause_s: float = 2.0,
                      model: str = "bench") -> HFEngine:
    spec = ModelSpec(path=str(path), kind=kind, max_context=BENCH_MAX_CONTEXT)
    return HFEngine({model: spec}, device=device, max_batch_size=max_batch_size, preemption=preemption,
                    max_pause_s=max_pause_s, initial_model=model)


def scaled(value: int, divisor: float, lo: int, hi: int) -> int:
    return int(min(hi, max(lo, math.ceil(value / divisor))))


