"""Benchmark: what chunked prefill costs and buys on the HF engine (`qlm bench-engine chunked`).

Setup (printed with the results): one HFEngine on the benchmark MoE shape (see
hf_bench_common), PreemptionMode.ITERATION (latency-sensitive work first at every
iteration boundary), one engine thread stepping while requests arrive from another (as
in the worker). Each run submits `be_requests` best-effort (BE) requests with long
prompts (`be_prompt` tokens, `be_output` output tokens) at once, and one
latency-sensitive (LS) request (`ls_prompt` tokens, `ls_output` output tokens) a little
later, while the BE prompts are being prefilled. Without chunking the BE prompts are
prefilled in one pass the LS request must wait for; with a budget of B tokens an
iteration prefills at most B of them, so the LS request waits for at most one B-token
chunk pass, then gets an LS-only iteration (operations/batching.py).

The LS arrival offset varies from round to round over the span of the unchunked BE
prefill pass (measured first): round k of `rounds` puts it at (k + 0.5) / rounds of
that span, the same offsets for every budget. Budgets are interleaved within a round,
so the noise of a shared machine falls on all alike.

Reported per budget (pooled over rounds): LS TTFT p50 and max; BE throughput: BE
tokens / wall seconds from the BE submission to the last BE token, and BE tokens per
CPU-second of the engine thread over the same span (with one torch thread all model
work runs there: it is what the work cost on a core of its own, less distorted by other
processes than wall time); LS TTFT on the same CPU clock too; BE TTFT p50; prefill
passes per run. Ratios are to the unchunked run.
"""

from __future__ import annotations

import json
import os
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from qlmserve.backends.engine import EngineRequest, PreemptionMode

from .hf_bench_common import (
    EngineLoop,
    TokenLog,
    describe_shape,
    ensure_bench_model,
    make_bench_engine,
    percentile,
    prompt_ids,
    submit,
)

NO_CHUNKING = 1 << 20  # a budget larger than any iteration's prompt tokens


@dataclass
class ChunkedOptions:
    kind: str = "mixtral"
    model_root: str | None = None
    device: str = "cpu"
    threads: int = 1
    budgets: list[int] = field(default_factory=lambda: [1024, 512, 256, 128])
    rounds: int = 3
    be_requests: int = 6
    be_prompt: int = 384
    be_output: int = 16
    ls_prompt: int = 32
    ls_output: int = 4
    max_batch_size: int = 16
    mode: str = "iteration"
    timeout_s: float = 300.0  # per run


def _run(engine, opts: ChunkedOptions, budget: int, ls_offset_s: float | None, tag: str) -> dict:
    """One run: the BE requests at once, the LS one `ls_offset_s` later (None: no LS)."""
    engine.policy.max_prefill_tokens = budget
    engine.pass_log.clear()
    log = TokenLog()
    loop = EngineLoop(engine, log)
    loop.start()
    be = [EngineRequest(f"{tag}-be{i}", "bench", prompt_ids(opts.be_prompt, 1000 + i), max_tokens=opts.be_output)
          for i in range(opts.be_requests)]
    ls = EngineRequest(f"{tag}-ls", "bench", prompt_ids(opts.ls_prompt, 7), max_tokens=opts.ls_output,
                       latency_sensitive=True)
    t0 = time.perf_counter()
    for r in be:
        submit(engine, log, r)
    if ls_offset_s is not None:
        time.sleep(max(0.0, t0 + ls_offset_s - time.perf_counter()))
        submit(engine, log, ls)
    ids = [r.request_id for r in be] + ([ls.request_id] if ls_offset_s is not None else [])
    while not all(rid in log.finished for rid in ids):
        if time.perf_counter() - t0 > opts.timeout_s:
            loop.stop()
            raise RuntimeError(f"run {tag} (budget {budget}) did not finish in {opts.timeout_s} s")
        time.sleep(0.002)
    loop.stop()
    be_end = max(log.finished[r.request_id] for r in be)
    ls_ttft = ls_cpu = None
    if ls_offset_s is not None:
        ls_ttft = log.ttft(ls.request_id)
        ls_cpu = _cpu_at(loop, log.token_times[ls.request_id][0]) - _cpu_at(loop, log.arrival[ls.request_id])
    return {
        "budget": budget,
        "ls_offset_s": ls_offset_s,
        "ls_ttft_s": ls_ttft,
        "ls_ttft_cpu_s": ls_cpu,
        "be_ttft_s": [log.ttft(r.request_id) for r in be],
        "be_tokens": sum(len(log.token_times[r.request_id]) for r in be),
        "be_wall_s": be_end - t0,
        "be_cpu_s": loop.cpu_seconds(t0, be_end),
        "prefill_passes": sum(1 for p in engine.pass_log if p.prefill),
        "longest_prefill_pass_s": max((p.seconds for p in engine.pass_log if p.prefill), default=0.0),
    }


def _cpu_at(loop: EngineLoop, wall: float) -> float:
    """The engine thread's CPU clock at a wall-clock instant, interpolated between the
    samples taken after each step (within a step the thread computes all along)."""
    before = [s for s in loop.samples if s[0] <= wall]
    after = [s for s in loop.samples if s[0] > wall]
    if not before or not after:
        return (before or after)[-1 if before else 0][1]
    (w0, c0), (w1, c1) = before[-1], after[0]
    return c0 + (c1 - c0) * (wall - w0) / (w1 - w0)


