"""`qlm bench`: every policy, with and without operations, at several loads, on one trace.

For each scenario (qlmserve/bench/scenarios.py) the benchmark
  1. measures the fleet's capacity: model-aware FCFS without operations at a saturating
     load; capacity = output tokens produced per second during the arrival window;
  2. for each load (offered / measured capacity), builds the workload from the trace
     (arrival times scaled, the scaled trace replayed in a loop over a fixed window,
     classes and models drawn from the seed) and replays it through every policy, with
     operations on and off, on the simulator (qlmserve/sim), until every request is done;
  3. prints one table (policy x load), writes the same as JSON, and saves PNG plots.

Nothing is tuned per policy: every run sees the same arrivals, lengths and fleet.
"""

from __future__ import annotations

import argparse
import importlib
import json
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from qlmserve.bench.fluid_bound import count_bound, fluid_bound, has_prefill_bound, mix_capacity, prefill_bound
from qlmserve.bench.load_search import find_load, parse_target
from qlmserve.bench.scenarios import SCENARIOS, Scenario
from qlmserve.bench.tables import (
    POLICIES,
    _round,
    evaluate_targets,
    print_setup,
    print_table,
    print_targets,
    provenance,
)
from qlmserve.controller.policies import policy_names
from qlmserve.sim.driver import SimOptions, Simulation
from qlmserve.sim.metrics import ops_used, summarize
from qlmserve.sim.request import SimStatus
from qlmserve.traces import Trace, WorkloadSpec, build_workload, describe_workload, load_trace, resolve_trace_path

# Other `qlm bench <name>` commands: modules with `register_bench(bench_subparsers)`.
BENCH_MODULES = ["qlmserve.bench.calibrate", "qlmserve.bench.live", "qlmserve.bench.chaos", "qlmserve.bench.overload",
                 "qlmserve.bench.prefix_dispatch", "qlmserve.bench.relay"]


@dataclass(frozen=True)
class Job:
    scenario: str
    trace_path: str
    policy: str
    operations: bool
    load: float  # offered / capacity
    multiplier: float  # trace rate multiplier that offers `load`
    workers: int
    window_s: float
    seed: int
    tick_ms: float
    output_mean: float
    output_std: float
    drain_s: float | None
    charge_solve_time: bool = False


@lru_cache(maxsize=4)
def _trace(path: str) -> Trace:
    return load_trace(path)


def scenario_workload(sc: Scenario, trace: Trace, multiplier: float, window_s: float, seed: int):
    return build_workload(trace, WorkloadSpec(
        class_mix=sc.class_mix, model_mix=sc.model_mix, load=multiplier, window_s=window_s,
        max_context=sc.max_context(), seed=seed))


def bounds(sc: Scenario, trace: Trace, multiplier: float, workers: int, window_s: float, seed: int,
           mix: dict) -> dict:
    """The fluid and count bounds (bench/fluid_bound.py) of the workload at this multiplier."""
    wl = scenario_workload(sc, trace, multiplier, window_s, seed)
    return {"fluid": fluid_bound(sc, window_s, sum(r.output_tokens for r in wl) / window_s, mix),
            "count": count_bound(sc, workers, window_s, wl, mix)}


def output_stats(sc: Scenario, trace: Trace, seed: int) -> tuple[float, float, float]:
    """Mean and std of output tokens, mean prompt tokens, after clipping to the models' context."""
    wl = scenario_workload(sc, trace, 1.0, None, seed)  # type: ignore[arg-type]
    out = np.array([r.output_tokens for r in wl], dtype=float)
    return float(out.mean()), float(out.std()), float(np.mean([r.prompt_tokens for r in wl]))


def estimate_capacity_req_s(sc: Scenario, workers: int, prompt_mean: float, out_mean: float) -> float:
    """A first guess from the cost model (used only to pick a saturating load to measure at)."""
    fleet = sc.fleet(workers)
    total = 0.0
    for w in fleet.workers:
        p = w.models[w.initial_model].profile
        b = w.max_batch_size
        step = p.decode_step_time(b, int(b * (prompt_mean + out_mean / 2)))
        total += 1.0 / (p.prefill_time(int(prompt_mean)) + out_mean * step / b)
    return total


