"""The control plane end to end: a real redis-server, the controller's gRPC server on
loopback, and worker processes running the simulated engine."""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
import pytest
import redis

from qlmserve.client import GenerateResult, QlmClient, _take, submit_request
from qlmserve.controller.runtime import ControllerRuntime, RuntimeOptions
from tests.utils import admin_token, start_worker, stop, wait_until, write_sim_files

pytestmark = pytest.mark.integration


@pytest.fixture
async def cluster(redis_url: str, prefix: str, tmp_path: Path):
    """An in-process controller plus two simulated worker processes."""
    policy, profile = write_sim_files(tmp_path)
    rt = await ControllerRuntime(RuntimeOptions(policy_path=str(policy), redis_url=redis_url, prefix=prefix,
                                                data_dir=str(tmp_path / "data"))).start()
    workers = [start_worker(rt.address, f"w{i}", profile, tmp_path / "logs") for i in range(2)]
    try:
        await rt.wait_for_workers(2, timeout_s=60)
        async with QlmClient(rt.address, token=admin_token(tmp_path / "data")) as client:
            yield rt, client, workers, profile, tmp_path
    finally:
        for w in workers:
            stop(w)
        await rt.stop()


async def _generate(client: QlmClient, req) -> GenerateResult:
    res = None
    async for chunk in client.generate(req):
        res = res or GenerateResult(chunk.request_id)
        _take(res, chunk)
    return res


async def test_submit_stream_done(cluster, redis_url: str, prefix: str):
    """This test verifies that:
    1. Generate streams every token of a request, in order, and ends with a finish reason;
    2. the request is finished in Redis with the same tokens the client received;
    3. GetStatus reports it finished with its first-token time set;
    4. its time to first token reaches the controller's Prometheus histogram."""
    rt, client, *_ = cluster
    res = await _generate(client, submit_request("sim-a", prompt="hello world", max_tokens=12, slo_class="interactive"))
    assert res.finish_reason in ("stop", "length")
    assert len(res.token_ids) == 12  # the simulated engine runs to max_tokens
    r = redis.Redis.from_url(redis_url, decode_responses=True)
    h = r.hgetall(f"{prefix}:req:{res.request_id}")
    assert h["status"] == "finished"
    assert int(h["generated"]) == len(res.token_ids)
    ids = [int(x) for x in r.get(f"{prefix}:req:{res.request_id}:ids").split(",") if x]
    assert ids == res.token_ids
    st = await client.status(res.request_id)
    assert st.status == "finished" and st.first_token_time >= st.arrival_time > 0
    assert st.generated_tokens == len(res.token_ids)

    def ttft_count() -> float:
        samples = [s for m in rt.controller.metrics.ttft.collect() for s in m.samples]
        return sum(s.value for s in samples if s.name.endswith("_count") and s.labels["slo_class"] == "interactive")

    await wait_until(lambda: ttft_count() == 1, timeout_s=5, what="the TTFT histogram")


async def test_cancel(cluster):
    """This test verifies that:
    1. a running request can be cancelled; its stream ends with finish_reason 'cancelled';
    2. its status is 'cancelled' and no worker holds it afterwards."""
    rt, client, *_ = cluster
    sub = await client.submit(submit_request("sim-a", prompt_token_ids=list(range(1, 20)), max_tokens=400))
    rid = sub.request_id
    await wait_until(lambda: client.status(rid), timeout_s=30, what="status")
    await wait_until(lambda: _generated(client, rid, 2), timeout_s=30, what="two tokens")
    st = await client.cancel(rid)
    assert st.status == "cancelled"
    res = await asyncio.wait_for(client.collect(rid), timeout=30)
    assert res.finish_reason == "cancelled"
    assert len(res.token_ids) < 400

    async def released() -> bool:
        ws = await client.workers()
        return all(rid not in w.running for w in ws.workers)

    await wait_until(released, timeout_s=10, what="worker to drop the request")


async def _generated(client: QlmClient, rid: str, n: int) -> bool:
    return (await client.status(rid)).generated_tokens >= n


