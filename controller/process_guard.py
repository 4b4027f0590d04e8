"""Child processes that do not outlive `qlm serve`, and data folders one owner at a time.

- `with_parent_death` prefixes a command with `setpriv --pdeathsig TERM` (util-linux): Linux
  then sends the child SIGTERM when the process that started it dies, SIGKILL included, so
  a private redis-server and local workers go with their controller instead of running on
  as orphans. It is a wrapper that execs the command, not a Popen preexec_fn: Python code
  between fork and exec in a process with gRPC threads can abort in gRPC's fork handlers
  (seen in qlm bench chaos). Linux ties the signal to the starting *thread*, so children
  are started from the main thread.
- `FolderLock` is an exclusive flock on a file in a folder. The child that must own the
  folder (redis-server on its append-only directory) inherits the locked descriptor, so
  the lock holds until both the controller and that child are gone: a restart never
  starts a second redis-server on one directory while the first still writes to it.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import threading
import time
from pathlib import Path


def with_parent_death(args: list[str]) -> list[str]:
    """`args`, run so that the child gets SIGTERM when this process dies (from the main
    thread, where setpriv exists; unchanged otherwise)."""
    setpriv = shutil.which("setpriv")
    if setpriv is None or threading.current_thread() is not threading.main_thread():
        return list(args)
    return [setpriv, "--pdeathsig", "TERM", "--", *args]


class FolderBusy(RuntimeError):
    """Another process owns the folder."""


class FolderLock:
    def __init__(self, folder: Path, name: str = "owner.lock") -> None:
        self.path = Path(folder) / name
        self.fd: int | None = None

    def acquire(self, wait_s: float = 10.0) -> FolderLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        deadline = time.monotonic() + wait_s
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    holder = self._holder()
                    os.close(fd)
                    raise FolderBusy(f"{self.path.parent} is in use by another process{holder}; stop it first")
                time.sleep(0.1)
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        os.set_inheritable(fd, True)
        self.fd = fd
        return self

    def _holder(self) -> str:
        try:
            pid = self.path.read_text().strip()
        except OSError:
            return ""
        return f" (pid {pid})" if pid else ""

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
