"""Redis connections from one URL, for the controller (asyncio) and workers (threads).

  redis://[user:password@]host:port/db     one server (rediss:// for TLS, unix:// a socket)
  redis+sentinel://[user:password@]h1:p1,h2:p2/<service>[/db][?sentinel_password=P]
                                           the master Sentinel names, found again after a failover
  redis+cluster://[user:password@]host:port  Redis Cluster (every QLM key must hash to one
                                           slot: use a prefix in braces, e.g. --prefix '{qlm}')

redis-py does the work: Sentinel's master_for and RedisCluster. The URL's user and
password are the master's; the Sentinels' own password, if any, is `sentinel_password`."""

from __future__ import annotations

from typing import Any
from urllib.parse import unquote, urlsplit

SENTINEL = "redis+sentinel"
CLUSTER = "redis+cluster"


def _hosts(netloc: str) -> list[tuple[str, int]]:
    out = []
    for part in netloc.rsplit("@", 1)[-1].split(","):
        host, _, port = part.rpartition(":")
        out.append((host.strip("[]") or "127.0.0.1", int(port or 26379)))
    return out


def _auth(url: str) -> dict[str, Any]:
    p = urlsplit(url)
    return {"username": unquote(p.username) if p.username else None,
            "password": unquote(p.password) if p.password else None}


def _sentinel_parts(url: str) -> tuple[list[tuple[str, int]], str, int, dict[str, str]]:
    from urllib.parse import parse_qs

    p = urlsplit(url)
    path = [x for x in p.path.split("/") if x]
    if not path:
        raise ValueError("a redis+sentinel URL names the service: redis+sentinel://h1:p1,h2:p2/<service>[/db]")
    q = parse_qs(p.query)
    sentinel_kw = {"password": q["sentinel_password"][0]} if "sentinel_password" in q else {}
    return _hosts(p.netloc), path[0], int(path[1]) if len(path) > 1 else 0, sentinel_kw


def redis_client(url: str, **kw: Any):
    """A synchronous client (workers' token writes)."""
    import redis

    scheme = urlsplit(url).scheme
    if scheme == SENTINEL:
        from redis.sentinel import Sentinel

        hosts, service, db, sentinel_kw = _sentinel_parts(url)
        s = Sentinel(hosts, sentinel_kwargs=sentinel_kw, **kw)
        return s.master_for(service, db=db, **_auth(url))
    if scheme == CLUSTER:
        from redis.cluster import RedisCluster

        return RedisCluster.from_url("redis://" + url.split("://", 1)[1], **kw)
    return redis.Redis.from_url(url, **kw)


def async_redis_client(url: str, max_connections: int = 512, **kw: Any):
    """An asyncio client (the controller)."""
    import redis.asyncio as aioredis

    scheme = urlsplit(url).scheme
    if scheme == SENTINEL:
        from redis.asyncio.sentinel import Sentinel

        hosts, service, db, sentinel_kw = _sentinel_parts(url)
        s = Sentinel(hosts, sentinel_kwargs=sentinel_kw, **kw)
        return s.master_for(service, db=db, **_auth(url))
    if scheme == CLUSTER:
        from redis.asyncio.cluster import RedisCluster

        return RedisCluster.from_url("redis://" + url.split("://", 1)[1], **kw)
    pool = aioredis.BlockingConnectionPool.from_url(url, max_connections=max_connections, timeout=10, **kw)
    return aioredis.Redis(connection_pool=pool)


def check_cluster_prefix(url: str, prefix: str) -> None:
    """QLM's scripts touch several keys at once; in a cluster they must share one slot."""
    if urlsplit(url).scheme == CLUSTER and not (prefix.startswith("{") and "}" in prefix[1:]):
        raise ValueError("field 'prefix': with Redis Cluster the key prefix must be a hash tag, e.g. '{qlm}'")
