"""What a group gains from a worker's prefix cache, and which worker served a session.

A worker reports a bounded summary of its prefix cache and its prefill backlog
(`WorkerState.prefix`, operations/prefix_cache.py); a group carries its requests'
prefix block ids and sessions (`GroupState.prefix_blocks`, `.sessions`). The RWT
estimator charges a group's prefill net of what the worker's cache saves it
(`Forecaster.work_on`), and the load-aware dispatch counts the same saving
(controller/policies/engine_dispatch.py): one rule, here.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Collection, Iterable

from qlmserve.controller.policy import PolicyConfig
from qlmserve.controller.snapshot import ClusterSnapshot, GroupState, WorkerState
from qlmserve.operations.prefix_cache import chain_keys, saved_prefill_tokens


class _Union:
    """Membership in either of two sets, without building their union."""

    __slots__ = ("a", "b")

    def __init__(self, a: Collection[int], b: Collection[int]) -> None:
        self.a, self.b = a, b

    def __contains__(self, x: object) -> bool:
        return x in self.a or x in self.b

    def __len__(self) -> int:
        return len(self.a) + len(self.b)

    def __iter__(self):
        yield from self.a
        yield from self.b


def saved_prefill(g: GroupState, w: WorkerState, planned: Collection[int] = ()) -> int:
    """Prompt tokens of `g` that `w` need not prefill: its reported cached blocks, plus
    `planned`, blocks of groups placed on `w` earlier in the same plan (computed by the
    time `g` starts there)."""
    rep = w.prefix
    if rep is None or not g.prefix_blocks:
        return 0
    held: Collection[int] = _Union(rep.blocks, planned) if planned else rep.blocks
    return sum(saved_prefill_tokens(b, held, rep.block_tokens, p) for b, p in zip(g.prefix_blocks, g.prompt_tokens))


def prompt_blocks(token_ids: list[int], policy: PolicyConfig) -> tuple[int, ...]:
    """A live request's prefix block ids: its prompt's chain keys, as the engines key their
    caches (dispatch.prefix_block_tokens; () when 0)."""
    n = policy.dispatch.prefix_block_tokens
    return tuple(chain_keys(token_ids, n)) if n > 0 else ()


def queued_prefill(w: WorkerState) -> int:
    """Prompt tokens still to prefill on `w`: its report, else its running requests that
    have no first token yet (counted whole)."""
    if w.prefix is not None:
        return w.prefix.queued_prefill_tokens
    return sum(r.prompt_tokens + r.generated_tokens for r in w.running if r.first_token_at is None and not r.swapped)


class SessionMemory:
    """session -> the worker that last served it (bounded; the oldest sessions forgotten)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._last: OrderedDict[str, str] = OrderedDict()

    def learn(self, snapshot: ClusterSnapshot) -> None:
        """Where each running request's session runs now."""
        for w in snapshot.workers:
            for r in w.running:
                if r.session:
                    self.remember(r.session, w.worker_id)

    def remember(self, session: str, worker_id: str) -> None:
        self._last[session] = worker_id
        self._last.move_to_end(session)
        while len(self._last) > self.limit:
            self._last.popitem(last=False)

    def worker_of(self, sessions: Iterable[str]) -> str | None:
        """The worker of the first session it knows."""
        for s in sessions:
            if s and s in self._last:
                return self._last[s]
        return None