def run(opts: ChunkedOptions, path: Path | None = None) -> dict:
    """`path`: a model folder (default: the benchmark model, built on first use)."""
    torch.set_num_threads(opts.threads)
    path = path or ensure_bench_model(opts.kind, opts.model_root)
    engine = make_bench_engine(path, opts.kind, device=opts.device, max_batch_size=opts.max_batch_size,
                               preemption=PreemptionMode(opts.mode))
    # Warm-up (allocator, kernels) and the span of the unchunked BE prefill pass.
    for i in range(2):
        _run(engine, opts, NO_CHUNKING, 0.0, f"warm{i}")
    span = _run(engine, opts, NO_CHUNKING, None, "span")["longest_prefill_pass_s"]
    budgets = [NO_CHUNKING, *opts.budgets]
    runs: dict[int, list[dict]] = {b: [] for b in budgets}
    for k in range(opts.rounds):
        offset = (k + 0.5) / opts.rounds * span
        for b in budgets:
            runs[b].append(_run(engine, opts, b, offset, f"r{k}-b{b}"))
    model = describe_shape(engine)
    engine.close()
    base = _summary(runs[NO_CHUNKING])
    rows = []
    for b in budgets:
        s = _summary(runs[b])
        s["budget"] = b
        s["be_tok_per_wall_s_ratio"] = s["be_tok_per_wall_s"] / base["be_tok_per_wall_s"]
        s["be_tok_per_cpu_s_ratio"] = s["be_tok_per_cpu_s"] / base["be_tok_per_cpu_s"]
        rows.append(s)
    return {
        "benchmark": "chunked-prefill",
        "setup": {**asdict(opts), "model": model, "unchunked_prefill_pass_s": span,
                  "cpu_count": os.cpu_count(), "load_average_1m_at_end": round(os.getloadavg()[0], 2)},
        "rows": rows,
        "runs": {str(b): r for b, r in runs.items()},
    }


def _summary(runs: list[dict]) -> dict:
    ls = [r["ls_ttft_s"] for r in runs]
    ls_cpu = [r["ls_ttft_cpu_s"] for r in runs]
    be_tokens = sum(r["be_tokens"] for r in runs)
    return {
        "ls_ttft_p50_s": statistics.median(ls),
        "ls_ttft_max_s": max(ls),
        "ls_ttft_cpu_p50_s": statistics.median(ls_cpu),
        "ls_ttft_cpu_max_s": max(ls_cpu),
        "be_ttft_p50_s": percentile([t for r in runs for t in r["be_ttft_s"]], 50),
        "be_tok_per_wall_s": be_tokens / sum(r["be_wall_s"] for r in runs),
        "be_tok_per_cpu_s": be_tokens / sum(r["be_cpu_s"] for r in runs),
        "prefill_passes": statistics.median(r["prefill_passes"] for r in runs),
        "longest_prefill_pass_s": max(r["longest_prefill_pass_s"] for r in runs),
    }


def print_report(report: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    setup = report["setup"]
    console = Console(width=max(Console().width, 120))
    console.print(f"[bold]Chunked prefill[/bold] on the HF engine: {setup['model']}; mode {setup['mode']}")
    console.print(f"{setup['be_requests']} BE requests of {setup['be_prompt']} prompt / {setup['be_output']} output "
                  f"tokens at once; one LS request ({setup['ls_prompt']} / {setup['ls_output']}) arriving during "
                  f"their prefill (offsets over the {setup['unchunked_prefill_pass_s']:.2f} s unchunked pass); "
                  f"{setup['rounds']} rounds, budgets interleaved")
    t = Table(title="LS TTFT and BE throughput per prefill budget (ratios to no chunking)")
    for c in ("budget", "LS TTFT p50 ms\nwall / CPU", "LS TTFT max ms\nwall / CPU", "prefill\npasses",
              "BE TTFT\np50 s", "BE tok/s\nwall", "BE tok/s\nCPU", "ratio\nwall", "ratio\nCPU"):
        t.add_column(c, justify="right")
    for r in report["rows"]:
        t.add_row("none" if r["budget"] >= NO_CHUNKING else str(r["budget"]),
                  f"{r['ls_ttft_p50_s'] * 1000:.0f} / {r['ls_ttft_cpu_p50_s'] * 1000:.0f}",
                  f"{r['ls_ttft_max_s'] * 1000:.0f} / {r['ls_ttft_cpu_max_s'] * 1000:.0f}",
                  f"{r['prefill_passes']:.0f}", f"{r['be_ttft_p50_s']:.2f}", f"{r['be_tok_per_wall_s']:.1f}",
                  f"{r['be_tok_per_cpu_s']:.1f}", f"{r['be_tok_per_wall_s_ratio']:.3f}",
                  f"{r['be_tok_per_cpu_s_ratio']:.3f}")
    console.print(t)
    console.print("[dim]CPU: on the engine thread's CPU clock (one torch thread): what it takes on a core of its "
                  "own, less disturbed by other processes than wall time[/dim]")
    console.print(f"[dim]load average (1 min) at the end: {setup['load_average_1m_at_end']}, "
                  f"{setup['cpu_count']} CPUs[/dim]")


def main(opts: ChunkedOptions, out: str | None) -> dict:
    report = run(opts)
    print_report(report)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(report, indent=2))
    return report
