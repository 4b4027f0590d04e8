"""The plan: the only thing that crosses from a scheduling policy to the mechanism
that carries it out (controller actuation, or the simulator)."""

from __future__ import annotations

from dataclasses import dataclass, field
from itertools import count, repeat

from qlmserve.operations.ops import Operation


@dataclass
class Plan:
    # worker_id -> group ids in the order that worker serves them (head first)
    virtual_queues: dict[str, list[str]] = field(default_factory=dict)
    # operations to carry out now, in order (e.g. SwapOut before LoadModel on one worker)
    operations: list[Operation] = field(default_factory=list)
    # which policy/method produced it: "qlm-chance", "qlm-saa", "edf", "fcfs", "fallback-edf", "last-plan"
    source: str = "empty"
    # wall seconds the policy spent building it
    solve_time_s: float = 0.0
    # group_id -> predicted fraction of its requests that meet their SLO under this plan
    predicted_attainment: dict[str, float] = field(default_factory=dict)
    # objective value of the program when one was solved
    objective: float | None = None
    # why a fallback was taken ("timeout", "infeasible", ...), empty when none
    note: str = ""
    # whether latency-sensitive requests take room on any worker before best-effort work
    # (controller/dispatch.py): set by policies whose order puts them first
    latency_sensitive_first: bool = False
    # whether a best-effort request already past its deadline (its first token cannot come
    # in time) waits behind every on-time request of its worker's queue (controller/
    # dispatch.py): set by policies that serve hopeless work last (planner.drop_hopeless)
    late_last: bool = False

    @classmethod
    def make_empty(cls) -> Plan:
        return cls()

    def queue_of(self, group_id: str) -> str | None:
        for worker_id, groups in self.virtual_queues.items():
            if group_id in groups:
                return worker_id
        return None

    def placement(self) -> dict[str, tuple[str, int]]:
        """group_id -> (worker_id, position in its virtual queue)."""
        out: dict[str, tuple[str, int]] = {}
        for wid, q in self.virtual_queues.items():  # read every tick, thousands of groups at depth
            out.update(zip(q, zip(repeat(wid), count())))
        return out

    def ops_for(self, worker_id: str) -> list[Operation]:
        return [op for op in self.operations if op.worker_id == worker_id]
