"""Stage 4 of the NOTE, after the program: a local search with the exact estimator that
corrects what the program's linearisation got wrong."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import replace

from qlmserve.controller.estimator import GroupForecast
from qlmserve.controller.policies.qlm.decision import Decision, Score
from qlmserve.controller.policies.qlm.program_build import Built
from qlmserve.controller.policies.qlm.tick import Tick

# Repair tries every position in queues up to this long, else a few (_repair_positions).
REPAIR_ALL_POSITIONS = 4
# Repair time per program group still missing on a partial program (see policy.py on
# how HiGHS and repair share a tick).
REPAIR_S_PER_MISS = 0.3e-3


def repair_positions(tick: Tick, gid: str, q: list[str]) -> Iterable[int]:
    """Where repair tries `gid` in queue `q`: everywhere in a short queue; else the head,
    the tail and around its deadline position (the program's order), which is where
    the linearisation's errors move a group."""
    if len(q) <= REPAIR_ALL_POSITIONS:
        return range(len(q) + 1)
    dl = tick.groups[gid].deadline
    at = next((k for k, h in enumerate(q) if tick.groups[h].deadline > dl), len(q))
    return sorted({0, max(0, at - 1), at, min(len(q), at + 1), len(q)})


def repair(tick: Tick, d: Decision, d_score: Score, built: Built, deadline: float, floor_s: float = 0.0) -> Decision:
    """Local search with the exact estimator, while time is left: move a program group
    (those that miss first, most valuable first) to the position on one of its candidate
    workers that raises the objective most; repeat until no move helps. It corrects
    what the program's linearisation got wrong (free slots, variance tangents, order).
    `d_score` is d's score: a worker's forecasts are evaluated again only once its
    queue changes. It stops at `deadline`, or on a partial program after
    REPAIR_S_PER_MISS per group that may move (at least `floor_s`)."""
    ctx = built.ctx
    clock = tick.policy.clock
    cleared = {wid for wid, c in d.changes.items() if c.clear is not None}
    cands: dict[str, list[str]] = {}
    for pr in ctx.program.pairs:
        cands.setdefault(ctx.group_ids[pr.gi], []).append(ctx.worker_ids[pr.wj])
    queues = {wid: list(q) for wid, q in d.queues.items()}
    prot = tick.effective_protected(d)
    where = {gid: wid for wid, q in queues.items() for gid in q}

    def worker_score(wid: str, q: list[str]) -> tuple[float, float, dict[str, GroupForecast]]:
        if not q:
            return 0.0, 0.0, {}
        fc = tick.fc.evaluate({wid: q}, prot, cleared)
        s = tick.score_forecasts(fc, 0.0)
        return s.primary, s.expected, fc

    def gain(new: tuple, old: tuple) -> tuple[float, float]:
        return new[0] - old[0], new[1] - old[1]

    by_worker: dict[str, dict[str, GroupForecast]] = {}
    for gid, f in d_score.forecasts.items():
        by_worker.setdefault(f.worker_id, {})[gid] = f
    current: dict[str, tuple[float, float, dict[str, GroupForecast]]] = {}

    def score_of(wid: str) -> tuple[float, float, dict[str, GroupForecast]]:
        if wid not in current:
            fc = by_worker.get(wid, {})
            s = tick.score_forecasts(fc, 0.0)
            current[wid] = (s.primary, s.expected, fc)
        return current[wid]

    exhaustive = ctx.full
    first = True
    improved = True
    while improved and clock.now() < deadline:
        improved = False
        meets = {}
        for g in ctx.group_ids:
            f = score_of(where[g])[2].get(g) if g in where else None
            meets[g] = f.meets(tick.beta) if f is not None else True
        # Small instances: every group may move (a local optimum); else those missing.
        movable = ctx.group_ids if exhaustive else [g for g in ctx.group_ids if not meets[g]]
        if first and not exhaustive:
            deadline = min(deadline, clock.now() + max(floor_s, REPAIR_S_PER_MISS * len(movable)))
        first = False
        for gid in sorted(movable, key=lambda g: (meets[g], -tick.value[g], g)):
            if clock.now() >= deadline:
                break
            src = where[gid]
            src_q = [h for h in queues[src] if h != gid]
            src_new = worker_score(src, src_q)
            best, best_gain = None, (1e-9, 1e-9)
            for wid in cands.get(gid, []):
                q = src_q if wid == src else queues.get(wid, [])
                for pos in repair_positions(tick, gid, q):
                    if clock.now() >= deadline:
                        break
                    trial = q[:pos] + [gid] + q[pos:]
                    if wid == src and trial == queues[src]:
                        continue
                    new = worker_score(wid, trial)
                    if wid == src:
                        g = gain(new, score_of(src))
                    else:
                        g1, g2 = gain(new, score_of(wid)), gain(src_new, score_of(src))
                        g = (g1[0] + g2[0], g1[1] + g2[1])
                    if g[0] > best_gain[0] + 1e-9 or (g[0] > best_gain[0] - 1e-9 and g[1] > best_gain[1]):
                        best, best_gain = (wid, trial, new), g
            if best is not None and best_gain[0] >= -1e-9:
                wid, trial, new = best
                if wid != src:
                    queues[src] = src_q
                    current[src] = src_new
                queues[wid] = trial
                current[wid] = new
                where[gid] = wid
                improved = True
    return replace(d, queues=queues)
