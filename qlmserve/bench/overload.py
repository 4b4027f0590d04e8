"""`qlm bench overload`: offered load at a multiple of what the fleet sustains, for minutes.

On loopback, in a temporary folder: a private redis-server, one controller (`qlm serve`),
simulated workers. First the sustained rate is measured (requests/s the fleet completes
while saturated, `--calibrate-s`); then Poisson arrivals at `--factor` times that rate are
offered for `--duration` seconds through the gRPC Submit API. Every minute the table shows
what was offered, accepted and refused (and whether each refusal carried a RetryInfo),
the queue, and the memory of the controller (RSS) and of Redis (used_memory and RSS).
At the end the queue drains and every acknowledged request is checked in Redis: finished,
with all its tokens.

Finished requests stay readable in Redis for the policy's `finished_retention_s` (60 s
here): Redis memory is then bounded by the queue plus one retention window of traffic.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import tempfile
import time
from pathlib import Path

from qlmserve.ui import console

POLICY = """
tick_interval_ms: 100
heartbeat_timeout_s: 5
max_running_per_worker: 8
finished_retention_s: 60
default_slo_class: batch
slo_classes:
  interactive: {{ttft_s: 2.0, priority: 10, latency_sensitive: true, admission: {{max_queued: {ls}}}}}
  batch: {{ttft_s: 60.0, priority: 1, admission: {{max_queued: {be}}}}}
models:
  sim-a: {{max_context: 1024, weight_bytes: 1000000, output_prior: {{mean: 32, std: 8}}}}
