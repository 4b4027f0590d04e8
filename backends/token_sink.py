"""Writes what a worker produced in one iteration to Redis in one script call.

Runs on the engine thread with a synchronous client: one round trip per iteration,
not per token. The request's attempt number fences out stale writers.
"""

from __future__ import annotations

import time

import redis

from qlmserve import redis_scripts as scripts
from qlmserve.backends.engine import TokenEvent
from qlmserve.redis_keys import FINISHED_RETENTION_S, Keys


class TokenSink:
    def __init__(self, client: redis.Redis, prefix: str, worker_id: str,
                 keep_s: float = FINISHED_RETENTION_S) -> None:
        self.r = client
        self.keep_s = int(keep_s)
        self.k = Keys(prefix)
        self.worker_id = worker_id
        self._append = client.register_script(scripts.APPEND_TOKENS)

    def write(self, events: list[tuple[TokenEvent, int, str]]) -> set[tuple[str, int]]:
        """events: (token event, attempt, text piece). Returns (request id, attempt) of the
        events Redis refused because that attempt no longer runs here."""
        if not events:
            return set()
        keys = [self.k.lengths, self.k.worker_running(self.worker_id), self.k.class_stats, self.k.unfinished,
                self.k.ttft_log]
        args: list[object] = [repr(time.time()), len(events), self.keep_s]
        for ev, attempt, text in events:
            keys += [self.k.req(ev.request_id), self.k.ids(ev.request_id), self.k.stream(ev.request_id)]
            args += [ev.request_id, attempt, ev.index, ev.token_id, text, "1" if ev.finished else "0",
                     ev.finish_reason.value if ev.finish_reason else ""]
        refused = (r.decode() if isinstance(r, bytes) else r for r in self._append(keys=keys, args=args))
        return {(rid, int(attempt)) for rid, attempt in (r.rsplit("|", 1) for r in refused)}
