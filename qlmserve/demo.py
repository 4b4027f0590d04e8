"""`qlm demo`: the whole system on embedded defaults, in under two minutes on 2 cores.

A private redis-server, the controller, and two CPU workers running two tiny MoE models
(seeded random weights, built on first use) serve a slice of the Azure LLM inference
trace (conversation service, bundled with its attribution) replayed as a mix of
latency-sensitive and best-effort requests through the real gRPC API (`--http`: through
the OpenAI-compatible HTTP API, streamed completions). It ends with a table per SLO class.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import time
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np

from qlmserve.ui import console


@dataclass
class Outcome:
    slo_class: str
    model: str
    ttft_s: float | None
    tokens: int
    finish_reason: str
    error: str = ""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="run QLM end to end on embedded defaults and print the results")
    p.add_argument("--data-dir", default="var/demo", help="models and the private Redis (default var/demo)")
    p.add_argument("--requests", type=int, default=200, help="requests to replay (default 200)")
    p.add_argument("--window", type=float, default=40.0, help="seconds over which they arrive (default 40)")
    p.add_argument("--interactive-share", type=float, default=0.2, help="latency-sensitive fraction (default 0.2)")
    p.add_argument("--prompt-scale", type=float, default=1 / 8, help="trace prompt lengths times this (default 1/8)")
    p.add_argument("--output-scale", type=float, default=0.5, help="trace output lengths times this (default 0.5)")
    p.add_argument("--policy", help="policy YAML (default: the embedded default policy)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print the results as one JSON object")
    p.add_argument("--http", action="store_true",
                   help="drive the load through the OpenAI-compatible HTTP API (streamed completions) instead of gRPC")
    p.set_defaults(func=cmd_demo)


def cmd_demo(args) -> int:
    return asyncio.run(run_demo(args))


def _workload(args, policy):
    from qlmserve.traces import WorkloadSpec, build_workload, load_azure_csv

    trace_file = resources.files("qlmserve").joinpath("data/azure2023_conv_slice.csv")
    with resources.as_file(trace_file) as path:
        trace = load_azure_csv(path)
    models = sorted(policy.models)
    # Replay the trace compressed into the window, lengths scaled to the tiny models.
    n = min(args.requests, len(trace.records))
    span = trace.head(n).span_s or 1.0
    spec = WorkloadSpec(class_mix={"interactive": args.interactive_share, "batch": 1 - args.interactive_share},
                        model_mix={m: 1.0 for m in models}, load=span / args.window, max_requests=n,
                        prompt_scale=args.prompt_scale, output_scale=args.output_scale, min_output_tokens=4,
                        max_context={m: 320 for m in models}, seed=args.seed)
    return trace, build_workload(trace, spec)


async def run_demo(args) -> int:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from qlmserve.client import QlmClient, submit_request
    from qlmserve.controller.runtime import ControllerRuntime, RuntimeOptions

    err = console(stderr=True)
    data = Path(args.data_dir)
    shutil.rmtree(data / "redis", ignore_errors=True)  # a fresh queue every run; models are kept
    rt = ControllerRuntime(RuntimeOptions(policy_path=args.policy, data_dir=str(data),
                                          worker_log_dir=str(data / "logs")))
    t_start = time.perf_counter()
    err.print("[bold]QLM demo[/]: starting a private redis-server, the controller and 2 CPU workers "
                  "(tiny MoE models are built on first use)")
    await rt.start()
    try:
        policy = rt.controller.policy
        models = sorted(policy.models)
        for i in range(2):
            rt.workers.append(rt.spawn_worker(f"cpu-{i}", ["--preload", models[i % len(models)], "--max-batch", "8"]))
        await rt.wait_for_workers(2, timeout_s=180)
        trace, work = _workload(args, policy)
        err.print(f"replaying {len(work)} requests of {trace.name} (Azure LLM inference trace, CC-BY 4.0) "
                      f"over {args.window:.0f}s; {args.interactive_share:.0%} interactive "
                      f"(TTFT SLO {policy.slo_classes['interactive'].ttft_s:g}s), rest batch "
                      f"(TTFT SLO {policy.slo_classes['batch'].ttft_s:g}s); models {', '.join(models)}")
        rng = np.random.default_rng(args.seed)
        outcomes: list[Outcome] = []
        if args.http:
            err.print(f"through the OpenAI-compatible HTTP API at {rt.http.url}/v1")
        # Anonymous on both APIs: the embedded policy allows it on loopback.
        async with QlmClient(rt.address) as client, _http_client(rt, args.http) as http:
            with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                          console=err, transient=False) as progress:
                task = progress.add_task("requests done", total=len(work))
                t0 = time.perf_counter()

                async def one(w) -> None:
                    await asyncio.sleep(max(0.0, w.arrival - (time.perf_counter() - t0)))
                    ids = rng.integers(3, 500, size=w.prompt_tokens).tolist()
                    req = submit_request(w.model, prompt_token_ids=ids, slo_class=w.slo_class,
                                         max_tokens=w.output_tokens, user_id=w.user_id)
                    sent = time.perf_counter()
                    ttft, n, reason, error = None, 0, "", ""
                    chunks = _http_tokens(http, req) if http is not None else _grpc_tokens(client, req)
                    try:
                        async for got, fin in chunks:
                            if ttft is None and got:
                                ttft = time.perf_counter() - sent
                            n += got
                            reason = fin or reason
                    except Exception as exc:  # noqa: BLE001 - reported in the table, not fatal
                        error = str(exc)
                    outcomes.append(Outcome(w.slo_class, w.model, ttft, n, reason, error))
                    progress.advance(task)

                await asyncio.gather(*(one(w) for w in work))
                elapsed = time.perf_counter() - t0
        ops = _operations(rt)
        result = summarize(outcomes, policy, elapsed, ops)
        result["setup"] = {"trace": trace.name, "requests": len(work), "window_s": args.window,
                           "interactive_share": args.interactive_share, "prompt_scale": args.prompt_scale,
                           "output_scale": args.output_scale, "workers": 2, "models": models,
                           "policy": policy.planner.policy, "seed": args.seed,
                           "api": "http" if args.http else "grpc",
                           "total_wall_s": round(time.perf_counter() - t_start, 1)}
    finally:
        await rt.stop()
    if args.json:
        print(json.dumps(result))
    else:
        print_table(result)
    return 0 if result["overall"]["errors"] == 0 else 1


def _http_client(rt, on: bool):
    """An httpx client of the controller's HTTP API, or a context holding None (gRPC)."""
    import contextlib

    if not on:
        return contextlib.nullcontext(None)
    import httpx

    if rt.http is None:
        raise RuntimeError("the controller serves no HTTP API")
    # A connection per request: see qlmserve/bench/http.py on httpcore keep-alive pools.
    return httpx.AsyncClient(base_url=rt.http.url, timeout=600,
                             limits=httpx.Limits(max_connections=None, max_keepalive_connections=0))


