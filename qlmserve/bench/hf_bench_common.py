"""Shared pieces of the HF-engine benchmarks: the benchmark model shape, an engine thread
that records when every token came out, trace lengths scaled to a tiny model.

Benchmark shape: the test models (hidden 64) run a decode iteration in ~10 ms on one CPU
core, almost all of it Python overhead, which would make every ratio an overhead ratio.
The benchmarks therefore use the same architecture wider (BENCH_SHAPE: hidden 256,
expert intermediate 1024, 8 heads, 8 layers, 8 experts top-2, ~50M parameters), where a
batch-16 decode iteration is ~50 ms and dominated by the expert and attention math.
"""

from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from qlmserve.backends.engine import EngineRequest, PreemptionMode, TokenEvent
from qlmserve.backends.hf.engine import HFEngine
from qlmserve.operations.model_spec import ModelSpec
from qlmserve.tiny_models import ensure_tiny_model

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


def prompt_ids(length: int, salt: int) -> list[int]:
    """Deterministic ordinary token ids (no special tokens) of a given length."""
    return [3 + (salt * 7919 + i * 104729) % 500 for i in range(length)]


def scaled(value: int, divisor: float, lo: int, hi: int) -> int:
    return int(min(hi, max(lo, math.ceil(value / divisor))))


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    s = sorted(values)
    k = (len(s) - 1) * q / 100.0
    lo, hi = math.floor(k), math.ceil(k)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


@dataclass
class TokenLog:
    """When each request arrived and when each of its tokens came out of step()."""

    arrival: dict[str, float] = field(default_factory=dict)
    token_times: dict[str, list[float]] = field(default_factory=dict)
    finished: dict[str, float] = field(default_factory=dict)

    def record(self, events: list[TokenEvent], now: float) -> None:
        for e in events:
            self.token_times.setdefault(e.request_id, []).append(now)
            if e.finished:
                self.finished[e.request_id] = now

    def ttft(self, rid: str) -> float | None:
        times = self.token_times.get(rid)
        return times[0] - self.arrival[rid] if times else None


class EngineLoop(threading.Thread):
    """Steps an engine on its own thread, as the worker does; requests arrive from others."""

    def __init__(self, engine: HFEngine, log: TokenLog) -> None:
        super().__init__(daemon=True, name="engine-loop")
        self.engine, self.log = engine, log
        self._halt = threading.Event()
        self.error: BaseException | None = None
        # (wall time, CPU time of this thread) after every step: with one torch thread all
        # model work runs on this thread, so CPU time is what the engine really got from
        # a machine it shares with other processes.
        self.samples: list[tuple[float, float]] = []

    def run(self) -> None:
        try:
            self.samples.append((time.perf_counter(), time.thread_time()))
            while not self._halt.is_set():
                if self.engine.has_work():
                    events = self.engine.step()
                    now = time.perf_counter()
                    self.log.record(events, now)
                    self.samples.append((now, time.thread_time()))
                else:
                    time.sleep(0.0005)
        except BaseException as exc:  # noqa: BLE001 - reported by the caller
            self.error = exc

    def cpu_seconds(self, start: float, end: float) -> float:
        """CPU time the engine thread used between two wall-clock instants (step granularity)."""
        inside = [cpu for wall, cpu in self.samples if start <= wall <= end]
        before = [cpu for wall, cpu in self.samples if wall < start]
        base = before[-1] if before else (inside[0] if inside else 0.0)
        return (inside[-1] - base) if inside else 0.0

    def stop(self) -> None:
        self._halt.set()
        self.join()
        if self.error is not None:
            raise RuntimeError("engine loop failed") from self.error


def submit(engine: HFEngine, log: TokenLog, request: EngineRequest) -> None:
    log.arrival[request.request_id] = time.perf_counter()
    engine.add_request(request)