async def test_resume_after_client_drop(cluster, redis_url: str, prefix: str):
    """This test verifies that:
    1. a client that drops its stream part-way can resume from its token offset;
    2. the resumed tokens continue exactly where it stopped (no gap, no duplicate);
    3. the stream is trimmed behind the client, yet a resume from offset 0 still
       returns every token (rebuilt from the request's token ids)."""
    rt, client, *_ = cluster
    # Long enough that it cannot finish before the client reads its first chunks, even on a
    # loaded machine (with 60 tokens the first read could already hold the finish).
    req = submit_request("sim-a", prompt_token_ids=[5, 6, 7], max_tokens=300)
    got = None
    async for chunk in client.generate(req):
        got = got or GenerateResult(chunk.request_id)
        _take(got, chunk)
        if len(got.token_ids) >= 5:
            break  # the client drops the stream
    assert got is not None and not got.finish_reason
    resumed = await asyncio.wait_for(client.collect(got.request_id, offset=len(got.token_ids), into=got), timeout=60)
    assert resumed.finish_reason in ("stop", "length")
    r = redis.Redis.from_url(redis_url, decode_responses=True)
    ids = [int(x) for x in r.get(f"{prefix}:req:{got.request_id}:ids").split(",") if x]
    assert resumed.token_ids == ids
    assert r.xlen(f"{prefix}:req:{got.request_id}:stream") < len(ids)  # trimmed behind the reader
    again = await client.collect(got.request_id, offset=0)
    assert again.token_ids == ids and again.finish_reason == resumed.finish_reason


async def test_worker_death_requeues(cluster, redis_url: str, prefix: str):
    """This test verifies that:
    1. when a worker process dies (SIGKILL) its requests go back to the queue;
    2. they complete on the surviving worker, continuing after the tokens already made;
    3. every client receives a complete, gap-free stream."""
    rt, client, workers, *_ = cluster
    subs = [await client.submit(submit_request("sim-a", prompt_token_ids=[1, 2, 3], max_tokens=400))
            for _ in range(6)]
    rids = [s.request_id for s in subs]

    async def busy_worker() -> str | None:
        ws = (await client.workers()).workers
        busy = [w for w in ws if len(w.running) > 0]
        return busy[0].worker_id if busy else None

    victim = await wait_until(busy_worker, timeout_s=30, what="a busy worker")
    await asyncio.sleep(0.3)
    import signal

    stop(workers[int(victim[1:])], signal.SIGKILL)
    results = await asyncio.wait_for(asyncio.gather(*(client.collect(rid) for rid in rids)), timeout=120)
    r = redis.Redis.from_url(redis_url, decode_responses=True)
    retried = 0
    for res in results:
        assert res.finish_reason in ("stop", "length")
        ids = [int(x) for x in r.get(f"{prefix}:req:{res.request_id}:ids").split(",") if x]
        assert res.token_ids == ids
        h = r.hgetall(f"{prefix}:req:{res.request_id}")
        assert h["status"] == "finished"
        retried += int(h["attempts"]) > 1
    assert retried >= 1, "no request was moved off the dead worker"


async def test_invalid_requests(cluster):
    """This test verifies that:
    1. an unknown model is NOT_FOUND;
    2. malformed requests are INVALID_ARGUMENT with the field named;
    3. an oversize prompt is refused with its length and the limit;
    4. nothing is enqueued by a refused request."""
    rt, client, *_ = cluster
    cases = [
        (submit_request("no-such-model", prompt="x"), grpc.StatusCode.NOT_FOUND, "field 'model'"),
        (submit_request("", prompt="x"), grpc.StatusCode.INVALID_ARGUMENT, "'model'"),
        (submit_request("sim-a"), grpc.StatusCode.INVALID_ARGUMENT, "'prompt'"),
        (submit_request("sim-a", prompt="x", max_tokens=0), grpc.StatusCode.INVALID_ARGUMENT, "'max_tokens'"),
        (submit_request("sim-a", prompt="x", slo_class="gold"), grpc.StatusCode.INVALID_ARGUMENT, "'slo_class'"),
        (submit_request("sim-a", prompt="x", temperature=-1), grpc.StatusCode.INVALID_ARGUMENT, "temperature"),
        (submit_request("sim-a", prompt_token_ids=[1] * 600, max_tokens=4), grpc.StatusCode.INVALID_ARGUMENT,
         "exceed the context"),
        (submit_request("sim-a", prompt_token_ids=[1] * 300, max_tokens=4, slo_class="interactive"),
         grpc.StatusCode.INVALID_ARGUMENT, "limit of 256"),
    ]
    for req, code, text in cases:
        with pytest.raises(grpc.aio.AioRpcError) as ei:
            await client.submit(req)
        assert ei.value.code() == code, (req, ei.value.details())
        assert text in ei.value.details(), ei.value.details()
    q = await client.queue()
    assert sum(k.waiting + k.running + k.finished for k in q.classes) == 0
    with pytest.raises(grpc.aio.AioRpcError) as ei:
        await client.status("nope")
    assert ei.value.code() == grpc.StatusCode.NOT_FOUND


