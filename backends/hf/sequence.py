"""One request inside the HF engine: its lifecycle status and all its state.

`Sequence.tokens` is prompt + generated. The KV cache holds positions [0, kv_len); the
tokens after kv_len (the whole prompt for a new sequence, the last sampled token for a
decoding one) are what the next forward passes feed, all at once or, for a prompt
longer than the iteration's prefill budget, a chunk at a time. That one rule covers
prefill, chunked prefill, decode, requeued requests (prompt + earlier generated tokens)
and swapped-in ones.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from qlmserve.backends.engine import EngineRequest, FinishReason, HoldsRequest

from .kv_cache import HostKV


class SeqStatus(enum.IntEnum):
    """Ordered: everything >= FINISHED_STOPPED has left the engine."""

    WAITING = 0  # accepted, no KV yet
    RUNNING = 1  # KV on the device, ready for its next pass (or inside one)
    SWAPPED = 2  # KV in host memory; resumes after swap_in
    FINISHED_STOPPED = 3
    FINISHED_LENGTH = 4
    FINISHED_ABORTED = 5
    FINISHED_EVICTED = 6

    def is_finished(self) -> bool:
        return self >= SeqStatus.FINISHED_STOPPED


_FINISH_REASON = {
    SeqStatus.FINISHED_STOPPED: FinishReason.STOP,
    SeqStatus.FINISHED_LENGTH: FinishReason.LENGTH,
}


@dataclass(eq=False)
class Sequence(HoldsRequest):
    request: EngineRequest
    status: SeqStatus = SeqStatus.WAITING
    kv_len: int = 0
    host_kv: HostKV | None = None  # set while SWAPPED
    _tokens: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._tokens = list(self.request.prompt_token_ids) + list(self.request.generated_token_ids)

    @property
    def tokens(self) -> tuple[int, ...]:
        """Read-only view: prompt + generated."""
        return tuple(self._tokens)

    @property
    def num_tokens(self) -> int:
        return len(self._tokens)

    @property
    def num_prompt(self) -> int:
        return len(self.request.prompt_token_ids)

    @property
    def generated(self) -> list[int]:
        """All generated tokens, including those of an earlier run."""
        return self._tokens[self.num_prompt :]

    @property
    def num_generated(self) -> int:
        return len(self._tokens) - self.num_prompt

    @property
    def pending(self) -> list[int]:
        """Tokens the next forward pass must feed (those without KV)."""
        return self._tokens[self.kv_len :]

    @property
    def num_pending(self) -> int:
        return self.num_tokens - self.kv_len

    @property
    def is_prefill(self) -> bool:
        """More than one token to feed: the prompt (or prompt + earlier output) of a new run,
        or what its earlier chunks left. (One token left of a prompt is fed by a decode
        pass: feeding it and sampling is exactly a decode step.)"""
        return self.num_tokens - self.kv_len > 1

    @property
    def max_total_tokens(self) -> int:
        """KV positions the sequence can ever need: the last sampled token is never fed."""
        return self.num_prompt + self.request.max_tokens - 1

    def append(self, token: int) -> None:
        self._tokens.append(token)

    def finish_reason(self) -> FinishReason | None:
        return _FINISH_REASON.get(self.status)
