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

2. One worker's service model (`WorkerModel`, `QueueCursor`). A worker runs up to
   `slots` sequences at once (continuous batching; `slots` is the batch limit, lowered
   when the KV cache cannot hold that many sequences). Every decode iteration advances
   every running sequence by one token and takes `step_s` (a function of the batch,
   from the WorkerProfile); every admitted request first takes a prefill pass that
   stalls the batch. Requests start in virtual-queue order on the first free slot (list
   scheduling), so with W decode tokens of work ahead of a request (remaining tokens of
   the running requests plus the queued requests before it), all `slots` slots are busy
   until it starts and

       B * start + (residual work of the B-1 other sequences in progress) = W,

   i.e. start ~= (W - (B-1) * r) / B iterations, where r = E[L^2] / (2 E[L]) is the
   mean residual of a sequence in progress (exact for exponential lengths; it is the
   minimum of B residuals when only running work is ahead). With fewer than B
   requests ahead the request starts at once. W is a sum of many independent lengths,
   normal by the central limit theorem, so the start time has a mean and a variance.
   A model swap in the queue drains the batch (the expected end of the last sequence,
   r * H_B after the last start) and then loads the weights (cold or warm).
   Latency-sensitive groups on a worker whose best-effort running work is paused
   (expert-level preemption) or evicted/swapped out see only the latency-sensitive
   running work ahead of them.

3. Groups in virtual queues (`Forecaster`). The TTFT of a group's requests in a given
   set of virtual queues: its first request and its last request (the group is
   admitted oldest first), each a normal `WaitEstimate`; the expected fraction of its
   requests that meet their deadline interpolates between the two.
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
from qlmserve.controller.snapshot import ClusterSnapshot, GroupState, LengthStats, WorkerState

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


DEFAULT_LENGTHS = LengthStats(mean=128.0, var=128.0**2, count=0)


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

    def length_stats(self) -> dict[tuple[str, str], LengthStats]:
        """Every (model, class) of the policy plus any observed one: ClusterSnapshot.length_stats."""
        keys = {(m, c) for m in self.config.models for c in self.config.slo_classes} | set(self._observed)
        return {k: self.stats(*k) for k in sorted(keys)}

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
        rm, rv = run_mean[:n_run], run_var[:n_run]
        r_mean = float(rm.mean())
        r_var = max(float(rv.mean() + rm.var()), 1e-6 * r_mean**2)
        k_run, ratio = r_mean**2 / r_var, r_mean / item_mean
    else:
        k_run, ratio = 1.0, 1.0
    tm, tv, dm, dv = _unit_table(slots, n_run, _q(k_run), _q(k_item), _q(ratio))
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
        m, v = self.item_stats.get(model or "", (DEFAULT_LENGTHS.mean, DEFAULT_LENGTHS.var))
        return release_table(self.slots, np.empty(0), np.empty(0), m, v)


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

    @classmethod
    def start(cls, wm: WorkerModel, protect_ls: bool = False, cleared: bool = False) -> QueueCursor:
        """At the head of `wm`'s queue. `cleared`: its running requests are taken off the
        device first (evicted or swapped out), e.g. for a model swap now."""
        if cleared:
            fresh = wm.fresh(wm.model) if wm.model is not None else wm.table
            return cls(wm, protect_ls, wm.model, WaitEstimate(wm.ready_s, 0.0), fresh, fresh, EMPTY, 0.0)
        return cls(wm, protect_ls, wm.model, WaitEstimate(wm.ready_s, 0.0), wm.table, wm.table_ls, wm.backlog, 0.0)

    def _view(self, latency_sensitive: bool) -> ReleaseTable:
        return self.table_ls if (self.protect_ls and latency_sensitive) else self.table

    def _at(self, table: ReleaseTable, queued: Work, prefill_s: float) -> WaitEstimate:
        m, v = table.start(queued)
        step = self.wm.step_s
        return self.base + WaitEstimate(m * step + prefill_s, v * step * step)

    def free_at(self) -> WaitEstimate:
        """When the next request could start here, whatever its model (no swap counted)."""
        return self._at(self.table, self.queued, self.prefill_s)

    def _switched(self, model: str) -> QueueCursor:
        """The cursor after a model swap to `model`: the current block drains, then the load."""
        if model == self.model:
            return self
        wm = self.wm
        base = self.base
        if self.model is not None:
            m, v = self.table.drain(self.queued)
            base = base + WaitEstimate(m * wm.step_s + self.prefill_s, v * wm.step_s**2)
        base = base + WaitEstimate(wm.load_s(model), 0.0)
        fresh = wm.fresh(model)
        return replace(self, model=model, base=base, table=fresh, table_ls=fresh, queued=EMPTY, prefill_s=0.0)

    def timing(self, gw: GroupWork) -> GroupTiming:
        """TTFT of the group's first and last request if it were next in this queue."""
        c = self._switched(gw.group.model)
        wm = c.wm
        table = c._view(gw.group.latency_sensitive)
        n = gw.work.count
        first = c._at(table, c.queued, c.prefill_s + wm.prefill_s(gw.work.share(1)))
        last = c._at(table, c.queued + gw.work.share(n - 1), c.prefill_s + wm.prefill_s(gw.work))
        return GroupTiming(first, last)

    def push(self, gw: GroupWork) -> GroupTiming:
        """Place the group next in the queue; returns its timing."""
        t = self.timing(gw)
        c = self._switched(gw.group.model)
        self.model, self.base, self.table, self.table_ls = c.model, c.base, c.table, c.table_ls
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

    def meets(self, beta: float) -> bool:
        """The chance constraint: the last request's TTFT beta-quantile is within the
        oldest request's deadline (the group's tightest)."""
        return self.timing.last.quantile(beta) <= min(self.slack_s)

    def attainment(self) -> float:
        """Expected fraction of the group's requests that meet their deadline."""
        n = len(self.slack_s)
        return sum(self.timing.request_ttft(i, n).prob_within(s) for i, s in enumerate(self.slack_s)) / n


