"""Worker link servicer: one bidirectional stream per connected worker.

The worker's id comes from its credential (auth.Principal.worker_id_for); only the
leading controller takes worker sessions; every field a worker sends is bounded."""

from __future__ import annotations

import asyncio
import logging

import grpc
import yaml

from qlmserve.controller import validation
from qlmserve.controller.auth import current_principal
from qlmserve.controller.core import Controller
from qlmserve.controller.exceptions import InvalidRequest, NotLeader
from qlmserve.controller.policy import RequestLimits
from qlmserve.controller.service.convert import command_to_pb, report_from_pb
from qlmserve.pb import worker_pb2, worker_pb2_grpc

log = logging.getLogger("qlm.worker_link")


def check_hello(hello: worker_pb2.Hello, lim: RequestLimits) -> dict[str, int]:
    validation.worker_id(hello.worker_id, lim, "hello.worker_id")
    validation.name(hello.engine, "hello.engine", lim)
    validation.name(hello.device, "hello.device", lim)
    validation.items(hello.models, "hello.models", lim.max_list_items)
    for m in hello.models:
        validation.name(m, "hello.models", lim)
    validation.items(hello.running, "hello.running", lim.max_list_items)
    # Ids that are not request ids cannot be held: they go back as ids to drop.
    return {e.request_id: e.attempt for e in hello.running}


def check_state(s: worker_pb2.WorkerState, lim: RequestLimits) -> None:
    validation.items(s.running, "state.running", lim.max_list_items)
    validation.items(s.waiting, "state.waiting", lim.max_list_items)
    validation.items(s.warm_models, "state.warm_models", lim.max_list_items)
    validation.items(s.prefix_cache.blocks, "state.prefix_cache.blocks", lim.max_list_items)
    validation.items(s.expert_load, "state.expert_load", lim.max_list_items)
    for layer in s.expert_load:
        validation.items(layer.activations, "state.expert_load.activations", lim.max_list_items)
    for f in ("active_model", "device", "loading_model", "preemption"):
        validation.name(getattr(s, f), f"state.{f}", lim)
    for f in ("prefill_tokens_per_s", "decode_tokens_per_s"):
        validation.finite(getattr(s, f), f"state.{f}", 0.0)
    for e in s.running:
        validation.request_id(e.request_id, "state.running.request_id")


_finishing: set[asyncio.Task] = set()  # session ends still running after their handler was cancelled


async def _shielded(coro) -> None:
    task = asyncio.ensure_future(coro)
    _finishing.add(task)
    task.add_done_callback(_finishing.discard)
    try:
        await asyncio.shield(task)
    except asyncio.CancelledError:
        pass  # the task goes on; the handler ends


class WorkerLinkService(worker_pb2_grpc.WorkerLinkServicer):
    def __init__(self, controller: Controller) -> None:
        self.c = controller

    async def Connect(self, request_iterator, context):
        c = self.c
        if not c.is_leader:
            raise NotLeader("this controller is a standby: dial the leader")
        first = await anext(request_iterator, None)
        if first is None or first.WhichOneof("body") != "hello":
            raise InvalidRequest("the first message must be Hello")
        hello = first.hello
        lim = c.policy.limits
        running = check_hello(hello, lim)
        wid = current_principal.get().worker_id_for(hello.worker_id)
        if not wid:
            raise InvalidRequest("field 'hello.worker_id' is required")
        h, abort = await c.worker_connected(wid, hello.engine, hello.device, list(hello.models), running)
        try:
            redis_url = await c.worker_redis_url(h)
        except BaseException:
            await _shielded(c.worker_disconnected(h))
            raise
        models_yaml = yaml.safe_dump({n: s.model_dump(exclude_none=True) for n, s in c.policy.models.items()})
        yield worker_pb2.ControllerMessage(welcome=worker_pb2.Welcome(
            redis_url=redis_url, redis_prefix=c.store.k.prefix, models_yaml=models_yaml,
            abort_request_ids=abort, max_batch_size=c.policy.max_running_per_worker, worker_id=wid,
            finished_retention_s=c.policy.finished_retention_s,
            max_prefill_tokens=c.policy.max_prefill_tokens))

        async def read() -> None:
            async for msg in request_iterator:
                lim = c.policy.limits
                body = msg.WhichOneof("body")
                if body == "state":
                    check_state(msg.state, lim)
                    await c.worker_report(h, report_from_pb(msg.state))
                elif body == "op_result":
                    r = msg.op_result
                    validation.name(r.op_id, "op_result.op_id", lim)
                    validation.name(r.kind, "op_result.kind", lim)
                    validation.items(r.request_ids, "op_result.request_ids", lim.max_list_items)
                    rids = [rid for rid in r.request_ids if validation.REQUEST_ID.fullmatch(rid)]
                    await c.worker_op_result(h, r.op_id, r.kind, r.ok, rids, r.error[:lim.max_error_chars],
                                             r.seconds)
                elif body == "failed":
                    f = msg.failed
                    validation.request_id(f.request_id, "failed.request_id")
                    await c.worker_request_failed(h, f.request_id, f.attempt, f.error[:lim.max_error_chars])

        reader = asyncio.create_task(read())
        try:
            while h.connected:
                get = asyncio.create_task(h.outbox.get())
                done, _ = await asyncio.wait({get, reader}, return_when=asyncio.FIRST_COMPLETED)
                if get in done:
                    cmd = get.result()
                    if cmd is None:  # the controller closed this session
                        break
                    yield command_to_pb(cmd)
                else:
                    get.cancel()
                    exc = reader.exception()
                    if exc is not None and not isinstance(exc, (asyncio.CancelledError, grpc.aio.AioRpcError)):
                        raise exc  # a malformed message: the worker is told why its session ends
                    break
        finally:
            reader.cancel()
            # The session may end (lead lost, the stream closed) while the reader waits on it:
            # its "RPC already finished" is the session's end, not an error to log.
            reader.add_done_callback(lambda t: t.cancelled() or t.exception())
            # gRPC cancels this handler when the worker's stream breaks: the requeue must not
            # be cancelled with it (it ran only up to its first await before).
            await _shielded(c.worker_disconnected(h))


def add_to_server(server: grpc.aio.Server, controller: Controller) -> None:
    worker_pb2_grpc.add_WorkerLinkServicer_to_server(WorkerLinkService(controller), server)
