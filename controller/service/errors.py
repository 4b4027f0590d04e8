"""One place that maps domain exceptions to gRPC status codes (used by the interceptor)."""

from __future__ import annotations

import grpc

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
