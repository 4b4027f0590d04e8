"""`qlm bench live`: a `qlm bench` scenario on the real stack, beside what the simulator
predicts for the same fleet and arrivals.

For each policy it starts a private redis-server, the controller (`qlm serve`) and one
worker process per worker of the scenario's fleet, running the simulated engine in real
time (`qlm worker --engine sim --sim-fleet F --time-scale S`: the simulator's models,
cost profiles, KV capacity and host memory for that worker), and replays the scenario's
workload (same trace, classes, models, seed and load) through the gRPC client API
(Generate, one stream per request).

One machine stands in for the fleet by running it `--slowdown S` times slower than real
GPUs: every duration is scaled by S (the engines' cost profiles, arrivals, SLO targets,
the tick interval, the solve budget, the grouping window, the leader lease), so the live
run is the simulated one in slow motion, and its figures are reported back in the
scenario's time.
A replayed request's true output length is written into its prompt's first tokens,
which the simulated engine reads as its stopping point; the controller plans with the
max_tokens a client would send (the model's remaining context), as in the simulator.

It prints, per policy, the same figures as `qlm bench` for the live run and for the
discrete-event simulator's prediction (qlmserve/sim/driver.py) of the same run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from qlmserve.bench.load_search import SearchStep, find_load, parse_target
from qlmserve.bench.scenarios import SCENARIOS, Scenario
from qlmserve.controller.leader import LEASE_TTL_S
from qlmserve.controller.policy import PolicyConfig
from qlmserve.controller.redis_server import PrivateRedis
from qlmserve.sim.driver import SimOptions, Simulation
from qlmserve.sim.metrics import SimResult, summarize
from qlmserve.sim.request import SimRequest
from qlmserve.traces import WorkloadRequest, resolve_trace_path

DEFAULT_POLICIES = ("qlm", "fcfs", "priority", "edf")


@dataclass
class LiveOptions:
    scenario: str = "a"
    policies: tuple[str, ...] = DEFAULT_POLICIES
    load: float = 1.75  # offered load / the fleet's measured capacity (as `qlm bench`)
    workers: int | None = None  # default: the scenario's
    window_s: float = 60.0  # arrival window, scenario time
    slowdown: float = 4.0
    seed: int = 0
    operations: bool = True
    tick_ms: float = 100.0
    traces_dir: str | None = None
    out: str = "out/bench/live"
    find_load: str | None = None  # POLICY=ATTAINMENT: run at the load where the prediction meets it
    predict_only: bool = False  # the simulator's prediction alone (seconds, not the live runs' minutes)
    timeout_s: float = 3600.0  # wall limit per policy run


@dataclass
class _Outcome:
    w: WorkloadRequest
    max_tokens: int
    submitted: float = 0.0  # wall
    first_token: float | None = None
    finished: float | None = None
    tokens: int = 0
    error: str = ""


def scaled_policy(cfg: PolicyConfig, s: float) -> PolicyConfig:
    """The policy with every duration `s` times longer (its live, slowed-down form)."""
    d = cfg.model_dump()
    d["tick_interval_ms"] *= s
    for c in d["slo_classes"].values():
        c["ttft_s"] *= s
        if c.get("tpot_s") is not None:
            c["tpot_s"] *= s
    d["grouping"]["window_s"] *= s
    p = d["planner"]
    for k in ("solve_budget_ms", "aging_s", "max_pause_s", "length_half_life_s"):
        p[k] *= s
    # The simulator admits every request: so does the live controller here (no queue limits
    # or quotas), and the benchmark's client is anonymous, on loopback.
    for c in d["slo_classes"].values():
        c["admission"]["max_queued"] = 10**7
    d["overload"]["max_queued"] = 10**7
    d["access"]["anonymous_clients"] = True
    d["access"]["default_quota"] = {"max_queued": None, "max_queued_tokens": None, "tokens_per_minute": None}
    return PolicyConfig.model_validate(d)


def fleet_yaml(sc: Scenario, workers: int) -> str:
    """The scenario's fleet as a fleet file (the same WorkerSpecs as Scenario.fleet)."""
    group = {"name": "w", "count": workers, "gpu": sc.gpu, "tensor_parallel": sc.tensor_parallel,
             "models": list(sc.models), "initial_models": list(sc.initial_models), "warm_models": list(sc.warm_models),
             "max_batch_size": sc.max_batch_size, "host_ram_gb": sc.host_ram_gb}
    if sc.host_kv_gb is not None:
        group["host_kv_gb"] = sc.host_kv_gb
    return yaml.safe_dump({"name": f"{sc.key}-live", "workers": [group]})


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _qlm(*args: str) -> list[str]:
    return [sys.executable, "-m", "qlmserve.cli", *args]


