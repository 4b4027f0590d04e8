"""Next-token choice per sequence: greedy, or temperature + top-p sampling.

A seeded request draws token i from a generator seeded with (seed, i), not from one
running generator: its output then depends only on its seed and its context, so it is
the same alone or batched, and after eviction + requeue or a swap.
"""

from __future__ import annotations

import torch

from qlmserve.backends.engine import EngineRequest

# Below this a temperature overflows float32 logits / temperature (1e-45 gives inf - inf).
MIN_TEMPERATURE = 1e-6
_MIX = 0x9E3779B97F4A7C15  # golden-ratio constant: spreads (seed, index) over the seed space


def _seed_for(seed: int, index: int) -> int:
    return (seed * _MIX + index) % (2**63 - 1)


class Sampler:
    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._gen = torch.Generator(device=device)
        self._unseeded = torch.Generator(device=device)
        self._unseeded.seed()

    def choose(self, logits: torch.Tensor, requests: list[EngineRequest], indices: list[int]) -> list[int | str]:
        """logits [B, vocab] (last position of each sequence); indices: 0-based index of the
        token being chosen among each request's generated tokens. A row whose sampling
        fails (a parameter no validation caught) gives the error text instead of a token:
        that request fails alone, the rest of the batch goes on."""
        greedy = logits.argmax(dim=-1).tolist()
        out: list[int | str] = []
        for row, (req, idx) in enumerate(zip(requests, indices, strict=True)):
            if req.temperature == 0.0:
                out.append(int(greedy[row]))
                continue
            try:
                out.append(self._sample(logits[row], req, idx))
            except (RuntimeError, ValueError) as exc:
                out.append(f"sampling failed: {str(exc)[:200]}")
        return out

    def _sample(self, logits: torch.Tensor, req: EngineRequest, index: int) -> int:
        if not (MIN_TEMPERATURE <= req.temperature < float("inf")):
            raise ValueError(f"temperature must be 0 or in [{MIN_TEMPERATURE}, inf)")
        if not (0.0 < req.top_p <= 1.0):
            raise ValueError("top_p must be in (0, 1]")
        probs = torch.softmax(logits.float() / req.temperature, dim=-1)
        if req.top_p < 1.0:
            sorted_p, order = probs.sort(descending=True)
            # Keep the smallest prefix whose mass reaches top_p (always at least one token).
            drop = sorted_p.cumsum(-1) - sorted_p >= req.top_p
            sorted_p = sorted_p.masked_fill(drop, 0.0)
            probs = torch.zeros_like(probs).scatter_(0, order, sorted_p)
        if req.seed is None:
            gen = self._unseeded
        else:
            gen = self._gen
            gen.manual_seed(_seed_for(req.seed, index))
        return int(torch.multinomial(probs, 1, generator=gen).item())
