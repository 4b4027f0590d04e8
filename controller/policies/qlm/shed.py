"""Stage 2b of the NOTE: under overload, which best-effort groups a model's fleet serves
last so that more requests meet their SLO (Moore-Hodgson's rule on the fleet, with the work
the recent arrivals say is coming).

Every request counts the same in the objective, so when a fleet cannot serve all its work
before the deadlines, the requests to give up are the costliest: a prompt of 16k tokens
takes the prefill time of thirty prompts of 500. The other stages cannot see this: the base
plan and the program keep every group that meets its SLO in the base decision, and the
waiting queue alone looks feasible until it is too late. On ls2m (Mooncake, FCFS-50% load)
QLM without this met every best-effort request that arrived in the first 30 s, the
16k-token ones too, and then 6 of 38 short ones that arrived at 70-80 s, behind the
backlog those had built.

Moore-Hodgson's rule (the fewest late jobs on one machine: take the jobs in deadline order;
when one is late, drop the longest taken so far) is exact for one machine and equal
values. Here the machine is a model's fleet in the fluid limit (each request's mean work
on a worker, over the k workers that hold the model, over k again), a job is a waiting
group or the expected arrivals of one (class, band) in one second, and "longest" is the
most work per unit of value. Requests are dropped one at a time, as many as a lateness
needs, and a group is given up when half of its requests are. The expected arrivals are
the last HORIZON_S seconds of arrivals repeated from now on: they compete for the fleet
with the waiting groups, which is what a fleet past its capacity has to plan for; at
equal cost they are dropped before the waiting requests. Latency-sensitive work
(waiting or expected) is never dropped: it only takes its share of the fleet. Without
overload nothing is dropped.

Only a fleet whose work is mostly prefill gives requests up (PREFILL_SHARE): a prompt's
cost is known at arrival, an output's is the estimator's guess until it is produced. On
the output-heavy ls2 (Azure) the rule without that condition met 1.5-3 points less at the
FCFS-50% load on each of three seeds; on ls2m it gained 7-12 points (the closing note of
this change has the runs).

Given-up groups are not hopeless: they go to the tail of their queues, as hopeless ones do
(drop_hopeless), and are served when capacity is left; every solve decides again, with what
arrived meanwhile (on ls2m, keeping a group given up once changed nothing measurable)."""

from __future__ import annotations

import heapq
import math
from collections import deque
from collections.abc import Iterator

import numpy as np

from qlmserve.controller.estimator.service_model import Work
from qlmserve.controller.policies.qlm.tick import Tick
from qlmserve.controller.snapshot import ClusterSnapshot

# Seconds of recent arrivals taken as the next seconds' (and how long they are kept).
HORIZON_S = 90.0
MIN_SPAN_S = 10.0
# A model's fleet gives requests up for their cost only when most of its work is prefill,
# known at arrival; where most of it is output not produced yet, the cost is a guess.
PREFILL_SHARE = 0.5

# (model, slo class, length band) -> [requests, prompt tokens]
Bucket = dict[tuple[str, str, int], list[int]]


class ArrivalHistory:
    """The requests seen arriving over the last HORIZON_S seconds, summed per second and
    (model, class, band): what the fleet must expect next. Fed from every tick's snapshot
    (before a deep queue is cut to its planning head). After a controller restart it starts
    from the requests that wait in the first snapshot."""

    def __init__(self, horizon_s: float | None = None) -> None:
        self.horizon_s = HORIZON_S if horizon_s is None else horizon_s
        self.seconds: deque[tuple[int, Bucket]] = deque()  # (second, its buckets), oldest first
        self.seen_until: float | None = None
        self.first_seen: float | None = None  # the earliest arrival the first snapshot showed
        self.totals: Bucket = {}  # the sums of `seconds` (what costly_groups' condition reads)

    def span_s(self, now: float) -> float:
        """Seconds the history covers (at least MIN_SPAN_S, at most the horizon)."""
        if self.first_seen is None:
            return self.horizon_s
        return min(self.horizon_s, max(MIN_SPAN_S, now - self.first_seen))

    def expected(self, now: float) -> Iterator[tuple[float, tuple[str, str, int], list[int]]]:
        """The arrivals expected over the next horizon_s seconds: (seconds from now, bucket
        key, [requests, prompt tokens]): the history repeated from now on, once or (when it
        covers less) as often as it fits."""
        span = self.span_s(now)
        for sec, buckets in self.seconds:
            ahead = sec + span - now
            while ahead <= self.horizon_s:
                for key, b in buckets.items():
                    yield ahead, key, b
                ahead += span

    def observe(self, snap: ClusterSnapshot) -> None:
        """Count the requests that arrived since the last snapshot (waiting or already running):
        each once, in the snapshot whose clock first passed its arrival."""
        now = snap.now
        since = now - self.horizon_s if self.seen_until is None else self.seen_until
        if now <= since:
            return
        new: dict[int, Bucket] = {}
        for g in snap.groups:
            if max(g.arrivals, default=since) <= since:
                continue  # nothing new in it (a deep queue's old groups: one C-speed pass each)
            for a, p in zip(g.arrivals, g.prompt_tokens):
                if since < a <= now:
                    _add(new, a, (g.model, g.slo_class, g.length_band), p)
        for w in snap.workers:
            for r in w.running:
                if since < r.arrival <= now:
                    _add(new, r.arrival, (r.model, r.slo_class, r.length_band), r.prompt_tokens)
        if self.first_seen is None:
            self.first_seen = min([now, *(float(sec) for sec in new)])
        for sec in sorted(new):
            _merge(self.totals, new[sec], 1)
            if self.seconds and self.seconds[-1][0] == sec:
                _merge(self.seconds[-1][1], new[sec], 1)
            else:
                self.seconds.append((sec, new[sec]))
        while self.seconds and self.seconds[0][0] < now - self.horizon_s:
            _merge(self.totals, self.seconds.popleft()[1], -1)
        self.seen_until = now


