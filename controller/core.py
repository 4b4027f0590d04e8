"""The controller: admission, the tick loop, and the worker sessions.

Every tick reads like this:
    snapshot = await self.snapshot()        # groups + workers, from Redis
    plan = await self.plan(snapshot)        # the policy, a pure function, in a thread
    await self.apply(plan, snapshot)        # virtual queues to Redis, work and ops to workers

The controller holds no state that Redis does not also hold: its in-memory maps are
caches (request metadata, which never changes) and the live worker sessions, which
workers re-establish when a controller restarts.

(Over 500 lines: the worker-session methods are the next thing to move to a file of their
own; they stay here while snapshot() changes on another branch, to keep that merge simple.)
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

from qlmserve.controller import admission, validation
from qlmserve.controller.clock import Clock, WallClock
from qlmserve.controller.cluster_view import (
    ClusterView,
    GroupView,
    RequestView,
    StateCache,
    build_snapshot,
    learned_lengths,
    missed_while_waiting,
    running_request,
    without,
)
from qlmserve.controller.dispatch import dispatch
from qlmserve.controller.estimator import Moments, RecentMoments, predict_group_wait
from qlmserve.controller.exceptions import (  # noqa: F401 - re-exported
    IdempotencyConflict,
    InvalidRequest,
    NotLeader,
    Overloaded,
    UnknownModel,
    UnknownRequest,
    UnknownWorker,
    WorkerIdInUse,
)
from qlmserve.controller.length_band import length_band
from qlmserve.controller.metrics import ControllerMetrics
from qlmserve.controller.policies import SchedulingPolicy, create_policy
from qlmserve.controller.policy import PolicyConfig, SloClass
from qlmserve.controller.prefix_affinity import prompt_blocks
from qlmserve.controller.request import Request, RequestStatus
from qlmserve.controller.snapshot import ClusterSnapshot
from qlmserve.controller.store import GroupRecord, RedisStore, SubmitResult
from qlmserve.controller.tokenizers import TokenizerCache
from qlmserve.controller.waiting_view import WaitingView
from qlmserve.controller.worker_acl import WorkerAcl
from qlmserve.controller.workers import OpCommand, RunCommand, WorkerHandle, WorkerReport, next_op_id
from qlmserve.operations.ops import LoadModel, MoveGroup, Operation, SetPreemption
from qlmserve.operations.plan import Plan

log = logging.getLogger("qlm.controller")

# Shortest time between the end of one tick and the start of an early (woken) one.
MIN_TICK_GAP_S = 0.02
# How long a new leader waits for the workers of the previous one to dial in before it
# requeues the requests of those that did not (capped by heartbeat_timeout_s).
RECONNECT_GRACE_S = 2.0


@dataclass
class SubmitInput:
    """A submission as the caller sent it; Controller.submit validates every field."""

    model: str
    slo_class: str
    prompt: str | None
    prompt_token_ids: list[int] | None
    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0  # 0 or 1: off
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()
    user_id: str = ""
    idempotency_key: str = ""
    tenant: str = ""  # from the caller's credential, never from the request body


@dataclass(frozen=True)
class _Meta:
    """The parts of a request that never change, cached to build snapshots cheaply."""

    model: str
    slo_class: str
    group_id: str
    arrival: float
    prompt_tokens: int
    max_tokens: int
    ttft_slo_s: float
    latency_sensitive: bool
    session: str = ""  # stickiness key: the client's user_id
    prefix_blocks: tuple[int, ...] = ()  # its prompt's chain keys (controller/prefix_affinity.py)
    length_band: int = 0  # controller/length_band.py, as stored at submission


# The request hash fields a _Meta is read from (controller/request.py to_redis), + generated.
_META_FIELDS = ("model", "slo_class", "group_id", "arrival", "prompt_tokens", "max_tokens", "ttft_slo", "ls",
                "generated", "user_id", "length_band")


class Controller:
    def __init__(self, store: RedisStore, policy: PolicyConfig, *, redis_url: str, policy_path: str | None = None,
                 clock: Clock | None = None, metrics: ControllerMetrics | None = None,
                 policy_dir: str | Path | None = None, worker_redis_url: str | None = None) -> None:
        self.store = store
        self.redis_url = redis_url
        self.policy_path = policy_path
        # The only folder ReloadPolicy reads files from (default: the started policy's folder).
        self.policy_dir: Path | None = (Path(policy_dir).resolve() if policy_dir else
                                        Path(policy_path).resolve().parent if policy_path else None)
        self.clock = clock or WallClock()
        self.metrics = metrics or ControllerMetrics()
        self.workers: dict[str, WorkerHandle] = {}
        self._sessions = 0
        self._meta: dict[str, _Meta] = {}
        # Tokens a waiting request produced before it was requeued (they change only on a
        # requeue, which this controller performs, or are read with the request's meta).
        self._waiting_generated: dict[str, int] = {}
        self._ttft_cursor: str | None = None  # last latency log entry put in the histograms
        self._load_kind: dict[str, str] = {}  # load_model op id -> "warm" | "cold", until its result
        # Waiting groups, updated from the changes stream (controller/waiting_view.py), and
        # each group's view, rebuilt only when the group changed: a tick costs what changed.
        self.waiting = WaitingView()
        self._group_views: dict[str, GroupView] = {}
        self._wake = asyncio.Event()
        self._stopping = False
        self.tick_count = 0
        self.last_tick_s: dict[str, float] = {}  # the last tick's parts (snapshot, plan, apply), seconds
        self.last_plan: Plan = Plan.make_empty()
        self._solved_plan: Plan | None = None  # the last plan the policy solved (kept plans reuse it)
        self.last_snapshot: ClusterSnapshot | None = None
        self._started_at = self.clock.now()
        self.drain_rate = admission.DrainRate()
        self.acl = WorkerAcl(store.r, store.k, redis_url, worker_redis_url)
        self.is_leader = True  # a standby (leader.LeaderLease) sets it False until it takes over
        self._housekept_at = 0.0
        self._orphans_checked_at = float("-inf")
        self._set_policy(policy)

    # ---- policy -----------------------------------------------------------------------

    def _set_policy(self, policy: PolicyConfig) -> None:
        self.policy = policy
        self.store.retention_s = policy.finished_retention_s
        self.scheduler: SchedulingPolicy = create_policy(policy.planner.policy, policy)
        self.tokenizers = TokenizerCache(policy.models)
        self._recent_lengths = RecentMoments(policy.planner.length_half_life_s)
        self._states = StateCache()  # planner states of unchanged group views, reused (cluster_view)

    async def warm_up(self) -> None:
        """Load tokenizers off the event loop so the first submission does not stall it."""
        await asyncio.to_thread(self.tokenizers.load_all)

    async def reload_policy(self, policy: PolicyConfig) -> None:
        """Swap the policy between ticks. Everything new is built first, so a failure leaves
        the running policy in place. Waiting and running requests keep their stored SLO
        targets; requests of a class the new policy drops still complete."""
        scheduler = create_policy(policy.planner.policy, policy)
        tokenizers = TokenizerCache(policy.models)
        await asyncio.to_thread(tokenizers.load_all)
        self.policy, self.scheduler, self.tokenizers = policy, scheduler, tokenizers
        self._states = StateCache()  # states follow the policy's classes
        self.store.retention_s = policy.finished_retention_s
        self._recent_lengths.half_life_s = policy.planner.length_half_life_s
        self._solved_plan = None  # the new policy plans from scratch
        self._wake.set()

    def slo_of(self, name: str) -> SloClass | None:
        return self.policy.slo_classes.get(name)

    # ---- admission --------------------------------------------------------------------

    async def submit(self, inp: SubmitInput) -> tuple[SubmitResult, int]:
        """Validate, tokenize, admit and make a request durable. Returns (result, prompt tokens)."""
        lim = self.policy.limits
        validation.name(inp.model, "model", lim, required=True)
        validation.name(inp.slo_class, "slo_class", lim)
        validation.text(inp.user_id, "user_id", lim.max_user_id_chars)
        validation.text(inp.idempotency_key, "idempotency_key", lim.max_idempotency_key_chars)
        spec = self.policy.models.get(inp.model)
        if spec is None:
            raise UnknownModel(f"field 'model': the policy serves no such model (one of {sorted(self.policy.models)})")
        cls_name = inp.slo_class or self.policy.default_slo_class or ""
        if not cls_name:
            raise InvalidRequest(f"field 'slo_class' is required (one of {sorted(self.policy.slo_classes)})")
        slo = self.slo_of(cls_name)
        if slo is None:
            raise InvalidRequest(f"field 'slo_class': no such class; valid classes: {sorted(self.policy.slo_classes)}")
        if inp.max_tokens <= 0:
            raise InvalidRequest("field 'max_tokens' must be at least 1")
        if slo.admission.max_tokens is not None and inp.max_tokens > slo.admission.max_tokens:
            raise InvalidRequest(f"field 'max_tokens': {inp.max_tokens} exceeds the {cls_name!r} limit "
                                 f"of {slo.admission.max_tokens}")
        vocab = self.tokenizers.vocab_size(inp.model)
        s = validation.sampling(inp.temperature, inp.top_p, inp.seed, inp.stop_token_ids, lim, vocab)
        if inp.prompt_token_ids is not None:
            ids = validation.token_ids(inp.prompt_token_ids, "prompt_token_ids", vocab, lim.max_prompt_token_ids)
        elif inp.prompt:
            validation.text(inp.prompt, "prompt", lim.max_prompt_chars)
            ids = await asyncio.to_thread(self.tokenizers.encode, inp.model, inp.prompt)
        else:
            raise InvalidRequest("field 'prompt' or 'prompt_token_ids' is required and must not be empty")
        if not ids:
            raise InvalidRequest("field 'prompt': the prompt has no tokens")
        if len(ids) + inp.max_tokens > spec.max_context:
            raise InvalidRequest(f"field 'prompt': {len(ids)} prompt tokens + max_tokens {inp.max_tokens} exceed "
                                 f"the context of the model ({spec.max_context})")
        if slo.admission.max_prompt_tokens is not None and len(ids) > slo.admission.max_prompt_tokens:
            raise InvalidRequest(f"field 'prompt': {len(ids)} tokens exceed the {cls_name!r} limit of "
                                 f"{slo.admission.max_prompt_tokens}")
        now = self.clock.now()
        req = Request(request_id=RedisStore.new_request_id(), model=inp.model, slo_class=cls_name,
                      prompt_token_ids=ids, max_tokens=inp.max_tokens, arrival=now, ttft_slo_s=slo.ttft_s,
                      latency_sensitive=slo.latency_sensitive, priority=slo.priority, sampling=s,
                      user_id=inp.user_id, tenant=inp.tenant,
                      length_band=length_band(len(ids), self.policy.grouping.length_bands_per_octave,
                                              slo.latency_sensitive))
        res = await self.store.submit(req, now, self.policy.grouping, inp.idempotency_key,
                                      admission.limits_for(self.policy, slo, inp.tenant))
        if res.refused is not None:
            self.metrics.rejected.labels("overloaded").inc()
            limit, queued, cap = res.refused
            raise admission.refusal(self.policy, cls_name, limit, queued, cap, self.drain_rate, self.clock.now())
        if res.conflict:
            raise IdempotencyConflict("field 'idempotency_key': already used for a request with other content")
        if not res.duplicate:
            self.metrics.submitted.labels(inp.model, cls_name).inc()
            self._meta[req.request_id] = _Meta(req.model, cls_name, res.group_id, now, len(ids), req.max_tokens,
                                               slo.ttft_s, slo.latency_sensitive, req.user_id,
                                               prompt_blocks(ids, self.policy), req.length_band)
            if slo.latency_sensitive or slo.ttft_s <= self.policy.tick_interval_ms / 1000 * 10:
                self._wake.set()  # a request at risk: plan now, not at the next timer tick
        return res, len(ids)

    async def cancel(self, rid: str) -> Request:
        validation.request_id(rid)
        res = await self.store.finish_early(rid, RequestStatus.CANCELLED, self.clock.now(), "cancelled by client")
        if res is not None:
            _prev, wid = res
            if wid and wid in self.workers:
                self.workers[wid].send(OpCommand(next_op_id(), "abort", (rid,)))
            self._meta.pop(rid, None)
            self._wake.set()  # a slot may be free
        req = await self.store.get_request(rid)
        if req is None:
            raise UnknownRequest("field 'request_id': no such request")
        return req

    async def get_request(self, rid: str) -> Request:
        validation.request_id(rid)
        req = await self.store.get_request(rid)
        if req is None:
            raise UnknownRequest("field 'request_id': no such request")
        return req

    # ---- the tick ---------------------------------------------------------------------

    async def run(self) -> None:
        """Tick on a timer, and early when something wakes the loop (a request at risk, a
        worker event). Early ticks keep a minimum gap, so that a burst of arrivals shares
        one plan instead of starving submissions with back-to-back ticks."""
        loop = asyncio.get_running_loop()
        last_end = 0.0
        while not self._stopping:
            try:
                await asyncio.wait_for(self._wake.wait(), timeout=self.policy.tick_interval_ms / 1000)
            except asyncio.TimeoutError:
                pass
            gap = MIN_TICK_GAP_S - (loop.time() - last_end)
            if gap > 0 and not self._stopping:
                await asyncio.sleep(gap)
            self._wake.clear()
            if not self.is_leader:
                try:  # a standby serves the Client and Admin APIs (its retry hints need the drain rate)
                    await self._housekeeping()
                except Exception:  # noqa: BLE001 - Redis away: try again next round
                    pass
                continue
            try:
                await self.tick()
            except Exception:  # noqa: BLE001 - one bad tick (Redis blip) must not stop the loop
                log.exception("tick failed; retrying next tick")
                await asyncio.sleep(min(1.0, self.policy.tick_interval_ms / 1000))
            last_end = loop.time()

    def stop(self) -> None:
        self._stopping = True
        self._wake.set()

    def take_over(self, lease: str) -> None:
        """This controller now holds the leader lease `lease` (leader.LeaderLease): plan from
        scratch, and give workers a heartbeat's time to dial in before requeueing theirs."""
        self.store.fence = lease
        self.is_leader = True
        self._started_at = self.clock.now()
        self._solved_plan = None
        self.waiting.reset()  # another controller led meanwhile: read everything again
        self._wake.set()

    def lost_lease(self) -> None:
        """Redis refused a write fenced by the leader lease: another controller leads. Stop
        planning and end every worker session (the workers redial the new leader)."""
        if not self.is_leader or self._stopping:
            return
        log.warning("lost the leader lease: standing by")
        self.is_leader = False
        self.store.fence = "-"  # any later fenced write is refused until the lease is won again
        for h in list(self.workers.values()):
            h.close()
        self.workers.clear()

    async def tick(self) -> Plan:
        t0 = time.perf_counter()
        await self._expire_silent_workers()
        await self._housekeeping()
        snapshot = await self.snapshot()
        self._prune_meta(snapshot)
        t1 = time.perf_counter()
        plan = await self.plan(snapshot)
        t2 = time.perf_counter()
        await self.apply(plan, snapshot)
        t3 = time.perf_counter()
        self.tick_count += 1
        self.last_tick_s = {"snapshot": t1 - t0, "plan": t2 - t1, "apply": t3 - t2}  # for `qlm bench-depth`
        self.metrics.tick_seconds.observe(t3 - t0)
        return plan

    async def snapshot(self) -> ClusterSnapshot:
        """The planner's input, built by the one builder the simulator uses too
        (controller/cluster_view.py) from this controller's view of Redis and its workers."""
        view = await self.view()
        missed = missed_while_waiting(view, self.policy)
        for r in missed:
            await self.store.finish_early(r.request_id, RequestStatus.FAILED, view.now,
                                          "TTFT target missed before it started (class fails fast)")
            self.metrics.rejected.labels("missed_while_waiting").inc()
        view = without(view, {r.request_id for r in missed})
        running = [running_request(r, self.policy) for w in view.workers for r in w.running]
        observed = {key: Moments(n, s, ss) for key, (n, s, ss) in (await self.store.length_counts()).items()}
        lengths = learned_lengths(self.policy, self._recent_lengths.update(view.now, observed), running)
        snap = build_snapshot(view, self.policy, self.last_plan.placement(), lengths, self._states)
        self.last_snapshot = snap
        self._update_gauges(snap)
        return snap

    async def view(self) -> ClusterView:
        """Groups and their waiting requests from Redis; workers from their reports and the
        running sets in Redis, with each running request's progress."""
        now = self.clock.now()
        changed, left, full = await self.waiting.refresh(self.store)
        if full:
            self._group_views.clear()
        gone = [gid for gid in changed if gid not in self.waiting.groups]
        for gid in changed:
            self._group_views.pop(gid, None)
        if gone:
            await self.store.drop_empty_groups([GroupRecord(gid, "", "", 0.0, ()) for gid in gone])
            self._states.forget(self.waiting.groups)
        for rid in left:
            self._waiting_generated.pop(rid, None)
        running_by_worker = await self.store.running_of(list(self.workers))
        need = [rid for gid in changed if gid in self.waiting.groups
                for rid in self.waiting.groups[gid].waiting if rid not in self._meta]
        need += [rid for r in running_by_worker.values() for rid in r if rid not in self._meta]
        await self._load_meta(need)
        progress = await self.store.progress_of([rid for r in running_by_worker.values() for rid in r])
        await self._observe_ttfts()
        groups = tuple(self._group_view(g) for g in self.waiting.ordered())
        workers = []
        for wid, h in self.workers.items():
            rep_running = h.report.running if h.report else {}
            running = []
            for rid in running_by_worker.get(wid, {}):
                if rid not in self._meta:
                    continue
                gen, first = progress.get(rid, (0, None))
                running.append(self._request_view(rid, gen, first, swapped=rep_running.get(rid, (0, False))[1]))
            workers.append(h.view(tuple(running), healthy=h.connected and h.report is not None))
        return ClusterView(now=now, groups=groups, workers=tuple(workers),
                           model_bytes={n: s.weight_bytes or 0 for n, s in self.policy.models.items()})

    def _group_view(self, g) -> GroupView:
        gv = self._group_views.get(g.group_id)
        if gv is None:
            gv = self._group_views[g.group_id] = GroupView(
                g.group_id, g.model, g.slo_class, g.created_at,
                tuple(self._request_view(rid) for rid in g.waiting if rid in self._meta))
        return gv

    def _request_view(self, rid: str, generated: int | None = None, first_token_at: float | None = None,
                      swapped: bool = False) -> RequestView:
        m = self._meta[rid]
        gen = self._waiting_generated.get(rid, 0) if generated is None else generated
        return RequestView(rid, m.group_id, m.model, m.slo_class, m.arrival, m.prompt_tokens, m.max_tokens, gen,
                           first_token_at, swapped, m.ttft_slo_s, m.latency_sensitive, m.prefix_blocks,
                           m.session, m.length_band)

    def _prune_meta(self, snap: ClusterSnapshot) -> None:
        """The metadata cache holds the requests alive in this snapshot, no more: finished
        ones leave it (it grew by every request ever served before). A request submitted
        meanwhile and pruned here is read back from Redis when a snapshot needs it."""
        if len(self._meta) <= 2 * (sum(g.size for g in snap.groups) + sum(len(w.running) for w in snap.workers)) + 64:
            return
        alive = {rid for g in snap.groups for rid in g.request_ids}
        alive.update(r.request_id for w in snap.workers for r in w.running)
        self._meta = {rid: m for rid, m in self._meta.items() if rid in alive}

    async def _housekeeping(self) -> None:
        """Once a second: worker ACL users and scripts back after a Redis restart, and the
        drain rate behind the admission retry hints."""
        now = time.monotonic()
        if now - self._housekept_at < 1.0:
            return
        self._housekept_at = now
        await self.acl.ensure()
        stats = await self.store.class_stats()
        self.drain_rate.observe(sum(v.get("finished", 0) for v in stats.values()), now)
        for cls, v in stats.items():
            self.metrics.finished.labels(cls).set(v.get("finished", 0))
            if v.get("finished"):
                self.metrics.slo_attainment.labels(cls).set(v.get("met", 0) / v["finished"])


    async def _observe_ttfts(self) -> None:
        """First tokens and finishes logged by workers since the last tick, into the TTFT
        and TPOT histograms."""
        entries, self._ttft_cursor = await self.store.read_latencies(self._ttft_cursor)
        for kind, model, cls, seconds in entries:
            (self.metrics.ttft if kind == "ttft" else self.metrics.tpot).labels(model, cls).observe(max(0.0, seconds))

    async def _load_meta(self, rids: list[str]) -> None:
        if not rids:
            return
        # The prompt itself only where dispatch keys prefixes (it is the largest field).
        keyed = self.policy.dispatch.prefix_block_tokens > 0
        rows = await self.store.request_fields(rids, _META_FIELDS + (("prompt",) if keyed else ()))
        for rid, (model, cls, gid, arrival, prompt, max_tokens, ttft, ls, gen, user, band, *ids) in rows.items():
            if gen and int(gen):  # requeued with tokens: planned with them (cluster_view.group_state)
                self._waiting_generated[rid] = int(gen)
            blocks = prompt_blocks([int(t) for t in ids[0].split(",") if t], self.policy) if ids and ids[0] else ()
            self._meta[rid] = _Meta(model, cls, gid or "", float(arrival), int(prompt), int(max_tokens), float(ttft),
                                    ls == "1", user or "", blocks, int(band or 0))

    def _update_gauges(self, snap: ClusterSnapshot) -> None:
        keys = [(m, c) for m in self.policy.models for c in self.policy.slo_classes]
        waiting: dict[tuple[str, str], int] = dict.fromkeys(keys, 0)
        running: dict[tuple[str, str], int] = dict.fromkeys(keys, 0)
        for g in snap.groups:
            waiting[g.model, g.slo_class] = waiting.get((g.model, g.slo_class), 0) + g.size
        for w in snap.workers:
            for r in w.running:
                running[r.model, r.slo_class] = running.get((r.model, r.slo_class), 0) + 1
        for (m, c), v in waiting.items():
            self.metrics.waiting.labels(m, c).set(v)
        for (m, c), v in running.items():
            self.metrics.running.labels(m, c).set(v)
        self.metrics.workers.set(sum(1 for w in snap.workers if w.healthy))
        self.metrics.kv_usage.clear()  # workers that left leave no stale series
        self.metrics.kv_used.clear()
        for w in snap.workers:
            if w.healthy and w.kv_capacity_tokens:
                self.metrics.kv_usage.labels(w.worker_id).set(w.kv_used_tokens / w.kv_capacity_tokens)
                self.metrics.kv_used.labels(w.worker_id).set(w.kv_used_tokens)

    async def plan(self, snapshot: ClusterSnapshot) -> Plan:
        if not snapshot.groups and not any(w.running for w in snapshot.workers):
            return Plan(source="idle")
        if not any(w.healthy for w in snapshot.workers):
            # No worker to place work on or to act on: a solve could only return empty
            # queues (and at depth it costs a CPU the submissions need).
            return Plan(source="no-workers")
        plan, solved = await asyncio.to_thread(self.scheduler.next_plan, snapshot, self._solved_plan)
        if solved:
            self._solved_plan = plan
            self.metrics.solve_seconds.labels(plan.source).observe(plan.solve_time_s)
        return plan

    async def apply(self, plan: Plan, snapshot: ClusterSnapshot) -> None:
        self.last_plan = plan
        if not await self.store.save_plan(plan.virtual_queues, plan_to_json(plan, snapshot.now, self.tick_count),
                                          list(self.workers)):
            self.lost_lease()  # another controller leads now: this plan must not be acted on
            return
        assignments, mechanism_ops = dispatch(plan, snapshot, self.policy.max_running_per_worker,
                                               may_preempt="preempt" in self.policy.planner.operations)
        for op in list(plan.operations) + mechanism_ops:
            self._send_operation(op)
        # All assignments in one pipeline, then their requests in one: a tick that starts
        # many requests pays two round trips, not three per request.
        todo = [a for a in assignments if a.worker_id in self.workers and self.workers[a.worker_id].connected]
        attempts = await self.store.assign_many([(a.request_id, a.group_id, a.worker_id) for a in todo],
                                                snapshot.now)
        fenced = next((i for i, at in enumerate(attempts) if at < 0), len(attempts))
        started = [(a, at) for a, at in zip(todo[:fenced], attempts[:fenced]) if at > 0]  # 0: cancelled or taken
        reqs = await self.store.get_requests([a.request_id for a, _ in started])
        for a, attempt in started:
            m = self._meta.get(a.request_id)
            if attempt == 1 and m is not None:
                self.metrics.queue_time.labels(m.model, m.slo_class).observe(max(0.0, snapshot.now - m.arrival))
            req = reqs.get(a.request_id)
            if req is None:
                continue
            gen = await self.store.generated_ids(a.request_id) if req.generated else []
            self.workers[a.worker_id].send(RunCommand(
                req.request_id, attempt, req.model, req.prompt_token_ids, gen, req.max_tokens,
                req.sampling.temperature, req.sampling.top_p, req.sampling.seed, req.sampling.stop_token_ids,
                req.latency_sensitive, req.priority))
        if fenced < len(attempts):
            self.lost_lease()

    def _send_operation(self, op: Operation) -> None:
        if isinstance(op, MoveGroup):
            self.metrics.operations.labels(op.kind.value).inc()
            return  # carried out by the virtual queues themselves
        h = self.workers.get(op.worker_id)
        if h is None or not h.connected:
            return
        kind = op.kind.value
        model = getattr(op, "model", "")
        if isinstance(op, LoadModel):
            if h.pending_kind("load_model") or (h.report and h.report.active_model == op.model):
                return  # already under way or done
        elif h.pending_kind(kind, model) and not getattr(op, "request_ids", ()):
            return
        rids = tuple(getattr(op, "request_ids", ()))
        if rids and any(op2.kind == kind and set(op2.request_ids) & set(rids) for op2 in h.pending.values()):
            return
        self.metrics.operations.labels(kind).inc()
        mode = op.mode.value if isinstance(op, SetPreemption) else ""
        op_id = next_op_id()
        if isinstance(op, LoadModel):  # warm when the worker holds a host-RAM copy (the load metric's label)
            if len(self._load_kind) > 1000:  # results of workers that left never come: keep it bounded
                self._load_kind.clear()
            self._load_kind[op_id] = "warm" if h.report and op.model in h.report.warm_models else "cold"
        h.send(OpCommand(op_id, kind, rids, model, mode, getattr(op, "max_pause_s", 0.0)))

    # ---- worker sessions --------------------------------------------------------------

    async def worker_connected(self, wid: str, engine: str, device: str, models: list[str],
                               running: dict[str, int]) -> tuple[WorkerHandle, list[str]]:
        """Register a (re)connecting worker and reconcile what it holds with Redis.
        Returns its handle and the request ids it must drop. A second session for a worker
        id whose session is live is refused (WorkerIdInUse): one id, one engine."""
        old = self.workers.get(wid)
        now = self.clock.now()
        if old is not None and old.connected and now - old.last_seen <= self.policy.heartbeat_timeout_s:
            raise WorkerIdInUse("field 'hello.worker_id': a live session already serves this worker id")
        if old is not None:
            old.close()
        self._sessions += 1
        h = WorkerHandle(wid, engine, device, models, session=self._sessions, last_seen=now)
        self.workers[wid] = h
        in_redis = await self.store.worker_running(wid)
        abort = [rid for rid, att in running.items() if in_redis.get(rid) != att]
        for rid, att in in_redis.items():
            if running.get(rid) != att:
                await self._requeue(rid, wid, now)
        await self.store.put_worker(wid, {"engine": engine, "device": device, "connected": "1", "dead": "0",
                                          "last_seen": repr(now), "models": ",".join(models)})
        log.info("worker %s connected (session %d, %d running, %d to drop)", wid, h.session, len(running), len(abort))
        self._wake.set()
        return h, abort

    async def worker_redis_url(self, h: WorkerHandle) -> str:
        """The Redis URL of this worker session (its own ACL user where Redis allows it)."""
        return await self.acl.grant(h.worker_id)

    async def worker_report(self, h: WorkerHandle, report: WorkerReport) -> None:
        h.report = report
        h.last_seen = self.clock.now()
        await self.store.put_worker(h.worker_id, {"state": json.dumps(dataclasses.asdict(report)),
                                                  "last_seen": repr(h.last_seen), "connected": "1",
                                                  "draining": "1" if h.draining else "0"})

    async def worker_op_result(self, h: WorkerHandle, op_id: str, kind: str, ok: bool, request_ids: list[str],
                               error: str, seconds: float) -> None:
        """An operation's outcome. A worker may also hand requests back unasked (op_id "",
        kind "evict"), e.g. when a request reached it for a model it no longer has."""
        op = h.pending.pop(op_id, None) if op_id else None
        h.last_seen = self.clock.now()
        if not ok:
            log.warning("worker %s: %s failed: %s", h.worker_id, op.kind if op else op_id, error)
        now = self.clock.now()
        kind = op.kind if op else kind
        load_kind = self._load_kind.pop(op_id, None)
        # A load of the model already active (sent on a stale report) takes no time: no load.
        if kind == "load_model" and ok and op is not None and load_kind is not None and seconds > 0:
            self.metrics.model_loads.labels(op.model, load_kind).inc()
            self.metrics.model_load_seconds.labels(op.model, load_kind).observe(max(0.0, seconds))
        # Requests the worker handed back (evict, or a model swap that evicted its batch).
        if kind in ("evict", "load_model", "drain"):
            for rid in request_ids:
                await self._requeue(rid, h.worker_id, now)
        elif kind in ("swap_out", "swap_in") and ok:
            for rid in request_ids:
                await self.store.set_swapped(rid, h.worker_id, kind == "swap_out")
        self._wake.set()

    async def worker_request_failed(self, h: WorkerHandle, rid: str, attempt: int, error: str) -> None:
        # Only a request this worker holds under that attempt: a worker cannot fail another's.
        res = await self.store.finish_early(rid, RequestStatus.FAILED, self.clock.now(), error, attempt=attempt,
                                            by_worker=h.worker_id)
        if res is not None:
            self._meta.pop(rid, None)
            self._wake.set()

    async def worker_disconnected(self, h: WorkerHandle) -> None:
        """The session ended. Its requests go back to the queue at once (a stream that broke
        is a worker that died or lost its link: waiting for the heartbeat would cost
        heartbeat_timeout_s of every request it held), and its Redis user is deleted, which
        fences it out of Redis if it is still running. A worker that is alive redials,
        reports what it holds, and is told to drop what moved on. The heartbeat stays for
        workers that hang silently with their stream open."""
        if self.workers.get(h.worker_id) is not h:
            return
        h.connected = False
        log.warning("worker %s disconnected", h.worker_id)
        if self._stopping or not self.is_leader:
            return  # a controller going away leaves its workers' requests where they run
        await self.acl.revoke(h.worker_id)
        await self._requeue_all(h.worker_id, self.clock.now())
        await self.store.put_worker(h.worker_id, {"connected": "0"})
        self._wake.set()

    async def _expire_silent_workers(self) -> None:
        now = self.clock.now()
        timeout = self.policy.heartbeat_timeout_s
        for wid, h in list(self.workers.items()):
            if now - h.last_seen > timeout:
                log.warning("worker %s silent for %.1fs: requeueing its requests", wid, now - h.last_seen)
                del self.workers[wid]
                h.close()  # end its session: if it is alive after all, it redials and reconciles
                await self.acl.revoke(wid)
                await self._requeue_all(wid, now)
                await self.store.put_worker(wid, {"connected": "0", "dead": "1"})
        # Workers a previous controller knew that never reconnected: live ones redial within
        # about a second of a new leader, so a dead one's requests wait no longer than this.
        if now - self._started_at > min(timeout, RECONNECT_GRACE_S) and now - self._orphans_checked_at >= 1.0:
            self._orphans_checked_at = now  # once a second: it reads every worker's hash
            for wid, fields in (await self.store.get_workers()).items():
                if wid in self.workers or fields.get("dead") == "1":
                    continue
                if await self.store.worker_running(wid):
                    log.warning("worker %s did not come back: requeueing its requests", wid)
                    await self._requeue_all(wid, now)
                await self.store.put_worker(wid, {"connected": "0", "dead": "1"})

    async def _requeue_all(self, wid: str, now: float) -> None:
        for rid in await self.store.worker_running(wid):
            await self._requeue(rid, wid, now)

    async def _requeue(self, rid: str, wid: str, now: float) -> None:
        m = self._meta.get(rid)
        if m is None:
            await self._load_meta([rid])
            m = self._meta.get(rid)
        if m is None:
            await self.store.r.hdel(self.store.k.worker_running(wid), rid)
            return
        await self.store.requeue(rid, m.group_id, wid, now)
        gen = await self.store.r.hget(self.store.k.req(rid), "generated")
        if gen and int(gen):
            self._waiting_generated[rid] = int(gen)

    async def drain(self, wid: str, requeue_running: bool) -> int:
        h = self.workers.get(wid)
        if h is None:
            raise UnknownWorker("field 'worker_id': no such worker")
        h.draining = True
        await self.store.put_worker(wid, {"draining": "1"})
        n = 0
        if requeue_running:
            running = await self.store.worker_running(wid)
            if running:
                h.send(OpCommand(next_op_id(), "evict", tuple(running)))
                n = len(running)
        self._wake.set()
        return n

    async def undrain(self, wid: str) -> None:
        h = self.workers.get(wid)
        if h is None:
            raise UnknownWorker("field 'worker_id': no such worker")
        h.draining = False
        await self.store.put_worker(wid, {"draining": "0"})
        self._wake.set()

    # ---- admin views ------------------------------------------------------------------

    def predicted_waits(self) -> dict[str, float]:
        snap = self.last_snapshot
        if snap is None:
            return {}
        out = {}
        for g in snap.groups:
            try:
                out[g.group_id] = predict_group_wait(snap, self.last_plan.virtual_queues, g.group_id).mean_s
            except KeyError:
                continue
        return out


def plan_to_json(plan: Plan, now: float, tick: int) -> str:
    ops = []
    for op in plan.operations:
        d = {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(op).items()}
        d["kind"] = op.kind.value
        ops.append(d)
    return json.dumps({"virtual_queues": plan.virtual_queues, "operations": ops, "source": plan.source,
                       "solve_time_s": plan.solve_time_s, "created_at": now, "note": plan.note, "tick": tick,
                       "predicted_attainment": plan.predicted_attainment})
