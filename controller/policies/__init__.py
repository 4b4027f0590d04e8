"""Scheduling policies: pure functions of a ClusterSnapshot returning a Plan."""

from qlmserve.controller.policies.base import SchedulingPolicy
from qlmserve.controller.policies.registry import create_policy, policy_names, register

__all__ = ["SchedulingPolicy", "create_policy", "policy_names", "register"]
