"""The RWT estimator over virtual queues (Forecaster): each group's TTFT forecast, its
chance of meeting its SLO, vectorised over every queue at once (package docstring,
layer 3)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from qlmserve.controller.estimator.distributions import ZERO, WaitEstimate, prob_within_array, quantile_array
from qlmserve.controller.estimator.lengths import remaining_moments
from qlmserve.controller.estimator.service_model import (
    EMPTY,
    TABLE_SLOTS_BUILT,
    GroupTiming,
    GroupWork,
    QueueCursor,
    ReleaseTable,
    Work,
    WorkerModel,
    release_table,
)
from qlmserve.controller.policy import PolicyConfig
from qlmserve.controller.prefix_affinity import saved_prefill
from qlmserve.controller.snapshot import DEFAULT_LENGTHS, ClusterSnapshot, GroupState
from qlmserve.controller.solve_budget import WorkMeter
from qlmserve.operations.batching import PreemptionMode


@dataclass(frozen=True)
class GroupForecast:
    group_id: str
    worker_id: str
    timing: GroupTiming
    slack_s: tuple[float, ...]
    attain: float | None = None  # attainment(), when computed in bulk by Forecaster.evaluate

    def meets(self, beta: float) -> bool:
        """The chance constraint, per request at both ends of the group: the first and the
        last request's TTFT beta-quantiles are within their own deadlines (TTFT and slack
        both grow along the group, so the requests between follow). Judging the last
        request against the oldest one's deadline, as before, called a 60-request
        best-effort group late for its 2 s of arrivals; on ls2 at FCFS-50% the plans
        it chose met fewer requests than the EDF base (77.7% against 82.9%)."""
        return self.timing.first.quantile(beta) <= self.slack_s[0] and \
            self.timing.last.quantile(beta) <= self.slack_s[-1]

    def attainment(self) -> float:
        """Expected fraction of the group's requests that meet their deadline."""
        if self.attain is not None:
            return self.attain
        n = len(self.slack_s)
        return sum(self.timing.request_ttft(i, n).prob_within(s) for i, s in enumerate(self.slack_s)) / n


def meets_all(forecasts: Iterable[GroupForecast], beta: float) -> np.ndarray:
    """GroupForecast.meets(beta) for many groups at once."""
    fs = list(forecasts)
    if not fs:
        return np.zeros(0, dtype=bool)
    first = quantile_array(np.array([f.timing.first.mean_s for f in fs]),
                           np.array([f.timing.first.var_s2 for f in fs]), beta)
    last = quantile_array(np.array([f.timing.last.mean_s for f in fs]), np.array([f.timing.last.var_s2 for f in fs]),
                          beta)
    return (first <= np.array([f.slack_s[0] for f in fs])) & (last <= np.array([f.slack_s[-1] for f in fs]))


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


@lru_cache(maxsize=16384)
def group_decode_moments(mean: float, var: float, caps: tuple[int, ...]) -> tuple[float, float]:
    """Sum of the mean and variance of the tokens each not-yet-started request of a group
    produces. One vectorised call for the group's caps, element for element what
    `fresh_length_moments` gives, summed in the same order; cached across snapshots (a
    group and the learned lengths mostly stay the same from one tick to the next). Per-cap
    calls were most of a simulated tick at depth (issue 13)."""
    ms, vs = remaining_moments(mean, var, np.asarray(caps, dtype=float), 0.0)
    tokens = total_var = 0.0
    for m, v in zip(np.atleast_1d(ms).tolist(), np.atleast_1d(vs).tolist()):
        tokens += m
        total_var += v
    return tokens, total_var


