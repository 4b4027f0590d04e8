"""The Redis state store: requests, groups, virtual queues, workers, token streams.

Everything the controller knows lives here, so a restarted controller continues
where the last one stopped. The store returns small interface objects (Request,
GroupRecord, StreamEntry), never raw Redis replies.

(Over 500 lines: one method per Redis operation the controller performs, each a few lines
around its script; the submission batcher is the part to move out next.)
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

import redis.asyncio as aioredis
from redis.exceptions import NoScriptError

from qlmserve import redis_scripts as scripts
from qlmserve.controller.grouping import OpenGroup, choose_group
from qlmserve.controller.length_band import CLASS_WIDE, LengthKey
from qlmserve.controller.policy import GroupingConfig
from qlmserve.controller.request import Request, RequestStatus
from qlmserve.redis_keys import FINISHED_RETENTION_S, Keys
from qlmserve.redis_urls import async_redis_client, check_cluster_prefix

IDEMPOTENCY_TTL_S = 24 * 3600
# Group ids drawn from Redis at once (controllers drawing blocks leave gaps; ids only name).
GROUP_ID_BLOCK = 64
# Script calls per MULTI/EXEC block of _run_scripts. With appendfsync always Redis fsyncs
# once per event-loop turn, and a plain pipeline of big SUBMIT calls takes one turn per
# 16 KiB it reads (~12 calls); a block runs in one turn, so one fsync. Redis serves no
# one else during a block (~30 us a SUBMIT), hence the bound.
SCRIPTS_PER_BLOCK = 256
# Connections for token-stream reads, one per streaming client at most (their own pool).
STREAM_CONNECTIONS = 4096
# The latency log (first tokens, finishes) is kept this long behind its newest entry read:
# the leader reads it every tick, so a minute is ample, and its memory follows the rate.
LATENCY_LOG_KEEP_MS = 60_000


@dataclass
class _Pending:
    """A submission waiting for the next pipeline (RedisStore._flush)."""

    req: Request
    now: float
    grouping: GroupingConfig
    key: str  # idempotency key ("" = none)
    adm: AdmissionArgs
    fut: asyncio.Future


@dataclass(frozen=True)
class GroupRecord:
    group_id: str
    model: str
    slo_class: str
    created_at: float
    waiting: tuple[str, ...]  # request ids, oldest first


@dataclass(frozen=True)
class StreamEntry:
    index: int
    token_id: int | None  # None on the final entry of a cancelled or failed request
    text: str
    finished: bool
    finish_reason: str


@dataclass(frozen=True)
class SubmitResult:
    request_id: str
    group_id: str
    duplicate: bool
    conflict: bool = False  # the idempotency key was used for another payload
    refused: tuple[str, int, int] | None = None  # (limit name, amount queued, limit) when admission refused it


@dataclass(frozen=True)
class AdmissionArgs:
    """Limits the SUBMIT script enforces atomically (0 = none)."""

    class_requests: int = 0
    class_tokens: int = 0
    tenant_requests: int = 0
    tenant_tokens: int = 0
    all_requests: int = 0
    all_tokens: int = 0
    tenant_tokens_per_minute: int = 0

    def args(self) -> list[int]:
        return [self.class_requests, self.class_tokens, self.tenant_requests, self.tenant_tokens,
                self.all_requests, self.all_tokens, self.tenant_tokens_per_minute]


class StoreError(RuntimeError):
    """Redis is unreachable or refused a write; nothing was acknowledged."""


class RedisStore:
    def __init__(self, client: aioredis.Redis, prefix: str = "qlm", stream_client: aioredis.Redis | None = None) -> None:
        self.r = client
        # Token-stream reads block (XREAD) for as long as a client waits for its tokens: one
        # connection each. On a pool of their own they cannot starve the lease, the ticks and
        # submissions: with them sharing one pool, ~1,000 streaming clients at overload took
        # every connection, the lease could not be renewed and the controller stood by for good.
        self.rs = stream_client or client
        self.k = Keys(prefix)
        self._submit = client.register_script(scripts.SUBMIT)
        self._assign = client.register_script(scripts.ASSIGN)
        self._requeue = client.register_script(scripts.REQUEUE)
        self._finish_early = client.register_script(scripts.FINISH_EARLY)
        self._swap_state = client.register_script(scripts.SET_SWAP_STATE)
        self._save_plan = client.register_script(scripts.SAVE_PLAN)
        self._read_changes = client.register_script(scripts.READ_CHANGES)
        self._read_groups = client.register_script(scripts.READ_GROUPS)
        self._read_running = client.register_script(scripts.READ_RUNNING)
        # The leader lease value this controller holds ("" = no fencing: a single controller,
        # tests). Plan and assignment writes quote it; Redis refuses them once it changed.
        self.fence = ""
        self.retention_s = FINISHED_RETENTION_S  # the policy's finished_retention_s (set by the controller)
        # The open group of each (model, class), cached: submissions of this controller go
        # through one batch at a time (_flush_all), its only writer; Redis keeps it for a restart.
        self._open: dict[str, OpenGroup | None] = {}
        self._pending: list[_Pending] = []
        self._flusher: asyncio.Task | None = None
        self._group_ids: list[int] = []

    @classmethod
    def from_url(cls, url: str, prefix: str = "qlm", max_connections: int = 512) -> RedisStore:
        """redis://, rediss://, unix://, redis+sentinel:// or redis+cluster:// (qlmserve.redis_urls)."""
        check_cluster_prefix(url, prefix)
        return cls(async_redis_client(url, max_connections=max_connections, decode_responses=True), prefix,
                   async_redis_client(url, max_connections=STREAM_CONNECTIONS, decode_responses=True))

    async def close(self) -> None:
        await self.r.aclose()
        if self.rs is not self.r:
            await self.rs.aclose()

    async def ping(self) -> bool:
        return bool(await self.r.ping())

    # ---- submission -------------------------------------------------------------------

    async def submit(self, req: Request, now: float, grouping: GroupingConfig, idempotency_key: str = "",
                     admission: AdmissionArgs | None = None) -> SubmitResult:
        """Make a request durable (acknowledged once Redis wrote it). Submissions that arrive
        in one event-loop turn share one pipeline of SUBMIT scripts (`_flush`), so a busy
        controller pays one round trip (and, with appendfsync always, one fsync) per batch
        rather than per request."""
        fut: asyncio.Future = asyncio.get_running_loop().create_future()
        self._pending.append(_Pending(req, now, grouping, idempotency_key, admission or AdmissionArgs(), fut))
        if self._flusher is None:
            self._flusher = asyncio.create_task(self._flush_all())
        res, chosen, fp = await fut
        if res == 1:
            return SubmitResult(req.request_id, chosen, duplicate=False)
        outcome, rid = int(res[0]), res[1]
        if outcome == 2:
            return SubmitResult("", "", duplicate=False, refused=(res[1], int(res[2]), int(res[3])))
        existing = await self.get_request(rid)  # outcome 0: a known idempotency key
        return SubmitResult(rid, existing.group_id if existing else "", duplicate=True,
                            conflict=bool(res[2]) and res[2] != fp)

    async def _flush_all(self) -> None:
        """One batch at a time: what arrives while a batch is in Redis forms the next one, and
        each batch chooses groups knowing the outcomes of the one before."""
        try:
            while self._pending:
                batch, self._pending = self._pending, []
                try:
                    await self._flush(batch)
                except Exception as exc:  # noqa: BLE001 - Redis away: every caller of the batch hears it
                    for p in batch:
                        if not p.fut.done():
                            p.fut.set_exception(exc)
        finally:
            self._flusher = None

    async def _flush(self, batch: list[_Pending]) -> None:
        # Grouping reads the open group then writes; this is the only writer of this
        # controller's cached open groups (Redis keeps them for a restart).
        keys = [self.k.open_group(p.req.model, p.req.slo_class, p.req.length_band) for p in batch]
        for key in dict.fromkeys(keys):
            if key not in self._open:
                self._open[key] = await self._read_open_group(key)
        local = dict(self._open)  # as if every request of the batch were accepted
        chosen: list[tuple[str, bool]] = []  # (group id, whether this request opens it)
        for p, key in zip(batch, keys):
            gid = choose_group(local[key], p.now, p.grouping)
            if gid is None:
                gid = await self._new_group_id()
                local[key] = OpenGroup(gid, p.now, 1)
                chosen.append((gid, True))
            else:
                cur = local[key]
                local[key] = OpenGroup(gid, cur.created_at, cur.size + 1)
                chosen.append((gid, False))
        calls: list[tuple[list[str], list[object]]] = []
        fps: list[str] = []
        for p, key, (gid, opens) in zip(batch, keys, chosen):
            req = p.req
            req.group_id = gid
            fp, fields = req.submission()
            fps.append(fp)
            # A request joining a group that an earlier, refused request of the batch was to
            # open finds no group hash: the script opens the group then (SUBMIT).
            calls.append(([self.k.req(req.request_id), self.k.group(gid), self.k.group_queue(gid), self.k.groups,
                           key, self.k.idem(p.key or "-"), self.k.unfinished, self.k.queued,
                           self.k.tokens_minute(req.tenant, int(p.now // 60)), self.k.changes],
                          [req.request_id, gid, repr(p.now), "1" if opens else "0", "1" if p.key else "0",
                           req.model, req.slo_class, IDEMPOTENCY_TTL_S, fps[-1], req.tenant, req.cost,
                           *p.adm.args(), json.dumps(fields)]))
        results = await self._run_scripts(self._submit, calls)
        # The cached open groups follow what Redis accepted, in order.
        for p, key, (gid, _opens), fp, res in zip(batch, keys, chosen, fps, results):
            if isinstance(res, BaseException):
                if not p.fut.done():
                    p.fut.set_exception(res)
                continue
            if res == 1:
                cur = self._open[key]
                self._open[key] = (OpenGroup(gid, cur.created_at, cur.size + 1) if cur is not None and
                                   cur.group_id == gid else OpenGroup(gid, p.now, 1))
            if not p.fut.done():
                p.fut.set_result((res, gid, fp))

    async def _new_group_id(self) -> str:
        """Group ids come from Redis in blocks (one round trip per GROUP_ID_BLOCK groups);
        controllers sharing Redis draw disjoint blocks."""
        if not self._group_ids:
            last = int(await self.r.incrby(self.k.group_seq, GROUP_ID_BLOCK))
            self._group_ids = list(range(last - GROUP_ID_BLOCK + 1, last + 1))
        return f"g{self._group_ids.pop(0)}"

    async def _run_scripts(self, script, calls: list[tuple[list[str], list[object]]]) -> list[object]:
        """Run one script once per (keys, args), in order, in MULTI/EXEC blocks of
        SCRIPTS_PER_BLOCK calls; each result is the reply or the exception of that call (an
        error in one call does not stop the others of its block). A script Redis does not
        have (restarted, flushed) is loaded and its calls run again: a NOSCRIPT call did
        nothing."""
        results: list[object] = [None] * len(calls)
        todo = list(range(len(calls)))
        for attempt in range(2):
            replies: list[object] = []
            for start in range(0, len(todo), SCRIPTS_PER_BLOCK):
                async with self.r.pipeline(transaction=True) as pipe:
                    for i in todo[start:start + SCRIPTS_PER_BLOCK]:
                        keys, args = calls[i]
                        pipe.evalsha(script.sha, len(keys), *keys, *args)
                    replies += await pipe.execute(raise_on_error=False)
            missing = []
            for i, reply in zip(todo, replies):
                if isinstance(reply, NoScriptError) and attempt == 0:
                    missing.append(i)
                else:
                    results[i] = reply
            if not missing:
                break
            await self.r.script_load(script.script)
            todo = missing
        return results

    async def _read_open_group(self, open_key: str) -> OpenGroup | None:
        gid = await self.r.get(open_key)
        if not gid:
            return None
        g = await self.r.hmget(self.k.group(gid), "created_at", "size")
        return OpenGroup(gid, float(g[0]), int(g[1] or 0)) if g[0] is not None else None

    @staticmethod
    def new_request_id() -> str:
        return uuid.uuid4().hex

    # ---- reads ------------------------------------------------------------------------

    async def get_request(self, rid: str) -> Request | None:
        h = await self.r.hgetall(self.k.req(rid))
        return Request.from_redis(h) if h and "id" in h else None

    async def request_fields(self, rids: list[str], fields: tuple[str, ...]) -> dict[str, tuple[str | None, ...]]:
        """These fields of each request that exists (no prompt: cheap for many requests)."""
        if not rids:
            return {}
        async with self.r.pipeline(transaction=False) as p:
            for rid in rids:
                p.hmget(self.k.req(rid), "id", *fields)
            rows = await p.execute()
        return {rid: tuple(row[1:]) for rid, row in zip(rids, rows) if row[0] is not None}

    async def get_requests(self, rids: list[str]) -> dict[str, Request]:
        if not rids:
            return {}
        async with self.r.pipeline(transaction=False) as p:
            for rid in rids:
                p.hgetall(self.k.req(rid))
            rows = await p.execute()
        return {rid: Request.from_redis(h) for rid, h in zip(rids, rows) if h and "id" in h}

    async def generated_ids(self, rid: str) -> list[int]:
        s = await self.r.get(self.k.ids(rid)) or ""
        return [int(x) for x in s.split(",") if x]

    async def groups(self) -> list[GroupRecord]:
        """Every group in the groups set with its waiting requests, by creation time."""
        gids = await self.r.zrange(self.k.groups, 0, -1)
        if not gids:
            return []
        chunk = 256  # groups per script call: Redis serves others between calls
        rows = []
        for i in range(0, len(gids), chunk):
            keys = [k for gid in gids[i:i + chunk] for k in (self.k.group(gid), self.k.group_queue(gid))]
            rows += await self._read_groups(keys=keys)
        out = []
        for gid, (model, cls, created, waiting) in zip(gids, rows):
            if created == "":
                continue
            out.append(GroupRecord(gid, model, cls, float(created), tuple(waiting.split(" ")) if waiting else ()))
        return out

    async def group_headers(self, gids: list[str]) -> dict[str, tuple[str, str, float]]:
        """(model, slo_class, created_at) of these groups (those whose hash exists)."""
        if not gids:
            return {}
        async with self.r.pipeline(transaction=False) as p:
            for gid in gids:
                p.hmget(self.k.group(gid), "model", "slo_class", "created_at")
            rows = await p.execute()
        return {gid: (row[0], row[1], float(row[2])) for gid, row in zip(gids, rows) if row[2] is not None}

    async def last_change(self) -> int:
        """Sequence number of the newest entry ever added to the changes stream (0: none)."""
        try:
            info = await self.r.xinfo_stream(self.k.changes)
        except aioredis.ResponseError:  # no such key: nothing changed since Redis was empty
            return 0
        return int(str(info["last-generated-id"]).split("-")[1])

    async def read_changes(self, after: int, count: int = 10_000) -> list[tuple[int, str, str, str]]:
        """(sequence, op, group id, request id) of the changes after `after`, oldest first
        (redis_scripts._CHANGE)."""
        text = await self._read_changes(keys=[self.k.changes], args=[after, count])
        out = []
        for line in text.split("\n") if text else ():
            seq, op, gid, rid = line.split(" ")
            out.append((int(seq), op, gid, rid))
        return out

    async def trim_changes(self, below: int) -> None:
        """Drop the changes stream's entries before sequence `below` (approximately: whole
        nodes of the stream, which is what makes XTRIM cheap)."""
        if below > 1:
            await self.r.xtrim(self.k.changes, minid=f"0-{below}", approximate=True)

    async def drop_empty_groups(self, groups: list[GroupRecord]) -> None:
        """Groups with nothing waiting leave the active set (their hash expires later; a
        requeue brings them back)."""
        empty = [g.group_id for g in groups if not g.waiting]
        if not empty:
            return
        async with self.r.pipeline(transaction=False) as p:
            for gid in empty:
                # Re-check inside Redis: a request may have joined since the read.
                p.eval("if redis.call('LLEN', KEYS[1]) == 0 then redis.call('ZREM', KEYS[2], ARGV[1]);"
                       " redis.call('EXPIRE', KEYS[3], ARGV[2]) end return 1", 3,
                       self.k.group_queue(gid), self.k.groups, self.k.group(gid), gid, int(self.retention_s))
            await p.execute()

    async def unfinished_ids(self) -> set[str]:
        return set(await self.r.smembers(self.k.unfinished))

    async def running_of(self, wids: list[str]) -> dict[str, dict[str, int]]:
        """worker -> {request id: attempt} of these workers, in one round trip."""
        if not wids:
            return {}
        res = await self._read_running(keys=[self.k.worker_running(w) for w in wids], args=[len(wids)])
        out = {}
        for wid, text in zip(wids, res):
            f = text.split(" ") if text else []
            out[wid] = {f[i]: int(f[i + 1]) for i in range(0, len(f), 2)}
        return out

    async def progress_of(self, rids: list[str]) -> dict[str, tuple[int, float | None]]:
        """request id -> (tokens generated, first token time), in one round trip."""
        if not rids:
            return {}
        res = await self._read_running(keys=[self.k.req(r) for r in rids], args=[0])
        out = {}
        for rid, line in zip(rids, res[0].split("\n")):
            gen, first = line.split(" ")
            out[rid] = (int(gen or 0), float(first) if first else None)
        return out

    async def worker_running(self, wid: str) -> dict[str, int]:
        h = await self.r.hgetall(self.k.worker_running(wid))
        return {rid: int(a) for rid, a in h.items()}

    async def length_counts(self) -> dict[LengthKey, tuple[float, float, float]]:
        """(model, class, length band) -> (n, sum, sumsq) of finished output lengths. Fields
        are "model|class|band|stat"; "model|class|stat" ones (written before bands) count
        as the class's band 0."""
        h = await self.r.hgetall(self.k.lengths)
        out: dict[LengthKey, list[float]] = {}
        for field, value in h.items():
            head, stat = field.rsplit("|", 1)
            parts = head.rsplit("|", 2)
            if len(parts) == 3 and parts[2].isdigit():
                key = (parts[0], parts[1], int(parts[2]))
            else:
                model, cls = head.rsplit("|", 1)
                key = (model, cls, CLASS_WIDE)
            idx = {"n": 0, "sum": 1, "sumsq": 2}[stat]
            acc = out.setdefault(key, [0.0, 0.0, 0.0])
            acc[idx] += float(value)
        return {k: (v[0], v[1], v[2]) for k, v in out.items()}

    async def class_stats(self) -> dict[str, dict[str, int]]:
        h = await self.r.hgetall(self.k.class_stats)
        out: dict[str, dict[str, int]] = {}
        for field, value in h.items():
            cls, stat = field.rsplit("|", 1)
            out.setdefault(cls, {})[stat] = int(value)
        return out

    async def read_latencies(self, after_id: str | None) -> tuple[list[tuple[str, str, str, float]], str]:
        """(kind 'ttft' or 'tpot', model, class, seconds) logged after `after_id` (None: only
        from now on). Entries of workers that predate the model field have model ''."""
        if after_id is None:
            last = await self.r.xrevrange(self.k.ttft_log, count=1)
            return [], last[0][0] if last else "0-0"
        entries = await self.r.xrange(self.k.ttft_log, min=f"({after_id}", count=10_000)
        if entries:  # read: what is older than a window behind it goes (memory flat, issue 11)
            newest_ms = int(entries[-1][0].split("-")[0])
            await self.r.xtrim(self.k.ttft_log, minid=f"{newest_ms - LATENCY_LOG_KEEP_MS}-0", approximate=True)
        out = [("ttft", f.get("m", ""), f["c"], float(f["t"])) if "t" in f else
               ("tpot", f.get("m", ""), f["c"], float(f["p"])) for _id, f in entries]
        return out, entries[-1][0] if entries else after_id

    # ---- transitions ------------------------------------------------------------------

    async def assign(self, rid: str, group_id: str, wid: str, now: float) -> int:
        """Move a waiting request to a worker; returns its attempt number (0 if it left, -1
        when this controller no longer holds the leader lease)."""
        return int(await self._assign(keys=[self.k.req(rid), self.k.group_queue(group_id), self.k.worker_running(wid),
                                            self.k.queued, self.k.leader, self.k.changes],
                                      args=[rid, wid, repr(now), self.fence, group_id]))

    async def assign_many(self, items: list[tuple[str, str, str]], now: float) -> list[int]:
        """`assign` for each (request, group, worker), in order, in one pipeline."""
        calls = [([self.k.req(rid), self.k.group_queue(gid), self.k.worker_running(wid), self.k.queued, self.k.leader,
                   self.k.changes], [rid, wid, repr(now), self.fence, gid]) for rid, gid, wid in items]
        out = []
        for res in await self._run_scripts(self._assign, calls):
            if isinstance(res, BaseException):
                raise res
            out.append(int(res))
        return out

    async def requeue(self, rid: str, group_id: str, wid: str, now: float) -> bool:
        return bool(await self._requeue(
            keys=[self.k.req(rid), self.k.worker_running(wid), self.k.group(group_id), self.k.group_queue(group_id),
                  self.k.groups, self.k.queued, self.k.changes],
            args=[rid, wid, repr(now), group_id]))

    async def set_swapped(self, rid: str, wid: str, swapped: bool) -> bool:
        return bool(await self._swap_state(keys=[self.k.req(rid), self.k.worker_running(wid)],
                                           args=[wid, "swapped" if swapped else "running", rid]))

    async def finish_early(self, rid: str, status: RequestStatus, now: float, error: str = "",
                           attempt: int | None = None, by_worker: str = "") -> tuple[str, str] | None:
        """Cancel or fail a request (`by_worker`: only if that worker holds it). A running
        request leaves its worker's running hash too. Returns (previous status, worker id)
        or None if it had ended."""
        for _ in range(8):
            gid, wid = await self.r.hmget(self.k.req(rid), "group_id", "worker_id")
            res = await self._finish_early(
                keys=[self.k.req(rid), self.k.group_queue(gid or "-"), self.k.stream(rid), self.k.unfinished,
                      self.k.ids(rid), self.k.queued, self.k.worker_running(wid or "-"), self.k.changes],
                args=[status.value, repr(now), error, int(self.retention_s), "" if attempt is None else str(attempt),
                      wid or "", by_worker])
            if not res:
                return None
            if res[0] != "retry":
                return res[0], res[1]
        raise StoreError(f"request {rid} kept moving between workers while it was ended")

    # ---- virtual queues, plan, workers ------------------------------------------------

    async def save_plan(self, virtual_queues: dict[str, list[str]], plan_json: str, known_workers: list[str]) -> bool:
        """Write the plan and every known worker's virtual queue; False when fenced."""
        queues = json.dumps([virtual_queues.get(wid, []) for wid in known_workers])
        res = await self._save_plan(keys=[self.k.plan, self.k.leader, *[self.k.vq(w) for w in known_workers]],
                                    args=[self.fence, plan_json, queues])
        return int(res) == 1

    async def load_plan(self) -> dict | None:
        s = await self.r.get(self.k.plan)
        return json.loads(s) if s else None

    async def virtual_queues(self, worker_ids: list[str]) -> dict[str, list[str]]:
        async with self.r.pipeline(transaction=False) as p:
            for wid in worker_ids:
                p.lrange(self.k.vq(wid), 0, -1)
            rows = await p.execute()
        return dict(zip(worker_ids, rows))

    async def put_worker(self, wid: str, fields: dict[str, str]) -> None:
        async with self.r.pipeline(transaction=True) as p:
            p.sadd(self.k.workers, wid)
            p.hset(self.k.worker(wid), mapping=fields)
            await p.execute()

    async def get_workers(self) -> dict[str, dict[str, str]]:
        wids = sorted(await self.r.smembers(self.k.workers))
        async with self.r.pipeline(transaction=False) as p:
            for wid in wids:
                p.hgetall(self.k.worker(wid))
            rows = await p.execute()
        return {wid: h for wid, h in zip(wids, rows) if h}

    async def remove_worker(self, wid: str) -> None:
        async with self.r.pipeline(transaction=True) as p:
            p.srem(self.k.workers, wid)
            p.delete(self.k.worker(wid), self.k.vq(wid))
            await p.execute()

    # ---- token streams ----------------------------------------------------------------

    async def read_stream(self, rid: str, offset: int, block_ms: int = 1000) -> AsyncIterator[list[StreamEntry]]:
        """Batches of entries from token `offset` on, blocking for new ones, until the final
        entry. Entries already trimmed away are not here: see `token_ids_from`."""
        last_id = f"0-{offset}"
        key = self.k.stream(rid)
        while True:
            resp = await self.rs.xread({key: last_id}, block=block_ms, count=256)
            if not resp:
                status = await self.rs.hget(self.k.req(rid), "status")
                if status is None:
                    raise KeyError(rid)
                if status in ("finished", "cancelled", "failed"):
                    # The final entry is written atomically with the status, so an empty read
                    # past `last_id` means the reader has already seen the end.
                    return
                continue
            batch = []
            for _key, entries in resp:
                for entry_id, fields in entries:
                    last_id = entry_id
                    batch.append(_entry(fields))
            yield batch
            if batch[-1].finished:
                return

    async def first_stream_index(self, rid: str) -> int | None:
        """Index of the oldest entry still in the stream (None when it is empty)."""
        head = await self.r.xrange(self.k.stream(rid), count=1)
        return _entry(head[0][1]).index if head else None

    async def trim_stream(self, rid: str, below_index: int) -> None:
        """The client has all tokens before `below_index`: drop them from the stream (the
        ids string still holds every token for re-runs)."""
        if below_index > 0:
            await self.r.xtrim(self.k.stream(rid), minid=f"0-{below_index + 1}", approximate=False)


def _entry(fields: dict[str, str]) -> StreamEntry:
    tok = fields.get("t", "")
    return StreamEntry(index=int(fields["i"]), token_id=int(tok) if tok != "" else None, text=fields.get("x", ""),
                       finished=fields.get("f") == "1", finish_reason=fields.get("r", ""))
