"""Redis key names, in one place: the data layout the controller and its workers share
(with the Lua scripts in qlmserve/redis_scripts.py). Every key starts with the
deployment prefix.

Scripts compute some key names from the prefix, so QLM needs a single Redis (or a
cluster with every key in one hash slot: use a prefix like "{qlm}").
"""

from __future__ import annotations

from dataclasses import dataclass

# A finished request, its tokens and stream stay readable this long (seconds).
FINISHED_RETENTION_S = 3600


@dataclass(frozen=True)
class Keys:
    prefix: str = "qlm"

    def req(self, rid: str) -> str:  # hash: the request (controller/request.py fields)
        return f"{self.prefix}:req:{rid}"

    def ids(self, rid: str) -> str:  # string: generated token ids, "12,7,9,"
        return f"{self.prefix}:req:{rid}:ids"

    def stream(self, rid: str) -> str:  # stream: one entry per generated token, id 0-(index+1)
        return f"{self.prefix}:req:{rid}:stream"

    def group(self, gid: str) -> str:  # hash: model, slo_class, created_at, size
        return f"{self.prefix}:group:{gid}"

    def group_queue(self, gid: str) -> str:  # list: waiting request ids, oldest first
        return f"{self.prefix}:group:{gid}:q"

    @property
    def groups(self) -> str:  # zset: group ids with waiting requests, by creation time
        return f"{self.prefix}:groups"

    def open_group(self, model: str, slo_class: str, band: int = 0) -> str:  # string: the group new requests join
        return f"{self.prefix}:open:{model}|{slo_class}" + (f"|{band}" if band else "")  # band 0: as before bands

    def vq(self, wid: str) -> str:  # list: the worker's virtual queue (group ids, head first)
        return f"{self.prefix}:vq:{wid}"

    def worker(self, wid: str) -> str:  # hash: reported state (json), last_seen, draining, ...
        return f"{self.prefix}:worker:{wid}"

    def worker_running(self, wid: str) -> str:  # hash: request id -> attempt it runs under
        return f"{self.prefix}:worker:{wid}:running"

    @property
    def workers(self) -> str:  # set: worker ids ever registered and not removed
        return f"{self.prefix}:workers"

    @property
    def lengths(self) -> str:  # hash: "model|class|band|n" (and |sum, |sumsq) of finished output lengths
        return f"{self.prefix}:lengths"

    @property
    def class_stats(self) -> str:  # hash: "class|finished", "class|met" counters
        return f"{self.prefix}:classstats"

    def idem(self, key: str) -> str:  # string: request id of an idempotency key
        return f"{self.prefix}:idem:{key}"

    @property
    def plan(self) -> str:  # string: JSON of the last plan
        return f"{self.prefix}:plan"

    @property
    def group_seq(self) -> str:  # counter for group ids
        return f"{self.prefix}:seq:group"

    @property
    def ttft_log(self) -> str:  # stream: (class, model, TTFT) of first tokens, (class, model, TPOT) of finishes
        return f"{self.prefix}:ttftlog"

    @property
    def changes(self) -> str:  # stream: changes of group queues, ids 0-1, 0-2, ... (redis_scripts._CHANGE)
        return f"{self.prefix}:changes"

    @property
    def unfinished(self) -> str:  # set: ids of accepted requests not yet finished
        return f"{self.prefix}:unfinished"

    @property
    def queued(self) -> str:  # hash: "c|class|n", "c|class|t", "u|tenant|n", "u|tenant|t", "all|n", "all|t"
        return f"{self.prefix}:queued"

    def tokens_minute(self, tenant: str, minute: int) -> str:  # counter: a tenant's tokens in one minute
        return f"{self.prefix}:tpm:{tenant}:{minute}"

    @property
    def leader(self) -> str:  # string "controller-id|epoch" with a TTL: the leader lease
        return f"{self.prefix}:leader"

    @property
    def leader_epoch(self) -> str:  # counter: bumps on every new lease (the fencing token)
        return f"{self.prefix}:leader:epoch"

    def controller(self, cid: str) -> str:  # string with a TTL: a live controller's address
        return f"{self.prefix}:controller:{cid}"