class Forecaster:
    """The RWT estimator for one snapshot: each group's work, each worker's rates, and
    the TTFT forecast of every group under a set of virtual queues."""

    def __init__(self, snapshot: ClusterSnapshot, max_running: int | None = None,
                 meter: WorkMeter | None = None) -> None:
        """`meter` counts the work done with this forecaster (the planner's solve budget)."""
        self.snapshot = snapshot
        self.meter = meter
        groups = snapshot.groups
        if meter is not None:
            meter.charge("fc_group", len(groups))
        # Per model: mean prompt, and the output-length mix of its waiting requests (the
        # lengths the release tables assume for queued requests).
        prompts: dict[str, list[float]] = {}
        mix: dict[str, list[float]] = {}  # model -> [requests, sum of means, sum of E[L^2]]
        for g in groups:
            prompts.setdefault(g.model, []).extend(g.prompt_tokens)
            st = snapshot.lengths(g.model, g.slo_class, g.length_band)
            acc = mix.setdefault(g.model, [0.0, 0.0, 0.0])
            acc[0] += g.size
            acc[1] += g.size * st.mean
            acc[2] += g.size * (st.var + st.mean**2)
        for w in snapshot.workers:
            for r in w.running:
                prompts.setdefault(r.model, []).append(r.prompt_tokens)
        for (m, _c, _b), st in snapshot.length_stats.items():
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
        self._on_worker: dict[tuple[str, str], GroupWork] = {}  # work net of cached prefixes
        built = TABLE_SLOTS_BUILT[0]
        self.workers: dict[str, WorkerModel] = self._worker_models(max_running)
        if meter is not None:
            meter.charge("table_slot", TABLE_SLOTS_BUILT[0] - built)

    def group_work(self, g: GroupState) -> GroupWork:
        key = (g.model, g.slo_class, g.length_band, g.max_tokens)
        moments = self._decode_moments.get(key)
        if moments is None:  # groups of one class and band with the same caps share their sums
            st = self.snapshot.lengths(g.model, g.slo_class, g.length_band)
            moments = self._decode_moments[key] = group_decode_moments(st.mean, st.var, g.max_tokens)
        w = Work(len(g.request_ids), moments[0], moments[1], float(g.total_prompt_tokens))
        late = g.ttft_s - self.snapshot.now
        return GroupWork(g, w, tuple(a + late for a in g.arrivals))

    def work_on(self, group_id: str, worker_id: str) -> GroupWork | None:
        """The group's work on one worker: its prefill less what the worker's prefix cache
        saves it (controller/prefix_affinity.py); the shared GroupWork where nothing is saved."""
        gw = self.groups.get(group_id)
        if gw is None or not gw.group.prefix_blocks:
            return gw
        key = (group_id, worker_id)
        hit = self._on_worker.get(key)
        if hit is None:
            wm = self.workers.get(worker_id)
            saved = saved_prefill(gw.group, wm.worker) if wm is not None else 0
            hit = gw if not saved else GroupWork(gw.group, Work(gw.work.count, gw.work.tokens, gw.work.var,
                                                               gw.work.prompt - saved), gw.slack_s)
            self._on_worker[key] = hit
        return hit

    def _worker_models(self, max_running: int | None) -> dict[str, WorkerModel]:
        snap = self.snapshot
        # Remaining lengths of every request on a device, in one vectorised call. Swapped-out
        # requests are not ahead of the queue: they resume only into slots the queue leaves
        # spare (the swap-in rule in policies/op_rules.py).
        on_device = [r for w in snap.workers for r in w.running if not r.swapped]
        stats = [snap.lengths(r.model, r.slo_class, r.length_band) for r in on_device]
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
                # The iteration in flight carries, beside the decode step, a prefill chunk of at
                # most max_prefill_tokens while a held request is still prefilling
                # (operations/batching.py, the note for the estimator).
                prefilling = sum(r.prompt_tokens + r.generated_tokens for r in mine if r.first_token_at is None)
                in_flight = now_step
                if prefilling:
                    in_flight += w.profile.prefill_time(min(prefilling, w.max_prefill_tokens))
                residual = WaitEstimate(in_flight / 2, in_flight * in_flight / 12)
                lead_free = residual + WaitEstimate(now_step, 0.0)
                lead_ls = ZERO if w.preemption_mode == PreemptionMode.EXPERT else residual
                if w.preemption_mode == PreemptionMode.NONE:
                    lead_ls = lead_free
            out[w.worker_id] = WorkerModel(w, slots, step, model, ready, table, table_ls, extra,
                                           snap.model_bytes, self.item_stats, lead_free=lead_free,
                                           lead_queued=WaitEstimate(step / 2, step * step / 12), lead_ls=lead_ls,
                                           meter=self.meter)
        return out

    def cursor(self, worker_id: str, protect_ls: bool = False, cleared: bool = False) -> QueueCursor:
        if self.meter is not None:
            self.meter.charge("cursor_start")
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
            # Queues may name groups this snapshot does not hold (the tails behind a planning
            # head, thousands at depth): skip those at C speed (work_on would say None).
            for gid in filter(self.groups.__contains__, queue):
                gw = self.work_on(gid, wid)
                if gw is not None:
                    gws.append(gw)
                    widx.append(k)
        if not gws:
            return {}
        if len(gws) > _SMALL_EVALUATION and self.meter is not None:
            self.meter.charge("eval_call")
        if len(gws) <= _SMALL_EVALUATION:  # numpy's per-call overhead outweighs the loop
            out = {}
            for wid in order:
                cur = self.cursor(wid, wid in prot, wid in clr)
                for gid in filter(self.groups.__contains__, virtual_queues[wid]):
                    gw = self.work_on(gid, wid)
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
                gw = fc.work_on(gid, worker_id)
                if gw is None:
                    continue
                t = cur.push(gw)
                if gid == group_id:
                    return t.first
    raise KeyError(f"group {group_id} is in no virtual queue")
