"""Leader election among controllers that share one Redis.

Every controller serves the Client and Admin APIs; only the one holding the lease plans,
assigns requests and takes worker sessions. The lease is a Redis key with a TTL whose
value is "<controller id>|<epoch>"; the epoch grows with every new lease and is the
fencing token: the plan and assignment scripts (scripts.SAVE_PLAN, ASSIGN) refuse a write
that quotes a lease that is no longer current, so a leader that was paused past its TTL
cannot overwrite the plan of the one that replaced it.

A leader renews every `renew_s`; it steps down by itself when it has not renewed for
`ttl_s - renew_s` (Redis away). A standby tries to take the lease every `renew_s`, so a
dead leader is replaced within about ttl_s + renew_s.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid

import redis
import redis.asyncio as aioredis

from qlmserve.redis_keys import Keys

log = logging.getLogger("qlm.leader")

# Seconds of the lease by default: a standby takes over within about this (issue 11's 2 s).
LEASE_TTL_S = 1.2

# KEYS[1] - lease, KEYS[2] - epoch counter; ARGV[1] - controller id, ARGV[2] - ttl ms
# return the lease value when taken, "" when another controller holds it
ACQUIRE = """
if redis.call('EXISTS', KEYS[1]) == 1 then return '' end
local v = ARGV[1] .. '|' .. redis.call('INCR', KEYS[2])
redis.call('SET', KEYS[1], v, 'PX', ARGV[2])
return v
"""

# KEYS[1] - lease; ARGV[1] - value held, ARGV[2] - ttl ms; return 1 when renewed
RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('PEXPIRE', KEYS[1], ARGV[2]) return 1 end
return 0
"""

# KEYS[1] - lease; ARGV[1] - value held; release it on a clean stop (the next leader need not wait)
RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


class LeaderLease:
    def __init__(self, r: aioredis.Redis, keys: Keys, *, ttl_s: float = LEASE_TTL_S, renew_s: float = 0.2,
                 controller_id: str | None = None) -> None:
        if renew_s * 3 > ttl_s:
            raise ValueError("the lease TTL must be at least 3 renewal periods")
        self.r = r
        self.k = keys
        self.ttl_ms = int(ttl_s * 1000)
        self.renew_s = renew_s
        self.id = controller_id or uuid.uuid4().hex[:12]
        self.value: str | None = None  # the lease held, None while standing by
        self._renewed_at = 0.0
        self._acquire = r.register_script(ACQUIRE)
        self._renew = r.register_script(RENEW)
        self._release = r.register_script(RELEASE)
        self.acquired = asyncio.Event()

    async def step(self) -> tuple[str | None, str | None]:
        """One round: returns (lease won now, lease lost now); at most one is set."""
        now = time.monotonic()
        try:
            if self.value is None:
                v = await self._acquire(keys=[self.k.leader, self.k.leader_epoch], args=[self.id, self.ttl_ms])
                if v:
                    self.value, self._renewed_at = v, now
                    self.acquired.set()
                    return v, None
                return None, None
            if await self._renew(keys=[self.k.leader], args=[self.value, self.ttl_ms]):
                self._renewed_at = now
                return None, None
            lost, self.value = self.value, None
            return None, lost
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            # Redis away: keep leading only while the lease certainly has not expired there.
            if self.value is not None and now - self._renewed_at > self.ttl_ms / 1000 - self.renew_s:
                lost, self.value = self.value, None
                log.warning("cannot renew the leader lease (%s): stepping down", exc)
                return None, lost
            return None, None

    async def run(self, on_won, on_lost) -> None:
        while True:
            won, lost = await self.step()
            if won:
                log.info("controller %s leads (lease %s)", self.id, won)
                on_won(won)
            elif lost:
                log.warning("controller %s lost the lease", self.id)
                on_lost()
            await asyncio.sleep(self.renew_s)

    async def release(self) -> None:
        if self.value is not None:
            try:
                await self._release(keys=[self.k.leader], args=[self.value])
            except redis.RedisError:
                pass
            self.value = None
