"""Benchmarks of the HF engine itself, on the benchmark MoE shape (see hf_bench_common).

- throughput: decode tokens/s of HFEngine at batch 16 against `model.generate()` on the
  same 16 prompts (equal lengths, so generate pads nothing), same model, same threads.
  The prompts are chosen so that no greedy continuation reaches eos within max_tokens:
  both then produce exactly `max_tokens` tokens per sequence at a full batch (the same
  work). Engine steps and generate() steps alternate one for one (the engine steps from
  generate()'s stopping-criteria hook), `reps` times; tokens per CPU second of the
  (single) engine thread and per wall second, medians of the per-rep ratios.
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
from collections.abc import Callable
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
    reps: int = 3  # throughput: lockstep engine / generate() runs (each on both clocks)


def _drain(engine) -> None:
    while engine.has_work():
        engine.step()


def _full_length_prompts(engine, opts: EngineBenchOptions) -> list[list[int]]:
    """`batch` prompts whose greedy continuation reaches no stop token within max_tokens.

    The engine stops a sequence at eos, generate() with min_new_tokens does not: with
    prompts that stop early the engine would run smaller batches for the same number of
    steps (a decode step costs nearly the same at batch 13 as at 16, it is bound by
    reading the expert weights), and the two would not do the same work. The check is
    generate()'s own greedy output without min_new_tokens (eos at its natural place)."""
    model = engine.model
    eos = model.generation_config.eos_token_id
    stop = set([eos] if isinstance(eos, int) else (eos or []))
    chosen: list[list[int]] = []
    salt = 0
    while len(chosen) < opts.batch:
        if salt > 64 * opts.batch:
            raise RuntimeError("no prompts whose greedy output avoids eos; lower --max-tokens")
        cands = [prompt_ids(opts.prompt_len, salt + i) for i in range(opts.batch)]
        salt += opts.batch
        ids = torch.tensor(cands, device=engine.device)
        with torch.inference_mode():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=opts.max_tokens,
                                 do_sample=False, pad_token_id=0)
        for prompt, row in zip(cands, out[:, ids.shape[1]:].tolist(), strict=True):
            if len(row) == opts.max_tokens and not stop.intersection(row) and len(chosen) < opts.batch:
                chosen.append(prompt)
    return chosen


class _Lockstep:
    """A generate() stopping criterion that never stops and runs one engine step each
    time generate() finished one of its own: the two alternate step by step, so a busy
    spell of a shared machine lands on both alike (separate runs of a few seconds each
    differ by +-10% on a loaded machine). The clock is read at every hand-over, so each
    side's time excludes the other's."""

    def __init__(self, engine, clock: Callable[[], float]) -> None:
        self.engine = engine
        self.clock = clock
        self.generate_steps: list[float] = []  # [0]: generate()'s set-up and prefill
        self.engine_steps: list[tuple[float, bool, int]] = []  # (seconds, prefill in it, tokens)
        self.tokens: dict[str, list[int]] = {}
        self._mark = 0.0

    def start(self) -> None:
        self._mark = self.clock()

    def engine_step(self) -> None:
        before = len(self.engine.pass_log)
        t0 = self.clock()
        events = self.engine.step()
        seconds = self.clock() - t0
        prefill = any(r.prefill for r in list(self.engine.pass_log)[before:])
        self.engine_steps.append((seconds, prefill, len(events)))
        for e in events:
            self.tokens.setdefault(e.request_id, []).append(e.token_id)

    def __call__(self, input_ids: torch.Tensor, scores: object, **kwargs: object) -> torch.Tensor:
        self.generate_steps.append(self.clock() - self._mark)
        if self.engine.has_work():
            self.engine_step()
        self._mark = self.clock()
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


