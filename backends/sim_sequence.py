"""One request inside the simulated engine (`SimSeq`: its tokens and KV state) and one
iteration it runs in (`SimIteration`): what backends/hf/sequence.py and a forward pass
are to the HF engine, as bookkeeping only."""

from __future__ import annotations

from dataclasses import dataclass

from qlmserve.backends.engine import EngineRequest, FinishReason, HoldsRequest


@dataclass(eq=False)
class SimSeq(HoldsRequest):
    request: EngineRequest
    target_len: int  # tokens it will have produced when it finishes
    finish_reason: FinishReason
    generated: list[int]
    admitted_order: int = 0
    prefilled: bool = False  # KV on the device covers prompt + generated
    computed: int = 0  # while prefilling: tokens its earlier chunks prefilled
    blocks: tuple[int, ...] = ()  # chain keys of its prompt's full blocks (prefix cache on)

    @property
    def device_tokens(self) -> int:
        """Tokens whose KV is on the device."""
        return self.kv_tokens if self.prefilled else self.computed

    def preempt(self) -> None:
        """Its KV is dropped: it prefills again from the start (tokens kept)."""
        self.prefilled = False
        self.computed = 0

    @property
    def kv_tokens(self) -> int:
        return len(self.request.prompt_token_ids) + len(self.generated)


@dataclass(eq=False)
class SimIteration:
    prefill: list[tuple[SimSeq, int]]  # (sequence, prompt tokens this iteration prefills)
    decode: list[SimSeq]  # sequences taking one decode step
    duration_s: float
    num_layers: int
    layers_done: int = 0
    paused_at: float | None = None  # clock time it was first paused (expert-level preemption)

    @property
    def layer_s(self) -> float:
        return self.duration_s / max(1, self.num_layers)

    def seqs(self) -> list[SimSeq]:
        return [s for s, _ in self.prefill] + self.decode
