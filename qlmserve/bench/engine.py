"""Benchmarks of the HF engine itself, on the benchmark MoE shape (see hf_bench_common).

- throughput: decode tokens/s of HFEngine at batch 16 against `model.generate()` on the
  same 16 prompts (equal lengths, so generate pads nothing), same model, same threads.
  Both produce `max_tokens` tokens per sequence; the engine's count is what it actually
  emitted (a sequence may stop early at eos; generate is held to min_new_tokens).
- batching: continuous vs static batching on a slice of the Azure conversation trace
  (lengths scaled to the tiny model: prompt / 8 in [4, 256], output / 4 in [4, 128]),
  offline (every request available at t=0), batch 16. Static = the classic loop: take
  16 requests, run them until the last one finishes, take the next 16 (driven through
  the same engine, so only the batching policy differs).
- warm: model load from disk (page cache dropped first, so the disk is really read) vs
  from a warm copy in host RAM, median of several loads of the same model.
"""

from __future__ import annotations

import json
import os
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from qlmserve.backends.engine import EngineRequest
from qlmserve.traces import load_trace, resolve_trace_path

from .hf_bench_common import (
    EngineLoop,
    TokenLog,
    describe_shape,
    ensure_bench_model,
    make_bench_engine,
    percentile,
    prompt_ids,
    scaled,
    submit,
)


@dataclass
class EngineBenchOptions:
    kind: str = "mixtral"
    model_root: str | None = None
    device: str = "cpu"
    threads: int = 1
    seed: int = 0
    batch: int = 16
    prompt_len: int = 64
    max_tokens: int = 64
    trace: str = "azure2023_conv.csv"
    trace_requests: int = 64
    loads: int = 3


def _drain(engine) -> None:
    while engine.has_work():
        engine.step()


def bench_throughput(opts: EngineBenchOptions, path: Path) -> dict:
    engine = make_bench_engine(path, opts.kind, device=opts.device, max_batch_size=opts.batch)
    prompts = [prompt_ids(opts.prompt_len, i) for i in range(opts.batch)]
    for i in range(2):  # warm-up
        engine.add_request(EngineRequest(f"w{i}", "bench", prompts[i], max_tokens=4))
    _drain(engine)
    engine.pass_log.clear()
    emitted = 0
    t0 = time.perf_counter()
    for i, p in enumerate(prompts):
        engine.add_request(EngineRequest(f"r{i}", "bench", p, max_tokens=opts.max_tokens))
    while engine.has_work():
        emitted += len(engine.step())
    engine_s = time.perf_counter() - t0
    decode = [p for p in engine.pass_log if not p.prefill]
    engine_decode_tps = sum(p.batch for p in decode) / sum(p.seconds for p in decode)
    model = engine.model
    ids = torch.tensor(prompts, device=engine.device)

    def generate(x: torch.Tensor, tokens: int) -> torch.Tensor:
        return model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=tokens, min_new_tokens=tokens,
                              do_sample=False, pad_token_id=0)

    with torch.inference_mode():
        generate(ids[:2], 4)  # warm-up
        t0 = time.perf_counter()
        out = generate(ids, opts.max_tokens)
        gen_s = time.perf_counter() - t0
        # generate()'s prefill alone, to split its time into prefill and decode.
        t0 = time.perf_counter()
        generate(ids, 1)
        gen_prefill_s = time.perf_counter() - t0
    gen_tokens = int((out.shape[1] - ids.shape[1]) * ids.shape[0])
    engine.close()
    return {
        "batch": opts.batch,
        "prompt_len": opts.prompt_len,
        "max_tokens": opts.max_tokens,
        "engine_tokens": emitted,
        "engine_s": engine_s,
        "engine_tok_s": emitted / engine_s,
        "engine_decode_tok_s": engine_decode_tps,
        "generate_tokens": gen_tokens,
        "generate_s": gen_s,
        "generate_tok_s": gen_tokens / gen_s,
        "generate_decode_tok_s": (gen_tokens - ids.shape[0]) / max(gen_s - gen_prefill_s, 1e-9),
        "engine_vs_generate": (emitted / engine_s) / (gen_tokens / gen_s),
    }


def _trace_requests(opts: EngineBenchOptions) -> list[tuple[int, int]]:
    trace = load_trace(resolve_trace_path(opts.trace), limit=opts.trace_requests)
    return [(scaled(r.prompt_tokens, 8, 4, 256), scaled(r.output_tokens, 4, 4, 128)) for r in trace.records]


def _run_batching(opts: EngineBenchOptions, path: Path, lengths: list[tuple[int, int]], static: bool) -> dict:
    engine = make_bench_engine(path, opts.kind, device=opts.device, max_batch_size=opts.batch)
    engine.add_request(EngineRequest("warm", "bench", prompt_ids(16, 0), max_tokens=4))
    _drain(engine)
    log = TokenLog()
    requests = [EngineRequest(f"t{i}", "bench", prompt_ids(p, i), max_tokens=o) for i, (p, o) in enumerate(lengths)]
    t0 = time.perf_counter()
    for r in requests:
        log.arrival[r.request_id] = t0  # offline: all requests are there from the start
    if static:
        for start in range(0, len(requests), opts.batch):
            for r in requests[start : start + opts.batch]:
                engine.add_request(r)
            while engine.has_work():
                log.record(engine.step(), time.perf_counter())
    else:
        loop = EngineLoop(engine, log)
        loop.start()
        for r in requests:
            submit(engine, log, r)
        while len(log.finished) < len(requests):
            time.sleep(0.005)
        loop.stop()
        for r in requests:
            log.arrival[r.request_id] = t0
    total = time.perf_counter() - t0
    engine.close()
    tokens = sum(len(v) for v in log.token_times.values())
    latency = [log.finished[r.request_id] - t0 for r in requests]
    ttft = [log.ttft(r.request_id) for r in requests]
    return {
        "policy": "static" if static else "continuous",
        "requests": len(requests),
        "tokens": tokens,
        "seconds": total,
        "tok_s": tokens / total,
        "latency_p50_s": percentile(latency, 50),
        "latency_p99_s": percentile(latency, 99),
        "ttft_p50_s": percentile(ttft, 50),
    }


