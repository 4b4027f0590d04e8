"""One place that maps domain exceptions to gRPC status codes and messages: the
interceptor answers a failed RPC with it, SubmitBatch a failed item."""

from __future__ import annotations

import logging

import grpc
from google.protobuf import duration_pb2
from google.rpc import error_details_pb2, status_pb2

from qlmserve.controller.auth import PermissionDenied, Unauthenticated
from qlmserve.controller.exceptions import (
    IdempotencyConflict,
    InvalidRequest,
    NotLeader,
    OffsetOutOfRange,
    Overloaded,
    UnknownModel,
    UnknownRequest,
    UnknownWorker,
    WorkerIdInUse,
)
from qlmserve.controller.policy import PolicyError
from qlmserve.controller.store import StoreError

log = logging.getLogger("qlm.grpc")

MAX_MESSAGE_CHARS = 1_000

STATUS_BY_EXCEPTION: list[tuple[type[BaseException], grpc.StatusCode]] = [
    (Unauthenticated, grpc.StatusCode.UNAUTHENTICATED),
    (PermissionDenied, grpc.StatusCode.PERMISSION_DENIED),
    (InvalidRequest, grpc.StatusCode.INVALID_ARGUMENT),
    (PolicyError, grpc.StatusCode.INVALID_ARGUMENT),
    (UnknownModel, grpc.StatusCode.NOT_FOUND),
    (UnknownRequest, grpc.StatusCode.NOT_FOUND),
    (UnknownWorker, grpc.StatusCode.NOT_FOUND),
    (Overloaded, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (IdempotencyConflict, grpc.StatusCode.FAILED_PRECONDITION),
    (OffsetOutOfRange, grpc.StatusCode.OUT_OF_RANGE),
    (WorkerIdInUse, grpc.StatusCode.ALREADY_EXISTS),
    (NotLeader, grpc.StatusCode.UNAVAILABLE),
    (StoreError, grpc.StatusCode.UNAVAILABLE),
    (ValueError, grpc.StatusCode.INVALID_ARGUMENT),  # e.g. an unknown policy name on reload
]


def status_for(exc: BaseException) -> grpc.StatusCode | None:
    import redis

    if isinstance(exc, (redis.ConnectionError, redis.TimeoutError)):
        return grpc.StatusCode.UNAVAILABLE
    for cls, code in STATUS_BY_EXCEPTION:
        if isinstance(exc, cls):
            return code
    return None


def describe(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """The status code and message a caller gets for `exc` (logged when unexpected)."""
    code = status_for(exc)
    if code is None:
        log.error("unexpected error in servicer", exc_info=exc)
        return grpc.StatusCode.INTERNAL, "internal error (logged by the controller)"  # never leak internals
    if code == grpc.StatusCode.UNAVAILABLE:
        log.warning("unavailable: %s", str(exc)[:MAX_MESSAGE_CHARS])
    msg = str(exc)
    if isinstance(exc, LookupError) and msg.startswith("'") and msg.endswith("'"):
        msg = msg[1:-1]  # KeyError quotes its message
    return code, (msg or type(exc).__name__)[:MAX_MESSAGE_CHARS]


def rpc_status(code: grpc.StatusCode, msg: str, retry_after_s: float | None = None) -> status_pb2.Status:
    """A google.rpc.Status, with a RetryInfo in its details when a retry delay is known."""
    st = status_pb2.Status(code=code.value[0], message=msg)
    if retry_after_s is not None:
        delay = duration_pb2.Duration()
        delay.FromNanoseconds(int(retry_after_s * 1e9))
        st.details.add().Pack(error_details_pb2.RetryInfo(retry_delay=delay))
    return st


def status_of(exc: BaseException) -> status_pb2.Status:
    """What a unary call failing with `exc` would answer, as one google.rpc.Status."""
    code, msg = describe(exc)
    return rpc_status(code, msg, exc.retry_after_s if isinstance(exc, Overloaded) else None)
