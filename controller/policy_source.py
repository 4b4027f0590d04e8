"""Where a policy reload may read from: the text the operator sends, or a regular file
under the controller's policy folder. Nothing else on the controller's disk is read:
no other folder, no device or FIFO, nothing larger than `limits.max_policy_bytes`, and the
reading happens off the event loop."""

from __future__ import annotations

import asyncio
import os
import stat
from pathlib import Path

from qlmserve.controller.auth import PermissionDenied
from qlmserve.controller.exceptions import InvalidRequest


def resolve_in_folder(folder: Path, path: str) -> Path:
    """`path` (relative to the folder, or absolute) if it lies inside the folder once links
    are followed; PermissionDenied otherwise."""
    base = folder.resolve()
    target = (base / path).resolve() if not os.path.isabs(path) else Path(path).resolve()
    if target != base and base not in target.parents:
        raise PermissionDenied("field 'path': the controller reads policies only from its policy folder")
    return target


def read_bounded(path: Path, max_bytes: int) -> str:
    """A regular file's text, at most max_bytes (never blocks on a FIFO or reads a device)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0))
    except OSError as exc:
        raise InvalidRequest(f"field 'path': cannot open the file ({exc.strerror})") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise InvalidRequest("field 'path': not a regular file")
        if st.st_size > max_bytes:
            raise InvalidRequest(f"field 'path': {st.st_size} bytes exceed the limit of {max_bytes}")
        data = os.read(fd, max_bytes + 1)
    finally:
        os.close(fd)
    if len(data) > max_bytes:
        raise InvalidRequest(f"field 'path': the file exceeds the limit of {max_bytes} bytes")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidRequest("field 'path': the file is not UTF-8 text") from None


async def read_policy_file(folder: Path | None, path: str, max_bytes: int) -> tuple[str, Path]:
    if folder is None:
        raise PermissionDenied("field 'path': this controller has no policy folder (it runs on the embedded "
                               "policy); send the policy text instead")
    target = resolve_in_folder(folder, path)
    return await asyncio.to_thread(read_bounded, target, max_bytes), target


def check_text(text: str, max_bytes: int) -> str:
    n = len(text.encode("utf-8"))
    if n > max_bytes:
        raise InvalidRequest(f"field 'text': {n} bytes exceed the limit of {max_bytes}")
    return text
