"""Benchmark: the HF engine's prefix cache on a replayed slice that shares prefixes
(`qlm bench-engine prefix`).

Setup (printed with the results): one HFEngine on the benchmark MoE shape
(hf_bench_common: hidden 256, 8 layers, 8 experts top-2, max context 512), float32 on
CPU, one engine thread stepping while requests arrive from another (as in the worker).
The workload is a slice of the Mooncake synthetic trace (`--offset`, `--requests`), its
requests whose first prefix block starts at least `min_shares` (10) requests of the whole
trace (popular conversations / system prompts: a slice that shares prefixes): each
of a request's `hash_ids` becomes one 16-token block of deterministic token ids (the same
id, the same tokens: one engine KV block stands for one of the trace's 512-token blocks),
at most `max_blocks` of them, followed by 4 tokens of its own (so no two prompts are
equal); outputs are the trace's lengths cut to `max_output`. Arrivals keep the trace's
order and spacing, rescaled to `--rate` requests per second.

Each round replays the slice twice, the cache off and on, in alternating order (noise of
a shared machine falls on both). Reported per setting (pooled over rounds): TTFT p50 and
p99 (wall), TTFT p50 on the engine thread's CPU clock (its work from arrival to first
token), prompt tokens prefilled, the engine thread's CPU seconds, the hit rate (prompt
tokens found cached / prompt tokens, cache on), the hit rate bound (leading blocks seen
earlier in the slice), and how many requests produced the same greedy tokens
in both settings (each round compares its two runs).
"""

from __future__ import annotations

import json
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from qlmserve.backends.engine import EngineRequest
from qlmserve.backends.hf.engine import HFEngine
from qlmserve.backends.hf.kv_cache import BLOCK_SIZE
from qlmserve.operations.model_spec import ModelSpec
from qlmserve.traces import load_trace, resolve_trace_path

from .hf_bench_common import (
    BENCH_MAX_CONTEXT,
    EngineLoop,
    TokenLog,
    describe_shape,
    ensure_bench_model,
    percentile,
    prompt_ids,
    submit,
)


@dataclass
class PrefixBenchOptions:
    kind: str = "mixtral"
    model_root: str | None = None
    device: str = "cpu"
    threads: int = 1
    trace: str = "mooncake_fast25_synthetic.jsonl"
    offset: int = 2000  # first trace row of the slice
    requests: int = 60
    rate: float = 2.0  # requests per second
    max_blocks: int = 24  # engine blocks per prompt at most (24 x 16 = 384 tokens)
    max_output: int = 16
    rounds: int = 2
    max_batch_size: int = 8
    min_shares: int = 10  # keep requests whose first prefix block starts at least this many trace requests


def slice_requests(opts: PrefixBenchOptions) -> list[tuple[float, EngineRequest]]:
    trace = load_trace(resolve_trace_path(opts.trace))
    starts = Counter(r.hash_ids[0] for r in trace.records if r.hash_ids)
    rows = [r for r in trace.records[opts.offset:]
            if r.hash_ids and starts[r.hash_ids[0]] >= opts.min_shares][:opts.requests]
    if not rows:
        raise ValueError(f"trace {opts.trace}: no rows with hash_ids from offset {opts.offset}")
    t0 = rows[0].arrival_s
    span = max(rows[-1].arrival_s - t0, 1e-9)
    scale = (len(rows) / opts.rate) / span  # trace seconds -> bench seconds at `rate`
    out = []
    for i, r in enumerate(rows):
        prompt: list[int] = []
        for h in r.hash_ids[:opts.max_blocks]:
            prompt += prompt_ids(BLOCK_SIZE, salt=int(h) + 1)
        prompt += prompt_ids(4, salt=10_000_019 + i)
        out.append(((r.arrival_s - t0) * scale, EngineRequest(
            f"p{i}", "bench", prompt, max_tokens=max(1, min(r.output_tokens, opts.max_output)))))
    return out


