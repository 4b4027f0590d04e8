"""The request-level policy: in what order a group's requests are served, per SLO class.

A group is the planner's unit; the order of the requests inside it is the policy file's
choice per class (`slo_classes.<name>.request_order`):

  fcfs            arrival order (the default);
  sjf             shortest prompt first (ties by arrival): short requests do not wait
                  behind long prefills;
  priority_aging  shortest prompt first, but a request that has waited `aging_s` (the
                  class's, else `planner.aging_s`) is promoted ahead of every request not
                  yet aged, the aged ones oldest first: SJF without starvation (the
                  multi-layer MoE scheduling paper's request level).

The snapshot builder (controller/cluster_view.py, shared by the controller and the
simulator) orders each group with `order_requests`; dispatch then hands a group's
requests to workers in that order, and engines keep the queue order they are given.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeVar

from qlmserve.controller.policy import PolicyConfig, SloClass


class _Request:  # what ordering reads of a request (RequestView has these fields)
    arrival: float
    prompt_tokens: int
    generated_tokens: int
    request_id: str


R = TypeVar("R", bound=_Request)


def aging_s(slo: SloClass | None, policy: PolicyConfig) -> float:
    if slo is not None and slo.aging_s is not None:
        return slo.aging_s
    return policy.planner.aging_s


def depends_on_time(slo: SloClass | None) -> bool:
    """Whether the order may change while the group does not (aging)."""
    return slo is not None and slo.request_order == "priority_aging"


def order_requests(reqs: Sequence[R], slo: SloClass | None, policy: PolicyConfig, now: float) -> tuple[R, ...]:
    """`reqs` (oldest first) in the class's request order."""
    kind = slo.request_order if slo is not None else "fcfs"
    if kind == "fcfs" or len(reqs) < 2:
        return tuple(reqs)

    def size(r: R) -> int:
        return r.prompt_tokens + r.generated_tokens  # what it must prefill (a requeued one: its tokens too)

    if kind == "sjf":
        return tuple(sorted(reqs, key=lambda r: (size(r), r.arrival, r.request_id)))
    limit = aging_s(slo, policy)
    return tuple(sorted(reqs, key=lambda r: (0, r.arrival, r.request_id) if now - r.arrival >= limit
                        else (1, size(r), r.arrival, r.request_id)))
