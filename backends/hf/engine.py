"""HFEngine: the real worker engine on Hugging Face `transformers` models.

Over 500 lines because the Engine operations (evict, KV swap, model load, abort) change
the same state as the step loop (sequences, the KV pool, a paused pass) under the same
threading rules; split apart, each half would reach into the other's state. What is
not that state lives beside it: the batching rules (operations/batching.py), passes
(forward.py), KV (kv_cache.py), measurements (pass_log.py), weights (weights.py).

Iteration-level continuous batching over an engine-managed paged KV cache
(kv_cache.py), with passes that can stop between decoder layers (forward.py) so that
expert-level preemption (QLLM) can pause a best-effort batch for latency-sensitive
work. Every operation of the Engine interface is carried out for real and measured.

Threading: `add_request`, `abort` and `request_preemption_check` only touch an inbox
under `_lock`; the engine thread drains it at the start of every step, and, while a
preemptible pass runs, at every stage boundary where the pass asks whether to pause.
Everything else runs on the engine thread.

NOTE(one step): a step first drains the inbox, then either
  - continues a paused pass (EXPERT): LS prefill first, LS decode joins the paused
    batch at its stage, then the paused batch resumes; or
  - runs one iteration as the engines' shared rule plans it
    (operations.batching.plan_iteration): admit waiting requests, prefill at most
    `max_prefill_tokens` prompt tokens (longer prompts go a chunk per iteration; rows
    of very different lengths in passes of their own, forward.pack_rows), and a decode
    pass for the running ones. Under ITERATION / EXPERT, LS prefill runs
    alone (with 4x the budget) and step() returns right after it, so the worker
    streams its first token at once; under EXPERT a BE pass may pause mid-way and
    step() returns early too.

NOTE(why prefill chunks and decode rows do not share a pass): they share an
iteration (one step() runs the chunk pass, then the decode pass), as in vLLM's chunked
prefill, but not a forward pass. A pass is a padded [rows, longest feed] block: decode
rows in a chunk pass would each compute a whole chunk's width for one token; they
would also leave the decode mirror (kv_cache.py, one-token passes only), and a mixed
pass could neither merge LS decode rows at a pause nor tell an LS prefill pass (never
paused) from a BE one.
"""

from __future__ import annotations

import threading
import time
from collections import deque

import torch

from qlmserve.backends.engine import Engine, EngineError, EngineRequest, EngineStats, OpCost, PreemptionMode, TokenEvent
from qlmserve.operations.batching import (
    DEFAULT_MAX_PREFILL_TOKENS,
    BatchView,
    IterationPlan,
    ls_can_start,
    plan_iteration,
)
from qlmserve.operations.model_spec import ModelSpec
from qlmserve.operations.prefix_cache import DEFAULT_REPORTED_BLOCKS, PrefixReport

from .expert_load import ExpertLoad, routers
from .forward import ForwardPass, pack_rows
from .kv_cache import PagedKVCache
from .pass_log import PassMeter, PassRecord
from .sampling import Sampler
from .scheduling import SchedulingPolicy
from .sequence import SeqStatus, Sequence
from .weights import LoadRecord, WeightStore, free_device_memory, physical_memory_bytes, resolve_device, sync


