"""The controller's incremental view of the waiting groups (controller/waiting_view.py)
against a real redis-server."""

from __future__ import annotations

import time

import pytest
import redis.asyncio as aioredis

from qlmserve.controller.policy import GroupingConfig
from qlmserve.controller.request import Request, RequestStatus
from qlmserve.controller.store import RedisStore
from qlmserve.controller.waiting_view import WaitingView

pytestmark = pytest.mark.integration


def _req(rid: str, cls: str = "batch") -> Request:
    return Request(request_id=rid, model="m", slo_class=cls, prompt_token_ids=[1, 2, 3], max_tokens=3,
                   arrival=time.time(), ttft_slo_s=5.0)


@pytest.fixture
async def store(redis_url: str, prefix: str):
    s = RedisStore.from_url(redis_url, prefix)
    yield s
    await s.close()


def _state(records) -> list[tuple]:
    return [(g.group_id, g.model, g.slo_class, g.created_at, g.waiting) for g in records]


async def _truth(store: RedisStore) -> list[tuple]:
    return _state([g for g in await store.groups() if g.waiting])


async def test_incremental_view_matches_a_restart(store: RedisStore):
    """This test verifies that:
    1. after submissions, assignments, requeues and cancels, the view updated from the
       changes stream alone equals what Redis holds (order of groups and of requests);
    2. a new view (a restarted controller) rebuilds the same state with one full read;
    3. a group whose requests all left leaves the view, and returns when one is requeued;
    4. what left the queues is reported, and requeued requests are not."""
    g = GroupingConfig(window_s=100.0, max_group_size=3)
    view = WaitingView()
    changed, left, full = await view.refresh(store)
    assert full and not view.groups
    subs = {}
    for i in range(10):
        subs[f"r{i}"] = await store.submit(_req(f"r{i}", "interactive" if i % 4 == 0 else "batch"), 100.0 + i, g)
    changed, left, full = await view.refresh(store)
    assert not full and _state(view.records()) == await _truth(store)
    assert changed == {s.group_id for s in subs.values()}
    # r1 runs, r2 runs and comes back at its group's head, r3 is cancelled.
    gid1 = subs["r1"].group_id
    assert await store.assign("r1", gid1, "w", 120.0) == 1
    assert await store.assign("r2", subs["r2"].group_id, "w", 120.0) == 1
    assert await store.requeue("r2", subs["r2"].group_id, "w", 121.0)
    await store.finish_early("r3", RequestStatus.CANCELLED, 122.0)
    changed, left, full = await view.refresh(store)
    assert not full and left == {"r1", "r3"}
    assert _state(view.records()) == await _truth(store)
    assert view.groups[subs["r2"].group_id].waiting[0] == "r2"
    # Empty a whole group, then requeue one of it.
    for rid in view.groups[gid1].waiting[:]:
        assert await store.assign(rid, gid1, "w", 123.0) >= 1
    await view.refresh(store)
    assert gid1 not in view.groups
    assert await store.requeue("r1", gid1, "w", 124.0)
    await view.refresh(store)
    assert view.groups[gid1].waiting == ["r1"]
    assert _state(view.records()) == await _truth(store)
    restarted = WaitingView()
    _c, _l, full = await restarted.refresh(store)
    assert full and _state(restarted.records()) == _state(view.records())
    assert view.full_reads == 1 and view.mismatches == 0


async def test_lost_changes_and_consistency_check(store: RedisStore, redis_url: str, prefix: str):
    """This test verifies that:
    1. when the changes stream lost entries the view had not read (trimmed), the next
       refresh reads everything and equals Redis again;
    2. the periodic check finds a queue changed behind the stream's back, counts it, and
       adopts what Redis holds;
    3. a full read that races with new submissions replays them without duplicates."""
    g = GroupingConfig(window_s=100.0, max_group_size=4)
    view = WaitingView()
    await view.refresh(store)
    for i in range(6):
        await store.submit(_req(f"a{i}"), 100.0 + i, g)
    await view.refresh(store)
    for i in range(6):
        await store.submit(_req(f"b{i}"), 110.0 + i, g)
    r = aioredis.from_url(redis_url, decode_responses=True)
    try:
        await r.xtrim(store.k.changes, maxlen=2, approximate=False)
        _c, _l, full = await view.refresh(store)
        assert full and _state(view.records()) == await _truth(store)
        # A request pushed into a queue without a change entry: only the check sees it.
        gid = next(iter(view.groups))
        await r.rpush(store.k.group_queue(gid), "stray")
        _c, _l, full = await view.refresh(store)
        assert not full and "stray" not in view.groups[gid].waiting
        view.check_every_s = 0.0
        _c, _l, full = await view.refresh(store)
        assert full and view.mismatches == 1 and view.groups[gid].waiting[-1] == "stray"
        await r.lrem(store.k.group_queue(gid), 1, "stray")
    finally:
        await r.aclose()


