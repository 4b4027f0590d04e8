"""planner.ls_fast_path: protect workers whose queue starts with latency-sensitive groups."""

from __future__ import annotations

from dataclasses import replace

from qlmserve.controller.policies.op_rules import PREEMPTION_MODES, protection_cost_s, protection_mechanism
from qlmserve.controller.policies.qlm.decision import Decision
from qlmserve.controller.policies.qlm.tick import Tick
from qlmserve.controller.snapshot import leading_latency_sensitive


def ls_fast_path(tick: Tick, d: Decision) -> Decision:
    """planner.ls_fast_path: protect every worker whose queue starts with latency-sensitive
    groups by expert-level (MoE) or iteration-level (dense) preemption: LS requests join
    beyond the batch limit and go first, no best-effort work is lost (a KV swap-out, only
    past that room, costs two copies), when that costs best-effort work no more than
    those groups' own prefill, whether or not the program needed it for their SLO."""
    protected = dict(d.protected)
    cost = d.cost
    for wid, queue in d.queues.items():
        w = tick.workers.get(wid)
        if w is None or wid in protected or not queue or not tick.groups[queue[0]].latency_sensitive:
            continue
        mech = protection_mechanism(tick.cfg, w)
        if mech not in PREEMPTION_MODES:
            continue  # eviction / KV swap alone cost best-effort throughput: only when the SLO needs it
        lead = leading_latency_sensitive(tick.groups[gid] for gid in queue)
        slots = tick.fc.workers[wid].slots
        lost = protection_cost_s(tick.cfg, w, lead, slots, mech)
        if lost > sum(tick.fc.workers[wid].prefill_s(tick.fc.groups[g.group_id].work) for g in lead):
            continue
        protected[wid] = mech
        cost += lost * tick.value_rate(w)
    return d if protected == d.protected else replace(d, protected=protected, cost=cost)
