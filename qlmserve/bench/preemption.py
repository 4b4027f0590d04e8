"""Benchmark: expert-level preemption vs iteration-level scheduling on a real MoE model.

Setup (printed with the results): one HFEngine, the benchmark MoE shape (see
hf_bench_common), max batch 16, one engine thread stepping while requests arrive from
another (as in the worker). Two workloads:
  - backlog (default, QLLM's setting): a stream of best-effort (BE) requests keeps the
    engine busy: `max_batch_size + be_backlog` BE requests are always submitted and
    unfinished (a new one arrives as one finishes) until a fixed list of BE requests
    (sized to last `be_stream` x the window at the calibrated capacity) is used up, and
    latency-sensitive (LS) requests arrive open-loop, Poisson, during the window, at a
    rate that makes them 20% of arrivals at the engine's calibrated capacity. The FCFS
    queue ahead of an LS arrival is then stationary (be_backlog requests), whatever the
    machine's speed on the day.
  - open: every request arrives open-loop, Poisson, during the window, at `load` x
    calibrated capacity, and is LS with probability 0.2.
Lengths come from the ShareGPT length table scaled down to the tiny model's context
(prompt / 32 clipped to [8, 128], output / 8 clipped to [8, 96]). The modes are
interleaved round by round (each round a new sample, the same for all modes), so the
noise of a shared machine falls on every mode alike:
  - none:      iteration-level FCFS (vLLM / TGI default);
  - iteration: LS first at each pass boundary;
  - expert:    QLLM: a BE pass pauses at the next layer / attention-MoE boundary.

NOTE(what BE throughput means here): every mode runs the round's whole work, the same
requests with the same arrival times, until the last request finished. BE throughput is
BE tokens / engine-thread CPU seconds over that run (and, noisier, / wall seconds): the
same BE work and the same LS work in every mode, so the ratio to FCFS is the inverse
ratio of what the whole job cost. (A fixed time window is not fair: FCFS serves LS
requests seconds late, so it pushes part of the LS work out of any window and its BE
count inside the window looks higher although it did no more work.) With one torch
thread all model work runs on the engine thread, so its CPU time is what the work cost
on a core of its own, which other processes on a shared machine distort far less than
wall time, but not entirely (they share caches and memory bandwidth: the same run's CPU
time varies by several % from round to round on a loaded machine). So a third figure
divides each run's CPU time by the median CPU time of a plain full-batch decode pass in
that same run: BE tokens per full-batch decode step, with the machine's speed during the
run divided out. Reported besides: LS TTFT p50 / p99 and BE TTFT p50 (pooled over
rounds), the per-round BE ratios and their median, and where the engine's CPU time went (prefill / decode
/ LS catch-up passes, and the rest: metadata, sampling, scheduling).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from qlmserve.backends.engine import EngineRequest, PreemptionMode
from qlmserve.backends.hf.pass_log import PassRecord
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

MODES = (PreemptionMode.NONE, PreemptionMode.ITERATION, PreemptionMode.EXPERT)


@dataclass
class PreemptionOptions:
    kind: str = "mixtral"
    model_root: str | None = None
    device: str = "cpu"
    window_s: float = 10.0  # LS (open: all) arrivals fall in this span; the run lasts until all finished
    rounds: int = 3  # modes are interleaved round by round, so machine noise hits all alike
    load: float = 1.3  # open: arrival rate relative to the calibrated capacity
    workload: str = "backlog"  # "backlog" (BE kept queued) or "open" (all requests open-loop Poisson)
    be_backlog: int = 8  # backlog: BE requests waiting beyond a full batch
    # backlog: the BE list lasts about this many windows at the calibrated capacity, so the
    # backlog outlives the LS arrivals and FCFS's late LS service (then it drains).
    be_stream: float = 2.0
    ls_fraction: float = 0.2
    max_batch_size: int = 16
    max_pause_s: float = 2.0
    seed: int = 0
    threads: int = 1
    trace: str = "sharegpt_8k_lengths_llama2tok.csv"
    drain_timeout_s: float = 300.0  # after the window, for the run to finish its work


@dataclass
class Arrival:
    at_s: float
    prompt: int
    output: int
    latency_sensitive: bool


def _lengths(opts: PreemptionOptions, n: int) -> list[tuple[int, int]]:
    trace = load_trace(resolve_trace_path(opts.trace), fmt="lengths", limit=n, seed=opts.seed)
    return [(scaled(r.prompt_tokens, 32, 8, 128), scaled(r.output_tokens, 8, 8, 96)) for r in trace.records]


def calibrate_capacity(engine, lengths: list[tuple[int, int]], batch: int) -> dict:
    """Requests/s the engine sustains: per request, its prefill plus its share of the
    decode iterations at full batch (measured on this engine, not assumed)."""
    mean_prompt = statistics.mean(p for p, _ in lengths)
    mean_out = statistics.mean(o for _, o in lengths)
    engine.pass_log.clear()
    for i in range(batch):
        engine.add_request(EngineRequest(f"cal-{i}", "bench", prompt_ids(int(mean_prompt), i), max_tokens=12))
    while engine.has_work():
        engine.step()
    prefill = [p for p in engine.pass_log if p.prefill]
    decode = [p.seconds for p in engine.pass_log if not p.prefill and p.batch == batch][2:]
    prefill_per_req = sum(p.seconds for p in prefill) / batch
    step = statistics.median(decode)
    per_request = prefill_per_req + mean_out * step / batch
    return {
        "decode_step_s_at_batch": step,
        "prefill_s_per_request": prefill_per_req,
        "mean_prompt": mean_prompt,
        "mean_output": mean_out,
        "capacity_req_per_s": 1.0 / per_request,
    }


@dataclass
class Workload:
    """What one round replays, identically under every mode."""

    arrivals: list[Arrival]  # open-loop arrivals at fixed times (all LS in backlog mode)
    be_lengths: list[tuple[int, int]]  # backlog mode: BE requests submitted as others finish
    be_in_system: int  # backlog mode: BE requests kept submitted and unfinished (0: open loop)


def build_workload(opts: PreemptionOptions, capacity: float) -> Workload:
    rng = np.random.default_rng(opts.seed)
    if opts.workload == "backlog":
        # LS are ls_fraction of all arrivals when BE requests arrive at the capacity rate.
        rate = capacity * opts.ls_fraction / (1.0 - opts.ls_fraction)
        n = int(rate * opts.window_s * 2) + 8
        times = np.cumsum(rng.exponential(1.0 / rate, size=n))
        in_system = opts.max_batch_size + opts.be_backlog
        n_be = in_system + math.ceil(capacity * opts.window_s * opts.be_stream)
        lengths = _lengths(opts, n + n_be)
        arrivals = [Arrival(float(t), p, o, True) for t, (p, o) in zip(times, lengths[:n]) if t < opts.window_s]
        return Workload(arrivals, lengths[n:], in_system)
    rate = opts.load * capacity
    n = int(rate * opts.window_s * 1.5) + 16
    times = np.cumsum(rng.exponential(1.0 / rate, size=n))
    ls = rng.random(n) < opts.ls_fraction
    arrivals = [
        Arrival(float(t), p, o, bool(flag))
        for t, flag, (p, o) in zip(times, ls, _lengths(opts, n), strict=False)
        if t < opts.window_s
    ]
    return Workload(arrivals, [], 0)


def pass_breakdown(passes: list[PassRecord]) -> dict:
    """Where the engine's pass time went: counts and CPU seconds per kind of pass."""
    prefill = [p for p in passes if p.prefill]
    decode = [p for p in passes if not p.prefill and not p.catch_up]
    catch_up = [p for p in passes if p.catch_up]
    return {
        "prefill_passes": len(prefill),
        "prefill_ls_only_passes": sum(1 for p in prefill if p.ls_rows == p.batch),
        "prefill_rows": sum(p.batch for p in prefill),
        "prefill_cpu_s": sum(p.cpu_seconds for p in prefill),
        "decode_passes": len(decode),
        "decode_rows": sum(p.batch for p in decode),
        "decode_ls_rows": sum(p.ls_rows for p in decode),
        "decode_cpu_s": sum(p.cpu_seconds for p in decode),
        "catch_up_passes": len(catch_up),
        "catch_up_cpu_s": sum(p.cpu_seconds for p in catch_up),
        "pauses": sum(p.pauses for p in passes if not p.catch_up),
    }


