"""The load search of `qlm bench --find-load`: the load at which a baseline meets a target
SLO attainment (model-aware FCFS without operations at 50%, say), found by bisection on
the deterministic simulator, every step printed.

Attainment falls with load (more work in the same window), so bisection on the load
between `lo` and `hi` converges; it stops once the baseline is within `tolerance` of the
target or after `max_steps` runs, and returns the load whose attainment came closest.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable


@dataclass(frozen=True)
class SearchStep:
    load: float
    attainment: float


def find_load(attainment_at: Callable[[float], float], target: float, *, lo: float = 0.5, hi: float = 4.0,
              tolerance: float = 0.02, max_steps: int = 8,
              report: Callable[[SearchStep], None] | None = None) -> tuple[float, list[SearchStep]]:
    """(the load closest to `target`, the steps tried). `hi` doubles while the baseline
    still meets more than the target there."""
    steps: list[SearchStep] = []

    def probe(ld: float) -> float:
        a = attainment_at(ld)
        step = SearchStep(round(ld, 4), a)
        steps.append(step)
        if report is not None:
            report(step)
        return a

    a_hi = probe(hi)
    while a_hi > target + tolerance and len(steps) < max_steps:
        lo, hi = hi, hi * 2
        a_hi = probe(hi)
    for _ in range(max_steps - len(steps)):
        if abs(a_hi - target) <= tolerance:
            break
        mid = (lo + hi) / 2
        a = probe(mid)
        if abs(a - target) <= tolerance:
            break
        if a > target:
            lo = mid
        else:
            hi, a_hi = mid, a
    best = min(steps, key=lambda s: (abs(s.attainment - target), s.load))
    return best.load, steps


def parse_target(text: str) -> tuple[str, bool, float]:
    """`fcfs=0.5` -> (policy, operations, attainment); `fcfs+ops=0.9` with operations on."""
    name, sep, value = text.partition("=")
    if not sep:
        raise ValueError(f"--find-load expects POLICY=ATTAINMENT (e.g. fcfs=0.5), got {text!r}")
    policy, _, ops = name.partition("+")
    if ops not in ("", "ops"):
        raise ValueError(f"--find-load: {name!r} is not POLICY or POLICY+ops")
    target = float(value)
    if not 0 < target < 1:
        raise ValueError(f"--find-load: the attainment must be in (0, 1), got {value!r}")
    return policy, ops == "ops", target


def job_at(job, load: float, multiplier: float):
    """The same run at another load (bench Job dataclasses are frozen)."""
    return replace(job, load=load, multiplier=multiplier)
