"""Domain errors as HTTP responses with the OpenAI error body
{"error": {"message", "type", "param", "code"}}.

One table, like service/errors.py for gRPC, over the same exception classes. The field
a validation message names ("field 'sampling.temperature' ...") becomes `param`, in the
OpenAI request's own names."""

from __future__ import annotations

import re

import redis
from fastapi.responses import JSONResponse

from qlmserve.controller.auth import PermissionDenied, Unauthenticated
from qlmserve.controller.exceptions import (
    IdempotencyConflict,
    InvalidRequest,
    NotLeader,
    OffsetOutOfRange,
    Overloaded,
    UnknownModel,
    UnknownRequest,
)
from qlmserve.controller.store import StoreError

MAX_MESSAGE_CHARS = 1_000

# (exception, HTTP status, OpenAI error type)
STATUS_BY_EXCEPTION: list[tuple[type[BaseException], int, str]] = [
    (Unauthenticated, 401, "authentication_error"),
    (PermissionDenied, 403, "permission_error"),
    (UnknownModel, 404, "not_found_error"),
    (UnknownRequest, 404, "not_found_error"),
    (OffsetOutOfRange, 416, "invalid_request_error"),
    (IdempotencyConflict, 409, "conflict_error"),
    (InvalidRequest, 400, "invalid_request_error"),
    (Overloaded, 429, "rate_limit_error"),
    (NotLeader, 503, "service_unavailable"),
    (StoreError, 503, "service_unavailable"),
    (redis.ConnectionError, 503, "service_unavailable"),
    (redis.TimeoutError, 503, "service_unavailable"),
]

# The controller's field names (SubmitInput, the gRPC messages) -> the OpenAI request's.
PARAM_NAMES = {
    "sampling.temperature": "temperature",
    "sampling.top_p": "top_p",
    "sampling.stop_token_ids": "stop",
    "user_id": "user",
    "prompt_token_ids": "prompt",
    "request_id": "request_id",
}

_FIELD = re.compile(r"field '([^']+)'")


class HttpError(Exception):
    """An error of the HTTP layer itself (a field only HTTP has, e.g. `n`)."""

    def __init__(self, status: int, message: str, param: str | None = None, type_: str = "invalid_request_error",
                 code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.param, self.type, self.code = status, param, type_, code


def error_body(message: str, type_: str, param: str | None = None, code: str | int | None = None) -> dict:
    return {"error": {"message": message[:MAX_MESSAGE_CHARS], "type": type_, "param": param, "code": code}}


def classify(exc: BaseException, prompt_param: str = "prompt") -> tuple[int, dict, dict[str, str]] | None:
    """(status, body, headers) for a known error; None for an unexpected one (a 500)."""
    if isinstance(exc, HttpError):
        return exc.status, error_body(str(exc), exc.type, exc.param, exc.code), {}
    for cls, status, type_ in STATUS_BY_EXCEPTION:
        if isinstance(exc, cls):
            break
    else:
        return None
    msg = str(exc)
    if isinstance(exc, LookupError) and msg.startswith("'") and msg.endswith("'"):
        msg = msg[1:-1]  # KeyError quotes its message
    param = None
    m = _FIELD.search(msg)
    if m:
        param = PARAM_NAMES.get(m.group(1), m.group(1))
        if param == "prompt":
            param = prompt_param  # a chat request's prompt is its messages
        msg = msg.replace(m.group(0), f"field '{param}'", 1)
    if status == 503 and not isinstance(exc, (StoreError, NotLeader)):
        msg = "the request store (Redis) is unreachable; nothing was acknowledged"
    headers = {}
    if isinstance(exc, Overloaded):
        headers["Retry-After"] = str(max(1, round(exc.retry_after_s)))
    elif status == 401:
        headers["WWW-Authenticate"] = "Bearer"
    elif status == 503:
        headers["Retry-After"] = "1"
    return status, error_body(msg or type(exc).__name__, type_, param, status), headers


def error_response(exc: BaseException, prompt_param: str = "prompt") -> JSONResponse:
    c = classify(exc, prompt_param)
    if c is None:
        return JSONResponse(error_body("internal error (logged by the controller)", "server_error", None, 500),
                            status_code=500)
    status, body, headers = c
    return JSONResponse(body, status_code=status, headers=headers)