planner: {{policy: edf}}
grouping: {{window_s: 1.0}}
access: {{anonymous_clients: true, default_quota: {{}}}}
overload: {{max_queued: {all}, best_effort_share: 0.75}}
"""

PROFILE = """
name: overload
prefill_base_s: 0.002
prefill_per_token_s: 0.00001
decode_base_s: 0.02
decode_per_seq_s: 0.002
load_fixed_s: 0.05
"""


def register_bench(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("overload", help="offer a multiple of the sustained rate for minutes; memory and refusals")
    p.add_argument("--duration", type=float, default=600.0, help="seconds of overload (default 600)")
    p.add_argument("--factor", type=float, default=5.0, help="offered / sustained rate (default 5)")
    p.add_argument("--calibrate-s", type=float, default=40.0, help="seconds to measure the sustained rate")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--max-queued", type=int, default=800,
                   help="overload.max_queued (classes: 3/8 of it latency-sensitive, 3/4 best-effort; default 800)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", dest="json_out", help="also write the results here")
    p.set_defaults(func=cmd_overload)


def cmd_overload(args) -> int:
    return asyncio.run(_main(args))


async def _main(args) -> int:
    import grpc
    import redis

    from qlmserve.bench.local_stack import LocalStack, rss_mb
    from qlmserve.client import QlmClient, submit_request

    base = Path(tempfile.mkdtemp(prefix="qlm-overload-"))
    n = args.max_queued
    (base / "policy.yaml").write_text(POLICY.format(ls=max(1, n * 3 // 8), be=max(1, n * 3 // 4), all=n))
    (base / "profile.yaml").write_text(PROFILE)
    stack = LocalStack(base, args.workers, 8).start()
    srv, ctrl = stack.redis, stack.controller
    r = redis.Redis.from_url(srv.url, decode_responses=True)
    con = console(stderr=True)
    rng = random.Random(args.seed)
    acked: list[str] = []
    counts = {"offered": 0, "accepted": 0, "refused": 0, "refused_with_hint": 0, "errors": 0}
    rows: list[dict] = []
    try:
        await stack.wait_workers(r)
        async with QlmClient(stack.address) as client:

            async def one(ls: bool) -> None:
                req = submit_request("sim-a", prompt_token_ids=[rng.randint(3, 500) for _ in range(16)],
                                     max_tokens=args.max_tokens, slo_class="interactive" if ls else "batch")
                counts["offered"] += 1
                try:
                    sub = await client.submit(req, timeout=30)
                    counts["accepted"] += 1
                    acked.append(sub.request_id)
                except grpc.aio.AioRpcError as exc:
                    if exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                        counts["refused"] += 1
                        md = dict(exc.trailing_metadata() or ())
                        counts["refused_with_hint"] += "grpc-status-details-bin" in md
                    else:
                        counts["errors"] += 1

            async def offer(rate: float, seconds: float, on_minute=None) -> None:
                t0 = time.monotonic()
                tasks: set[asyncio.Task] = set()
                next_mark = 60.0
                while time.monotonic() - t0 < seconds:
                    t = asyncio.create_task(one(rng.random() < 0.2))
                    tasks.add(t)
                    t.add_done_callback(tasks.discard)
                    await asyncio.sleep(rng.expovariate(rate))
                    if on_minute and time.monotonic() - t0 >= next_mark:
                        on_minute(next_mark)
                        next_mark += 60.0
                await asyncio.gather(*tasks)

            def finished() -> int:
                st = r.hgetall("qlm:classstats")
                return sum(int(v) for k, v in st.items() if k.endswith("|finished"))

            # Calibration: saturate the fleet and count completions.
            f0, t0 = finished(), time.monotonic()
            await offer(200.0, 2.0)
            await asyncio.sleep(args.calibrate_s)
            sustained = (finished() - f0) / (time.monotonic() - t0)
            con.print(f"sustained rate {sustained:.1f} req/s; offering {args.factor}x = "
                      f"{args.factor * sustained:.1f} req/s for {args.duration:.0f} s")
            last = dict(counts)

            def sample(mark: float) -> None:
                info = r.info("memory")
                q = r.hget("qlm:queued", "all|n")
                row = {"minute": round(mark / 60), "offered": counts["offered"] - last["offered"],
                       "accepted": counts["accepted"] - last["accepted"],
                       "refused": counts["refused"] - last["refused"],
                       "refused_with_hint": counts["refused_with_hint"] - last["refused_with_hint"],
                       "queued": int(q or 0), "controller_rss_mb": round(rss_mb(ctrl.pid), 1),
                       "redis_used_mb": round(info["used_memory"] / 2**20, 1),
                       "redis_rss_mb": round(rss_mb(srv.proc.pid), 1)}
                last.update(counts)
                rows.append(row)
                con.print(json.dumps(row))

            await offer(args.factor * sustained, args.duration, sample)
            # Drain: every acknowledged request must finish with all its tokens.
            deadline = time.monotonic() + 600
            while int(r.hget("qlm:queued", "all|n") or 0) > 0 or r.scard("qlm:unfinished") > 0:
                if time.monotonic() > deadline:
                    break
                await asyncio.sleep(1.0)
        lost = 0
        for rid in acked:
            h = r.hmget(f"qlm:req:{rid}", "status", "generated", "max_tokens")
            if h[0] is None:
                continue  # finished longer than the retention ago: it did finish (expiry only follows finishing)
            if h[0] != "finished" or int(h[1] or 0) != int(h[2] or -1):
                lost += 1
    finally:
        stack.stop()
    result = {"sustained_req_per_s": sustained, "offered_req_per_s": args.factor * sustained, "minutes": rows,
              "totals": counts, "acknowledged": len(acked), "lost": lost,
              "setup": {"duration_s": args.duration, "factor": args.factor, "workers": args.workers,
                        "max_tokens": args.max_tokens, "max_queued": args.max_queued, "seed": args.seed,
                        "folder": str(base)}}
    _print(result)
    if args.json_out:
        Path(args.json_out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json_out).write_text(json.dumps(result, indent=2))
    return 0 if lost == 0 and counts["refused"] == counts["refused_with_hint"] else 1


def _print(result: dict) -> None:
    from rich.table import Table

    t = Table(title=f"qlm bench overload: {result['offered_req_per_s']:.1f} req/s offered, "
                    f"{result['sustained_req_per_s']:.1f} sustained")
    cols = ("minute", "offered", "accepted", "refused", "refused_with_hint", "queued", "controller_rss_mb",
            "redis_used_mb", "redis_rss_mb")
    for c in cols:
        t.add_column(c.replace("_", " "), justify="right")
    for row in result["minutes"]:
        t.add_row(*(str(row[c]) for c in cols))
    console().print(t)
    console().print(f"acknowledged {result['acknowledged']}, lost {result['lost']}, "
                    f"refused {result['totals']['refused']} ({result['totals']['refused_with_hint']} with a retry "
                    f"hint), other errors {result['totals']['errors']}")
