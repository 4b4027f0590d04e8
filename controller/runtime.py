"""Assembles a running controller: Redis (external, or a private redis-server it
starts), the store, the controller, its gRPC server, the tick loop, metrics, and
optionally local worker processes. Used by `qlm serve`, `qlm demo` and the tests."""

from __future__ import annotations

import asyncio
import logging
import os
import subprocess
import sys
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from qlmserve.controller.core import Controller
from qlmserve.controller.metrics import ControllerMetrics
from qlmserve.controller.policy import PolicyConfig, load_policy, parse_policy
from qlmserve.controller.redis_server import PrivateRedis
from qlmserve.controller.service.server import build_server
from qlmserve.controller.store import RedisStore

log = logging.getLogger("qlm.runtime")


def default_policy(data_dir: Path) -> PolicyConfig:
    """The embedded default policy; its tiny models live under the data folder."""
    text = resources.files("qlmserve").joinpath("data/default_policy.yaml").read_text()
    return parse_policy(text, source="<embedded default policy>", base_dir=data_dir)


def ensure_models(policy: PolicyConfig) -> None:
    """Build the tiny random-weight models a policy asks for (tiny_seed) where missing."""
    for spec in policy.models.values():
        if spec.tiny_seed is not None and spec.path:
            from qlmserve.backends.hf.tiny import ensure_tiny_model

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


class ControllerRuntime:
    def __init__(self, opts: RuntimeOptions) -> None:
        self.opts = opts
        self.redis: PrivateRedis | None = None
        self.controller: Controller | None = None
        self.server = None
        self.port = 0
        self._tick_task: asyncio.Task | None = None
        self.workers: list[subprocess.Popen] = []

    @property
    def address(self) -> str:
        return f"{self.opts.host}:{self.port}"

    def load_policy(self) -> PolicyConfig:
        if self.opts.policy_path:
            return load_policy(self.opts.policy_path)
        return default_policy(Path(self.opts.data_dir).resolve())

    async def start(self) -> ControllerRuntime:
        policy = self.load_policy()
        await asyncio.to_thread(ensure_models, policy)
        url = self.opts.redis_url
        if url is None:
            self.redis = await asyncio.to_thread(PrivateRedis(Path(self.opts.data_dir) / "redis").start)
            url = self.redis.url
        store = RedisStore.from_url(url, prefix=self.opts.prefix)
        await store.ping()
        metrics = ControllerMetrics()
        self.controller = Controller(store, policy, redis_url=url, policy_path=self.opts.policy_path, metrics=metrics)
        await self.controller.warm_up()
        self.server, self.port, _ = await build_server(self.controller, f"{self.opts.host}:{self.opts.port}")
        await self.server.start()
        self._tick_task = asyncio.create_task(self.controller.run(), name="tick-loop")
        if self.opts.metrics_port is not None:
            metrics.serve(self.opts.metrics_port, addr=self.opts.host)
        for i in range(self.opts.local_workers):
            self.workers.append(self.spawn_worker(f"local-{i}"))
        log.info("controller listening on %s (redis %s)", self.address, url)
        return self

    def spawn_worker(self, worker_id: str, extra: list[str] | None = None) -> subprocess.Popen:
        """A worker process beside the controller (its own Python, its own engine)."""
        args = [sys.executable, "-m", "qlmserve.cli", "worker", "--controller", self.address, "--id", worker_id,
                "--engine", self.opts.worker_engine, *self.opts.worker_args, *(extra or [])]
        out = subprocess.DEVNULL
        if self.opts.worker_log_dir:
            Path(self.opts.worker_log_dir).mkdir(parents=True, exist_ok=True)
            out = open(Path(self.opts.worker_log_dir) / f"{worker_id}.log", "ab")  # noqa: SIM115 - owned by the child
        env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
        return subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, env=env)

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