def hit_bound(reqs: list[EngineRequest]) -> float:
    seen: set[tuple[int, ...]] = set()
    hit = total = 0
    for r in reqs:
        ids = r.prompt_token_ids
        chain = [tuple(ids[:(k + 1) * BLOCK_SIZE]) for k in range((len(ids) - 1) // BLOCK_SIZE)]
        k = 0
        while k < len(chain) and chain[k] in seen:
            k += 1
        hit += k * BLOCK_SIZE
        total += len(ids)
        seen.update(chain)
    return hit / total if total else 0.0


class _Log(TokenLog):
    """TokenLog that also keeps the token ids (to compare the settings' outputs)."""

    def __init__(self) -> None:
        super().__init__()
        self.ids: dict[str, list[int]] = {}

    def record(self, events, now: float) -> None:
        super().record(events, now)
        for e in events:
            self.ids.setdefault(e.request_id, []).append(e.token_id)


def run_once(path: Path, opts: PrefixBenchOptions, work: list[tuple[float, EngineRequest]], cache: bool) -> dict:
    engine = HFEngine({"bench": ModelSpec(path=str(path), kind=opts.kind, max_context=BENCH_MAX_CONTEXT)},
                      device=opts.device, max_batch_size=opts.max_batch_size, initial_model="bench",
                      prefix_cache=cache)
    log = _Log()
    loop = EngineLoop(engine, log)
    loop.start()
    start = time.perf_counter()
    for at, req in work:
        delay = start + at - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        submit(engine, log, req)
    while len(log.finished) < len(work):
        if loop.error is not None:
            break
        time.sleep(0.005)
    end = time.perf_counter()
    loop.stop()
    kv = engine._kv
    ttft = [log.ttft(r.request_id) for _, r in work]
    # The same wait on the engine thread's CPU clock (one torch thread: the engine's work
    # between arrival and first token), less distorted by other processes than wall time.
    ttft_cpu = [loop.cpu_seconds(log.arrival[r.request_id], log.token_times[r.request_id][0])
                for _, r in work if log.token_times.get(r.request_id)]
    out = {
        "cache": cache, "ttft_s": ttft, "ttft_cpu_s": ttft_cpu,
        "prefilled_tokens": sum(p.new_tokens for p in engine.pass_log if p.prefill),
        "engine_cpu_s": loop.cpu_seconds(start, end), "wall_s": end - start,
        "hit_rate": (kv.prefix.hit_tokens / kv.prefix.lookup_tokens) if cache and kv.prefix.lookup_tokens else 0.0,
        "outputs": {r.request_id: log.ids.get(r.request_id, []) for _, r in work},
        "engine": engine,
    }
    return out


def main(opts: PrefixBenchOptions, json_out: str | None = None) -> dict:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=140)
    torch.set_num_threads(opts.threads)
    path = ensure_bench_model(opts.kind, opts.model_root)
    work = slice_requests(opts)
    bound = hit_bound([r for _, r in work])
    runs: dict[bool, list[dict]] = {False: [], True: []}
    same = total = 0
    for k in range(opts.rounds):
        pair = {}
        for cache in ((False, True) if k % 2 == 0 else (True, False)):
            res = run_once(path, opts, work, cache)
            if k == 0 and cache is False:
                console.print(describe_shape(res["engine"]))
            pair[cache] = res
            res.pop("engine")
            runs[cache].append(res)
            console.print(f"  round {k + 1} cache {'on ' if cache else 'off'}: TTFT p50 "
                          f"{1000 * percentile(res['ttft_s'], 50):.0f} ms, prefilled {res['prefilled_tokens']}, "
                          f"hit {res['hit_rate']:.1%}")
        total += len(work)
        same += sum(1 for _, r in work if pair[False]["outputs"][r.request_id] == pair[True]["outputs"][r.request_id])
    table = Table(title=f"HF engine prefix cache: {len(work)} Mooncake requests from row {opts.offset} at "
                        f"{opts.rate} req/s, {opts.rounds} rounds")
    for col in ("cache", "TTFT p50 ms", "TTFT p99 ms", "TTFT p50 ms (engine CPU)", "prefilled tokens / run",
                "engine CPU s / run", "hit rate"):
        table.add_column(col, justify="right")
    summary = {}
    for cache in (False, True):
        ttft = [t for r in runs[cache] for t in r["ttft_s"] if t is not None]
        cpu = [t for r in runs[cache] for t in r["ttft_cpu_s"]]
        s = {"ttft_p50_ms": 1000 * percentile(ttft, 50), "ttft_p99_ms": 1000 * percentile(ttft, 99),
             "ttft_cpu_p50_ms": 1000 * percentile(cpu, 50),
             "prefilled_tokens": sum(r["prefilled_tokens"] for r in runs[cache]) / len(runs[cache]),
             "engine_cpu_s": sum(r["engine_cpu_s"] for r in runs[cache]) / len(runs[cache]),
             "hit_rate": sum(r["hit_rate"] for r in runs[cache]) / len(runs[cache])}
        summary["on" if cache else "off"] = s
        table.add_row("on" if cache else "off", f"{s['ttft_p50_ms']:.0f}", f"{s['ttft_p99_ms']:.0f}",
                      f"{s['ttft_cpu_p50_ms']:.0f}",
                      f"{s['prefilled_tokens']:.0f}", f"{s['engine_cpu_s']:.1f}", f"{s['hit_rate']:.1%}")
    console.print(table)
    console.print(f"hit-rate bound of the slice (one infinite cache): {bound:.1%}; "
                  f"TTFT p50 off/on: {summary['off']['ttft_p50_ms'] / summary['on']['ttft_p50_ms']:.2f}x wall, "
                  f"{summary['off']['ttft_cpu_p50_ms'] / summary['on']['ttft_cpu_p50_ms']:.2f}x engine CPU; "
                  f"requests with the same greedy tokens in both settings: {same}/{total}")
    result = {"options": asdict(opts), "hit_bound": bound, "summary": summary, "same_output_length": [same, total],
              "runs": {("on" if c else "off"): [{k: v for k, v in r.items() if k != "outputs"} for r in rs]
                       for c, rs in runs.items()}}
    if json_out:
        Path(json_out).parent.mkdir(parents=True, exist_ok=True)
        Path(json_out).write_text(json.dumps(result, indent=1))
    return result