async def _wait_workers(address: str, n: int, procs: list[subprocess.Popen], data_dir: Path,
                        timeout_s: float = 120.0) -> None:
    import grpc

    from qlmserve.client import QlmClient
    from qlmserve.credentials import resolve_token

    deadline = time.monotonic() + timeout_s
    last_error = "no error"
    while resolve_token(None, str(data_dir), "admin") is None:  # the controller writes it as it starts
        if time.monotonic() > deadline:
            raise TimeoutError(f"no admin token under {data_dir} within {timeout_s:.0f} s")
        await asyncio.sleep(0.1)
    async with QlmClient(address, token=resolve_token(None, str(data_dir), "admin")) as client:
        while True:
            for p in procs:
                if p.poll() is not None:
                    raise RuntimeError(f"a process exited with code {p.returncode} (see its log)")
            try:
                ws = await client.workers()
                if sum(1 for w in ws.workers if w.healthy and w.active_model) >= n:
                    return
            except grpc.aio.AioRpcError as exc:  # the controller is still starting
                last_error = f"{exc.code().name}: {exc.details()}"
            if time.monotonic() > deadline:
                raise TimeoutError(f"fewer than {n} workers connected within {timeout_s:.0f} s ({last_error})")
            await asyncio.sleep(0.2)


async def _replay(address: str, outcomes: list[_Outcome], s: float, context: dict[str, int]) -> float:
    """Every request at its arrival times s (wall); returns the replay's start (wall)."""
    from qlmserve.backends.sim_model import code_output_length
    from qlmserve.client import QlmClient, submit_request

    async with QlmClient(address) as client:
        t0 = time.perf_counter() + 0.5

        async def one(o: _Outcome) -> None:
            await asyncio.sleep(max(0.0, t0 + o.w.arrival * s - time.perf_counter()))
            code = code_output_length(o.w.output_tokens)
            ids = code + [11] * max(0, o.w.prompt_tokens - len(code))
            # A prompt shorter than the length code grows by it: keep within the context, as
            # the controller requires (it refused 3 of 1,820 requests before this).
            max_tokens = min(o.max_tokens, context[o.w.model] - len(ids))
            req = submit_request(o.w.model, prompt_token_ids=ids, slo_class=o.w.slo_class, max_tokens=max_tokens,
                                 user_id=o.w.user_id)
            o.submitted = time.perf_counter()

            def on_chunk(res, chunk) -> None:
                if res.token_ids and o.first_token is None:
                    o.first_token = time.perf_counter()
                o.tokens = len(res.token_ids)
                if chunk.finished:
                    o.finished = time.perf_counter()

            # As a production client does: one idempotency key, a broken stream resumed at
            # its offset (a stall of the loaded 2-core machine must not drop a request).
            try:
                await client.generate_reliably(req, on_chunk=on_chunk)
            except Exception as exc:  # noqa: BLE001 - counted as unserved, reported
                o.error = f"{type(exc).__name__}: {str(exc)[:200]}"

        await asyncio.gather(*(one(o) for o in outcomes))
    return t0


