"""Many submissions in one call (gRPC SubmitBatch).

Each item goes through Controller.submit, the path a single Submit takes, so validation,
admission, idempotency and durability are the same, and each item succeeds or fails on its
own: a bad item refuses only itself. The items start in order within one event-loop turn,
so the store writes them in one pipeline (in order: a later item reusing an earlier one's
idempotency key is its duplicate).
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import TYPE_CHECKING

from qlmserve.controller.exceptions import InvalidRequest

if TYPE_CHECKING:
    from qlmserve.controller.core import Controller, SubmitInput
    from qlmserve.controller.store import SubmitResult

# Per item: (result, prompt tokens) as Controller.submit returns, or the exception it raised.
Outcome = tuple["SubmitResult", int] | Exception


def check_size(controller: Controller, n: int) -> None:
    """Refuse a batch over the policy's limit before any item is converted or accepted."""
    cap = controller.policy.limits.max_submit_batch
    if n > cap:
        raise InvalidRequest(f"field 'requests': {n} items exceed the limit of {cap} per call "
                             "(limits.max_submit_batch); split the batch")


async def submit_all(controller: Controller, inputs: Sequence[SubmitInput]) -> list[Outcome]:
    """Submit every item; the outcomes are in the order of `inputs`."""
    check_size(controller, len(inputs))
    return await asyncio.gather(*(controller.submit(i) for i in inputs), return_exceptions=True)