async def test_policy_reload_and_admin(cluster, tmp_path: Path):
    """This test verifies that:
    1. an invalid policy file is refused on reload with INVALID_ARGUMENT naming file, line and field,
       and the running policy stays;
    2. a valid one is applied without dropping a waiting request;
    3. the admin views (queue, workers, plan) describe the running system."""
    rt, client, *_ = cluster
    bad = tmp_path / "bad.yaml"
    bad.write_text("slo_classes:\n  interactive:\n    ttft_s: -1\nmodels:\n  m: {}\n")
    with pytest.raises(grpc.aio.AioRpcError) as ei:
        await client.reload_policy(str(bad))
    assert ei.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "bad.yaml:3" in ei.value.details() and "slo_classes.interactive.ttft_s" in ei.value.details()
    sub = await client.submit(submit_request("sim-b", prompt="abc", max_tokens=30))
    good = tmp_path / "policy.yaml"
    text = good.read_text().replace("policy: edf", "policy: sjf")
    good.write_text(text)
    r = await client.reload_policy(str(good))
    assert r.policy_name == "sjf"
    res = await asyncio.wait_for(client.collect(sub.request_id), timeout=60)
    assert res.finish_reason in ("stop", "length")
    ws = await client.workers()
    assert {w.worker_id for w in ws.workers} == {"w0", "w1"} and all(w.healthy for w in ws.workers)
    plan = await client.plan()
    assert plan.tick > 0 and plan.source
    q = await client.queue()
    assert {k.slo_class for k in q.classes} >= {"interactive", "batch"}
    assert sum(k.finished for k in q.classes) >= 1


async def test_admission_limit(redis_url: str, prefix: str, tmp_path: Path):
    """This test verifies that:
    1. past a class's max_queued, Submit answers RESOURCE_EXHAUSTED naming the class;
    2. another class is still accepted, and the refused request is not enqueued."""
    policy, _ = write_sim_files(tmp_path)
    policy.write_text(policy.read_text().replace("batch: {ttft_s: 60.0, priority: 1}",
                                                 "batch: {ttft_s: 60.0, priority: 1, admission: {max_queued: 2}}"))
    rt = await ControllerRuntime(RuntimeOptions(policy_path=str(policy), redis_url=redis_url, prefix=prefix,
                                                data_dir=str(tmp_path / "data"))).start()
    try:
        async with QlmClient(rt.address, token=admin_token(tmp_path / "data")) as client:
            for _ in range(2):
                await client.submit(submit_request("sim-a", prompt="x", slo_class="batch"))
            await rt.controller.tick()  # no workers: both stay waiting
            with pytest.raises(grpc.aio.AioRpcError) as ei:
                await client.submit(submit_request("sim-a", prompt="x", slo_class="batch"))
            assert ei.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "'batch'" in ei.value.details()
            await client.submit(submit_request("sim-a", prompt="x", slo_class="interactive"))
            q = await client.queue()
            assert {k.slo_class: k.waiting for k in q.classes} == {"batch": 2, "interactive": 1}
    finally:
        await rt.stop()