def bench_batching(opts: EngineBenchOptions, path: Path) -> dict:
    lengths = _trace_requests(opts)
    static = _run_batching(opts, path, lengths, static=True)
    continuous = _run_batching(opts, path, lengths, static=False)
    return {
        "trace": opts.trace,
        "lengths": "prompt/8 in [4,256], output/4 in [4,128]; offline (all at t=0)",
        "static": static,
        "continuous": continuous,
        "throughput_gain": continuous["tok_s"] / static["tok_s"],
        "latency_p50_gain": static["latency_p50_s"] / continuous["latency_p50_s"],
    }


def bench_warm(opts: EngineBenchOptions, path: Path) -> dict:
    engine = make_bench_engine(path, opts.kind, device=opts.device)
    cold, warm = [], []
    for _ in range(opts.loads):
        engine.unload()
        cold.append(engine.load_model("bench").seconds)
    warm_cost = engine.warm_model("bench")
    for _ in range(opts.loads):
        engine.unload()
        warm.append(engine.load_model("bench").seconds)
    nbytes = engine.load_history[-1].bytes_moved
    history = [(r.warm, r.seconds) for r in engine.load_history]
    engine.close()
    cold_s, warm_s = statistics.median(cold), statistics.median(warm)
    return {
        "weight_bytes": nbytes,
        "cold_s": cold,
        "warm_s": warm,
        "warm_copy_s": warm_cost.seconds,
        "cold_median_s": cold_s,
        "warm_median_s": warm_s,
        "warm_speedup": cold_s / warm_s,
        "load_history": history,
    }


def run(which: list[str], opts: EngineBenchOptions) -> dict:
    torch.set_num_threads(opts.threads)
    path = ensure_bench_model(opts.kind, opts.model_root, seed=opts.seed)
    probe = make_bench_engine(path, opts.kind, device=opts.device)
    report: dict = {"benchmark": "engine", "setup": {**asdict(opts), "model": describe_shape(probe),
                                                     "cpu_count": os.cpu_count()}}
    probe.close()
    if "throughput" in which:
        report["throughput"] = bench_throughput(opts, path)
    if "batching" in which:
        report["batching"] = bench_batching(opts, path)
    if "warm" in which:
        report["warm"] = bench_warm(opts, path)
    report["setup"]["load_average_1m_at_end"] = round(os.getloadavg()[0], 2)
    return report


def print_report(report: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=max(Console().width, 120))
    console.print(f"[bold]HF engine[/bold]: {report['setup']['model']}")
    if "throughput" in report:
        r = report["throughput"]
        t = Table(title=f"Decode throughput, batch {r['batch']}, prompt {r['prompt_len']}, {r['max_tokens']} tokens each")
        for c in ("", "tokens", "seconds", "tok/s end-to-end", "decode tok/s"):
            t.add_column(c, justify="right")
        t.add_row("HFEngine", str(r["engine_tokens"]), f"{r['engine_s']:.2f}", f"{r['engine_tok_s']:.1f}",
                  f"{r['engine_decode_tok_s']:.1f}")
        t.add_row("generate()", str(r["generate_tokens"]), f"{r['generate_s']:.2f}", f"{r['generate_tok_s']:.1f}",
                  f"{r['generate_decode_tok_s']:.1f}")
        console.print(t)
        console.print(f"engine / generate (end-to-end): {r['engine_vs_generate']:.2f}x")
    if "batching" in report:
        r = report["batching"]
        t = Table(title=f"Continuous vs static batching: {r['static']['requests']} requests of {r['trace']} ({r['lengths']})")
        for c in ("policy", "tokens", "seconds", "tok/s", "latency p50", "latency p99", "TTFT p50"):
            t.add_column(c, justify="right")
        for k in ("static", "continuous"):
            x = r[k]
            t.add_row(k, str(x["tokens"]), f"{x['seconds']:.2f}", f"{x['tok_s']:.1f}", f"{x['latency_p50_s']:.2f} s",
                      f"{x['latency_p99_s']:.2f} s", f"{x['ttft_p50_s']:.2f} s")
        console.print(t)
        console.print(f"continuous / static: throughput {r['throughput_gain']:.2f}x, "
                      f"p50 latency {r['latency_p50_gain']:.2f}x lower")
    if "warm" in report:
        r = report["warm"]
        t = Table(title=f"Model load, {r['weight_bytes'] / 1e6:.0f} MB of weights")
        for c in ("load", "median", "all"):
            t.add_column(c, justify="right")
        t.add_row("cold (disk, page cache dropped)", f"{r['cold_median_s'] * 1000:.0f} ms",
                  ", ".join(f"{x * 1000:.0f}" for x in r["cold_s"]))
        t.add_row("warm (host RAM copy)", f"{r['warm_median_s'] * 1000:.0f} ms",
                  ", ".join(f"{x * 1000:.0f}" for x in r["warm_s"]))
        console.print(t)
        console.print(f"warm is {r['warm_speedup']:.1f}x faster than cold "
                      f"(making the warm copy took {r['warm_copy_s'] * 1000:.0f} ms)")


def main(which: list[str], opts: EngineBenchOptions, out: str | None) -> dict:
    report = run(which, opts)
    print_report(report)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(report, indent=2))
    return report
