"""Session-wide fixtures: a private redis-server on a free port (never the machine's own)."""

from __future__ import annotations

import os
import shutil
import uuid

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest

from qlmserve.controller.redis_server import PrivateRedis


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory):
    if shutil.which("redis-server") is None:
        pytest.fail("redis-server is not installed: `make test` installs it (apt-get install redis-server)")
    server = PrivateRedis(tmp_path_factory.mktemp("redis")).start()
    yield server
    server.stop()


@pytest.fixture
def redis_url(redis_server: PrivateRedis) -> str:
    return redis_server.url


@pytest.fixture
def prefix() -> str:
    """A key prefix per test: tests share one redis-server but never each other's keys."""
    return f"t{uuid.uuid4().hex[:10]}"