def measure_capacity(sc: Scenario, trace: Trace, workers: int, window_s: float, seed: int, tick_ms: float,
                     out_mean: float, out_std: float, prompt_mean: float) -> dict:
    est = estimate_capacity_req_s(sc, workers, prompt_mean, out_mean)
    mult = 2.5 * est / trace.rate
    w = min(window_s, 180.0)
    wl = scenario_workload(sc, trace, mult, w, seed)
    cfg = sc.policy("fcfs", False, out_mean, out_std, tick_ms, window_s=window_s)
    res = Simulation(cfg, sc.fleet(workers), wl, policy_name="fcfs",
                     options=SimOptions(drain_s=5.0, probe_times=(w,))).run()
    tokens = res.tokens_at.get(w, 0)
    tok_s = tokens / w
    return {"method": "model-aware FCFS without operations at 2.5x the cost-model estimate, "
                      f"output tokens produced in the first {w:.0f} s",
            "output_tok_s": tok_s, "req_s": tok_s / out_mean, "estimate_req_s": est}


def run_job(job: Job) -> dict:
    sc = SCENARIOS[job.scenario]
    trace = _trace(job.trace_path)
    wl = scenario_workload(sc, trace, job.multiplier, job.window_s, job.seed)
    cfg = sc.policy(job.policy, job.operations, job.output_mean, job.output_std, job.tick_ms, window_s=job.window_s)
    last = max(r.arrival for r in wl)
    res = Simulation(cfg, sc.fleet(job.workers), wl, policy_name=job.policy,
                     options=SimOptions(drain_s=job.drain_s, charge_solve_time=job.charge_solve_time,
                                        probe_times=(last,))).run()
    s = summarize(res)
    # Throughput under load: output tokens produced while requests still arrive, per
    # second. The run's figure (drain included) also counts the drain after the last
    # arrival, where a few long requests decide the end (worth +-1% between equally good
    # schedulers); this one depends on which requests were started by then.
    s["loaded_tok_s"] = res.tokens_at.get(last, 0) / last if last > 0 else 0.0
    s["ops_used"] = ops_used(s)
    s.update(scenario=job.scenario, operations=job.operations, load=job.load, multiplier=job.multiplier)
    # TTFT CDF per class (101 quantiles, censored at the end for unserved requests)
    cdf = {}
    for cls in sc.class_mix:
        ttfts = [(r.first_token_at if r.first_token_at is not None else res.end_time) - r.arrival
                 for r in res.requests if r.slo_class == cls]
        if ttfts:
            cdf[cls] = [float(x) for x in np.percentile(ttfts, np.linspace(0, 100, 101))]
    s["ttft_quantiles"] = cdf
    s["ls_within_reach"] = ls_within_reach(sc, job.workers, res.requests)
    be = [c for c in sc.class_mix if c != sc.ls_class]
    s["be_output_tok_s"] = sum(s["classes"][c]["output_tokens_per_s"] for c in be if c in s["classes"])
    return s


def ls_within_reach(sc: Scenario, workers: int, requests) -> dict | None:
    """Latency-sensitive attainment over the requests whose own prefill, alone on an idle
    worker of the fleet, fits in their TTFT target (issue 12: on prompt-heavy traces some
    LS prompts cannot meet a 2 s target whatever the scheduler does)."""
    if not sc.ls_class:
        return None
    profiles = sc.model_profiles(workers)
    slo = sc.classes_for(sc.window_s)[sc.ls_class]["ttft_s"]
    ls = [r for r in requests if r.slo_class == sc.ls_class]
    reach = [r for r in ls if profiles[r.model].prefill_time(r.prompt_tokens) <= slo]
    missed = [r for r in reach if r.first_token_at is None or r.first_token_at - r.arrival > slo]
    # Each miss within reach, for the question the figure raises: where did its time go?
    misses = [{"request": r.rid, "prompt_tokens": r.prompt_tokens,
               "own_prefill_s": round(profiles[r.model].prefill_time(r.prompt_tokens), 3),
               "dispatch_wait_s": None if r.first_dispatch_at is None else round(r.first_dispatch_at - r.arrival, 3),
               "ttft_s": None if r.first_token_at is None else round(r.first_token_at - r.arrival, 3),
               "worker": r.worker_id} for r in missed[:50]]
    return {"requests": len(ls), "within_reach": len(reach), "out_of_reach": len(ls) - len(reach),
            "attainment": (len(reach) - len(missed)) / len(reach) if reach else None, "misses": misses}


