"""`qlm bench calibrate`: is the RWT estimator's predicted wait calibrated?

Replays a scenario on the simulator. The first time a group appears in a plan, the
estimator's `predict_group_wait(snapshot, plan.virtual_queues, group)` (the predicted
TTFT of its oldest request, as a distribution) is recorded; when that request gets its
first token the actual wait is known. A calibrated estimator has the actual wait under
its beta-quantile a share beta of the time. Requests still without a first token at the
end are reported as censored and left out.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass

import numpy as np

from qlmserve.bench.scenarios import SCENARIOS
from qlmserve.controller.estimator import WaitEstimate, predict_group_wait
from qlmserve.controller.policies import policy_names
from qlmserve.controller.snapshot import ClusterSnapshot
from qlmserve.operations.plan import Plan
from qlmserve.sim.driver import SimOptions, Simulation
from qlmserve.traces import resolve_trace_path


@dataclass
class Prediction:
    group_id: str
    slo_class: str
    head: str  # request id of the group's oldest request when predicted
    at: float
    estimate: WaitEstimate
    position: int  # index of the group in its virtual queue


class PredictionRecorder:
    """A plan observer for the simulator: one prediction per group, at its first plan."""

    def __init__(self) -> None:
        self.predictions: dict[str, Prediction] = {}

    def __call__(self, sim: Simulation, snap: ClusterSnapshot, plan: Plan) -> None:
        groups = {g.group_id: g for g in snap.groups}
        for queue in plan.virtual_queues.values():
            for pos, gid in enumerate(queue):
                if gid in self.predictions or gid not in groups:
                    continue
                g = groups[gid]
                est = predict_group_wait(snap, plan.virtual_queues, gid)
                self.predictions[gid] = Prediction(gid, g.slo_class, g.request_ids[0], snap.now, est, pos)


def calibration(recorder: PredictionRecorder, sim: Simulation, betas: list[float]) -> dict:
    rows = []
    censored = 0
    for p in recorder.predictions.values():
        r = sim.by_id[p.head]
        if r.first_token_at is None:
            censored += 1
            continue
        rows.append((p, r.first_token_at - p.at))

    def block(sel: list) -> dict:
        if not sel:
            return {"groups": 0}
        actual = np.array([a for _, a in sel])
        mean = np.array([p.estimate.mean_s for p, _ in sel])
        out = {"groups": len(sel), "mae_s": float(np.abs(actual - mean).mean()),
               "mean_actual_s": float(actual.mean()), "mean_predicted_s": float(mean.mean())}
        for b in betas:
            q = np.array([p.estimate.quantile(b) for p, _ in sel])
            out[f"under_q{b:g}"] = float((actual <= q + 1e-9).mean())
        return out

    res = {"all": block(rows), "censored": censored}
    for cls in sorted({p.slo_class for p, _ in rows}):
        res[cls] = block([x for x in rows if x[0].slo_class == cls])
    res["queued_behind_others"] = block([x for x in rows if x[0].position > 0])
    return res


def cmd_calibrate(args: argparse.Namespace) -> int:
    from rich.table import Table

    from qlmserve.bench.scheduling import _console, _trace, measure_capacity, output_stats, scenario_workload

    console = _console()
    sc = SCENARIOS[args.scenario]
    policy = args.policy or ("qlm" if "qlm" in policy_names() else "edf")
    trace_path = resolve_trace_path(args.trace or sc.trace, args.traces_dir)
    trace = _trace(str(trace_path))
    workers = args.workers or sc.workers
    out_mean, out_std, prompt_mean = output_stats(sc, trace, args.seed)
    cap = measure_capacity(sc, trace, workers, args.window, args.seed, args.tick_ms, out_mean, out_std, prompt_mean)
    betas = [float(b) for b in args.betas.split(",")]
    results = []
    for load in [float(x) for x in args.loads.split(",")]:
        mult = load * cap["req_s"] / trace.rate
        wl = scenario_workload(sc, trace, mult, args.window, args.seed)
        cfg = sc.policy(policy, args.ops == "on", out_mean, out_std, args.tick_ms)
        rec = PredictionRecorder()
        t0 = time.perf_counter()
        sim = Simulation(cfg, sc.fleet(workers), wl, policy_name=policy, options=SimOptions(observers=[rec]))
        sim.run()
        res = calibration(rec, sim, betas)
        res.update(load=load, wall_s=time.perf_counter() - t0)
        results.append(res)
    console.print(f"[bold]RWT calibration[/bold], scenario {sc.key} ({sc.title}); policy {policy}, operations "
                  f"{args.ops}; fleet {sc.fleet(workers).describe()}; trace {trace_path.name}; window "
                  f"{args.window:.0f} s; seed {args.seed}; capacity {cap['req_s']:.2f} req/s (measured). One "
                  "prediction per group at its first plan: predicted TTFT of its oldest request.")
    table = Table(header_style="bold")
    for col in ["load", "subset", "groups"] + [f"actual <= q{b:g}" for b in betas] + ["MAE s", "mean actual s",
                                                                                       "mean predicted s"]:
        table.add_column(col, justify="right")
    for res in results:
        for key, blk in res.items():
            if not isinstance(blk, dict) or not blk.get("groups"):
                continue
            table.add_row(f"{res['load']:.2f}", key, str(blk["groups"]),
                          *[f"{100 * blk[f'under_q{b:g}']:.1f}%" for b in betas],
                          f"{blk['mae_s']:.2f}", f"{blk['mean_actual_s']:.2f}", f"{blk['mean_predicted_s']:.2f}")
        table.add_section()
    console.print(table)
    console.print(f"censored (no first token by the end): {[r['censored'] for r in results]}")
    if args.json:
        from pathlib import Path

        Path(args.json).write_text(json.dumps({"scenario": sc.key, "policy": policy, "capacity": cap,
                                               "results": results}, indent=1))
    return 0


def register_bench(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("calibrate", help="how often a group's actual wait fell under the predicted quantile")
    p.add_argument("--scenario", default="a")
    p.add_argument("--policy", help="default: qlm when registered, else edf")
    p.add_argument("--ops", default="on", choices=["on", "off"])
    p.add_argument("--loads", default="0.8,1.2", help="comma list, relative to measured capacity")
    p.add_argument("--workers", type=int)
    p.add_argument("--window", type=float, default=180.0)
    p.add_argument("--trace")
    p.add_argument("--traces-dir")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tick-ms", type=float, default=100.0)
    p.add_argument("--betas", default="0.5,0.9,0.99")
    p.add_argument("--json", help="write the results here")
    p.set_defaults(func=cmd_calibrate)
