"""The real stack on this machine, for benchmarks that drive processes (`qlm bench relay`,
`qlm bench overload`): a private redis-server, one `qlm serve` and N `qlm worker --engine
sim` processes, each logging to a file of one folder; and what /proc says of a process."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path

from qlmserve.controller.redis_server import PrivateRedis, free_port


class LocalStack:
    """Start with `start()`, stop with `stop()` (in a finally). The folder holds policy.yaml
    and profile.yaml (written by the caller), then redis/, data/ and logs/."""

    def __init__(self, base: Path, workers: int, max_batch: int) -> None:
        self.base = base
        self.n_workers = workers
        self.max_batch = max_batch
        self.redis: PrivateRedis | None = None
        self.port = 0
        self.controller: subprocess.Popen | None = None
        self.workers: list[subprocess.Popen] = []

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _spawn(self, cmd: list[str], log: str) -> subprocess.Popen:
        with open(self.base / "logs" / log, "ab") as out:  # the child keeps its own descriptor
            return subprocess.Popen([sys.executable, "-m", "qlmserve.cli", *cmd],
                                    env=dict(os.environ, PYTHONUNBUFFERED="1"), stdout=out, stderr=subprocess.STDOUT)

    def start(self) -> LocalStack:
        (self.base / "logs").mkdir(exist_ok=True)
        self.redis = PrivateRedis(self.base / "redis").start()
        self.port = free_port()
        data = str(self.base / "data")
        self.controller = self._spawn(["serve", "--redis", self.redis.url, "--port", str(self.port), "--policy",
                                       str(self.base / "policy.yaml"), "--data-dir", data], "controller.log")
        self.workers = [self._spawn(["worker", "--controller", self.address, "--id", f"w{i}", "--engine", "sim",
                                     "--sim-profile", str(self.base / "profile.yaml"), "--data-dir", data,
                                     "--max-batch", str(self.max_batch)], f"w{i}.log")
                        for i in range(self.n_workers)]
        return self

    async def wait_workers(self, r, timeout_s: float = 90.0) -> None:
        """Until every worker has a live session (`r`: a redis.Redis on the stack's Redis)."""
        deadline = time.monotonic() + timeout_s
        while sum(1 for w in r.smembers("qlm:workers") if r.hget(f"qlm:worker:{w}", "connected") == "1") \
                < self.n_workers:
            if time.monotonic() > deadline:
                raise TimeoutError("workers did not connect")
            await asyncio.sleep(0.2)

    def stop(self) -> None:
        procs = [*self.workers, *([self.controller] if self.controller else [])]
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
        if self.redis is not None:
            self.redis.stop()


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process so far (NaN once it is gone)."""
    try:
        f = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")
    except OSError:
        return float("nan")


def rss_mb(pid: int) -> float:
    """Resident memory of a process in MiB (NaN once it is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")
