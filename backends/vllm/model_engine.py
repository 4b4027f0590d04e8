"""One vLLM engine (AsyncLLM) serving one model, and the figures vLLM reports about it.

A model swap starts another ModelEngine; the one swapped away sleeps where vLLM has
sleep mode (level 1: weights to host RAM, KV dropped; `wake_up()` is a warm start) and
shuts down where it has none (CPU), which makes the next start of that model cold.

Every call into AsyncLLM runs on the shared LoopThread.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from vllm import SamplingParams
from vllm.engine.arg_utils import AsyncEngineArgs
from vllm.outputs import RequestOutput
from vllm.platforms import current_platform
from vllm.v1.engine.async_llm import AsyncLLM
from vllm.v1.metrics.loggers import StatLoggerBase

from .loop import LoopThread
from .options import VLLMOptions

if TYPE_CHECKING:  # a type only: backends do not import the controller at run time
    from qlmserve.operations.model_spec import ModelSpec

_EMA = 0.2  # smoothing of the measured throughputs, as the HF engine's


def sleep_mode_available() -> bool:
    return bool(current_platform.is_sleep_mode_available())


def device_name() -> str:
    return str(current_platform.device_type)


@dataclass
class EngineFigures:
    """What vLLM's scheduler said after its last step (updated on the loop thread)."""

    kv_usage: float = 0.0  # share of the KV blocks in use
    running: int = 0
    waiting: int = 0
    prefill_tokens_per_s: float = 0.0  # prompt tokens per second of a step that had any
    decode_tokens_per_s: float = 0.0  # per sequence: 1 / seconds of a decode-only step
    steps: int = 0

    def record_step(self, prompt_tokens: int, decode_rows: int, seconds: float) -> None:
        self.steps += 1
        if seconds <= 0:
            return
        if prompt_tokens > 0:
            self.prefill_tokens_per_s += _EMA * (prompt_tokens / seconds - self.prefill_tokens_per_s)
        elif decode_rows > 0:
            self.decode_tokens_per_s += _EMA * (1.0 / seconds - self.decode_tokens_per_s)


def _stats_tap(figures: EngineFigures) -> Callable[..., StatLoggerBase]:
    """A vLLM stat-logger factory that copies each step's scheduler figures into `figures`
    (vLLM calls it after every step's outputs; the interface is vLLM's, marked unstable)."""

    class StatsTap(StatLoggerBase):
        def __init__(self, vllm_config: object, engine_index: int = 0) -> None:  # noqa: ARG002
            self.figures = figures

        def record(self, scheduler_stats, iteration_stats, mm_cache_stats=None, engine_idx: int = 0) -> None:  # noqa: ANN001, ARG002
            if scheduler_stats is None:
                return
            f = self.figures
            f.kv_usage = scheduler_stats.kv_cache_usage
            f.running = scheduler_stats.num_running_reqs
            f.waiting = scheduler_stats.num_waiting_reqs
            d = scheduler_stats.iteration_details
            if d is not None and not d.is_dummy:
                f.record_step(d.num_ctx_tokens, d.num_generation_requests, d.elapsed_ms / 1000.0)

        def log_engine_initialized(self) -> None:
            pass

    return StatsTap


class ModelEngine:
    def __init__(self, name: str, spec: ModelSpec, loop: LoopThread, options: VLLMOptions, *,
                 max_num_seqs: int, kv_capacity_tokens: int) -> None:
        if not spec.path:
            raise ValueError(f"model {name!r} has no 'path': the vLLM engine loads weights from a local folder")
        self.name, self.spec, self.loop, self.options = name, spec, loop, options
        self.max_num_seqs = max_num_seqs
        self.kv_capacity_tokens = kv_capacity_tokens
        self.figures = EngineFigures()
        self.llm: AsyncLLM | None = None
        self.asleep = False

    # ---- life cycle (engine thread; each waits on the loop) ---------------------------

    def engine_args(self) -> AsyncEngineArgs:
        o = self.options
        return AsyncEngineArgs(
            model=self.spec.path, dtype=o.dtype, max_model_len=self.spec.max_context, max_num_seqs=self.max_num_seqs,
            kv_cache_memory_bytes=self.kv_capacity_tokens * kv_bytes_per_token(self.spec.path, o.dtype),
            gpu_memory_utilization=o.gpu_memory_utilization, block_size=o.block_size,
            max_num_batched_tokens=o.max_num_batched_tokens, enforce_eager=o.enforce_eager, seed=o.seed,
            scheduling_policy="priority", enable_sleep_mode=sleep_mode_available(),
            # The figures of every step reach the stats tap (KV use, step times).
            disable_log_stats=True, enable_logging_iteration_details=True)

    def start(self) -> float:
        """Start the engine from disk (cold). Returns the seconds it took."""
        t0 = time.perf_counter()
        args = self.engine_args()
        tap = _stats_tap(self.figures)

        async def make() -> AsyncLLM:
            # Built on the loop that will drive it, as vLLM's own servers do.
            return AsyncLLM.from_engine_args(args, stat_loggers=[tap])

        self.llm = self.loop.run(make(), self.options.start_timeout_s)
        self.asleep = False
        return time.perf_counter() - t0

    def sleep(self) -> float:
        """Level 1: weights to host RAM, KV dropped (only where sleep mode exists)."""
        t0 = time.perf_counter()
        self.loop.run(self._llm().sleep(level=1), self.options.start_timeout_s)
        self.asleep = True
        return time.perf_counter() - t0

    def wake_up(self) -> float:
        t0 = time.perf_counter()
        self.loop.run(self._llm().wake_up(), self.options.start_timeout_s)
        self.asleep = False
        return time.perf_counter() - t0

    def shutdown(self) -> None:
        if self.llm is not None:
            llm, self.llm = self.llm, None
            self.loop.call(llm.shutdown, self.options.start_timeout_s)

    def _llm(self) -> AsyncLLM:
        if self.llm is None:
            raise RuntimeError(f"the vLLM engine of {self.name!r} is not running")
        return self.llm

    # ---- vLLM's own figures -----------------------------------------------------------

    @property
    def capacity_tokens(self) -> int:
        """KV tokens vLLM allocated: its blocks times their size."""
        cache = self._llm().vllm_config.cache_config
        return int((cache.num_gpu_blocks or 0) * cache.block_size)

    @property
    def vocab_size(self) -> int:
        return int(self._llm().model_config.get_vocab_size())

    # ---- requests (coroutines: run on the loop) ---------------------------------------

    def generate(self, request_id: str, token_ids: list[int], params: SamplingParams,
                 priority: int) -> AsyncIterator[RequestOutput]:
        return self._llm().generate({"prompt_token_ids": token_ids}, params, request_id, priority=priority)

    async def abort(self, request_id: str) -> None:
        if self.llm is not None:
            await self.llm.abort(request_id)


def kv_bytes_per_token(model_path: str, dtype: str) -> int:
    """KV-cache bytes one token takes (keys and values of every layer), from the model's
    config: turns the worker's KV capacity in tokens into vLLM's KV size in bytes."""
    import torch
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(model_path, local_files_only=True)
    cfg = getattr(cfg, "text_config", None) or cfg
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    if dtype == "auto":  # the checkpoint's dtype
        dtype = getattr(cfg, "dtype", None) or "float32"
    width = torch.empty((), dtype=getattr(torch, dtype) if isinstance(dtype, str) else dtype).element_size()
    return 2 * cfg.num_hidden_layers * kv_heads * head_dim * width
