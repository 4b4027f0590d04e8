"""The one guard every RPC passes: who calls (auth.Authenticator), whether the request
decodes, and how exceptions become gRPC status codes.

- A request that does not decode answers INVALID_ARGUMENT (gRPC alone would say UNKNOWN
  or INTERNAL).
- The caller's Principal is set in `auth.current_principal` for the servicer.
- Domain errors map through errors.status_for; messages are cut to a bounded length;
  Overloaded carries a google.rpc.RetryInfo in the status details.
"""

from __future__ import annotations

import inspect

import grpc

from qlmserve.controller.auth import Authenticator, current_principal, service_of
from qlmserve.controller.exceptions import InvalidRequest, Overloaded
from qlmserve.controller.service.errors import describe, rpc_status


class _Undecodable:
    """Stands for a request message that failed to parse."""


_UNDECODABLE = _Undecodable()


def _safe_deserializer(deserialize):
    if deserialize is None:
        return None

    def wrapper(data: bytes):
        try:
            return deserialize(data)
        except Exception:  # noqa: BLE001 - any parse failure is the caller's malformed input
            return _UNDECODABLE

    return wrapper


def _check_decoded(msg) -> None:
    if msg is _UNDECODABLE:
        raise InvalidRequest("the request message does not decode as the method's protobuf type")


async def _checked_iterator(it):
    async for msg in it:
        _check_decoded(msg)
        yield msg


class _Guard:
    def __init__(self, auth: Authenticator, method: str) -> None:
        self.auth = auth
        self.service = service_of(method)

    def enter(self, context: grpc.aio.ServicerContext) -> None:
        md = dict(context.invocation_metadata() or ())
        authz = md.get("authorization")
        cn = None
        ac = context.auth_context() or {}
        if ac.get("x509_common_name"):
            cn = ac["x509_common_name"][0].decode(errors="replace")
        current_principal.set(self.auth.check(self.service, authz, cn))

    def unary(self, behavior):
        async def wrapper(request, context):
            try:
                self.enter(context)
                _check_decoded(request)
                return await behavior(request, context)
            except Exception as exc:  # noqa: BLE001
                await _abort(exc, context)

        return wrapper

    def unary_stream(self, behavior):
        async def wrapper(request, context):
            try:
                self.enter(context)
                _check_decoded(request)
                async for item in behavior(request, context):
                    yield item
            except Exception as exc:  # noqa: BLE001
                await _abort(exc, context)

        return wrapper

    def stream_stream(self, behavior):
        async def wrapper(request_iterator, context):
            try:
                self.enter(context)
                async for item in behavior(_checked_iterator(request_iterator), context):
                    yield item
            except Exception as exc:  # noqa: BLE001
                await _abort(exc, context)

        return wrapper


async def _abort(exc: Exception, context: grpc.aio.ServicerContext) -> None:
    if isinstance(exc, grpc.aio.AbortError):
        raise exc
    code, msg = describe(exc)
    if isinstance(exc, Overloaded):
        # The google.rpc.Status trailer (`grpc-status-details-bin`) carries a RetryInfo.
        details = rpc_status(code, msg, exc.retry_after_s).SerializeToString()
        await context.abort(code, msg, trailing_metadata=(("grpc-status-details-bin", details),))
    await context.abort(code, msg)


class GuardInterceptor(grpc.aio.ServerInterceptor):
    """Authentication, decoding and error mapping for every method of the server."""

    def __init__(self, auth: Authenticator) -> None:
        self.auth = auth

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        guard = _Guard(self.auth, handler_call_details.method)
        handler = handler._replace(request_deserializer=_safe_deserializer(handler.request_deserializer))
        if handler.unary_unary and inspect.iscoroutinefunction(handler.unary_unary):
            return handler._replace(unary_unary=guard.unary(handler.unary_unary))
        if handler.unary_stream and inspect.isasyncgenfunction(handler.unary_stream):
            return handler._replace(unary_stream=guard.unary_stream(handler.unary_stream))
        if handler.stream_stream and inspect.isasyncgenfunction(handler.stream_stream):
            return handler._replace(stream_stream=guard.stream_stream(handler.stream_stream))
        if service_of(handler_call_details.method) in _GUARDED:
            raise RuntimeError(f"{handler_call_details.method}: a guarded method must be async")  # never unguarded
        return handler


_GUARDED = {"qlmserve.v1.Client", "qlmserve.v1.Admin", "qlmserve.v1.WorkerLink"}
