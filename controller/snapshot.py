"""A frozen picture of the cluster that every scheduling policy reads.

The controller builds it from Redis each tick; the simulator builds it from its
in-memory fleet. Policies are pure functions of it: nothing here touches Redis,
gRPC or the clock (`now` is a field, taken from the injected clock).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import cached_property

from qlmserve.controller.length_band import CLASS_WIDE, LengthKey
from qlmserve.operations.batching import DEFAULT_MAX_PREFILL_TOKENS, PreemptionMode, batch_limit
from qlmserve.operations.costs import WorkerProfile
from qlmserve.operations.ops import Capability, Operation, required_capability
from qlmserve.operations.prefix_cache import PrefixReport


@dataclass(frozen=True)
class LengthStats:
    """Output-length distribution of one (model, SLO class): what the RWT estimator learned."""

    mean: float
    var: float
    count: int  # finished requests observed (the prior counts as its pseudo-count)

    @property
    def std(self) -> float:
        return self.var**0.5


# What a (model, SLO class) with no learned or configured lengths is assumed to produce.
DEFAULT_LENGTHS = LengthStats(mean=128.0, var=128.0**2, count=0)


@dataclass(frozen=True)
class GroupState:
    """Waiting requests of one (model, SLO class) that arrived close together."""

    group_id: str
    model: str
    slo_class: str
    request_ids: tuple[str, ...]  # waiting requests, in the class's request order (fcfs: oldest first)
    arrivals: tuple[float, ...]  # arrival time of each request in request_ids (clock seconds)
    prompt_tokens: tuple[int, ...]  # prompt length of each request in request_ids
    max_tokens: tuple[int, ...]  # max_tokens of each request in request_ids
    ttft_s: float  # the class's TTFT target
    priority: int  # the class's priority
    weight: float  # the class's weight in the objective
    latency_sensitive: bool
    worker_id: str | None = None  # virtual queue it sits in now; None before its first plan
    position: int = 0  # index in that virtual queue
    created_at: float = 0.0
    # per request: its prompt's prefix block ids (() when no request has any), its session
    prefix_blocks: tuple[tuple[int, ...], ...] = ()
    sessions: tuple[str, ...] = ()
    length_band: int = 0  # its requests' prompt-length band (controller/length_band.py)

    @property
    def size(self) -> int:
        return len(self.request_ids)

    @cached_property  # policies sort and compare by it many times per tick (issue 13)
    def deadline(self) -> float:
        """When the oldest request's TTFT target runs out."""
        return min(self.arrivals) + self.ttft_s

    @property
    def total_prompt_tokens(self) -> int:
        return sum(self.prompt_tokens)

    def at(self, worker_id: str | None, position: int) -> GroupState:
        """The same group at another place in the plan. A copy of the fields (and of the
        cached deadline) without dataclasses.replace, which runs __init__ again: the
        snapshot builder moves every group behind a started one, thousands a tick at depth."""
        new = object.__new__(type(self))
        d = self.__dict__.copy()
        d["worker_id"] = worker_id
        d["position"] = position
        object.__setattr__(new, "__dict__", d)
        return new


@dataclass(frozen=True)
class RunningRequest:
    """A request a worker holds (KV on the device, or swapped to host memory)."""

    request_id: str
    group_id: str
    model: str
    slo_class: str
    prompt_tokens: int
    generated_tokens: int
    max_tokens: int
    latency_sensitive: bool
    arrival: float
    first_token_at: float | None  # None until its first token is out
    swapped: bool = False
    session: str = ""  # stickiness key (the user, or the conversation)
    length_band: int = 0  # its prompt-length band (controller/length_band.py)


