"""Worker link servicer: one bidirectional stream per connected worker."""

from __future__ import annotations

import asyncio
import logging

import grpc
import yaml

from qlmserve.controller.core import Controller
from qlmserve.controller.service.convert import command_to_pb, report_from_pb
from qlmserve.pb import worker_pb2, worker_pb2_grpc

log = logging.getLogger("qlm.worker_link")


class WorkerLinkService(worker_pb2_grpc.WorkerLinkServicer):
    def __init__(self, controller: Controller) -> None:
        self.c = controller

    async def Connect(self, request_iterator, context):
        first = await anext(request_iterator, None)
        if first is None or first.WhichOneof("body") != "hello":
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "the first message must be Hello")
        hello = first.hello
        if not hello.worker_id:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "field 'hello.worker_id' is required")
        running = {e.request_id: e.attempt for e in hello.running}
        h, abort = await self.c.worker_connected(hello.worker_id, hello.engine, hello.device, list(hello.models),
                                                 running)
        models_yaml = yaml.safe_dump({n: s.model_dump(exclude_none=True) for n, s in self.c.policy.models.items()})
        yield worker_pb2.ControllerMessage(welcome=worker_pb2.Welcome(
            redis_url=self.c.redis_url, redis_prefix=self.c.store.k.prefix, models_yaml=models_yaml,
            abort_request_ids=abort, max_batch_size=self.c.policy.max_running_per_worker,
            max_prefill_tokens=self.c.policy.max_prefill_tokens))

        async def read() -> None:
            async for msg in request_iterator:
                body = msg.WhichOneof("body")
                if body == "state":
                    await self.c.worker_report(h, report_from_pb(msg.state))
                elif body == "op_result":
                    r = msg.op_result
                    await self.c.worker_op_result(h, r.op_id, r.kind, r.ok, list(r.request_ids), r.error, r.seconds)
                elif body == "failed":
                    f = msg.failed
                    await self.c.worker_request_failed(h, f.request_id, f.attempt, f.error)

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
                    break
        finally:
            reader.cancel()
            await self.c.worker_disconnected(h)


def add_to_server(server: grpc.aio.Server, controller: Controller) -> None:
    worker_pb2_grpc.add_WorkerLinkServicer_to_server(WorkerLinkService(controller), server)
