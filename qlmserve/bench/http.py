"""`qlm bench-http`: the same load through the OpenAI-compatible HTTP API and through
gRPC, against one cluster: a controller process (`qlm serve`, its private redis-server)
and simulated-engine worker processes.

Each phase sends `--requests` streamed completions with `--concurrency` in flight and
measures, per request, the time to the acknowledgement (HTTP: the response headers,
which carry the request id; gRPC: the Submit reply), to the first token, and to the
last. The HTTP phase streams SSE (httpx); the gRPC phase Submits then Streams, so both
acknowledge a request before reading its tokens. The latency the HTTP layer adds is
the difference of the medians, and their ratio, from this one run.

Then every acknowledged request is checked against the controller (GetStatus): it
finished, with as many tokens as the client read, and the client read max_tokens of
them. Every other answer must be a clear refusal (HTTP 429/503, gRPC RESOURCE_EXHAUSTED
/ UNAVAILABLE). The command fails when any request is neither.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from qlmserve.ui import console

POLICY = """
tick_interval_ms: 50
max_running_per_worker: 32
default_slo_class: batch
slo_classes:
  interactive: {{ttft_s: 2.0, priority: 10, latency_sensitive: true}}
  batch: {{ttft_s: 60.0, priority: 1}}
access: {{anonymous_clients: true, default_quota: {{}}}}
overload: {{max_queued: {max_queued}}}
models:
  sim-a: {{max_context: 2048, weight_bytes: 1000000, output_prior: {{mean: 16, std: 8}}}}