def bench_throughput(opts: EngineBenchOptions, path: Path) -> dict:
    """Engine vs generate() on the same batch, the same prompts, the same token count.

    Engine steps and generate() steps alternate one for one (`_Lockstep`), `reps` times,
    timed on this thread's CPU clock (with one torch thread all the model math runs
    here, so it is what the work cost on a core of its own) and, in a second run of each
    rep, on the wall clock. Decode = everything after the first token: the engine's
    step() calls that ran only decode passes (whole step(): passes, metadata, sampling,
    bookkeeping) against generate()'s steps after its first (its whole loop: forward,
    cache, logits processing, stopping criteria)."""
    from transformers import StoppingCriteriaList

    engine = make_bench_engine(path, opts.kind, device=opts.device, max_batch_size=opts.batch)
    prompts = _full_length_prompts(engine, opts)
    model = engine.model
    ids = torch.tensor(prompts, device=engine.device)
    runs = 0

    def lockstep(clock: Callable[[], float], tokens: int) -> tuple[_Lockstep, torch.Tensor]:
        nonlocal runs
        runs += 1
        for i, p in enumerate(prompts):
            engine.add_request(EngineRequest(f"run{runs}-{i}", "bench", p, max_tokens=tokens))
        pace = _Lockstep(engine, clock)
        pace.start()
        with torch.inference_mode():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=tokens,
                                 min_new_tokens=tokens, do_sample=False, pad_token_id=0,
                                 stopping_criteria=StoppingCriteriaList([pace]))
        while engine.has_work():  # not expected: both need one step per token
            pace.engine_step()
        return pace, out

    lockstep(time.thread_time, 4)  # warm-up of both (allocator, kernels, pass shapes)
    reps = []
    matches = 0
    for _ in range(opts.reps):
        row: dict[str, float | int] = {}
        for clock_name, clock in (("cpu", time.thread_time), ("wall", time.perf_counter)):
            pace, out = lockstep(clock, opts.max_tokens)
            decode = [(s, n) for s, prefill, n in pace.engine_steps if not prefill]
            row.update({
                f"engine_decode_{clock_name}_s": sum(s for s, _ in decode),
                f"engine_{clock_name}_s": sum(s for s, _, _ in pace.engine_steps),
                f"generate_decode_{clock_name}_s": sum(pace.generate_steps[1:]),
                f"generate_{clock_name}_s": sum(pace.generate_steps),
            })
            row["engine_decode_tokens"] = sum(n for _, n in decode)
            row["engine_tokens"] = sum(n for _, _, n in pace.engine_steps)
            row["generate_tokens"] = int((out.shape[1] - ids.shape[1]) * ids.shape[0])
            row["generate_decode_tokens"] = row["generate_tokens"] - ids.shape[0]
            reference = out[:, ids.shape[1]:].tolist()
            run_tokens = [pace.tokens.get(f"run{runs}-{i}") for i in range(len(prompts))]
            matches = sum(a == b for a, b in zip(run_tokens, reference, strict=True))
        reps.append(row)
    engine.close()

    def rate(r: dict, who: str, what: str, clock: str) -> float:
        part = "_decode" if what == "decode" else ""
        return r[f"{who}{part}_tokens"] / r[f"{who}{part}_{clock}_s"]

    summary: dict[str, float] = {}
    for what in ("decode", "all"):
        for clock in ("cpu", "wall"):
            for who in ("engine", "generate"):
                summary[f"{who}_{what}_tok_per_{clock}_s"] = statistics.median(rate(r, who, what, clock) for r in reps)
            # The median of the per-rep ratios: each ratio compares steps taken side by side.
            summary[f"ratio_{what}_{clock}"] = statistics.median(
                rate(r, "engine", what, clock) / rate(r, "generate", what, clock) for r in reps)
    return {
        "batch": opts.batch,
        "prompt_len": opts.prompt_len,
        "max_tokens": opts.max_tokens,
        "reps": reps,
        **summary,
        "engine_matches_generate": matches,
        "measures": f"engine vs generate() on the same {opts.batch} prompts (none reaches eos within max_tokens), "
                    "their steps alternating one for one; tokens per second of this thread's CPU time "
                    "(1 torch thread) and of wall time; decode = after the first token; medians over reps",
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
        t = Table(title=f"Decode throughput, batch {r['batch']}, prompt {r['prompt_len']}, {r['max_tokens']} tokens each, "
                        f"median of {len(r['reps'])} lockstep runs")
        for c in ("", "tokens", "decode tok/CPU-s", "decode tok/s (wall)", "all tok/CPU-s", "all tok/s (wall)"):
            t.add_column(c, justify="right")
        for who, name in (("engine", "HFEngine"), ("generate", "generate()")):
            t.add_row(name, str(r["reps"][-1][f"{who}_tokens"]), f"{r[f'{who}_decode_tok_per_cpu_s']:.1f}",
                      f"{r[f'{who}_decode_tok_per_wall_s']:.1f}", f"{r[f'{who}_all_tok_per_cpu_s']:.1f}",
                      f"{r[f'{who}_all_tok_per_wall_s']:.1f}")
        t.add_row("engine / generate()", "", f"{r['ratio_decode_cpu']:.3f}x", f"{r['ratio_decode_wall']:.3f}x",
                  f"{r['ratio_all_cpu']:.3f}x", f"{r['ratio_all_wall']:.3f}x")
        console.print(t)
        per_rep = ", ".join(f"{x['engine_decode_tokens'] / x['engine_decode_cpu_s'] / (x['generate_decode_tokens'] / x['generate_decode_cpu_s']):.3f}"
                            for x in r["reps"])
        console.print(f"decode tok/CPU-s engine / generate() per run: {per_rep}; "
                      f"engine output equals generate() for {r['engine_matches_generate']}/{r['batch']} sequences")
        console.print(f"[dim]{r['measures']}[/dim]")
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