def run_live(sc: Scenario, policy: str, cfg: PolicyConfig, workload: list[WorkloadRequest], max_tokens: dict[str, int],
             workers: int, opts: LiveOptions, work_dir: Path) -> dict:
    """One policy on the real stack; the figures of `summarize`, in scenario time."""
    s = opts.slowdown
    work_dir.mkdir(parents=True, exist_ok=True)
    policy_file = work_dir / "policy.yaml"
    policy_file.write_text(yaml.safe_dump(json.loads(scaled_policy(cfg, s).model_dump_json())))
    fleet_file = work_dir / "fleet.yaml"
    fleet_file.write_text(fleet_yaml(sc, workers))
    data_dir = work_dir / "data"
    redis = PrivateRedis(work_dir / "redis").start()
    port = _free_port()
    address = f"127.0.0.1:{port}"
    procs: list[subprocess.Popen] = []
    logs = []
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    try:
        log = open(work_dir / "controller.log", "wb")  # noqa: SIM115 - closed below
        logs.append(log)
        # The controller writes its admin and worker tokens under the data folder; the
        # workers and this client read them there (anonymous clients are allowed on loopback).
        # The lease is a duration too: slowed down alike, a stall of the slowed controller that
        # a fleet-speed one would ride out does not cost it the lead (one controller here).
        procs.append(subprocess.Popen(_qlm("serve", "--redis", redis.url, "--policy", str(policy_file), "--port",
                                           str(port), "--data-dir", str(data_dir), "--lease-ttl",
                                           str(LEASE_TTL_S * s)),
                                      stdout=log, stderr=subprocess.STDOUT, env=env))
        for i in range(workers):
            wid = f"w-{i:03d}"
            log = open(work_dir / f"{wid}.log", "wb")  # noqa: SIM115 - closed below
            logs.append(log)
            procs.append(subprocess.Popen(_qlm("worker", "--controller", address, "--id", wid, "--engine", "sim",
                                               "--sim-fleet", str(fleet_file), "--time-scale", str(s),
                                               "--seed", str(opts.seed), "--data-dir", str(data_dir)),
                                          stdout=log, stderr=subprocess.STDOUT, env=env))
        asyncio.run(_wait_workers(address, workers, procs, data_dir))
        outcomes = [_Outcome(w, max_tokens[w.request_id]) for w in workload]
        wall0 = time.perf_counter()
        context = {m: spec.max_context for m, spec in cfg.models.items()}
        t0 = asyncio.run(asyncio.wait_for(_replay(address, outcomes, s, context), opts.timeout_s))
        wall = time.perf_counter() - wall0
    finally:
        for p in procs[1:] + procs[:1]:  # workers first, then the controller
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(15)
            except subprocess.TimeoutExpired:
                p.kill()
        for f in logs:
            f.close()
        redis.stop()
    out = summarize(_as_result(policy, cfg, outcomes, t0, s, workers, wall))
    errors = [o.error for o in outcomes if o.error]
    out["client_errors"] = {"count": len(errors), "examples": sorted(set(errors))[:5]}
    return out


def _as_result(policy: str, cfg: PolicyConfig, outcomes: list[_Outcome], t0: float, s: float, workers: int,
               wall: float) -> SimResult:
    """The live run as a SimResult in scenario time, so `summarize` judges both alike."""

    def model_time(t: float | None) -> float | None:
        return None if t is None else (t - t0) / s

    reqs = []
    for o in outcomes:
        slo = cfg.slo_classes[o.w.slo_class]
        r = SimRequest(o.w.request_id, o.w.model, o.w.slo_class, "", o.w.prompt_tokens, o.w.output_tokens,
                       o.max_tokens, o.w.arrival, slo.ttft_s, slo.tpot_s, slo.latency_sensitive, slo.priority,
                       generated=o.tokens, first_token_at=model_time(o.first_token), finished_at=model_time(o.finished))
        reqs.append(r)
    end = max((r.finished_at or r.first_token_at or r.arrival for r in reqs), default=0.0)
    return SimResult(policy=policy, requests=reqs, end_time=end, last_arrival=max(r.arrival for r in reqs),
                     solve_times=[], plan_sources={}, ops_applied={}, ops_rejected={}, ops_failed={}, requeued={},
                     ticks=0, wall_s=wall, workers=workers, solve_clock="wall")


@dataclass
class LiveReport:
    setup: dict
    runs: list[dict] = field(default_factory=list)


