"""Client API servicer: submit (one or a batch), generate with streamed tokens, resume,
status, cancel."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc

from qlmserve.controller.auth import current_principal
from qlmserve.controller.core import Controller
from qlmserve.controller import submit_batch
from qlmserve.controller.service import token_stream
from qlmserve.controller.service.convert import status_to_pb, submit_from_pb, submit_response_to_pb, submit_result_to_pb
from qlmserve.pb import client_pb2, client_pb2_grpc


class ClientService(client_pb2_grpc.ClientServicer):
    def __init__(self, controller: Controller) -> None:
        self.c = controller

    def _tenant(self) -> str:
        p = current_principal.get()
        return p.name if p is not None else self.c.policy.access.anonymous_tenant

    async def Submit(self, request, unused_context):
        return submit_response_to_pb(*await self.c.submit(submit_from_pb(request, self._tenant())))

    async def SubmitBatch(self, request, unused_context):
        submit_batch.check_size(self.c, len(request.requests))
        tenant = self._tenant()
        outcomes = await submit_batch.submit_all(self.c, [submit_from_pb(r, tenant) for r in request.requests])
        return client_pb2.SubmitBatchResponse(results=[submit_result_to_pb(o) for o in outcomes])

    async def Generate(self, request, unused_context) -> AsyncIterator[client_pb2.TokenChunk]:
        res, _ = await self.c.submit(submit_from_pb(request, self._tenant()))
        async for chunk in token_stream.chunks(self.c, res.request_id, 0):
            yield chunk

    async def Stream(self, request, unused_context) -> AsyncIterator[client_pb2.TokenChunk]:
        async for chunk in token_stream.resume(self.c, request.request_id, request.offset):
            yield chunk

    async def GetStatus(self, request, unused_context):
        return status_to_pb(await self.c.get_request(request.request_id))

    async def Cancel(self, request, unused_context):
        return status_to_pb(await self.c.cancel(request.request_id))


def add_to_server(server: grpc.aio.Server, controller: Controller) -> None:
    client_pb2_grpc.add_ClientServicer_to_server(ClientService(controller), server)