class HFEngine(Engine):
    def __init__(
        self,
        models: dict[str, ModelSpec],
        *,
        device: str = "auto",
        max_batch_size: int = 16,
        kv_capacity_tokens: int | None = None,
        dtype: torch.dtype | None = None,
        preemption: PreemptionMode = PreemptionMode.NONE,
        max_pause_s: float = 2.0,
        initial_model: str | None = None,
        max_prefill_tokens: int = DEFAULT_MAX_PREFILL_TOKENS,
        prefix_cache: bool = False,
    ) -> None:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # the worker's log is not a terminal
        if not models:
            raise ValueError("HFEngine needs at least one model")
        if max_prefill_tokens < 1:
            raise ValueError(f"max_prefill_tokens must be >= 1, got {max_prefill_tokens}")
        self.models = dict(models)
        self.device = resolve_device(device)
        # float32 on CPU (bf16 matmuls are slow there); bf16 on CUDA unless told otherwise.
        self.dtype = dtype or (torch.bfloat16 if self.device.type == "cuda" else torch.float32)
        self.max_batch_size = max_batch_size
        self._kv_capacity_arg = kv_capacity_tokens
        # Keep full KV blocks findable by their token chain (backends/hf/prefix_index.py):
        # a prompt that starts with cached blocks skips their prefill.
        self.prefix_cache = prefix_cache
        self.policy = SchedulingPolicy(mode=PreemptionMode(preemption), max_pause_s=max_pause_s,
                                       max_prefill_tokens=max_prefill_tokens)
        self.weights = WeightStore(self.models, self.device, self.dtype)
        self.sampler = Sampler(self.device)

        self._lock = threading.Lock()
        self._inbox: deque[Sequence] = deque()
        self._abort_inbox: list[str] = []
        self._live_ids: set[str] = set()  # every request the engine holds, inbox included
        self._ls_in_inbox = False  # read without the lock at stage boundaries (a bool is atomic)
        self._preempt_requested = False
        # (pass, its pause count) whose last stage-boundary check found no LS work that
        # could start (see _should_pause).
        self._idle_verdict: tuple[ForwardPass, int] | None = None

        self._model_name: str | None = None
        self._model = None
        self._kv: PagedKVCache | None = None
        self._stop_ids: frozenset[int] = frozenset()
        self._seqs: dict[str, Sequence] = {}  # engine-thread view: waiting, running, swapped
        self._waiting: list[Sequence] = []
        self._running: list[Sequence] = []
        self._paused: ForwardPass | None = None
        self._aborted_in_step: set[str] = set()
        self._failures: list[tuple[str, str]] = []  # (request id, error) failed alone, for take_failures

        self.expert_load: ExpertLoad | None = None  # expert activations of the active MoE model
        self.meter = PassMeter()  # what its passes measured: records, rates, the cost model it reports
        self.pass_log: deque[PassRecord] = self.meter.records
        if initial_model is not None:
            self.load_model(initial_model)

    # ------------------------------------------------------------------ any thread

    def add_request(self, request: EngineRequest) -> None:
        seq = Sequence(request)
        with self._lock:
            if request.request_id in self._live_ids:
                raise EngineError(f"request {request.request_id!r} is already in the engine")
            if request.model != self._model_name:
                raise EngineError(
                    f"request {request.request_id!r} is for model {request.model!r}, "
                    f"the active model is {self._model_name!r}"
                )
            if not request.prompt_token_ids:
                raise EngineError(f"request {request.request_id!r} has an empty prompt")
            if seq.num_generated >= request.max_tokens:
                raise EngineError(
                    f"request {request.request_id!r} already has {seq.num_generated} tokens "
                    f">= max_tokens={request.max_tokens}"
                )
            max_ctx = self.models[request.model].max_context
            if seq.num_tokens >= max_ctx:
                raise EngineError(
                    f"request {request.request_id!r}: {seq.num_tokens} tokens reach the model's "
                    f"max_context={max_ctx}"
                )
            assert self._kv is not None
            if self._kv.blocks_for(self._kv_need(seq)) > self._kv.num_blocks:
                raise EngineError(
                    f"request {request.request_id!r} needs {self._kv_need(seq)} KV tokens, "
                    f"capacity is {self._kv.capacity_tokens}"
                )
            self._live_ids.add(request.request_id)
            self._inbox.append(seq)
            if request.latency_sensitive:
                self._ls_in_inbox = True

    def abort(self, request_id: str) -> None:
        with self._lock:
            if request_id in self._live_ids:
                self._abort_inbox.append(request_id)

    def request_preemption_check(self) -> None:
        """Ask a running preemptible (EXPERT) pass to stop at its next stage boundary, so
        that step() returns and the worker can run an operation (e.g. swap in an LS
        request) without waiting for the iteration to end."""
        self._preempt_requested = True

    # ------------------------------------------------------------------ inbox

    def _drain_inbox(self) -> None:
        with self._lock:
            arrived = list(self._inbox)
            self._inbox.clear()
            aborts = self._abort_inbox
            self._abort_inbox = []
            self._ls_in_inbox = False
        for seq in arrived:
            self._seqs[seq.id] = seq
            self._waiting.append(seq)
        for rid in aborts:
            seq = self._seqs.get(rid)
            if seq is not None:
                self._remove(seq, SeqStatus.FINISHED_ABORTED)
                self._aborted_in_step.add(rid)

    def _remove(self, seq: Sequence, status: SeqStatus) -> None:
        """Take a sequence out of the engine wherever it is and free its memory."""
        if self._paused is not None and seq in self._paused.seqs:
            self._paused.drop({seq.id})
            if not self._paused.seqs:
                self._paused = None
        if seq.status is SeqStatus.WAITING:
            self._waiting.remove(seq)
            if self._kv is not None:
                self._kv.forget(seq.id)
        elif seq.status is SeqStatus.RUNNING:
            self._running.remove(seq)
            if self._kv is not None:
                self._kv.free(seq.id)
        seq.host_kv = None
        seq.status = status
        self._seqs.pop(seq.id, None)
        with self._lock:
            self._live_ids.discard(seq.id)

    # ------------------------------------------------------------------ step

    def step(self) -> list[TokenEvent]:
        self._drain_inbox()
        if self._model is None:
            return []
        if self.expert_load is not None:
            self.expert_load.begin_step()
        self._aborted_in_step.clear()
        if self._paused is not None:
            events = self._continue_paused()
        else:
            events = self._iteration()
        self._drain_inbox()  # an abort that arrived mid-step: its tokens are not delivered
        if self._aborted_in_step:
            events = [e for e in events if e.request_id not in self._aborted_in_step]
        return events

    def _iteration(self) -> list[TokenEvent]:
        plan = self._plan()
        if plan.ls_only:
            return self._run_prefill(plan.prefill)  # return at once: the first tokens stream now
        passes = [(group, True) for group in pack_rows(plan.prefill)]
        if plan.decode:
            passes.append(([(s, 1) for s in plan.decode], False))
        events: list[TokenEvent] = []
        for group, is_prefill in passes:
            group = self._still_running(group)  # an abort may have landed mid-pass
            if not group:
                continue
            if self.policy.prioritized and self._ls_can_start():
                break  # a new LS request goes first: end this iteration here
            events += self._run_pass(group, prefill=is_prefill)
            if self._paused is not None:
                break
        return events

    def _run_prefill(self, chunks: list[tuple[Sequence, int]]) -> list[TokenEvent]:
        events: list[TokenEvent] = []
        for group in pack_rows(chunks):
            events += self._run_pass(self._still_running(group), prefill=True)
        return events

    def _continue_paused(self) -> list[TokenEvent]:
        paused = self._paused
        assert paused is not None and paused.paused_at is not None
        waited = paused.paused_s + (time.perf_counter() - paused.paused_at)
        if self.policy.may_pause(waited):
            ran, events = self._ls_prefill_while_paused()
            if ran:  # (a chunk that is not an LS prompt's last one emits no token)
                return events
            ls_decode = [
                s for s in self._running
                if s.latency_sensitive and not s.is_prefill and s not in paused.seqs
            ]
            if ls_decode and self.policy.ls_decode_joins_paused and not paused.is_prefill:
                self._catch_up_and_join(ls_decode, paused)
        self._paused = None
        return self._resume(paused)

    def _ls_prefill_while_paused(self) -> tuple[bool, list[TokenEvent]]:
        """An LS-only iteration while a BE pass is paused: (whether one ran, its tokens)."""
        plan = self._plan(ls_only=True)
        if not plan.prefill:
            return False, []
        return True, self._run_prefill(plan.prefill)

    def _catch_up_and_join(self, seqs: list[Sequence], paused: ForwardPass) -> None:
        """Run LS decode sequences up to the paused batch's stage, then merge them into it."""
        catch_up = ForwardPass(self._model, self._kv, seqs, preemptible=True)
        target = paused.cursor
        finished = catch_up.run(lambda p: p.cursor >= target)
        if finished:  # cannot happen: target < num_stages for a paused pass
            raise RuntimeError("catch-up pass ran past the paused stage")
        self._record(catch_up, catch_up=True)
        paused.merge(catch_up)

    # ------------------------------------------------------------------ admission

    def _kv_need(self, seq: Sequence) -> int:
        """KV positions reserved for a sequence: all it may ever feed (bounded by context)."""
        max_ctx = self.models[seq.request.model].max_context
        return min(seq.max_total_tokens, max_ctx - 1)

    def _view(self) -> BatchView[Sequence]:
        """The engine's state for the shared batching rules (KV in blocks: the pool's unit)."""
        kv = self._kv
        assert kv is not None
        paused = self._paused.seqs if self._paused is not None else ()
        free = [s for s in self._running if s not in paused]
        return BatchView(
            mode=self.policy.mode, max_batch_size=self.max_batch_size,
            max_prefill_tokens=self.policy.max_prefill_tokens, model=self._model_name,
            kv_free=kv.free_blocks, running=len(self._running), waiting=self._waiting,
            prefilling=[s for s in free if s.is_prefill], decoding=[s for s in free if not s.is_prefill],
            kv_need=lambda s: kv.blocks_for(self._kv_need(s)), prompt_left=self._prompt_left,
            decode_need=0,  # a sequence's whole KV is reserved at admission: never a victim
        )

    def _prompt_left(self, seq: Sequence) -> int:
        """Tokens a sequence has yet to feed; one not started yet skips its cached prefix
        (`_plan` shares the same blocks when it admits it)."""
        if seq.status is SeqStatus.WAITING and self._kv is not None:
            return seq.num_tokens - self._kv.peek_prefix(seq.id, seq.tokens)
        return seq.num_pending

    def _plan(self, ls_only: bool = False) -> IterationPlan[Sequence]:
        """Plan the next iteration and admit the sequences it takes in."""
        assert self._kv is not None
        plan = plan_iteration(self._view(), ls_only=ls_only)
        for seq in plan.admitted:
            self._kv.reserve(seq.id, self._kv_need(seq))
            self._waiting.remove(seq)
            seq.status = SeqStatus.RUNNING
            seq.kv_len = self._kv.share_prefix(seq.id, seq.tokens)  # 0 without a prefix cache
            self._running.append(seq)
        return plan

    def _ls_can_start(self) -> bool:
        """Is there latency-sensitive work that could start now? (checked between stages)"""
        if self._ls_in_inbox:
            self._drain_inbox()
        return ls_can_start(self._view())

    def _should_pause(self, p: ForwardPass) -> bool:
        if self._preempt_requested:
            self._preempt_requested = False
            return True
        if not self.policy.may_pause(p.paused_s):
            return False
        # While a pass runs, the engine thread does nothing else, so what decides whether
        # LS work can start (waiting and running sequences, KV) changes only when the
        # inbox is drained, and an LS arrival is what makes _ls_can_start drain it. A
        # "no" therefore holds until an LS request arrives or the pass pauses: checking
        # again at every boundary (a scan of the waiting queue, ~30 us) would cost ~1% of
        # a BE pass for nothing.
        if self._idle_verdict == (p, p.pauses) and not self._ls_in_inbox:
            return False
        # Sequences aborted while this pass ran stay in it until the pass ends; a pause
        # point is a safe place to drop them, but not worth a pause of its own.
        if self._ls_can_start():
            self._idle_verdict = None
            return True
        self._idle_verdict = (p, p.pauses)
        return False

    # ------------------------------------------------------------------ passes

    def _run_pass(self, feed: list[tuple[Sequence, int]], *, prefill: bool) -> list[TokenEvent]:
        """One forward pass feeding each sequence its given number of pending tokens. A pass
        that raises before it commits is split in halves until the sequence at fault runs
        alone; that one fails (take_failures) and the others still get their token: nothing
        is committed before a pass ends, so a retried row starts clean. (Sampling, after the
        commit, fails per row in the Sampler.)"""
        seqs = [s for s, _ in feed]
        kv_before = [s.kv_len for s in seqs]
        p = None
        try:
            p = ForwardPass(self._model, self._kv, seqs, preemptible=self.policy.pass_preemptible(seqs),
                            feed=[n for _, n in feed], prefill=prefill)
            return self._resume(p)
        except (EngineError, AssertionError):
            raise
        except Exception as exc:  # noqa: BLE001 - one request's failure must not stop the batch
            if [s.kv_len for s in seqs] != kv_before:
                raise  # committed: a retry would feed nothing; the worker loop logs it
            if p is not None and self._paused is p:
                self._paused = None
            live = self._still_running(feed)
            if len(live) <= 1:
                for seq, _ in live:
                    self._fail(seq, f"{type(exc).__name__}: {str(exc)[:200]}")
                return []
            mid = len(live) // 2
            return self._run_pass(live[:mid], prefill=prefill) + self._run_pass(live[mid:], prefill=prefill)

    def _fail(self, seq: Sequence, error: str) -> None:
        self._remove(seq, SeqStatus.FINISHED_ABORTED)
        self._failures.append((seq.id, error))

    def take_failures(self) -> list[tuple[str, str]]:
        out, self._failures = self._failures, []
        return out

    @staticmethod
    def _still_running(feed: list[tuple[Sequence, int]]) -> list[tuple[Sequence, int]]:
        return [(s, n) for s, n in feed if s.status is SeqStatus.RUNNING]

    def _resume(self, p: ForwardPass) -> list[TokenEvent]:
        finished = p.run(self._should_pause)
        self._idle_verdict = None  # it was about this run of `p` only
        # Sequences aborted while the pass ran (drained at a stage boundary) are already
        # freed; their rows only wrote KV into their own freed blocks, and nothing could be
        # admitted in between. A paused pass must let go of them before anyone reuses
        # those blocks.
        dead = {s.id for s in p.seqs if s.status is not SeqStatus.RUNNING}
        if not finished:
            p.drop(dead)
            self._paused = p if p.seqs else None
            # The LS work that caused the pause runs in this same step, so its first token
            # goes out without another trip through the worker loop.
            return self._ls_prefill_while_paused()[1]
        # Only sequences whose last pending token this pass fed sample one (a prefill
        # chunk that is not a prompt's last samples nothing).
        done = p.completes
        rows = None if all(done) else [i for i, d in enumerate(done) if d]
        logits = p.logits(rows) if rows != [] else None
        p.commit()
        kv = self._kv
        for s in p.seqs:  # full blocks just computed become findable by their chain
            if s.status is SeqStatus.RUNNING and kv.needs_register(s.id, s.kv_len):
                kv.register_prefix(s.id, s.tokens, s.kv_len)
        seqs = p.seqs if rows is None else [p.seqs[i] for i in rows]
        tokens = [] if logits is None else self.sampler.choose(
            logits, [s.request for s in seqs], [s.num_generated for s in seqs])
        sync(self.device)
        self._record(p)
        events: list[TokenEvent] = []
        for seq, token in zip(seqs, tokens, strict=True):
            if seq.id in dead:
                continue
            if isinstance(token, str):  # this row's sampling failed: it fails alone
                self._fail(seq, token)
                continue
            seq.append(token)
            status = None
            if token in self._stop_ids or token in seq.request.stop_token_ids:
                status = SeqStatus.FINISHED_STOPPED
            elif seq.num_generated >= seq.request.max_tokens or seq.num_tokens >= self.models[
                seq.request.model
            ].max_context:
                status = SeqStatus.FINISHED_LENGTH
            event = TokenEvent(seq.id, token, seq.num_generated - 1)
            if status is not None:
                self._remove(seq, status)
                event.finished = True
                event.finish_reason = seq.finish_reason()
            events.append(event)
        return events

    def _record(self, p: ForwardPass, *, catch_up: bool = False) -> None:
        self.meter.record(p, catch_up=catch_up)

    def has_work(self) -> bool:
        with self._lock:
            if self._inbox:
                return True
        return bool(self._waiting or self._running or self._paused)

    # ------------------------------------------------------------------ operations

    def _get(self, request_id: str) -> Sequence:
        self._drain_inbox()
        seq = self._seqs.get(request_id)
        if seq is None:
            raise EngineError(f"unknown request {request_id!r}")
        return seq

    def evict(self, request_id: str) -> list[int]:
        seq = self._get(request_id)
        tokens = list(seq.generated)
        self._remove(seq, SeqStatus.FINISHED_EVICTED)
        return tokens

    def swap_out(self, request_id: str) -> OpCost:
        seq = self._get(request_id)
        if seq.status is not SeqStatus.RUNNING:
            raise EngineError(f"request {request_id!r} is {seq.status.name}, not running")
        assert self._kv is not None
        t0 = time.perf_counter()
        if self._paused is not None and seq in self._paused.seqs:
            # Its in-flight token's partial KV lies beyond kv_len: only the committed part
            # moves, and the token is fed again after swap_in.
            self._paused.drop({seq.id})
            if not self._paused.seqs:
                self._paused = None
        seq.host_kv = self._kv.copy_out(seq.id, seq.kv_len, pin=self.device.type == "cuda")
        self._running.remove(seq)
        seq.status = SeqStatus.SWAPPED
        return OpCost(time.perf_counter() - t0, seq.host_kv.nbytes, f"{seq.kv_len} tokens to host")

    def swap_in(self, request_id: str) -> OpCost:
        seq = self._get(request_id)
        if seq.status is not SeqStatus.SWAPPED or seq.host_kv is None:
            raise EngineError(f"request {request_id!r} is {seq.status.name}, not swapped")
        if seq.request.model != self._model_name:
            raise EngineError(
                f"request {request_id!r} is for model {seq.request.model!r}, active is {self._model_name!r}"
            )
        assert self._kv is not None
        if not self._kv.can_reserve(self._kv_need(seq)):
            raise EngineError(f"no KV space to swap in {request_id!r} ({self._kv_need(seq)} tokens)")
        t0 = time.perf_counter()
        host = seq.host_kv
        self._kv.copy_in(seq.id, host, self._kv_need(seq))
        sync(self.device)
        seq.kv_len = host.tokens
        seq.host_kv = None
        seq.status = SeqStatus.RUNNING
        self._running.append(seq)
        return OpCost(time.perf_counter() - t0, host.nbytes, f"{host.tokens} tokens to device")

    def load_model(self, model: str) -> OpCost:
        if model not in self.models:
            raise EngineError(f"unknown model {model!r}; known: {sorted(self.models)}")
        self._drain_inbox()
        if model == self._model_name:
            return OpCost(0.0, 0, "already active")
        t0 = time.perf_counter()
        self.unload()
        new, record = self.weights.activate(model)
        cfg = new.config
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        capacity = self._kv_capacity_arg or self.max_batch_size * self.models[model].max_context
        kv = PagedKVCache(
            num_layers=cfg.num_hidden_layers,
            num_kv_heads=cfg.num_key_value_heads,
            head_dim=head_dim,
            capacity_tokens=capacity,
            dtype=self.dtype,
            device=self.device,
            prefix_cache=self.prefix_cache,  # a new pool: the old model's cached blocks are gone
        )
        eos = new.generation_config.eos_token_id
        if eos is None:
            eos = cfg.eos_token_id
        eos_ids = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
        self._model, self._kv, self._stop_ids = new, kv, frozenset(eos_ids)
        self.expert_load = ExpertLoad(new) if routers(new) else None
        with self._lock:
            self._model_name = model
        seconds = time.perf_counter() - t0
        kind = "warm (host RAM)" if record.warm else "cold (disk)"
        return OpCost(seconds, record.bytes_moved, f"{kind} load of {model} in {record.seconds:.3f}s")

    def unload(self) -> None:
        """Release the active model and its KV pool (device memory). Swapped requests keep
        their host KV; waiting or running ones must have left first."""
        self._drain_inbox()
        busy = [s.id for s in self._seqs.values() if s.status is not SeqStatus.SWAPPED]
        if busy:
            raise EngineError(f"cannot unload the model: {len(busy)} requests still waiting or running")
        self._model = None
        self._kv = None
        if self.expert_load is not None:
            self.expert_load.remove()
            self.expert_load = None
        with self._lock:
            self._model_name = None
        free_device_memory(self.device)

    def warm_model(self, model: str) -> OpCost:
        if model not in self.models:
            raise EngineError(f"unknown model {model!r}; known: {sorted(self.models)}")
        active = self._model if model == self._model_name else None
        seconds, nbytes = self.weights.make_warm(model, active)
        return OpCost(seconds, nbytes, f"{model} weights in host RAM")

    def drop_warm(self, model: str) -> None:
        self.weights.drop_warm(model)

    def set_preemption(self, mode: PreemptionMode, max_pause_s: float) -> None:
        self.policy.mode = PreemptionMode(mode)
        self.policy.max_pause_s = max_pause_s

    # ------------------------------------------------------------------ introspection

    @property
    def load_history(self) -> list[LoadRecord]:
        """Every measured model load, cold and warm."""
        return list(self.weights.history)

    @property
    def paused_stage(self) -> tuple[int, str] | None:
        """Where the paused best-effort pass resumes: (layer, "attention" | "moe")."""
        p = self._paused
        if p is None:
            return None
        return p.layer, "attention" if p.cursor % 2 == 0 else "moe"

    @property
    def model(self):  # noqa: ANN201 - a transformers PreTrainedModel
        return self._model

    def stats(self) -> EngineStats:
        with self._lock:
            inbox = [s.id for s in self._inbox]
        kv = self._kv
        return EngineStats(
            active_model=self._model_name,
            warm_models=sorted(self.weights.warm),
            kv_capacity_tokens=kv.capacity_tokens if kv else 0,
            kv_used_tokens=kv.used_tokens if kv else 0,
            running=[s.id for s in self._running],
            swapped=[s.id for s in self._seqs.values() if s.status is SeqStatus.SWAPPED],
            waiting=[s.id for s in self._waiting] + inbox,
            max_batch_size=self.max_batch_size,
            prefill_tokens_per_s=self.meter.prefill_tps,
            decode_tokens_per_s=self.meter.decode_tps,
            device=str(self.device),
            profile=self.meter.cost.profile(),
            servable_models=sorted(self.models),
            host_ram_bytes=physical_memory_bytes(),
            preemption=self.policy.mode,
            prefix=self._prefix_report(),
            expert_activations=self.expert_load.total.tolist() if self.expert_load is not None else None,
        )

    def _prefix_report(self) -> PrefixReport | None:
        kv = self._kv
        if kv is None or kv.prefix is None:
            return None
        queued = sum(self._prompt_left(s) for s in self._waiting)
        queued += sum(s.num_pending for s in self._running if s.is_prefill)
        return PrefixReport(kv.block_size, kv.prefix.summary(self.prefix_report_blocks), queued)

    prefix_report_blocks = DEFAULT_REPORTED_BLOCKS  # block ids a state report carries at most

    def close(self) -> None:
        self._model = None
        self._kv = None
        self.weights.warm.clear()
        free_device_memory(self.device)
