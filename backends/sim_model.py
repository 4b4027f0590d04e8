"""A model the simulated engine serves: its size and speed on the worker, its KV room,
and how long its outputs are (a seeded draw per request, so a request stops at the same
length wherever and however often it runs)."""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

from qlmserve.operations.costs import WorkerProfile


def stable_u64(*parts: object) -> int:
    """A process-independent 64-bit hash (Python's hash() is salted per process)."""
    h = hashlib.blake2b(digest_size=8)
    for p in parts:
        h.update(str(p).encode())
        h.update(b"\x1f")
    return int.from_bytes(h.digest(), "little")


# The prompt-coded output length: two tokens, base CODE_BASE, after a marker token, so that
# the length of any trace (< CODE_BASE**2 tokens) fits token ids every vocabulary has.
CODE_MARK, CODE_BASE = 7, 4096


def code_output_length(n: int) -> list[int]:
    """The three prompt tokens that tell a simulated engine to produce `n` tokens."""
    return [CODE_MARK, 1 + n // CODE_BASE, 1 + n % CODE_BASE]


def prompt_coded_length(prompt_token_ids: Sequence[int]) -> int | None:
    if len(prompt_token_ids) >= 3 and prompt_token_ids[0] == CODE_MARK:
        return (prompt_token_ids[1] - 1) * CODE_BASE + prompt_token_ids[2] - 1
    return None


@dataclass(frozen=True)
class OutputLengths:
    """How many tokens a simulated request produces before its stop token.

    kind:
      - "max_tokens": run to max_tokens (finish reason LENGTH);
      - "fixed": always `mean` tokens;
      - "lognormal": lognormal with the given mean and std (a heavy right tail, like
        chat traces);
      - "empirical": uniform draw from `values` (e.g. a trace's output lengths);
      - "prompt": the length written into the prompt's first tokens
        (`code_output_length`): a replayed trace's true output length, which the client
        knows and the controller does not (a real model's output length is a function of
        its prompt too), while the request's max_tokens stays what a client would ask.
    The draw is a function of (seed, request id, prompt) only, so a request that is evicted and
    resumed, or replayed on another worker, stops at the same length.
    """

    kind: Literal["max_tokens", "fixed", "lognormal", "empirical", "prompt"] = "max_tokens"
    mean: float = 128.0
    std: float = 128.0
    values: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.kind in ("fixed", "lognormal") and self.mean < 1:
            raise ValueError(f"OutputLengths.mean must be >= 1, got {self.mean}")
        if self.kind == "lognormal" and self.std < 0:
            raise ValueError(f"OutputLengths.std must be >= 0, got {self.std}")
        if self.kind == "empirical" and not self.values:
            raise ValueError("OutputLengths(kind='empirical') needs values")

    def draw(self, seed: int, request_id: str, max_tokens: int, prompt_token_ids: Sequence[int] = ()) -> int:
        if self.kind == "max_tokens":
            n = max_tokens
        elif self.kind == "prompt":
            n = prompt_coded_length(prompt_token_ids) or max_tokens
        elif self.kind == "fixed":
            n = int(round(self.mean))
        else:
            rng = np.random.default_rng(stable_u64("len", seed, request_id))
            if self.kind == "empirical":
                n = int(self.values[int(rng.integers(len(self.values)))])
            else:
                sigma2 = math.log1p((self.std / self.mean) ** 2)
                n = int(round(rng.lognormal(math.log(self.mean) - sigma2 / 2, math.sqrt(sigma2))))
        return max(1, min(n, max_tokens))


@dataclass(frozen=True)
class SimModel:
    """A model the simulated engine can serve."""

    name: str
    weight_bytes: int  # model-swap cost: bytes moved from disk (cold) or host RAM (warm)
    num_layers: int = 32  # expert-level preemption pauses at one of these boundaries
    profile: WorkerProfile | None = None  # speed of this model on this worker; engine default if None
    kv_capacity_tokens: int | None = None  # KV tokens that fit next to its weights; engine default if None
    vocab_size: int = 32000