@dataclass(frozen=True)
class WorkerState:
    worker_id: str
    active_model: str | None  # the model on the device
    warm_models: frozenset[str]  # weights kept in host RAM (fast swap-in)
    kv_capacity_tokens: int
    kv_used_tokens: int
    max_batch_size: int
    running: tuple[RunningRequest, ...]
    profile: WorkerProfile  # measured or calibrated cost model
    healthy: bool = True
    draining: bool = False  # takes no new work; finishes what it has
    gpu: str = "cpu"
    host_ram_models: int = 2  # how many models it may keep warm at once
    loading_model: str | None = None  # a model swap in progress
    # models this worker can hold (device memory, engine support); None = any model of the policy
    servable_models: frozenset[str] | None = None
    preemption_mode: PreemptionMode = PreemptionMode.NONE  # the mode in force
    max_prefill_tokens: int = DEFAULT_MAX_PREFILL_TOKENS  # prompt tokens one iteration of its engine prefills
    # host RAM set aside for swapped-out KV (GPU-CPU state swap); None = not limited
    host_kv_capacity_tokens: int | None = None
    host_kv_used_tokens: int = 0
    # what its engine carries out (operations.ops.Capability); None = every operation
    supported_ops: frozenset[Capability] | None = None
    prefix: PrefixReport | None = None  # its prefix cache and prefill backlog; None: not reported

    def can_serve(self, model: str) -> bool:
        return self.servable_models is None or model in self.servable_models

    def supports(self, capability: Capability | None) -> bool:
        return capability is None or self.supported_ops is None or capability in self.supported_ops

    def can_carry_out(self, op: Operation) -> bool:
        return self.supports(required_capability(op))

    @property
    def kv_free_tokens(self) -> float:
        """KV-cache tokens not in use (unbounded when the worker reports no capacity)."""
        return self.kv_capacity_tokens - self.kv_used_tokens if self.kv_capacity_tokens > 0 else float("inf")

    @property
    def active(self) -> int:
        """Requests that hold a batch slot: everything held but the swapped-out ones."""
        return sum(1 for r in self.running if not r.swapped)

    @property
    def free_slots(self) -> int:
        return max(0, self.max_batch_size - self.active)

    @property
    def ls_free_slots(self) -> int:
        """Batch slots a latency-sensitive request may take under the mode in force: beyond
        max_batch_size under ITERATION / EXPERT (operations.batching.batch_limit)."""
        return max(0, batch_limit(self.preemption_mode, True, self.max_batch_size) - self.active)

    @property
    def accepts_work(self) -> bool:
        return self.healthy and not self.draining


def leading_latency_sensitive(queue: Iterable[GroupState | None]) -> list[GroupState]:
    """The latency-sensitive groups at the head of a queue, up to its first best-effort group
    (missing groups, None, are skipped)."""
    out = []
    for g in queue:
        if g is None:
            continue
        if not g.latency_sensitive:
            break
        out.append(g)
    return out


@dataclass(frozen=True)
class ClusterSnapshot:
    now: float
    groups: tuple[GroupState, ...]
    workers: tuple[WorkerState, ...]
    # (model, slo_class, length band) -> learned output-length distribution; band 0 (CLASS_WIDE)
    # is the whole class, what a band with nothing learned yet reads
    length_stats: dict[LengthKey, LengthStats] = field(default_factory=dict)
    # model name -> weight bytes (model-swap cost)
    model_bytes: dict[str, int] = field(default_factory=dict)

    def worker(self, worker_id: str) -> WorkerState:
        for w in self.workers:
            if w.worker_id == worker_id:
                return w
        raise KeyError(worker_id)

    def group(self, group_id: str) -> GroupState:
        return self.by_group_id[group_id]

    @cached_property  # the planning head, dispatch and the policies look groups up every tick
    def by_group_id(self) -> dict[str, GroupState]:
        """group_id -> group, in the snapshot's order."""
        return {g.group_id: g for g in self.groups}

    def lengths(self, model: str, slo_class: str, band: int = CLASS_WIDE) -> LengthStats:
        st = self.length_stats.get((model, slo_class, band))
        if st is None and band != CLASS_WIDE:
            st = self.length_stats.get((model, slo_class, CLASS_WIDE))
        return DEFAULT_LENGTHS if st is None else st