planner: {{policy: edf}}
grouping: {{window_s: 0.2}}
"""

# A fast simulated engine: the bench measures the front doors, not decoding.
PROFILE = """
name: bench-http
prefill_base_s: 0.001
prefill_per_token_s: 0.00001
decode_base_s: 0.004
decode_per_seq_s: 0.0002
load_fixed_s: 0.05
"""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench-http", help="the same load over the HTTP API and over gRPC: rate, latency, nothing lost")
    p.add_argument("--requests", type=int, default=500, help="requests per phase (default 500)")
    p.add_argument("--concurrency", type=int, default=64, help="in flight (default 64)")
    p.add_argument("--max-tokens", type=int, default=16, help="tokens per request (default 16)")
    p.add_argument("--prompt-tokens", type=int, default=64, help="prompt length in tokens (default 64)")
    p.add_argument("--workers", type=int, default=2, help="simulated workers (default 2)")
    p.add_argument("--max-queued", type=int, default=2000,
                   help="overload.max_queued of the policy (small values show the 429 answers)")
    p.add_argument("--json", dest="json_out", help="also write the results here")
    p.set_defaults(func=cmd_bench_http)


@dataclass
class Phase:
    api: str
    acked: dict[str, int] = field(default_factory=dict)  # request id -> tokens read
    refused: dict[str, int] = field(default_factory=dict)  # clear refusals by kind
    failed: list[str] = field(default_factory=list)  # anything else
    ack_s: list[float] = field(default_factory=list)
    ttft_s: list[float] = field(default_factory=list)
    total_s: list[float] = field(default_factory=list)
    wall_s: float = 0.0

    def summary(self, max_tokens: int) -> dict:
        def pct(v: list[float], q: float) -> float | None:
            return float(np.percentile(np.array(v) * 1000, q)) if v else None

        short = sum(1 for n in self.acked.values() if n != max_tokens)
        return {"api": self.api, "requests": len(self.acked) + sum(self.refused.values()) + len(self.failed),
                "completed": len(self.acked) - short, "short": short, "refused": dict(self.refused),
                "failed": len(self.failed), "failures": self.failed[:5], "wall_s": self.wall_s,
                "completed_per_s": (len(self.acked) - short) / self.wall_s if self.wall_s else 0.0,
                "ack_p50_ms": pct(self.ack_s, 50), "ack_p99_ms": pct(self.ack_s, 99),
                "ttft_p50_ms": pct(self.ttft_s, 50), "ttft_p99_ms": pct(self.ttft_s, 99),
                "total_p50_ms": pct(self.total_s, 50), "total_p99_ms": pct(self.total_s, 99)}


async def _http_phase(url: str, args) -> Phase:
    import httpx

    ph = Phase("http")
    prompt = list(range(1, args.prompt_tokens + 1))
    counter = iter(range(args.requests))
    # A connection per request: with httpcore 1.0.9 keep-alive pools, some requests waited
    # out keepalive_expiry (5 s) before being sent (traced: no byte left the client
    # meanwhile; the p99 went from ~0.5 s to ~5.5 s). The clients bound what is in flight.
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=0)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as http:
        async def one_client() -> None:
            for i in counter:
                body = {"model": "sim-a", "prompt": prompt, "max_tokens": args.max_tokens, "stream": True,
                        "slo_class": "interactive" if i % 5 == 0 else "batch"}
                t0 = time.perf_counter()
                try:
                    async with http.stream("POST", "/v1/completions", json=body) as r:
                        if r.status_code in (429, 503):
                            await r.aread()
                            ph.refused[str(r.status_code)] = ph.refused.get(str(r.status_code), 0) + 1
                            continue
                        if r.status_code != 200:
                            ph.failed.append(f"HTTP {r.status_code}: {(await r.aread())[:200]!r}")
                            continue
                        rid = r.headers["x-qlm-request-id"]
                        ph.ack_s.append(time.perf_counter() - t0)
                        n, first, done = 0, None, False
                        async for line in r.aiter_lines():
                            if line == "data: [DONE]":
                                done = True
                            elif line.startswith("data: "):
                                ev = json.loads(line[6:])
                                if "error" in ev:
                                    raise RuntimeError(ev["error"]["message"])
                                if ev["qlm_token_ids"] and first is None:
                                    first = time.perf_counter() - t0
                                n += len(ev["qlm_token_ids"])
                        if not done:
                            raise RuntimeError("the stream ended without [DONE]")
                        ph.acked[rid] = n
                        ph.ttft_s.append(first if first is not None else float("nan"))
                        ph.total_s.append(time.perf_counter() - t0)
                except Exception as exc:  # noqa: BLE001 - counted and reported
                    ph.failed.append(f"{type(exc).__name__}: {exc}")

        t0 = time.perf_counter()
        await asyncio.gather(*(one_client() for _ in range(args.concurrency)))
        ph.wall_s = time.perf_counter() - t0
    return ph


async def _grpc_phase(address: str, args) -> Phase:
    import grpc

    from qlmserve.client import QlmClient, submit_request

    ph = Phase("grpc")
    prompt = list(range(1, args.prompt_tokens + 1))
    counter = iter(range(args.requests))
    async with QlmClient(address) as client:
        async def one_client() -> None:
            for i in counter:
                req = submit_request("sim-a", prompt_token_ids=prompt, max_tokens=args.max_tokens,
                                     slo_class="interactive" if i % 5 == 0 else "batch")
                t0 = time.perf_counter()
                try:
                    sub = await client.submit(req)
                    ph.ack_s.append(time.perf_counter() - t0)
                    n, first, done = 0, None, False
                    async for chunk in client.stream(sub.request_id, 0):
                        if chunk.token_ids and first is None:
                            first = time.perf_counter() - t0
                        n += len(chunk.token_ids)
                        if chunk.finished:
                            done = True
                            break
                    if not done:
                        raise RuntimeError("the stream ended before the request finished")
                    ph.acked[sub.request_id] = n
                    ph.ttft_s.append(first if first is not None else float("nan"))
                    ph.total_s.append(time.perf_counter() - t0)
                except grpc.aio.AioRpcError as exc:
                    if exc.code() in (grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.UNAVAILABLE):
                        ph.refused[exc.code().name] = ph.refused.get(exc.code().name, 0) + 1
                    else:
                        ph.failed.append(f"{exc.code().name}: {exc.details()}")
                except Exception as exc:  # noqa: BLE001
                    ph.failed.append(f"{type(exc).__name__}: {exc}")

        t0 = time.perf_counter()
        await asyncio.gather(*(one_client() for _ in range(args.concurrency)))
        ph.wall_s = time.perf_counter() - t0
    return ph


async def _verify(address: str, token: str, phases: list[Phase]) -> list[str]:
    """Every acknowledged request finished in the controller with the tokens its client read."""
    from qlmserve.client import QlmClient

    lost = []
    async with QlmClient(address, token=token) as client:
        sem = asyncio.Semaphore(32)

        async def check(api: str, rid: str, n: int) -> None:
            async with sem:
                st = await client.status(rid)
            if st.status != "finished" or st.generated_tokens != n:
                lost.append(f"{api} {rid}: {st.status}, {st.generated_tokens} tokens stored, {n} read")

        await asyncio.gather(*(check(ph.api, rid, n) for ph in phases for rid, n in ph.acked.items()))
    return lost


def cmd_bench_http(args) -> int:
    return asyncio.run(_main(args))


async def _main(args) -> int:
    from qlmserve.controller.redis_server import PrivateRedis, free_port
    from qlmserve.credentials import resolve_token

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "policy.yaml").write_text(POLICY.format(max_queued=args.max_queued))
        (tmp / "profile.yaml").write_text(PROFILE)
        redis = PrivateRedis(tmp / "redis").start()
        port, http_port = free_port(), free_port()
        qlm = [sys.executable, "-m", "qlmserve.cli"]
        procs = [subprocess.Popen([*qlm, "serve", "--redis", redis.url, "--port", str(port), "--http-port",
                                   str(http_port), "--policy", str(tmp / "policy.yaml"), "--data-dir",
                                   str(tmp / "data")], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)]
        address, url = f"127.0.0.1:{port}", f"http://127.0.0.1:{http_port}"
        try:
            token = None
            for _ in range(600):
                token = resolve_token(None, str(tmp / "data"), "admin")
                if token and procs[0].poll() is None:
                    break
                await asyncio.sleep(0.1)
            for i in range(args.workers):
                procs.append(subprocess.Popen(
                    [*qlm, "worker", "--controller", address, "--id", f"sim-{i}", "--engine", "sim", "--sim-profile",
                     str(tmp / "profile.yaml"), "--max-batch", "32", "--data-dir", str(tmp / "data")],
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
            await _wait_workers(address, token, args.workers)
            warm = argparse.Namespace(**{**vars(args), "requests": args.concurrency})
            await _http_phase(url, warm)  # connections, imports and caches warm on both sides first
            await _grpc_phase(address, warm)
            http = await _http_phase(url, args)
            grpc_ = await _grpc_phase(address, args)
            lost = await _verify(address, token, [http, grpc_])
        finally:
            for p in reversed(procs):
                p.terminate()
            for p in procs:
                try:
                    p.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    p.kill()
            redis.stop()
    rows = [http.summary(args.max_tokens), grpc_.summary(args.max_tokens)]
    h, g = rows
    added = {k: (h[k] - g[k], h[k] / g[k]) for k in ("ack_p50_ms", "ttft_p50_ms", "total_p50_ms")
             if h[k] is not None and g[k]}
    result = {"setup": {k: getattr(args, k) for k in ("requests", "concurrency", "max_tokens", "prompt_tokens",
                                                       "workers", "max_queued")},
              "phases": rows, "http_added": {k: {"ms": v[0], "ratio": v[1]} for k, v in added.items()},
              "lost": lost}
    _print(result)
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(result, indent=2))
    bad = lost or any(r["failed"] or r["short"] for r in rows)
    return 1 if bad else 0


async def _wait_workers(address: str, token: str, n: int, timeout_s: float = 120.0) -> None:
    from qlmserve.client import QlmClient

    deadline = time.monotonic() + timeout_s
    async with QlmClient(address, token=token) as client:
        while True:
            try:
                ws = await client.workers()
                if sum(1 for w in ws.workers if w.healthy) >= n:
                    return
            except Exception:  # noqa: BLE001 - the controller is still starting
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"fewer than {n} workers connected after {timeout_s:.0f}s")
            await asyncio.sleep(0.2)


def _print(result: dict) -> None:
    from rich.table import Table

    def f(v):
        return "-" if v is None else f"{v:.1f}"

    s = result["setup"]
    t = Table(title=f"{s['requests']} streamed completions per API, {s['concurrency']} in flight, "
                    f"{s['prompt_tokens']}-token prompts, {s['max_tokens']} tokens out, {s['workers']} sim workers")
    for col in ("API", "completed", "refused", "failed", "req/s", "ack p50 ms", "ack p99 ms", "TTFT p50 ms",
                "TTFT p99 ms", "total p50 ms", "total p99 ms"):
        t.add_column(col, justify="left" if col == "API" else "right")
    for r in result["phases"]:
        t.add_row(r["api"], str(r["completed"]), str(sum(r["refused"].values())), str(r["failed"]),
                  f"{r['completed_per_s']:.0f}", f(r["ack_p50_ms"]), f(r["ack_p99_ms"]), f(r["ttft_p50_ms"]),
                  f(r["ttft_p99_ms"]), f(r["total_p50_ms"]), f(r["total_p99_ms"]))
    con = console()
    con.print(t)
    for k, v in result["http_added"].items():
        con.print(f"HTTP vs gRPC, {k.removesuffix('_ms').replace('_', ' ')}: {v['ms']:+.1f} ms "
                  f"(ratio {v['ratio']:.2f})")
    for r in result["phases"]:
        for msg in r["failures"]:
            con.print(f"[red]{r['api']} failure[/]: {msg}")
    con.print("nothing acknowledged was lost" if not result["lost"] else
              f"[red]{len(result['lost'])} acknowledged requests lost or short[/]: {result['lost'][:5]}")
