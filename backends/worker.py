"""`qlm worker`: a worker process. It dials the controller, runs one engine, and writes
generated tokens straight to Redis.

Threads:
  - the asyncio thread keeps the gRPC session (reconnecting with backoff while the
    controller restarts), receives requests and operations, sends state reports;
  - the engine thread runs `engine.step()` in a loop, carries out operations between
    steps, and writes each step's tokens to Redis in one script call.

The engine keeps generating while the controller is away: tokens go to Redis, and on
reconnection the worker tells the controller what it holds.

(Over 500 lines: EngineLoop is the part to move to a file of its own.)
"""

from __future__ import annotations

import asyncio
import logging
import os
import queue
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import grpc
import redis
import yaml

from qlmserve.backends.engine import Engine, EngineError, EngineRequest, EngineStats, PreemptionMode, TokenEvent
from qlmserve.backends.factory import SimFleetWorker, create_engine
from qlmserve.backends.token_sink import TokenSink
from qlmserve.credentials import TlsOptions, open_channel
from qlmserve.operations.costs import WorkerProfile
from qlmserve.operations.detokenize import next_piece, streamed_text
from qlmserve.operations.model_spec import ModelSpec
from qlmserve.pb import worker_pb2, worker_pb2_grpc
from qlmserve.redis_urls import redis_client

log = logging.getLogger("qlm.worker")

STATE_INTERVAL_S = 0.25


@dataclass
class WorkerOptions:
    controller: str  # host:port of the controller; several, comma-separated: it finds the leader
    worker_id: str = ""
    engine: str = "hf"  # hf | sim | vllm
    device: str = "auto"
    max_batch_size: int = 16
    kv_capacity_tokens: int | None = None
    preload: str | None = None  # model to load before taking work
    preemption: str = "none"
    max_pause_s: float = 2.0
    sim_profile: str | None = None  # WorkerProfile YAML for the sim engine
    sim_fleet: SimFleetWorker | None = None  # or: this worker of a simulated fleet (backends/factory.py)
    seed: int = 0
    # CPU threads of the HF engine (of vLLM's CPU worker with --engine vllm). One per
    # worker by default: several workers sharing a few cores with more threads each spin
    # against each other (measured 20x slower on 2 cores with 2 workers x 2 threads).
    threads: int = 1
    prefix_cache: bool = False  # the HF engine's prefix cache (backends/hf/prefix_index.py)
    token: str | None = None  # worker token (qlmserve.credentials.resolve_token)
    # Read the token again at every dial (a token file `qlm serve` is still writing); wins over `token`.
    token_loader: Callable[[], str | None] | None = None
    tls: TlsOptions | None = None

    def resolved_id(self) -> str:
        return self.worker_id or f"{socket.gethostname()}-{os.getpid()}"

    def addresses(self) -> list[str]:
        return [a.strip() for a in self.controller.split(",") if a.strip()]


# Session errors that redialing cannot fix: the worker stops and says why.
FATAL_CODES = (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED)


@dataclass
class _Held:
    """What the worker knows of a request it runs."""

    attempt: int
    model: str
    ids: list[int] = field(default_factory=list)  # generated so far (for detokenization)
    text: str = ""  # text emitted so far


