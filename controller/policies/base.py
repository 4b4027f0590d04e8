"""The contract every scheduling policy implements: a pure function of a snapshot."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar

from qlmserve.controller.policy import PolicyConfig
from qlmserve.controller.snapshot import ClusterSnapshot
from qlmserve.operations.plan import Plan


class SchedulingPolicy(ABC):
    """`solve(snapshot) -> Plan`. A policy may keep state between ticks (the last plan, for
    warm starts and hysteresis) but never touches Redis, gRPC or the clock."""

    name: ClassVar[str]

    def __init__(self, config: PolicyConfig) -> None:
        self.config = config

    @abstractmethod
    def solve(self, snapshot: ClusterSnapshot) -> Plan:
        """Return the virtual queues and the operations to carry out now."""

    def operation_enabled(self, name: str) -> bool:
        """Whether the policy file allows an operation (evict, kv_swap, model_swap, ...)."""
        return name in self.config.planner.operations
