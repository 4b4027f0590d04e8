"""A private redis-server the controller starts itself (embedded defaults, the demo,
tests, benchmarks): a free loopback port, append-only persistence in a data folder, a
password of its own (kept in the folder, mode 0600), and the process_guard rules: it dies
with the process that started it, and one redis-server per folder at a time."""

from __future__ import annotations

import random
import shutil
import socket
import subprocess
import time
from pathlib import Path
from urllib.parse import quote

import redis

from qlmserve.controller.auth import new_token, write_secret
from qlmserve.controller.process_guard import FolderLock, with_parent_death


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stable_port() -> int:
    """A free port outside the kernel's ephemeral range, for a server that restarts on the
    same port: clients redialing a dead port in that range can be handed it as their own
    source port (or connect to themselves), and the restarted server then cannot bind it."""
    try:
        lo, _hi = map(int, open("/proc/sys/net/ipv4/ip_local_port_range").read().split())
    except OSError:
        lo = 32768
    rng = random.Random()
    for _ in range(200):
        port = rng.randrange(max(1024, lo - 12_000), lo)
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    return free_port()


class PrivateRedis:
    """Owns a redis-server process (it holds the folder's lock while it runs). Restarting it on the same data folder keeps every
    accepted request (appendonly yes; an acknowledged write is in the file before the
    reply, so a killed redis-server loses none of them, and with appendfsync always
    neither does a machine crash)."""

    def __init__(self, data_dir: str | Path, port: int | None = None, appendfsync: str = "everysec",
                 lock_wait_s: float = 10.0) -> None:
        self.lock_wait_s = lock_wait_s  # how long to wait for a redis-server still leaving this folder
        self.data_dir = Path(data_dir).resolve()
        self.port = port or stable_port()
        self.appendfsync = appendfsync
        self.proc: subprocess.Popen | None = None
        self.lock = FolderLock(self.data_dir, "redis.lock")

    @property
    def password(self) -> str:
        path = self.data_dir / "password"
        if not path.exists():
            write_secret(path, new_token() + "\n")
        return path.read_text().strip()

    @property
    def url(self) -> str:
        return f"redis://:{quote(self.password, safe='')}@127.0.0.1:{self.port}/0"

    def spawn(self) -> PrivateRedis:
        """Start it. From the main thread it dies with this process; Linux ties the parent-death
        signal to the spawning *thread*, so from another thread (which may end first) it is
        not set."""
        exe = shutil.which("redis-server")
        if exe is None:
            raise RuntimeError("redis-server is not installed (apt-get install redis-server), or pass --redis URL")
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.lock.acquire(self.lock_wait_s)
        # The password goes in through stdin-free config: a config file only we can read.
        conf = self.data_dir / "redis.conf"
        write_secret(conf, f"requirepass {self.password}\n")
        args = [exe, str(conf), "--bind", "127.0.0.1", "--port", str(self.port), "--dir", str(self.data_dir),
                "--appendonly", "yes", "--appendfsync", self.appendfsync, "--save", "",
                "--protected-mode", "yes", "--logfile", str(self.data_dir / "redis.log"), "--daemonize", "no"]
        try:
            self.proc = subprocess.Popen(with_parent_death(args), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                         pass_fds=(self.lock.fd,))
        finally:
            # From here redis-server alone holds the lock: it is free exactly when that
            # process is gone, however it ended.
            self.lock.release()
        return self

    def wait_ready(self, timeout_s: float = 10.0) -> PrivateRedis:
        deadline = time.monotonic() + timeout_s
        client = redis.Redis(host="127.0.0.1", port=self.port, password=self.password)
        while True:
            if self.proc.poll() is not None:
                err = self.proc.stderr.read().decode() if self.proc.stderr else ""
                log = (self.data_dir / "redis.log")
                tail = log.read_text()[-2000:] if log.exists() else ""
                raise RuntimeError(f"redis-server exited at start (exit status {self.proc.returncode}): {err}{tail}")
            try:
                if client.ping():
                    # Wait until the append-only file is loaded.
                    if client.info("persistence").get("loading", 0) == 0:
                        break
            except (redis.ConnectionError, redis.BusyLoadingError):
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"redis-server did not answer on port {self.port} within {timeout_s}s")
            time.sleep(0.05)
        client.close()
        return self

    def start(self, timeout_s: float = 10.0) -> PrivateRedis:
        return self.spawn().wait_ready(timeout_s)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def __enter__(self) -> PrivateRedis:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
