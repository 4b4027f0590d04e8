"""Measure an HFEngine and fit the WorkerProfile the planner and the simulator read.

What is measured, on the real engine (its own pass timings, `HFEngine.pass_log`):
  - prefill: single-sequence prefill passes at several prompt lengths (median of a few
    runs each); least squares t = prefill_base_s + prefill_per_token_s * tokens.
  - decode: decode passes over a grid of batch sizes and context lengths (median pass of
    each cell); least squares
    t = decode_base_s + decode_per_seq_s * batch + decode_per_ctx_token_s * context
    (context = KV positions summed over the batch, as `WorkerProfile.decode_step_time`).
  - KV swap: swap_out / swap_in of sequences of known length: bytes / seconds.
  - model loads: cold loads (page cache dropped) and warm loads of the same model. One
    model size cannot separate a fixed cost from a bandwidth, so the warm bandwidth comes
    from a plain host-to-device copy of a large tensor, load_fixed_s is what a warm load
    takes beyond that copy, and the cold bandwidth is what remains of a cold load.

Pass times are wall-clock, or (clock="cpu", CPU device with one torch thread) the engine
thread's CPU time, which does not count the time other processes took the core.
Swap and load times are always wall-clock (they wait on memory and disk, not the CPU).

The YAML holds the fitted fields under `profile:` (what
`qlmserve.operations.profiles.load_profile_file` reads), plus `setup:` and the raw
`measurements:` so a fit can be checked or redone.
"""

from __future__ import annotations

import os
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import yaml

from qlmserve.backends.engine import EngineRequest
from qlmserve.operations.costs import WorkerProfile

from .engine import HFEngine
from .pass_log import PassRecord
from .weights import sync


@dataclass
class ProfileOptions:
    prefill_lengths: tuple[int, ...] = (16, 32, 64, 128, 256)
    decode_batches: tuple[int, ...] = (1, 2, 4, 8, 16)
    decode_contexts: tuple[int, ...] = (32, 128, 256)
    decode_steps: int = 6  # decode passes timed per (batch, context) point
    repeats: int = 3  # prefill / swap / load repetitions (median taken)
    swap_tokens: int = 256
    loads: int = 3
    # "wall": pass wall time. "cpu": the engine thread's CPU time per pass, which is what
    # the pass costs on an idle core; only meaningful on CPU with one torch thread, and
    # the way to profile on a machine shared with other jobs.
    clock: str = "wall"

    def pass_time(self, record: PassRecord) -> float:
        return record.cpu_seconds if self.clock == "cpu" else record.seconds


