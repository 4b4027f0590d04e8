"""The endpoints: POST /v1/completions, POST /v1/chat/completions, GET /v1/models,
GET /v1/requests/{id} and GET /v1/requests/{id}/stream?offset=K (resume), GET /health.

A completion is a Controller.submit (the gRPC Submit's one path: validation, admission,
durable in Redis) followed by the request's token stream (service/token_stream.py). The
response's `x-qlm-request-id` header names the request as soon as it is acknowledged."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from qlmserve.controller import validation
from qlmserve.controller.auth import CLIENT_SERVICE, Authenticator, Principal
from qlmserve.controller.core import Controller, SubmitInput
from qlmserve.controller.exceptions import UnknownModel
from qlmserve.controller.http import chat_template, schemas, sse
from qlmserve.controller.http.errors import HttpError, classify, error_body, error_response
from qlmserve.controller.http.stop import StopMatcher
from qlmserve.controller.service import token_stream
from qlmserve.controller.service.server import MAX_MESSAGE_BYTES

log = logging.getLogger("qlm.http")

SLO_HEADER = "x-qlm-slo-class"
REQUEST_ID_HEADER = "x-qlm-request-id"
IDEMPOTENCY_HEADER = "idempotency-key"
_SSE_HEADERS = {"cache-control": "no-cache", "x-accel-buffering": "no"}


class RequestFailed(RuntimeError):
    """The request ended with an error (e.g. its class fails fast and its TTFT was missed)."""


class Generation:
    """The tokens of one accepted request as OpenAI text: stop strings applied, usage counted."""

    def __init__(self, c: Controller, rid: str, model: str, chat: bool, prompt_tokens: int, stops: list[str],
                 offset: int = 0) -> None:
        self.c, self.rid, self.model, self.chat = c, rid, model, chat
        self.prompt_tokens, self.offset = prompt_tokens, offset
        self.stop = StopMatcher(stops)
        self.created = int(time.time())
        self.completion_tokens = offset

    async def pieces(self) -> AsyncIterator[tuple[str, list[int], int, str | None]]:
        """(text, token ids, offset of the first, finish reason or None) until the request ends."""
        async for ch in token_stream.chunks(self.c, self.rid, self.offset):
            ids = list(ch.token_ids)
            self.completion_tokens += len(ids)
            text = self.stop.feed(ch.text)
            if self.stop.stopped:
                yield text, ids, ch.index, "stop"
                await self.c.cancel(self.rid)  # the workers stop on ids only: end the rest here
                return
            if ch.finished:
                if ch.finish_reason == "error":
                    req = await self.c.get_request(self.rid)
                    raise RequestFailed(req.error or "the request failed")
                yield text + self.stop.flush(), ids, ch.index, ch.finish_reason or "stop"
                return
            yield text, ids, ch.index, None

    def usage(self) -> dict:
        return sse.usage(self.prompt_tokens, self.completion_tokens)

    async def collect(self) -> dict:
        parts, reason = [], "stop"
        async for text, _ids, _off, fin in self.pieces():
            parts.append(text)
            reason = fin or reason
        return sse.response(self.rid, self.model, self.created, self.chat, "".join(parts), reason, self.usage())

    async def events(self, include_usage: bool) -> AsyncIterator[bytes]:
        first = True
        try:
            async for text, ids, off, fin in self.pieces():
                use = self.usage() if fin else None
                yield sse.event(sse.chunk(self.rid, self.model, self.created, self.chat, text, fin, off, ids, use,
                                          first=first))
                first = False
            if include_usage:
                yield sse.event({"id": sse.completion_id(self.rid, self.chat), "created": self.created,
                                 "model": self.model, "choices": [], "usage": self.usage(),
                                 "object": "chat.completion.chunk" if self.chat else "text_completion"})
        except Exception as exc:  # noqa: BLE001 - the status line is sent: report it in the stream
            yield sse.event(_error_body(exc))
        yield sse.DONE


def _error_body(exc: BaseException) -> dict:
    if isinstance(exc, RequestFailed):
        return error_body(str(exc), "request_failed", None, "request_failed")
    c = classify(exc)
    if c is None:
        log.exception("unexpected error in an HTTP stream", exc_info=exc)
        return error_body("internal error (logged by the controller)", "server_error", None, 500)
    return c[1]


def build_router(c: Controller, auth: Authenticator) -> APIRouter:
    router = APIRouter()

    def principal(request: Request) -> Principal:
        return auth.check(CLIENT_SERVICE, request.headers.get("authorization"), unknown_as_anonymous=True)

    async def body_of(request: Request):
        """The JSON body, read up to the gRPC message limit (the policy's limits bound the fields)."""
        size = 0
        parts = []
        async for part in request.stream():
            size += len(part)
            if size > MAX_MESSAGE_BYTES:
                raise HttpError(413, f"the request body exceeds {MAX_MESSAGE_BYTES} bytes")
            parts.append(part)
        try:
            return json.loads(b"".join(parts))
        except ValueError:
            raise HttpError(400, "the request body is not JSON") from None

    async def submission(req: schemas.CompletionRequest | schemas.ChatRequest, chat: bool, p: Principal,
                         request: Request) -> SubmitInput:
        req.refuse_unsupported()
        lim = c.policy.limits
        text, ids = None, None
        if chat:
            if req.model not in c.policy.models:  # the tokenizer is the model's: know the model first
                raise UnknownModel(f"field 'model': the policy serves no such model (one of {sorted(c.policy.models)})")
            messages = [{"role": m.role, "content": m.text()} for m in req.messages]
            validation.text("".join(m["content"] for m in messages), "messages", lim.max_prompt_chars)
            ids = await asyncio.to_thread(chat_template.render, c.tokenizers, req.model, messages)
            max_tokens = req.limit()
            if max_tokens is None:  # as far as the context allows (what vLLM does)
                max_tokens = max(1, c.policy.models[req.model].max_context - len(ids))
                cls = c.slo_of(request.headers.get(SLO_HEADER) or req.slo_class or c.policy.default_slo_class or "")
                if cls is not None and cls.admission.max_tokens is not None:
                    max_tokens = min(max_tokens, cls.admission.max_tokens)
        else:
            text, ids = req.single_prompt()
            max_tokens = 16 if req.max_tokens is None else req.max_tokens
        return SubmitInput(
            model=req.model, slo_class=request.headers.get(SLO_HEADER) or req.slo_class or "",
            prompt=text, prompt_token_ids=ids, max_tokens=max_tokens,
            temperature=1.0 if req.temperature is None else req.temperature,
            top_p=1.0 if req.top_p is None else req.top_p, seed=req.seed,
            user_id=req.user or "", tenant=p.name,
            idempotency_key=request.headers.get(IDEMPOTENCY_HEADER) or req.idempotency_key or "")

    async def complete(request: Request, chat: bool) -> Response:
        prompt_param = "messages" if chat else "prompt"
        try:
            p = principal(request)
            req = schemas.parse(schemas.ChatRequest if chat else schemas.CompletionRequest, await body_of(request))
            stops = req.stops()
            res, n_prompt = await c.submit(await submission(req, chat, p, request))
        except Exception as exc:  # noqa: BLE001 - every refusal answers with the OpenAI error body
            return _logged(error_response(exc, prompt_param), exc)
        gen = Generation(c, res.request_id, req.model, chat, n_prompt, stops)
        headers = {REQUEST_ID_HEADER: res.request_id}
        if req.stream:
            include = bool(req.stream_options and req.stream_options.include_usage)
            return StreamingResponse(gen.events(include), media_type="text/event-stream",
                                     headers=headers | _SSE_HEADERS)
        try:
            return JSONResponse(await gen.collect(), headers=headers)
        except RequestFailed as exc:
            return JSONResponse(_error_body(exc), status_code=503, headers=headers)
        except Exception as exc:  # noqa: BLE001
            r = _logged(error_response(exc, prompt_param), exc)
            r.headers[REQUEST_ID_HEADER] = res.request_id
            return r

    @router.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await complete(request, chat=False)

    @router.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await complete(request, chat=True)

    @router.get("/v1/models")
    async def models(request: Request) -> Response:
        try:
            principal(request)
        except Exception as exc:  # noqa: BLE001
            return error_response(exc)
        return JSONResponse({"object": "list", "data": [
            {"id": m, "object": "model", "created": 0, "owned_by": "qlm", "max_model_len": spec.max_context}
            for m, spec in sorted(c.policy.models.items())]})

    @router.get("/v1/requests/{rid}")
    async def status(rid: str, request: Request) -> Response:
        try:
            principal(request)
            r = await c.get_request(rid)
        except Exception as exc:  # noqa: BLE001
            return _logged(error_response(exc), exc)
        return JSONResponse({"id": r.request_id, "status": r.status.value, "model": r.model, "slo_class": r.slo_class,
                             "prompt_tokens": r.prompt_tokens, "generated_tokens": r.generated,
                             "max_tokens": r.max_tokens, "arrival_time": r.arrival,
                             "first_token_time": r.first_token_at,
                             "finish_time": r.finish_at, "finish_reason": r.finish_reason, "error": r.error,
                             "worker_id": r.worker_id, "attempts": r.attempts})

    @router.get("/v1/requests/{rid}/stream")
    async def resume(rid: str, request: Request, offset: str = "0") -> Response:
        """The request's tokens from `offset` on, as completion chunks (raw tokens: no stop strings)."""
        try:
            principal(request)
            try:
                k = int(offset)
            except ValueError:
                raise HttpError(400, "field 'offset' must be an integer", "offset") from None
            await token_stream.check_resume(c, rid, k)
            r = await c.get_request(rid)
        except Exception as exc:  # noqa: BLE001
            return _logged(error_response(exc), exc)
        gen = Generation(c, rid, r.model, False, r.prompt_tokens, [], offset=k)
        return StreamingResponse(gen.events(False), media_type="text/event-stream",
                                 headers={REQUEST_ID_HEADER: rid} | _SSE_HEADERS)

    @router.get("/health")
    async def health() -> Response:
        return JSONResponse({"status": "ok", "leader": c.is_leader})

    return router


def _logged(resp: Response, exc: BaseException) -> Response:
    if resp.status_code >= 500:
        if resp.status_code == 500:
            log.error("unexpected error in an HTTP request", exc_info=exc)
        else:
            log.warning("HTTP %d: %s", resp.status_code, str(exc)[:200])
    return resp
