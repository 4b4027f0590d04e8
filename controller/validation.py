"""Checks of every field a caller sends, before anything is stored or acted on.

Plain functions over domain values (no protobuf), so that the gRPC servicers and an HTTP
front door share them. Each failure raises InvalidRequest naming the field and the rule,
never echoing the value: a value may be megabytes long or a secret.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

from qlmserve.controller.exceptions import InvalidRequest, UnknownRequest
from qlmserve.controller.policy import RequestLimits
from qlmserve.controller.request import Sampling

# Request ids are minted by RedisStore.new_request_id (uuid4 hex). Anything else is not an
# id, whatever Redis holds under a key that happens to start with it (`<id>:ids`).
REQUEST_ID = re.compile(r"[0-9a-f]{32}")
# Worker ids become parts of Redis key names and ACL user names.
WORKER_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


def request_id(rid: str, field: str = "request_id") -> str:
    if not REQUEST_ID.fullmatch(rid or ""):
        raise UnknownRequest(f"field '{field}': no such request (ids are 32 hex digits)")
    return rid


def name(value: str, field: str, limits: RequestLimits, *, required: bool = False) -> str:
    if required and not value:
        raise InvalidRequest(f"field '{field}' is required")
    if len(value) > limits.max_name_chars:
        raise InvalidRequest(f"field '{field}': {len(value)} characters exceed the limit of {limits.max_name_chars}")
    return value


def worker_id(value: str, limits: RequestLimits, field: str = "worker_id") -> str:
    name(value, field, limits)
    if value and not WORKER_ID.fullmatch(value):
        raise InvalidRequest(f"field '{field}': letters, digits, '.', '_' and '-' only, starting with a "
                             f"letter or digit")
    return value


def text(value: str, field: str, limit: int) -> str:
    if len(value) > limit:
        raise InvalidRequest(f"field '{field}': {len(value)} characters exceed the limit of {limit}")
    return value


def items(values: Sequence, field: str, limit: int) -> Sequence:
    if len(values) > limit:
        raise InvalidRequest(f"field '{field}': {len(values)} entries exceed the limit of {limit}")
    return values


def finite(value: float, field: str, lo: float = -math.inf, hi: float = math.inf) -> float:
    if not math.isfinite(value) or not (lo <= value <= hi):
        raise InvalidRequest(f"field '{field}' must be a finite number in [{lo:g}, {hi:g}]")
    return value


def token_ids(ids: Sequence[int], field: str, vocab: int | None, limit: int) -> list[int]:
    items(ids, field, limit)
    if vocab is not None and any(t >= vocab for t in ids):
        raise InvalidRequest(f"field '{field}': ids must be below the vocabulary size {vocab}")
    return list(ids)


def sampling(temperature: float, top_p: float, seed: int | None, stop_token_ids: Sequence[int],
             limits: RequestLimits, vocab: int | None) -> Sampling:
    """Sampling parameters as sent (top_p 0 means off). A temperature below
    limits.min_temperature other than 0 overflows the softmax; it is refused rather than
    left to fail every step of the worker that runs it."""
    if not math.isfinite(temperature) or temperature < 0 or temperature > limits.max_temperature:
        raise InvalidRequest(f"field 'sampling.temperature' must be 0 (greedy) or in "
                             f"[{limits.min_temperature:g}, {limits.max_temperature:g}]")
    if 0 < temperature < limits.min_temperature:
        raise InvalidRequest(f"field 'sampling.temperature' must be 0 (greedy) or at least {limits.min_temperature:g}")
    if not math.isfinite(top_p) or not (0.0 <= top_p <= 1.0):
        raise InvalidRequest("field 'sampling.top_p' must be in [0, 1] (0 or 1: off)")
    stops = token_ids(stop_token_ids, "sampling.stop_token_ids", vocab, limits.max_stop_token_ids)
    return Sampling(temperature=float(temperature), top_p=float(top_p) if top_p > 0 else 1.0, seed=seed,
                    stop_token_ids=tuple(stops))