async def test_full_read_replays_racing_changes(store: RedisStore, monkeypatch: pytest.MonkeyPatch):
    """This test verifies that a full read whose cursor is older than what it read (changes
    raced with it) replays those changes without duplicating or misplacing requests: here
    every change so far (submits, an assignment, a requeue to the head) is replayed."""
    g = GroupingConfig(window_s=100.0, max_group_size=4)
    subs = [await store.submit(_req(f"c{i}"), 100.0 + i, g) for i in range(6)]
    assert await store.assign("c1", subs[1].group_id, "w", 110.0) == 1
    assert await store.assign("c2", subs[2].group_id, "w", 110.0) == 1
    assert await store.requeue("c1", subs[1].group_id, "w", 111.0)

    async def before_everything() -> int:
        return 0

    monkeypatch.setattr(store, "last_change", before_everything)
    view = WaitingView()
    _c, _left, full = await view.refresh(store)
    assert full and _state(view.records()) == await _truth(store)
    assert view.groups[subs[1].group_id].waiting == ["c1", "c0", "c3"]


async def test_a_reset_while_a_refresh_awaits_redis_reads_everything(store):
    """This test verifies that a new lead's reset() arriving while a refresh awaits Redis (the
    lease task runs beside the tick) makes that refresh read everything, not apply changes
    after a cursor that is gone (it failed with a TypeError on `None + 1`, found by the
    vLLM tests when a blocked event loop cost the controller its lease)."""
    view = WaitingView()
    await view.refresh(store)
    real = store.read_changes
    resets = [1]

    async def reset_meanwhile(*a, **kw):
        if resets[0]:  # one new lead, during the first read of the stream
            resets[0] -= 1
            view.reset()
        return await real(*a, **kw)

    store.read_changes = reset_meanwhile
    try:
        changed, left, full = await view.refresh(store)
    finally:
        store.read_changes = real
    assert full and view.cursor is not None
    again = await view.refresh(store)
    assert again[2] is False


async def test_applied_changes_and_old_latencies_are_trimmed(store: RedisStore, monkeypatch: pytest.MonkeyPatch,
                                                             redis_url: str):
    """This test verifies that (issue 11, Redis memory flat under a steady load):
    1. the changes stream holds at most about KEEP_CHANGES entries behind the view's
       cursor however many were applied, and the view still equals Redis;
    2. a second reader that fell behind the trim reads everything and agrees;
    3. reading the latency log drops entries older than its keep window behind the newest."""
    from qlmserve.controller import store as store_mod
    from qlmserve.controller import waiting_view

    monkeypatch.setattr(waiting_view, "KEEP_CHANGES", 20)
    monkeypatch.setattr(waiting_view, "TRIM_EVERY", 10)
    g = GroupingConfig(window_s=100.0, max_group_size=8)
    view, behind = WaitingView(), WaitingView()
    await view.refresh(store)
    await behind.refresh(store)
    for i in range(300):
        s = await store.submit(_req(f"t{i}"), 100.0 + i, g)
        if i % 3 == 0:
            assert await store.assign(f"t{i}", s.group_id, "w", 100.0 + i) == 1
        if i % 25 == 0:
            await view.refresh(store)
    await view.refresh(store)
    r = aioredis.from_url(redis_url, decode_responses=True)
    try:
        # Approximate trimming drops whole stream nodes (100 entries by default).
        assert await r.xlen(store.k.changes) <= 20 + 10 + 100 < 400
        assert _state(view.records()) == await _truth(store)
        _c, _l, full = await behind.refresh(store)
        assert full and _state(behind.records()) == _state(view.records())
        monkeypatch.setattr(store_mod, "LATENCY_LOG_KEEP_MS", 1_000)
        await r.delete(store.k.ttft_log)
        for ms in (1_000, 1_500, 5_000, 5_200):
            for j in range(150):
                await r.xadd(store.k.ttft_log, {"c": "batch", "m": "m", "t": 0.1}, id=f"{ms}-{j}")
        entries, cursor = await store.read_latencies("0-0")
        assert len(entries) == 600 and cursor == "5200-149"
        remaining = await r.xrange(store.k.ttft_log, count=1)
        assert int(remaining[0][0].split("-")[0]) >= 1_500  # the 1,000 ms entries went
    finally:
        await r.aclose()