@dataclass
class ProfileResult:
    profile: WorkerProfile
    setup: dict
    measurements: dict = field(default_factory=dict)

    def to_yaml(self) -> str:
        prof = {k: (float(v) if isinstance(v, float) else v) for k, v in asdict(self.profile).items()}
        return yaml.safe_dump(
            {"profile": prof, "setup": self.setup, "measurements": self.measurements}, sort_keys=False
        )

    def write(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(self.to_yaml())
        return path


def _prompt(n: int, salt: int) -> list[int]:
    # Distinct, deterministic token ids in the ordinary (non-special) range.
    return [3 + (salt * 7919 + i * 104729) % 500 for i in range(n)]


def _run(engine: HFEngine) -> None:
    while engine.has_work():
        engine.step()


def _lstsq(rows: list[list[float]], y: list[float]) -> list[float]:
    coef, *_ = np.linalg.lstsq(np.asarray(rows, dtype=float), np.asarray(y, dtype=float), rcond=None)
    # A negative slope is noise around zero (e.g. attention cost at tiny contexts).
    return [max(0.0, float(c)) for c in coef]


def measure_prefill(engine: HFEngine, model: str, opts: ProfileOptions) -> list[tuple[int, float]]:
    points = []
    for n in opts.prefill_lengths:
        times = []
        for r in range(opts.repeats + 1):
            engine.pass_log.clear()
            engine.add_request(EngineRequest(f"prefill-{n}-{r}", model, _prompt(n, r), max_tokens=1))
            _run(engine)
            if r:  # the first run of each length warms allocator and kernels up
                times.append(opts.pass_time(engine.pass_log[0]))
        points.append((n, statistics.median(times)))
    return points


def measure_decode(engine: HFEngine, model: str, opts: ProfileOptions) -> list[tuple[int, int, float]]:
    points = []
    for ctx in opts.decode_contexts:
        for batch in opts.decode_batches:
            engine.pass_log.clear()
            for i in range(batch):
                engine.add_request(
                    EngineRequest(f"dec-{ctx}-{batch}-{i}", model, _prompt(ctx, i), max_tokens=opts.decode_steps + 2)
                )
            _run(engine)
            decode = [p for p in engine.pass_log
                      if not p.prefill and not p.catch_up and p.batch == batch][1:]  # [0]: warm-up
            # One point per grid cell, its median: a shared machine's hiccups are outliers
            # that would pull a least-squares fit over raw passes.
            points.append((batch, int(statistics.median(p.context_tokens for p in decode)),
                           statistics.median(opts.pass_time(p) for p in decode)))
    return points


def measure_swap(engine: HFEngine, model: str, opts: ProfileOptions) -> list[tuple[int, float, float]]:
    """(bytes, seconds out, seconds in) per repetition."""
    points = []
    for r in range(opts.repeats):
        rid = f"swap-{r}"
        engine.add_request(EngineRequest(rid, model, _prompt(opts.swap_tokens, r), max_tokens=4))
        engine.step()  # prefill: the sequence now holds swap_tokens of KV
        out = engine.swap_out(rid)
        back = engine.swap_in(rid)
        points.append((out.bytes_moved, out.seconds, back.seconds))
        _run(engine)
    return points


def host_copy_bandwidth(device: torch.device, nbytes: int = 256 << 20) -> float:
    """Bytes/s of one plain host -> device copy (host -> host on CPU), pinned when CUDA."""
    pin = device.type == "cuda"
    src = torch.empty(nbytes // 4, dtype=torch.float32, pin_memory=pin).fill_(1.0)
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        dst = src.to(device, copy=True, non_blocking=pin)
        sync(device)
        best = min(best, time.perf_counter() - t0)
        del dst
    return nbytes / best


def measure_loads(engine: HFEngine, model: str, opts: ProfileOptions) -> tuple[list[float], list[float], int]:
    """Cold and warm load seconds of `model` (reloaded in place) and its bytes."""
    cold, warm = [], []
    engine.drop_warm(model)
    for _ in range(opts.loads):
        engine.unload()  # so the next load is a real one
        cost = engine.load_model(model)
        cold.append(cost.seconds)
    engine.warm_model(model)
    for _ in range(opts.loads):
        engine.unload()
        cost = engine.load_model(model)
        warm.append(cost.seconds)
    engine.drop_warm(model)
    return cold, warm, cost.bytes_moved


def profile_engine(engine: HFEngine, model: str, *, name: str, opts: ProfileOptions | None = None) -> ProfileResult:
    opts = opts or ProfileOptions()
    if opts.clock == "cpu" and (engine.device.type != "cpu" or torch.get_num_threads() != 1):
        raise ValueError("clock='cpu' needs the CPU device and torch.set_num_threads(1)")
    if engine.stats().active_model != model:
        engine.load_model(model)
    max_ctx = engine.models[model].max_context
    opts.prefill_lengths = tuple(n for n in opts.prefill_lengths if n + 2 < max_ctx)
    opts.decode_contexts = tuple(n for n in opts.decode_contexts if n + opts.decode_steps + 2 < max_ctx)

    prefill = measure_prefill(engine, model, opts)
    pre_base, pre_tok = _lstsq([[1.0, n] for n, _ in prefill], [t for _, t in prefill])
    decode = measure_decode(engine, model, opts)
    dec_base, dec_seq, dec_ctx = _lstsq([[1.0, b, c] for b, c, _ in decode], [t for *_, t in decode])
    swaps = measure_swap(engine, model, opts)
    swap_bw = statistics.median(b / ((o + i) / 2) for b, o, i in swaps)
    kv_bytes_per_token = int(swaps[0][0] // opts.swap_tokens)
    cold, warm, weight_bytes = measure_loads(engine, model, opts)
    copy_bw = host_copy_bandwidth(engine.device)
    warm_s, cold_s = statistics.median(warm), statistics.median(cold)
    fixed = max(0.0, warm_s - weight_bytes / copy_bw)
    cold_bw = weight_bytes / max(cold_s - fixed, 1e-9)

    profile = WorkerProfile(
        prefill_base_s=pre_base,
        prefill_per_token_s=pre_tok,
        decode_base_s=dec_base,
        decode_per_seq_s=dec_seq,
        decode_per_ctx_token_s=dec_ctx,
        kv_bytes_per_token=kv_bytes_per_token,
        kv_swap_bytes_per_s=float(swap_bw),
        load_cold_bytes_per_s=float(cold_bw),
        load_warm_bytes_per_s=float(copy_bw),
        load_fixed_s=float(fixed),
        name=name,
    )
    cfg = engine.model.config
    setup = {
        "device": str(engine.device),
        "dtype": str(engine.dtype).removeprefix("torch."),
        "torch_threads": torch.get_num_threads(),
        "model": model,
        "model_path": engine.models[model].path,
        "architecture": type(engine.model).__name__,
        "hidden_size": cfg.hidden_size,
        "num_layers": cfg.num_hidden_layers,
        "weight_bytes": weight_bytes,
        "max_batch_size": engine.max_batch_size,
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "pass_clock": opts.clock,
        # Other processes share the cores: a high load average means slower, noisier passes.
        "load_average_1m": round(os.getloadavg()[0], 2),
        "cpu_count": os.cpu_count(),
    }
    measurements = {
        "prefill_tokens_seconds": [[n, round(t, 6)] for n, t in prefill],
        "decode_batch_context_seconds": [[b, c, round(t, 6)] for b, c, t in decode],
        "swap_bytes_out_in_seconds": [[b, round(o, 6), round(i, 6)] for b, o, i in swaps],
        "load_cold_seconds": [round(t, 6) for t in cold],
        "load_warm_seconds": [round(t, 6) for t in warm],
        "host_copy_bytes_per_s": float(copy_bw),
    }
    return ProfileResult(profile, setup, measurements)
