"""Redis Sentinel and Redis Cluster through redis-py: the control plane on each, end to
end (a one-node cluster holding every slot; one master watched by one Sentinel)."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import redis

from qlmserve.client import QlmClient, submit_request
from qlmserve.controller.redis_server import free_port
from qlmserve.controller.runtime import ControllerRuntime, RuntimeOptions
from tests.utils import start_worker, stop, write_sim_files

pytestmark = pytest.mark.integration


def _server(tmp: Path, *args: str) -> tuple[subprocess.Popen, int]:
    port = free_port()
    while port > 55_000:  # a cluster node also listens on port + 10000
        port = free_port()
    tmp.mkdir(parents=True, exist_ok=True)
    p = subprocess.Popen([shutil.which("redis-server"), *args, "--port", str(port), "--bind", "127.0.0.1",
                          "--dir", str(tmp), "--save", "", "--appendonly", "no", "--logfile", str(tmp / "log")])
    deadline = time.monotonic() + 10
    while True:
        try:
            if redis.Redis(port=port).ping():
                return p, port
        except redis.ConnectionError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


async def _serve_one_request(url: str, prefix: str, tmp: Path) -> None:
    policy, profile = write_sim_files(tmp)
    rt = await ControllerRuntime(RuntimeOptions(policy_path=str(policy), redis_url=url, prefix=prefix,
                                                data_dir=str(tmp / "data"))).start()
    w = start_worker(rt.address, "w0", profile, tmp / "logs")
    try:
        await rt.wait_for_workers(1, timeout_s=60)
        async with QlmClient(rt.address) as client:
            res = await asyncio.wait_for(client.generate_reliably(submit_request("sim-a", prompt="hi", max_tokens=6)),
                                         60)
            assert len(res.token_ids) == 6 and res.finish_reason in ("stop", "length")
    finally:
        stop(w)
        await rt.stop()


async def test_redis_cluster(tmp_path: Path):
    """This test verifies that:
    1. with a redis+cluster:// URL the controller and a worker serve a request (scripts,
       worker ACL user and token writes all in one hash slot);
    2. a prefix that is not a hash tag is refused at start, naming the field."""
    p, port = _server(tmp_path / "cluster", "--cluster-enabled", "yes",
                      "--cluster-config-file", str(tmp_path / "cluster" / "nodes.conf"))
    try:
        r = redis.Redis(port=port)
        r.execute_command("CLUSTER", "ADDSLOTSRANGE", 0, 16383)
        deadline = time.monotonic() + 20
        while r.execute_command("CLUSTER", "INFO").decode().find("cluster_state:ok") < 0:
            assert time.monotonic() < deadline, "the one-node cluster did not come up"
            time.sleep(0.1)
        url = f"redis+cluster://127.0.0.1:{port}"
        with pytest.raises(ValueError, match="'prefix'"):
            await ControllerRuntime(RuntimeOptions(policy_path=str(write_sim_files(tmp_path)[0]), redis_url=url,
                                                   prefix="qlm", data_dir=str(tmp_path / "d0"))).start()
        await _serve_one_request(url, "{qlm}", tmp_path)
    finally:
        p.terminate()
        p.wait(10)


async def test_redis_sentinel(tmp_path: Path):
    """This test verifies that with a redis+sentinel:// URL the controller finds the master
    Sentinel names, and a worker (its own ACL user, through the same Sentinel) serves a
    request."""
    master, mport = _server(tmp_path / "master")
    conf = tmp_path / "sentinel.conf"
    conf.write_text(f"sentinel monitor qm 127.0.0.1 {mport} 1\n")
    sentinel, sport = _server(tmp_path / "sentinel", str(conf), "--sentinel")
    try:
        await _serve_one_request(f"redis+sentinel://127.0.0.1:{sport}/qm", "qlm", tmp_path)
    finally:
        for p in (sentinel, master):
            p.terminate()
            p.wait(10)
