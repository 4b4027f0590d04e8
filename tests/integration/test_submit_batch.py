"""SubmitBatch: many submissions in one call, each answered as Submit would answer it
alone (issue 13's submission path), against a real controller and worker on loopback."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest
import redis

from qlmserve.client import QlmClient, SubmitRefused, submit_request
from qlmserve.controller.auth import digest
from qlmserve.controller.runtime import ControllerRuntime, RuntimeOptions
from qlmserve.pb import client_pb2
from tests.utils import start_worker, stop, write_sim_files

pytestmark = pytest.mark.integration

CLIENT_TOKEN = "client-token-of-tenant-acme"
WORKER_TOKEN = "worker-token-granting-w9"
BATCH_LIMIT = 8


def _policy(tmp: Path, access: str) -> tuple[Path, Path]:
    policy, profile = write_sim_files(tmp)
    policy.write_text(policy.read_text().replace("access: {anonymous_clients: true}", access)
                      + f"limits: {{max_submit_batch: {BATCH_LIMIT}}}\n")
    tokens = tmp / "tokens.txt"
    tokens.write_text(f"client acme {CLIENT_TOKEN}\nworker w9 sha256:{digest(WORKER_TOKEN)}\n")
    return policy, profile


@pytest.fixture
async def cluster(redis_url: str, prefix: str, tmp_path: Path):
    """A controller that refuses anonymous clients, takes at most BATCH_LIMIT items per
    SubmitBatch, and has one simulated worker w0."""
    policy, profile = _policy(tmp_path, "access: {anonymous_clients: false}")
    rt = await ControllerRuntime(RuntimeOptions(policy_path=str(policy), redis_url=redis_url, prefix=prefix,
                                                data_dir=str(tmp_path / "data"),
                                                tokens_file=str(tmp_path / "tokens.txt"))).start()
    workers = [start_worker(rt.address, "w0", profile, tmp_path / "logs")]
    try:
        await rt.wait_for_workers(1, timeout_s=60)
        async with QlmClient(rt.address, token=CLIENT_TOKEN) as client:
            yield rt, client, redis.Redis.from_url(redis_url, decode_responses=True)
    finally:
        for w in workers:
            stop(w)
        await rt.stop()


def _req(i: int, **kw) -> client_pb2.SubmitRequest:
    args = {"prompt_token_ids": [1 + i, 2, 3], "max_tokens": 4, "slo_class": "batch"} | kw
    return submit_request(args.pop("model", "sim-a"), **args)


async def test_every_item_is_acked_durable_and_runs(cluster):
    """This test verifies that:
    1. a full batch (the limit) is accepted item by item, in order, each with its own id
       and its prompt's token count;
    2. each acknowledged request is in Redis already (its hash, with the caller's tenant);
    3. a worker runs them: every token stream finishes."""
    rt, client, r = cluster
    reqs = [_req(i, max_tokens=3 + i % 2) for i in range(BATCH_LIMIT)]
    out = await client.submit_many(reqs)
    assert [type(o) for o in out] == [client_pb2.SubmitResponse] * BATCH_LIMIT
    assert len({o.request_id for o in out}) == BATCH_LIMIT and all(o.prompt_tokens == 3 for o in out)
    for o, req in zip(out, reqs):
        h = r.hgetall(f"{rt.opts.prefix}:req:{o.request_id}")
        assert h["tenant"] == "acme" and h["model"] == "sim-a" and int(h["max_tokens"]) == req.max_tokens
    for o, req in zip(out, reqs):
        res = await client.collect(o.request_id)
        assert res.finish_reason == "length" and len(res.token_ids) == req.max_tokens


async def test_a_bad_item_refuses_only_itself(cluster):
    """This test verifies that:
    1. items with a bad field (an unknown class, an unknown model, a temperature that
       overflows, no prompt) each get their own error naming the field, with Submit's code;
    2. the good items around them are accepted and durable."""
    rt, client, r = cluster
    reqs = [_req(0), _req(1, slo_class="nope"), _req(2), _req(3, model="sim-z"), _req(4, temperature=1e-45),
            submit_request("sim-a", max_tokens=4, slo_class="batch"), _req(6)]
    out = await client.submit_many(reqs)
    bad = {i: o for i, o in enumerate(out) if isinstance(o, SubmitRefused)}
    assert sorted(bad) == [1, 3, 4, 5]
    assert bad[1].code == grpc.StatusCode.INVALID_ARGUMENT and "field 'slo_class'" in bad[1].message
    assert bad[3].code == grpc.StatusCode.NOT_FOUND and "field 'model'" in bad[3].message
    assert bad[4].code == grpc.StatusCode.INVALID_ARGUMENT and "temperature" in bad[4].message
    assert bad[5].code == grpc.StatusCode.INVALID_ARGUMENT and "field 'prompt'" in bad[5].message
    assert all(b.retry_after_s is None for b in bad.values())
    for i in (0, 2, 6):
        assert r.exists(f"{rt.opts.prefix}:req:{out[i].request_id}")


async def test_a_batch_over_the_limit_is_refused_whole(cluster):
    """This test verifies that:
    1. a batch of more than limits.max_submit_batch items is INVALID_ARGUMENT naming the
       field 'requests' and the limit;
    2. none of its items was accepted (their idempotency keys are unused)."""
    rt, client, r = cluster
    reqs = [_req(i, idempotency_key=f"over-{i}") for i in range(BATCH_LIMIT + 1)]
    with pytest.raises(grpc.aio.AioRpcError) as ei:
        await client.submit_many(reqs)
    assert ei.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "field 'requests'" in ei.value.details() and str(BATCH_LIMIT) in ei.value.details()
    assert not any(r.exists(f"{rt.opts.prefix}:idem:over-{i}") for i in range(BATCH_LIMIT + 1))


async def test_roles_apply_to_the_batch(cluster):
    """This test verifies that:
    1. an anonymous SubmitBatch is UNAUTHENTICATED where the policy takes no anonymous
       clients, and so is one with an unknown token;
    2. a worker token may not call it (PERMISSION_DENIED);
    3. nothing was accepted by the refused calls."""
    rt, _, r = cluster
    reqs = [_req(i, idempotency_key=f"role-{i}") for i in range(2)]
    for token, code in ((None, grpc.StatusCode.UNAUTHENTICATED), ("not-a-token", grpc.StatusCode.UNAUTHENTICATED),
                        (WORKER_TOKEN, grpc.StatusCode.PERMISSION_DENIED)):
        async with QlmClient(rt.address, token=token) as other:
            with pytest.raises(grpc.aio.AioRpcError) as ei:
                await other.submit_many(reqs)
            assert ei.value.code() == code
    assert not any(r.exists(f"{rt.opts.prefix}:idem:role-{i}") for i in range(2))


async def test_idempotency_across_items_and_calls(cluster):
    """This test verifies that:
    1. a later item of a batch reusing an earlier item's key is its duplicate (same id);
    2. a later batch, and a unary Submit, reusing a key get the first id, duplicate;
    3. a key reused for other content is FAILED_PRECONDITION for that item only."""
    _, client, _ = cluster
    first = await client.submit_many([_req(0, idempotency_key="k0"), _req(1, idempotency_key="k1"),
                                      _req(0, idempotency_key="k0")])
    assert not first[0].duplicate and first[2].duplicate and first[2].request_id == first[0].request_id
    assert first[1].request_id != first[0].request_id
    again = await client.submit_many([_req(1, idempotency_key="k1"), _req(5, idempotency_key="k0"), _req(7)])
    assert again[0].duplicate and again[0].request_id == first[1].request_id
    assert isinstance(again[1], SubmitRefused) and again[1].code == grpc.StatusCode.FAILED_PRECONDITION
    assert "field 'idempotency_key'" in again[1].message and not isinstance(again[2], SubmitRefused)
    unary = await client.submit(_req(0, idempotency_key="k0"))
    assert unary.duplicate and unary.request_id == first[0].request_id


async def test_admission_refuses_items_with_a_retry_hint(redis_url: str, prefix: str, tmp_path: Path):
    """This test verifies that:
    1. with a tenant quota of 3 queued requests (no worker drains them), a batch of 5 has
       its first 3 items accepted and the last 2 RESOURCE_EXHAUSTED, each with a retry delay;
    2. the queue holds exactly the 3 accepted requests."""
    policy, _ = _policy(tmp_path, "access: {anonymous_clients: true, default_quota: {max_queued: 3}}")
    rt = await ControllerRuntime(RuntimeOptions(policy_path=str(policy), redis_url=redis_url, prefix=prefix,
                                                data_dir=str(tmp_path / "data"))).start()
    try:
        async with QlmClient(rt.address) as client:
            out = await client.submit_many([_req(i) for i in range(5)])
        assert [isinstance(o, SubmitRefused) for o in out] == [False] * 3 + [True] * 2
        for o in out[3:]:
            assert o.code == grpc.StatusCode.RESOURCE_EXHAUSTED and o.retry_after_s is not None
            assert o.retry_after_s > 0
        r = redis.Redis.from_url(redis_url, decode_responses=True)
        assert int(r.hget(f"{prefix}:queued", "all|n")) == 3
    finally:
        await rt.stop()
