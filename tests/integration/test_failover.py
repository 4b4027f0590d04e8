"""A failure costs seconds: a broken worker stream requeues at once, a standby controller
takes over from a dead or paused leader (which is fenced out), and a private redis-server
neither outlives its controller nor runs twice on one folder."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import redis

from qlmserve.client import QlmClient, submit_request
from qlmserve.controller.process_guard import FolderBusy
from qlmserve.controller.redis_server import PrivateRedis
from qlmserve.controller.runtime import ControllerRuntime, RuntimeOptions
from tests.utils import admin_token, start_worker, stop, wait_until, write_sim_files

pytestmark = pytest.mark.integration


async def test_broken_worker_stream_requeues_at_once(redis_url: str, prefix: str, tmp_path: Path):
    """This test verifies that:
    1. with a 30 s heartbeat, the requests of a worker killed with SIGKILL are back in the
       queue within 2 s (its stream broke; before, they waited for the heartbeat);
    2. they then complete on the other worker with every token."""
    policy, profile = write_sim_files(tmp_path, heartbeat=30.0)
    profile.write_text(profile.read_text().replace("decode_base_s: 0.004", "decode_base_s: 0.02"))  # ~10 s runs
    rt = await ControllerRuntime(RuntimeOptions(policy_path=str(policy), redis_url=redis_url, prefix=prefix,
                                                data_dir=str(tmp_path / "data"))).start()
    workers = [start_worker(rt.address, f"w{i}", profile, tmp_path / "logs") for i in range(2)]
    r = redis.Redis.from_url(redis_url, decode_responses=True)
    try:
        await rt.wait_for_workers(2, timeout_s=60)
        async with QlmClient(rt.address) as client:
            subs = [await client.submit(submit_request("sim-a", prompt_token_ids=[1, 2], max_tokens=300))
                    for _ in range(6)]
            busy = await wait_until(lambda: next((i for i in range(2) if r.hlen(f"{prefix}:worker:w{i}:running")),
                                                 None) is not None, timeout_s=30, what="a busy worker")
            victim = next(i for i in range(2) if r.hlen(f"{prefix}:worker:w{i}:running"))
            assert busy
            held = list(r.hgetall(f"{prefix}:worker:w{victim}:running"))
            t0 = time.monotonic()
            stop(workers[victim], signal.SIGKILL)
            await wait_until(lambda: all(r.hget(f"{prefix}:req:{rid}", "worker_id") != f"w{victim}" for rid in held),
                             timeout_s=10, interval=0.02, what="requeue")
            assert time.monotonic() - t0 < 2.0
            results = await asyncio.wait_for(asyncio.gather(*(client.collect(s.request_id) for s in subs)), 60)
            assert all(len(res.token_ids) == 300 for res in results)
    finally:
        for w in workers:
            stop(w)
        await rt.stop()


async def test_standby_takes_over_and_fences_a_paused_leader(redis_url: str, prefix: str, tmp_path: Path):
    """This test verifies that:
    1. of two controllers on one Redis, one leads and the other stands by, and both serve
       the Client API;
    2. when the leader stops renewing its lease (paused), the standby leads within 2 s;
    3. the old leader's plan write is then refused (fenced), it stands by, and its worker
       sessions move to the new leader;
    4. requests accepted through either controller all complete."""
    policy, profile = write_sim_files(tmp_path)
    common = dict(policy_path=str(policy), redis_url=redis_url, prefix=prefix, data_dir=str(tmp_path / "data"),
                  lease_ttl_s=1.0)
    a = await ControllerRuntime(RuntimeOptions(controller_id="a", **common)).start()
    b = await ControllerRuntime(RuntimeOptions(controller_id="b", **common)).start()
    assert a.controller.is_leader and not b.controller.is_leader
    both = f"{a.address},{b.address}"
    workers = [start_worker(both, f"w{i}", profile, tmp_path / "logs") for i in range(2)]
    try:
        await a.wait_for_workers(2, timeout_s=60)
        async with QlmClient(both, token=admin_token(tmp_path / "data")) as client:
            tasks = [asyncio.create_task(client.generate_reliably(submit_request(
                "sim-a", prompt_token_ids=[i + 1], max_tokens=150, idempotency_key=f"k{i}"))) for i in range(6)]
            await asyncio.sleep(0.5)
            a._lease_task.cancel()  # the leader pauses: no more renewals
            t0 = time.monotonic()
            await wait_until(lambda: b.controller.is_leader, timeout_s=5, interval=0.02, what="failover")
            assert time.monotonic() - t0 < 2.0
            assert not await a.controller.store.save_plan({}, "{}", [])  # fenced
            await wait_until(lambda: not a.controller.is_leader, timeout_s=5, what="old leader steps down")
            await b.wait_for_workers(2, timeout_s=30)
            results = await asyncio.wait_for(asyncio.gather(*tasks), 90)
            assert all(len(res.token_ids) == 150 for res in results)
    finally:
        for w in workers:
            stop(w)
        await b.stop()
        await a.stop()


def test_private_redis_dies_with_its_parent_and_runs_once_per_folder(tmp_path: Path):
    """This test verifies that:
    1. a redis-server started by a process that is then SIGKILLed goes away by itself;
    2. while one runs on a folder, a second cannot start on the same folder (FolderBusy)."""
    script = ("import sys, time; from qlmserve.controller.redis_server import PrivateRedis; "
              f"r = PrivateRedis({str(tmp_path / 'r')!r}).start(); print(r.proc.pid, flush=True); time.sleep(60)")
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    pid = int(parent.stdout.readline())
    with pytest.raises(FolderBusy):
        PrivateRedis(tmp_path / "r", lock_wait_s=0.3).start()
    parent.send_signal(signal.SIGKILL)
    parent.wait()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.05)
    else:
        os.kill(pid, signal.SIGKILL)
        pytest.fail("redis-server outlived the process that started it")
    again = PrivateRedis(tmp_path / "r").start()  # the folder is free once it is gone
    again.stop()