def _merge(into: Bucket, other: Bucket, sign: int) -> None:
    for k, (n, prompt) in other.items():
        acc = into.setdefault(k, [0, 0])
        acc[0] += sign * n
        acc[1] += sign * prompt
        if acc[0] == 0:
            del into[k]


def _add(into: dict[int, Bucket], at: float, key: tuple[str, str, int], prompt: int) -> None:
    b = into.setdefault(int(at), {}).setdefault(key, [0, 0])
    b[0] += 1
    b[1] += prompt


def costly_groups(tick: Tick, skip: set[str], history: ArrivalHistory | None) -> set[str]:
    """Best-effort groups (not in `skip`) that Moore-Hodgson drops on their model's fleet."""
    now = tick.snap.now
    by_model: dict[str, list[str]] = {}
    for gid, g in tick.groups.items():
        if gid not in skip:
            by_model.setdefault(g.model, []).append(gid)
    shed: set[str] = set()
    for model, gids in sorted(by_model.items()):
        fleet = [w.worker_id for w in tick.live if (w.loading_model or w.active_model) == model]
        if not fleet:
            continue  # no worker holds the model: where it goes is the program's model swap
        wms = [tick.fc.workers[wid] for wid in fleet]

        # Seconds of the fluid fleet (k workers) per request, prompt token and output token:
        # each worker's rates, averaged, over k.
        per_req = sum(wm.worker.profile.prefill_base_s for wm in wms) / len(wms) ** 2
        per_prompt = sum(wm.worker.profile.prefill_per_token_s for wm in wms) / len(wms) ** 2
        per_out = sum(wm.step_s / wm.slots for wm in wms) / len(wms) ** 2

        def cost(w: Work) -> tuple[float, float]:
            """(prefill, all) of the work, in seconds of the fluid fleet (as WorkerModel.prefill_s)."""
            pre = w.count * per_req + w.prompt * per_prompt
            return pre, pre + w.tokens * per_out

        def expected_work(cls: str, band: int, n: int, prompt: int) -> Work:
            return Work(n, tick.snap.lengths(model, cls, band).mean * n, 0.0, float(prompt))

        waiting = [(gid, tick.fc.groups[gid]) for gid in gids]
        coming = [] if history is None else [(k, b) for k, b in history.totals.items() if k[0] == model]
        tick.policy.clock.meter.charge("group", len(waiting) + len(coming))
        sums = [cost(gw.work) for _, gw in waiting] + [cost(expected_work(c, band, *b)) for (_, c, band), b in coming]
        if sum(p for p, _ in sums) < PREFILL_SHARE * sum(a for _, a in sums):
            continue  # the costs are mostly outputs not produced yet: a guess to give requests up for
        # jobs: (deadline from now, tie-break, fleet seconds, requests, value, droppable group:
        # "" for expected arrivals, None for latency-sensitive work)
        # a waiting group is judged at its newest request's deadline
        jobs = [(gw.slack_s[-1], gid, cost(gw.work)[1], gw.group.size, tick.value[gid],
                 None if gw.group.latency_sensitive else gid) for gid, gw in waiting]
        if history is not None:
            for ahead, (m, cls, band), (n, prompt) in history.expected(now):
                sc = tick.cfg.slo_classes.get(cls)
                if m != model or sc is None:
                    continue
                work = cost(expected_work(cls, band, n, prompt))[1]
                jobs.append((ahead + sc.ttft_s, f"~{ahead:09.3f}|{cls}|{band}", work, n, sc.weight * n,
                             None if sc.latency_sensitive else ""))
        tick.policy.clock.meter.charge("group", len(jobs))
        first_free = float(np.min(tick.heads.same[[tick.windex[wid] for wid in fleet]]))
        shed |= _moore_hodgson(jobs, first_free)
    return shed


def _moore_hodgson(jobs: list[tuple], clock: float) -> set[str]:
    """The waiting groups Moore-Hodgson gives up. Jobs are (deadline, key, fleet seconds,
    requests, value, group id; "" for expected arrivals, None for latency-sensitive work,
    which is never given up), taken in deadline order. When one is late, requests of the
    costliest job taken so far (the most work per value) are given up, as many as the
    lateness needs. A group is given up when at least half of its
    requests are (a group of 17 given up whole for the lateness of two short requests
    would lose 15 that are on time)."""
    # max-heap of (-work per value, waiting?, key, work per request, requests left): at
    # equal cost, expected arrivals are given up before requests that wait
    taken: list[tuple[float, bool, str, float, int]] = []
    dropped: dict[str, int] = {}
    size: dict[str, int] = {}  # waiting groups' requests
    for due, key, s, n, value, gid in sorted(jobs, key=lambda x: (x[0], x[1])):
        clock += s
        if gid is not None:
            heapq.heappush(taken, (-s / max(value, 1e-9), gid != "", key, s / n, n))
            if gid:
                size[key] = n
        while clock > due + 1e-12 and taken:
            dens, waiting, k, per, left = heapq.heappop(taken)
            m = min(left, max(1, math.ceil((clock - due) / per - 1e-9)))
            clock -= m * per
            dropped[k] = dropped.get(k, 0) + m
            if m < left:
                heapq.heappush(taken, (dens, waiting, k, per, left - m))
    return {k for k, m in dropped.items() if k in size and 2 * m >= size[k]}
