"""The contract every scheduling policy implements: a pure function of a snapshot."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar

from qlmserve.controller.policies.horizon import planning_head
from qlmserve.controller.policy import PolicyConfig
from qlmserve.controller.snapshot import ClusterSnapshot
from qlmserve.controller.solve_budget import SolveClock, WallSolveClock
from qlmserve.operations.plan import Plan


class SchedulingPolicy(ABC):
    """`solve(snapshot) -> Plan`. A policy may keep state between ticks (the last plan, for
    warm starts and hysteresis) but never touches Redis, gRPC or the clock; the time a
    solve may take comes from its SolveClock (wall time live, modelled work in the
    simulator: controller/solve_budget.py)."""

    name: ClassVar[str]
    # Whether deep queues are planned by their head only (controller/policies/horizon.py):
    # for policies that order by deadline, whose tails would keep their order anyway.
    plans_a_head: ClassVar[bool] = False

    def __init__(self, config: PolicyConfig, clock: SolveClock | None = None) -> None:
        self.config = config
        self.clock: SolveClock = clock or WallSolveClock()

    def charge_bookkeeping(self, snapshot: ClusterSnapshot) -> None:
        """Count the per-group work every solve does around its estimator (placement,
        operations, the plan's fields)."""
        self.clock.meter.charge("group", len(snapshot.groups))
        self.clock.meter.charge("worker", len(snapshot.workers))

    @abstractmethod
    def solve(self, snapshot: ClusterSnapshot) -> Plan:
        """Return the virtual queues and the operations to carry out now."""

    def needs_replan(self, snapshot: ClusterSnapshot, last_plan: Plan) -> bool:
        """Whether this tick must solve, or `last_plan`'s queues still hold. A policy that can
        tell (QLM's estimator predicts no new violation) saves the solve; by default, solve."""
        return True

    def observe(self, snapshot: ClusterSnapshot) -> None:
        """Called every tick with the whole snapshot (a deep queue not yet cut to its
        planning head): a policy that learns from what it sees (QLM's arrival history)
        records it here."""

    def next_plan(self, snapshot: ClusterSnapshot, last_solved: Plan | None) -> tuple[Plan, bool]:
        """The plan of this tick and whether it was solved: a fresh solve, or the last solved
        plan's queues kept (source "kept", no operations: those were carried out already).
        Either way the plan's solve_time_s is what this call took on the policy's clock.
        A policy that `plans_a_head` plans only the head of deep queues (horizon.py)."""
        t0 = self.clock.now()
        self.clock.meter.charge("tick")
        self.observe(snapshot)
        head = planning_head(snapshot, last_solved) if self.plans_a_head else None
        if head is not None:
            snapshot = head.snapshot
        if last_solved is not None and not self.needs_replan(snapshot, last_solved):
            queues = last_solved.virtual_queues
            if head is not None:
                live = {g.group_id for g in snapshot.groups}
                queues = {wid: list(filter(live.__contains__, q)) for wid, q in queues.items()}
            plan = Plan(virtual_queues=queues, source="kept",
                        latency_sensitive_first=last_solved.latency_sensitive_first,
                        late_last=last_solved.late_last,
                        predicted_attainment=last_solved.predicted_attainment)
            solved = False
        else:
            plan, solved = self.solve(snapshot), True
        if head is not None:
            plan = head.extend(plan)
        plan.solve_time_s = self.clock.now() - t0
        return plan, solved

    def operation_enabled(self, name: str) -> bool:
        """Whether the policy file allows an operation (evict, kv_swap, model_swap, ...)."""
        return name in self.config.planner.operations
