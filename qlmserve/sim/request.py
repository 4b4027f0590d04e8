"""The state of one simulated request, from arrival to its last token."""

from __future__ import annotations

import enum
from dataclasses import dataclass


class SimStatus(enum.IntEnum):
    WAITING = 0  # in a group, in the controller's queue
    ASSIGNED = 1  # handed to a worker, not yet admitted to its batch
    RUNNING = 2  # admitted: KV on the device (or being prefilled)
    SWAPPED = 3  # KV in host memory, paused on its worker
    FINISHED = 4

    def is_finished(self) -> bool:
        return self >= SimStatus.FINISHED


@dataclass(eq=False, slots=True)
class SimRequest:
    rid: str
    model: str
    slo_class: str
    group_id: str
    prompt_tokens: int
    output_tokens: int  # tokens it produces before it stops (hidden from the controller)
    max_tokens: int  # what the client asked for (the controller sees this)
    arrival: float
    ttft_s: float
    tpot_s: float | None
    latency_sensitive: bool
    priority: int
    user_id: str = ""
    session: str = ""  # stickiness key: the conversation (its first prefix block) or the user
    hash_ids: tuple[int, ...] = ()  # prompt prefix blocks (operations/prefix_cache.py)
    length_band: int = 0  # its prompt's length band at arrival (controller/length_band.py)
    cached_tokens: int = 0  # prompt tokens its last admission found in the prefix cache
    status: SimStatus = SimStatus.WAITING
    generated: int = 0
    prefilled: bool = False  # the device KV covers prompt + generated
    prefill_done: int = 0  # while prefilling in chunks: tokens its earlier chunks prefilled
    first_token_at: float | None = None
    finished_at: float | None = None
    worker_id: str | None = None
    first_dispatch_at: float | None = None
    admitted_order: int = 0
    evictions: int = 0  # requeued with its tokens kept (evict op, model swap)
    recomputes: int = 0  # preempted by its engine for lack of KV (recomputed later)
    swaps: int = 0
    expert_preempted: bool = False  # started inside a paused best-effort pass
    recompute_tokens: int = 0  # prefill tokens spent again after an eviction or preemption
    failed: bool = False  # failed by its class's on_miss: fail_fast (never served)

    @property
    def kv_tokens(self) -> int:
        return self.prompt_tokens + self.generated

    @property
    def remaining(self) -> int:
        return self.output_tokens - self.generated

    @property
    def ttft(self) -> float | None:
        return None if self.first_token_at is None else self.first_token_at - self.arrival

    def met_slo(self) -> bool:
        """TTFT within the class target (and TPOT too when the class sets one)."""
        if self.first_token_at is None or self.first_token_at - self.arrival > self.ttft_s + 1e-9:
            return False
        if self.tpot_s is not None:
            if self.finished_at is None:
                return False
            if self.output_tokens > 1:
                tpot = (self.finished_at - self.first_token_at) / (self.output_tokens - 1)
                if tpot > self.tpot_s + 1e-9:
                    return False
        return True
