"""`qlm bench dispatch`: engine-level dispatch with prefix caching, on the simulator.

The Mooncake synthetic trace (FAST'25, JSON lines with `hash_ids`: one id per 512-token
prefix block) replayed through the simulator on a uniform fleet (default 8 x A100-80GB,
Mistral-7B, 32k context) whose workers model a prefix cache each
(operations/prefix_cache.py: LRU over block ids, bounded by the KV capacity; a hit skips
the cached blocks' prefill). The dispatch policies (controller/policies/engine_dispatch.py)
compared on the same arrivals:

  load-aware    prefill backlog + KV past saturation - prefill saved by cached prefixes,
                and session stickiness (a session = the request's first prefix block:
                Mooncake publishes no user ids);
  least-loaded  fewest requests outstanding;
  round-robin   in turn.

The load-aware policy's settings are the policy file's `dispatch` defaults. Every request is its own group (grouping.max_group_size 1): the policies dispatch
requests, as a router does. One SLO class, not latency-sensitive, no planner operations,
so nothing but dispatch differs. Load = offered prompt tokens per second / the fleet's
prefill rate without any cache (each worker's per-token prefill time at full chunks):
at load 1 the fleet could just prefill every prompt whole. Prompts longer than the model's
context are cut from the front and lose their block ids (their kept tokens start
mid-conversation). Each replay of the trace gets ids of its own.

Figures: TTFT p50 / p99 over every request, TPOT p50 ((finish - first token) / (output - 1),
requests of two or more tokens), prefix-cache hit rate (prompt tokens found cached / prompt
tokens, at each request's first admission; recomputations after a preemption are not
counted), beside the bound one infinite cache would reach on the same workload. By default
the whole trace is replayed once (its reuse grows over its 17 minutes); `--window` loops it.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from qlmserve.controller.policy import PolicyConfig
from qlmserve.operations.prefix_cache import MOONCAKE_BLOCK_TOKENS
from qlmserve.operations.profiles import load_gpu_profiles
from qlmserve.sim.driver import SimOptions, Simulation
from qlmserve.sim.fleet import uniform_fleet
from qlmserve.traces import WorkloadSpec, build_workload, load_trace, resolve_trace_path

DISPATCH_POLICIES = ("load-aware", "least-loaded", "round-robin")


def bench_policy(policy: str, model: str, ttft_s: float, max_batch: int, output_mean: float) -> PolicyConfig:
    t = load_gpu_profiles().model(model)
    return PolicyConfig.model_validate({
        "max_running_per_worker": max_batch,
        "slo_classes": {"chat": {"ttft_s": ttft_s}},
        "models": {model: {"kind": "llama", "max_context": t.max_context, "weight_bytes": t.weight_bytes,
                           "output_prior": {"mean": output_mean, "std": output_mean, "weight": 20}}},
        "planner": {"policy": policy, "operations": []},
        "grouping": {"window_s": 0.001, "max_group_size": 1},
    })


def run_one(policy: str, args: argparse.Namespace, load: float) -> dict:
    trace = load_trace(resolve_trace_path(args.trace, args.traces_dir))
    fleet = uniform_fleet(args.workers, args.gpu, [args.model], max_batch_size=args.max_batch)
    prof = fleet.workers[0].models[args.model].profile
    prefill_tok_s = args.workers / prof.prefill_per_token_s
    trace_tok_s = sum(r.prompt_tokens for r in trace.records) / trace.period_s
    mult = load * prefill_tok_s / trace_tok_s
    ctx = {args.model: load_gpu_profiles().model(args.model).max_context}
    wl = build_workload(trace, WorkloadSpec(class_mix={"chat": 1.0}, model_mix={args.model: 1.0}, load=mult,
                                            window_s=args.window, max_context=ctx, seed=args.seed))
    span = max(r.arrival for r in wl) - min(r.arrival for r in wl)
    out_mean = float(np.mean([r.output_tokens for r in wl]))
    cfg = bench_policy(policy, args.model, args.ttft_s, args.max_batch, out_mean)
    res = Simulation(cfg, fleet, wl, policy_name=policy, options=SimOptions()).run()
    bound = reuse_bound(wl)
    reqs = res.requests
    end = res.end_time
    ttft = [(r.first_token_at if r.first_token_at is not None else end) - r.arrival for r in reqs]
    tpot = [(r.finished_at - r.first_token_at) / (r.output_tokens - 1) for r in reqs
            if r.finished_at is not None and r.first_token_at is not None and r.output_tokens > 1]
    look = sum(c.prefix_lookup_tokens for c in res.worker_counters.values())
    hit = sum(c.prefix_hit_tokens for c in res.worker_counters.values())
    return {
        "policy": policy, "load": load, "rate_multiplier": mult, "requests": len(reqs),
        "offered_req_s": len(wl) / max(span, 1e-9), "arrival_span_s": span,
        "ttft_p50_s": float(np.percentile(ttft, 50)), "ttft_p99_s": float(np.percentile(ttft, 99)),
        "ttft_mean_s": float(np.mean(ttft)),
        "tpot_p50_ms": 1000 * float(np.percentile(tpot, 50)) if tpot else None,
        "prefix_hit_rate": hit / look if look else 0.0, "reuse_bound": bound,
        "prefill_tokens": sum(c.prefill_tokens for c in res.worker_counters.values()),
        "unserved": sum(1 for r in reqs if r.first_token_at is None),
        "run_s": end, "sim_wall_s": res.wall_s,
    }


def reuse_bound(requests) -> float:
    """Share of prompt tokens one infinite cache would find: leading blocks seen before in
    the same workload (its cut prompts without ids, its loops with ids of their own)."""
    seen: set[int] = set()
    hit = total = 0
    for r in sorted(requests, key=lambda r: r.arrival):
        k = 0
        for h in r.hash_ids:
            if h not in seen:
                break
            k += 1
        hit += min(k * MOONCAKE_BLOCK_TOKENS, max(0, r.prompt_tokens - 1))
        total += r.prompt_tokens
        seen.update(r.hash_ids)
    return hit / total if total else 0.0


def cmd_dispatch(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=160)
    loads = [float(x) for x in args.loads.split(",") if x.strip()]
    policies = [p.strip() for p in args.policies.split(",") if p.strip()]
    t0 = time.perf_counter()
    runs = []
    for ld in loads:
        for p in policies:
            runs.append(run_one(p, args, ld))
            r = runs[-1]
            console.print(f"  load {ld:.2f} {p}: TTFT p50 {r['ttft_p50_s']:.2f} s, hit {r['prefix_hit_rate']:.1%} "
                          f"({r['requests']} requests, {r['sim_wall_s']:.0f} s wall)")
    table = Table(title=f"Dispatch with prefix caching: Mooncake synthetic trace, {args.workers} x {args.gpu}, "
                        f"{args.model}, " + (f"window {args.window:.0f} s" if args.window else "the whole trace once")
                        + f", seed {args.seed}")
    for col in ("load", "policy", "req/s", "TTFT p50 s", "TTFT p99 s", "TPOT p50 ms", "hit rate",
                "TTFT p50 change vs least-loaded"):
        table.add_column(col, justify="right" if col not in ("policy",) else "left")
    for ld in loads:
        base = next((r for r in runs if r["load"] == ld and r["policy"] == "least-loaded"), None)
        for r in (r for r in runs if r["load"] == ld):
            rel = f"{r['ttft_p50_s'] / base['ttft_p50_s'] - 1:+.1%}" if base and base["ttft_p50_s"] > 0 else "-"
            table.add_row(f"{ld:.2f}", r["policy"], f"{r['offered_req_s']:.2f}", f"{r['ttft_p50_s']:.2f}",
                          f"{r['ttft_p99_s']:.2f}", f"{r['tpot_p50_ms']:.1f}" if r["tpot_p50_ms"] else "-",
                          f"{r['prefix_hit_rate']:.1%}", rel)
        table.add_section()
    console.print(table)
    bounds = ", ".join(f"load {ld:.2f}: {next(r['reuse_bound'] for r in runs if r['load'] == ld):.1%}"
                       for ld in loads)
    console.print(f"hit-rate bound of each workload (one infinite cache, prompt tokens): {bounds}; "
                  f"{time.perf_counter() - t0:.0f} s wall")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"setup": {k: v for k, v in vars(args).items() if k != "func"},
                                               "runs": runs}, indent=1))
    return 0


def register_bench(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("dispatch", help="load-aware + sticky dispatch vs least-loaded and round-robin, with "
                                        "prefix caching modelled (Mooncake trace, simulator)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--loads", default="0.6,0.9", help="offered prompt tokens/s over the fleet's cache-less "
                                                      "prefill rate (default 0.6,0.9)")
    p.add_argument("--policies", default=",".join(DISPATCH_POLICIES))
    p.add_argument("--workers", type=int, default=8)
    p.add_argument("--gpu", default="A100-80GB")
    p.add_argument("--model", default="mistral-7b")
    p.add_argument("--max-batch", type=int, default=32)
    p.add_argument("--ttft-s", type=float, default=30.0, help="the class's TTFT target (reported only)")
    p.add_argument("--window", type=float, help="arrival window, seconds, the trace replayed in a loop to fill it "
                                                "(default: the whole trace once)")
    p.add_argument("--trace", default="mooncake_fast25_synthetic.jsonl")
    p.add_argument("--traces-dir")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="write the results here")
    p.set_defaults(func=cmd_dispatch)
