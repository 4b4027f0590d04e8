"""`qlm bench-solver --calibrate`: fit the modelled cost of the planner's work units
(controller/solve_budget.py UNIT_S) to this machine's wall time, and show how well the
constants in the code model it.

It runs the QLM planner (and the EDF baseline) on the wall clock over the same moving
instances as `qlm bench-solver`, records every phase of every solve (wall milliseconds
and the units of work counted in it), and fits the cost of each unit by non-negative
least squares over those phases. It prints the fitted costs beside UNIT_S, and per
phase the wall time against the time UNIT_S models for it: the ratio the deterministic
mode's budget is off by on this machine. Run it on an idle machine.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np
from scipy.optimize import nnls

from qlmserve.bench.instances import InstanceSpec, advance, make_policy, random_snapshot
from qlmserve.controller.policies import create_policy
from qlmserve.controller.solve_budget import UNIT_S, WallSolveClock


def observe(sizes: list[tuple[int, int]], seeds: list[int], ticks: int, load: float,
            budget_ms: float | None) -> list[tuple[str, float, dict[str, float]]]:
    """(phase, wall seconds, units) of every phase of every solve."""
    from qlmserve.bench.solver import default_budget_ms

    rows: list[tuple[str, float, dict[str, float]]] = []
    for groups, workers in sizes:
        for seed in seeds:
            cfg = make_policy(2, solve_budget_ms=budget_ms or default_budget_ms(groups))
            snap = random_snapshot(cfg, InstanceSpec(groups=groups, workers=workers, load=load), seed)
            qlm = create_policy("qlm", cfg, WallSolveClock())
            edf_clock = WallSolveClock()
            edf = create_policy("edf", cfg, edf_clock)
            plan = qlm.solve(snap)
            dt = cfg.tick_interval_ms / 1000.0
            for t in range(1, ticks + 1):
                snap = advance(snap, cfg, plan.virtual_queues, dt, seed * 100_003 + t, target_groups=groups)
                plan = qlm.solve(snap)
                sw = qlm.last_phases
                for phase, ms in sw.wall_ms.items():
                    rows.append((phase, ms / 1e3, dict(sw.units.get(phase, {}))))
                before = dict(edf_clock.meter.counts)
                e = edf.solve(snap)
                units = {k: v - before.get(k, 0.0) for k, v in edf_clock.meter.counts.items() if v != before.get(k)}
                rows.append(("edf solve", e.solve_time_s, units))
    return rows


def observe_simulation(window_s: float, workers: int, load: float) -> list[tuple[str, float, dict[str, float]]]:
    """(plan source, wall seconds, units) of every planner call of a short simulation run on
    the wall clock: the small, frequent ticks of a live controller (scenario b's fleet and
    classes, 8 workers), where a call's fixed costs and table builds weigh most."""
    from qlmserve.bench.scheduling import SCENARIOS, _trace, output_stats, scenario_workload
    from qlmserve.sim.driver import SimOptions, Simulation
    from qlmserve.traces import resolve_trace_path

    sc = SCENARIOS["b"]
    trace = _trace(str(resolve_trace_path(sc.trace, None)))
    out_mean, out_std, _ = output_stats(sc, trace, 0)
    rows: list[tuple[str, float, dict[str, float]]] = []
    prev: dict[str, float] = {}

    def record(sim, _snap, plan) -> None:
        counts = dict(sim.solve_clock.meter.counts)
        units = {k: v - prev.get(k, 0.0) for k, v in counts.items() if v != prev.get(k, 0.0)}
        prev.clear()
        prev.update(counts)
        if units:
            rows.append((f"sim {'kept' if plan.source == 'kept' else 'solve'}", plan.solve_time_s, units))

    cfg = sc.policy("qlm", True, out_mean, out_std)
    Simulation(cfg, sc.fleet(workers), scenario_workload(sc, trace, load, window_s, 0), policy_name="qlm",
               options=SimOptions(charge_solve_time=True, observers=[record])).run()
    return rows


def fit(rows: list[tuple[str, float, dict[str, float]]]) -> dict[str, float]:
    """Per-unit costs minimising the relative error of every observation (weights
    1 / max(wall, 1 ms)), so that the small ticks count as much as the large phases."""
    kinds = sorted(UNIT_S)
    w = np.array([1.0 / max(wall, 1e-3) for _, wall, _ in rows])
    a = np.array([[u.get(k, 0.0) for k in kinds] for _, _, u in rows]) * w[:, None]
    b = np.array([wall for _, wall, _ in rows]) * w
    x, _ = nnls(a, b)
    return dict(zip(kinds, x.tolist()))


def by_phase(rows: list[tuple[str, float, dict[str, float]]], costs: dict[str, float]) -> dict[str, tuple[float, float]]:
    """phase -> (wall seconds, modelled seconds), summed over the solves."""
    out: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])
    for phase, wall, units in rows:
        out[phase][0] += wall
        out[phase][1] += sum(n * costs[k] for k, n in units.items())
    return {k: (v[0], v[1]) for k, v in out.items()}


def run(console, sizes: list[tuple[int, int]], seeds: list[int], ticks: int, load: float,
        budget_ms: float | None) -> dict:
    from rich.table import Table

    rows = observe(sizes, seeds, ticks, load, budget_ms) + observe_simulation(60.0, 8, 3.0)
    fitted = fit(rows)
    t = Table(title="modelled cost per unit of planner work (seconds)", header_style="bold")
    for col in ("unit", "UNIT_S (in the code)", "fitted here", "units counted"):
        t.add_column(col, justify="right")
    counted: dict[str, float] = defaultdict(float)
    for _, _, u in rows:
        for k, n in u.items():
            counted[k] += n
    for k in sorted(UNIT_S):
        t.add_row(k, f"{UNIT_S[k]:.2e}", f"{fitted[k]:.2e}", f"{counted[k]:.0f}")
    console.print(t)
    t2 = Table(title=f"wall vs modelled time per phase, summed over {len(rows)} phase runs "
                     f"({', '.join(f'{g}x{w}' for g, w in sizes)}; seeds {seeds}; {ticks} ticks each)",
               header_style="bold")
    for col in ("phase", "wall s", "modelled s (UNIT_S)", "modelled / wall", "modelled s (fitted)"):
        t2.add_column(col, justify="right")
    code, here = by_phase(rows, UNIT_S), by_phase(rows, fitted)
    tot = [0.0, 0.0, 0.0]
    for phase in code:
        w, m = code[phase]
        tot[0] += w
        tot[1] += m
        tot[2] += here[phase][1]
        t2.add_row(phase, f"{w:.3f}", f"{m:.3f}", f"{m / w:.2f}" if w else "-", f"{here[phase][1]:.3f}")
    t2.add_row("all", f"{tot[0]:.3f}", f"{tot[1]:.3f}", f"{tot[1] / tot[0]:.2f}" if tot[0] else "-", f"{tot[2]:.3f}")
    console.print(t2)
    return {"fitted_unit_s": fitted, "unit_s": dict(UNIT_S),
            "phases": {k: {"wall_s": v[0], "modelled_s": v[1], "fitted_s": here[k][1]} for k, v in code.items()}}
