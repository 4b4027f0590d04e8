"""Assembles a running controller: Redis (external, or a private redis-server it
starts), the store, the controller, its gRPC server, the tick loop, metrics, and
optionally local worker processes. Used by `qlm serve`, `qlm demo` and the tests."""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
import subprocess
import sys
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from qlmserve.controller.auth import Authenticator, Role, TokenBook, TokenEntry, digest, new_token, write_secret
from qlmserve.controller.core import Controller
from qlmserve.controller.leader import LEASE_TTL_S, LeaderLease
from qlmserve.controller.metrics import ControllerMetrics
from qlmserve.controller.policy import PolicyConfig, load_policy, parse_policy
from qlmserve.controller.process_guard import with_parent_death
from qlmserve.controller.redis_server import PrivateRedis
from qlmserve.controller.service.server import ServerTls, build_server
from qlmserve.controller.store import RedisStore
from qlmserve.credentials import local_token_path

log = logging.getLogger("qlm.runtime")


def default_policy(data_dir: Path) -> PolicyConfig:
    """The embedded default policy; its tiny models live under the data folder."""
    text = resources.files("qlmserve").joinpath("data/default_policy.yaml").read_text()
    return parse_policy(text, source="<embedded default policy>", base_dir=data_dir)


def ensure_models(policy: PolicyConfig) -> None:
    """Build the tiny random-weight models a policy asks for (tiny_seed) where missing."""
    for spec in policy.models.values():
        if spec.tiny_seed is not None and spec.path:
            from qlmserve.tiny_models import ensure_tiny_model

            ensure_tiny_model(spec.kind, spec.path, seed=spec.tiny_seed, num_layers=spec.tiny_layers)


@dataclass
class RuntimeOptions:
    policy_path: str | None = None
    redis_url: str | None = None  # None: start a private redis-server in data_dir/redis
    data_dir: str = "var/qlm"
    host: str = "127.0.0.1"
    port: int = 0  # 0: a free port
    metrics_port: int | None = None
    prefix: str = "qlm"
    local_workers: int = 0
    worker_engine: str = "hf"
    worker_args: list[str] = field(default_factory=list)
    worker_log_dir: str | None = None
    tokens_file: str | None = None  # known tokens, `ROLE NAME TOKEN` per line (auth.TokenBook)
    tls: ServerTls | None = None
    insecure: bool = False  # let a non-loopback bind go without TLS / with anonymous clients
    policy_dir: str | None = None  # the only folder ReloadPolicy reads (default: the policy file's)
    worker_redis_url: str | None = None  # for workers where the controller may not create ACL users
    lease_ttl_s: float = LEASE_TTL_S  # leader lease; a standby takes over within about this
    redis_fsync: str = "everysec"  # private redis-server: appendfsync
    controller_id: str | None = None  # name in the leader lease (default: random)
    # OpenAI-compatible HTTP API (controller/http/): None serves it where Redis is private
    # (the embedded default) on 8000 or the next free port, and not beside an external Redis.
    http_port: int | None = None
    no_http: bool = False


class UnsafeBind(RuntimeError):
    """Refusing to listen beyond loopback without TLS and tokens (unless --insecure)."""


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def local_tokens(data_dir: Path) -> list[TokenEntry]:
    """The admin and worker tokens of this data folder (made on first use, mode 0600): the
    CLI and local workers on the same folder read them. The worker token grants any worker
    id (`*`); give remote workers tokens of their own in --tokens."""
    out = []
    for role, name in ((Role.ADMIN, "local-admin"), (Role.WORKER, "*")):
        path = local_token_path(data_dir, role.value)
        if not path.exists():
            write_secret(path, new_token() + "\n")
        out.append(TokenEntry(role, name, digest(path.read_text().strip())))
    return out


