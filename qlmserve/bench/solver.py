"""`qlm bench-solver`: the QLM planner's time per tick as the fleet grows, and which plan
stands (the solved program, the last plan, the EDF fallback).

For each size (groups x workers) it draws a seeded random snapshot
(qlmserve/bench/instances.py), solves it cold, then runs `--ticks` ticks: the snapshot
moves on (queue heads admitted, new groups arrive back up to the size), the controller's
`needs_replan` decides, and `solve` runs when it says so. It reports the solve time
(p50/p99/max over the ticks), the cold solve, where the plans came from, and the plan's
objective against EDF's on the same snapshots (scored by the same estimator).

`--compare-methods` instead plans seeded instances with method=chance and method=saa
(and EDF) and judges every plan by exact replays of sampled output lengths
(qlmserve/bench/replay.py): the expected weight of requests that meet their TTFT target.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from collections import Counter
from pathlib import Path

import numpy as np

from qlmserve.bench.instances import InstanceSpec, advance, make_policy, random_snapshot
from qlmserve.bench.replay import gamma_sampler, replay_ttft
from qlmserve.controller.policies import create_policy
from qlmserve.controller.snapshot import ClusterSnapshot
from qlmserve.operations.batching import PreemptionMode
from qlmserve.operations.plan import Plan

DEFAULT_SIZES = "16x4,64x8,256x32,1000x128,2000x256"


def parse_sizes(text: str) -> list[tuple[int, int]]:
    out = []
    for part in text.split(","):
        g, _, w = part.strip().partition("x")
        if not g.isdigit() or not w.isdigit():
            raise ValueError(f"size {part!r} is not GROUPSxWORKERS (e.g. 256x32)")
        out.append((int(g), int(w)))
    return out


def default_budget_ms(groups: int) -> float:
    """Budgets for the per-tick targets (p50 < 20 ms / p99 < 100 ms at 256 x 32, < 1 s at
    2000 x 256): 50 ms up to a few hundred groups; 700 ms for thousands (the estimator's
    set-up, the EDF base and the final scoring take another ~150-250 ms there)."""
    return 50.0 if groups <= 256 else 700.0


def _pct(xs: list[float], q: float) -> float:
    return float(np.percentile(xs, q)) if xs else float("nan")


def bench_size(groups: int, workers: int, *, ticks: int, seed: int, method: str, budget_ms: float,
               load: float, edf_every: int, dump_lp: str | None = None) -> dict:
    cfg = make_policy(2, method=method, solve_budget_ms=budget_ms)
    snap = random_snapshot(cfg, InstanceSpec(groups=groups, workers=workers, load=load), seed)
    qlm = create_policy("qlm", cfg)
    if dump_lp:  # the cold snapshot's program (every group missing in the base plan at risk), as PuLP writes it
        Path(dump_lp).mkdir(parents=True, exist_ok=True)
        qlm.build_model(snap).to_pulp()[0].writeLP(str(Path(dump_lp) / f"qlm-{groups}x{workers}-seed{seed}.lp"))
    edf = create_policy("edf", cfg)
    total = sum(g.weight * g.size for g in snap.groups)
    t0 = time.perf_counter()
    plan = qlm.solve(snap)
    cold_ms = (time.perf_counter() - t0) * 1e3
    solve_ms: list[float] = []
    tick_ms: list[float] = []
    sources: Counter[str] = Counter()
    phase_ms: Counter[str] = Counter()  # summed over the ticks that solved (QlmPolicy.last_phases)
    events: Counter[str] = Counter()
    ratios: list[float] = []
    edf_ratios: list[float] = []
    dt = cfg.tick_interval_ms / 1000.0
    for t in range(1, ticks + 1):
        snap = advance(snap, cfg, plan.virtual_queues, dt, seed * 100_003 + t, target_groups=groups)
        t0 = time.perf_counter()
        need = qlm.needs_replan(snap, plan)
        t1 = time.perf_counter()
        if need:
            plan = qlm.solve(snap)
            t2 = time.perf_counter()
            solve_ms.append((t2 - t1) * 1e3)
            sources[plan.source] += 1
            for phase, ms in qlm.last_phases.ms.items():
                phase_ms[phase] += ms
            events.update(qlm.last_phases.events)
        else:
            t2 = t1
            sources["kept (no re-solve)"] += 1
        tick_ms.append((t2 - t0) * 1e3)
        if edf_every and t % edf_every == 0 and plan.objective is not None:
            total = sum(g.weight * g.size for g in snap.groups)
            ratios.append(plan.objective / total)
            edf_ratios.append(qlm.plan_value(snap, edf.solve(snap).virtual_queues) / total)
    return {
        "groups": groups, "workers": workers, "budget_ms": budget_ms, "ticks": ticks, "method": method,
        "cold_ms": cold_ms,
        "solve_ms": {"p50": _pct(solve_ms, 50), "p99": _pct(solve_ms, 99), "max": max(solve_ms, default=float("nan"))},
        "tick_ms": {"p50": _pct(tick_ms, 50), "p99": _pct(tick_ms, 99), "max": max(tick_ms, default=float("nan"))},
        "sources": dict(sources),
        "phase_ms_mean": {k: v / max(1, len(solve_ms)) for k, v in phase_ms.items()},
        "events": dict(events),
        "objective_share": statistics.fmean(ratios) if ratios else None,
        "edf_objective_share": statistics.fmean(edf_ratios) if edf_ratios else None,
    }


# ---- chance vs SAA ---------------------------------------------------------------------------


def plan_effects(policy, snapshot: ClusterSnapshot, plan: Plan) -> tuple[frozenset[str], frozenset[str]]:
    """(workers whose LS groups skip best-effort running work, workers cleared for a swap)
    under a plan, for the replay."""
    decision = getattr(policy, "last_decision", None)
    if decision is not None:
        prot = set(decision.protected)
        cleared = {wid for wid, c in decision.changes.items() if c.clear is not None}
    else:
        prot, cleared = set(), set()
        for op in plan.operations:
            if op.kind.value == "set_preemption" and op.mode == PreemptionMode.EXPERT:
                prot.add(op.worker_id)
            if op.kind.value in ("evict", "swap_out"):
                prot.add(op.worker_id)
    groups = {g.group_id: g for g in snapshot.groups}
    for w in snapshot.workers:
        if w.preemption_mode == PreemptionMode.EXPERT and any(groups[g].latency_sensitive for g in plan.virtual_queues.get(
                w.worker_id, []) if g in groups):
            prot.add(w.worker_id)
    return frozenset(prot), frozenset(cleared)


def replay_value(snapshot: ClusterSnapshot, plan: Plan, policy, draws: int, seed: int) -> float:
    """Expected weight of requests meeting their TTFT target under exact replays."""
    prot, cleared = plan_effects(policy, snapshot, plan)
    groups = {g.group_id: g for g in snapshot.groups}
    rng = np.random.default_rng(seed)
    sampler = gamma_sampler(snapshot)
    total = 0.0
    for _ in range(draws):
        ttft = replay_ttft(snapshot, plan.virtual_queues, sampler, rng, prot, cleared)
        for gid, t in ttft.items():
            g = groups[gid]
            deadline = np.asarray(g.arrivals) + g.ttft_s - snapshot.now
            total += g.weight * float((t <= deadline).sum())
    return total / draws


def compare_methods(sizes: list[tuple[int, int]], instances: int, seed: int, budget_ms: float, load: float,
                    draws: int, scenarios: int) -> dict:
    rows = []
    for groups, workers in sizes:
        for k in range(instances):
            s = seed + 1000 * k + groups
            base = make_policy(2, solve_budget_ms=budget_ms, scenarios=scenarios)
            snap = random_snapshot(base, InstanceSpec(groups=groups, workers=workers, load=load), s)
            total = sum(g.weight * g.size for g in snap.groups)
            row = {"groups": groups, "workers": workers, "seed": s}
            for name, method in (("chance", "chance"), ("saa", "saa"), ("edf", None)):
                cfg = make_policy(2, method=method or "chance", solve_budget_ms=budget_ms, scenarios=scenarios,
                                  policy="qlm" if method else "edf")
                pol = create_policy("qlm" if method else "edf", cfg)
                t0 = time.perf_counter()
                plan = pol.solve(snap)
                row[f"{name}_ms"] = (time.perf_counter() - t0) * 1e3
                row[f"{name}_source"] = plan.source
                row[name] = replay_value(snap, plan, pol, draws, s + 7) / total
            rows.append(row)
    summary = {}
    for groups, workers in sizes:
        rs = [r for r in rows if (r["groups"], r["workers"]) == (groups, workers)]
        diff = [r["saa"] - r["chance"] for r in rs]
        summary[f"{groups}x{workers}"] = {
            "instances": len(rs),
            "chance": statistics.fmean(r["chance"] for r in rs),
            "saa": statistics.fmean(r["saa"] for r in rs),
            "edf": statistics.fmean(r["edf"] for r in rs),
            "saa_minus_chance": statistics.fmean(diff),
            "saa_minus_chance_se": statistics.stdev(diff) / len(diff) ** 0.5 if len(diff) > 1 else float("nan"),
            "saa_wins": sum(d > 1e-9 for d in diff), "chance_wins": sum(d < -1e-9 for d in diff),
            "chance_ms_p50": _pct([r["chance_ms"] for r in rs], 50),
            "saa_ms_p50": _pct([r["saa_ms"] for r in rs], 50),
            "saa_sources": dict(Counter(r["saa_source"] for r in rs)),
            "chance_sources": dict(Counter(r["chance_source"] for r in rs)),
        }
    return {"rows": rows, "summary": summary}


# ---- CLI ---------------------------------------------------------------------------------------


def _console():
    import sys

    from rich.console import Console

    return Console() if sys.stdout.isatty() else Console(width=200)


def _setup(args: argparse.Namespace) -> dict:
    return {"seed": args.seed, "load": args.load, "cpu_count": os.cpu_count(), "python": platform.python_version(),
            "machine": platform.machine(), "instances": "qlmserve.bench.instances.random_snapshot (2 models, "
            "3 classes: interactive 2 s / standard 10 s / batch 120 s)"}


def cmd_bench_solver(args: argparse.Namespace) -> int:
    from rich.table import Table

    console = _console()
    sizes = parse_sizes(args.sizes)
    out: dict = {"setup": _setup(args)}
    if args.calibrate:
        from qlmserve.bench.solve_calibration import run as calibrate

        cal_sizes = sizes if args.sizes != DEFAULT_SIZES else [(16, 4), (64, 8), (256, 32), (1000, 128)]
        out["calibration"] = calibrate(console, cal_sizes, list(range(args.seed, args.seed + 3)), args.ticks,
                                       args.load, args.budget_ms)
    elif args.compare_methods:
        sizes = parse_sizes(args.sizes) if args.sizes != DEFAULT_SIZES else [(16, 4), (64, 8)]
        res = compare_methods(sizes, args.instances, args.seed, args.budget_ms or 200.0, args.load, args.draws,
                              args.scenarios)
        out["compare_methods"] = res
        table = Table(title="chance vs SAA: expected share of request weight meeting its TTFT (exact replays)",
                      header_style="bold")
        for col in ("size", "n", "chance", "saa", "edf", "saa - chance (se)", "wins saa/chance",
                    "p50 ms chance/saa", "saa sources"):
            table.add_column(col, justify="right")
        for key, s in res["summary"].items():
            table.add_row(key, str(s["instances"]), f"{s['chance']:.3f}", f"{s['saa']:.3f}", f"{s['edf']:.3f}",
                          f"{s['saa_minus_chance']:+.3f} ({s['saa_minus_chance_se']:.3f})",
                          f"{s['saa_wins']}/{s['chance_wins']}",
                          f"{s['chance_ms_p50']:.0f}/{s['saa_ms_p50']:.0f}",
                          ", ".join(f"{k}:{v}" for k, v in s["saa_sources"].items()))
        console.print(table)
    else:
        rows = []
        table = Table(title=f"QLM planner time per tick ({args.method}, {args.ticks} ticks after a cold solve, "
                            f"load {args.load}, seed {args.seed})", header_style="bold")
        for col in ("groups x workers", "budget ms", "cold ms", "solve p50", "solve p99", "solve max",
                    "tick p50", "tick p99", "plans (source: ticks)", "objective / EDF"):
            table.add_column(col, justify="right")
        for groups, workers in sizes:
            budget = args.budget_ms or default_budget_ms(groups)
            r = bench_size(groups, workers, ticks=args.ticks, seed=args.seed, method=args.method, budget_ms=budget,
                           load=args.load, edf_every=args.edf_every, dump_lp=args.dump_lp)
            rows.append(r)
            obj = "-" if r["objective_share"] is None else \
                f"{r['objective_share']:.3f} / {r['edf_objective_share']:.3f}"
            table.add_row(f"{groups} x {workers}", f"{budget:g}", f"{r['cold_ms']:.0f}",
                          f"{r['solve_ms']['p50']:.1f}", f"{r['solve_ms']['p99']:.1f}", f"{r['solve_ms']['max']:.1f}",
                          f"{r['tick_ms']['p50']:.1f}", f"{r['tick_ms']['p99']:.1f}",
                          ", ".join(f"{k}: {v}" for k, v in sorted(r["sources"].items())), obj)
        out["curve"] = rows
        console.print(table)
        if args.phases:
            phases = ["estimator", "base", "edf base", "risk", "program", "highs", "repair", "operations"]
            ptable = Table(title="where a solve's time went: mean ms per solve (ticks that solved), and what happened",
                           header_style="bold")
            for col in ["groups x workers", *phases, "events (ticks)"]:
                ptable.add_column(col, justify="right")
            for r in rows:
                means = (f"{r['phase_ms_mean'].get(p, 0.0):.1f}" for p in phases)
                ptable.add_row(f"{r['groups']} x {r['workers']}", *means,
                               ", ".join(f"{k}: {v}" for k, v in sorted(r["events"].items())))
            console.print(ptable)
    if args.json:
        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(out, indent=1))
        console.print(f"wrote {path}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench-solver", help="QLM planner: solve time per tick vs fleet size; chance vs SAA")
    p.add_argument("--sizes", default=DEFAULT_SIZES, help=f"comma list of GROUPSxWORKERS (default {DEFAULT_SIZES})")
    p.add_argument("--ticks", type=int, default=30, help="ticks per size after the cold solve (default 30)")
    p.add_argument("--method", default="chance", choices=["chance", "saa"])
    p.add_argument("--budget-ms", type=float,
                   help="solve budget (default: 50 ms up to 256 groups, 700 ms above; 200 ms with --compare-methods)")
    p.add_argument("--load", type=float, default=1.0, help="queued work / what the fleet serves in 2 s (default 1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--edf-every", type=int, default=5, help="score EDF's plan every N ticks (0: never)")
    p.add_argument("--compare-methods", action="store_true", help="chance vs SAA plans judged by exact replays")
    p.add_argument("--instances", type=int, default=12, help="instances per size for --compare-methods")
    p.add_argument("--draws", type=int, default=100, help="replays per plan for --compare-methods")
    p.add_argument("--scenarios", type=int, default=16, help="SAA scenarios for --compare-methods")
    p.add_argument("--phases", action="store_true", help="also print where each size's solve time went")
    p.add_argument("--calibrate", action="store_true",
                   help="fit the modelled cost of the planner's work units (deterministic mode) to this machine")
    p.add_argument("--dump-lp", metavar="DIR", help="write each size's cold-start program as a PuLP .lp file here")
    p.add_argument("--json", default="out/bench-solver.json", help="write results here (default out/bench-solver.json)")
    p.set_defaults(func=cmd_bench_solver)
