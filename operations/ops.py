"""LLM serving operations (LSOs) as data: what to do, to which request, model or
worker. Nothing here talks to a network; the controller turns them into worker
commands at the edge (controller/service/convert.py), the simulator applies them
to simulated workers.

What an operation costs is modelled where the planner weighs it against the SLO time it
buys: lost and recomputed work in controller/policies/op_rules.py (victim_cost_s,
protection_cost_s), model loads and drains in the RWT estimator, all from the worker's
WorkerProfile (operations/costs.py).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Literal, Union

from qlmserve.operations.batching import PreemptionMode


class OpKind(str, enum.Enum):
    EVICT = "evict"  # stop a running request, keep its tokens, requeue it (recompute KV later)
    SWAP_OUT = "swap_out"  # KV to host memory; the request stays on the worker, paused
    SWAP_IN = "swap_in"  # KV back to the device; continues where it stopped
    LOAD_MODEL = "load_model"  # model swap: make another model the active one
    WARM_MODEL = "warm_model"  # warm start: keep a model's weights in host RAM
    DROP_WARM = "drop_warm"  # release a warm copy
    MOVE_GROUP = "move_group"  # load balancing: a group changes virtual queue
    SET_PREEMPTION = "set_preemption"  # expert-level preemption on/off for a worker


@dataclass(frozen=True)
class Evict:
    worker_id: str
    request_ids: tuple[str, ...]
    reason: str = ""
    kind: OpKind = OpKind.EVICT


@dataclass(frozen=True)
class SwapOut:
    worker_id: str
    request_ids: tuple[str, ...]
    reason: str = ""
    kind: OpKind = OpKind.SWAP_OUT


@dataclass(frozen=True)
class SwapIn:
    worker_id: str
    request_ids: tuple[str, ...]
    reason: str = ""
    kind: OpKind = OpKind.SWAP_IN


@dataclass(frozen=True)
class LoadModel:
    worker_id: str
    model: str
    reason: str = ""
    kind: OpKind = OpKind.LOAD_MODEL


@dataclass(frozen=True)
class WarmModel:
    worker_id: str
    model: str
    reason: str = ""
    kind: OpKind = OpKind.WARM_MODEL


@dataclass(frozen=True)
class DropWarm:
    worker_id: str
    model: str
    reason: str = ""
    kind: OpKind = OpKind.DROP_WARM


@dataclass(frozen=True)
class MoveGroup:
    group_id: str
    src_worker_id: str | None
    dst_worker_id: str
    reason: str = ""
    kind: OpKind = OpKind.MOVE_GROUP

    @property
    def worker_id(self) -> str:
        return self.dst_worker_id


@dataclass(frozen=True)
class SetPreemption:
    worker_id: str
    mode: PreemptionMode
    max_pause_s: float = 2.0
    reason: str = ""
    kind: OpKind = OpKind.SET_PREEMPTION



Operation = Union[Evict, SwapOut, SwapIn, LoadModel, WarmModel, DropWarm, MoveGroup, SetPreemption]


class Capability(str, enum.Enum):
    """What a worker's engine can carry out. A worker reports the set it supports
    (WorkerState.supported_ops); the planner never asks it for anything else."""

    EVICT = "evict"
    KV_SWAP = "kv_swap"  # swap_out / swap_in
    MODEL_SWAP = "model_swap"  # load_model
    WARM_START = "warm_start"  # warm_model / drop_warm
    ITERATION_PREEMPTION = "iteration_preemption"  # set_preemption iteration
    EXPERT_PREEMPTION = "expert_preemption"  # set_preemption expert


ALL_CAPABILITIES = frozenset(Capability)

_CAPABILITY_OF_KIND = {
    OpKind.EVICT: Capability.EVICT, OpKind.SWAP_OUT: Capability.KV_SWAP, OpKind.SWAP_IN: Capability.KV_SWAP,
    OpKind.LOAD_MODEL: Capability.MODEL_SWAP, OpKind.WARM_MODEL: Capability.WARM_START,
    OpKind.DROP_WARM: Capability.WARM_START,
}
_CAPABILITY_OF_MODE = {"iteration": Capability.ITERATION_PREEMPTION, "expert": Capability.EXPERT_PREEMPTION}


def required_capability(op: Operation) -> Capability | None:
    """The capability a worker needs to carry out `op`; None when every worker can (moving
    a group between virtual queues, switching preemption off)."""
    if isinstance(op, SetPreemption):
        return _CAPABILITY_OF_MODE.get(op.mode)
    return _CAPABILITY_OF_KIND.get(op.kind)

# Operations a worker carries out (MOVE_GROUP is carried out by the controller alone).
WORKER_OPS = (OpKind.EVICT, OpKind.SWAP_OUT, OpKind.SWAP_IN, OpKind.LOAD_MODEL,
              OpKind.WARM_MODEL, OpKind.DROP_WARM, OpKind.SET_PREEMPTION)

# The operations a policy file may enable (planner.operations).
OPERATION_NAMES = ("evict", "kv_swap", "model_swap", "warm_start", "load_balance", "preempt")
OperationName = Literal["evict", "kv_swap", "model_swap", "warm_start", "load_balance", "preempt"]
# Policy operation names -> the op kinds they allow.
OPS_BY_POLICY_NAME: dict[str, tuple[OpKind, ...]] = {
    "evict": (OpKind.EVICT,),
    "kv_swap": (OpKind.SWAP_OUT, OpKind.SWAP_IN),
    "model_swap": (OpKind.LOAD_MODEL,),
    "warm_start": (OpKind.WARM_MODEL, OpKind.DROP_WARM),
    "load_balance": (OpKind.MOVE_GROUP,),
    "preempt": (OpKind.SET_PREEMPTION,),
}