def run(opts: LiveOptions, console) -> LiveReport:
    from qlmserve.bench.scheduling import _trace, measure_capacity, output_stats, scenario_workload

    sc = SCENARIOS[opts.scenario]
    trace_path = resolve_trace_path(sc.trace, opts.traces_dir)
    trace = _trace(str(trace_path))
    workers = opts.workers or sc.workers
    out_mean, out_std, prompt_mean = output_stats(sc, trace, opts.seed)
    cap = measure_capacity(sc, trace, workers, opts.window_s, opts.seed, opts.tick_ms, out_mean, out_std, prompt_mean)

    def workload_at(ld: float) -> list[WorkloadRequest]:
        return scenario_workload(sc, trace, ld * cap["req_s"] / trace.rate, opts.window_s, opts.seed)

    def simulation(policy: str, workload: list[WorkloadRequest]) -> tuple[PolicyConfig, Simulation]:
        cfg = sc.policy(policy, opts.operations, out_mean, out_std, opts.tick_ms, window_s=opts.window_s)
        return cfg, Simulation(cfg, sc.fleet(workers), workload, policy_name=policy, options=SimOptions())

    load, search = opts.load, None
    if opts.find_load:  # the load where a baseline meets its target, on the simulator's prediction
        baseline, _ops, target = parse_target(opts.find_load)

        def attainment_at(ld: float) -> float:
            return summarize(simulation(baseline, workload_at(ld))[1].run())["attainment"]

        def report_step(st: SearchStep) -> None:
            console.print(f"  load search {baseline} -> {target:.0%} (predicted): load {st.load:.3f}: "
                          f"{100 * st.attainment:.1f}%")

        load, steps = find_load(attainment_at, target, report=report_step)
        search = {"baseline": baseline, "target": target, "load": load,
                  "steps": [{"load": st.load, "attainment": st.attainment} for st in steps]}
    workload = workload_at(load)
    report = LiveReport(setup={
        "scenario": sc.key, "title": sc.title, "workers": workers, "fleet": sc.fleet(workers).describe(),
        "trace": str(trace_path), "load": load, "load_search": search, "window_s": opts.window_s,
        "seed": opts.seed, "slowdown": opts.slowdown, "operations": opts.operations, "requests": len(workload),
        "capacity": cap, "classes": sc.classes_for(opts.window_s), "class_mix": sc.class_mix,
        "note": f"the live stack ran {opts.slowdown:g}x slower than the fleet's profiles, with every duration "
                f"(arrivals, SLOs, tick, solve budget, lease) scaled alike; figures are in the scenario's time"})
    with tempfile.TemporaryDirectory(prefix="qlm-live-") as tmp:
        for policy in opts.policies:
            cfg, sim = simulation(policy, workload)
            max_tokens = {r.rid: r.max_tokens for r in sim.requests}
            predicted = summarize(sim.run())
            run = {"policy": policy, "predicted": predicted}
            if opts.predict_only:
                console.print(f"[{policy}] predicted {100 * predicted['attainment']:.1f}%")
            else:
                console.print(f"[{policy}] predicted {100 * predicted['attainment']:.1f}%; running live "
                              f"({len(workload)} requests over {opts.window_s * opts.slowdown:.0f} s wall)...")
                run["live"] = run_live(sc, policy, cfg, workload, max_tokens, workers, opts, Path(tmp) / policy)
                console.print(f"[{policy}] live {100 * run['live']['attainment']:.1f}%")
            report.runs.append(run)
    return report


