"""Redis vanishing mid-load loses nothing accepted."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path

import pytest
import redis

from qlmserve.client import QlmClient, submit_request
from qlmserve.controller.redis_server import PrivateRedis
from qlmserve.controller.runtime import ControllerRuntime, RuntimeOptions
from tests.utils import admin_token, start_worker, stop, wait_until, write_sim_files

pytestmark = pytest.mark.integration


async def test_redis_killed_and_restarted(tmp_path: Path):
    """This test verifies that:
    1. while Redis is down, submissions fail with UNAVAILABLE (nothing half-accepted) and
       workers hold their tokens;
    2. after Redis restarts from its append-only file, every request accepted before the
       outage completes, and each client's tokens equal what Redis recorded."""
    data = tmp_path / "redis"
    server = PrivateRedis(data, appendfsync="always").start()
    policy, profile = write_sim_files(tmp_path)
    rt = await ControllerRuntime(RuntimeOptions(policy_path=str(policy), redis_url=server.url,
                                                data_dir=str(tmp_path / "data"))).start()
    workers = [start_worker(rt.address, f"w{i}", profile, tmp_path / "logs") for i in range(2)]
    try:
        await rt.wait_for_workers(2, timeout_s=60)
        async with QlmClient(rt.address, token=admin_token(tmp_path / "data")) as client:
            progress = {"tokens": 0}

            def count(res, chunk) -> None:
                progress["tokens"] += len(chunk.token_ids)

            tasks = [asyncio.create_task(client.generate_reliably(
                submit_request("sim-a", prompt_token_ids=[3, i + 1], max_tokens=150, slo_class="batch"),
                on_chunk=count, retry_for_s=120)) for i in range(10)]
            await wait_until(lambda: progress["tokens"] >= 50, timeout_s=60, what="tokens to flow")
            server.proc.send_signal(signal.SIGKILL)
            server.proc.wait()
            await asyncio.sleep(0.5)
            import grpc

            with pytest.raises(grpc.aio.AioRpcError) as ei:
                await client.submit(submit_request("sim-a", prompt="x", slo_class="batch"), timeout=10)
            assert ei.value.code() == grpc.StatusCode.UNAVAILABLE
            await asyncio.sleep(1.0)
            server = PrivateRedis(data, port=server.port, appendfsync="always").start()
            results = await asyncio.wait_for(asyncio.gather(*tasks), timeout=150)
    finally:
        for w in workers:
            stop(w)
        await rt.stop()
    r = redis.Redis.from_url(server.url, decode_responses=True)
    for res in results:
        ids = [int(x) for x in r.get(f"qlm:req:{res.request_id}:ids").split(",") if x]
        assert res.token_ids == ids and len(ids) == 150
        assert r.hget(f"qlm:req:{res.request_id}", "status") == "finished"
    server.stop()
