"""The tables of `qlm bench`: the setup it ran, one row per run (policy x load), the
targets the issues set judged from those rows, and the code the results came from."""

from __future__ import annotations

import json
import math
from pathlib import Path

from qlmserve.bench.scenarios import Scenario

POLICIES = ("qlm", "edf", "sjf", "priority", "backlog", "fcfs", "fcfs-oblivious")

def _fmt(v: float | None, nd: int = 1) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return f"{v:.{nd}f}"


def _t(v: float | None) -> str:
    if v is None:
        return "-"
    if v < 10:
        return f"{v:.2f}"
    return f"{v:.0f}"


def print_table(console, sc: Scenario, runs: list[dict]) -> None:
    from rich.table import Table

    classes = list(sc.class_mix)
    table = Table(title=f"Scenario {sc.key}: {sc.title}", show_lines=False, header_style="bold")
    for col in ("load", "policy", "ops", "SLO %"):
        table.add_column(col, justify="right" if col in ("load", "SLO %") else "left")
    for c in classes:
        table.add_column(f"{c} %", justify="right")
    if sc.ls_class:
        table.add_column(f"{sc.ls_class} within reach %", justify="right")
    table.add_column("goodput tok/s", justify="right")
    table.add_column("thrpt tok/s load/run", justify="right")
    for c in classes:
        table.add_column(f"TTFT {c} p50/p99 s", justify="right")
    table.add_column("missed p99 s", justify="right")
    table.add_column("ops used", justify="right")
    table.add_column("solve p50/p99 ms (charged)", justify="right")
    last_load = None
    for s in sorted(runs, key=lambda s: (s["load"], _policy_rank(s["policy"]), not s["operations"])):
        if last_load is not None and s["load"] != last_load:
            table.add_section()
        last_load = s["load"]
        row = [f"{s['load']:.2f}", s["policy"], "on" if s["operations"] else "off", _fmt(100 * s["attainment"])]
        row += [_fmt(100 * (s["classes"].get(c, {}).get("attainment") or 0)) for c in classes]
        if sc.ls_class:
            # LS requests whose own prefill fits their target (ls_within_reach), and how many do not
            reach = s.get("ls_within_reach") or {}
            row.append(f"{_fmt(100 * reach['attainment'])} ({reach['out_of_reach']} out)"
                       if reach.get("attainment") is not None else "-")
        row += [f"{s['goodput_tok_s']:.0f}", f"{s['loaded_tok_s']:.0f}/{s['throughput_tok_s']:.0f}"]
        for c in classes:
            cc = s["classes"].get(c, {})
            row.append(f"{_t(cc.get('ttft_p50_s'))}/{_t(cc.get('ttft_p99_s'))}")
        row += [_t(s["ttft_p99_missed_s"]), str(s["ops_used"]),
                f"{s['charged_solve_ms_p50']:.1f}/{s['charged_solve_ms_p99']:.1f}"]
        table.add_row(*row)
    console.print(table)


def _policy_rank(p: str) -> int:
    return POLICIES.index(p) if p in POLICIES else len(POLICIES)


def evaluate_targets(sc: Scenario, runs: list[dict]) -> dict:
    """The issue's targets, measured on this run (or why one cannot be judged)."""
    by = {(s["policy"], s["operations"], s["load"]): s for s in runs}
    loads = sorted({s["load"] for s in runs})
    out: dict = {}
    if not any(s["policy"] == "qlm" for s in runs):
        return {"note": "the qlm policy was not part of this run (not registered or not selected)"}

    def att(p, ops, ld):
        s = by.get((p, ops, ld))
        return None if s is None else s["attainment"]

    # 1. at the lowest load where FCFS (ops off, vLLM's default) meets <= 50%, QLM meets >= 90%
    fcfs_low = [ld for ld in loads if (att("fcfs", False, ld) or 1.0) <= 0.5]
    if fcfs_low:
        ld = fcfs_low[0]
        q = att("qlm", True, ld)
        out["qlm_at_fcfs_half"] = {"load": ld, "fcfs": att("fcfs", False, ld), "qlm": q,
                                   "target": ">= 0.90", "met": q is not None and q >= 0.9}
    else:
        out["qlm_at_fcfs_half"] = {"note": "FCFS stays above 50% at every load of this run"}
    # 2. QLM never below EDF or SJF+aging by more than 1 point (same operations setting)
    worst = None
    for ld in loads:
        for ops in (True, False):
            q = att("qlm", ops, ld)
            for p in ("edf", "sjf"):
                o = att(p, ops, ld)
                if q is None or o is None:
                    continue
                gap = o - q
                if worst is None or gap > worst["gap"]:
                    worst = {"gap": gap, "load": ld, "vs": p, "operations": ops}
    if worst is not None:
        out["qlm_vs_edf_sjf"] = {**worst, "target": "gap <= 0.01", "met": worst["gap"] <= 0.01}
    # 3. QLM throughput >= FCFS at every load. Judged on the run's figure: every policy serves
    # the same requests to the end, so the ratio is that of the times they took. The figure
    # under load sits beside it; it also depends on which requests a policy has started by
    # the last arrival (more prompts started means more prefill in the window).
    thr = []
    for ld in loads:
        q, f = by.get(("qlm", True, ld)), by.get(("fcfs", False, ld))
        if q and f:
            thr.append({"load": ld, "qlm": q["throughput_tok_s"], "fcfs": f["throughput_tok_s"],
                        "ratio": q["throughput_tok_s"] / max(f["throughput_tok_s"], 1e-9),
                        "under_load_ratio": q["loaded_tok_s"] / max(f["loaded_tok_s"], 1e-9)})
    if thr:
        out["throughput_vs_fcfs"] = {"per_load": thr, "target": "ratio >= 1.0 (within 0.5% noise)",
                                     "met": all(t["ratio"] >= 0.995 for t in thr)}
    # 4. LS TTFT p99 >= 50x lower than FCFS with BE throughput within 3%
    if sc.ls_class and sc.class_mix.get(sc.ls_class, 0) <= 0.25:
        per = []
        for ld in loads:
            q, f = by.get(("qlm", True, ld)), by.get(("fcfs", False, ld))
            if q and f:
                qp = q["classes"][sc.ls_class]["ttft_p99_s"]
                fp = f["classes"][sc.ls_class]["ttft_p99_s"]
                per.append({"load": ld, "fcfs_ls_p99_s": fp, "qlm_ls_p99_s": qp, "ratio": fp / max(qp, 1e-9),
                            "be_tok_s_ratio": q["be_output_tok_s"] / max(f["be_output_tok_s"], 1e-9)})
        if per:
            out["ls_p99_vs_fcfs"] = {"per_load": per, "target": "ratio >= 50 and BE throughput within 3%",
                                     "met": all(p["ratio"] >= 50 and abs(p["be_tok_s_ratio"] - 1) <= 0.03
                                                for p in per)}
    return out


