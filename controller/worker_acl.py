"""A Redis ACL user for each worker session, limited to what a worker writes.

A worker writes its tokens to Redis itself (one script call per iteration). It gets a user
of its own, made when its session starts and deleted when the session ends or its
heartbeat lapses (which also fences a worker presumed dead out of Redis):

  - commands: EVALSHA (no EVAL, no SCRIPT LOAD: no Lua of its own), the commands the token
    script runs (Redis checks a script's commands against the caller's ACL too, so these
    are callable directly as well, on the keys below only), PING, and what a client
    library sends on connecting; no command that lists keys or reads a set;
  - keys: the request keys (`<p>:req:*`), its own running hash, and the counters the token
    script updates. Every controller-only script touches a controller-only key first, so a
    worker that calls one is stopped before it writes anything.

The controller's own credentials never leave it. Where the controller may not manage ACL
users (a managed Redis), workers get `worker_redis_url` if the operator gave one, else the
controller's URL, with a warning (that names no password).
"""

from __future__ import annotations

import logging
from urllib.parse import quote, urlsplit, urlunsplit

import redis
import redis.asyncio as aioredis

from qlmserve import redis_scripts as scripts
from qlmserve.controller.auth import new_token
from qlmserve.redis_keys import Keys

log = logging.getLogger("qlm.worker_acl")

# What scripts.APPEND_TOKENS calls.
_SCRIPT_COMMANDS = ["+hmget", "+hget", "+hset", "+hdel", "+append", "+xadd", "+srem", "+hincrby", "+hincrbyfloat",
                    "+expire"]
_CONNECT_COMMANDS = ["+ping", "+client|setname", "+cluster|slots", "+cluster|shards", "+cluster|nodes", "+cluster|info",
                     "+command", "+select", "+auth", "+hello", "+readonly"]


def with_user(url: str, user: str, password: str) -> str:
    parts = urlsplit(url)
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    netloc = f"{quote(user, safe='')}:{quote(password, safe='')}@{host}"
    if parts.port:
        netloc += f":{parts.port}"
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


class WorkerAcl:
    def __init__(self, r: aioredis.Redis, keys: Keys, controller_url: str, worker_redis_url: str | None = None) -> None:
        self.r = r
        self.k = keys
        self.controller_url = controller_url
        self.worker_redis_url = worker_redis_url
        self.supported: bool | None = None if worker_redis_url is None else False
        self._passwords: dict[str, str] = {}  # worker id -> password of its live session

    def user(self, wid: str) -> str:
        return f"{self.k.prefix}-worker-{wid}"

    def rules(self, wid: str, password: str) -> list[str]:
        p = self.k.prefix
        keys = [f"~{p}:req:*", f"~{self.k.worker_running(wid)}", f"~{self.k.lengths}", f"~{self.k.class_stats}",
                f"~{self.k.unfinished}", f"~{self.k.ttft_log}"]
        return ["reset", "on", f">{password}", "resetchannels", "+evalsha", *_SCRIPT_COMMANDS, *_CONNECT_COMMANDS,
                *keys]

    async def grant(self, wid: str) -> str:
        """The Redis URL this worker session uses (a fresh password each session)."""
        if self.supported is False:
            return self.worker_redis_url or self.controller_url
        password = new_token()
        try:
            await self.r.execute_command("ACL", "SETUSER", self.user(wid), *self.rules(wid, password))
        except redis.ResponseError as exc:
            self.supported = False
            log.warning("cannot create Redis ACL users (%s): workers get the controller's Redis credentials; "
                        "give the controller ACL rights or pass --worker-redis", str(exc).split("\n")[0][:200])
            return self.worker_redis_url or self.controller_url
        self.supported = True
        self._passwords[wid] = password
        await self.load_scripts()
        return with_user(self.controller_url, self.user(wid), password)

    async def revoke(self, wid: str) -> None:
        """End a worker's access (its session ended, or it is presumed dead): its
        connections are closed by Redis and its writes refused."""
        if self._passwords.pop(wid, None) is None:
            return
        try:
            await self.r.execute_command("ACL", "DELUSER", self.user(wid))
        except redis.RedisError as exc:
            log.warning("cannot delete the Redis user of worker %s: %s", wid, exc)

    async def load_scripts(self) -> None:
        """Workers may not load scripts: the controller does (again after a Redis restart)."""
        await self.r.script_load(scripts.APPEND_TOKENS)

    async def ensure(self) -> None:
        """After a Redis restart the users and the script cache are gone: make them again
        (each worker keeps its session's password)."""
        if not self._passwords:
            return
        users = set(await self.r.execute_command("ACL", "USERS"))
        users = {u.decode() if isinstance(u, bytes) else u for u in users}
        missing = [w for w in self._passwords if self.user(w) not in users]
        for wid in missing:
            await self.r.execute_command("ACL", "SETUSER", self.user(wid), *self.rules(wid, self._passwords[wid]))
        if missing or not (await self.r.script_exists(_APPEND_SHA))[0]:
            await self.load_scripts()


def _sha1(text: str) -> str:
    import hashlib

    return hashlib.sha1(text.encode()).hexdigest()  # noqa: S324 - Redis names scripts by SHA-1


_APPEND_SHA = _sha1(scripts.APPEND_TOKENS)
