"""A simulated worker: continuous batching on a WorkerProfile, on the event clock.

Same semantics as backends/sim_engine.py (which runs in real time inside a worker
process), but event-driven so that a fleet of hundreds of workers replays an hour in
minutes: a stretch of decode steps with an unchanged batch is one event, not one per
step. The work of a worker is a sequence of units:

  - iteration: prefill of at most `max_prefill_tokens` prompt tokens (a longer prompt
    goes a chunk per iteration) + one decode step of the running ones (each emits one
    token at its end, a prefilling request at the end of its last chunk);
    time = prefill_time(chunk tokens) + decode_step_time;
  - segment: k decode steps of an unchanged batch, k = steps until the first request
    finishes (or the KV cache fills). Step j lasts a + c*j (context grows by the batch
    each step), so the segment's end is known in closed form. Anything that changes the
    batch (new requests, operations) cuts the segment at the end of its in-flight step;
  - operation: a KV swap or a model load, charged by the profile.

Expert-level preemption (mode EXPERT): a latency-sensitive request handed over while a
pass runs starts at the pass's next layer boundary (pass time / num_layers): its
prefill (its LS-only chunk iterations) is inserted there, its first token comes out at
once, and the paused pass then finishes without recomputation (its end moves by the
inserted prefill). At most `max_pause_s` of prefill is inserted into one unit.

Who joins, in what order, what an iteration prefills and whom KV pressure preempts are
the rules every engine shares (operations.batching.plan_iteration): ITERATION (and
EXPERT) modes admit latency-sensitive requests first, beyond the batch limit when
needed, and prefill them in iterations of their own; NONE admits in arrival order and
mixes prefill with decode.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable
from typing import Protocol

from qlmserve.operations.batching import (
    DEFAULT_MAX_PREFILL_TOKENS,
    BatchView,
    IterationPlan,
    PreemptionMode,
    plan_iteration,
)
from qlmserve.operations.costs import WorkerProfile
from qlmserve.operations.ops import DropWarm, LoadModel, Operation, SetPreemption, WarmModel
from qlmserve.operations.prefix_cache import MOONCAKE_BLOCK_TOKENS, PrefixCache
from qlmserve.sim.clock import EventClock, Timer
from qlmserve.sim.fleet import ModelRuntime, WorkerSpec
from qlmserve.sim.request import SimRequest, SimStatus
from qlmserve.sim.unit import Unit, WorkerCounters
from qlmserve.sim.worker_ops import begin_op, complete_op, warm_model

__all__ = ["SimWorker", "WorkerCounters", "WorkerSink"]


class WorkerSink(Protocol):
    """What a worker tells the simulation."""

    def on_finished(self, req: SimRequest, now: float) -> None: ...

    def on_requeue(self, req: SimRequest, now: float, reason: str) -> None: ...

    def on_worker_changed(self, worker: SimWorker) -> None: ...


class SimWorker:
    def __init__(self, spec: WorkerSpec, clock: EventClock, sink: WorkerSink, *,
                 max_prefill_tokens: int = DEFAULT_MAX_PREFILL_TOKENS) -> None:
        self.spec = spec
        self.worker_id = spec.worker_id
        self.clock = clock
        self.sink = sink
        self.max_prefill_tokens = max_prefill_tokens
        self.active_model: str | None = spec.initial_model
        self.loading_model: str | None = None
        self.warm: dict[str, float] = {m: 0.0 for m in spec.warm_models}  # model -> ready time
        self.mode = spec.preemption
        self.max_pause_s = 2.0
        self.joining: list[SimRequest] = []  # handed over, not admitted yet
        self.running: list[SimRequest] = []  # admitted (KV reserved)
        self.swapped: dict[str, SimRequest] = {}
        self.ops: deque[Operation] = deque()
        self.unit: Unit | None = None
        self._timer: Timer | None = None
        self._admit_seq = 0
        self.version = 0  # bumped on every change the controller can see
        self.counters = WorkerCounters()
        # Prefix cache over the requests' hash ids (operations/prefix_cache.py): bounded by
        # the KV capacity of the model on the device, emptied when another model loads.
        self.prefix = PrefixCache(self.kv_capacity // MOONCAKE_BLOCK_TOKENS, MOONCAKE_BLOCK_TOKENS)

    # ---- what the controller sees -----------------------------------------------------

    @property
    def runtime(self) -> ModelRuntime:
        return self.spec.models[self.active_model] if self.active_model else next(iter(self.spec.models.values()))

    @property
    def profile(self) -> WorkerProfile:
        return self.runtime.profile

    @property
    def kv_capacity(self) -> int:
        return self.runtime.kv_capacity_tokens

    @property
    def kv_used(self) -> int:
        # What every engine counts: prompt + generated (the slot its next step writes
        # included), reserved at admission.
        return sum(r.kv_tokens for r in self.running)

    @property
    def host_kv_used(self) -> int:
        return sum(r.kv_tokens for r in self.swapped.values())

    def queued_prefill_tokens(self) -> int:
        """Prompt tokens still to prefill here: admitted requests' remaining chunks and the
        handed-over ones net of what the prefix cache would save them now."""
        n = sum(r.kv_tokens - r.prefill_done for r in self.running if not r.prefilled)
        return n + sum(r.kv_tokens - self.prefix.peek(r.hash_ids, r.kv_tokens) for r in self.joining)

    def warm_ready(self, now: float) -> frozenset[str]:
        return frozenset(m for m, t in self.warm.items() if t <= now)

    def progress(self, now: float) -> dict[int, int]:
        """Tokens produced since the current segment started: id(request) -> extra tokens."""
        u = self.unit
        if u is None or u.kind != "segment":
            return {}
        n = u.elapsed_steps(now) if u.pause_s == 0 else min(u.elapsed_steps(now), u.steps - 1)
        return {id(r): n for r in u.decode} if n else {}

    def busy(self) -> bool:
        return bool(self.unit or self.joining or self.running or self.ops)

    # ---- input from the controller ------------------------------------------------------

    def assign(self, reqs: Iterable[SimRequest], now: float) -> None:
        for r in reqs:
            r.status = SimStatus.ASSIGNED
            r.worker_id = self.worker_id
            if r.first_dispatch_at is None:
                r.first_dispatch_at = now
            self.joining.append(r)
        self.changed()

    def submit_op(self, op: Operation, now: float) -> bool:
        """Take an operation. Instant ones (warm start, preemption mode) apply now; the rest
        run at the worker's next step boundary. Returns False when it cannot apply."""
        if isinstance(op, WarmModel):
            return warm_model(self, op.model, now)
        if isinstance(op, DropWarm):
            self.warm.pop(op.model, None)
            self.changed()
            return True
        if isinstance(op, SetPreemption):
            self.mode = PreemptionMode(op.mode)
            self.max_pause_s = op.max_pause_s
            self.changed()
            return True
        if isinstance(op, LoadModel):
            if op.model not in self.spec.models:
                self.counters.failed_ops += 1
                return False
            if op.model == (self.loading_model or self.active_model) or any(
                    isinstance(o, LoadModel) and o.model == op.model for o in self.ops):
                return True  # already there or under way
            self.loading_model = op.model
        self.ops.append(op)
        self.changed()
        return True

    def poke(self, now: float) -> None:
        """Something changed: start work when idle, otherwise end the current segment at its
        in-flight step (or insert latency-sensitive prefill at the next layer boundary)."""
        u = self.unit
        if u is None:
            self._start_next(now)
            return
        if self.mode == PreemptionMode.EXPERT and not self.ops and u.kind != "op" and u.pause_s == 0:
            if any(r.latency_sensitive for r in self.joining) and self._expert_pause(u, now):
                return
        if u.kind == "segment":
            self._cut(u, now)

    # ---- unit machinery ---------------------------------------------------------------------

    def schedule(self, u: Unit) -> None:
        """Make `u` the unit in progress; it completes at u.end (worker_ops starts op units)."""
        if self._timer is not None:
            self._timer.cancel()
        self.unit = u
        self._timer = self.clock.call_at(u.end, self._on_unit_end)

    def _cut(self, u: Unit, now: float) -> None:
        if u.pause_s > 0:
            return  # already ends at the end of the paused step
        n = u.elapsed_steps(now)
        # At a step boundary the next step has not started: stop there; otherwise the
        # in-flight step completes.
        keep = n if abs(u.step_end(n) - now) <= 1e-12 else n + 1
        if keep >= u.steps:
            return
        u.steps = keep
        u.end = u.step_end(keep)
        self.schedule(u)

    def _expert_pause(self, u: Unit, now: float) -> bool:
        if u.kind == "segment":
            n = u.elapsed_steps(now)
            if n >= u.steps:
                return False
            pass_start, pass_len = u.step_end(n), u.a + u.c * n
        else:
            if any(r.latency_sensitive for r, _ in u.prefill):
                return False  # it is latency-sensitive work already
            n = 0
            pass_start, pass_len = u.start, u.end - u.start
        layer = pass_len / max(1, u.layers)
        done = math.ceil((now - pass_start) / layer - 1e-9) if layer > 0 else 0
        pause_at = pass_start + done * layer
        if pause_at >= pass_start + pass_len - 1e-12:
            return False
        dur = self._insert_ls_prefill(pause_at)
        if dur <= 0:
            return False
        if u.kind == "segment":
            u.steps = n + 1
            u.end = u.step_end(n + 1)
        u.pause_s = dur
        u.end += dur
        self.counters.expert_preemptions += 1
        self.counters.busy_s += dur
        self.schedule(u)
        self.changed()
        return True

    def _insert_ls_prefill(self, start: float) -> float:
        """LS-only iterations back to back from `start`, while they fit `max_pause_s`
        together; returns their time. Chunk progress is booked now (nothing else runs on
        this worker until they end); each request's first token at its last chunk's end."""
        total = 0.0
        while True:
            plan = plan_iteration(self._view(), ls_only=True)
            dur = self.profile.prefill_time(plan.prefill_tokens)
            if not plan.prefill or total + dur > self.max_pause_s:
                return total
            self._apply(plan)
            total += dur
            done = []
            for r, n in plan.prefill:
                r.expert_preempted = True
                r.prefill_done += n
                if r.prefill_done >= r.kv_tokens:
                    done.append(r)
            self.counters.prefill_tokens += plan.prefill_tokens
            at = start + total
            self.clock.call_at(at, lambda done=done, at=at: self._prefill_done(done, at))

    def _prefill_done(self, reqs: list[SimRequest], now: float) -> None:
        finished = []
        for r in reqs:
            if r.status != SimStatus.RUNNING or r.worker_id != self.worker_id or r.prefilled:
                continue  # evicted or swapped meanwhile
            self._emit_token(r, now)
            if r.generated >= r.output_tokens:
                finished.append(r)
        for r in finished:
            self._finish(r, now)
        self.changed()

    def _on_unit_end(self) -> None:
        now = self.clock.now()
        u, self.unit, self._timer = self.unit, None, None
        if u is not None:
            self._complete(u, now)
        self._start_next(now)

    def _complete(self, u: Unit, now: float) -> None:
        if u.kind == "op":
            complete_op(self, u, now)
            return
        finished: list[SimRequest] = []
        if u.kind == "iter":
            self.counters.iterations += 1
            self.counters.busy_s += u.end - u.start - u.pause_s
            emit = []
            for r, n in u.prefill:
                if r.status == SimStatus.RUNNING and r.worker_id == self.worker_id:
                    r.prefill_done += n
                    if r.prefill_done >= r.kv_tokens:  # its last chunk
                        emit.append(r)
            for r in emit + u.decode:
                if r.status != SimStatus.RUNNING or r.worker_id != self.worker_id:
                    continue
                self._emit_token(r, now)
                if r.generated >= r.output_tokens:
                    finished.append(r)
        else:
            self.counters.iterations += u.steps
            self.counters.busy_s += u.end - u.start - u.pause_s
            for r in u.decode:
                if r.status != SimStatus.RUNNING or r.worker_id != self.worker_id:
                    continue
                r.generated += u.steps
                self.counters.tokens += u.steps
                if r.generated >= r.output_tokens:
                    finished.append(r)
        for r in finished:
            self._finish(r, now)
        self.changed()

    def _emit_token(self, r: SimRequest, now: float) -> None:
        if not r.prefilled and r.hash_ids:
            self.prefix.insert(r.hash_ids)  # its prompt's blocks are now computed
        r.prefilled = True
        r.generated += 1
        self.counters.tokens += 1
        if r.first_token_at is None:
            r.first_token_at = now

    def _finish(self, r: SimRequest, now: float) -> None:
        self.running.remove(r)
        r.status = SimStatus.FINISHED
        r.finished_at = now
        self.sink.on_finished(r, now)

    def _start_next(self, now: float) -> None:
        self.unit = None
        while self.ops:
            if begin_op(self, self.ops.popleft(), now):
                return
        plan = plan_iteration(self._view())
        self._apply(plan)
        if plan.prefill:
            self._start_iter(plan.prefill, plan.decode, now)
        elif plan.decode:
            self._start_segment(plan.decode, now)

    def _view(self) -> BatchView[SimRequest]:
        """The worker's state for the shared batching rules (KV in tokens)."""
        paused = self.unit.prefill if self.unit is not None else ()
        busy = {id(r) for r, _ in paused}
        free = [r for r in self.running if id(r) not in busy]
        serving = self.active_model if self.loading_model is None else None
        return BatchView(
            mode=self.mode, max_batch_size=self.spec.max_batch_size, max_prefill_tokens=self.max_prefill_tokens,
            model=serving, kv_free=self.kv_capacity - self.kv_used, running=len(self.running),
            waiting=self.joining,
            prefilling=[r for r in free if not r.prefilled and r.prefill_done < r.kv_tokens],
            decoding=[r for r in free if r.prefilled],
            kv_need=lambda r: r.kv_tokens + 1, prompt_left=self._prompt_left,
            kv_held=lambda r: r.kv_tokens, admitted_order=lambda r: r.admitted_order,
        )

    def _prompt_left(self, r: SimRequest) -> int:
        """Prompt tokens a request has yet to prefill; one not admitted yet skips what the
        prefix cache holds of it (`_apply` looks the same blocks up when it admits it)."""
        if r.status == SimStatus.RUNNING or r.prefill_done:
            return r.kv_tokens - r.prefill_done
        return r.kv_tokens - self.prefix.peek(r.hash_ids, r.kv_tokens)

    def _apply(self, plan: IterationPlan[SimRequest]) -> None:
        """Carry out a plan's preemptions (recompute later, as vLLM does) and admissions."""
        for r in plan.preempted:
            self.running.remove(r)
            r.prefilled = False
            r.prefill_done = 0
            r.status = SimStatus.ASSIGNED
            r.recomputes += 1
            self.joining.insert(0, r)
            self.counters.recompute_preemptions += 1
        for r in plan.admitted:
            self.joining.remove(r)
            first = r.admitted_order == 0  # its first admission anywhere
            self._admit_seq += 1
            r.admitted_order = self._admit_seq
            r.status = SimStatus.RUNNING
            if r.hash_ids and r.prefill_done == 0:  # its cached prefix skips prefill
                r.cached_tokens = self.prefix.lookup(r.hash_ids, r.kv_tokens)
                r.prefill_done = r.cached_tokens
            if first:  # the hit rate counts each prompt once (not its recomputations), ids or not
                self.counters.prefix_lookup_tokens += r.kv_tokens
                self.counters.prefix_hit_tokens += r.cached_tokens
            if r.generated > 0:
                r.recompute_tokens += r.kv_tokens - r.prefill_done
            self.running.append(r)

    def _start_iter(self, prefill: list[tuple[SimRequest, int]], decode: list[SimRequest], now: float) -> None:
        prof = self.profile
        dur = 0.0
        if prefill:
            tokens = sum(n for _, n in prefill)
            dur += prof.prefill_time(tokens)
            self.counters.prefill_tokens += tokens
        if decode:
            dur += prof.decode_step_time(len(decode), sum(r.kv_tokens for r in decode))
        self.schedule(Unit("iter", now, now + dur, prefill=prefill, decode=decode, layers=self.runtime.num_layers))

    def _start_segment(self, decode: list[SimRequest], now: float) -> None:
        prof = self.profile
        b = len(decode)
        k = min(r.output_tokens - r.generated for r in decode)
        free = self.kv_capacity - self.kv_used
        k = max(1, min(k, free // b))
        ctx = sum(r.kv_tokens for r in decode)
        a = prof.decode_step_time(b, ctx)
        c = prof.decode_per_ctx_token_s * b
        u = Unit("segment", now, 0.0, decode=decode, steps=k, a=a, c=c, layers=self.runtime.num_layers)
        u.end = u.step_end(k)
        self.schedule(u)

    def changed(self) -> None:
        """Tell the simulation (and the controller's view) that this worker changed."""
        self.version += 1
        self.sink.on_worker_changed(self)
