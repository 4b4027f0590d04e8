"""Output lengths of (model, SLO class, length band): learned online from finished requests
on top of the policy's prior, forgotten with a half-life, with running requests counted as
right-censored lengths; gamma-shaped (see the package docstring)."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from scipy import special

from qlmserve.controller.estimator.distributions import gamma_shape_scale
from qlmserve.controller.length_band import CLASS_WIDE, LengthKey
from qlmserve.controller.policy import PolicyConfig
from qlmserve.controller.snapshot import DEFAULT_LENGTHS, LengthStats, RunningRequest
from qlmserve.operations.model_spec import OutputPrior

# ---- 1. output lengths ------------------------------------------------------------------


@dataclass(frozen=True)
class Moments:
    """Sufficient statistics of observed output lengths: what the controller persists.

    Additive, so concurrent controllers (or a Redis HINCRBYFLOAT per field) merge by
    summing; `Moments.of(x)` is the delta of one finished request."""

    count: float = 0.0
    total: float = 0.0
    total_sq: float = 0.0

    @classmethod
    def of(cls, output_tokens: float) -> Moments:
        x = float(output_tokens)
        return cls(1.0, x, x * x)

    @classmethod
    def from_prior(cls, prior: OutputPrior) -> Moments:
        w = float(prior.weight)
        return cls(w, w * prior.mean, w * (prior.std**2 + prior.mean**2))

    def __add__(self, other: Moments) -> Moments:
        return Moments(self.count + other.count, self.total + other.total, self.total_sq + other.total_sq)

    def __sub__(self, other: Moments) -> Moments:
        return Moments(self.count - other.count, self.total - other.total, self.total_sq - other.total_sq)

    def scaled(self, f: float) -> Moments:
        return Moments(self.count * f, self.total * f, self.total_sq * f)

    def to_stats(self, fallback: LengthStats) -> LengthStats:
        if self.count <= 0:
            return fallback
        mean = self.total / self.count
        var = max(0.0, self.total_sq / self.count - mean * mean)
        return LengthStats(mean=mean, var=var, count=int(round(self.count)))

    def to_fields(self) -> dict[str, str]:
        """Redis hash fields (readable numbers)."""
        return {"count": repr(self.count), "sum": repr(self.total), "sumsq": repr(self.total_sq)}

    @classmethod
    def from_fields(cls, fields: Mapping[str, str | bytes | float]) -> Moments:
        def num(k: str) -> float:
            v = fields.get(k, 0.0)
            return float(v.decode() if isinstance(v, bytes) else v)

        return cls(num("count"), num("sum"), num("sumsq"))


def merge_moments(*parts: Mapping[LengthKey, Moments]) -> dict[LengthKey, Moments]:
    """Sum several learner states (e.g. the one in Redis and this controller's unsaved delta)."""
    out: dict[LengthKey, Moments] = {}
    for part in parts:
        for key, m in part.items():
            out[key] = out.get(key, Moments()) + m
    return out


def moments_key(model: str, slo_class: str, band: int = CLASS_WIDE) -> str:
    """A readable, unambiguous string key for one (model, class, band): `["llama", "interactive", 0]`."""
    return json.dumps([model, slo_class, band])


def parse_moments_key(key: str | bytes) -> LengthKey:
    model, slo_class, *band = json.loads(key.decode() if isinstance(key, bytes) else key)
    return str(model), str(slo_class), int(band[0]) if band else CLASS_WIDE  # keys from before bands: the class


class RecentMoments:
    """An exponentially forgetting view of cumulative observed moments (the additive ones
    the token script keeps in Redis, or a LengthLearner's state): every update adds what
    was observed since the last one and scales the rest down by 2^(-dt / half-life). A
    workload's output lengths drift (the Azure conversation trace's first minute averages
    85 tokens, its third 295); cumulative moments would follow only as fast as history
    is outweighed. The first update takes the whole history at full weight."""

    def __init__(self, half_life_s: float) -> None:
        self.half_life_s = half_life_s
        self._seen: dict[LengthKey, Moments] = {}
        self._recent: dict[LengthKey, Moments] = {}
        self._at: float | None = None

    def update(self, now: float, cumulative: Mapping[LengthKey, Moments]) -> dict[LengthKey, Moments]:
        if self.half_life_s <= 0:
            return dict(cumulative)
        f = 1.0 if self._at is None else 0.5 ** (max(0.0, now - self._at) / self.half_life_s)
        recent = {k: m.scaled(f) for k, m in self._recent.items()}
        for k, m in cumulative.items():
            new = m - self._seen.get(k, Moments())
            if new.count < 0:  # the history was reset (a fresh store): start over from it
                new, recent[k] = m, Moments()
            recent[k] = recent.get(k, Moments()) + new
        self._seen, self._recent, self._at = dict(cumulative), recent, now
        return dict(recent)


class LengthLearner:
    """Output-length distribution per (model, SLO class, length band), learned online.

    A band's figure is the prior plus that band's observations; band 0 (CLASS_WIDE) reads
    the prior plus every band's, and stands in for a band with none (controller/length_band.py).
    The state is the observed moments only; the policy's prior (ModelSpec.output_prior,
    a pseudo-count of `weight` requests with the prior mean and std) is added when the
    stats are read, so a policy reload that changes a prior takes effect at once and the
    persisted state never double-counts it."""

    def __init__(self, config: PolicyConfig, observed: Mapping[LengthKey, Moments] | None = None) -> None:
        self.config = config
        self._observed: dict[LengthKey, Moments] = dict(observed or {})

    def _prior(self, model: str) -> OutputPrior:
        spec = self.config.models.get(model)
        return spec.output_prior if spec is not None else OutputPrior()

    def observe(self, model: str, slo_class: str, output_tokens: int, band: int = CLASS_WIDE) -> Moments:
        """Record one finished request; returns the delta (for an atomic Redis increment)."""
        delta = Moments.of(output_tokens)
        key = (model, slo_class, band)
        self._observed[key] = self._observed.get(key, Moments()) + delta
        return delta

    def stats(self, model: str, slo_class: str, band: int = CLASS_WIDE) -> LengthStats:
        if band == CLASS_WIDE:
            seen = sum((m for (km, kc, _b), m in self._observed.items() if (km, kc) == (model, slo_class)),
                       Moments())
        else:
            seen = self._observed.get((model, slo_class, band), Moments())
        return (Moments.from_prior(self._prior(model)) + seen).to_stats(DEFAULT_LENGTHS)

    def length_stats(self, running: Iterable[RunningRequest] = ()) -> dict[LengthKey, LengthStats]:
        """The whole class (band 0) of every (model, class) of the policy or observed, and every
        observed band: ClusterSnapshot.length_stats, corrected for the requests still running
        (`with_running`)."""
        keys = ({(m, c, CLASS_WIDE) for m in self.config.models for c in self.config.slo_classes}
                | {(m, c, CLASS_WIDE) for m, c, _b in self._observed} | set(self._observed))
        return with_running({k: self.stats(*k) for k in sorted(keys)}, running)

    def state(self) -> dict[LengthKey, Moments]:
        return dict(self._observed)

    def restore(self, state: Mapping[LengthKey, Moments]) -> None:
        self._observed = dict(state)

    def merge(self, state: Mapping[LengthKey, Moments]) -> None:
        self._observed = merge_moments(self._observed, state)

    def dumps(self) -> dict[str, str]:
        """One string per (model, class, band): `moments_key` -> JSON [count, sum, sumsq]."""
        return {moments_key(*k): json.dumps([m.count, m.total, m.total_sq]) for k, m in self._observed.items()}

    @staticmethod
    def loads(data: Mapping[str | bytes, str | bytes]) -> dict[LengthKey, Moments]:
        out = {}
        for k, v in data.items():
            c, s, ss = json.loads(v.decode() if isinstance(v, bytes) else v)
            out[parse_moments_key(k)] = Moments(float(c), float(s), float(ss))
        return out


def with_running(stats: Mapping[LengthKey, LengthStats], running: Iterable[RunningRequest],
                 max_rounds: int = 60, buckets: int = 16) -> dict[LengthKey, LengthStats]:
    """Length stats that also count the requests still running, as right-censored lengths.

    Finished requests alone are a biased sample: short outputs finish first, so while a
    queue builds the long ones are still running and the learned mean falls well below the
    true one (scenario a, Azure trace at 1.2x capacity: 160 learned vs 258 true after 40 s,
    and every wait predicted short). A running request that produced g tokens has a length
    of at least g; EM for censored data replaces it by E[min(L, cap) | L > g] (and the
    second moment likewise) under the current fit, and refits, until the mean moves by
    less than 0.1% (heavy censoring converges slowly: tens of rounds). The running requests
    are summarised as `buckets` groups of similar progress, so a round costs the same for
    a fleet of thousands as for one worker."""
    by_key: dict[LengthKey, list[RunningRequest]] = {}
    for r in running:
        if r.generated_tokens > 0:
            by_key.setdefault((r.model, r.slo_class, r.length_band), []).append(r)
            if r.length_band != CLASS_WIDE:  # the whole class counts it too
                by_key.setdefault((r.model, r.slo_class, CLASS_WIDE), []).append(r)
    out = dict(stats)
    for key, rs in by_key.items():
        st = stats.get(key)
        if st is None or st.count <= 0:
            continue
        order = sorted(rs, key=lambda r: r.generated_tokens)
        parts = np.array_split(np.arange(len(order)), min(buckets, len(order)))
        w = np.array([len(p) for p in parts], dtype=float)
        g = np.array([np.mean([order[i].generated_tokens for i in p]) for p in parts])
        cap = np.array([min(order[i].max_tokens for i in p) for p in parts], dtype=float)
        s1, s2 = st.count * st.mean, st.count * (st.var + st.mean**2)
        n = st.count + len(rs)
        mean, var = st.mean, st.var
        for _ in range(max_rounds):
            rm, rv = remaining_moments(mean, var, cap, g)
            e1 = g + rm
            prev, mean = mean, (s1 + float((w * e1).sum())) / n
            var = max(1e-9, (s2 + float((w * (rv + e1 * e1)).sum())) / n - mean * mean)
            if abs(mean - prev) < 1e-3 * mean:
                break
        out[key] = LengthStats(mean=mean, var=var, count=int(n))
    return out


def remaining_moments(mean: np.ndarray | float, var: np.ndarray | float, max_tokens: np.ndarray | float,
                      generated: np.ndarray | float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """Mean and variance of the tokens a request still produces, min(L, max_tokens) - g
    given L > g, for L ~ gamma(mean, var) and g tokens produced so far. Vectorised.

    The shape matters here: a heavy tail (coefficient of variation > 1) makes a request
    that has run long likely to run longer; a light one the opposite."""
    mean, var, cap, g = np.broadcast_arrays(*(np.asarray(a, dtype=float) for a in (mean, var, max_tokens, generated)))
    cap = np.maximum(cap, 1.0)
    g = np.clip(g, 0.0, cap - 1.0)
    det = var <= 1e-9 * mean * mean
    k, th = gamma_shape_scale(mean, np.where(det, 1.0, var))
    xg, xc = g / th, cap / th
    p_g = special.gammaincc(k, xg)  # P(L > g)
    p_c = special.gammaincc(k, xc)  # P(L > cap)
    # E[min(L, cap) 1{L > g}] and E[min(L, cap)^2 1{L > g}]
    e1 = k * th * (special.gammaincc(k + 1, xg) - special.gammaincc(k + 1, xc)) + cap * p_c
    e2 = k * (k + 1) * th * th * (special.gammaincc(k + 2, xg) - special.gammaincc(k + 2, xc)) + cap * cap * p_c
    with np.errstate(divide="ignore", invalid="ignore"):
        m1 = e1 / p_g
        m2 = e2 / p_g
    # Far in the tail the conditional law of a gamma is close to exponential with its scale.
    tail = ~(p_g > 1e-12) | ~np.isfinite(m1) | ~np.isfinite(m2)
    rem_mean = np.where(tail, np.minimum(th, cap - g), m1 - g)
    rem_var = np.where(tail, np.minimum(th, cap - g) ** 2, np.maximum(0.0, m2 - m1 * m1))
    # Deterministic lengths (a prior with std 0).
    rem_mean = np.where(det, np.maximum(np.minimum(mean, cap) - g, 0.0), rem_mean)
    rem_var = np.where(det, 0.0, rem_var)
    return np.maximum(rem_mean, 1.0), rem_var


@lru_cache(maxsize=8192)
def fresh_length_moments(mean: float, var: float, max_tokens: int) -> tuple[float, float]:
    """`remaining_moments` of a request that has not started (cached: few distinct keys)."""
    m, v = remaining_moments(mean, var, float(max_tokens), 0.0)
    return float(m), float(v)
