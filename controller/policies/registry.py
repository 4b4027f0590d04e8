"""Policies by name: the YAML `planner.policy` value is a key here."""

from __future__ import annotations

from qlmserve.controller.policies.base import SchedulingPolicy
from qlmserve.controller.policy import PolicyConfig
from qlmserve.controller.solve_budget import SolveClock

_REGISTRY: dict[str, type[SchedulingPolicy]] = {}


def register(cls: type[SchedulingPolicy]) -> type[SchedulingPolicy]:
    if cls.name in _REGISTRY:
        raise ValueError(f"policy {cls.name!r} registered twice")
    _REGISTRY[cls.name] = cls
    return cls


def policy_names() -> list[str]:
    _load_builtin()
    return sorted(_REGISTRY)


def create_policy(name: str, config: PolicyConfig, clock: SolveClock | None = None) -> SchedulingPolicy:
    """The registered policy `name`; `clock` bounds its solves (default: the wall clock)."""
    _load_builtin()
    try:
        cls = _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown policy {name!r}; valid policies: {', '.join(sorted(_REGISTRY))}") from None
    return cls(config, clock)


def _load_builtin() -> None:
    # Importing the modules registers their classes; kept lazy so that importing the
    # registry does not pull in PuLP and SciPy.
    from qlmserve.controller.policies import (  # noqa: F401
        backlog,
        engine_dispatch,
        heuristics,
        qlm,  # noqa: F401 (a package)
    )
