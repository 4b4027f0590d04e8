"""Client API servicer: submit, generate with streamed tokens, resume, status, cancel."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc

from qlmserve.controller.auth import current_principal
from qlmserve.controller.core import Controller
from qlmserve.controller.service import token_stream
from qlmserve.controller.service.convert import status_to_pb, submit_from_pb
from qlmserve.pb import client_pb2, client_pb2_grpc


class ClientService(client_pb2_grpc.ClientServicer):
    def __init__(self, controller: Controller) -> None:
        self.c = controller

    def _tenant(self) -> str:
        p = current_principal.get()
        return p.name if p is not None else self.c.policy.access.anonymous_tenant

    async def Submit(self, request, unused_context):
        res, n = await self.c.submit(submit_from_pb(request, self._tenant()))
        return client_pb2.SubmitResponse(request_id=res.request_id, prompt_tokens=n, group_id=res.group_id,
                                         duplicate=res.duplicate)

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