def model_kind_is_moe(config: PolicyConfig | None, model: str | None) -> bool:
    if config is None or model is None or model not in config.models:
        return False
    return config.models[model].kind != "llama"


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
        self.groups: dict[str, GroupWork] = {g.group_id: self.group_work(g) for g in groups}
        self.workers: dict[str, WorkerModel] = self._worker_models(max_running)

    def group_work(self, g: GroupState) -> GroupWork:
        st = self.snapshot.lengths(g.model, g.slo_class)
        m, v = remaining_moments(st.mean, st.var, np.asarray(g.max_tokens, dtype=float), 0.0)
        m = np.broadcast_to(m, (g.size,))
        v = np.broadcast_to(v, (g.size,))
        w = Work(g.size, float(m.sum()), float(v.sum()), float(g.total_prompt_tokens))
        now = self.snapshot.now
        return GroupWork(g, w, tuple(a + g.ttft_s - now for a in g.arrivals))

    def _worker_models(self, max_running: int | None) -> dict[str, WorkerModel]:
        snap = self.snapshot
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
            # Swapped-out requests are not ahead of the queue: they resume only into slots the
            # queue leaves spare (the swap-in rule in policies/op_rules.py).
            on_device = [r for r in w.running if not r.swapped]
            if on_device:
                stats = [snap.lengths(r.model, r.slo_class) for r in on_device]
                rm, rv = remaining_moments(np.array([s.mean for s in stats]), np.array([s.var for s in stats]),
                                           np.array([r.max_tokens for r in on_device], dtype=float),
                                           np.array([r.generated_tokens for r in on_device], dtype=float))
                ls = np.array([r.latency_sensitive for r in on_device])
            extra = Work(max(0, len(rm) - slots), float(rm[slots:].sum()), float(rv[slots:].sum()))
            table = release_table(slots, rm, rv, item_m, item_v)
            table_ls = table if ls[:slots].all() else release_table(slots, rm[:slots][ls[:slots]],
                                                                    rv[:slots][ls[:slots]], item_m, item_v)
            ready = 0.0
            if w.loading_model is not None:
                ready = w.profile.model_load_time(snap.model_bytes.get(w.loading_model, 0),
                                                  w.loading_model in w.warm_models)
            out[w.worker_id] = WorkerModel(w, slots, step, model, ready, table, table_ls, extra,
                                           snap.model_bytes, self.item_stats)
        return out

    def cursor(self, worker_id: str, protect_ls: bool = False, cleared: bool = False) -> QueueCursor:
        return QueueCursor.start(self.workers[worker_id], protect_ls, cleared)

    def evaluate(self, virtual_queues: Mapping[str, Iterable[str]], protected: Iterable[str] = (),
                 cleared: Iterable[str] = ()) -> dict[str, GroupForecast]:
        """Forecast of every queued group; `protected` are the workers whose best-effort
        running work does not delay latency-sensitive groups (preempted or evicted),
        `cleared` those whose running requests are all taken off first."""
        prot, clr = set(protected), set(cleared)
        out: dict[str, GroupForecast] = {}
        for wid, queue in virtual_queues.items():
            if wid not in self.workers:
                continue
            cur = self.cursor(wid, wid in prot, wid in clr)
            for gid in queue:
                gw = self.groups.get(gid)
                if gw is None:
                    continue
                out[gid] = GroupForecast(gid, wid, cur.push(gw), gw.slack_s)
        return out


def running_backlog(snapshot: ClusterSnapshot, worker: WorkerState) -> WaitEstimate:
    """Wall time until the worker has a free slot, from what it runs now (zero while one is free)."""
    return Forecaster(snapshot).cursor(worker.worker_id).free_at()


def queue_wait(snapshot: ClusterSnapshot, worker: WorkerState, groups_ahead: list[GroupState]) -> WaitEstimate:
    """Wall-clock wait until the next request in `worker`'s virtual queue starts (before
    its own prefill), given the groups ahead of it."""
    fc = Forecaster(snapshot)
    cur = fc.cursor(worker.worker_id)
    for g in groups_ahead:
        cur.push(fc.groups[g.group_id] if g.group_id in fc.groups else fc.group_work(g))
    return cur.free_at()


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
