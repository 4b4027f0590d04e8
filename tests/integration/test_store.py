"""The Redis state transitions (Lua scripts) against a real redis-server."""

from __future__ import annotations

import asyncio
import time
from dataclasses import replace

import pytest
import redis

from qlmserve.backends.engine import FinishReason, TokenEvent
from qlmserve.backends.token_sink import TokenSink
from qlmserve.controller.policy import GroupingConfig
from qlmserve.controller.request import Request, RequestStatus
from qlmserve.controller.store import RedisStore

pytestmark = pytest.mark.integration


def _req(rid: str, model: str = "m", cls: str = "batch") -> Request:
    return Request(request_id=rid, model=model, slo_class=cls, prompt_token_ids=[1, 2, 3], max_tokens=3,
                   arrival=time.time(), ttft_slo_s=5.0)  # the token script stamps real time


@pytest.fixture
async def store(redis_url: str, prefix: str):
    s = RedisStore.from_url(redis_url, prefix)
    yield s
    await s.close()


async def test_grouping_and_idempotency(store: RedisStore):
    """This test verifies that:
    1. requests of one (model, class) within the window share a group; another class opens another;
    2. a group closes at max_group_size and after the window;
    3. a resubmission with the same idempotency key returns the first request, enqueued once."""
    g = GroupingConfig(window_s=1.0, max_group_size=2)
    a = await store.submit(_req("a"), 100.0, g)
    b = await store.submit(_req("b"), 100.5, g)
    c = await store.submit(_req("c"), 100.6, g)  # group full
    d = await store.submit(_req("d", cls="interactive"), 100.6, g)
    e = await store.submit(_req("e"), 102.0, g)  # window passed
    assert a.group_id == b.group_id != c.group_id
    assert d.group_id not in (a.group_id, c.group_id) and e.group_id != c.group_id
    k1 = await store.submit(_req("k1"), 103.0, g, idempotency_key="same")
    k2 = await store.submit(_req("k2"), 103.1, g, idempotency_key="same")
    assert (k2.request_id, k2.duplicate, k1.duplicate) == ("k1", True, False)
    groups = {gr.group_id: gr.waiting for gr in await store.groups()}
    assert sum(len(w) for w in groups.values()) == 6
    assert await store.get_request("k2") is None


async def test_attempt_fencing_and_requeue(store: RedisStore, redis_url: str, prefix: str):
    """This test verifies that:
    1. assignment bumps the attempt number; tokens are accepted only under the current attempt
       and only at the next index (a retried write is not duplicated);
    2. after a requeue and reassignment, a stale worker's tokens are refused and reported;
    3. the final token finishes the request and updates the learned lengths and class counters."""
    g = GroupingConfig()
    sub = await store.submit(_req("r"), 100.0, g)
    assert await store.assign("r", sub.group_id, "w1", 100.1) == 1
    sink1 = TokenSink(redis.Redis.from_url(redis_url), prefix, "w1")
    assert sink1.write([(TokenEvent("r", 11, 0), 1, "a")]) == set()
    assert sink1.write([(TokenEvent("r", 11, 0), 1, "a")]) == set()  # a retry: skipped, not doubled
    assert await store.generated_ids("r") == [11]
    assert await store.requeue("r", sub.group_id, "w1", 100.2)
    assert (await store.get_request("r")).status == RequestStatus.QUEUED
    assert await store.assign("r", sub.group_id, "w2", 100.3) == 2
    assert sink1.write([(TokenEvent("r", 99, 1), 1, "zombie")]) == {("r", 1)}
    sink2 = TokenSink(redis.Redis.from_url(redis_url), prefix, "w2")
    sink2.write([(TokenEvent("r", 12, 1), 2, "b"),
                 (TokenEvent("r", 13, 2, finished=True, finish_reason=FinishReason.LENGTH), 2, "c")])
    req = await store.get_request("r")
    assert req.status == RequestStatus.FINISHED and req.finish_reason == "length" and req.attempts == 2
    assert await store.generated_ids("r") == [11, 12, 13]
    assert await store.length_counts() == {("m", "batch", 0): (1.0, 3.0, 9.0)}
    assert (await store.class_stats())["batch"] == {"finished": 1, "met": 1}
    assert await store.worker_running("w2") == {}
    assert await store.unfinished_ids() == set()