def print_report(console, report: LiveReport) -> None:
    from rich.table import Table

    st = report.setup
    if st.get("load_search"):
        ls = st["load_search"]
        console.print(f"  load search: {ls['baseline']} predicted at "
                      + ", ".join(f"{x['load']:.3f} -> {100 * x['attainment']:.1f}%" for x in ls["steps"])
                      + f"; chose load {ls['load']:.3f} (target {100 * ls['target']:.0f}%)")
    console.print(f"[bold]qlm bench live[/bold]: scenario {st['scenario']} ({st['title']}); {st['fleet']}; "
                  f"load {st['load']:g} of measured capacity ({st['capacity']['req_s']:.2f} req/s), "
                  f"window {st['window_s']:g} s, {st['requests']} requests, seed {st['seed']}, operations "
                  f"{'on' if st['operations'] else 'off'}")
    console.print(f"  {st['note']}")
    classes = list(st["class_mix"])
    t = Table(header_style="bold")
    for col in ("policy", "run", "SLO %", *(f"{c} %" for c in classes), "goodput tok/s", "thrpt tok/s",
                *(f"TTFT {c} p50/p99 s" for c in classes), "missed p99 s", "unserved"):
        t.add_column(col, justify="right")
    for r in report.runs:
        for kind in [k for k in ("live", "predicted") if k in r]:
            s = r[kind]
            row = [r["policy"], kind, f"{100 * s['attainment']:.1f}"]
            row += [f"{100 * (s['classes'].get(c, {}).get('attainment') or 0):.1f}" for c in classes]
            row += [f"{s['goodput_tok_s']:.0f}", f"{s['throughput_tok_s']:.0f}"]
            for c in classes:
                cc = s["classes"].get(c, {})
                row.append(f"{cc.get('ttft_p50_s', 0):.2f}/{cc.get('ttft_p99_s', 0):.2f}")
            miss = s["ttft_p99_missed_s"]
            row += ["-" if miss is None else f"{miss:.1f}",
                    str(sum(cc.get("unserved", 0) for cc in s["classes"].values()))]
            t.add_row(*row)
        t.add_section()
    console.print(t)
    for r in report.runs:
        errs = r.get("live", {}).get("client_errors") or {}
        if errs.get("count"):
            console.print(f"  {r['policy']}: {errs['count']} requests failed at the client, e.g. {errs['examples'][0]}")
    by = {r["policy"]: r for r in report.runs}
    if "qlm" in by and "live" in by["qlm"]:
        q = by["qlm"]
        gap = 100 * (q["live"]["attainment"] - q["predicted"]["attainment"])
        console.print(f"  QLM live - predicted: {gap:+.1f} points")
        if "fcfs" in by:
            lead = 100 * (q["live"]["attainment"] - by["fcfs"]["live"]["attainment"])
            console.print(f"  QLM lead over FCFS on the live stack: {lead:+.1f} points")


def cmd_live(args: argparse.Namespace) -> int:
    from qlmserve.bench.scheduling import _console

    console = _console()
    opts = LiveOptions(scenario=args.scenario, policies=tuple(p for p in args.policies.split(",") if p),
                       load=args.load, workers=args.workers, window_s=args.window, slowdown=args.slowdown,
                       seed=args.seed, operations=args.ops == "on", tick_ms=args.tick_ms, traces_dir=args.traces_dir,
                       out=args.out, find_load=args.find_load, predict_only=args.predict_only)
    report = run(opts, console)
    print_report(console, report)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"live-{opts.scenario}.json"
    path.write_text(json.dumps({"setup": report.setup, "runs": report.runs}, indent=1, default=str))
    console.print(f"  wrote {path}")
    return 0


def register_bench(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("live", help="a scenario on the real stack (Redis, controller, worker processes) beside "
                                    "the simulator's prediction")
    p.add_argument("--scenario", default="a")
    p.add_argument("--policies", default=",".join(DEFAULT_POLICIES))
    p.add_argument("--load", type=float, default=1.75, help="offered load / measured capacity (default 1.75)")
    p.add_argument("--workers", type=int, help="workers (default: the scenario's)")
    p.add_argument("--window", type=float, default=60.0, help="arrival window, scenario seconds (default 60)")
    p.add_argument("--slowdown", type=float, default=4.0,
                   help="run the fleet this many times slower than real GPUs (default 4)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--find-load", metavar="POLICY=ATTAINMENT",
                   help="search the load where POLICY's predicted attainment is ATTAINMENT (e.g. fcfs=0.5), "
                        "every step printed, and run there instead of --load")
    p.add_argument("--predict-only", action="store_true", help="print the simulator's prediction, skip the live runs")
    p.add_argument("--ops", default="on", choices=["on", "off"])
    p.add_argument("--tick-ms", type=float, default=100.0)
    p.add_argument("--traces-dir")
    p.add_argument("--out", default="out/bench/live")
    p.set_defaults(func=cmd_live)
