"""Request waiting time (RWT) estimation.

Three layers, each used by the next:

1. Output lengths. `LengthLearner` learns the output-length distribution of every
   (model, SLO class) online from finished requests, as sufficient statistics
   (count, sum, sum of squares) on top of the policy's prior (a pseudo-count). The
   planner sees a mean and a variance (`LengthStats`); the shape is taken to be a
   gamma distribution with those moments (right-skewed, positive, and exponential
   when the coefficient of variation is one), which is what lets us condition a
   running request's remaining length on the tokens it already produced and truncate
   at `max_tokens`.

2. One worker's service model (`WorkerModel`, `ReleaseTable`, `QueueCursor`). A worker
   runs up to `slots` sequences at once (continuous batching; `slots` is the batch
   limit, lowered when the KV cache cannot hold that many sequences). Every decode
   iteration advances every running sequence by one token and takes `step_s` (a
   function of the batch, from the WorkerProfile); every admitted request first takes a
   prefill pass that stalls the batch. Requests start in virtual-queue order on the
   first free slot (list scheduling), so a request's start is the time of the j-th slot
   release, j counting the requests ahead of it beyond the free slots. With queued
   lengths independent and identically distributed, each slot is an independent renewal
   process (its running request's remaining length, then fresh lengths): the first
   2 * slots releases, order statistics the CLT does not cover, come from a cached Monte
   Carlo table; later starts add the queued work beyond them spread over the slots,
   a sum of many lengths and so normal by the central limit theorem. A model swap in
   the queue drains the batch and then loads the weights (cold or warm).
   Latency-sensitive groups on a worker whose best-effort running work is paused
   (expert-level preemption) or evicted/swapped out see only the latency-sensitive
   running work ahead of them. Swapped-out requests are not ahead of the queue.

3. Groups in virtual queues (`Forecaster`). The TTFT of a group's requests in a given
   set of virtual queues: its first request and its last request (the group is
   admitted oldest first), each a `WaitEstimate` (mean and variance, gamma-shaped: the
   normal of the CLT deep in a queue, right-skewed near its head); the expected fraction
   of its requests that meet their deadline interpolates between the two.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from functools import lru_cache
from statistics import NormalDist

import numpy as np
from scipy import special

from qlmserve.controller.policy import OutputPrior, PolicyConfig
from qlmserve.controller.snapshot import (DEFAULT_LENGTHS, ClusterSnapshot, GroupState, LengthStats, RunningRequest,
                                         WorkerState)

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


def merge_moments(*parts: Mapping[tuple[str, str], Moments]) -> dict[tuple[str, str], Moments]:
    """Sum several learner states (e.g. the one in Redis and this controller's unsaved delta)."""
    out: dict[tuple[str, str], Moments] = {}
    for part in parts:
        for key, m in part.items():
            out[key] = out.get(key, Moments()) + m
    return out


def moments_key(model: str, slo_class: str) -> str:
    """A readable, unambiguous string key for one (model, class): `["llama", "interactive"]`."""
    return json.dumps([model, slo_class])


def parse_moments_key(key: str | bytes) -> tuple[str, str]:
    model, slo_class = json.loads(key.decode() if isinstance(key, bytes) else key)
    return str(model), str(slo_class)


class RecentMoments:
    """An exponentially forgetting view of cumulative observed moments (the additive ones
    the token script keeps in Redis, or a LengthLearner's state): every update adds what
    was observed since the last one and scales the rest down by 2^(-dt / half-life). A
    workload's output lengths drift (the Azure conversation trace's first minute averages
    85 tokens, its third 295); cumulative moments would follow only as fast as history
    is outweighed. The first update takes the whole history at full weight."""

    def __init__(self, half_life_s: float) -> None:
        self.half_life_s = half_life_s
        self._seen: dict[tuple[str, str], Moments] = {}
        self._recent: dict[tuple[str, str], Moments] = {}
        self._at: float | None = None

    def update(self, now: float, cumulative: Mapping[tuple[str, str], Moments]) -> dict[tuple[str, str], Moments]:
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
    """Output-length distribution per (model, SLO class), learned online.

    The state is the observed moments only; the policy's prior (ModelSpec.output_prior,
    a pseudo-count of `weight` requests with the prior mean and std) is added when the
    stats are read, so a policy reload that changes a prior takes effect at once and the
    persisted state never double-counts it."""

    def __init__(self, config: PolicyConfig, observed: Mapping[tuple[str, str], Moments] | None = None) -> None:
        self.config = config
        self._observed: dict[tuple[str, str], Moments] = dict(observed or {})

    def _prior(self, model: str) -> OutputPrior:
        spec = self.config.models.get(model)
        return spec.output_prior if spec is not None else OutputPrior()

    def observe(self, model: str, slo_class: str, output_tokens: int) -> Moments:
        """Record one finished request; returns the delta (for an atomic Redis increment)."""
        delta = Moments.of(output_tokens)
        key = (model, slo_class)
        self._observed[key] = self._observed.get(key, Moments()) + delta
        return delta

    def stats(self, model: str, slo_class: str) -> LengthStats:
        m = Moments.from_prior(self._prior(model)) + self._observed.get((model, slo_class), Moments())
        return m.to_stats(DEFAULT_LENGTHS)

    def length_stats(self, running: Iterable[RunningRequest] = ()) -> dict[tuple[str, str], LengthStats]:
        """Every (model, class) of the policy plus any observed one: ClusterSnapshot.length_stats,
        corrected for the requests still running (`with_running`)."""
        keys = {(m, c) for m in self.config.models for c in self.config.slo_classes} | set(self._observed)
        return with_running({k: self.stats(*k) for k in sorted(keys)}, running)

    def state(self) -> dict[tuple[str, str], Moments]:
        return dict(self._observed)

    def restore(self, state: Mapping[tuple[str, str], Moments]) -> None:
        self._observed = dict(state)

    def merge(self, state: Mapping[tuple[str, str], Moments]) -> None:
        self._observed = merge_moments(self._observed, state)

    def dumps(self) -> dict[str, str]:
        """One string per (model, class): `moments_key` -> JSON [count, sum, sumsq]."""
        return {moments_key(*k): json.dumps([m.count, m.total, m.total_sq]) for k, m in self._observed.items()}

    @staticmethod
    def loads(data: Mapping[str | bytes, str | bytes]) -> dict[tuple[str, str], Moments]:
        out = {}
        for k, v in data.items():
            c, s, ss = json.loads(v.decode() if isinstance(v, bytes) else v)
            out[parse_moments_key(k)] = Moments(float(c), float(s), float(ss))
        return out


def with_running(stats: Mapping[tuple[str, str], LengthStats], running: Iterable[RunningRequest],
                 max_rounds: int = 60, buckets: int = 16) -> dict[tuple[str, str], LengthStats]:
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
    by_key: dict[tuple[str, str], list[RunningRequest]] = {}
    for r in running:
        if r.generated_tokens > 0:
            by_key.setdefault((r.model, r.slo_class), []).append(r)
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


def gamma_shape_scale(mean: np.ndarray, var: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Moment-matched gamma: shape k = mean^2/var, scale = var/mean."""
    mean = np.maximum(np.asarray(mean, dtype=float), 1e-9)
    var = np.maximum(np.asarray(var, dtype=float), 1e-12)
    return mean * mean / var, var / mean


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


# ---- 2. one worker's service model ------------------------------------------------------


@dataclass(frozen=True)
class Work:
    """Sums over a set of requests (all additive): the unit the queue model adds up."""

    count: int = 0
    tokens: float = 0.0  # sum of expected decode tokens
    var: float = 0.0  # sum of their variances
    prompt: float = 0.0  # sum of prompt tokens (prefill work)

    def __add__(self, o: Work) -> Work:
        return Work(self.count + o.count, self.tokens + o.tokens, self.var + o.var, self.prompt + o.prompt)

    def share(self, k: int) -> Work:
        """`k` of these requests, each taken as an average one."""
        if self.count <= 0 or k <= 0:
            return EMPTY
        f = k / self.count
        return Work(k, self.tokens * f, self.var * f, self.prompt * f)


EMPTY = Work()

# The release table covers the first TRANSIENT_ROUNDS * slots slot releases of a worker;
# past them the start time grows by the work ahead over the slots (the CLT part).
TRANSIENT_ROUNDS = 2
TABLE_SAMPLES = 512
_TABLE_SEED = 20240705


def harmonic(n: int) -> float:
    return sum(1.0 / i for i in range(1, n + 1)) if n < 64 else math.log(n) + 0.5772156649 + 0.5 / n


@dataclass(frozen=True)
class ReleaseTable:
    """When the slots of one worker free up, in decode iterations from now.

    The first releases are order statistics of the running requests' remaining lengths
    (and of the lengths of the first queued requests), not sums of many lengths: the
    CLT does not hold there, and its usual mean-residual correction is off by seconds
    for heavy- or light-tailed lengths. With queued lengths independent and identically
    distributed, each slot is an independent renewal process (its running request's
    remaining length, then fresh lengths), so the first TRANSIENT_ROUNDS * slots
    releases are tabulated by Monte Carlo once per (slots, running count, shapes, ratio
    of means) and cached across ticks; later starts add the queued work beyond them
    spread over the slots, with its variance (the CLT). `start` corrects to first order
    for queued work that differs from the table's assumed mix."""

    slots: int
    free: int  # slots with no running request
    item_mean: float  # queued request length the table assumed (mean, variance)
    item_var: float
    t_mean: np.ndarray  # t_mean[j-1]: iterations until the j-th release
    t_var: np.ndarray
    drain_mean: float  # iterations until every running request has finished
    drain_var: float

    def start(self, queued: Work) -> tuple[float, float]:
        """Iterations (mean, variance) until the request after `queued` queued ones starts."""
        q = queued.count
        if q < self.free:
            return 0.0, 0.0
        j = min(q - self.free + 1, len(self.t_mean))
        implied = self.free + j - 1  # queued requests the table had started by release j
        m = float(self.t_mean[j - 1]) + (queued.tokens - implied * self.item_mean) / self.slots
        v = float(self.t_var[j - 1]) + max(0.0, queued.var - implied * self.item_var) / self.slots**2
        return max(0.0, m), v

    def drain(self, queued: Work) -> tuple[float, float]:
        """Iterations (mean, variance) until the running and `queued` requests have all finished."""
        if queued.count <= 0:
            return self.drain_mean, self.drain_var
        m, v = self.start(queued.share(queued.count - 1))
        k = min(self.slots, queued.count + self.slots - self.free)
        last = queued.tokens / queued.count
        return max(self.drain_mean, m + last * harmonic(k)), v + queued.var / queued.count


def _q(x: float) -> float:
    """Quantise a positive parameter on a log grid (about 13% steps) for the table cache."""
    return round(math.log(max(x, 1e-6)) * 8) / 8


@lru_cache(maxsize=4096)
def _unit_table(slots: int, n_run: int, qk_run: float, qk_item: float, q_ratio: float
                ) -> tuple[np.ndarray, np.ndarray, float, float]:
    """Release times for queued lengths of mean 1 (gamma shape exp(qk_item)) and running
    remainders of mean exp(q_ratio) (shape exp(qk_run))."""
    rng = np.random.default_rng(_TABLE_SEED + 7 * slots + n_run)
    k_item, k_run, ratio = math.exp(qk_item), math.exp(qk_run), math.exp(q_ratio)
    jv = TRANSIENT_ROUNDS * slots
    renewals = TRANSIENT_ROUNDS + 2
    first = np.empty((TABLE_SAMPLES, slots))
    first[:, :n_run] = rng.gamma(k_run, ratio / k_run, size=(TABLE_SAMPLES, n_run))
    first[:, n_run:] = rng.gamma(k_item, 1.0 / k_item, size=(TABLE_SAMPLES, slots - n_run))
    more = rng.gamma(k_item, 1.0 / k_item, size=(TABLE_SAMPLES, slots, renewals))
    times = np.concatenate([first[:, :, None], first[:, :, None] + np.cumsum(more, axis=2)], axis=2)
    times = np.sort(times.reshape(TABLE_SAMPLES, -1), axis=1)[:, :jv]
    drain = first[:, :n_run].max(axis=1) if n_run else np.zeros(TABLE_SAMPLES)
    return times.mean(axis=0), times.var(axis=0), float(drain.mean()), float(drain.var())


def release_table(slots: int, run_mean: np.ndarray, run_var: np.ndarray, item_mean: float,
                  item_var: float) -> ReleaseTable:
    """The release table of a worker view: `slots` slots, running requests with these
    remaining-length means and variances (pooled into one gamma), queued lengths of
    this mean and variance."""
    n_run = min(len(run_mean), slots)
    item_mean = max(item_mean, 1e-6)
    item_var = max(item_var, 1e-6 * item_mean**2)
    k_item = item_mean**2 / item_var
    if n_run:
        rm, rv = run_mean[:n_run].tolist(), run_var[:n_run].tolist()
        r_mean = sum(rm) / n_run
        r_var = max(sum(rv) / n_run + sum(x * x for x in rm) / n_run - r_mean * r_mean, 1e-6 * r_mean**2)
        k_run, ratio = r_mean**2 / r_var, r_mean / item_mean
    else:
        k_run, ratio = 1.0, 1.0
    return _scaled_table(slots, n_run, _q(k_run), _q(k_item), _q(ratio), item_mean, item_var)


@lru_cache(maxsize=4096)
def _scaled_table(slots: int, n_run: int, qk_run: float, qk_item: float, q_ratio: float, item_mean: float,
                  item_var: float) -> ReleaseTable:
    """A unit table scaled to the queued lengths' mean (workers of one tick share many)."""
    tm, tv, dm, dv = _unit_table(slots, n_run, qk_run, qk_item, q_ratio)
    return ReleaseTable(slots, slots - n_run, item_mean, item_var, tm * item_mean, tv * item_mean**2,
                        dm * item_mean, dv * item_mean**2)


@dataclass(frozen=True)
class WorkerModel:
    """A worker's constants for the queue model (built once per snapshot)."""

    worker: WorkerState
    slots: int  # sequences that run at once (batch limit, KV limit)
    step_s: float  # one decode iteration at a full batch
    model: str | None  # the model the queue starts with (loading, else active)
    ready_s: float  # until that model is loaded (a swap in progress)
    table: ReleaseTable  # slot releases with every running request ahead
    table_ls: ReleaseTable  # ... with only the latency-sensitive ones (best-effort paused/evicted)
    backlog: Work  # running requests beyond the slots (a batch limit lowered under them), queued first
    model_bytes: Mapping[str, int] = field(default_factory=dict)
    item_stats: Mapping[str, tuple[float, float]] = field(default_factory=dict)  # model -> queued length mean, var
    # Iteration-level timing the release table leaves out. A request that starts on a
    # free slot of a busy device waits for the in-flight iteration to end (uniform over
    # one step) and gets its first token at the end of the next one, its prefill riding
    # with a decode step of the batch (`lead_free`); one that starts at a slot release
    # (a step boundary, counted from the partial step in flight) rides one step too
    # (`lead_queued`). Latency-sensitive requests under LS-first admission (iteration or
    # expert mode) prefill in an iteration of their own: no ride (`lead_ls`).
    lead_free: WaitEstimate = ZERO
    lead_queued: WaitEstimate = ZERO
    lead_ls: WaitEstimate = ZERO
    fresh_tables: dict[str | None, ReleaseTable] = field(default_factory=dict, compare=False)  # cache of `fresh`

    @property
    def worker_id(self) -> str:
        return self.worker.worker_id

    def prefill_s(self, w: Work) -> float:
        p = self.worker.profile
        return w.count * p.prefill_base_s + w.prompt * p.prefill_per_token_s

    def load_s(self, model: str) -> float:
        return self.worker.profile.model_load_time(self.model_bytes.get(model, 0), model in self.worker.warm_models)

    def fresh(self, model: str | None) -> ReleaseTable:
        """The release table after a swap to `model`: nothing running."""
        table = self.fresh_tables.get(model)
        if table is None:
            m, v = self.item_stats.get(model or "", (DEFAULT_LENGTHS.mean, DEFAULT_LENGTHS.var))
            table = self.fresh_tables[model] = release_table(self.slots, np.empty(0), np.empty(0), m, v)
        return table


@dataclass(frozen=True)
class GroupWork:
    """What one waiting group asks of a worker."""

    group: GroupState
    work: Work
    slack_s: tuple[float, ...]  # deadline - now of each request, oldest first

    @property
    def group_id(self) -> str:
        return self.group.group_id


@dataclass(frozen=True)
class GroupTiming:
    first: WaitEstimate  # TTFT of the group's first request
    last: WaitEstimate  # TTFT of its last request

    def request_ttft(self, i: int, n: int) -> WaitEstimate:
        if n <= 1:
            return self.last
        f = i / (n - 1)
        return WaitEstimate(self.first.mean_s + f * (self.last.mean_s - self.first.mean_s),
                            self.first.var_s2 + f * (self.last.var_s2 - self.first.var_s2))


@dataclass
class QueueCursor:
    """Walks one virtual queue head to tail, accumulating the work ahead."""

    wm: WorkerModel
    protect_ls: bool = False  # best-effort running work does not delay latency-sensitive groups
    model: str | None = None
    base: WaitEstimate = ZERO  # start of the current model block
    table: ReleaseTable | None = None
    table_ls: ReleaseTable | None = None
    queued: Work = EMPTY  # requests admitted ahead in the current block
    prefill_s: float = 0.0  # their prefill passes
    idle: bool = False  # nothing decodes when the block starts (after a swap, or a cleared batch)

    @classmethod
    def start(cls, wm: WorkerModel, protect_ls: bool = False, cleared: bool = False) -> QueueCursor:
        """At the head of `wm`'s queue. `cleared`: its running requests are taken off the
        device first (evicted or swapped out), e.g. for a model swap now."""
        if cleared:
            fresh = wm.fresh(wm.model) if wm.model is not None else wm.table
            return cls(wm, protect_ls, wm.model, WaitEstimate(wm.ready_s, 0.0), fresh, fresh, EMPTY, 0.0, True)
        return cls(wm, protect_ls, wm.model, WaitEstimate(wm.ready_s, 0.0), wm.table, wm.table_ls, wm.backlog, 0.0)

    def _view(self, latency_sensitive: bool) -> ReleaseTable:
        return self.table_ls if (self.protect_ls and latency_sensitive) else self.table

    def _lead(self, table: ReleaseTable, queued: Work, latency_sensitive: bool) -> WaitEstimate:
        if queued.count >= table.free:
            return self.wm.lead_queued
        if self.idle:
            return ZERO
        return self.wm.lead_ls if latency_sensitive else self.wm.lead_free

    def _at(self, table: ReleaseTable, queued: Work, prefill_s: float, latency_sensitive: bool = False
            ) -> WaitEstimate:
        m, v = table.start(queued)
        step = self.wm.step_s
        return self.base + self._lead(table, queued, latency_sensitive) + WaitEstimate(m * step + prefill_s,
                                                                                       v * step * step)

    def free_at(self) -> WaitEstimate:
        """When the next request could start here, whatever its model (no swap counted)."""
        return self._at(self.table, self.queued, self.prefill_s)

    def switch_base(self, model: str) -> WaitEstimate:
        """When a block of `model` would start after this queue (its current block drained,
        then the load); the current block's start when `model` is loaded already."""
        if model == self.model:
            return self.base
        wm = self.wm
        base = self.base
        if self.model is not None:
            m, v = self.table.drain(self.queued)
            base = base + WaitEstimate(m * wm.step_s + self.prefill_s, v * wm.step_s**2)
        return base + WaitEstimate(wm.load_s(model), 0.0)

    def _switched(self, model: str) -> QueueCursor:
        """The cursor after a model swap to `model`: the current block drains, then the load."""
        if model == self.model:
            return self
        fresh = self.wm.fresh(model)
        return replace(self, model=model, base=self.switch_base(model), table=fresh, table_ls=fresh, queued=EMPTY,
                       prefill_s=0.0, idle=True)

    def timing(self, gw: GroupWork) -> GroupTiming:
        """TTFT of the group's first and last request if it were next in this queue."""
        return self._switched(gw.group.model)._timing(gw)

    def _timing(self, gw: GroupWork) -> GroupTiming:
        """timing() on a cursor already on the group's model."""
        wm = self.wm
        ls = gw.group.latency_sensitive
        table = self._view(ls)
        n = gw.work.count
        # Requests that start on free slots at once prefill in one pass: the first token of
        # the first comes when that whole pass ends.
        together = min(n, max(1, table.free - self.queued.count))
        first = self._at(table, self.queued, self.prefill_s + wm.prefill_s(gw.work.share(together)), ls)
        last = self._at(table, self.queued + gw.work.share(n - 1), self.prefill_s + wm.prefill_s(gw.work), ls)
        return GroupTiming(first, last)

    def push(self, gw: GroupWork) -> GroupTiming:
        """Place the group next in the queue; returns its timing."""
        c = self._switched(gw.group.model)
        t = c._timing(gw)
        self.model, self.base, self.table, self.table_ls, self.idle = c.model, c.base, c.table, c.table_ls, c.idle
        self.queued = c.queued + gw.work
        self.prefill_s = c.prefill_s + self.wm.prefill_s(gw.work)
        return t


# ---- 3. groups in virtual queues ---------------------------------------------------------


@dataclass(frozen=True)
class GroupForecast:
    group_id: str
    worker_id: str
    timing: GroupTiming
    slack_s: tuple[float, ...]
    attain: float | None = None  # attainment(), when computed in bulk by Forecaster.evaluate

    def meets(self, beta: float) -> bool:
        """The chance constraint: the last request's TTFT beta-quantile is within the
        oldest request's deadline (the group's tightest)."""
        return self.timing.last.quantile(beta) <= min(self.slack_s)

    def attainment(self) -> float:
        """Expected fraction of the group's requests that meet their deadline."""
        if self.attain is not None:
            return self.attain
        n = len(self.slack_s)
        return sum(self.timing.request_ttft(i, n).prob_within(s) for i, s in enumerate(self.slack_s)) / n


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


def meets_all(forecasts: Iterable[GroupForecast], beta: float) -> np.ndarray:
    """GroupForecast.meets(beta) for many groups at once."""
    fs = list(forecasts)
    if not fs:
        return np.zeros(0, dtype=bool)
    q = quantile_array(np.array([f.timing.last.mean_s for f in fs]), np.array([f.timing.last.var_s2 for f in fs]),
                       beta)
    return q <= np.array([min(f.slack_s) for f in fs])


def _starts_rows(tables: list[ReleaseTable], blk_of: np.ndarray, count: np.ndarray, tokens: np.ndarray,
                 var: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """ReleaseTable.start, elementwise: row i uses tables[blk_of[i]]. Also whether the row
    starts on a free slot, and the table's free slots."""
    uniq: dict[int, int] = {}
    flat_m, flat_v, meta = [], [], []
    off = 0
    tid = np.empty(len(tables), dtype=int)
    for b, t in enumerate(tables):
        k = uniq.get(id(t))
        if k is None:
            k = uniq[id(t)] = len(meta)
            meta.append((off, len(t.t_mean), t.free, t.slots, t.item_mean, t.item_var))
            flat_m.append(t.t_mean)
            flat_v.append(t.t_var)
            off += len(t.t_mean)
        tid[b] = k
    meta_a = np.array(meta, dtype=float)[tid][blk_of]
    offset, jmax, free, slots, item_m, item_v = (meta_a[:, c] for c in range(6))
    tm, tv = np.concatenate(flat_m), np.concatenate(flat_v)
    j = np.clip(count - free + 1, 1, jmax)
    idx = (offset + j - 1).astype(int)
    implied = free + j - 1
    m = tm[idx] + (tokens - implied * item_m) / slots
    v = tv[idx] + np.maximum(0.0, var - implied * item_v) / (slots * slots)
    is_free = count < free
    return np.where(is_free, 0.0, np.maximum(0.0, m)), np.where(is_free, 0.0, v), is_free, free


def model_kind_is_moe(config: PolicyConfig | None, model: str | None) -> bool:
    if config is None or model is None or model not in config.models:
        return False
    return config.models[model].kind != "llama"


# Up to this many groups, `Forecaster.evaluate` walks the queues with QueueCursor (same
# result, see tests) instead of the vectorised walk.
_SMALL_EVALUATION = 12


class Forecaster:
    """The RWT estimator for one snapshot: each group's work, each worker's rates, and
    the TTFT forecast of every group under a set of virtual queues."""

    def __init__(self, snapshot: ClusterSnapshot, max_running: int | None = None) -> None:
        self.snapshot = snapshot
        groups = snapshot.groups
        # Per model: mean prompt, and the output-length mix of its waiting requests (the
        # lengths the release tables assume for queued requests).
        prompts: dict[str, list[float]] = {}
        mix: dict[str, list[float]] = {}  # model -> [requests, sum of means, sum of E[L^2]]
        for g in groups:
            prompts.setdefault(g.model, []).extend(g.prompt_tokens)
            st = snapshot.lengths(g.model, g.slo_class)
            acc = mix.setdefault(g.model, [0.0, 0.0, 0.0])
            acc[0] += g.size
            acc[1] += g.size * st.mean
            acc[2] += g.size * (st.var + st.mean**2)
        for w in snapshot.workers:
            for r in w.running:
                prompts.setdefault(r.model, []).append(r.prompt_tokens)
        for (m, _c), st in snapshot.length_stats.items():
            if m not in mix:
                acc = mix.setdefault(m, [0.0, 0.0, 0.0])
            acc = mix[m]
            if acc[0] == 0:
                acc[:] = [1.0, st.mean, st.var + st.mean**2]
        self.item_stats: dict[str, tuple[float, float]] = {}
        for m, (n, s1, s2) in mix.items():
            mean = s1 / n
            self.item_stats[m] = (mean, max(0.0, s2 / n - mean * mean))
        self._prompt_mean = {m: (sum(v) / len(v) if v else 0.0) for m, v in prompts.items()}
        self._decode_moments: dict[tuple, tuple[float, float]] = {}
        self.groups: dict[str, GroupWork] = {g.group_id: self.group_work(g) for g in groups}
        self.workers: dict[str, WorkerModel] = self._worker_models(max_running)

    def group_work(self, g: GroupState) -> GroupWork:
        key = (g.model, g.slo_class, g.max_tokens)
        moments = self._decode_moments.get(key)
        if moments is None:  # groups of one class with the same caps share their sums
            st = self.snapshot.lengths(g.model, g.slo_class)
            tokens = var = 0.0
            for cap in g.max_tokens:
                m, v = fresh_length_moments(st.mean, st.var, cap)
                tokens += m
                var += v
            moments = self._decode_moments[key] = (tokens, var)
        w = Work(len(g.request_ids), moments[0], moments[1], float(g.total_prompt_tokens))
        late = g.ttft_s - self.snapshot.now
        return GroupWork(g, w, tuple(a + late for a in g.arrivals))

    def _worker_models(self, max_running: int | None) -> dict[str, WorkerModel]:
        snap = self.snapshot
        # Remaining lengths of every request on a device, in one vectorised call. Swapped-out
        # requests are not ahead of the queue: they resume only into slots the queue leaves
        # spare (the swap-in rule in policies/op_rules.py).
        on_device = [r for w in snap.workers for r in w.running if not r.swapped]
        stats = [snap.lengths(r.model, r.slo_class) for r in on_device]
        all_m, all_v = remaining_moments(np.array([s.mean for s in stats]), np.array([s.var for s in stats]),
                                         np.array([r.max_tokens for r in on_device], dtype=float),
                                         np.array([r.generated_tokens for r in on_device], dtype=float))
        all_m, all_v = np.atleast_1d(all_m), np.atleast_1d(all_v)
        at = 0
        out = {}
        for w in snap.workers:
            model = w.loading_model or w.active_model
            slots = max(1, w.max_batch_size if max_running is None else min(w.max_batch_size, max_running))
            item_m, item_v = self.item_stats.get(model or "", (DEFAULT_LENGTHS.mean, DEFAULT_LENGTHS.var))
            prompt_mean = self._prompt_mean.get(model or "", 0.0)
            if w.kv_capacity_tokens > 0:  # the KV cache holds prompt + output of every running sequence
                slots = max(1, min(slots, int(w.kv_capacity_tokens // max(1.0, prompt_mean + item_m))))
            step = w.profile.decode_step_time(slots, int(slots * (prompt_mean + item_m / 2)))
            rm = np.empty(0)
            rv = np.empty(0)
            ls = np.zeros(0, dtype=bool)
            mine = [r for r in w.running if not r.swapped]
            if mine:
                rm, rv = all_m[at:at + len(mine)], all_v[at:at + len(mine)]
                at += len(mine)
                ls = np.array([r.latency_sensitive for r in mine])
            extra = Work(max(0, len(rm) - slots), float(rm[slots:].sum()), float(rv[slots:].sum()))
            table = release_table(slots, rm, rv, item_m, item_v)
            table_ls = table if ls[:slots].all() else release_table(slots, rm[:slots][ls[:slots]],
                                                                    rv[:slots][ls[:slots]], item_m, item_v)
            ready = 0.0
            if w.loading_model is not None:
                ready = w.profile.model_load_time(snap.model_bytes.get(w.loading_model, 0),
                                                  w.loading_model in w.warm_models)
            lead_free = lead_ls = ZERO
            if mine and ready == 0.0:  # a busy device: see WorkerModel.lead_free
                now_step = w.profile.decode_step_time(
                    min(len(mine), slots), sum(r.prompt_tokens + r.generated_tokens for r in mine[:slots]))
                residual = WaitEstimate(now_step / 2, now_step * now_step / 12)
                lead_free = residual + WaitEstimate(now_step, 0.0)
                lead_ls = ZERO if w.preemption_mode == "expert" else residual
                if w.preemption_mode == "none":
                    lead_ls = lead_free
            out[w.worker_id] = WorkerModel(w, slots, step, model, ready, table, table_ls, extra,
                                           snap.model_bytes, self.item_stats, lead_free=lead_free,
                                           lead_queued=WaitEstimate(step / 2, step * step / 12), lead_ls=lead_ls)
        return out

    def cursor(self, worker_id: str, protect_ls: bool = False, cleared: bool = False) -> QueueCursor:
        return QueueCursor.start(self.workers[worker_id], protect_ls, cleared)

    def evaluate(self, virtual_queues: Mapping[str, Iterable[str]], protected: Iterable[str] = (),
                 cleared: Iterable[str] = ()) -> dict[str, GroupForecast]:
        """Forecast of every queued group; `protected` are the workers whose best-effort
        running work does not delay latency-sensitive groups (preempted or evicted),
        `cleared` those whose running requests are all taken off first."""
        prot, clr = set(protected), set(cleared)
        gws: list[GroupWork] = []
        widx: list[int] = []
        order: list[str] = []
        for wid, queue in virtual_queues.items():
            if wid not in self.workers:
                continue
            k = len(order)
            order.append(wid)
            for gid in queue:
                gw = self.groups.get(gid)
                if gw is not None:
                    gws.append(gw)
                    widx.append(k)
        if not gws:
            return {}
        if len(gws) <= _SMALL_EVALUATION:  # numpy's per-call overhead outweighs the loop
            out = {}
            for wid in order:
                cur = self.cursor(wid, wid in prot, wid in clr)
                for gid in virtual_queues[wid]:
                    gw = self.groups.get(gid)
                    if gw is not None:
                        out[gid] = GroupForecast(gid, wid, cur.push(gw), gw.slack_s)
            return out
        fm, fv, lm, lv = self._walk_all(gws, np.array(widx), order, prot, clr)
        # Expected attainment of every group at once: each request's TTFT interpolates
        # between the group's first and last (GroupTiming.request_ttft).
        sizes = np.array([len(gw.slack_s) for gw in gws])
        offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]])
        rep = np.repeat(np.arange(len(gws)), sizes)
        pos = np.arange(len(rep)) - offsets[rep]
        frac = np.where(sizes[rep] > 1, pos / np.maximum(sizes[rep] - 1, 1), 1.0)
        mean = fm[rep] + frac * (lm - fm)[rep]
        var = fv[rep] + frac * (lv - fv)[rep]
        slack = np.fromiter((x for gw in gws for x in gw.slack_s), dtype=float, count=len(rep))
        attain = np.add.reduceat(prob_within_array(mean, var, slack), offsets) / sizes
        out: dict[str, GroupForecast] = {}
        for gw, k, a, b, c, d, att in zip(gws, widx, fm.tolist(), fv.tolist(), lm.tolist(), lv.tolist(),
                                         attain.tolist()):
            out[gw.group_id] = GroupForecast(gw.group_id, order[k], GroupTiming(WaitEstimate(a, b), WaitEstimate(c, d)),
                                             gw.slack_s, att)
        return out

    def _walk_all(self, gws: list[GroupWork], widx: np.ndarray, order: list[str], prot: set[str], clr: set[str]
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """QueueCursor.push over every queue at once (queues given back to back, `widx`
        naming each group's queue): TTFT mean and variance of each group's first and last
        request. Blocks of one model are vectorised; a model swap between blocks adds the
        drain of the block before and the load (a short Python loop over blocks)."""
        n_rows = len(gws)
        n = np.fromiter((g.work.count for g in gws), dtype=float, count=n_rows)
        tok = np.fromiter((g.work.tokens for g in gws), dtype=float, count=n_rows)
        var = np.fromiter((g.work.var for g in gws), dtype=float, count=n_rows)
        prompt = np.fromiter((g.work.prompt for g in gws), dtype=float, count=n_rows)
        ls = np.fromiter((g.group.latency_sensitive for g in gws), dtype=bool, count=n_rows)
        models = [g.group.model for g in gws]
        # Blocks: runs of one worker and one model.
        starts = [0]
        for i in range(1, n_rows):
            if widx[i] != widx[i - 1] or models[i] != models[i - 1]:
                starts.append(i)
        bstart = np.array(starts)
        bend = np.append(bstart[1:], n_rows)
        wms = [self.workers[wid] for wid in order]
        pb = np.array([wms[k].worker.profile.prefill_base_s for k in range(len(order))])[widx]
        pt = np.array([wms[k].worker.profile.prefill_per_token_s for k in range(len(order))])[widx]
        pre = n * pb + prompt * pt
        pre1 = pb + prompt / np.maximum(n, 1) * pt
        blk_n = np.add.reduceat(n, bstart)
        blk_tok = np.add.reduceat(tok, bstart)
        blk_var = np.add.reduceat(var, bstart)
        blk_prompt = np.add.reduceat(prompt, bstart)
        blk_pre = np.add.reduceat(pre, bstart)
        # Per block: table, LS table, work queued before it, start time (mean, var), step.
        tables: list[ReleaseTable] = []
        tables_ls: list[ReleaseTable] = []
        init_c, init_t, init_v, base_m, base_v, steps = [], [], [], [], [], []
        idle: list[bool] = []
        prev_w = -1
        for b, i0 in enumerate(starts):
            k = int(widx[i0])
            wm = wms[k]
            if k != prev_w:  # the head of a worker's queue
                prev_w = k
                cleared = order[k] in clr
                model = wm.model
                if cleared:
                    table = table_ls = wm.fresh(model) if model is not None else wm.table
                    init = EMPTY
                else:
                    table, table_ls, init = wm.table, wm.table_ls, wm.backlog
                bm, bv = wm.ready_s, 0.0
                done_pre = 0.0
                is_idle = cleared
            m_b = models[i0]
            if m_b != model:
                if model is not None:
                    dm, dv = table.drain(init)
                    bm += dm * wm.step_s + done_pre
                    bv += dv * wm.step_s**2
                bm += wm.load_s(m_b)
                table = table_ls = wm.fresh(m_b)
                init, done_pre, model, is_idle = EMPTY, 0.0, m_b, True
            idle.append(is_idle)
            tables.append(table)
            tables_ls.append(table_ls if order[k] in prot else table)
            init_c.append(init.count)
            init_t.append(init.tokens)
            init_v.append(init.var)
            base_m.append(bm + done_pre)
            base_v.append(bv)
            steps.append(wm.step_s)
            init = init + Work(int(blk_n[b]), float(blk_tok[b]), float(blk_var[b]), float(blk_prompt[b]))
            done_pre += float(blk_pre[b])
        blk_of = np.repeat(np.arange(len(starts)), bend - bstart)

        def excl(x: np.ndarray, blk_sum: np.ndarray) -> np.ndarray:
            c = np.cumsum(x) - x
            return c - (np.cumsum(blk_sum) - blk_sum)[blk_of]

        c0 = np.array(init_c, dtype=float)[blk_of] + excl(n, blk_n)
        t0 = np.array(init_t)[blk_of] + excl(tok, blk_tok)
        v0 = np.array(init_v)[blk_of] + excl(var, blk_var)
        p0 = np.array(base_m)[blk_of] + excl(pre, blk_pre)
        share = (n - 1) / np.maximum(n, 1)
        step = np.array(steps)[blk_of]
        bv_row = np.array(base_v)[blk_of]
        fm, fv, f_free, free = _starts_rows(tables, blk_of, c0, t0, v0)
        lm, lv, l_free, _ = _starts_rows(tables, blk_of, c0 + n - 1, t0 + tok * share, v0 + var * share)
        use_ls = ls & np.array([tables_ls[b] is not tables[b] for b in range(len(starts))])[blk_of]
        if use_ls.any():
            fm2, fv2, f_free2, free2 = _starts_rows(tables_ls, blk_of, c0, t0, v0)
            lm2, lv2, l_free2, _ = _starts_rows(tables_ls, blk_of, c0 + n - 1, t0 + tok * share, v0 + var * share)
            fm, fv, f_free = np.where(use_ls, fm2, fm), np.where(use_ls, fv2, fv), np.where(use_ls, f_free2, f_free)
            lm, lv, l_free = np.where(use_ls, lm2, lm), np.where(use_ls, lv2, lv), np.where(use_ls, l_free2, l_free)
            free = np.where(use_ls, free2, free)
        # QueueCursor.timing: the requests of the group that start on free slots at once
        # prefill together, and QueueCursor._lead.
        together = np.clip(free - c0, 1, np.maximum(n, 1))
        pre1 = pre1 * together
        w_of = widx
        lead = np.array([[wm.lead_free.mean_s, wm.lead_free.var_s2, wm.lead_ls.mean_s, wm.lead_ls.var_s2,
                          wm.lead_queued.mean_s, wm.lead_queued.var_s2] for wm in wms])[w_of]
        idle_row = np.array(idle)[blk_of]

        def lead_of(is_free: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            fm_ = np.where(ls, lead[:, 2], lead[:, 0])
            fv_ = np.where(ls, lead[:, 3], lead[:, 1])
            fm_, fv_ = np.where(idle_row, 0.0, fm_), np.where(idle_row, 0.0, fv_)
            return np.where(is_free, fm_, lead[:, 4]), np.where(is_free, fv_, lead[:, 5])

        af, afv = lead_of(f_free)
        al, alv = lead_of(l_free)
        step2 = step * step
        return (p0 + fm * step + pre1 + af, bv_row + fv * step2 + afv, p0 + lm * step + pre + al,
                bv_row + lv * step2 + alv)


def predict_group_wait(snapshot: ClusterSnapshot, virtual_queues: dict[str, list[str]], group_id: str) -> WaitEstimate:
    """Predicted TTFT of the first request of `group_id` under the given virtual queues
    (queue wait, model swaps ahead of it, and its own prefill)."""
    for worker_id, queue in virtual_queues.items():
        if group_id in queue:
            fc = Forecaster(snapshot)
            cur = fc.cursor(worker_id)
            for gid in queue:
                gw = fc.groups.get(gid)
                if gw is None:
                    continue
                t = cur.push(gw)
                if gid == group_id:
                    return t.first
    raise KeyError(f"group {group_id} is in no virtual queue")
