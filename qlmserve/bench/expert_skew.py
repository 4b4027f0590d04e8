"""Benchmark: expert activations and decode step time under a routing distribution skewed
on purpose (`qlm bench-engine experts`).

Setup (printed): one HFEngine on the benchmark MoE shape (hf_bench_common: Mixtral,
hidden 256, 8 layers, 8 experts top-2), float32, one torch thread, a decode batch of
`batch` sequences (prompts of 64 tokens) stepped in lockstep. The skew: every layer's
router logit of expert 0 is raised by `bias` before top-k (expert_load.skew_router); the
engine's own counters (expert_load.ExpertLoad) give the share of activations expert 0
received and the per-layer imbalance (busiest expert / mean). Per skew: the median
decode step on the engine thread's CPU clock over `steps` steps, biases interleaved over
`rounds` rounds.

What it decides: on one device the expert stage runs the experts one after another
(transformers' expert loop), so its time is the sum over experts, not the busiest one's;
a hot expert serialises a step only where experts run in parallel (expert parallelism
over devices, or parallel kernels). If the skewed steps are no slower than the even ones,
regrouping tokens on one device has nothing to win and the engine does not do it.
"""

from __future__ import annotations

import json
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from qlmserve.backends.engine import EngineRequest
from qlmserve.backends.hf.expert_load import skew_router

from .hf_bench_common import describe_shape, ensure_bench_model, make_bench_engine, prompt_ids


@dataclass
class ExpertBenchOptions:
    kind: str = "mixtral"
    model_root: str | None = None
    device: str = "cpu"
    threads: int = 1
    batch: int = 16
    steps: int = 24
    rounds: int = 3
    biases: tuple[float, ...] = (0.0, 2.0, 4.0, 8.0)


def measure(engine, bias: float, opts: ExpertBenchOptions, tag: str) -> dict:
    undo = skew_router(engine.model, 0, bias) if bias else (lambda: None)
    try:
        for i in range(opts.batch):
            engine.add_request(EngineRequest(f"{tag}-{i}", "bench", prompt_ids(64, salt=i + 1),
                                             max_tokens=opts.steps + 2))
        engine.step()  # prefill (not measured)
        while engine._waiting or any(s.is_prefill for s in engine._running):
            engine.step()
        times, counts = [], torch.zeros_like(engine.expert_load.total)
        for _ in range(opts.steps):
            t0 = time.thread_time()
            engine.step()
            times.append(time.thread_time() - t0)
            counts += engine.expert_load.step
        while engine.has_work():
            engine.step()
    finally:
        undo()
    share = float(counts[:, 0].sum() / counts.sum())
    return {"bias": bias, "step_ms": 1000 * statistics.median(times), "hot_share": share,
            "imbalance": statistics.mean(engine.expert_load.imbalance(counts))}


def main(opts: ExpertBenchOptions, json_out: str | None = None) -> dict:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=140)
    torch.set_num_threads(opts.threads)
    engine = make_bench_engine(ensure_bench_model(opts.kind, opts.model_root), opts.kind, device=opts.device,
                               max_batch_size=opts.batch)
    console.print(describe_shape(engine))
    rows: dict[float, list[dict]] = {b: [] for b in opts.biases}
    for k in range(opts.rounds):
        order = opts.biases if k % 2 == 0 else tuple(reversed(opts.biases))
        for b in order:
            rows[b].append(measure(engine, b, opts, f"r{k}b{b}"))
    table = Table(title=f"Decode step at batch {opts.batch} under routing skew ({opts.rounds} rounds x "
                        f"{opts.steps} steps, engine CPU clock)")
    for col in ("bias on expert 0", "expert 0 share", "imbalance max/mean", "step ms (median of rounds)",
                "vs unskewed"):
        table.add_column(col, justify="right")
    summary = []
    base = None
    for b in opts.biases:
        rs = rows[b]
        s = {"bias": b, "hot_share": statistics.mean(r["hot_share"] for r in rs),
             "imbalance": statistics.mean(r["imbalance"] for r in rs),
             "step_ms": statistics.median(r["step_ms"] for r in rs)}
        base = base or s["step_ms"]
        summary.append(s)
        table.add_row(f"{b:g}", f"{s['hot_share']:.1%}", f"{s['imbalance']:.2f}", f"{s['step_ms']:.1f}",
                      f"{s['step_ms'] / base:.3f}x")
    console.print(table)
    console.print("uniform share is 12.5% per expert (8 experts, top-2 of 8 per token)")
    result = {"options": asdict(opts), "summary": summary, "rounds": {str(b): rs for b, rs in rows.items()}}
    if json_out:
        Path(json_out).parent.mkdir(parents=True, exist_ok=True)
        Path(json_out).write_text(json.dumps(result, indent=1))
    return result