async def _grpc_tokens(client, req):
    """(tokens, finish reason) of each chunk of a gRPC Generate."""
    async for chunk in client.generate(req):
        yield len(chunk.token_ids), chunk.finish_reason


async def _http_tokens(http, req):
    """(tokens, finish reason) of each event of a streamed HTTP completion."""
    body = {"model": req.model, "prompt": list(req.prompt_token_ids.ids), "max_tokens": req.max_tokens,
            "stream": True, "slo_class": req.slo_class, "user": req.user_id, "temperature": 0}
    async with http.stream("POST", "/v1/completions", json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {(await r.aread()).decode(errors='replace')[:200]}")
        async for line in r.aiter_lines():
            if not line.startswith("data: {"):
                continue
            ev = json.loads(line[6:])
            if "error" in ev:
                raise RuntimeError(ev["error"]["message"])
            yield len(ev["qlm_token_ids"]), ev["choices"][0]["finish_reason"] or ""


def _operations(rt) -> dict[str, int]:
    out = {}
    for metric in rt.controller.metrics.operations.collect():
        for s in metric.samples:
            if s.name.endswith("_total") and s.value:
                out[s.labels["kind"]] = int(s.value)
    return out


def summarize(outcomes: list[Outcome], policy, elapsed_s: float, ops: dict[str, int]) -> dict:
    def stats(rows: list[Outcome], ttft_slo: float | None) -> dict:
        ttfts = np.array([o.ttft_s for o in rows if o.ttft_s is not None])
        met = sum(1 for o in rows if o.ttft_s is not None and ttft_slo is not None and o.ttft_s <= ttft_slo
                  and not o.error)
        tokens = sum(o.tokens for o in rows)
        return {
            "requests": len(rows),
            "slo_attainment": met / len(rows) if rows else 0.0,
            "ttft_p50_s": float(np.percentile(ttfts, 50)) if len(ttfts) else None,
            "ttft_p99_s": float(np.percentile(ttfts, 99)) if len(ttfts) else None,
            "tokens": tokens,
            "throughput_tok_s": tokens / elapsed_s if elapsed_s > 0 else 0.0,
            "errors": sum(1 for o in rows if o.error),
        }

    classes = {}
    met_total = 0
    for name, slo in policy.slo_classes.items():
        rows = [o for o in outcomes if o.slo_class == name]
        classes[name] = stats(rows, slo.ttft_s) | {"ttft_slo_s": slo.ttft_s}
        met_total += round(classes[name]["slo_attainment"] * len(rows))
    overall = stats(outcomes, None)
    overall["slo_attainment"] = met_total / len(outcomes) if outcomes else 0.0
    return {"classes": classes, "overall": overall, "elapsed_s": elapsed_s, "operations": ops}


def print_table(result: dict) -> None:
    from rich.table import Table

    def f(v, fmt="{:.3f}"):
        return "-" if v is None else fmt.format(v)

    t = Table(title="QLM demo results")
    for col in ("SLO class", "TTFT SLO", "requests", "SLO attainment", "TTFT p50 s", "TTFT p99 s", "tokens",
                "throughput tok/s", "errors"):
        t.add_column(col, justify="left" if col == "SLO class" else "right")
    rows = list(result["classes"].items()) + [("overall", result["overall"])]
    for name, s in rows:
        t.add_row(name, f(s.get("ttft_slo_s"), "{:g}s"), str(s["requests"]), f"{100 * s['slo_attainment']:.1f}%",
                  f(s["ttft_p50_s"]), f(s["ttft_p99_s"]), str(s["tokens"]), f(s["throughput_tok_s"], "{:.1f}"),
                  str(s["errors"]))
    con = console()
    con.print(t)
    ops = ", ".join(f"{k}={v}" for k, v in sorted(result["operations"].items())) or "none"
    su = result["setup"]
    con.print(f"operations used: {ops}")
    con.print(f"setup: {su['requests']} requests of {su['trace']} over {su['window_s']:.0f}s, "
              f"{su['interactive_share']:.0%} interactive, {su['workers']} CPU workers, models "
              f"{', '.join(su['models'])}, policy {su['policy']}, seed {su['seed']}, through {su['api']}; "
              f"wall time {su['total_wall_s']}s")
