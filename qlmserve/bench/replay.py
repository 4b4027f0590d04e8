"""Exact replay of a plan's virtual queues with known output lengths.

The RWT estimator approximates the continuous-batching service model of
`controller/estimator/` (slots, decode iterations, prefill stalls, model swaps)
with a normal distribution. This module runs that same service model exactly,
request by request, for one draw of every output length: it is the ground truth
the estimator's calibration test and the chance-vs-SAA comparison are judged by.
It is not the fleet simulator (qlmserve/sim): no arrivals, no re-planning; one plan,
played out to the first token of every queued request.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Mapping

import numpy as np

from qlmserve.controller.estimator import Forecaster
from qlmserve.controller.snapshot import ClusterSnapshot

# (model, slo_class, length band, max_tokens, generated_so_far, count, rng) -> `count` remaining output lengths
LengthSampler = Callable[[str, str, int, int, int, int, np.random.Generator], np.ndarray]


def gamma_sampler(snapshot: ClusterSnapshot) -> LengthSampler:
    """Lengths drawn from the moment-matched gamma of the snapshot's own length stats."""

    def draw(model: str, slo_class: str, band: int, max_tokens: int, generated: int, count: int,
             rng: np.random.Generator) -> np.ndarray:
        st = snapshot.lengths(model, slo_class, band)
        if st.var <= 0:
            full = np.full(count, st.mean)
        else:
            k, th = st.mean**2 / st.var, st.var / st.mean
            full = rng.gamma(k, th, size=count)
            bad = full <= generated
            for _ in range(200):  # condition on having produced `generated` tokens already
                if not bad.any():
                    break
                full[bad] = rng.gamma(k, th, size=int(bad.sum()))
                bad = full <= generated
            full[bad] = generated + rng.exponential(th, size=int(bad.sum()))
        return np.maximum(np.minimum(full, max_tokens) - generated, 1.0)

    return draw


def replay_ttft(snapshot: ClusterSnapshot, virtual_queues: Mapping[str, list[str]], sampler: LengthSampler,
                rng: np.random.Generator, protected: frozenset[str] = frozenset(),
                cleared: frozenset[str] = frozenset(), max_running: int | None = None) -> dict[str, np.ndarray]:
    """Realised TTFT (seconds from now) of every request of every queued group, in the
    group's request order, for one draw of the output lengths.

    Rules (those of the estimator, played exactly): `slots` sequences decode at once,
    one iteration every `step_s`; a queued request takes the first free slot in queue
    order; each admission's prefill stalls the batch; a model change waits for every
    sequence to finish, then loads; on a `protected` worker latency-sensitive requests do
    not wait for best-effort running requests (those are paused or evicted); on a
    `cleared` worker every running request is taken off before the queue starts."""
    fc = Forecaster(snapshot, max_running)
    out: dict[str, np.ndarray] = {}
    for wid, queue in virtual_queues.items():
        if wid not in fc.workers:
            continue
        wm = fc.workers[wid]
        w = wm.worker
        step, slots = wm.step_s, wm.slots
        # Free times (decode iterations since the block began) of every slot.
        run_all, run_ls = [], []
        for r in (() if wid in cleared else w.running):
            if r.swapped:  # resumes only into spare slots: not ahead of the queue
                continue
            rem = float(sampler(r.model, r.slo_class, r.length_band, r.max_tokens, r.generated_tokens, 1, rng)[0])
            run_all.append(rem)
            if r.latency_sensitive:
                run_ls.append(rem)
        model = wm.model
        wall0 = wm.ready_s  # wall time at iteration 0 of the current block
        prefill = 0.0  # prefill stalls so far in the block
        heap = _slots(run_all, slots)
        heap_ls = _slots(run_ls, slots)
        for gid in queue:
            gw = fc.groups.get(gid)
            if gw is None:
                continue
            g = gw.group
            if g.model != model:
                if model is not None:
                    end = max(heap) if heap else 0.0
                    wall0 += end * step + prefill
                wall0 += wm.load_s(g.model)
                model, prefill = g.model, 0.0
                heap, heap_ls = _slots([], slots), _slots([], slots)
            use_ls = wid in protected and g.latency_sensitive
            lengths = sampler(g.model, g.slo_class, g.length_band, max(g.max_tokens), 0, g.size, rng)
            lengths = np.minimum(lengths, np.asarray(g.max_tokens, dtype=float))
            ttft = np.empty(g.size)
            for i in range(g.size):
                own, other = (heap_ls, heap) if use_ls else (heap, heap_ls)
                t = heapq.heappop(own)
                prefill += w.profile.prefill_time(g.prompt_tokens[i])
                ttft[i] = wall0 + t * step + prefill
                heapq.heappush(own, t + float(lengths[i]))
                _occupy(other, t, float(lengths[i]))  # it holds a slot in the other view too
            out[gid] = ttft
    return out


def _slots(busy_until: list[float], slots: int) -> list[float]:
    h = sorted(busy_until)[:slots] if len(busy_until) > slots else sorted(busy_until)
    extra = sorted(busy_until)[slots:] if len(busy_until) > slots else []
    h = h + [0.0] * (slots - len(h))
    heapq.heapify(h)
    for b in extra:  # more running than slots (swapped ones resume as slots free)
        t = heapq.heappop(h)
        heapq.heappush(h, t + b)
    return h


def _occupy(heap: list[float], start: float, length: float) -> None:
    t = heapq.heappop(heap)
    heapq.heappush(heap, max(t, start) + length)