def run_mode(opts: PreemptionOptions, path: Path, mode: PreemptionMode, work: Workload,
             round_no: int = 0) -> dict:
    """One round of one mode: all of `work`, until its last request finished. Returns raw
    samples (pooled over rounds by `summarize`)."""
    engine = make_bench_engine(path, opts.kind, device=opts.device, max_batch_size=opts.max_batch_size,
                               preemption=mode, max_pause_s=opts.max_pause_s)
    # Warm-up (allocator, kernels) outside the measured run.
    for i in range(4):
        engine.add_request(EngineRequest(f"warm-{i}", "bench", prompt_ids(32, i), max_tokens=4))
    while engine.has_work():
        engine.step()
    engine.pass_log.clear()
    log = TokenLog()
    loop = EngineLoop(engine, log)
    ids: list[str] = []
    be_ids: list[str] = []

    def send(a: Arrival, i: int) -> None:
        rid = f"{'ls' if a.latency_sensitive else 'be'}-{round_no}-{i}"
        ids.append(rid)
        if not a.latency_sensitive:
            be_ids.append(rid)
        submit(engine, log, EngineRequest(rid, "bench", prompt_ids(a.prompt, i), max_tokens=a.output,
                                          latency_sensitive=a.latency_sensitive))

    load_before = os.getloadavg()[0]
    loop.start()
    t0 = time.perf_counter()
    deadline = t0 + opts.window_s + opts.drain_timeout_s
    next_open, next_be = 0, 0
    while time.perf_counter() < deadline:
        now = time.perf_counter() - t0
        while next_open < len(work.arrivals) and work.arrivals[next_open].at_s <= now:
            send(work.arrivals[next_open], next_open)
            next_open += 1
        unfinished = sum(1 for r in be_ids if r not in log.finished)
        while unfinished < work.be_in_system and next_be < len(work.be_lengths):
            p, o = work.be_lengths[next_be]
            send(Arrival(now, p, o, False), 100_000 + next_be)
            next_be += 1
            unfinished += 1
        sent_all = next_open == len(work.arrivals) and (work.be_in_system == 0 or next_be == len(work.be_lengths))
        if sent_all and len(log.finished) == len(ids):
            break
        time.sleep(0.002)
    complete = len(log.finished) == len(ids)
    loop.stop()
    passes = list(engine.pass_log)
    last = max((t for times in log.token_times.values() for t in times), default=t0)
    cpu_s = loop.cpu_seconds(t0, last)
    # The machine's speed during this run, in the run's own terms: CPU seconds of a plain
    # full-batch decode pass (same work in every mode; paused passes, LS catch-ups and
    # passes with extra LS rows left out).
    full = [p.cpu_seconds for p in passes
            if not p.prefill and not p.catch_up and p.pauses == 0 and p.batch == opts.max_batch_size]
    for rid in ids:
        engine.abort(rid)
    engine.step()
    engine.close()
    ls_ids = [r for r in ids if r.startswith("ls")]
    be_ids = [r for r in ids if r.startswith("be")]
    return {
        "complete": complete,
        "ls_requests": len(ls_ids),
        "be_requests": len(be_ids),
        "ls_ttft": [log.ttft(r) for r in ls_ids if log.ttft(r) is not None],
        "be_ttft": [log.ttft(r) for r in be_ids if log.ttft(r) is not None],
        "be_tokens": sum(len(log.token_times.get(r, [])) for r in be_ids),
        "ls_tokens": sum(len(log.token_times.get(r, [])) for r in ls_ids),
        "engine_cpu_s": cpu_s,
        "wall_s": last - t0,
        "full_batch_step_cpu_s": statistics.median(full) if full else None,
        # The run's cost in full-batch decode steps: CPU time with the machine's speed
        # during the run divided out (a busy spell slows every pass of a run alike).
        "engine_cost_steps": cpu_s / statistics.median(full) if full else None,
        "load_average_1m": [load_before, os.getloadavg()[0]],
        **pass_breakdown(passes),
    }


