"""`qlm bench-submit`: the submission rate the controller sustains, requests/s accepted
durably (acknowledged only after the request, its group entry and its idempotency key
are in Redis, with append-only persistence).

The controller runs as its own process (`qlm serve`) with its private redis-server, no
workers (nothing competes for the CPU but the tick loop); this process drives it
through the real gRPC API with many concurrent clients: one request per Submit call, and
with `--batch N` also N requests per SubmitBatch call (the same number of submissions in
flight, in fewer calls), side by side in one run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from qlmserve.ui import console


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench-submit", help="measure durable submissions per second through gRPC")
    p.add_argument("--requests", type=int, default=3000, help="submissions per concurrency level")
    p.add_argument("--concurrency", default="1,16,64", help="comma-separated in-flight submissions")
    p.add_argument("--batch", default="1", help="comma-separated requests per call: 1 is unary Submit, "
                   "N > 1 is SubmitBatch of N (in-flight submissions / N calls in flight)")
    p.add_argument("--fsync", default="everysec", choices=["everysec", "always"],
                   help="Redis appendfsync of the private server")
    p.add_argument("--json", dest="json_out", help="also write the results here")
    p.set_defaults(func=cmd_bench_submit)


POLICY = """
tick_interval_ms: 100
slo_classes:
  interactive: {ttft_s: 2.0, priority: 10, latency_sensitive: true, admission: {max_queued: 1000000}}
  batch: {ttft_s: 600.0, admission: {max_queued: 1000000}}
# No worker drains the queue here: the admission limits are out of the way of the measurement.
access: {anonymous_clients: true, default_quota: {}}
overload: {max_queued: 1000000}
models:
  sim-7b: {max_context: 8192, output_prior: {mean: 200, std: 150}}
planner: {policy: qlm}
grouping: {window_s: 1.0, max_group_size: 64}
"""


def cmd_bench_submit(args) -> int:
    return asyncio.run(_main(args))


async def _main(args) -> int:
    from rich.table import Table

    from qlmserve.client import QlmClient, submit_request
    from qlmserve.controller.redis_server import PrivateRedis, free_port

    levels = [int(x) for x in args.concurrency.split(",")]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "policy.yaml").write_text(POLICY)
        redis = PrivateRedis(tmp / "redis", appendfsync=args.fsync).start()
        port = free_port()
        ctrl = subprocess.Popen([sys.executable, "-m", "qlmserve.cli", "serve", "--redis", redis.url, "--port", str(port),
                                 "--policy", str(tmp / "policy.yaml"), "--data-dir", str(tmp / "data")], stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        try:
            async with QlmClient(f"127.0.0.1:{port}") as client:
                await client.submit(submit_request("sim-7b", prompt_token_ids=[1, 2, 3], max_tokens=4, slo_class="batch"),
                                    timeout=60)
                prompt = list(range(1, 257))
                for batch in [int(x) for x in args.batch.split(",")]:
                    for conc in levels:
                        rows.append(await _level(client, (ctrl.pid, redis.proc.pid), prompt, batch, conc,
                                                 args.requests, args.fsync))
        finally:
            ctrl.terminate()
            ctrl.wait(timeout=10)
            redis.stop()
    t = Table(title=f"Durable submissions through gRPC (Redis appendonly, appendfsync {args.fsync}; 256-token prompts)")
    for col in ("call", "in flight", "calls in flight", "requests", "seconds", "accepted req/s",
                "ack p50 ms", "ack p99 ms", "controller CPU µs/req", "Redis CPU µs/req"):
        t.add_column(col, justify="right")
    for r in rows:
        t.add_row("Submit" if r["batch"] == 1 else f"SubmitBatch {r['batch']}", str(r["concurrency"]),
                  str(r["calls_in_flight"]), str(r["requests"]), f"{r['seconds']:.2f}", f"{r['accepted_per_s']:.0f}",
                  f"{r['latency_p50_ms']:.2f}", f"{r['latency_p99_ms']:.2f}", f"{r['controller_cpu_us_per_req']:.0f}",
                  f"{r['redis_cpu_us_per_req']:.0f}")
    console().print(t)
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(rows, indent=2))
    return 0


async def _level(client, pids: tuple[int, int], prompt: list[int], batch: int, conc: int, n: int, fsync: str) -> dict:
    """`n` submissions with `conc` in flight, `batch` per call; latency is a call's, from
    its start to the acknowledgement of all its requests (durable). The CPU time per
    submission of the controller and of redis-server (`pids`) bounds the rate on idle
    cores (the rate itself depends on what else runs on the machine)."""
    from qlmserve.bench.local_stack import cpu_s
    from qlmserve.client import SubmitRefused, submit_request

    calls = max(1, conc // batch)
    latencies: list[float] = []
    counter = iter(range(0, n, batch))

    def req(i: int):
        return submit_request("sim-7b", prompt_token_ids=prompt, max_tokens=128,
                              slo_class="interactive" if i % 5 == 0 else "batch", idempotency_key=f"b{batch}-c{conc}-{i}")

    async def one_caller() -> None:
        for first in counter:
            items = [req(i) for i in range(first, min(first + batch, n))]
            t = time.perf_counter()
            if batch == 1:
                await client.submit(items[0])
            else:
                refused = [o for o in await client.submit_many(items) if isinstance(o, SubmitRefused)]
                if refused:
                    raise RuntimeError(f"{len(refused)} submissions refused: {refused[0]}")
            latencies.append(time.perf_counter() - t)

    t0, cpu0 = time.perf_counter(), [cpu_s(p) for p in pids]
    await asyncio.gather(*(one_caller() for _ in range(calls)))
    dt, (cpu, redis_cpu) = time.perf_counter() - t0, [cpu_s(p) - c for p, c in zip(pids, cpu0)]
    lat = np.array(latencies) * 1000
    return {"batch": batch, "concurrency": calls * batch, "calls_in_flight": calls, "requests": n, "seconds": dt,
            "accepted_per_s": n / dt, "latency_p50_ms": float(np.percentile(lat, 50)),
            "latency_p99_ms": float(np.percentile(lat, 99)), "controller_cpu_us_per_req": cpu / n * 1e6,
            "redis_cpu_us_per_req": redis_cpu / n * 1e6,
            "fsync": fsync}