class ControllerRuntime:
    def __init__(self, opts: RuntimeOptions) -> None:
        self.opts = opts
        self.redis: PrivateRedis | None = None
        self.controller: Controller | None = None
        self.server = None
        self.port = 0
        self._tick_task: asyncio.Task | None = None
        self._lease_task: asyncio.Task | None = None
        self.lease: LeaderLease | None = None
        self.workers: list[subprocess.Popen] = []
        self.http = None  # controller.http.app.HttpServer when the HTTP API is on

    @property
    def address(self) -> str:
        return f"{self.opts.host}:{self.port}"

    def load_policy(self) -> PolicyConfig:
        if self.opts.policy_path:
            return load_policy(self.opts.policy_path)
        return default_policy(Path(self.opts.data_dir).resolve())

    def check_bind(self, policy: PolicyConfig) -> None:
        if is_loopback(self.opts.host) or self.opts.insecure:
            return
        missing = []
        if self.opts.tls is None:
            missing.append("TLS (--tls-cert/--tls-key)")
        if policy.access.anonymous_clients:
            missing.append("tokens for clients (the policy allows anonymous clients)")
        if missing:
            raise UnsafeBind(f"refusing to listen on {self.opts.host} without {' and '.join(missing)}; "
                             f"pass --insecure to do it anyway")

    def build_auth(self) -> Authenticator:
        book = TokenBook.load(self.opts.tokens_file) if self.opts.tokens_file else TokenBook()
        for e in local_tokens(Path(self.opts.data_dir)):
            book.add(e)
        c = self.controller
        return Authenticator(book, lambda: c.policy.access.anonymous_clients, lambda: c.policy.access.anonymous_tenant,
                             trust_worker_certificates=bool(self.opts.tls and self.opts.tls.client_ca_file))

    async def start(self) -> ControllerRuntime:
        policy = self.load_policy()
        self.check_bind(policy)
        await asyncio.to_thread(ensure_models, policy)
        url = self.opts.redis_url
        if url is None:
            self.redis = PrivateRedis(Path(self.opts.data_dir) / "redis", appendfsync=self.opts.redis_fsync)
            self.redis.spawn()  # from the loop's (main) thread: it dies with this process (process_guard)
            await asyncio.to_thread(self.redis.wait_ready)
            url = self.redis.url
        store = RedisStore.from_url(url, prefix=self.opts.prefix)
        await store.ping()
        metrics = ControllerMetrics()
        self.controller = Controller(store, policy, redis_url=url, policy_path=self.opts.policy_path, metrics=metrics,
                                     policy_dir=self.opts.policy_dir, worker_redis_url=self.opts.worker_redis_url)
        self.controller.is_leader = False
        self.lease = LeaderLease(store.r, store.k, ttl_s=self.opts.lease_ttl_s, controller_id=self.opts.controller_id)
        await self.controller.warm_up()
        auth = await asyncio.to_thread(self.build_auth)
        self.server, self.port, _ = await build_server(self.controller, f"{self.opts.host}:{self.opts.port}", auth,
                                                       self.opts.tls)
        await self.server.start()
        if not self.opts.no_http and (self.opts.http_port is not None or self.opts.redis_url is None):
            await self.start_http(auth)
        self._tick_task = asyncio.create_task(self.controller.run(), name="tick-loop")
        self._lease_task = asyncio.create_task(self.lease.run(self.controller.take_over, self.controller.lost_lease),
                                               name="leader-lease")
        try:  # a lone controller leads at once; one that finds a live leader stands by
            await asyncio.wait_for(self.lease.acquired.wait(), timeout=self.opts.lease_ttl_s + 0.5)
        except asyncio.TimeoutError:
            log.info("another controller leads: standing by")
        if self.opts.metrics_port is not None:
            metrics.serve(self.opts.metrics_port, addr=self.opts.host)
        for i in range(self.opts.local_workers):
            self.workers.append(self.spawn_worker(f"local-{i}"))
        log.info("controller listening on %s; admin and worker tokens in %s", self.address,
                 local_token_path(self.opts.data_dir, "admin").parent)
        return self

    async def start_http(self, auth: Authenticator) -> None:
        from qlmserve.controller.http.app import DEFAULT_PORT, PORT_SEARCH, HttpServer

        tls = self.opts.tls
        self.http = HttpServer(self.controller, auth, self.opts.host, tls.cert_file if tls else None,
                               tls.key_file if tls else None, tls.client_ca_file if tls else None)
        if self.opts.http_port is None:
            await self.http.start(DEFAULT_PORT, PORT_SEARCH)
        else:
            await self.http.start(self.opts.http_port)
        log.info("OpenAI-compatible HTTP API on %s/v1", self.http.url)

    def spawn_worker(self, worker_id: str, extra: list[str] | None = None) -> subprocess.Popen:
        """A worker process beside the controller (its own Python, its own engine)."""
        args = [sys.executable, "-m", "qlmserve.cli", "worker", "--controller", self.address, "--id", worker_id,
                "--engine", self.opts.worker_engine,
                "--token-file", str(local_token_path(self.opts.data_dir, "worker")), *self._worker_tls_args(),
                *self.opts.worker_args, *(extra or [])]
        out = subprocess.DEVNULL
        if self.opts.worker_log_dir:
            Path(self.opts.worker_log_dir).mkdir(parents=True, exist_ok=True)
            out = open(Path(self.opts.worker_log_dir) / f"{worker_id}.log", "ab")  # noqa: SIM115 - owned by the child
        env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
        return subprocess.Popen(with_parent_death(args), stdout=out, stderr=subprocess.STDOUT, env=env)

    def _worker_tls_args(self) -> list[str]:
        tls = self.opts.tls
        if tls is None:
            return []
        # Local workers trust the controller's own certificate (self-signed or its chain).
        return ["--tls-ca", tls.cert_file, "--tls-server-name", "localhost"]

    async def stop(self, grace: float = 2.0) -> None:
        for p in self.workers:
            if p.poll() is None:
                p.terminate()
        for p in self.workers:
            try:
                await asyncio.to_thread(p.wait, 10)
            except subprocess.TimeoutExpired:
                p.kill()
        if self.controller:
            self.controller.stop()
        if self._tick_task:
            try:
                await asyncio.wait_for(self._tick_task, timeout=5)
            except (asyncio.TimeoutError, asyncio.CancelledError):
                self._tick_task.cancel()
        if self._lease_task:
            self._lease_task.cancel()
            await self.lease.release()  # the next controller need not wait for the TTL
        if self.http:
            await self.http.stop()
        if self.server:
            await self.server.stop(grace)
        if self.controller:
            await self.controller.store.close()
        if self.redis:
            await asyncio.to_thread(self.redis.stop)

    async def wait_for_workers(self, n: int, timeout_s: float = 120.0) -> None:
        """Until n workers are connected and have reported their state."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while True:
            ready = [h for h in self.controller.workers.values() if h.connected and h.report is not None]
            if len(ready) >= n:
                return
            for p in self.workers:
                if p.poll() is not None:
                    raise RuntimeError(f"a local worker exited with code {p.returncode} "
                                       f"(logs: {self.opts.worker_log_dir or 'not kept'})")
            if loop.time() > deadline:
                raise TimeoutError(f"{len(ready)} of {n} workers ready after {timeout_s}s")
            await asyncio.sleep(0.1)
