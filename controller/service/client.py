"""Client API servicer: submit, generate with streamed tokens, resume, status, cancel."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc

from qlmserve.controller.auth import current_principal
from qlmserve.controller.core import Controller, UnknownRequest
from qlmserve.controller.exceptions import OffsetOutOfRange
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
        async for chunk in self._stream(res.request_id, 0):
            yield chunk

    async def Stream(self, request, unused_context) -> AsyncIterator[client_pb2.TokenChunk]:
        req = await self.c.get_request(request.request_id)  # NOT_FOUND for an unknown id
        if request.offset > req.generated:
            raise OffsetOutOfRange(f"field 'offset': {request.offset} is past the {req.generated} tokens "
                                   f"the request has")
        async for chunk in self._stream(request.request_id, request.offset):
            yield chunk

    async def GetStatus(self, request, unused_context):
        return status_to_pb(await self.c.get_request(request.request_id))

    async def Cancel(self, request, unused_context):
        return status_to_pb(await self.c.cancel(request.request_id))

    async def _stream(self, rid: str, offset: int) -> AsyncIterator[client_pb2.TokenChunk]:
        """Tokens from `offset` on. The stream is trimmed as the client reads it; tokens no
        longer in the stream are rebuilt from the request's token ids, so a resume from
        any offset is exact."""
        store = self.c.store
        req = await store.get_request(rid)
        if req is None:
            raise UnknownRequest("field 'request_id': no such request")
        first = await store.first_stream_index(rid)
        gen_known = req.generated
        if offset < gen_known and (first is None or first > offset):
            ids = await store.generated_ids(rid)
            upto = len(ids) if first is None else min(first, len(ids))
            if offset < upto:
                back = ids[offset:upto]
                text = await self._text(req.model, ids[:offset], back)
                done = req.status.is_finished() and first is None and upto == len(ids)
                yield client_pb2.TokenChunk(request_id=rid, index=offset, token_ids=back, text=text, finished=done,
                                            finish_reason=req.finish_reason if done else "")
                if done:
                    return
                offset = upto
        if req.status.is_finished() and first is None and offset >= gen_known:
            yield client_pb2.TokenChunk(request_id=rid, index=offset, finished=True, finish_reason=req.finish_reason)
            return
        try:
            async for batch in store.read_stream(rid, offset):
                tokens = [e for e in batch if e.token_id is not None and e.index >= offset]
                nxt = tokens[0].index if tokens else batch[-1].index
                if nxt > offset:
                    # Trimmed while we looked: another reader of this request (e.g. the stream
                    # of a client that dropped, still draining on the server) read and trimmed
                    # them between our snapshot and this read. The ids string has them.
                    ids = await store.generated_ids(rid)
                    back = ids[offset:nxt]
                    if back:
                        yield client_pb2.TokenChunk(request_id=rid, index=offset, token_ids=back,
                                                    text=await self._text(req.model, ids[:offset], back))
                        offset += len(back)
                last = batch[-1]
                if tokens or last.finished:
                    yield client_pb2.TokenChunk(
                        request_id=rid, index=tokens[0].index if tokens else last.index,
                        token_ids=[e.token_id for e in tokens], text="".join(e.text for e in tokens),
                        finished=last.finished, finish_reason=last.finish_reason)
                if tokens:
                    offset = tokens[-1].index + 1
                    await store.trim_stream(rid, offset)
        except KeyError:
            raise UnknownRequest("field 'request_id': the request expired") from None

    async def _text(self, model: str, before: list[int], ids: list[int]) -> str:
        """Text of `ids` as it reads after `before` (decoding them together keeps merges right)."""
        if model not in self.c.policy.models:
            return ""
        dec = self.c.tokenizers.decode
        return dec(model, before + ids)[len(dec(model, before)):]


def add_to_server(server: grpc.aio.Server, controller: Controller) -> None:
    client_pb2_grpc.add_ClientServicer_to_server(ClientService(controller), server)
