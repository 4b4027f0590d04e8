"""A simulated engine: the `Engine` interface on a calibrated cost model, in real time.

Over 500 lines because it keeps every book a real engine keeps (batching, chunked
prefill, expert-level pauses, KV swap, model loads, the prefix cache) on one state that
the step loop and the operations share, as backends/hf/engine.py does.

A worker process runs it like a GPU engine: `step()` takes as long as the cost model
says one iteration takes (it sleeps on its clock) and returns deterministic
pseudo-random tokens. It keeps the books a real engine keeps: KV-cache capacity in
tokens, running / waiting / swapped requests, the active model, warm copies in host
RAM, and it charges every operation its cost from the `WorkerProfile`.

Iteration semantics (continuous batching, one iteration per `step()`), as every engine
plans it (operations.batching.plan_iteration: admission order, batch limit, KV fit,
prefill budget, preemption victim):
  - admitted requests are prefilled (prompt plus any tokens kept from an earlier run),
    at most `max_prefill_tokens` per iteration (longer prompts a chunk per iteration),
    in the same iteration as one decode step of the running ones; a request emits its
    first token at the end of the iteration holding its last chunk, and each decoding
    one emits one token;
  - iteration time = prefill_time(chunk tokens) + decode_step_time(batch, context);
  - when the KV cache cannot hold the next decode step, the latest-admitted
    best-effort request is preempted by recomputation (back to the front of the
    waiting queue, tokens kept), as vLLM does.

Preemption modes (`set_preemption`):
  - NONE: admission in arrival order; a new request waits for the running iteration.
  - ITERATION: latency-sensitive (then higher-priority) requests are admitted first, and
    an iteration with latency-sensitive prefill prefills only them (their first token
    does not wait for best-effort prefill or the decode step), with 4x the budget
    (operations.batching, LS_PREFILL_FACTOR).
  - EXPERT (QLLM): as ITERATION, and a latency-sensitive request that arrives while an
    iteration runs pauses it at the next layer boundary (iteration time / num_layers);
    its prefill runs and its first token is returned at once; the paused iteration
    resumes in a later `step()` without recomputation. A batch stays paused at most
    `max_pause_s`, then it resumes before further latency-sensitive work.

The time source is injected (`clock`): `RealClock` in a worker, an `EventClock` in
tests, where `sleep` advances simulated time and fires scheduled callbacks (for
instance an `add_request` that lands in the middle of an iteration).
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from qlmserve.backends.engine import (
    Engine,
    EngineError,
    EngineRequest,
    EngineStats,
    FinishReason,
    OpCost,
    PreemptionMode,
    TokenEvent,
)
from qlmserve.operations.batching import DEFAULT_MAX_PREFILL_TOKENS, BatchView, ls_can_start, plan_iteration
from qlmserve.operations.costs import WorkerProfile
from qlmserve.operations.prefix_cache import (
    DEFAULT_REPORTED_BLOCKS,
    ENGINE_BLOCK_TOKENS,
    PrefixCache,
    PrefixReport,
    chain_keys,
)
from qlmserve.sim.clock import Clock, RealClock

from .sim_model import OutputLengths, SimModel, stable_u64
from .sim_sequence import SimIteration, SimSeq

__all__ = ["OutputLengths", "SimEngine", "SimEngineCounters", "SimModel"]  # the engine's vocabulary, one import


@dataclass
class SimEngineCounters:
    """What the engine did; tests and the worker's metrics read it."""

    iterations: int = 0
    tokens: int = 0
    expert_preemptions: int = 0
    recompute_preemptions: int = 0
    swaps_out: int = 0
    swaps_in: int = 0
    loads: int = 0
    busy_s: float = 0.0
    op_s: float = 0.0
    per_op: dict[str, int] = field(default_factory=dict)


