"""From a plan to concrete work: which waiting requests each worker takes now.

Pure: a function of the plan and the snapshot. A worker takes requests from the head
of its virtual queue while it has free batch slots, in queue order, and only for its
active model; when the head group needs another model and the worker has nothing of
its own model left running, a model load is issued (every policy needs that to serve
several models; planner-chosen swaps arrive as plan operations instead).

Under ITERATION / EXPERT (the mode in force, or the one the plan sets) latency-sensitive
groups take slots beyond the batch limit, as the engines admit them
(operations.batching.batch_limit); best-effort work only fills the batch limit.

Swapped-out requests (KV in host memory) resume here, every tick, into free slots ahead
of queued best-effort groups but after the latency-sensitive groups at the queue head:
they were admitted first and hold host memory, and one swapped out to make room for a
latency-sensitive request must not starve behind newer work.

Under a plan that puts latency-sensitive work first (Plan.latency_sensitive_first: QLM,
strict priority, EDF), every waiting latency-sensitive request takes room before any
best-effort request, on its planned worker or, when that one has no room, on any worker
of its model that has: a latency-sensitive request that arrives when some worker could
take it is running within one tick, whatever group it joined.

Under a plan that serves late work last (Plan.late_last: QLM with planner.drop_hopeless),
a request whose first token can no longer come by its deadline (its deadline is nearer
than its own prefill on that worker) is passed over while on-time requests of the
worker's queue wait, and takes the slots they leave: under overload a request served
after its deadline is a miss that makes the next ones late too. Latency-sensitive ones
too (a prompt whose prefill alone outlasts a 2 s target): they are not served first.

Dispatch is work-conserving: a worker that has served its whole queue and still has
free slots takes requests of its model that wait in other workers' queues beyond what
those workers can start now, the next ones of each queue first. A plan is a forecast; when a
worker frees up sooner than forecast (shorter outputs than expected), its slots should
not idle until the next re-plan while requests it could serve wait elsewhere.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import compress

from qlmserve.controller.snapshot import ClusterSnapshot, WorkerState, leading_latency_sensitive
from qlmserve.operations.batching import PreemptionMode, batch_limit, ls_prefill_budget, prioritized
from qlmserve.operations.ops import Capability, Evict, LoadModel, Operation, SetPreemption, SwapIn, SwapOut
from qlmserve.operations.plan import Plan


@dataclass(frozen=True)
class Assignment:
    worker_id: str
    group_id: str
    request_id: str


@dataclass
class _Room:
    """What one worker can take this tick."""

    worker: WorkerState
    slots: int  # batch slots (best-effort work fills only these)
    ls_extra: int  # room beyond the batch limit that latency-sensitive requests may take
    prioritized: bool = False  # LS first at its engine (ITERATION / EXPERT, in force or planned)
    switch_extra: int | None = None  # ls_extra under ITERATION, when dispatch may switch it there
    ahead_ls: int = 0  # prompt tokens of LS requests handed over and not yet prefilled
    ahead_all: int = 0  # the same of every request
    in_flight_s: float = 0.0  # a best-effort iteration running now, whole (see _in_flight_s)

    def ls_start(self, tokens: int, slack_s: float) -> tuple[float, bool] | None:
        """(about when an LS request of `tokens` prompt tokens handed over now gets its first
        token, whether the worker must switch to ITERATION for it), or None when it has no
        room. Its engine prefills first the LS prompts ahead, in LS-only iterations
        (ITERATION / EXPERT), or every prompt ahead (NONE), then its own
        (operations/batching.py, NOTE for the estimator), after the best-effort iteration
        in flight (`in_flight_s`). A worker under NONE switches only when the request would
        miss there and has time under ITERATION:
        LS-only iterations pause the best-effort decode, and LS requests beyond the batch
        limit push best-effort KV out (always switching cost 3 points on ls2)."""
        t = self.worker.profile.prefill_time
        if self.prioritized:
            return (self.in_flight_s + self._ls_only_s(tokens), False) if self.slots + self.ls_extra > 0 else None
        w = self.worker
        # under NONE each iteration also carries the running batch's decode step
        chunks = -(-(self.ahead_all + tokens) // max(1, w.max_prefill_tokens))
        plain = t(self.ahead_all + tokens) + chunks * w.profile.decode_step_time(max(1, w.active))
        if self.switch_extra is None:
            return (plain, False) if self.slots > 0 else None
        if self.slots > 0 and plain <= slack_s:
            return (plain, False)
        return (self.in_flight_s + self._ls_only_s(tokens), True) if self.slots + self.switch_extra > 0 else None

    def _ls_only_s(self, tokens: int) -> float:
        """Seconds of the LS-only iterations that prefill an LS prompt of `tokens`."""
        p, w = self.worker.profile, self.worker
        total = self.ahead_ls + tokens
        chunks = -(-total // max(1, ls_prefill_budget(w.max_prefill_tokens)))
        return p.prefill_time(total) + (chunks - 1) * p.prefill_base_s


def _in_flight_s(w: WorkerState, mode: PreemptionMode, ahead_ls: int, ahead_all: int) -> float:
    """The best-effort iteration a worker runs now, whole, that an LS request handed over
    waits for before its LS-only iterations: a prefill chunk while a prompt is pending
    (`ahead_all` tokens), beside the decode step of its batch. None while LS prompts are
    prefilling there (the iteration is theirs, in `ahead_ls`) or under EXPERT (the pass
    pauses at its next layer). Under NONE its chunk is in `ahead_all` already."""
    if not w.active or mode == PreemptionMode.EXPERT or ahead_ls:
        return 0.0
    chunk = min(ahead_all, w.max_prefill_tokens)
    return (w.profile.prefill_time(chunk) if chunk else 0.0) + w.profile.decode_step_time(w.active)


def dispatch(plan: Plan, snapshot: ClusterSnapshot, max_running_per_worker: int,
             may_preempt: bool = False) -> tuple[list[Assignment], list[Operation]]:
    """The requests each worker takes now and the mechanism operations that go with them.
    `may_preempt`: the policy enables the preempt operation, so a worker handed a
    latency-sensitive request may be switched to iteration-level preemption for it."""
    groups = snapshot.by_group_id
    planned_loads = {op.worker_id: op.model for op in plan.operations if isinstance(op, LoadModel)}
    # Requests the plan takes off a device (eviction, KV swap-out) free their slots for the
    # requests it dispatches with them, and those it swaps back in take slots: the worker
    # runs its operations first.
    freed: dict[str, int] = {}
    for op in plan.operations:
        if isinstance(op, (Evict, SwapOut, SwapIn)):
            n = len(op.request_ids) * (-1 if isinstance(op, SwapIn) else 1)
            freed[op.worker_id] = freed.get(op.worker_id, 0) + n
    assignments: list[Assignment] = []
    ops: list[Operation] = []
    spare: dict[str, int] = {}  # worker -> free slots left after its whole queue
    # The preemption mode each worker runs under once the plan's operations are done: under
    # ITERATION / EXPERT latency-sensitive requests join beyond the batch limit.
    modes = {op.worker_id: op.mode for op in plan.operations if isinstance(op, SetPreemption)}
    rooms: dict[str, _Room] = {}
    for w in snapshot.workers:
        if not w.accepts_work or w.loading_model is not None:
            continue
        if planned_loads.get(w.worker_id, w.active_model) != w.active_model:
            continue  # a planned model swap comes first; requests follow once it is done
        limit = min(w.max_batch_size, max_running_per_worker)
        mode = modes.get(w.worker_id, w.preemption_mode)
        pending = [r for r in w.running if r.first_token_at is None and not r.swapped]
        ahead_ls = sum(r.prompt_tokens + r.generated_tokens for r in pending if r.latency_sensitive)
        ahead_all = sum(r.prompt_tokens + r.generated_tokens for r in pending)
        switch = may_preempt and not prioritized(mode) and w.supports(Capability.ITERATION_PREEMPTION)
        rooms[w.worker_id] = _Room(
            w, limit - (w.active - freed.get(w.worker_id, 0)), batch_limit(mode, True, limit) - limit,
            prioritized(mode), batch_limit(PreemptionMode.ITERATION, True, limit) - limit if switch else None,
            ahead_ls, ahead_all, _in_flight_s(w, mode, ahead_ls, ahead_all))
    taken: set[str] = set()
    if plan.latency_sensitive_first:
        assignments += _latency_sensitive_first(plan, groups, rooms, snapshot.now, ops)
        taken = {a.request_id for a in assignments}
    for wid, room in rooms.items():
        w = room.worker
        slots, ls_extra = room.slots, room.ls_extra
        resumed = _swap_ins(w, plan, groups, slots, ls_extra, taken)
        if resumed is not None:
            ops.append(resumed)
            slots -= len(resumed.request_ids)
        blocked = False
        late: list[tuple[str, str]] = []  # (group, request) past their deadline, under Plan.late_last
        for gid in plan.virtual_queues.get(wid, []):
            g = groups.get(gid)
            if g is None:
                continue
            extra = ls_extra if g.latency_sensitive else 0
            if slots + extra <= 0:
                break
            if g.model != w.active_model:
                own_running = any(r.model == w.active_model for r in w.running if not r.swapped)
                if not own_running and not any(a.worker_id == wid for a in assignments) \
                        and w.supports(Capability.MODEL_SWAP):
                    ops.append(LoadModel(wid, g.model, reason=f"head group {gid} needs {g.model}"))
                blocked = True
                break  # strict queue order: later groups wait for this one
            for k, rid in enumerate(g.request_ids):
                if slots + extra <= 0:
                    break
                if rid in taken:
                    continue
                if plan.late_last and _late(g, k, snapshot.now, w):
                    late.append((gid, rid))
                    continue
                assignments.append(Assignment(wid, gid, rid))
                slots -= 1
        # Latency-sensitive ones first among the late: a person waits for each, and they are
        # the longest prompts (their prefill alone outlasts the target): left to the end of
        # a drain they ran on a few workers while the rest idled (on ls2m the run's
        # throughput fell to 0.96x FCFS's; longest first among the rest too: 0.96x as well).
        late.sort(key=lambda x: not groups[x[0]].latency_sensitive)
        for gid, rid in late:
            if slots <= 0:
                break
            assignments.append(Assignment(wid, gid, rid))
            slots -= 1
        if slots > 0 and not blocked and w.active_model is not None:
            spare[wid] = slots
    if spare:
        assignments.extend(_backfill(plan, snapshot, groups, spare, assignments))
    return assignments, ops


def _late(g, k: int, now: float, w: WorkerState | None) -> bool:
    """Plan.late_last: whether request `k` of `g` can no longer have its first token by its
    deadline (on `w`: its prefill there too). A latency-sensitive one too: a prompt whose
    own prefill outlasts its target is a miss wherever it runs, and its class's run_late
    serves it after the requests that can still meet theirs."""
    return g.arrivals[k] + g.ttft_s < now + (w.profile.prefill_time(g.prompt_tokens[k]) if w is not None else 0.0)


def _latency_sensitive_first(plan: Plan, groups: dict, rooms: dict[str, _Room], now: float,
                             ops: list[Operation]) -> list[Assignment]:
    """Plan.latency_sensitive_first: every waiting latency-sensitive request takes room before
    any best-effort request does, on its planned worker if that worker has room for it
    (a free slot, or the engine's room beyond the batch limit) and would give it its first
    token in time, else on the worker of its model with room that would give it soonest
    (_Room.ls_start; a worker under NONE is switched to ITERATION, in `ops`, when only that
    gives it time). A group is the planner's unit, not a worker's: one holding many
    requests must not trickle through the slots of one worker while others could start
    them now, nor have its prompts prefilled one after another on one worker while others
    could prefill them side by side (on a prompt-heavy trace, LS requests that missed 2 s
    had waited for 26k tokens of other LS prompts on their worker, p50). Requests are taken
    in the plan's order, queue heads first."""
    out: list[Assignment] = []
    order = []
    # Every queued group is looked at each tick (thousands at depth): find the few
    # latency-sensitive ones with one pass over the groups and set lookups per queue.
    ls = {gid for gid, g in groups.items() if g.latency_sensitive}
    for wid, q in plan.virtual_queues.items():
        for pos, gid in compress(enumerate(q), map(ls.__contains__, q)):
            order.append((pos, groups[gid].deadline, gid, wid))
    for _pos, _dl, gid, wid in sorted(order):
        g = groups[gid]
        for k, rid in enumerate(g.request_ids):
            if plan.late_last and _late(g, k, now, rooms[wid].worker if wid in rooms else None):
                continue  # it takes its place among the late ones of its worker's queue
            tokens, slack = g.prompt_tokens[k], g.arrivals[k] + g.ttft_s - now
            starts = {r.worker.worker_id: s for r in rooms.values() if r.worker.active_model == g.model
                      and (s := r.ls_start(tokens, slack)) is not None}
            if not starts:
                break
            best = min(starts, key=lambda x: (starts[x][0], -(rooms[x].slots + rooms[x].ls_extra), x))
            chosen = wid if wid in starts and (starts[wid][0] <= slack or starts[wid][0] <= starts[best][0]) else best
            room = rooms[chosen]
            if starts[chosen][1]:
                # It would wait behind the best-effort prompts admitted before it (on a
                # prompt-heavy trace, 76k tokens of them, p50, for those that missed 2 s).
                ops.append(SetPreemption(chosen, PreemptionMode.ITERATION, reason="a latency-sensitive request "
                                                                                 "would miss behind best-effort prefill"))
                room.prioritized, room.ls_extra, room.switch_extra = True, room.switch_extra, None
            out.append(Assignment(chosen, gid, rid))
            room.ahead_ls += tokens
            room.ahead_all += tokens
            if room.slots > 0:
                room.slots -= 1
            else:
                room.ls_extra -= 1
    return out


def _swap_ins(w: WorkerState, plan: Plan, groups: dict, slots: int, ls_extra: int, taken: set[str]) -> SwapIn | None:
    """The swapped-out requests of the active model that resume now (see the module doc):
    into the slots the leading latency-sensitive groups leave (beyond `ls_extra`, the
    slots those may take past the batch limit; requests already `taken` are counted in
    `slots`)."""
    swapped = [r for r in w.running if r.swapped and r.model == w.active_model]
    if not swapped or not w.supports(Capability.KV_SWAP) or any(isinstance(op, SwapIn) and op.worker_id == w.worker_id for op in plan.operations):
        return None
    ls = sum(sum(1 for rid in g.request_ids if rid not in taken) for g in leading_latency_sensitive(
        groups.get(gid) for gid in plan.virtual_queues.get(w.worker_id, [])))
    slots -= max(0, ls - ls_extra)
    kv_free = w.kv_free_tokens
    out = []
    for r in sorted(swapped, key=lambda r: (r.arrival, r.request_id)):
        tokens = r.prompt_tokens + r.generated_tokens
        if slots <= 0 or tokens > kv_free:
            break
        out.append(r.request_id)
        slots -= 1
        kv_free -= tokens
    return SwapIn(w.worker_id, tuple(out), reason="free slots") if out else None


def _backfill(plan: Plan, snapshot: ClusterSnapshot, groups: dict, spare: dict[str, int],
              assignments: list[Assignment]) -> list[Assignment]:
    """Free slots left after a worker's own queue take the waiting requests other queues
    cannot start now, of the worker's active model: the next ones of each queue first (the
    plan's own order is the policy's priority: FCFS's arrival order, EDF's deadlines,
    QLM's plan), then earliest deadline first across queues; under Plan.late_last the
    requests past their deadline after every on-time one, latency-sensitive ones first."""
    taken = {a.request_id for a in assignments}
    left: list[tuple[tuple, str, str, int]] = []  # (order, group, model, prompt tokens)
    for wid, queue in plan.virtual_queues.items():
        rank = 0
        for gid in queue:
            g = groups.get(gid)
            if g is None:
                continue
            for k, rid in enumerate(g.request_ids):
                if rid not in taken:
                    late = plan.late_last and _late(g, k, snapshot.now, None)
                    left.append(((late, late and not g.latency_sensitive, rank,
                                  g.deadline + (g.arrivals[k] - g.arrivals[0]), rid), gid, g.model, g.prompt_tokens[k]))
                    rank += 1
    if not left:
        return []
    left.sort()
    workers = {w.worker_id: w for w in snapshot.workers}
    out: list[Assignment] = []
    for wid in sorted(spare, key=lambda wid: -spare[wid]):
        w = workers[wid]
        kv_free = w.kv_free_tokens
        n = spare[wid]
        rest = []
        for item in left:
            if n > 0 and item[2] == w.active_model and item[3] < kv_free:
                kv_free -= item[3]
                out.append(Assignment(wid, item[1], item[0][-1]))
                n -= 1
            else:
                rest.append(item)
        left = rest
    return out
