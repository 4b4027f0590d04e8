"""Request grouping: a request joins the open group of its (model, SLO class) unless
that group is older than the window or full; then a new group opens.

Pure and shared: the Redis store and the simulator both call `choose_group`.
"""

from __future__ import annotations

from dataclasses import dataclass

from qlmserve.controller.policy import GroupingConfig


@dataclass(frozen=True)
class OpenGroup:
    group_id: str
    created_at: float
    size: int


def group_key(model: str, slo_class: str) -> str:
    return f"{model}|{slo_class}"


def choose_group(open_group: OpenGroup | None, now: float, cfg: GroupingConfig) -> str | None:
    """The id of the group a new request joins, or None when a new group must open."""
    if open_group is None:
        return None
    if now - open_group.created_at > cfg.window_s or open_group.size >= cfg.max_group_size:
        return None
    return open_group.group_id