_SUMMED = ("be_tokens", "ls_tokens", "engine_cpu_s", "wall_s", "prefill_passes", "prefill_ls_only_passes",
           "prefill_rows", "prefill_cpu_s", "decode_passes", "decode_rows", "decode_ls_rows", "decode_cpu_s",
           "catch_up_passes", "catch_up_cpu_s", "pauses")


def summarize(mode: PreemptionMode, runs: list[dict]) -> dict:
    ls = [t for r in runs for t in r["ls_ttft"]]
    be = [t for r in runs for t in r["be_ttft"]]
    total = {k: sum(r[k] for r in runs) for k in _SUMMED}
    steps = [r["engine_cost_steps"] for r in runs]
    total["engine_cost_steps"] = sum(steps) if None not in steps else None
    return {
        "mode": mode.value,
        "complete": all(r["complete"] for r in runs),
        "ls_requests": sum(r["ls_requests"] for r in runs),
        "ls_served": len(ls),
        "be_requests": sum(r["be_requests"] for r in runs),
        "ls_ttft_p50_s": percentile(ls, 50),
        "ls_ttft_p99_s": percentile(ls, 99),
        "be_ttft_p50_s": percentile(be, 50),
        **total,
        # The same BE work in every mode: BE tokens per second of the whole run.
        "be_tokens_per_engine_cpu_s": total["be_tokens"] / max(total["engine_cpu_s"], 1e-9),
        "be_tokens_per_wall_s": total["be_tokens"] / max(total["wall_s"], 1e-9),
        "be_tokens_per_engine_cpu_s_per_round": [r["be_tokens"] / max(r["engine_cpu_s"], 1e-9) for r in runs],
        # Per full-batch decode step of the same run (machine speed divided out).
        "be_tokens_per_step": (total["be_tokens"] / total["engine_cost_steps"]) if total["engine_cost_steps"] else None,
        "be_tokens_per_step_per_round": [r["be_tokens"] / r["engine_cost_steps"] if r["engine_cost_steps"] else None
                                         for r in runs],
        "be_tokens_per_round": [r["be_tokens"] for r in runs],
        # CPU the engine thread spent outside passes: metadata, sampling, scheduling, idle polling.
        "other_cpu_s": total["engine_cpu_s"] - total["prefill_cpu_s"] - total["decode_cpu_s"]
        - total["catch_up_cpu_s"],
        "mean_decode_batch": total["decode_rows"] / max(total["decode_passes"], 1),
    }


