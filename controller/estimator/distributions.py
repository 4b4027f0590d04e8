"""Waiting-time distributions: a mean and a variance, gamma-shaped near a queue's head and
normal deep in it (the CLT), and the vectorised helpers the planner scores with."""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from statistics import NormalDist

import numpy as np
from scipy import special

_STD_NORMAL = NormalDist()


@lru_cache(maxsize=64)
def normal_z(beta: float) -> float:
    """Standard normal quantile; cached because the planner asks for the same beta each tick."""
    return _STD_NORMAL.inv_cdf(beta)


def normal_cdf(x: float) -> float:
    return 0.5 * math.erfc(-x / math.sqrt(2.0))


# Past this shape a gamma is a normal for the planner's purposes (skewness 2/sqrt(k) < 0.1).
_NORMAL_SHAPE = 400.0


@dataclass(frozen=True)
class WaitEstimate:
    """A waiting time (or TTFT) as a mean and a variance.

    Its distribution is taken to be the gamma with these moments: a wait deep in a
    queue is a sum of many lengths and the gamma is then the CLT's normal (shape large),
    while a wait of a few slot releases (an order statistic) is right-skewed, which a
    symmetric normal gets wrong at both the median and the tail."""

    mean_s: float
    var_s2: float

    @property
    def std_s(self) -> float:
        return max(0.0, self.var_s2) ** 0.5

    def _shape(self) -> float:
        return self.mean_s * self.mean_s / self.var_s2

    def quantile(self, beta: float) -> float:
        """The beta-quantile of the wait, floored at zero."""
        if self.var_s2 <= 0 or self.mean_s <= 0:
            return max(0.0, self.mean_s)
        k = self._shape()
        if k >= _NORMAL_SHAPE:
            return max(0.0, self.mean_s + normal_z(beta) * self.std_s)
        return float(special.gammaincinv(k, beta)) * self.var_s2 / self.mean_s

    def z(self, beta: float) -> float:
        """(quantile - mean) / std: the normal z-score, or the skewed gamma's equivalent."""
        if self.var_s2 <= 0:
            return normal_z(beta)
        return (self.quantile(beta) - self.mean_s) / self.std_s

    def prob_within(self, t: float) -> float:
        """P(wait <= t)."""
        if self.var_s2 <= 0 or self.mean_s <= 0:
            return 1.0 if self.mean_s <= t else 0.0
        if t <= 0:
            return 0.0
        k = self._shape()
        if k >= _NORMAL_SHAPE:
            return normal_cdf((t - self.mean_s) / self.std_s)
        return float(special.gammainc(k, t * self.mean_s / self.var_s2))

    def __add__(self, other: WaitEstimate) -> WaitEstimate:
        return WaitEstimate(self.mean_s + other.mean_s, self.var_s2 + other.var_s2)


ZERO = WaitEstimate(0.0, 0.0)


def gamma_shape_scale(mean: np.ndarray, var: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Moment-matched gamma: shape k = mean^2/var, scale = var/mean."""
    mean = np.maximum(np.asarray(mean, dtype=float), 1e-9)
    var = np.maximum(np.asarray(var, dtype=float), 1e-12)
    return mean * mean / var, var / mean


def sample_sum(mean: np.ndarray, var: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """`size` draws of sums with the given mean and variance, moment-matched gamma (exact
    for sums of gamma lengths of one scale); shape (size, len(mean)). Used by SAA."""
    mean = np.asarray(mean, dtype=float)
    var = np.asarray(var, dtype=float)
    out = np.tile(mean, (size, 1))
    pos = (var > 1e-12) & (mean > 0)
    if pos.any():
        k, th = gamma_shape_scale(mean[pos], var[pos])
        out[:, pos] = rng.gamma(k, th, size=(size, int(pos.sum())))
    return out


def prob_within_array(mean: np.ndarray, var: np.ndarray, t: np.ndarray) -> np.ndarray:
    """WaitEstimate(mean, var).prob_within(t), elementwise."""
    mean, var, t = (np.asarray(a, dtype=float) for a in (mean, var, t))
    det = (var <= 0) | (mean <= 0)
    safe_var = np.where(det, 1.0, var)
    safe_mean = np.where(det, 1.0, mean)
    k = safe_mean * safe_mean / safe_var
    normal = special.ndtr((t - safe_mean) / np.sqrt(safe_var))
    gamma = special.gammainc(np.minimum(k, _NORMAL_SHAPE), np.maximum(t, 0.0) * safe_mean / safe_var)
    p = np.where(k >= _NORMAL_SHAPE, normal, gamma)
    p = np.where(t <= 0, 0.0, p)
    return np.where(det, (mean <= t).astype(float), p)


def quantile_array(mean: np.ndarray, var: np.ndarray, beta: float) -> np.ndarray:
    """WaitEstimate(mean, var).quantile(beta), elementwise."""
    mean, var = np.asarray(mean, dtype=float), np.asarray(var, dtype=float)
    det = (var <= 0) | (mean <= 0)
    safe_var = np.where(det, 1.0, var)
    safe_mean = np.where(det, 1.0, mean)
    k = safe_mean * safe_mean / safe_var
    normal = safe_mean + normal_z(beta) * np.sqrt(safe_var)
    gamma = special.gammaincinv(np.minimum(k, _NORMAL_SHAPE), beta) * safe_var / safe_mean
    q = np.where(k >= _NORMAL_SHAPE, normal, gamma)
    return np.maximum(0.0, np.where(det, mean, q))