# ---------------------------------------------------------------------------------------
# Reporting
# ---------------------------------------------------------------------------------------

def _csv(text: str, conv=str) -> list:
    return [conv(x.strip()) for x in text.split(",") if x.strip()]


def run_scenario(sc: Scenario, args: argparse.Namespace, console, progress) -> dict:
    trace_path = resolve_trace_path(args.trace or sc.trace, args.traces_dir)
    trace = _trace(str(trace_path))
    workers = args.workers or sc.workers
    window = args.window or sc.window_s
    loads = tuple(_csv(args.loads, float)) if args.loads else sc.loads
    known = set(policy_names())
    wanted = _csv(args.policies) if args.policies else list(POLICIES)
    missing = [p for p in wanted if p not in known]
    policies = [p for p in wanted if p in known]
    ops_modes = [m == "on" for m in _csv(args.ops)]
    out_mean, out_std, prompt_mean = output_stats(sc, trace, args.seed)
    cap_task = progress.add_task(f"[{sc.key}] measuring capacity", total=1)
    cap = measure_capacity(sc, trace, workers, window, args.seed, args.tick_ms, out_mean, out_std, prompt_mean)
    mix = mix_capacity(sc, cap["output_tok_s"], lambda one: measure_capacity(
        one, trace, workers, window, args.seed, args.tick_ms, *output_stats(one, trace, args.seed))["output_tok_s"])
    progress.update(cap_task, completed=1)
    searches = []
    if getattr(args, "find_load", None):
        found = []
        for spec in _csv(args.find_load):
            policy, ops, target = parse_target(spec)

            def attainment_at(ld: float, policy=policy, ops=ops) -> float:
                return run_job(Job(sc.key, str(trace_path), policy, ops, ld, ld * cap["req_s"] / trace.rate, workers,
                                   window, args.seed, args.tick_ms, out_mean, out_std, args.drain,
                                   args.charge_solve_time))["attainment"]

            def report(st, policy=policy, ops=ops, target=target) -> None:
                console.print(f"  [{sc.key}] load search {policy} (ops {'on' if ops else 'off'}) -> {target:.0%}: "
                              f"load {st.load:.3f}: {100 * st.attainment:.1f}%")

            ld, steps = find_load(attainment_at, target, report=report)
            found.append(ld)
            searches.append({"baseline": policy, "operations": ops, "target": target, "load": ld,
                             "steps": [{"load": st.load, "attainment": st.attainment} for st in steps]})
        loads = tuple(sorted(set(found) | (set(_csv(args.loads, float)) if args.loads else set())))
    jobs = []
    for ld in loads:
        mult = ld * cap["req_s"] / trace.rate
        for p in policies:
            for ops in ops_modes:
                jobs.append(Job(sc.key, str(trace_path), p, ops, ld, mult, workers, window, args.seed, args.tick_ms,
                                out_mean, out_std, args.drain, args.charge_solve_time))
    task = progress.add_task(f"[{sc.key}] {len(jobs)} runs", total=len(jobs))
    runs: list[dict] = []
    t0 = time.perf_counter()
    if args.jobs > 1:
        with ProcessPoolExecutor(max_workers=args.jobs) as ex:
            futs = {ex.submit(run_job, j): j for j in jobs}
            for fut in as_completed(futs):
                j = futs[fut]
                runs.append(fut.result())
                progress.update(task, advance=1, description=f"[{sc.key}] done {j.policy} ops={j.operations} "
                                                             f"load={j.load:.2f}")
                _log_run(console, runs[-1], len(runs), len(jobs))
    else:
        for j in jobs:
            progress.update(task, description=f"[{sc.key}] {j.policy} ops={'on' if j.operations else 'off'} "
                                              f"load={j.load:.2f}")
            runs.append(run_job(j))
            progress.update(task, advance=1)
            _log_run(console, runs[-1], len(runs), len(jobs))
    sample = scenario_workload(sc, trace, loads[0] * cap["req_s"] / trace.rate, window, args.seed)
    setup = {
        "scenario": sc.key, "title": sc.title, "notes": sc.notes,
        "trace": str(trace_path), "trace_requests": len(trace.records), "trace_rate_req_s": trace.rate,
        "trace_real_arrivals": trace.real_arrivals,
        "fleet": sc.fleet(workers).describe(), "workers": workers, "max_batch_size": sc.max_batch_size,
        "classes": sc.classes_for(window), "class_mix": sc.class_mix, "model_mix": sc.model_mix,
        "window_s": window, "seed": args.seed, "tick_interval_ms": args.tick_ms,
        "planner_clock": "wall (depends on the machine)" if args.charge_solve_time else
                         "modelled work, charged (deterministic: controller/solve_budget.py)",
        "load_method": "arrival times of the trace divided by a rate multiplier; the scaled trace replayed back to "
                       "back over the window; load = offered output tokens/s / measured capacity",
        "drain": "every run continues after the window until all requests finish"
                 + (f" (at most {args.drain} s)" if args.drain is not None else ""),
        "output_tokens_mean": out_mean, "output_tokens_std": out_std, "prompt_tokens_mean": prompt_mean,
        "capacity": cap, "mix_capacity": mix,
        "fluid_bound": {f"{ld:.4f}": bounds(sc, trace, ld * cap["req_s"] / trace.rate, workers, window, args.seed, mix)
                        for ld in loads} if mix else None,
        "prefill_bound": {f"{ld:.4f}": prefill_bound(sc, workers, window, scenario_workload(
            sc, trace, ld * cap["req_s"] / trace.rate, window, args.seed)) for ld in loads}
        if has_prefill_bound(sc) else None,
        "policies": policies, "policies_missing": missing, "load_search": searches,
        "operations": ["on" if m else "off" for m in ops_modes],
        "workload_at_lowest_load": describe_workload(sample),
        "wall_s": time.perf_counter() - t0,
        "code": provenance(),
        "metrics": "SLO attainment: TTFT within the class target (unserved = missed); throughput under load: "
                   "output tokens produced up to the last arrival / that time; throughput (run) and goodput: "
                   "output tokens / run length (drain included), goodput counting requests that met their SLO; "
                   "TTFT percentiles count unserved requests at their wait when the run ended.",
    }
    return {"setup": setup, "runs": runs, "targets": evaluate_targets(sc, runs)}


