"""The one interface every worker engine implements.

A worker (backends/worker.py) owns exactly one Engine. It feeds it requests and
operations received from the controller and calls `step()` in a loop on its own
thread; everything `step()` returns is written to Redis in one pipeline.

Three implementations:
  - backends/hf/engine.py: Hugging Face `transformers` models, really generating tokens.
  - backends/vllm/engine.py: vLLM's engine (its own virtualenv), driven in process.
  - backends/sim_engine.py: a calibrated cost model that stands in for a GPU.

Thread-safety contract: `add_request`, `abort`, and `request_preemption_check`
may be called from any thread while `step()` runs on the engine thread; every
other method is called on the engine thread between steps (the worker queues
operations and runs them there).
"""

from __future__ import annotations

import enum
from abc import ABC, abstractmethod
from dataclasses import dataclass, field

from qlmserve.operations.batching import LS_BATCH_FACTOR, PreemptionMode, batch_limit, precedence
from qlmserve.operations.costs import WorkerProfile
from qlmserve.operations.ops import ALL_CAPABILITIES, Capability
from qlmserve.operations.prefix_cache import PrefixReport

__all__ = ["LS_BATCH_FACTOR", "PreemptionMode", "batch_limit", "precedence"]  # re-exported: engines' vocabulary


class FinishReason(str, enum.Enum):
    STOP = "stop"  # a stop token was generated
    LENGTH = "length"  # max_tokens reached


@dataclass
class EngineRequest:
    """What an engine needs to run one request. Token ids only: text lives at the edges."""

    request_id: str
    model: str
    prompt_token_ids: list[int]
    max_tokens: int
    # Tokens already produced by an earlier run (after eviction or a worker failure):
    # the engine continues after them, it does not emit them again.
    generated_token_ids: list[int] = field(default_factory=list)
    temperature: float = 0.0  # 0 means greedy
    top_p: float = 1.0
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()
    latency_sensitive: bool = False  # decides who may preempt whom
    priority: int = 0  # higher runs first under PreemptionMode.ITERATION


class HoldsRequest:
    """What the shared batching rules read of a sequence (operations.batching.Batchable),
    for an engine's sequence type that keeps its EngineRequest in `request`."""

    request: EngineRequest

    @property
    def id(self) -> str:
        return self.request.request_id

    @property
    def latency_sensitive(self) -> bool:
        return self.request.latency_sensitive

    @property
    def priority(self) -> int:
        return self.request.priority

    @property
    def model(self) -> str:
        return self.request.model


@dataclass
class TokenEvent:
    """One generated token. `index` is its 0-based position among the generated tokens."""

    request_id: str
    token_id: int
    index: int
    finished: bool = False
    finish_reason: FinishReason | None = None


@dataclass
class OpCost:
    """Measured cost of an operation, reported back to the controller."""

    seconds: float
    bytes_moved: int = 0
    detail: str = ""


@dataclass
class EngineStats:
    """What the worker reports to the controller (and the planner reads)."""

    active_model: str | None
    warm_models: list[str]  # weights held in host RAM, ready for a fast swap-in
    kv_capacity_tokens: int
    kv_used_tokens: int
    running: list[str]  # request ids with KV on the device
    swapped: list[str]  # request ids whose KV is in host memory
    waiting: list[str]  # accepted, not yet started
    max_batch_size: int
    prefill_tokens_per_s: float  # measured, exponentially smoothed
    decode_tokens_per_s: float  # measured per sequence at the current batch size
    device: str = "cpu"
    # What the planner needs beyond that (controller/cluster_view.py): the cost model of
    # the active model (configured for the simulated engine, fitted for a real one), the
    # models this engine can hold, host memory for warm weights and swapped-out KV, and
    # the preemption mode in force.
    profile: WorkerProfile | None = None
    servable_models: list[str] = field(default_factory=list)
    host_ram_bytes: int = 0
    host_kv_capacity_tokens: int | None = None  # None: not limited
    host_kv_used_tokens: int = 0
    preemption: PreemptionMode = PreemptionMode.NONE
    prefix: PrefixReport | None = None  # its prefix cache and prefill backlog; None: it caches no prefixes
    # MoE models: activations per [layer][expert] since the model was loaded; None: not counted
    expert_activations: list[list[int]] | None = None


class EngineError(RuntimeError):
    """An operation that cannot be carried out (unknown request, model not loaded, no memory)."""


class Engine(ABC):
    """A serving engine with iteration-level continuous batching."""

    @abstractmethod
    def add_request(self, request: EngineRequest) -> None:
        """Queue a request; it joins the running batch at the next chance. Raises EngineError
        when its model is not the active model or the prompt cannot fit the KV capacity."""

    @abstractmethod
    def abort(self, request_id: str) -> None:
        """Drop a request wherever it is and free its memory (client cancel)."""

    @abstractmethod
    def step(self) -> list[TokenEvent]:
        """Run one unit of work and return the tokens it produced.

        A unit is one iteration (prefill of joining sequences and/or one decode step of the
        running ones), or, under PreemptionMode.EXPERT, the part of a best-effort iteration
        up to the layer where it was paused plus the latency-sensitive work that preempted
        it; the paused batch resumes in a later call without recomputation. Returning
        early is what lets the worker stream a latency-sensitive first token at once.
        Returns [] when there is nothing to do."""

    @abstractmethod
    def has_work(self) -> bool:
        """True while any request is waiting or running (swapped ones do not count)."""

    @abstractmethod
    def evict(self, request_id: str) -> list[int]:
        """Stop a running request, free its KV, keep its tokens. Returns the generated token
        ids; the request leaves the engine (the controller requeues it)."""

    @abstractmethod
    def swap_out(self, request_id: str) -> OpCost:
        """Copy a request's KV cache to host memory and free it on the device."""

    @abstractmethod
    def swap_in(self, request_id: str) -> OpCost:
        """Bring a swapped request's KV back; it continues exactly where it stopped."""

    @abstractmethod
    def load_model(self, model: str) -> OpCost:
        """Make `model` the active model (from host RAM when warm, from disk when cold).
        Requests of the previous model must have finished, been evicted or swapped out."""

    @abstractmethod
    def warm_model(self, model: str) -> OpCost:
        """Load `model`'s weights into host RAM (pinned where CUDA is present) so that a
        later load_model is a host-to-device copy."""

    @abstractmethod
    def drop_warm(self, model: str) -> None:
        """Release a model's host-RAM copy."""

    @abstractmethod
    def set_preemption(self, mode: PreemptionMode, max_pause_s: float) -> None:
        """Choose how latency-sensitive work may interrupt best-effort work; `max_pause_s`
        bounds how long a paused best-effort batch may wait (starvation bound)."""

    @abstractmethod
    def stats(self) -> EngineStats:
        """A consistent view of the engine's state for the controller."""

    def take_failures(self) -> list[tuple[str, str]]:
        """(request id, error) of requests that failed alone since the last call: they have
        left the engine; the rest of their batch went on. The worker reports them."""
        return []

    def supported_ops(self) -> frozenset[Capability]:
        """The operations this engine carries out; the worker reports them and the planner
        asks for nothing else. The methods of the others raise EngineError."""
        return ALL_CAPABILITIES

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release resources."""
