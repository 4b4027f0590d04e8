"""The planning head: at depth, a policy plans a bounded head of each virtual queue; the
groups behind it wait in the order the last plan gave them (issue 13).

The rule (`planning_head`), used by SchedulingPolicy.next_plan for the policies that set
`plans_a_head`, so the controller and the simulator apply it alike:
  - the head holds the first HEAD_PER_WORKER groups of each worker's queue in the last
    plan, every group of a worker that no longer takes work, and each new group (not in
    the last plan) whose deadline comes before the earliest deadline still ahead in the
    tails (an interactive arrival, a requeued group);
  - the tail of each queue keeps the rest in its order; a new group with a later deadline
    joins the tail of the worker (serving its model) with the fewest requests in its tail;
  - the policy plans the head as it would plan everything (`Head.extend` puts the tails
    back behind it). The head refills from the tail as its groups start.
Below 2 x the head's size everything is planned, exactly as before.

Why it holds: a worker serves its head before its tail, so no head group's predicted TTFT
depends on the tail; and tail groups have later deadlines than the new ones planned ahead
of them, the order EDF and QLM's base plan give. What a tail group cannot get is a move
before it reaches the head (QLM may then still place it anywhere). Measured with
`qlm bench-depth --workers 8` (load average ~8 on the 2-core machine): the QLM planner's
p50 at 1,586 groups (100,000 waiting) took 294 ms planning everything, against 12 ms at
19 groups (1,000 waiting).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from itertools import compress
from operator import attrgetter

from qlmserve.controller.snapshot import ClusterSnapshot
from qlmserve.operations.plan import Plan

# Groups of each worker's queue the policy plans (a group is up to max_group_size
# requests: 4 of 64 are several batches of work per worker), and at least MIN_HEAD in all.
# MIN_HEAD 32 cost scenario b (3 workers, 4 models; `qlm bench --scenario b --loads 1.2`)
# 18 points (81.8% against 100%, 158 model loads against 76): with a few workers the
# head held too little of the other models' work, and groups reaching it from the tails
# pulled workers back and forth between models. 64 gives 100% and the same 76 loads.
HEAD_PER_WORKER = 4
MIN_HEAD = 64

_GROUP_ID = attrgetter("group_id")
_REQUEST_IDS = attrgetter("request_ids")
_DEADLINE = attrgetter("deadline")


@dataclass(frozen=True)
class Head:
    snapshot: ClusterSnapshot  # the head groups only
    tails: dict[str, list[str]]  # worker -> group ids behind its head, in order

    def extend(self, plan: Plan) -> Plan:
        """The head's plan with each worker's tail behind its head."""
        if not self.tails:
            return plan
        queues = {wid: list(q) for wid, q in plan.virtual_queues.items()}
        for wid, tail in self.tails.items():
            queues.setdefault(wid, []).extend(tail)
        return replace(plan, virtual_queues=queues)


def planning_head(snapshot: ClusterSnapshot, last: Plan | None) -> Head | None:
    """The head to plan, or None when everything is planned (small, or no plan yet)."""
    size = max(MIN_HEAD, HEAD_PER_WORKER * len(snapshot.workers))
    if last is None or len(snapshot.groups) <= 2 * size:
        return None
    # This runs every tick over every waiting group (~5,000 at 60,000 waiting): the passes
    # over all groups are set operations and map() over C functions, not Python loops.
    groups = snapshot.by_group_id
    taking = {w.worker_id: w for w in snapshot.workers if w.accepts_work}
    head: set[str] = set()
    tails: dict[str, list[str]] = {}
    for wid, q in last.virtual_queues.items():
        live = list(filter(groups.__contains__, q))
        if wid not in taking:
            head.update(live)  # its groups must move: the policy places them
            continue
        head.update(live[:HEAD_PER_WORKER])
        if len(live) > HEAD_PER_WORKER:
            tails[wid] = live[HEAD_PER_WORKER:]
    new = sorted(map(groups.__getitem__, groups.keys() - head.union(*tails.values())),
                 key=lambda g: (g.deadline, g.group_id))
    # The earliest deadline still ahead in the tails, and each tail's requests.
    cutoff, now = math.inf, float(snapshot.now)  # float: its __lt__ below compares with ints too
    load: dict[str, int] = {}
    for wid, t in tails.items():
        gs = list(map(groups.__getitem__, t))
        load[wid] = sum(map(len, map(_REQUEST_IDS, gs)))
        cutoff = min(cutoff, min(filter(now.__lt__, map(_DEADLINE, gs)), default=math.inf))
    for g in new:
        cands = [wid for wid, w in taking.items() if w.can_serve(g.model)]
        if g.deadline < cutoff or not cands:
            head.add(g.group_id)
            continue
        wid = min(cands, key=lambda w: (load.get(w, 0), w))
        tails.setdefault(wid, []).append(g.group_id)
        load[wid] = load.get(wid, 0) + g.size
    in_head = map(head.__contains__, map(_GROUP_ID, snapshot.groups))
    return Head(replace(snapshot, groups=tuple(compress(snapshot.groups, in_head))), tails)