class SimEngine(Engine):
    """The `Engine` interface on a `WorkerProfile` cost model (see the module docstring)."""

    def __init__(
        self,
        profile: WorkerProfile,
        models: Mapping[str, SimModel] | list[SimModel],
        *,
        active_model: str | None = None,
        kv_capacity_tokens: int = 100_000,
        max_batch_size: int = 16,
        host_ram_bytes: int = 0,
        host_kv_capacity_tokens: int | None = None,
        warm_models: Sequence[str] = (),
        clock: Clock | None = None,
        seed: int = 0,
        output_lengths: OutputLengths | None = None,
        preemption: PreemptionMode = PreemptionMode.NONE,
        max_pause_s: float = 2.0,
        device: str = "sim",
        max_prefill_tokens: int = DEFAULT_MAX_PREFILL_TOKENS,
        prefix_cache: bool = False,
    ) -> None:
        if isinstance(models, Mapping):
            self._models = dict(models)
        else:
            self._models = {m.name: m for m in models}
        if not self._models:
            raise ValueError("SimEngine needs at least one model")
        if active_model is not None and active_model not in self._models:
            raise ValueError(f"active_model {active_model!r} is not one of {sorted(self._models)}")
        if kv_capacity_tokens < 1 or max_batch_size < 1 or max_prefill_tokens < 1:
            raise ValueError(f"kv_capacity_tokens, max_batch_size and max_prefill_tokens must be >= 1, got "
                             f"{kv_capacity_tokens}, {max_batch_size}, {max_prefill_tokens}")
        self._default_profile = profile
        self._default_kv = kv_capacity_tokens
        self.max_batch_size = max_batch_size
        self.max_prefill_tokens = max_prefill_tokens
        self.host_ram_bytes = host_ram_bytes
        self.host_kv_capacity_tokens = host_kv_capacity_tokens  # swapped-out KV the host holds; None: no limit
        self.clock: Clock = clock if clock is not None else RealClock()
        self.seed = seed
        self.output_lengths = output_lengths or OutputLengths()
        self.mode = PreemptionMode(preemption)
        self.max_pause_s = max_pause_s
        self.device = device
        self.active_model = active_model
        self.counters = SimEngineCounters()

        self._lock = threading.Lock()
        self._inbox: list[EngineRequest] = []  # added from any thread, taken in by step()
        self._aborts: set[str] = set()
        self._ls_signal = threading.Event()  # a latency-sensitive request wants in
        self._waiting: deque[SimSeq] = deque()
        self._running: list[SimSeq] = []
        self._swapped: dict[str, SimSeq] = {}
        self._paused: SimIteration | None = None
        self._admit_seq = 0
        self._warm: dict[str, float] = {m: self.clock.now() for m in warm_models}  # model -> copy ready at
        self._prefill_tps = 0.0
        self._decode_tps = 0.0
        # The prefix cache model (operations/prefix_cache.py) over the prompts' chain keys
        # (ENGINE_BLOCK_TOKENS per block, as the HF engine keys them); None: off.
        self.prefix: PrefixCache | None = (
            PrefixCache(self.kv_capacity_tokens // ENGINE_BLOCK_TOKENS, ENGINE_BLOCK_TOKENS) if prefix_cache else None)

    # ---- thread-safe entry points ----------------------------------------------------

    def add_request(self, request: EngineRequest) -> None:
        if request.model != self.active_model:
            raise EngineError(f"request {request.request_id}: model {request.model!r} is not the active "
                              f"model {self.active_model!r}")
        need = len(request.prompt_token_ids) + len(request.generated_token_ids) + 1
        if need > self.kv_capacity_tokens:
            raise EngineError(f"request {request.request_id}: {need} tokens cannot fit the KV capacity "
                              f"of {self.kv_capacity_tokens} tokens")
        if request.max_tokens <= len(request.generated_token_ids):
            raise EngineError(f"request {request.request_id}: already has {len(request.generated_token_ids)} "
                              f"of max_tokens={request.max_tokens} tokens")
        with self._lock:
            self._inbox.append(request)
        if request.latency_sensitive:
            self._ls_signal.set()

    def abort(self, request_id: str) -> None:
        with self._lock:
            self._aborts.add(request_id)

    def request_preemption_check(self) -> None:
        """Ask a running iteration to look for latency-sensitive work at its next layer
        boundary (any thread)."""
        self._ls_signal.set()

    # ---- properties --------------------------------------------------------------------

    @property
    def profile(self) -> WorkerProfile:
        """Cost model of the active model."""
        return self._profile_of(self.active_model)

    @property
    def kv_capacity_tokens(self) -> int:
        m = self._models.get(self.active_model) if self.active_model else None
        return m.kv_capacity_tokens if m and m.kv_capacity_tokens else self._default_kv

    @property
    def kv_used_tokens(self) -> int:
        # Admitted sequences hold (or are filling) their KV blocks.
        return sum(s.kv_tokens for s in self._running)

    def _profile_of(self, model: str | None) -> WorkerProfile:
        m = self._models.get(model) if model else None
        return m.profile if m and m.profile else self._default_profile

    def _num_layers(self) -> int:
        m = self._models.get(self.active_model) if self.active_model else None
        return m.num_layers if m else 32

    # ---- the iteration loop --------------------------------------------------------------

    def has_work(self) -> bool:
        with self._lock:
            if self._inbox:
                return True
        return bool(self._waiting or self._running or self._paused)

    def step(self) -> list[TokenEvent]:
        self._take_inbox()
        events: list[TokenEvent] = []
        if self._paused is not None:
            if self._pause_expired(self._paused) or not ls_can_start(self._view()):
                it, self._paused = self._paused, None
                return self._run(it, events)
        it = self._plan_iteration(ls_only=self._paused is not None)
        if it is None:
            if self._paused is not None:  # nothing latency-sensitive fits after all: resume
                it, self._paused = self._paused, None
                return self._run(it, events)
            return events
        return self._run(it, events)

    def _take_inbox(self) -> None:
        with self._lock:
            inbox, self._inbox = self._inbox, []
            aborts, self._aborts = self._aborts, set()
        for req in inbox:
            target = self.output_lengths.draw(self.seed, req.request_id, req.max_tokens, req.prompt_token_ids)
            reason = FinishReason.LENGTH if target >= req.max_tokens else FinishReason.STOP
            target = max(target, len(req.generated_token_ids) + 1)
            seq = SimSeq(req, target, reason, list(req.generated_token_ids))
            if self.prefix is not None:
                seq.blocks = tuple(chain_keys(req.prompt_token_ids, ENGINE_BLOCK_TOKENS))
            self._waiting.append(seq)
        for rid in aborts:
            self._remove(rid)

    def _view(self) -> BatchView[SimSeq]:
        """The engine's state for the shared batching rules (KV in tokens)."""
        paused = {id(s) for s in self._paused.seqs()} if self._paused else set()
        free = [s for s in self._running if id(s) not in paused]
        return BatchView(
            mode=self.mode, max_batch_size=self.max_batch_size, max_prefill_tokens=self.max_prefill_tokens,
            model=self.active_model, kv_free=self.kv_capacity_tokens - self.kv_used_tokens,
            running=len(self._running), waiting=self._waiting,
            prefilling=[s for s in free if not s.prefilled], decoding=[s for s in free if s.prefilled],
            kv_need=lambda s: s.kv_tokens + 1, prompt_left=self._prompt_left,
            kv_held=lambda s: s.kv_tokens, admitted_order=lambda s: s.admitted_order,
        )

    def _prompt_left(self, s: SimSeq) -> int:
        """Tokens a sequence has yet to prefill; one not admitted yet skips its cached
        prefix (admission looks the same blocks up)."""
        if self.prefix is not None and s.computed == 0 and s in self._waiting:
            return s.kv_tokens - self.prefix.peek(s.blocks, s.kv_tokens)
        return s.kv_tokens - s.computed

    def _plan_iteration(self, ls_only: bool = False) -> SimIteration | None:
        """Admit what the shared rule admits and build the next iteration (None when there
        is nothing to do)."""
        plan = plan_iteration(self._view(), ls_only=ls_only)
        for s in plan.preempted:
            self._running.remove(s)
            s.preempt()
            self._waiting.appendleft(s)
            self.counters.recompute_preemptions += 1
        for s in plan.admitted:
            self._waiting.remove(s)
            self._admit_seq += 1
            s.admitted_order = self._admit_seq
            if self.prefix is not None and s.computed == 0:  # its cached prefix skips prefill
                s.computed = self.prefix.lookup(s.blocks, s.kv_tokens)
            self._running.append(s)
        if not plan.runs:
            return None
        prof = self.profile
        dur = 0.0
        if plan.prefill:
            dur += prof.prefill_time(plan.prefill_tokens)
        if plan.decode:
            dur += prof.decode_step_time(len(plan.decode), sum(s.kv_tokens for s in plan.decode))
        return SimIteration(plan.prefill, plan.decode, dur, self._num_layers())

    def _run(self, it: SimIteration, events: list[TokenEvent]) -> list[TokenEvent]:
        """Execute an iteration layer by layer (checking for latency-sensitive arrivals
        under EXPERT mode), then emit its tokens."""
        expert = self.mode == PreemptionMode.EXPERT
        has_ls_prefill = any(s.latency_sensitive for s, _ in it.prefill)
        if not expert or has_ls_prefill:
            remaining = it.duration_s - it.layers_done * it.layer_s
            self._sleep(remaining)
            it.layers_done = it.num_layers
        else:
            self._ls_signal.clear()
            while it.layers_done < it.num_layers:
                self._sleep(it.layer_s)
                it.layers_done += 1
                if it.layers_done < it.num_layers and self._ls_signal.is_set():
                    self._ls_signal.clear()
                    self._take_inbox()
                    if not self._pause_expired(it) and ls_can_start(self._view()):
                        first_pause = it.paused_at is None
                        if first_pause:
                            it.paused_at = self.clock.now()
                        self._paused = it
                        ls_it = self._plan_iteration(ls_only=True)
                        if ls_it is None:  # nothing fits after all; keep going
                            self._paused = None
                            if first_pause:
                                it.paused_at = None
                            continue
                        self.counters.expert_preemptions += 1
                        return self._run(ls_it, events)
        self.counters.iterations += 1
        self._account(it)
        return self._emit(it, events)

    def _pause_expired(self, it: SimIteration) -> bool:
        """A batch paused for `max_pause_s` in all may not be paused again (starvation bound)."""
        return it.paused_at is not None and self.clock.now() - it.paused_at >= self.max_pause_s

    def _account(self, it: SimIteration) -> None:
        self.counters.busy_s += it.duration_s
        a = 0.2  # smoothing of the measured rates
        if it.prefill and it.duration_s > 0:
            tps = sum(n for _, n in it.prefill) / it.duration_s
            self._prefill_tps = tps if self._prefill_tps == 0 else (1 - a) * self._prefill_tps + a * tps
        if it.decode and it.duration_s > 0:
            tps = 1.0 / it.duration_s  # per sequence
            self._decode_tps = tps if self._decode_tps == 0 else (1 - a) * self._decode_tps + a * tps

    def _emit(self, it: SimIteration, events: list[TokenEvent]) -> list[TokenEvent]:
        done = []
        for s, n in it.prefill:
            if s in self._running:  # (not evicted, swapped out or aborted while paused)
                s.computed += n
                if s.computed >= s.kv_tokens:  # its last chunk: it emits its first token
                    done.append(s)
        for s in done + it.decode:
            if s not in self._running:
                continue
            if not s.prefilled and self.prefix is not None:
                self.prefix.insert(s.blocks)  # its prompt's blocks are computed
            s.prefilled = True
            idx = len(s.generated)
            last = idx + 1 >= s.target_len
            tok = self._token(s, idx, last)
            s.generated.append(tok)
            self.counters.tokens += 1
            if last:
                events.append(TokenEvent(s.id, tok, idx, True, s.finish_reason))
                self._running.remove(s)
            else:
                events.append(TokenEvent(s.id, tok, idx))
        return events

    def _token(self, s: SimSeq, index: int, last: bool) -> int:
        stops = s.request.stop_token_ids
        if last and s.finish_reason == FinishReason.STOP and stops:
            return stops[0]
        vocab = self._models[s.request.model].vocab_size
        tok = stable_u64("tok", self.seed, s.id, index) % vocab
        while tok in stops:
            tok = (tok + 1) % vocab
        return int(tok)

    def _sleep(self, seconds: float) -> None:
        if seconds > 0:
            self.clock.sleep(seconds)

    def _remove(self, rid: str) -> SimSeq | None:
        for s in list(self._waiting):
            if s.id == rid:
                self._waiting.remove(s)
                return s
        for s in self._running:
            if s.id == rid:
                self._running.remove(s)
                return s
        return self._swapped.pop(rid, None)

    def _find_running(self, rid: str) -> SimSeq:
        for s in self._running:
            if s.id == rid:
                return s
        raise EngineError(f"request {rid} is not running on this engine")

    # ---- operations ------------------------------------------------------------------------

    def evict(self, request_id: str) -> list[int]:
        self._take_inbox()
        s = self._remove(request_id)
        if s is None:
            raise EngineError(f"request {request_id} is not on this engine")
        self._count("evict")
        return list(s.generated)

    def swap_out(self, request_id: str) -> OpCost:
        self._take_inbox()
        s = self._find_running(request_id)
        if not s.device_tokens:
            # Nothing on the device yet: parking it costs no copy.
            self._running.remove(s)
            self._swapped[request_id] = s
            self._count("swap_out")
            return OpCost(0.0, 0, "not prefilled yet; nothing to copy")
        held = sum(x.kv_tokens for x in self._swapped.values())
        if self.host_kv_capacity_tokens is not None and held + s.kv_tokens > self.host_kv_capacity_tokens:
            raise EngineError(f"swap out {request_id}: {s.kv_tokens} KV tokens do not fit host memory "
                              f"({held}/{self.host_kv_capacity_tokens} tokens held)")
        nbytes = s.device_tokens * self.profile.kv_bytes_per_token
        cost = self.profile.kv_swap_time(s.device_tokens)
        self._sleep(cost)
        self._running.remove(s)
        self._swapped[request_id] = s
        self.counters.swaps_out += 1
        self.counters.op_s += cost
        self._count("swap_out")
        return OpCost(cost, nbytes, f"{s.device_tokens} KV tokens to host")

    def swap_in(self, request_id: str) -> OpCost:
        s = self._swapped.get(request_id)
        if s is None:
            raise EngineError(f"request {request_id} is not swapped out")
        if s.request.model != self.active_model:
            raise EngineError(f"request {request_id} needs model {s.request.model!r}; active is {self.active_model!r}")
        if len(self._running) >= self.max_batch_size:
            raise EngineError(f"request {request_id}: no free batch slot to swap into")
        held = s.device_tokens
        if held and self.kv_used_tokens + s.kv_tokens > self.kv_capacity_tokens:
            raise EngineError(f"request {request_id}: {s.kv_tokens} KV tokens do not fit "
                              f"({self.kv_used_tokens}/{self.kv_capacity_tokens} used)")
        cost = self.profile.kv_swap_time(held) if held else 0.0
        self._sleep(cost)
        del self._swapped[request_id]
        self._running.append(s)
        self.counters.swaps_in += 1
        self.counters.op_s += cost
        self._count("swap_in")
        return OpCost(cost, held * self.profile.kv_bytes_per_token, f"{held} KV tokens to device")

    def load_model(self, model: str) -> OpCost:
        self._take_inbox()
        if model not in self._models:
            raise EngineError(f"unknown model {model!r}; this engine serves {sorted(self._models)}")
        if model == self.active_model:
            return OpCost(0.0, 0, "already active")
        if self._running or self._waiting or self._paused:
            busy = [s.id for s in self._running] + [s.id for s in self._waiting]
            raise EngineError(f"cannot load {model!r}: requests of {self.active_model!r} still hold the "
                              f"device ({', '.join(busy[:5])}); finish, evict or swap them out first")
        warm = self._is_warm(model)
        nbytes = self._models[model].weight_bytes
        cost = self._profile_of(model).model_load_time(nbytes, warm)
        self._sleep(cost)
        self.active_model = model
        if self.prefix is not None:  # the cached blocks were the old model's KV
            self.prefix.clear()
            self.prefix.resize(self.kv_capacity_tokens // ENGINE_BLOCK_TOKENS)
        self.counters.loads += 1
        self.counters.op_s += cost
        self._count("load_model")
        return OpCost(cost, nbytes, "warm (host RAM)" if warm else "cold (disk)")

    def warm_model(self, model: str) -> OpCost:
        if model not in self._models:
            raise EngineError(f"unknown model {model!r}; this engine serves {sorted(self._models)}")
        if model in self._warm:
            return OpCost(0.0, 0, "already warm")
        nbytes = self._models[model].weight_bytes
        used = sum(self._models[m].weight_bytes for m in self._warm)
        if used + nbytes > self.host_ram_bytes:
            raise EngineError(f"warm {model!r}: {nbytes} bytes do not fit host RAM "
                              f"({used}/{self.host_ram_bytes} bytes held by {sorted(self._warm)})")
        # The copy runs beside serving (disk -> host RAM); it is ready once it has been read.
        seconds = nbytes / self._profile_of(model).load_cold_bytes_per_s
        self._warm[model] = self.clock.now() + seconds
        self._count("warm_model")
        return OpCost(seconds, nbytes, "disk to host RAM, in the background")

    def drop_warm(self, model: str) -> None:
        self._warm.pop(model, None)
        self._count("drop_warm")

    def _is_warm(self, model: str) -> bool:
        ready = self._warm.get(model)
        return ready is not None and ready <= self.clock.now()

    def set_preemption(self, mode: PreemptionMode, max_pause_s: float) -> None:
        self.mode = PreemptionMode(mode)
        self.max_pause_s = max_pause_s
        self._count("set_preemption")

    def _count(self, op: str) -> None:
        self.counters.per_op[op] = self.counters.per_op.get(op, 0) + 1

    def stats(self) -> EngineStats:
        self._take_inbox()
        return EngineStats(
            active_model=self.active_model,
            warm_models=sorted(m for m in self._warm if self._is_warm(m)),
            kv_capacity_tokens=self.kv_capacity_tokens,
            kv_used_tokens=self.kv_used_tokens,
            running=[s.id for s in self._running],
            swapped=sorted(self._swapped),
            waiting=[s.id for s in self._waiting],
            max_batch_size=self.max_batch_size,
            prefill_tokens_per_s=self._prefill_tps,
            decode_tokens_per_s=self._decode_tps,
            device=self.device,
            profile=self.profile,
            servable_models=sorted(self._models),
            host_ram_bytes=self.host_ram_bytes,
            host_kv_capacity_tokens=self.host_kv_capacity_tokens,
            host_kv_used_tokens=sum(s.kv_tokens for s in self._swapped.values()),
            preemption=self.mode,
            prefix=None if self.prefix is None else PrefixReport(
                ENGINE_BLOCK_TOKENS, self.prefix.summary(DEFAULT_REPORTED_BLOCKS),
                sum(self._prompt_left(s) for s in self._waiting)
                + sum(s.kv_tokens - s.computed for s in self._running if not s.prefilled)),
        )
