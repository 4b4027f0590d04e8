"""Maps exceptions raised in servicers to gRPC status codes, and logs unexpected ones."""

from __future__ import annotations

import inspect
import logging

import grpc

from qlmserve.controller.service.errors import status_for

log = logging.getLogger("qlm.grpc")


def _wrap_unary(behavior):
    async def wrapper(request, context):
        try:
            return await behavior(request, context)
        except Exception as exc:  # noqa: BLE001
            await _abort(exc, context)

    return wrapper


def _wrap_stream(behavior):
    async def wrapper(request_or_iterator, context):
        try:
            async for item in behavior(request_or_iterator, context):
                yield item
        except Exception as exc:  # noqa: BLE001
            await _abort(exc, context)

    return wrapper


async def _abort(exc: Exception, context: grpc.aio.ServicerContext) -> None:
    if isinstance(exc, grpc.aio.AbortError):
        raise exc
    code = status_for(exc)
    if code is None:
        log.exception("unexpected error in servicer")
        code = grpc.StatusCode.INTERNAL
    elif code == grpc.StatusCode.UNAVAILABLE:
        log.warning("unavailable: %s", exc)
    msg = str(exc)
    if isinstance(exc, LookupError) and msg.startswith("'") and msg.endswith("'"):
        msg = msg[1:-1]  # KeyError quotes its message
    await context.abort(code, msg or type(exc).__name__)


class ErrorMappingInterceptor(grpc.aio.ServerInterceptor):
    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        if handler.unary_unary and inspect.iscoroutinefunction(handler.unary_unary):
            return handler._replace(unary_unary=_wrap_unary(handler.unary_unary))
        if handler.unary_stream and inspect.isasyncgenfunction(handler.unary_stream):
            return handler._replace(unary_stream=_wrap_stream(handler.unary_stream))
        if handler.stream_stream and inspect.isasyncgenfunction(handler.stream_stream):
            return handler._replace(stream_stream=_wrap_stream(handler.stream_stream))
        return handler
