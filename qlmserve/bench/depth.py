"""`qlm bench-depth`: the controller's tick time as the queue deepens (issue 13).

One controller in this process, on a private redis-server (append-only, fsync every
second), with `--workers` worker sessions opened through the controller's own entry
points (`worker_connected`, `worker_report`: what the WorkerLink servicer calls when a
worker dials in and reports; their commands are not carried out, so what a worker runs
stays running until the bench ends it). For each depth the queue is topped up to that
many waiting requests, then `--ticks` ticks run back to back; before each tick `--churn`
requests arrive (Controller.submit) and as many running ones end (Controller.cancel), so
every tick also starts `--churn` requests. It prints the tick time p50/p99/max and its
parts (the snapshot: Redis and the view; the plan; applying it), each against the
figure at the smallest depth (Controller.last_tick_s), and Redis's used_memory per
request it holds (waiting or running; 128-token prompts; the changes stream included).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
from pathlib import Path

import numpy as np

from qlmserve.ui import console

POLICY = """
tick_interval_ms: 100
max_running_per_worker: 32
slo_classes:
  interactive: {{ttft_s: 5.0, priority: 10, latency_sensitive: true, admission: {{max_queued: 10000000}}}}
  batch: {{ttft_s: 600.0, priority: 1, admission: {{max_queued: 10000000}}}}
access: {{anonymous_clients: true, default_quota: {{}}}}
overload: {{max_queued: 10000000}}
models:
  sim-7b: {{max_context: 8192, weight_bytes: 14000000000, output_prior: {{mean: 200, std: 150}}}}