def _log_run(console, s: dict, done: int, total: int) -> None:
    """One line per finished run when the output is not a terminal (logs show progress)."""
    if console.is_terminal:
        return
    console.print(f"[{done}/{total}] scenario {s['scenario']} load {s['load']:.2f} {s['policy']} "
                  f"ops={'on' if s['operations'] else 'off'}: SLO {100 * s['attainment']:.1f}% "
                  f"({s['requests']} requests, {s['sim_wall_s']:.0f} s wall)")


def _console():
    """A rich console; wide when writing to a file or pipe so that the table keeps its columns."""
    import sys

    from rich.console import Console

    return Console() if sys.stdout.isatty() else Console(width=250)


def cmd_bench(args: argparse.Namespace) -> int:
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from qlmserve.bench.plots import plot_attainment, plot_ttft_cdf

    console = _console()
    keys = list(SCENARIOS) if args.scenario == "all" else _csv(args.scenario)
    bad = [k for k in keys if k not in SCENARIOS]
    if bad:
        console.print(f"[red]unknown scenario(s) {bad}; valid: {', '.join(SCENARIOS)}, all[/red]")
        return 2
    if args.quick:
        args.window = args.window or 90.0
        args.loads = args.loads or "0.8,1.2,1.6"
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    results = {}
    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                  TimeElapsedColumn(), console=console, transient=False) as progress:
        for k in keys:
            results[k] = run_scenario(SCENARIOS[k], args, console, progress)
    for k, res in results.items():
        sc = SCENARIOS[k]
        print_setup(console, res["setup"])
        print_table(console, sc, res["runs"])
        print_targets(console, res["targets"])
        stem = out_dir / f"scheduling-{k}"
        stem.with_suffix(".json").write_text(json.dumps(res, indent=1, default=_round))
        pngs = [plot_attainment(sc, res, f"{stem}-attainment.png"), plot_ttft_cdf(sc, res, f"{stem}-ttft-cdf.png")]
        console.print(f"  wrote {stem}.json, {', '.join(str(p) for p in pngs if p)}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    """Merge result files of one scenario (e.g. extra loads run later) and report them as one."""
    from qlmserve.bench.plots import plot_attainment, plot_ttft_cdf

    console = _console()
    results = [json.loads(Path(f).read_text()) for f in args.files]
    keys = {r["setup"]["scenario"] for r in results}
    if len(keys) != 1:
        console.print(f"[red]the files hold different scenarios: {sorted(keys)}[/red]")
        return 2
    sc = SCENARIOS[keys.pop()]
    merged: dict[tuple, dict] = {}
    for r in results:
        for run in r["runs"]:
            merged[(run["policy"], run["operations"], run["load"])] = run  # later files win
    setup = dict(results[0]["setup"])
    setup["merged_from"] = [str(f) for f in args.files]
    setup["capacity_per_file"] = [r["setup"]["capacity"] for r in results]
    res = {"setup": setup, "runs": list(merged.values())}
    res["targets"] = evaluate_targets(sc, res["runs"])
    print_setup(console, setup)
    caps = ", ".join(f"{c['req_s']:.2f}" for c in setup["capacity_per_file"])
    console.print(f"  merged from {', '.join(setup['merged_from'])} (capacities {caps} req/s)")
    print_table(console, sc, res["runs"])
    print_targets(console, res["targets"])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"scheduling-{sc.key}"
    stem.with_suffix(".json").write_text(json.dumps(res, indent=1, default=_round))
    pngs = [plot_attainment(sc, res, f"{stem}-attainment.png"), plot_ttft_cdf(sc, res, f"{stem}-ttft-cdf.png")]
    console.print(f"  wrote {stem}.json, {', '.join(str(p) for p in pngs)}")
    return 0


def cmd_sim(args: argparse.Namespace) -> int:
    """One simulation run on a fleet file, with its timing: for scale checks."""
    from qlmserve.controller.policy import load_policy
    from qlmserve.sim.fleet import load_fleet

    console = _console()
    fleet = load_fleet(args.fleet)
    trace = load_trace(resolve_trace_path(args.trace, args.traces_dir))
    if args.policy_file:
        cfg = load_policy(args.policy_file)
    else:
        sc = SCENARIOS[args.scenario]
        out = np.array([min(r.output_tokens, 4096) for r in trace.records], dtype=float)
        registered = args.policy if args.policy in policy_names() else "fcfs"
        cfg = sc.policy(registered, args.ops == "on", float(out.mean()), float(out.std()), args.tick_ms,
                        models=fleet.models)
    if args.class_mix:
        class_mix = {k: float(v) for k, _, v in (x.partition("=") for x in _csv(args.class_mix))}
    else:
        class_mix = {c: 1.0 for c in cfg.slo_classes}
    wl = build_workload(trace, WorkloadSpec(class_mix=class_mix, model_mix={m: 1.0 for m in fleet.models},
                                            load=args.load, window_s=args.window, max_context=fleet.max_context(),
                                            seed=args.seed))
    console.print(f"fleet {fleet.describe()}; {describe_workload(wl)}")
    t0 = time.perf_counter()
    last = [t0]

    def progress(now: float, done: int, total: int) -> None:
        if time.perf_counter() - last[0] > 10:
            last[0] = time.perf_counter()
            console.print(f"  sim t={now:.0f}s finished {done}/{total} wall {last[0] - t0:.0f}s")

    scheduler = None
    if args.policy == "least-queued":  # the simulator's own trivial policy (no estimator)
        from qlmserve.sim.trivial import LeastQueuedPolicy

        scheduler = LeastQueuedPolicy(cfg)
    res = Simulation(cfg, fleet, wl, policy_name=args.policy, scheduler=scheduler,
                     options=SimOptions(progress=progress, charge_solve_time=args.charge_solve_time,
                                        drain_s=args.drain)).run()
    s = summarize(res)
    s["ops_used"] = ops_used(s)
    console.print_json(json.dumps(s, default=_round))
    waiting = sum(1 for r in res.requests if r.arrival <= res.end_time and r.status == SimStatus.WAITING)
    console.print(f"{waiting} requests waiting at the end (t={res.end_time:.0f} s)")
    console.print(f"simulated {res.end_time:.0f} s of {len(fleet.workers)} workers, {len(wl)} requests, in "
                  f"{res.wall_s:.1f} s wall ({sum(res.solve_times):.1f} s in the planner, {res.ticks} ticks)")
    if args.json:
        Path(args.json).write_text(json.dumps(s, indent=1, default=_round))
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("bench", help="scheduling benchmark on the simulator (and other benchmarks)",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scenario", default="a", help=f"comma list of {', '.join(SCENARIOS)}, or all (default a)")
    p.add_argument("--loads", help="comma list of loads relative to measured capacity (default: per scenario)")
    p.add_argument("--policies", help=f"comma list (default: {','.join(POLICIES)})")
    p.add_argument("--ops", default="on,off", help="operations on, off, or on,off (default)")
    p.add_argument("--workers", type=int, help="workers (default: per scenario)")
    p.add_argument("--window", type=float, help="arrival window in seconds (default: per scenario)")
    p.add_argument("--drain", type=float, help="stop this long after the last arrival (default: when all finish)")
    p.add_argument("--trace", help="trace file (default: the scenario's, from --traces-dir)")
    p.add_argument("--traces-dir", help="folder of the public traces (default: ../shared/traces, falling back to "
                                        "the bundled Azure slice)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tick-ms", type=float, default=100.0, help="controller tick interval (default 100)")
    p.add_argument("--jobs", type=int, default=1, help="runs in parallel processes (default 1)")
    p.add_argument("--charge-solve-time", action="store_true",
                   help="plan on the wall clock and charge the planner's measured time: results then depend on the "
                        "machine and its load (default: modelled work, charged; the same on any machine)")
    p.add_argument("--out", default="out/bench", help="folder for JSON and PNG (default out/bench)")
    p.add_argument("--quick", action="store_true", help="short window and three loads")
    p.add_argument("--find-load", metavar="POLICY=ATTAINMENT[,...]",
                   help="find the load where a baseline meets this attainment (e.g. fcfs=0.5,fcfs=0.9; "
                        "POLICY+ops=... with operations on) by bisection, print the search, and run every "
                        "policy there (with --loads too, if given)")
    p.set_defaults(func=cmd_bench)
    sub = p.add_subparsers(dest="bench_command", metavar="BENCH")
    s = sub.add_parser("sim", help="one simulation on a fleet file, with timing (scale check)")
    s.add_argument("--fleet", default="configs/fleet-64xA100.yaml")
    s.add_argument("--trace", default="azure2023_conv.csv")
    s.add_argument("--traces-dir")
    s.add_argument("--policy", default="edf", help="a registered policy, or least-queued (the simulator's "
                                                   "trivial policy, to time the simulator alone)")
    s.add_argument("--policy-file", help="policy YAML (default: the scenario's classes and models)")
    s.add_argument("--scenario", default="a", help="scenario whose classes the policy uses (default a)")
    s.add_argument("--class-mix", help="e.g. interactive=1,batch-1=1,batch-2=1 (default: equal)")
    s.add_argument("--ops", default="on", choices=["on", "off"])
    s.add_argument("--load", type=float, default=1.0, help="trace rate multiplier")
    s.add_argument("--window", type=float, default=3600.0)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--tick-ms", type=float, default=100.0)
    s.add_argument("--drain", type=float, help="stop this long after the last arrival (default: when all finish; "
                                               "0: at the last arrival, with what still waits counted)")
    s.add_argument("--json", help="write the summary here")
    s.add_argument("--charge-solve-time", action="store_true",
                   help="plan on the wall clock (machine-dependent results; default: modelled work)")
    s.set_defaults(func=cmd_sim)
    r = sub.add_parser("report", help="merge result files of one scenario and print/plot them as one")
    r.add_argument("files", nargs="+", help="scheduling-<scenario>.json files; later files win on equal runs")
    r.add_argument("--out", default="out/bench/merged")
    r.set_defaults(func=cmd_report)
    for name in BENCH_MODULES:
        try:
            mod = importlib.import_module(name)
        except ImportError:
            continue
        mod.register_bench(sub)

