"""The domain errors the controller raises. One table (service/errors.py) maps each to a
gRPC status code; an HTTP front door maps the same classes to HTTP statuses.

Messages name the field at fault and never echo the value the caller sent (it may be
megabytes long, or a secret)."""

from __future__ import annotations


class InvalidRequest(ValueError):
    """A malformed call; the message names the field (gRPC INVALID_ARGUMENT)."""


class UnknownModel(LookupError):
    """The policy names no such model (gRPC NOT_FOUND)."""


class UnknownRequest(LookupError):
    """No such request id (gRPC NOT_FOUND)."""


class UnknownWorker(LookupError):
    """No such worker id (gRPC NOT_FOUND)."""


class Overloaded(RuntimeError):
    """An admission limit was hit (gRPC RESOURCE_EXHAUSTED with a RetryInfo)."""

    def __init__(self, message: str, retry_after_s: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class IdempotencyConflict(RuntimeError):
    """An idempotency key reused with another payload (gRPC FAILED_PRECONDITION)."""


class OffsetOutOfRange(IndexError):
    """A stream offset past the tokens the request has (gRPC OUT_OF_RANGE)."""


class WorkerIdInUse(RuntimeError):
    """A second session for a worker id whose session is live (gRPC ALREADY_EXISTS)."""


class NotLeader(RuntimeError):
    """This controller is a standby: workers must dial the leader (gRPC UNAVAILABLE)."""
