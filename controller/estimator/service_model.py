"""One worker's service model: continuous batching over `slots` sequences, slot releases
(ReleaseTable), and the walk down one virtual queue (QueueCursor); see the package
docstring, layer 2."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from functools import lru_cache

import numpy as np

from qlmserve.controller.estimator.distributions import ZERO, WaitEstimate
from qlmserve.controller.snapshot import DEFAULT_LENGTHS, GroupState, WorkerState
from qlmserve.controller.solve_budget import WorkMeter

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


# Slots of the Monte Carlo tables built so far (cache misses of _unit_table): what a
# planner's meter charges for them ("table_slot", controller/solve_budget.py).
TABLE_SLOTS_BUILT = [0]


def reset_table_cache() -> None:
    """Forget the cached tables, so that a run's table builds (and the work charged for
    them) do not depend on what ran before it in the process (the simulator's runs)."""
    _unit_table.cache_clear()
    _scaled_table.cache_clear()


@lru_cache(maxsize=4096)
def _unit_table(slots: int, n_run: int, qk_run: float, qk_item: float, q_ratio: float
                ) -> tuple[np.ndarray, np.ndarray, float, float]:
    """Release times for queued lengths of mean 1 (gamma shape exp(qk_item)) and running
    remainders of mean exp(q_ratio) (shape exp(qk_run))."""
    TABLE_SLOTS_BUILT[0] += slots
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
    meter: WorkMeter | None = field(default=None, compare=False)  # counts the queue walks (solve_budget)

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
            built = TABLE_SLOTS_BUILT[0]
            table = self.fresh_tables[model] = release_table(self.slots, np.empty(0), np.empty(0), m, v)
            if self.meter is not None:
                self.meter.charge("table_slot", TABLE_SLOTS_BUILT[0] - built)
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
        if self.wm.meter is not None:
            self.wm.meter.charge("cursor")
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
        if self.wm.meter is not None:
            self.wm.meter.charge("cursor")
        c = self._switched(gw.group.model)
        t = c._timing(gw)
        self.model, self.base, self.table, self.table_ls, self.idle = c.model, c.base, c.table, c.table_ls, c.idle
        self.queued = c.queued + gw.work
        self.prefill_s = c.prefill_s + self.wm.prefill_s(gw.work)
        return t


# ---- 3. groups in virtual queues ---------------------------------------------------------