class EngineLoop(threading.Thread):
    """Owns the engine; every engine call except add_request/abort happens here."""

    def __init__(self, engine: Engine, sink_factory: Callable[[], TokenSink], tokenizers: dict[str, object],
                 on_handback: Callable[[str, list[str]], None],
                 on_failed: Callable[[str, int, str], None] = lambda rid, attempt, error: None) -> None:
        super().__init__(name="engine", daemon=True)
        self.engine = engine
        self.sink_factory = sink_factory
        self.sink: TokenSink | None = None
        self.tokenizers = tokenizers
        self.on_handback = on_handback  # (reason, request ids) -> tell the controller
        self.on_failed = on_failed  # (request id, attempt, error) of a request that failed alone
        self.commands: queue.Queue[Callable[[], None]] = queue.Queue()
        self.held: dict[str, _Held] = {}
        self.lock = threading.Lock()
        self.stats: EngineStats = engine.stats()
        self._stats_at = 0.0
        self._halt = threading.Event()  # not `_stop`: threading.Thread.join() calls its own _stop()
        self._pending: list[tuple[TokenEvent, int, str]] = []

    def stop(self) -> None:
        self._halt.set()
        self.commands.put(lambda: None)

    def call(self, fn: Callable[[], None]) -> None:
        self.commands.put(fn)

    def run(self) -> None:
        while not self._halt.is_set():
            try:
                self._run_commands(block=not self.engine.has_work() and not self._pending)
                if self._pending:
                    self._flush()
                    continue
                if self.engine.has_work():
                    events = self.engine.step()
                    if events:
                        self._pending = self._with_text(events)
                        self._flush()
                    self._report_failures()
                now = time.monotonic()
                if now - self._stats_at > STATE_INTERVAL_S / 2:
                    self.stats = self.engine.stats()
                    self._stats_at = now
            except Exception:  # noqa: BLE001 - keep the worker alive; the failure is logged
                log.exception("engine loop error")
                time.sleep(0.1)
        try:  # on this thread, between steps: a vLLM engine stops its own processes here
            self.engine.close()
        except Exception:  # noqa: BLE001 - stopping anyway
            log.exception("closing the engine")

    def _report_failures(self) -> None:
        for rid, error in self.engine.take_failures():
            with self.lock:
                h = self.held.pop(rid, None)
            if h is not None:
                log.warning("request %s failed alone: %s", rid, error)
                self.on_failed(rid, h.attempt, error)

    def reset_sink(self) -> None:
        """A new session brought new Redis credentials: reconnect at the next write."""
        self.call(self._drop_sink)

    def _drop_sink(self) -> None:
        self.sink = None

    def _run_commands(self, block: bool) -> None:
        try:
            fn = self.commands.get(timeout=0.05) if block else self.commands.get_nowait()
        except queue.Empty:
            return
        while True:
            fn()
            try:
                fn = self.commands.get_nowait()
            except queue.Empty:
                return

    def _with_text(self, events: list[TokenEvent]) -> list[tuple[TokenEvent, int, str]]:
        out = []
        with self.lock:
            for ev in events:
                h = self.held.get(ev.request_id)
                if h is None:
                    continue  # aborted meanwhile
                h.ids.append(ev.token_id)
                piece = self._detok(h)
                out.append((ev, h.attempt, piece))
                if ev.finished:
                    del self.held[ev.request_id]
        return out

    def _detok(self, h: _Held) -> str:
        piece = next_piece(self.tokenizers.get(h.model), h.ids, h.text)
        if piece is None:
            return ""  # an incomplete UTF-8 sequence: wait for the next token
        h.text += piece
        return piece

    def _flush(self) -> None:
        """Write pending tokens; while Redis is away, keep them and retry (the engine waits)."""
        try:
            if self.sink is None:
                self.sink = self.sink_factory()
            refused = self.sink.write(self._pending)
            self._pending = []
        except (redis.ConnectionError, redis.TimeoutError, redis.AuthenticationError) as exc:
            log.warning("Redis unavailable, holding %d tokens: %s", len(self._pending), exc)
            self.sink = None
            time.sleep(0.5)
            return
        except redis.ResponseError as exc:
            # Our script not loaded yet after a Redis restart (the controller loads it; a
            # worker may not), or our Redis user gone with our session: hold and retry.
            log.warning("Redis refused the token write, holding %d tokens: %s", len(self._pending),
                        str(exc).split("\n")[0][:200])
            self.sink = None
            time.sleep(0.2)
            return
        for rid, attempt in refused:
            # The controller gave this attempt's request to someone else (we were presumed
            # dead), or back to us as a newer attempt: drop this attempt, never a newer one.
            log.info("request %s (attempt %d) no longer ours: dropping it", rid, attempt)
            self._drop(rid, attempt)

    def _drop(self, rid: str, attempt: int | None = None) -> None:
        """Stop a request; with `attempt`, only while that attempt is the one held here (a
        stale write of an earlier attempt must not stop the request's current run)."""
        with self.lock:
            h = self.held.get(rid)
            if attempt is not None and h is not None and h.attempt != attempt:
                return
            self.held.pop(rid, None)
        try:
            self.engine.abort(rid)
        except EngineError:
            pass


