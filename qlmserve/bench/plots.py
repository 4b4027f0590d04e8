"""PNG plots of a scheduling benchmark (matplotlib, no display needed)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from qlmserve.bench.scenarios import Scenario  # noqa: E402

COLORS = {"qlm": "tab:red", "edf": "tab:blue", "sjf": "tab:green", "priority": "tab:purple", "fcfs": "tab:gray",
          "fcfs-oblivious": "tab:brown"}


def plot_attainment(sc: Scenario, res: dict, path: str | Path) -> Path:
    """SLO attainment (all requests) against load, one line per policy; operations on solid,
    off dashed."""
    runs = res["runs"]
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for policy in sorted({r["policy"] for r in runs}):
        for ops in (True, False):
            pts = sorted((r["load"], 100 * r["attainment"]) for r in runs if r["policy"] == policy
                         and r["operations"] == ops)
            if not pts:
                continue
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", ms=4,
                    linestyle="-" if ops else "--", color=COLORS.get(policy),
                    label=f"{policy} (ops {'on' if ops else 'off'})")
    setup = res["setup"]
    ax.set_xlabel("offered load / measured capacity")
    ax.set_ylabel("SLO attainment, % of requests")
    ax.set_ylim(-2, 102)
    ax.grid(alpha=0.3)
    ax.set_title(f"Scenario {sc.key}: {setup['fleet']}\n{Path(setup['trace']).name}, window "
                 f"{setup['window_s']:.0f} s, seed {setup['seed']}", fontsize=9)
    ax.legend(fontsize=7, ncol=2, loc="lower left")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def pick_cdf_load(res: dict) -> float:
    """The lowest load where model-aware FCFS meets at most half the SLOs, else the highest."""
    runs = res["runs"]
    loads = sorted({r["load"] for r in runs})
    for ld in loads:
        f = [r for r in runs if r["policy"] == "fcfs" and not r["operations"] and r["load"] == ld]
        if f and f[0]["attainment"] <= 0.5:
            return ld
    return loads[-1]


def plot_ttft_cdf(sc: Scenario, res: dict, path: str | Path) -> Path:
    """TTFT CDF per class at one load, one line per policy (operations on; FCFS also off)."""
    load = pick_cdf_load(res)
    runs = [r for r in res["runs"] if r["load"] == load]
    classes = list(sc.class_mix)
    fig, axes = plt.subplots(1, len(classes), figsize=(4.2 * len(classes), 3.8), squeeze=False)
    for ax, cls in zip(axes[0], classes):
        for r in sorted(runs, key=lambda r: (r["policy"], not r["operations"])):
            if not r["operations"] and r["policy"] != "fcfs":
                continue
            q = r.get("ttft_quantiles", {}).get(cls)
            if not q:
                continue
            ys = [i / (len(q) - 1) for i in range(len(q))]
            ax.plot([max(x, 1e-3) for x in q], ys, color=COLORS.get(r["policy"]),
                    linestyle="-" if r["operations"] else "--",
                    label=f"{r['policy']} (ops {'on' if r['operations'] else 'off'})")
        slo = res["setup"]["classes"][cls]["ttft_s"]
        ax.axvline(slo, color="black", linewidth=0.8, linestyle=":")
        ax.set_xscale("log")
        ax.set_xlabel("TTFT, s (dotted: SLO)")
        ax.set_title(f"{cls} (TTFT {slo:g} s)", fontsize=9)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("fraction of requests")
    axes[0][-1].legend(fontsize=7, loc="lower right")
    fig.suptitle(f"Scenario {sc.key}: TTFT CDF at load {load:.2f} x capacity", fontsize=10)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
