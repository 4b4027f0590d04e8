"""Load-aware dispatch end to end: simulated worker processes with a prefix cache report it
through WorkerLink, the controller keys prompts the same way, and requests go to the
worker that holds their prefix."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import redis

from qlmserve.client import QlmClient, submit_request
from qlmserve.controller.runtime import ControllerRuntime, RuntimeOptions
from tests.utils import SIM_POLICY, SIM_PROFILE, admin_token, start_worker, stop, wait_until

pytestmark = pytest.mark.integration


async def test_requests_follow_their_cached_prefix(redis_url: str, prefix: str, tmp_path: Path):
    """This test verifies that:
    1. two simulated workers started with --prefix-cache report their cached chain keys
       (16-token blocks) to the controller;
    2. under planner.policy load-aware, two requests with different 160-token prefixes
       arriving together go to different workers (the second sees the first's prefill
       backlog), and later requests sharing one of those prefixes each go to the worker
       whose cache holds it, whichever arrives first."""
    policy = tmp_path / "policy.yaml"
    policy.write_text(SIM_POLICY.format(policy="load-aware", heartbeat=2.0)
                      .replace("grouping: {window_s: 0.5}", "grouping: {window_s: 0.5, max_group_size: 1}"))
    profile = tmp_path / "profile.yaml"
    profile.write_text(SIM_PROFILE)
    rt = await ControllerRuntime(RuntimeOptions(policy_path=str(policy), redis_url=redis_url, prefix=prefix,
                                                data_dir=str(tmp_path / "data"))).start()
    workers = [start_worker(rt.address, f"w{i}", profile, tmp_path / "logs",
                            extra=("--preload", "sim-a", "--prefix-cache")) for i in range(2)]
    r = redis.Redis.from_url(redis_url, decode_responses=True)
    try:
        await rt.wait_for_workers(2, timeout_s=60)
        p = list(range(1000, 1160))
        q = list(range(2000, 2160))
        async with QlmClient(rt.address, token=admin_token(tmp_path / "data")) as client:

            async def run(prompts: list[list[int]]) -> list[str]:
                subs = [await client.submit(submit_request("sim-a", prompt_token_ids=ids, max_tokens=4))
                        for ids in prompts]
                rids = [s.request_id for s in subs]
                for rid in rids:
                    await wait_until(lambda rid=rid: r.hget(f"{prefix}:req:{rid}", "status") == "finished",
                                     timeout_s=30, what=f"{rid} finished")
                return [r.hget(f"{prefix}:req:{rid}", "worker_id") for rid in rids]

            first = await run([p + [1, 2, 3], q + [4, 5, 6]])
            assert sorted(first) == ["w0", "w1"]
            home = {"p": first[0], "q": first[1]}

            def reported() -> bool:
                reps = [rt.controller.workers[w].report for w in ("w0", "w1")]
                return all(rep is not None and rep.prefix_block_tokens == 16 and len(rep.prefix_blocks) >= 10
                           for rep in reps)

            await wait_until(reported, timeout_s=10, what="both workers reporting their caches")
            later = await run([q + [7, 8], p + [9, 10]])
            assert later == [home["q"], home["p"]]
            await asyncio.sleep(0)
    finally:
        for w in workers:
            stop(w)
        await rt.stop()