def run(opts: PreemptionOptions) -> dict:
    torch.set_num_threads(opts.threads)
    load_start = os.getloadavg()[0]
    path = ensure_bench_model(opts.kind, opts.model_root, seed=opts.seed)
    engine = make_bench_engine(path, opts.kind, device=opts.device, max_batch_size=opts.max_batch_size)
    shape = describe_shape(engine)
    calib = calibrate_capacity(engine, _lengths(opts, 512), opts.max_batch_size)
    engine.close()
    runs: dict[PreemptionMode, list[dict]] = {m: [] for m in MODES}
    for round_no in range(opts.rounds):
        # A new sample per round, the same one for every mode within the round.
        work = build_workload(dataclasses.replace(opts, seed=opts.seed + round_no), calib["capacity_req_per_s"])
        for mode in MODES:
            runs[mode].append(run_mode(opts, path, mode, work, round_no))
    results = [summarize(mode, runs[mode]) for mode in MODES]
    base, it = results[0], results[1]
    for r in results:
        r["ls_ttft_p50_speedup_vs_fcfs"] = (base["ls_ttft_p50_s"] / r["ls_ttft_p50_s"]) if r["ls_ttft_p50_s"] else None
        r["ls_ttft_p99_speedup_vs_fcfs"] = (base["ls_ttft_p99_s"] / r["ls_ttft_p99_s"]) if r["ls_ttft_p99_s"] else None
        # what pausing inside an iteration adds over LS-first at boundaries
        r["ls_ttft_p50_speedup_vs_iteration"] = (it["ls_ttft_p50_s"] / r["ls_ttft_p50_s"]) if r["ls_ttft_p50_s"] else None
        r["be_cpu_throughput_vs_fcfs"] = r["be_tokens_per_engine_cpu_s"] / base["be_tokens_per_engine_cpu_s"]
        r["be_wall_throughput_vs_fcfs"] = r["be_tokens_per_wall_s"] / base["be_tokens_per_wall_s"]
        r["be_cpu_throughput_vs_fcfs_per_round"] = [
            x / y for x, y in zip(r["be_tokens_per_engine_cpu_s_per_round"],
                                  base["be_tokens_per_engine_cpu_s_per_round"], strict=True)]
        r["be_step_throughput_vs_fcfs"] = (r["be_tokens_per_step"] / base["be_tokens_per_step"]
                                           if r["be_tokens_per_step"] and base["be_tokens_per_step"] else None)
        r["be_step_throughput_vs_fcfs_per_round"] = [
            (x / y) if x and y else None
            for x, y in zip(r["be_tokens_per_step_per_round"], base["be_tokens_per_step_per_round"], strict=True)]
        # The median round: one busy spell on the shared machine moves a round's ratio by
        # several %, and the median is not dragged by it as the pooled ratio is.
        for key in ("be_cpu_throughput_vs_fcfs", "be_step_throughput_vs_fcfs"):
            ratios = [x for x in r[f"{key}_per_round"] if x is not None]
            r[f"{key}_median_round"] = statistics.median(ratios) if ratios else None
    loads = [x for m in MODES for run_ in runs[m] for x in run_["load_average_1m"]]
    return {
        "benchmark": "preemption",
        "setup": {
            **asdict(opts),
            "model": shape,
            "arrivals": (
                f"backlog: {opts.max_batch_size + opts.be_backlog} BE requests kept in the engine "
                f"(batch {opts.max_batch_size} + {opts.be_backlog} waiting) until "
                f"{len(build_workload(opts, calib['capacity_req_per_s']).be_lengths)} BE requests are used up, "
                f"LS Poisson during the window"
                if opts.workload == "backlog" else f"open loop Poisson at load {opts.load} during the window"
            ),
            "requests": {m.value: runs[m][0]["ls_requests"] + runs[m][0]["be_requests"] for m in MODES},
            "lengths": "ShareGPT length table; prompt/32 in [8,128], output/8 in [8,96]",
            "calibration": calib,
            "load_average_1m_at_start": round(load_start, 2),
            "load_average_1m_at_end": round(os.getloadavg()[0], 2),
            "load_average_1m_range": [round(min(loads), 2), round(max(loads), 2)],
            "cpu_count": os.cpu_count(),
            "measures": "every mode runs the same requests (same arrival times) to completion; "
                        "BE tok/CPU-s = BE tokens / CPU seconds of the engine thread from the first "
                        "arrival to the last token; BE tok/step = BE tokens / (that CPU time / the "
                        "run's median CPU time of a plain full-batch decode pass), i.e. with the "
                        "machine's speed during the run divided out; tok/s (wall) = BE tokens / "
                        "wall seconds of the same span",
        },
        "results": results,
        # Per round and mode, without the TTFT samples: to see what noise did to each run.
        "runs": {m.value: [{k: v for k, v in r.items() if not k.endswith("_ttft")} for r in runs[m]] for m in MODES},
    }