def print_targets(console, targets: dict) -> None:
    if "note" in targets:
        console.print(f"[yellow]targets: {targets['note']}[/yellow]")
        return
    for name, t in targets.items():
        met = t.get("met")
        mark = "[green]met[/green]" if met else ("[red]not met[/red]" if met is False else "")
        body = {k: v for k, v in t.items() if k not in ("met", "per_load")}
        console.print(f"target {name}: {mark} {json.dumps(body, default=_round)}")
        for p in t.get("per_load", []):
            console.print("    " + json.dumps(p, default=_round))


def _round(x):
    return round(x, 4) if isinstance(x, float) else str(x)


# ---------------------------------------------------------------------------------------
# The command
# ---------------------------------------------------------------------------------------

def provenance() -> dict:
    """The code the results came from: commit, and files that differed from it."""
    import subprocess

    root = Path(__file__).resolve().parents[2]
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                              timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10).stdout.split("\n")
    except (OSError, subprocess.SubprocessError):
        return {"commit": None}
    return {"commit": head or None, "modified": [ln[3:] for ln in dirty if ln.strip()]}


def print_setup(console, setup: dict) -> None:
    cap = setup["capacity"]
    console.print(f"[bold]Scenario {setup['scenario']}[/bold]: {setup['title']}")
    console.print(f"  trace {setup['trace']} ({setup['trace_requests']} requests, {setup['trace_rate_req_s']:.2f} req/s"
                  f"{'' if setup['trace_real_arrivals'] else ', generated arrivals'}); fleet {setup['fleet']}, "
                  f"max batch {setup['max_batch_size']}; seed {setup['seed']}; tick {setup['tick_interval_ms']:.0f} ms")
    console.print(f"  classes {json.dumps(setup['classes'])} mix {json.dumps(setup['class_mix'], default=_round)}; "
                  f"models {json.dumps(setup['model_mix'])}")
    console.print(f"  load: {setup['load_method']}; window {setup['window_s']:.0f} s; {setup['drain']}")
    console.print(f"  measured capacity {cap['output_tok_s']:.0f} output tok/s = {cap['req_s']:.2f} req/s "
                  f"({cap['method']}); outputs {setup['output_tokens_mean']:.0f} +- {setup['output_tokens_std']:.0f} "
                  f"tokens, prompts {setup['prompt_tokens_mean']:.0f}")
    if setup.get("fluid_bound"):
        mix = setup["mix_capacity"]
        per = ", ".join(f"{m} {v:.0f}" for m, v in mix["per_model_tok_s"].items())
        bounds = ", ".join(f"load {float(ld):.3f}: {100 * b['fluid']:.1f}% (count {100 * b['count']:.1f}%)"
                           if isinstance(b, dict) else f"load {float(ld):.3f}: {100 * b:.1f}%"  # files before the count
                           for ld, b in setup["fluid_bound"].items())
        console.print(f"  fluid bound, and count bound of cheapest-first (qlmserve/bench/fluid_bound.py; fleet split by "
                      f"model shares {mix['mix_tok_s']:.0f} output tok/s, one model alone: {per}): {bounds}")
    if setup.get("prefill_bound"):
        bounds = ", ".join(f"load {float(ld):.3f}: {100 * b:.1f}%" for ld, b in setup["prefill_bound"].items())
        console.print(f"  prefill bound of cheapest-first (qlmserve/bench/fluid_bound.py; prefill seconds, interactive "
                      f"requests out of reach left out, prefix-cache hits ignored): {bounds}")
    for s in setup.get("load_search", []):
        steps = ", ".join(f"{st['load']:.3f}: {100 * st['attainment']:.1f}%" for st in s["steps"])
        console.print(f"  load search: {s['baseline']} (operations {'on' if s['operations'] else 'off'}) at "
                      f"{s['target']:.0%} -> load {s['load']:.3f} (tried {steps})")
    code = setup.get("code") or {}
    if code.get("commit"):
        mod = code.get("modified") or []
        console.print(f"  code {code['commit'][:12]}" + (f" with uncommitted changes to {', '.join(mod)}" if mod else ""))
    if setup["policies_missing"]:
        console.print(f"  [yellow]not registered, skipped: {', '.join(setup['policies_missing'])}[/yellow]")
    console.print(f"  {setup['metrics']}")
