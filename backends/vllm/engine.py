"""VLLMEngine: the Engine interface (backends/engine.py) on vLLM's V1 engine (AsyncLLM).

QLM plans, vLLM generates. Requests go in as token ids with their sampling parameters
and seed; vLLM's own continuous batching, paged attention and kernels run them.

NOTE(how the pieces fit):
  - One AsyncLLM per model (model_engine.py), all on one asyncio loop thread (loop.py).
    The worker's engine thread calls step(); add_request / abort come from any thread.
  - Admission: a request waits here until it may join vLLM's batch under QLM's rule
    (backends.engine.batch_limit: best-effort up to max_batch_size, latency-sensitive
    up to LS_BATCH_FACTOR times it under ITERATION), in QLM's order (precedence). vLLM
    runs up to LS_BATCH_FACTOR x max_batch_size sequences; inside it the priority
    scheduler (lower value first, priority.py) orders what waits for KV or for the step's
    token budget and, short of KV, preempts the best-effort request first.
  - Tokens: each request's vLLM stream is read on the loop thread; the tokens of one
    vLLM step are handed over together (a callback scheduled after that step's readers
    ran), so step() returns one step's batch and the worker writes it in one Redis call.
  - Eviction is vLLM's abort; the controller requeues the request with its tokens, and
    its next run prefills prompt + generated tokens (recompute, as vLLM V1 preempts).
  - Model swap: the next model's engine starts (cold) or wakes (warm); the last one
    sleeps at level 1 where vLLM has sleep mode (CUDA) and shuts down where it has none
    (CPU). What is not offered, and why: ops.py.
  - Seeded sampling is vLLM's per-request generator: a request requeued after an
    eviction draws afresh from its seed (greedy continues exactly).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from vllm import SamplingParams
from vllm.sampling_params import RequestOutputKind

from qlmserve.backends.engine import (
    LS_BATCH_FACTOR,
    Engine,
    EngineError,
    EngineRequest,
    EngineStats,
    FinishReason,
    HoldsRequest,
    OpCost,
    PreemptionMode,
    TokenEvent,
    batch_limit,
)
from qlmserve.operations.batching import admission_order
from qlmserve.operations.ops import Capability

from .loop import LoopThread
from .model_engine import ModelEngine, device_name, sleep_mode_available
from .ops import SUPPORTED_OPS
from .options import VLLMOptions
from .priority import vllm_priority

if TYPE_CHECKING:  # a type only: backends do not import the controller at run time
    from qlmserve.operations.model_spec import ModelSpec

log = logging.getLogger("qlm.vllm")

# step() waits this long for tokens before it returns empty-handed (the worker then runs
# its queued operations); a new request ends the wait at once, so it is admitted now.
STEP_WAIT_S = 0.05
_FINISH = {"stop": FinishReason.STOP, "length": FinishReason.LENGTH}


@dataclass(eq=False)
class _Req(HoldsRequest):
    """A request the engine holds: waiting for admission, or inside vLLM (vllm_id set)."""

    request: EngineRequest
    arrival: int
    generated: list[int] = field(default_factory=list)  # every token so far, delivered ones only
    vllm_id: str | None = None
    engine: ModelEngine | None = None


class VLLMEngine(Engine):
    def __init__(self, models: dict[str, ModelSpec], *, max_batch_size: int = 16,
                 kv_capacity_tokens: int | None = None, options: VLLMOptions | None = None,
                 preemption: PreemptionMode = PreemptionMode.NONE, initial_model: str | None = None) -> None:
        if not models:
            raise ValueError("VLLMEngine needs at least one model")
        self.options = options or VLLMOptions()
        device = self.options.device.split(":")[0]
        if device not in ("auto", device_name()):
            raise ValueError(f"device {self.options.device!r}: this vLLM build runs on {device_name()!r}")
        self.options.apply_environment()
        self.models = dict(models)
        self.max_batch_size = max_batch_size
        self._kv_capacity_arg = kv_capacity_tokens
        self._loop = LoopThread()
        self._sleep_mode = sleep_mode_available()
        self._engines: dict[str, ModelEngine] = {}  # started: the active one and sleeping ones
        self._sleep_order: list[str] = []  # sleeping models, longest asleep first

        # Guarded by _cond: shared by the engine thread, callers of add_request / abort,
        # and the loop thread that reads vLLM's streams.
        self._cond = threading.Condition()
        self._active: ModelEngine | None = None
        self._vocab_size = 0
        self._mode = PreemptionMode.NONE
        self._live: dict[str, _Req] = {}
        self._waiting: list[_Req] = []
        self._ready: list[tuple[_Req, TokenEvent]] = []
        self._arrived = False  # a request came in since the engine thread last admitted
        self._arrivals = itertools.count()
        self._vllm_ids = itertools.count()
        # Loop thread only: tokens of the vLLM step being read, handed over together.
        self._batch: list[tuple[_Req, TokenEvent]] = []
        self._flush_scheduled = False

        self.set_preemption(preemption, 0.0)
        if initial_model is not None:
            self.load_model(initial_model)

    # ------------------------------------------------------------------ any thread

    def add_request(self, request: EngineRequest) -> None:
        rid = request.request_id
        done = len(request.generated_token_ids)
        with self._cond:
            active = self._active
            if rid in self._live:
                raise EngineError(f"request {rid!r} is already in the engine")
            if active is None or request.model != active.name:
                raise EngineError(f"request {rid!r} is for model {request.model!r}, "
                                  f"the active model is {active.name if active else None!r}")
            if not request.prompt_token_ids:
                raise EngineError(f"request {rid!r} has an empty prompt")
            if done >= request.max_tokens:
                raise EngineError(f"request {rid!r} already has {done} tokens >= max_tokens={request.max_tokens}")
            max_ctx = self.models[request.model].max_context
            if len(request.prompt_token_ids) + done >= max_ctx:
                raise EngineError(f"request {rid!r}: {len(request.prompt_token_ids) + done} tokens reach the "
                                  f"model's max_context={max_ctx}")
            bad = [t for t in (*request.prompt_token_ids, *request.generated_token_ids)
                   if not 0 <= t < self._vocab_size]
            if bad:
                raise EngineError(f"request {rid!r}: token id {bad[0]} is outside the vocabulary "
                                  f"(size {self._vocab_size})")
            r = _Req(request, next(self._arrivals), generated=list(request.generated_token_ids))
            self._live[rid] = r
            self._waiting.append(r)
            self._arrived = True
            self._cond.notify_all()

    def abort(self, request_id: str) -> None:
        with self._cond:
            r = self._take(request_id)
        if r is not None and r.vllm_id is not None and r.engine is not None:
            self._loop.submit(r.engine.abort(r.vllm_id))

    def _take(self, request_id: str) -> _Req | None:
        """Remove a request from the engine's books (under _cond); its undelivered tokens
        are dropped at delivery (they are no longer live)."""
        r = self._live.pop(request_id, None)
        if r is not None and r in self._waiting:
            self._waiting.remove(r)
        return r

    # ------------------------------------------------------------------ engine thread

    def step(self) -> list[TokenEvent]:
        deadline = time.monotonic() + STEP_WAIT_S
        while True:
            self._admit()
            with self._cond:
                if not self._ready and not self._arrived:
                    self._cond.wait(max(0.0, deadline - time.monotonic()))
                if self._ready or time.monotonic() >= deadline:
                    return self._deliver()

    def _deliver(self) -> list[TokenEvent]:
        """Under _cond: the tokens ready, of requests still live, with their indices."""
        events = []
        for r, ev in self._ready:
            if self._live.get(r.id) is not r:
                continue  # aborted or evicted after vLLM produced it
            r.generated.append(ev.token_id)
            ev.index = len(r.generated) - 1
            if ev.finished:
                del self._live[r.id]
            events.append(ev)
        self._ready = []
        return events

    def _admit(self) -> None:
        """Hand waiting requests to vLLM as far as QLM's batch rule allows (module NOTE)."""
        with self._cond:
            self._arrived = False
            active = self._active
            if not self._waiting or active is None:
                return
            in_vllm = sum(1 for r in self._live.values() if r.vllm_id is not None)
            fcfs = self._mode is PreemptionMode.NONE
            start = []
            for r in admission_order(self._waiting, self._mode):  # the rule every engine shares
                if in_vllm >= batch_limit(self._mode, r.request.latency_sensitive, self.max_batch_size):
                    if fcfs:
                        break  # the head of an FCFS queue blocks the rest
                    continue
                r.vllm_id, r.engine = f"{r.id}.{next(self._vllm_ids)}", active
                start.append((r, vllm_priority(self._mode, r.request)))
                in_vllm += 1
            for r, _ in start:
                self._waiting.remove(r)
        for r, priority in start:
            self._loop.submit(self._stream(r, priority))

    # ------------------------------------------------------------------ loop thread

    async def _stream(self, r: _Req, priority: int) -> None:
        """Read one request's vLLM stream into step batches."""
        req = r.request
        tokens = [*req.prompt_token_ids, *r.generated]
        room = self.models[req.model].max_context - len(tokens)
        params = SamplingParams(max_tokens=min(req.max_tokens - len(r.generated), room),
                                temperature=req.temperature, top_p=req.top_p, seed=req.seed,
                                stop_token_ids=list(req.stop_token_ids), detokenize=False,
                                output_kind=RequestOutputKind.DELTA)
        assert r.engine is not None and r.vllm_id is not None
        try:
            async for out in r.engine.generate(r.vllm_id, tokens, params, priority):
                c = out.outputs[0]
                new = list(c.token_ids)
                reason = _FINISH.get(c.finish_reason or "") if out.finished else None
                for k, token in enumerate(new):
                    last = reason is not None and k == len(new) - 1
                    self._emit(r, TokenEvent(req.request_id, token, 0, finished=last,
                                             finish_reason=reason if last else None))
        except asyncio.CancelledError:
            raise
        except Exception:  # noqa: BLE001 - one failed request must not stop the others
            log.exception("vLLM failed request %s; dropping it", req.request_id)
            with self._cond:
                if self._live.get(r.id) is r:
                    self._take(r.id)

    def _emit(self, r: _Req, ev: TokenEvent) -> None:
        self._batch.append((r, ev))
        if not self._flush_scheduled:
            # vLLM's output handler wakes every request's reader for one step before any
            # of them runs, so a callback queued by the first one runs after the last.
            self._flush_scheduled = True
            self._loop.loop.call_soon(self._flush)

    def _flush(self) -> None:
        batch, self._batch, self._flush_scheduled = self._batch, [], False
        with self._cond:
            self._ready.extend(batch)
            self._cond.notify_all()

    # ------------------------------------------------------------------ state

    def has_work(self) -> bool:
        with self._cond:
            return bool(self._live or self._ready)

    def supported_ops(self) -> frozenset[Capability]:
        return SUPPORTED_OPS

    def stats(self) -> EngineStats:
        with self._cond:
            active = self._active
            running = [rid for rid, r in self._live.items() if r.vllm_id is not None]
            waiting = [r.id for r in self._waiting]
        capacity = active.capacity_tokens if active else 0
        figures = active.figures if active else None
        return EngineStats(
            active_model=active.name if active else None,
            warm_models=sorted(self._sleep_order),
            kv_capacity_tokens=capacity,
            kv_used_tokens=round(figures.kv_usage * capacity) if figures else 0,
            running=running, swapped=[], waiting=waiting, max_batch_size=self.max_batch_size,
            prefill_tokens_per_s=figures.prefill_tokens_per_s if figures else 0.0,
            decode_tokens_per_s=figures.decode_tokens_per_s if figures else 0.0,
            device=device_name(),
        )

    # ------------------------------------------------------------------ operations

    def evict(self, request_id: str) -> list[int]:
        with self._cond:
            r = self._take(request_id)
        if r is None:
            raise EngineError(f"unknown request {request_id!r}")
        if r.vllm_id is not None and r.engine is not None:
            self._loop.run(r.engine.abort(r.vllm_id), self.options.start_timeout_s)
        return list(r.generated)

    def set_preemption(self, mode: PreemptionMode, max_pause_s: float) -> None:
        mode = PreemptionMode(mode)
        if mode is PreemptionMode.EXPERT:
            raise EngineError("the vLLM engine has no expert-level preemption (it cannot stop a pass between "
                              "layers); use iteration-level preemption")
        with self._cond:
            self._mode = mode  # requests already in vLLM keep the priority they got

    def load_model(self, model: str) -> OpCost:
        if model not in self.models:
            raise EngineError(f"unknown model {model!r}; known: {sorted(self.models)}")
        with self._cond:
            if self._active is not None and self._active.name == model:
                return OpCost(0.0, 0, "already active")
            busy = [r.id for r in self._live.values()]
            if busy:
                raise EngineError(f"cannot swap to {model!r}: {len(busy)} requests still waiting or running")
            old, self._active = self._active, None  # requests are refused until the swap is done
        t0 = time.perf_counter()
        if old is not None:
            self._park(old)
        eng = self._engines.get(model)
        if eng is not None and eng.asleep:
            seconds, how = eng.wake_up(), "warm (vLLM wake_up from host RAM)"
            self._sleep_order.remove(model)
        else:
            eng = ModelEngine(model, self.models[model], self._loop, self.options,
                              max_num_seqs=self.max_batch_size * LS_BATCH_FACTOR,
                              kv_capacity_tokens=self._kv_capacity(model))
            seconds = eng.start()
            self._engines[model] = eng
            how = "cold (vLLM engine start from disk" + ("" if self._sleep_mode else
                                                          f"; no sleep mode on {device_name()}") + ")"
        with self._cond:
            self._active, self._vocab_size = eng, eng.vocab_size
        return OpCost(time.perf_counter() - t0, _weight_bytes(self.models[model]), f"{how} of {model} in {seconds:.1f}s")

    def _kv_capacity(self, model: str) -> int:
        return self._kv_capacity_arg or self.max_batch_size * self.models[model].max_context

    def _park(self, eng: ModelEngine) -> None:
        """The model swapped away: asleep (warm) where vLLM can sleep, else shut down."""
        if self._sleep_mode and self.options.max_sleeping_models > 0:
            eng.sleep()
            self._sleep_order.append(eng.name)
            while len(self._sleep_order) > self.options.max_sleeping_models:
                self._engines.pop(self._sleep_order.pop(0)).shutdown()
            return
        eng.shutdown()
        del self._engines[eng.name]

    def swap_out(self, request_id: str) -> OpCost:
        raise EngineError("the vLLM engine has no per-request KV swap (kv_swap is not in its supported_ops)")

    def swap_in(self, request_id: str) -> OpCost:
        raise EngineError("the vLLM engine has no per-request KV swap (kv_swap is not in its supported_ops)")

    def warm_model(self, model: str) -> OpCost:
        raise EngineError("the vLLM engine keeps no warm copy on request (warm_start is not in its supported_ops); "
                          "a model swapped away sleeps at level 1 where vLLM has sleep mode")

    def drop_warm(self, model: str) -> None:
        raise EngineError("the vLLM engine keeps no warm copy on request (warm_start is not in its supported_ops)")

    def close(self) -> None:
        for eng in list(self._engines.values()):
            try:
                eng.shutdown()
            except Exception:  # noqa: BLE001 - closing: keep closing the others
                log.exception("shutting down the vLLM engine of %s", eng.name)
        self._engines.clear()
        self._loop.close()


def _weight_bytes(spec: ModelSpec) -> int:
    if spec.weight_bytes:
        return spec.weight_bytes
    return sum(p.stat().st_size for p in Path(spec.path or ".").glob("*.safetensors"))
