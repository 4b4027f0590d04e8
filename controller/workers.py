"""Connected workers as the controller sees them, and the commands it sends them.

Commands are plain dataclasses; the worker-link servicer converts them to protobuf at
the edge. A worker's reported state is mirrored to Redis by the controller so that
`qlm workers` and a restarted controller see it.
"""

from __future__ import annotations

import asyncio
import itertools
from dataclasses import dataclass, field

from qlmserve.controller.cluster_view import RequestView, WorkerView
from qlmserve.operations.batching import PreemptionMode
from qlmserve.operations.costs import WorkerProfile
from qlmserve.operations.ops import Capability
from qlmserve.operations.prefix_cache import PrefixReport


@dataclass(frozen=True)
class RunCommand:
    request_id: str
    attempt: int
    model: str
    prompt_token_ids: list[int]
    generated_token_ids: list[int]
    max_tokens: int
    temperature: float
    top_p: float
    seed: int | None
    stop_token_ids: tuple[int, ...]
    latency_sensitive: bool
    priority: int


@dataclass(frozen=True)
class OpCommand:
    op_id: str
    kind: str  # evict | swap_out | swap_in | load_model | warm_model | drop_warm | set_preemption | abort | drain
    request_ids: tuple[str, ...] = ()
    model: str = ""
    mode: str = ""
    max_pause_s: float = 0.0


@dataclass
class WorkerReport:
    active_model: str | None
    warm_models: list[str]
    kv_capacity_tokens: int
    kv_used_tokens: int
    running: dict[str, tuple[int, bool]]  # request id -> (attempt, swapped)
    waiting: list[str]
    max_batch_size: int
    prefill_tokens_per_s: float
    decode_tokens_per_s: float
    device: str
    loading_model: str | None
    preemption: PreemptionMode  # the mode in force
    profile: WorkerProfile | None = None  # the engine's cost model; None: not reported
    servable_models: list[str] = field(default_factory=list)  # empty: every model of the policy
    host_ram_bytes: int = 0
    host_kv_capacity_tokens: int | None = None
    host_kv_used_tokens: int = 0
    # what its engine carries out, sorted (a tuple: the report is mirrored to Redis as JSON);
    # None: the worker did not say (every operation)
    supported_ops: tuple[Capability, ...] | None = None
    # its prefix cache (operations/prefix_cache.py): block size (0: none reported), the block
    # ids it reported, its prefill backlog net of cache hits
    prefix_block_tokens: int = 0
    prefix_blocks: tuple[int, ...] = ()
    queued_prefill_tokens: int = 0
    expert_activations: tuple[tuple[int, ...], ...] = ()  # MoE: per layer, per expert, since its model loaded


_op_ids = itertools.count(1)


def next_op_id() -> str:
    return f"op{next(_op_ids)}"


@dataclass
class WorkerHandle:
    worker_id: str
    engine: str
    device: str
    models: list[str]
    session: int  # bumps on every (re)connection; a closing old session must not mark a new one dead
    last_seen: float
    outbox: asyncio.Queue = field(default_factory=asyncio.Queue)
    report: WorkerReport | None = None
    connected: bool = True
    draining: bool = False
    pending: dict[str, OpCommand] = field(default_factory=dict)  # op id -> op not yet answered

    def close(self) -> None:
        """End the session (the link servicer stops at the None sentinel)."""
        self.connected = False
        self.outbox.put_nowait(None)

    def send(self, cmd: RunCommand | OpCommand) -> None:
        if isinstance(cmd, OpCommand) and cmd.kind not in ("abort",):
            self.pending[cmd.op_id] = cmd
        self.outbox.put_nowait(cmd)

    def pending_kind(self, kind: str, model: str = "") -> bool:
        return any(op.kind == kind and (not model or op.model == model) for op in self.pending.values())

    def rate_profile(self) -> WorkerProfile:
        """A cost model from the worker's measured rates alone (per-token prefill, per-step
        decode, no batch dependence): for an engine that reports no cost model."""
        r = self.report
        if r is None or r.prefill_tokens_per_s <= 0 or r.decode_tokens_per_s <= 0:
            return WorkerProfile(name=self.worker_id)
        return WorkerProfile(prefill_base_s=0.0, prefill_per_token_s=1.0 / r.prefill_tokens_per_s,
                             decode_base_s=1.0 / r.decode_tokens_per_s, decode_per_seq_s=0.0, name=self.worker_id)

    def view(self, running: tuple[RequestView, ...], healthy: bool) -> WorkerView:
        """What the planner is told about this worker (controller/cluster_view.py builds its
        WorkerState): the worker's own report, and a model swap sent but not answered."""
        r = self.report
        loading = r.loading_model if r else None
        if loading is None:
            for op in self.pending.values():
                if op.kind == "load_model":
                    loading = op.model
        if r is not None and r.profile is not None:
            profile = r.profile
        else:
            profile = self.rate_profile()
        return WorkerView(
            worker_id=self.worker_id, healthy=healthy, draining=self.draining, gpu=self.device,
            active_model=r.active_model if r else None, loading_model=loading,
            warm_models=frozenset(r.warm_models if r else ()),
            kv_capacity_tokens=r.kv_capacity_tokens if r else 0, kv_used_tokens=r.kv_used_tokens if r else 0,
            engine_max_batch=r.max_batch_size if r else 0, profile=profile,
            preemption_mode=r.preemption if r else PreemptionMode.NONE,
            servable_models=frozenset(r.servable_models) if r and r.servable_models else None,
            host_ram_bytes=r.host_ram_bytes if r else 0,
            host_kv_capacity_tokens=r.host_kv_capacity_tokens if r else None,
            host_kv_used_tokens=r.host_kv_used_tokens if r else 0, running=running,
            supported_ops=frozenset(r.supported_ops) if r and r.supported_ops is not None else None,
            prefix=PrefixReport(r.prefix_block_tokens, frozenset(r.prefix_blocks), r.queued_prefill_tokens)
            if r and r.prefix_block_tokens else None)