def print_table(report: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    s = report["setup"]
    console = Console(width=max(Console().width, 170))
    console.print(f"[bold]Expert-level preemption[/bold]: {s['model']}")
    calib = s["calibration"]
    console.print(
        f"{s['arrivals']}; {s['rounds']} rounds, window {s['window_s']}s (modes interleaved), "
        f"{int(s['ls_fraction'] * 100)}% LS, calibrated capacity {calib['capacity_req_per_s']:.2f} req/s, "
        f"decode step at full batch {calib['decode_step_s_at_batch'] * 1000:.0f} ms, max_pause {s['max_pause_s']}s, "
        f"seed {s['seed']}; load average (1 min) {s['load_average_1m_at_start']} at start, "
        f"{s['load_average_1m_range'][0]}-{s['load_average_1m_range'][1]} during the runs, on {s['cpu_count']} cores"
    )

    def ms(v: float | None) -> str:
        return "-" if v is None else f"{v * 1000:.0f} ms"

    def x(v: float | None) -> str:
        return "-" if v is None else (f"{v:.1f}x" if v >= 1 else f"{v:.2f}x")

    def pct(v: float | None) -> str:
        return "-" if v is None else f"{v * 100:.1f}%"

    t = Table(title="Latency (pooled over rounds)")
    for col in ("mode", "LS n", "LS TTFT p50", "LS TTFT p99", "BE TTFT p50", "LS p50 vs FCFS", "LS p99 vs FCFS",
                "LS p50 vs iteration"):
        t.add_column(col, justify="right")
    for r in report["results"]:
        t.add_row(r["mode"] + ("" if r["complete"] else " (incomplete)"), f"{r['ls_served']}/{r['ls_requests']}",
                  ms(r["ls_ttft_p50_s"]), ms(r["ls_ttft_p99_s"]), ms(r["be_ttft_p50_s"]),
                  x(r["ls_ttft_p50_speedup_vs_fcfs"]), x(r["ls_ttft_p99_speedup_vs_fcfs"]),
                  x(r["ls_ttft_p50_speedup_vs_iteration"]))
    console.print(t)

    def rounds(values: list[float | None]) -> str:
        return " ".join("-" if v is None else f"{v * 100:.0f}" for v in values)

    t = Table(title="BE throughput: the same work in every mode, run to completion (per round: % of FCFS)")
    for col in ("mode", "BE tokens", "BE tok/CPU-s", "vs FCFS", "per round", "median round", "BE tok/step",
                "vs FCFS", "per round", "median round", "BE tok/s (wall)", "vs FCFS"):
        t.add_column(col, justify="right")
    for r in report["results"]:
        t.add_row(r["mode"], str(r["be_tokens"]),
                  f"{r['be_tokens_per_engine_cpu_s']:.1f}", pct(r["be_cpu_throughput_vs_fcfs"]),
                  rounds(r["be_cpu_throughput_vs_fcfs_per_round"]), pct(r["be_cpu_throughput_vs_fcfs_median_round"]),
                  "-" if r["be_tokens_per_step"] is None else f"{r['be_tokens_per_step']:.2f}",
                  "-" if r["be_step_throughput_vs_fcfs"] is None else pct(r["be_step_throughput_vs_fcfs"]),
                  rounds(r["be_step_throughput_vs_fcfs_per_round"]), pct(r["be_step_throughput_vs_fcfs_median_round"]),
                  f"{r['be_tokens_per_wall_s']:.1f}", pct(r["be_wall_throughput_vs_fcfs"]))
    console.print(t)
    t = Table(title="Where the engine thread's CPU went (all rounds)")
    for col in ("mode", "engine CPU-s", "wall s", "prefill passes", "LS-only", "prefill CPU-s", "decode passes",
                "mean batch", "decode CPU-s", "catch-ups", "catch-up CPU-s", "other CPU-s", "pauses"):
        t.add_column(col, justify="right")
    for r in report["results"]:
        t.add_row(r["mode"], f"{r['engine_cpu_s']:.2f}", f"{r['wall_s']:.2f}", str(r["prefill_passes"]),
                  str(r["prefill_ls_only_passes"]), f"{r['prefill_cpu_s']:.2f}", str(r["decode_passes"]),
                  f"{r['mean_decode_batch']:.2f}", f"{r['decode_cpu_s']:.2f}", str(r["catch_up_passes"]),
                  f"{r['catch_up_cpu_s']:.2f}", f"{r['other_cpu_s']:.2f}", str(r["pauses"]))
    console.print(t)
    console.print(f"[dim]{s['measures']}[/dim]")


def main(opts: PreemptionOptions, out: str | None) -> dict:
    report = run(opts)
    print_table(report)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(report, indent=2))
    return report