planner: {{policy: {planner}}}
grouping: {{window_s: 1.0, max_group_size: {group}}}
"""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench-depth", help="controller tick time at 1k/10k/100k waiting requests")
    p.add_argument("--depths", default="1000,10000,100000", help="comma-separated waiting requests")
    p.add_argument("--workers", default="8,64", help="comma-separated worker counts")
    p.add_argument("--ticks", type=int, default=40, help="ticks measured per (depth, workers)")
    p.add_argument("--churn", type=int, default=50, help="arrivals, starts and ends before each tick")
    p.add_argument("--planner", default="qlm", help="planner policy (qlm, edf, fcfs, ...)")
    p.add_argument("--group-size", type=int, default=64, help="grouping.max_group_size")
    p.add_argument("--json", dest="json_out", help="also write the results here")
    p.set_defaults(func=cmd_bench_depth)


def cmd_bench_depth(args) -> int:
    return asyncio.run(_main(args))


def _report(wid: str, running: dict[str, int]):
    from qlmserve.controller.workers import WorkerReport
    from qlmserve.operations.batching import PreemptionMode
    from qlmserve.operations.costs import WorkerProfile

    return WorkerReport(active_model="sim-7b", warm_models=[], kv_capacity_tokens=400_000,
                        kv_used_tokens=300 * len(running), running={rid: (a, False) for rid, a in running.items()},
                        waiting=[], max_batch_size=32, prefill_tokens_per_s=0.0, decode_tokens_per_s=0.0,
                        device="A100-80GB", loading_model=None, preemption=PreemptionMode.NONE,
                        profile=WorkerProfile(name=wid))


async def _main(args) -> int:
    from rich.table import Table

    from qlmserve.controller.core import Controller, SubmitInput
    from qlmserve.controller.policy import parse_policy
    from qlmserve.controller.redis_server import PrivateRedis
    from qlmserve.controller.store import RedisStore

    depths = sorted(int(x) for x in args.depths.split(","))
    worker_counts = sorted(int(x) for x in args.workers.split(","))
    policy = parse_policy(POLICY.format(planner=args.planner, group=args.group_size))
    prompt = list(range(1, 129))
    rows: list[dict] = []
    seq = iter(range(10**9))

    async def submit(n: int, conc: int = 64) -> None:
        it = iter(range(n))

        async def one() -> None:
            for _ in it:
                i = next(seq)
                await ctl.submit(SubmitInput("sim-7b", "interactive" if i % 10 == 0 else "batch", None, prompt, 64))

        await asyncio.gather(*(one() for _ in range(conc)))

    for workers in worker_counts:
        with tempfile.TemporaryDirectory() as tmp:  # a fresh Redis per fleet
            redis = PrivateRedis(Path(tmp) / "redis", appendfsync="everysec").start()
            try:
                store = RedisStore.from_url(redis.url, "depth")
                ctl = Controller(store, policy, redis_url=redis.url)
                base_bytes = int((await store.r.info("memory"))["used_memory"])
                handles = {}
                for i in range(workers):
                    h, _ = await ctl.worker_connected(f"w{i:03d}", "sim", "A100-80GB", ["sim-7b"], {})
                    handles[h.worker_id] = h
                for depth in depths:
                    await _report_all(ctl, handles)
                    running = sum(len(r) for r in (await store.running_of(list(handles))).values())
                    await submit(max(0, workers * policy.max_running_per_worker - running - _waiting(ctl)))
                    for _ in range(50):  # the batches fill (a tick may start only part): what is topped up next waits
                        before = _waiting(ctl)
                        await _report_all(ctl, handles)
                        await ctl.tick()
                        if _waiting(ctl) in (0, before):
                            break
                    t0 = time.perf_counter()
                    await submit(max(0, depth - _waiting(ctl)))
                    fill_s = time.perf_counter() - t0
                    await _report_all(ctl, handles)
                    await ctl.tick()
                    held = _waiting(ctl) + sum(len(r) for r in (await store.running_of(list(handles))).values())
                    used = int((await store.r.info("memory"))["used_memory"])
                    bytes_per_request = (used - base_bytes) / max(1, held)
                    ticks: list[float] = []
                    parts: dict[str, list[float]] = {"snapshot": [], "plan": [], "apply": []}
                    for _ in range(args.ticks):
                        await submit(args.churn, conc=min(args.churn, 16))
                        await _end_running(ctl, handles, args.churn)
                        await _report_all(ctl, handles)
                        t0 = time.perf_counter()
                        await ctl.tick()
                        ticks.append((time.perf_counter() - t0) * 1e3)
                        for part, sec in ctl.last_tick_s.items():
                            parts[part].append(sec * 1e3)
                    row = {"workers": workers, "depth": depth, "waiting_after": _waiting(ctl),
                           "groups": len(ctl.waiting.groups), "fill_s": fill_s, "planner": args.planner,
                           "redis_bytes_per_request": bytes_per_request,
                           **{f"tick_{k}_ms": v for k, v in _stats(ticks).items()},
                           **{f"{p}_p50_ms": _stats(v)["p50"] for p, v in parts.items()},
                           **{f"{p}_p99_ms": _stats(v)["p99"] for p, v in parts.items()}}
                    rows.append(row)
                    console().print(f"workers {workers}, {row['waiting_after']} waiting in {row['groups']} groups: "
                                    f"tick p50 {row['tick_p50_ms']:.1f} ms p99 {row['tick_p99_ms']:.1f} ms "
                                    f"(p50 snapshot {row['snapshot_p50_ms']:.1f}, plan {row['plan_p50_ms']:.1f}, "
                                    f"apply {row['apply_p50_ms']:.1f}); topped up in {fill_s:.1f} s; Redis "
                                    f"{bytes_per_request:.0f} bytes per request held")
                await store.close()
            finally:
                redis.stop()
    t = Table(title=f"Controller tick time by queue depth (planner {args.planner}, churn {args.churn}/tick, "
                    f"groups of up to {args.group_size})")
    for col in ("workers", "waiting", "groups", "tick p50 ms", "tick p99 ms", "max ms", "p50 / smallest",
                "p99 / smallest", "snapshot p50", "plan p50", "apply p50", "Redis B/request"):
        t.add_column(col, justify="right")
    for r in rows:
        base = next(b for b in rows if b["workers"] == r["workers"])
        t.add_row(str(r["workers"]), str(r["depth"]), str(r["groups"]), f"{r['tick_p50_ms']:.1f}",
                  f"{r['tick_p99_ms']:.1f}", f"{r['tick_max_ms']:.1f}", f"{r['tick_p50_ms'] / base['tick_p50_ms']:.2f}",
                  f"{r['tick_p99_ms'] / base['tick_p99_ms']:.2f}", f"{r['snapshot_p50_ms']:.1f}",
                  f"{r['plan_p50_ms']:.1f}", f"{r['apply_p50_ms']:.1f}", f"{r['redis_bytes_per_request']:.0f}")
    console().print(t)
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(rows, indent=2))
    return 0


def _waiting(ctl) -> int:
    return sum(len(g.waiting) for g in ctl.waiting.groups.values())


async def _report_all(ctl, handles) -> None:
    """Every worker reports what Redis says it runs (as a live worker would, each heartbeat)."""
    for wid, h in handles.items():
        await ctl.worker_report(h, _report(wid, await ctl.store.worker_running(wid)))


async def _end_running(ctl, handles, n: int) -> None:
    """End `n` running requests, spread over the workers (their batch slots free up)."""
    ended = 0
    while ended < n:
        before = ended
        for wid in handles:
            running = await ctl.store.worker_running(wid)
            if running and ended < n:
                await ctl.cancel(next(iter(running)))
                ended += 1
        if ended == before:
            return


def _stats(xs: list[float]) -> dict[str, float]:
    return {"p50": float(np.percentile(xs, 50)), "p99": float(np.percentile(xs, 99)), "max": float(max(xs))}
