"""The plain multi-model baseline: strict class priority (FCFS within a class), each group
on the least-loaded worker of its model, and workers following demand across models by
the backlog rule (placement.py). QLM is judged against it on multi-model fleets."""

from __future__ import annotations

import numpy as np

from qlmserve.controller.estimator import Forecaster
from qlmserve.controller.policies.base import SchedulingPolicy
from qlmserve.controller.policies.heuristics import QueueTails
from qlmserve.controller.policies.op_rules import derive_operations, rule_protection
from qlmserve.controller.policies.placement import PlacementState, backlog_rule
from qlmserve.controller.policies.registry import register
from qlmserve.controller.policy import PolicyConfig
from qlmserve.controller.snapshot import ClusterSnapshot
from qlmserve.controller.solve_budget import SolveClock
from qlmserve.operations.plan import Plan


@register
class BacklogPolicy(SchedulingPolicy):
    """Class priority, least-loaded worker of the group's model, backlog-rule model swaps
    (when model_swap is enabled). A group of a model no worker serves waits for the rule
    to give that model a worker."""

    name = "backlog"

    def __init__(self, config: PolicyConfig, clock: SolveClock | None = None) -> None:
        super().__init__(config, clock)
        self.placement = PlacementState()

    def solve(self, snapshot: ClusterSnapshot) -> Plan:
        t0 = self.clock.now()
        self.charge_bookkeeping(snapshot)
        planner = self.config.planner
        fc = Forecaster(snapshot, self.config.max_running_per_worker, self.clock.meter)
        switches = []
        if self.operation_enabled("model_swap"):
            switches = backlog_rule(snapshot, self.placement, cooldown_s=planner.switch_cooldown_s,
                                    threshold=planner.switch_backlog or self.config.max_running_per_worker)
        workers = [w for w in snapshot.workers if w.accepts_work]
        target = self.placement.targets(snapshot)
        queues: dict[str, list[str]] = {w.worker_id: [] for w in workers}
        if workers:
            tails = QueueTails(snapshot, fc, workers)
            for g in sorted(snapshot.groups, key=lambda g: (-g.priority, min(g.arrivals), g.group_id)):
                ok = np.array([target[w.worker_id] == g.model for w in workers])
                if not ok.any():
                    continue  # no worker serves its model (yet)
                i = int(np.argmin(np.where(ok, tails.start(g), np.inf)))
                tails.push(i, g.group_id)
                queues[tails.wids[i]].append(g.group_id)
        protected = rule_protection(snapshot, self.config, fc, queues)
        ops = derive_operations(snapshot, self.config, fc, queues, protected)
        return Plan(virtual_queues=queues, operations=ops, source=self.name, latency_sensitive_first=True,
                    note="; ".join(s.reason for s in switches), solve_time_s=self.clock.now() - t0)
