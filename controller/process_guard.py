"""Child processes that do not outlive `qlm serve`, and data folders one owner at a time.

- `die_with_parent` (a Popen preexec_fn) asks Linux to send the child SIGTERM when the
  process that started it dies, SIGKILL included: a private redis-server and local workers
  go with their controller instead of running on as orphans. (It fires when the starting
  *thread* exits, so children are started from the main thread.)
- `FolderLock` is an exclusive flock on a file in a folder. The child that must own the
  folder (redis-server on its append-only directory) inherits the locked descriptor, so
  the lock holds until both the controller and that child are gone: a restart never
  starts a second redis-server on one directory while the first still writes to it.
"""

from __future__ import annotations

import ctypes
import fcntl
import os
import signal
import time
from pathlib import Path

_PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    except OSError:
        return  # not Linux: children may outlive a killed parent
    if os.getppid() == 1:  # the parent died before prctl took effect
        os._exit(1)


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