class Worker:
    def __init__(self, opts: WorkerOptions) -> None:
        self.opts = opts
        self.worker_id = opts.resolved_id()
        self.loop_thread: EngineLoop | None = None
        self.outbox: asyncio.Queue[worker_pb2.WorkerMessage] | None = None
        self.aio_loop: asyncio.AbstractEventLoop | None = None
        self.models: dict[str, ModelSpec] = {}
        self._stopping = asyncio.Event()

    # ---- session ----------------------------------------------------------------------

    async def run(self) -> None:
        self.aio_loop = asyncio.get_running_loop()
        if self.opts.engine in _HEAVY_IMPORTS:
            # Importing transformers' (or vLLM's) model code holds the GIL for seconds; do
            # it before dialing, so that a session's heartbeats never starve behind it.
            await asyncio.to_thread(_HEAVY_IMPORTS[self.opts.engine])
        addresses = self.opts.addresses()
        turn = 0
        backoff = 0.1
        while not self._stopping.is_set():
            address = addresses[turn % len(addresses)]
            try:
                await self._session(address)
                backoff = 0.1
            except grpc.aio.AioRpcError as exc:
                if exc.code() in FATAL_CODES and not (exc.code() == grpc.StatusCode.UNAUTHENTICATED
                                                      and self._token() is None):
                    log.error("controller %s refused this worker: %s: %s", address, exc.code().name, exc.details())
                    raise
                log.warning("controller link to %s lost (%s); redialing", address, exc.code().name)
                turn += 1  # a standby, or a controller that died: try the next address
            except (ConnectionError, OSError) as exc:
                log.warning("controller link error (%s); redialing", exc)
                turn += 1
            if self._stopping.is_set():
                break
            # Short waits: a leader that died is replaced within about a second, and every
            # second a worker spends away its requests wait (max 1 s between tries).
            await asyncio.sleep(backoff)
            backoff = min(1.0, backoff * 1.5)

    def stop(self) -> None:
        self._stopping.set()
        if self.loop_thread:
            self.loop_thread.stop()

    def _token(self) -> str | None:
        return self.opts.token_loader() if self.opts.token_loader else self.opts.token

    async def _session(self, address: str) -> None:
        self.outbox = asyncio.Queue()
        async with open_channel(address, self._token(), self.opts.tls, options=[
                ("grpc.keepalive_time_ms", 10_000), ("grpc.keepalive_timeout_ms", 5_000)]) as channel:
            stub = worker_pb2_grpc.WorkerLinkStub(channel)
            call = stub.Connect(self._outgoing())
            await self.outbox.put(worker_pb2.WorkerMessage(hello=self._hello()))
            reporter = asyncio.create_task(self._report_loop())
            try:
                async for msg in call:
                    self._on_message(msg)
            finally:
                reporter.cancel()

    async def _outgoing(self):
        assert self.outbox is not None
        while True:
            yield await self.outbox.get()

    def _hello(self) -> worker_pb2.Hello:
        running = []
        if self.loop_thread is not None:
            with self.loop_thread.lock:
                for rid, h in self.loop_thread.held.items():
                    running.append(worker_pb2.RunningEntry(request_id=rid, attempt=h.attempt))
        return worker_pb2.Hello(worker_id=self.worker_id, engine=self.opts.engine, device=self.opts.device,
                                models=sorted(self.models), running=running)

    def _send(self, msg: worker_pb2.WorkerMessage) -> None:
        """Thread-safe: queue a message for the controller."""
        if self.aio_loop is None or self.outbox is None:
            return
        outbox = self.outbox
        self.aio_loop.call_soon_threadsafe(outbox.put_nowait, msg)

    async def _report_loop(self) -> None:
        while True:
            if self.loop_thread is not None:
                try:
                    await self.outbox.put(worker_pb2.WorkerMessage(state=self._state()))
                except Exception:  # noqa: BLE001 - a bad report must not stop the heartbeats
                    log.exception("cannot build the state report")
            await asyncio.sleep(STATE_INTERVAL_S)

    def _state(self) -> worker_pb2.WorkerState:
        lt = self.loop_thread
        s = lt.stats
        with lt.lock:
            held = dict(lt.held)
        swapped = set(s.swapped)
        running = [worker_pb2.RunningEntry(request_id=rid, attempt=h.attempt, swapped=rid in swapped)
                   for rid, h in held.items()]
        state = worker_pb2.WorkerState(
            active_model=s.active_model or "", warm_models=s.warm_models, kv_capacity_tokens=s.kv_capacity_tokens,
            kv_used_tokens=s.kv_used_tokens, running=running, waiting=s.waiting, max_batch_size=s.max_batch_size,
            prefill_tokens_per_s=s.prefill_tokens_per_s, decode_tokens_per_s=s.decode_tokens_per_s, device=s.device,
            loading_model=self._loading or "", preemption=s.preemption.value, servable_models=s.servable_models,
            host_ram_bytes=s.host_ram_bytes, host_kv_used_tokens=s.host_kv_used_tokens,
            supported_ops=sorted(c.value for c in lt.engine.supported_ops()))
        if s.host_kv_capacity_tokens is not None:
            state.host_kv_capacity_tokens = s.host_kv_capacity_tokens
        if s.profile is not None:
            state.cost.CopyFrom(cost_to_pb(s.profile))
        for layer in s.expert_activations or ():
            state.expert_load.add(activations=layer)
        if s.prefix is not None:
            state.prefix_cache.CopyFrom(worker_pb2.PrefixCacheReport(
                block_tokens=s.prefix.block_tokens, blocks=sorted(s.prefix.blocks),
                queued_prefill_tokens=s.prefix.queued_prefill_tokens))
        return state

    _loading: str | None = None

    # ---- messages from the controller -------------------------------------------------

    def _on_message(self, msg: worker_pb2.ControllerMessage) -> None:
        body = msg.WhichOneof("body")
        if body == "welcome":
            self._on_welcome(msg.welcome)
        elif body == "run":
            self._on_run(msg.run)
        elif body == "op":
            self._on_op(msg.op)

    def _on_welcome(self, w: worker_pb2.Welcome) -> None:
        models = {name: ModelSpec.model_validate(spec) for name, spec in (yaml.safe_load(w.models_yaml) or {}).items()}
        self._redis = (w.redis_url, w.redis_prefix)  # this session's own Redis user
        self._keep_s = w.finished_retention_s or 3600.0
        if w.worker_id and w.worker_id != self.worker_id:
            self.worker_id = w.worker_id
        if self.loop_thread is None:
            self.models = models
            self._start_engine(w.max_batch_size, w.max_prefill_tokens)
        else:
            self.loop_thread.reset_sink()
        for rid in w.abort_request_ids:
            self.loop_thread._drop(rid)
        log.info("worker %s connected to %s", self.worker_id, self.opts.controller)

    _redis: tuple[str, str] = ("", "")
    _keep_s: float = 3600.0

    def _start_engine(self, max_batch: int, max_prefill_tokens: int = 0) -> None:
        o = self.opts
        batch = min(o.max_batch_size, max_batch) if max_batch else o.max_batch_size
        if o.engine == "hf":
            import torch

            torch.set_num_threads(max(1, o.threads))
        engine = create_engine(o.engine, self.models, device=o.device, max_batch_size=batch,
                               kv_capacity_tokens=o.kv_capacity_tokens, sim_profile=o.sim_profile, seed=o.seed,
                               sim_fleet=o.sim_fleet, max_prefill_tokens=max_prefill_tokens or None, threads=o.threads,
                               prefix_cache=o.prefix_cache)
        engine.set_preemption(PreemptionMode(o.preemption), o.max_pause_s)
        tokenizers = {}
        if o.engine in _HEAVY_IMPORTS:  # the engines of real models detokenize here
            from transformers import AutoTokenizer

            for name, spec in self.models.items():
                if spec.path:
                    tokenizers[name] = AutoTokenizer.from_pretrained(spec.path, local_files_only=True)

        def sink() -> TokenSink:
            url, prefix = self._redis
            return TokenSink(redis_client(url, socket_timeout=10), prefix, self.worker_id, self._keep_s)

        self.loop_thread = EngineLoop(engine, sink, tokenizers, self._handback, self._failed)
        if o.preload:
            model = o.preload
            self.loop_thread.call(lambda: engine.load_model(model))
        self.loop_thread.start()

    def _failed(self, rid: str, attempt: int, error: str) -> None:
        self._send(worker_pb2.WorkerMessage(failed=worker_pb2.RequestFailed(request_id=rid, attempt=attempt,
                                                                            error=error)))

    def _handback(self, reason: str, rids: list[str]) -> None:
        self._send(worker_pb2.WorkerMessage(op_result=worker_pb2.OpResult(
            op_id="", kind="evict", ok=True, request_ids=rids, error=reason)))

    def _on_run(self, r: worker_pb2.RunRequest) -> None:
        lt = self.loop_thread
        req = EngineRequest(
            request_id=r.request_id, model=r.model, prompt_token_ids=list(r.prompt_token_ids),
            max_tokens=r.max_tokens, generated_token_ids=list(r.generated_token_ids), temperature=r.temperature,
            top_p=r.top_p if r.top_p > 0 else 1.0, seed=r.seed if r.HasField("seed") else None,
            stop_token_ids=tuple(r.stop_token_ids), latency_sensitive=r.latency_sensitive, priority=r.priority)
        held = _Held(r.attempt, r.model, ids=list(r.generated_token_ids))
        if held.ids:  # what its earlier attempts showed, so the stream goes on from there
            held.text = streamed_text(lt.tokenizers.get(r.model), held.ids)
        with lt.lock:
            lt.held[r.request_id] = held
        try:
            # Thread-safe by the Engine contract, so a latency-sensitive request can
            # preempt a step that is running right now.
            lt.engine.add_request(req)
        except EngineError as exc:
            with lt.lock:
                lt.held.pop(r.request_id, None)
            if "model" in str(exc).lower():
                self._handback(str(exc), [r.request_id])  # wrong model loaded: back to the queue
            else:
                self._send(worker_pb2.WorkerMessage(failed=worker_pb2.RequestFailed(
                    request_id=r.request_id, attempt=r.attempt, error=str(exc))))

    def _on_op(self, op: worker_pb2.WorkerOp) -> None:
        lt = self.loop_thread
        if op.kind == "abort":
            for rid in op.request_ids:
                lt._drop(rid)
            return
        if op.kind == "load_model":
            self._loading = op.model
        lt.call(lambda: self._run_op(op))

    def _run_op(self, op: worker_pb2.WorkerOp) -> None:
        """On the engine thread, between steps."""
        lt = self.loop_thread
        eng = lt.engine
        handed_back: list[str] = []
        seconds = 0.0
        nbytes = 0
        try:
            if op.kind in ("evict", "drain"):
                rids = list(op.request_ids) or list(lt.held)
                for rid in rids:
                    handed_back += self._evict(rid)
            elif op.kind in ("swap_out", "swap_in"):
                swap = eng.swap_out if op.kind == "swap_out" else eng.swap_in
                for rid in op.request_ids:
                    c = swap(rid)
                    seconds += c.seconds
                    nbytes += c.bytes_moved
                    handed_back.append(rid)
            elif op.kind == "load_model":
                with lt.lock:
                    others = [rid for rid, h in lt.held.items() if h.model != op.model]
                for rid in others:  # a model swap hands the old model's requests back
                    handed_back += self._evict(rid)
                c = eng.load_model(op.model)
                seconds, nbytes = c.seconds, c.bytes_moved
            elif op.kind == "warm_model":
                c = eng.warm_model(op.model)
                seconds, nbytes = c.seconds, c.bytes_moved
            elif op.kind == "drop_warm":
                eng.drop_warm(op.model)
            elif op.kind == "set_preemption":
                eng.set_preemption(PreemptionMode(op.mode), op.max_pause_s)
            else:
                raise EngineError(f"unknown operation {op.kind!r}")
            ok, err = True, ""
        except (EngineError, ValueError, KeyError) as exc:
            ok, err = False, str(exc)
        finally:
            if op.kind == "load_model":
                self._loading = None
            lt.stats = eng.stats()
        self._send(worker_pb2.WorkerMessage(op_result=worker_pb2.OpResult(
            op_id=op.op_id, kind=op.kind, ok=ok, seconds=seconds, bytes_moved=nbytes, error=err,
            request_ids=handed_back)))

    def _evict(self, rid: str) -> list[str]:
        lt = self.loop_thread
        with lt.lock:
            if rid not in lt.held:
                return []
        lt._flush()  # tokens produced so far must be in Redis before the request leaves
        try:
            lt.engine.evict(rid)
        except EngineError:
            lt.engine.abort(rid)
        with lt.lock:
            lt.held.pop(rid, None)
        return [rid]


