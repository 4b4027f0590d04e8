"""Stage 2 of the NOTE: which groups are at risk in the base decision, which are hopeless,
and where a group at risk could go (its candidate workers)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import replace

import numpy as np

from qlmserve.controller.policies.heuristics import eligible_mask
from qlmserve.controller.policies.op_rules import protection_mechanism
from qlmserve.controller.policies.qlm.decision import Decision, Score
from qlmserve.controller.policies.qlm.tick import Tick
from qlmserve.controller.snapshot import GroupState, WorkerState


def groups_at_risk(tick: Tick, d: Decision, score: Score) -> tuple[list[str], list[str]]:
    """(groups that miss in the base plan but could meet somewhere, hopeless ones)."""
    missing = [gid for gid, f in score.forecasts.items() if not f.meets(tick.beta)]
    queued = {gid for q in d.queues.values() for gid in q}
    missing += [gid for gid in tick.groups if gid not in queued]
    risky, hopeless = [], []
    for gid in missing:
        g = tick.groups[gid]
        if best_case_meets(tick, g):
            risky.append(gid)
        else:
            hopeless.append(gid)
    risky.sort(key=lambda gid: (-tick.value[gid], tick.groups[gid].deadline, gid))
    tick.hopeless = set(hopeless)
    return risky, hopeless


def candidates_of(tick: Tick, g: GroupState, k: int) -> list[WorkerState]:
    """The `k` workers where `g` could start soonest at the head of the queue (its own
    worker too); only its own worker when load balancing is off."""
    start = tick.heads.start(g)
    ok = eligible_mask(tick.heads, g, "model_swap" in tick.ops, start)
    t = np.where(ok, start, np.inf)
    if not np.isfinite(t).any():
        return []
    own = tick.windex.get(g.worker_id) if g.worker_id is not None else None
    if "load_balance" not in tick.ops and own is not None and np.isfinite(t[own]):
        return [tick.live[own]]
    k = min(k, int(np.isfinite(t).sum()))
    top = np.argpartition(t, k - 1)[:k] if k < len(t) else np.arange(len(t))
    top = sorted((int(i) for i in top if np.isfinite(t[i])), key=lambda i: (t[i], tick.live[i].worker_id))
    if own is not None and own not in top and np.isfinite(t[own]):
        top.append(own)
    return [tick.live[i] for i in top]


def best_case_meets(tick: Tick, g: GroupState) -> bool:
    """Whether `g` keeps a fair chance (at least 1 - beta) of meeting its SLO at the head
    of one of its two best workers (with protection or a cleared batch where those
    are possible); if not it is hopeless."""
    gw = tick.fc.groups[g.group_id]
    # Judged per request at both ends of the group (its TTFT and its slack both grow along
    # it, so one of the ends is the most favourable): a group whose oldest requests are
    # late but whose newest can still meet is not hopeless.
    first, last = gw.slack_s[0], gw.slack_s[-1]
    if max(first, last) <= 0:
        return False
    for w in candidates_of(tick, g, 2):
        for protect, cleared in ((False, False), (True, False), (False, True)):
            if protect and protection_mechanism(tick.cfg, w) is None:
                continue
            if cleared and not tick.can_clear(w):
                continue
            t = tick.fc.cursor(w.worker_id, protect, cleared).timing(gw)
            if max(t.first.prob_within(first), t.last.prob_within(last)) >= 1.0 - tick.beta:
                return True
    return False


def hopeless_last(tick: Tick, d: Decision, hopeless: Iterable[str]) -> Decision:
    """drop_hopeless: groups that cannot meet their SLO anywhere go to the tail."""
    hs = set(hopeless)
    queues = {}
    for wid, q in d.queues.items():
        keep = [gid for gid in q if gid not in hs]
        late = sorted((gid for gid in q if gid in hs), key=lambda gid: (tick.groups[gid].deadline, gid))
        queues[wid] = keep + late
    return replace(d, queues=queues)
