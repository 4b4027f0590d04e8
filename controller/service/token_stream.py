"""A request's tokens from an offset on: the one reader behind the gRPC Generate and
Stream calls and the HTTP API's streams (controller/http/).

The stream is trimmed as the client reads it; tokens no longer in the stream are rebuilt
from the request's token ids, so a resume from any offset is exact."""

from __future__ import annotations

from collections.abc import AsyncIterator

from qlmserve.controller.core import Controller, UnknownRequest
from qlmserve.controller.exceptions import OffsetOutOfRange
from qlmserve.pb import client_pb2


async def check_resume(c: Controller, rid: str, offset: int) -> None:
    """Refuse a resume of an unknown request, or from an offset the request has not reached."""
    req = await c.get_request(rid)  # NOT_FOUND for an unknown id
    if offset < 0:
        raise OffsetOutOfRange("field 'offset' must be at least 0")
    if offset > req.generated:
        raise OffsetOutOfRange(f"field 'offset': {offset} is past the {req.generated} tokens the request has")


async def resume(c: Controller, rid: str, offset: int) -> AsyncIterator[client_pb2.TokenChunk]:
    """Tokens from `offset` of a request the caller names (checked: the id, the offset)."""
    await check_resume(c, rid, offset)
    async for chunk in chunks(c, rid, offset):
        yield chunk


async def chunks(c: Controller, rid: str, offset: int) -> AsyncIterator[client_pb2.TokenChunk]:
    """Tokens from `offset` on, until the request ends (its last chunk has finished=True)."""
    store = c.store
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
            text = await _text(c, req.model, ids[:offset], back)
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
                                                text=await _text(c, req.model, ids[:offset], back))
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


async def _text(c: Controller, model: str, before: list[int], ids: list[int]) -> str:
    """Text of `ids` as the worker's stream showed it after `before` (decoding them together
    keeps merges right; an incomplete character at either end is held back alike)."""
    if model not in c.policy.models:
        return ""
    text = c.tokenizers.streamed_text
    return text(model, before + ids)[len(text(model, before)):]