def _import_hf() -> None:
    import transformers.modeling_utils  # noqa: F401
    from transformers import (  # noqa: F401 - the families the engine serves
        AutoTokenizer,
        LlamaForCausalLM,
        MixtralForCausalLM,
        OlmoeForCausalLM,
        Qwen2MoeForCausalLM,
        Qwen3MoeForCausalLM,
    )

    import qlmserve.backends.hf.engine  # noqa: F401


def _import_vllm() -> None:
    import transformers.modeling_utils  # noqa: F401
    from transformers import AutoTokenizer  # noqa: F401

    import qlmserve.backends.vllm.engine  # noqa: F401 - imports vllm itself


_HEAVY_IMPORTS: dict[str, Callable[[], None]] = {"hf": _import_hf, "vllm": _import_vllm}


def run_worker(opts: WorkerOptions) -> int:
    worker = Worker(opts)

    async def main() -> None:
        import signal

        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                loop.add_signal_handler(sig, worker.stop)
            except NotImplementedError:
                pass
        task = asyncio.create_task(worker.run())
        stopped = asyncio.create_task(worker._stopping.wait())
        await asyncio.wait({task, stopped}, return_when=asyncio.FIRST_COMPLETED)
        if task.done():
            worker.stop()
            task.result()  # a refusal redialing cannot fix ends the worker with its reason
        task.cancel()

    try:
        asyncio.run(main())
    except grpc.aio.AioRpcError:
        return 1
    finally:
        if worker.loop_thread is not None:
            worker.loop_thread.join(timeout=30)  # lets the engine close (vLLM: its engine processes)
    return 0


def cost_to_pb(p: WorkerProfile) -> worker_pb2.CostModel:
    return worker_pb2.CostModel(
        prefill_base_s=p.prefill_base_s, prefill_per_token_s=p.prefill_per_token_s, decode_base_s=p.decode_base_s,
        decode_per_seq_s=p.decode_per_seq_s, decode_per_ctx_token_s=p.decode_per_ctx_token_s,
        kv_bytes_per_token=p.kv_bytes_per_token, kv_swap_bytes_per_s=p.kv_swap_bytes_per_s,
        load_cold_bytes_per_s=p.load_cold_bytes_per_s, load_warm_bytes_per_s=p.load_warm_bytes_per_s,
        load_fixed_s=p.load_fixed_s)
