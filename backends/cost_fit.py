"""The cost model an engine reports, fitted online from its own passes.

The planner's estimator needs a batch-dependent cost model (operations/costs.py
WorkerProfile: a prefill pass = base + per-token; a decode step = base + per-sequence +
per-context-token). A real engine does not know it in advance; it measures every pass.
`CostFit` keeps exponentially weighted least-squares fits of those two lines over the
recent passes (a half-life in passes), so a worker whose speed changes (another model,
a busier host) reports its new speed within a few dozen passes. Until a fit has seen
enough distinct batch sizes, the terms it cannot separate fall back to the prior
profile (the configured or default one).
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from qlmserve.operations.costs import WorkerProfile


class _WeightedLstsq:
    """Exponentially weighted normal equations of y ~ X b."""

    def __init__(self, dims: int, half_life: float) -> None:
        self.decay = 0.5 ** (1.0 / half_life)
        self.xtx = np.zeros((dims, dims))
        self.xty = np.zeros(dims)
        self.n = 0.0

    def add(self, x: list[float], y: float) -> None:
        v = np.asarray(x, dtype=float)
        self.xtx = self.decay * self.xtx + np.outer(v, v)
        self.xty = self.decay * self.xty + v * y
        self.n = self.decay * self.n + 1.0

    def solve(self, ridge: np.ndarray, prior: np.ndarray) -> np.ndarray:
        """The fit, pulled towards `prior` by a ridge of `ridge` per coefficient (so that
        a term the passes do not identify stays at its prior)."""
        a = self.xtx + np.diag(ridge)
        b = self.xty + ridge * prior
        return np.linalg.solve(a, b)


class CostFit:
    """Online fit of prefill and decode pass times (seconds) to a WorkerProfile."""

    def __init__(self, prior: WorkerProfile | None = None, half_life_passes: float = 200.0) -> None:
        self.prior = prior or WorkerProfile()
        self._prefill = _WeightedLstsq(2, half_life_passes)
        self._decode = _WeightedLstsq(3, half_life_passes)

    def prefill(self, tokens: int, seconds: float) -> None:
        self._prefill.add([1.0, float(tokens)], seconds)

    def decode(self, batch: int, context_tokens: int, seconds: float) -> None:
        self._decode.add([1.0, float(batch), float(context_tokens)], seconds)

    def profile(self) -> WorkerProfile:
        """The fitted profile (terms never below zero); the prior until passes were seen."""
        p = self.prior
        out = p
        if self._prefill.n >= 2:
            prior = np.array([p.prefill_base_s, p.prefill_per_token_s])
            base, per_token = self._prefill.solve(np.array([1e-2, 1e2]), prior)
            out = replace(out, prefill_base_s=max(0.0, base), prefill_per_token_s=max(0.0, per_token))
        if self._decode.n >= 2:
            prior = np.array([p.decode_base_s, p.decode_per_seq_s, p.decode_per_ctx_token_s])
            base, per_seq, per_ctx = self._decode.solve(np.array([1e-2, 1.0, 1e4]), prior)
            out = replace(out, decode_base_s=max(1e-6, base), decode_per_seq_s=max(0.0, per_seq),
                          decode_per_ctx_token_s=max(0.0, per_ctx))
        return out