async def test_a_refused_stale_attempt_does_not_stop_the_newer_one(store: RedisStore, redis_url: str, prefix: str):
    """This test verifies that when a worker's held write of attempt 1 is refused because the
    request came back to the same worker as attempt 2 (the worker finished attempt 1 while
    Redis was away, so its reconnect did not list it and the controller requeued it), the
    worker drops attempt 1 only: attempt 2 keeps running and finishes the request. (Dropping
    by request id left it `running` forever: `qlm bench chaos` hung on it.)"""
    from qlmserve.backends.engine import EngineRequest
    from qlmserve.backends.factory import create_engine
    from qlmserve.backends.worker import EngineLoop, _Held
    from qlmserve.operations.model_spec import ModelSpec

    sub = await store.submit(_req("r"), 100.0, GroupingConfig())
    assert await store.assign("r", sub.group_id, "w1", 100.1) == 1
    assert await store.requeue("r", sub.group_id, "w1", 100.2)
    assert await store.assign("r", sub.group_id, "w1", 100.3) == 2
    engine = create_engine("sim", {"m": ModelSpec()}, max_batch_size=4)
    engine.load_model("m")
    loop = EngineLoop(engine, lambda: TokenSink(redis.Redis.from_url(redis_url), prefix, "w1"), {}, lambda *a: None)
    loop.held["r"] = _Held(2, "m")
    engine.add_request(EngineRequest(request_id="r", model="m", prompt_token_ids=[1, 2, 3], max_tokens=3))
    loop._pending = [(TokenEvent("r", 7, 0), 1, "")]  # attempt 1's token, held through the outage
    loop._flush()
    assert loop._pending == [] and loop.held["r"].attempt == 2
    loop.start()
    try:
        for _ in range(200):
            if (await store.get_request("r")).status == RequestStatus.FINISHED:
                break
            await asyncio.sleep(0.05)
    finally:
        loop.stop()
        loop.join(5)
    req = await store.get_request("r")
    assert req.status == RequestStatus.FINISHED and req.attempts == 2
    assert len(await store.generated_ids("r")) == 3
    # and a refused write of the attempt the worker does hold still stops it
    loop.held["x"] = _Held(1, "m")
    loop._drop("x", 1)
    assert "x" not in loop.held

async def test_cancel_queued_and_running(store: RedisStore):
    """This test verifies that:
    1. cancelling a waiting request removes it from its group and ends its stream;
    2. cancelling a running one returns the worker that holds it;
    3. cancelling twice is a no-op."""
    g = GroupingConfig()
    s1 = await store.submit(_req("q"), 100.0, g)
    s2 = await store.submit(_req("run"), 100.0, g)
    await store.assign("run", s2.group_id, "w9", 100.1)
    assert await store.finish_early("q", RequestStatus.CANCELLED, 101.0) == ("queued", "")
    assert await store.finish_early("run", RequestStatus.CANCELLED, 101.0) == ("running", "w9")
    assert await store.finish_early("run", RequestStatus.CANCELLED, 101.0) is None
    assert all("q" not in gr.waiting for gr in await store.groups())
    batches = [b async for b in store.read_stream("q", 0)]
    assert batches[-1][-1].finished and batches[-1][-1].finish_reason == "cancelled"
    assert s1.group_id == s2.group_id


async def test_waiting_stream_readers_do_not_starve_the_control_plane(redis_url: str, prefix: str):
    """This test verifies that token-stream readers blocked waiting for tokens (one Redis
    connection each) use a pool of their own: with more of them than the controller's main
    pool holds, a control-plane call (what the leader lease and the ticks make) still gets
    a connection at once. With one shared pool ~1,000 streaming clients took every
    connection and the controller lost its lease for good."""
    import asyncio

    st = RedisStore.from_url(redis_url, prefix=prefix, max_connections=4)
    try:
        req = _req("waits")
        await st.submit(req, time.time(), GroupingConfig())

        async def reader() -> None:
            async for _ in st.read_stream(req.request_id, 0, block_ms=5000):
                pass

        readers = [asyncio.create_task(reader()) for _ in range(12)]
        await asyncio.sleep(0.5)  # every reader is now blocked in XREAD
        t0 = time.monotonic()
        assert await asyncio.wait_for(st.ping(), timeout=2.0)
        assert time.monotonic() - t0 < 1.0
        for t in readers:
            t.cancel()
        await asyncio.gather(*readers, return_exceptions=True)
    finally:
        await st.close()


async def test_requests_group_and_file_their_lengths_by_band(store: RedisStore, redis_url: str, prefix: str):
    """This test verifies that:
    1. requests of one (model, class) in one window share a group only within a length band;
    2. a finished request's length is filed under its band;
    3. fields written before bands ("model|class|stat") read as the class-wide band 0."""
    g = GroupingConfig()
    a = await store.submit(replace(_req("a"), length_band=3), 100.0, g)
    b = await store.submit(replace(_req("b"), length_band=5), 100.1, g)
    c = await store.submit(replace(_req("c"), length_band=3), 100.2, g)
    assert a.group_id == c.group_id != b.group_id
    assert (await store.get_request("b")).length_band == 5
    assert await store.assign("b", b.group_id, "w1", 100.3) == 1
    sink = TokenSink(redis.Redis.from_url(redis_url), prefix, "w1")
    sink.write([(TokenEvent("b", 7, 0), 1, "x"),
                (TokenEvent("b", 8, 1, finished=True, finish_reason=FinishReason.LENGTH), 1, "y")])
    await store.r.hset(store.k.lengths, mapping={"m|batch|n": 2, "m|batch|sum": 10, "m|batch|sumsq": 50})
    assert await store.length_counts() == {("m", "batch", 5): (1.0, 2.0, 4.0), ("m", "batch", 0): (2.0, 10.0, 50.0)}
