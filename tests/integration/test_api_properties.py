"""Property-based: whatever a caller sends to the Client and Admin APIs, the controller
answers with a status that names the caller's mistake (never INTERNAL or UNKNOWN), and
every request it accepted finishes."""

from __future__ import annotations

import asyncio
import math
import threading
from pathlib import Path

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qlmserve.client import QlmClient
from qlmserve.controller.runtime import ControllerRuntime, RuntimeOptions
from qlmserve.pb import client_pb2
from tests.utils import admin_token, start_worker, stop, write_sim_files

pytestmark = pytest.mark.integration

# What a caller's mistake may get; anything else (INTERNAL, UNKNOWN, ...) is a controller bug.
CALLER_CODES = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.RESOURCE_EXHAUSTED,
                grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.OUT_OF_RANGE,
                grpc.StatusCode.PERMISSION_DENIED}


class Background:
    """A controller, two simulated workers and an admin client on an event loop of their own
    (hypothesis drives plain functions)."""

    def __init__(self, redis_url: str, prefix: str, tmp: Path) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.tmp = tmp
        policy, self.profile = write_sim_files(tmp)
        self.opts = RuntimeOptions(policy_path=str(policy), redis_url=redis_url, prefix=prefix,
                                   data_dir=str(tmp / "data"))
        self.accepted: set[str] = set()

    def run(self, coro, timeout: float = 60):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def start(self) -> None:
        async def go():
            self.rt = await ControllerRuntime(self.opts).start()
            self.client = QlmClient(self.rt.address, token=admin_token(self.tmp / "data"))

        self.run(go())
        self.workers = [start_worker(self.rt.address, f"w{i}", self.profile, self.tmp / "logs") for i in range(2)]
        self.run(self.rt.wait_for_workers(2, timeout_s=60), timeout=90)

    def close(self) -> None:
        for w in self.workers:
            stop(w)

        async def down():
            await self.client.close()
            await self.rt.stop()

        self.run(down())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


@pytest.fixture(scope="module")
def bg(tmp_path_factory: pytest.TempPathFactory, redis_server):
    b = Background(redis_server.url, "props", tmp_path_factory.mktemp("props"))
    b.start()
    yield b
    b.close()


text = st.one_of(st.text(max_size=40), st.sampled_from(["sim-a", "sim-b", "batch", "interactive", ""]),
                 st.text(min_size=300, max_size=400))
floats = st.one_of(st.floats(allow_nan=True, allow_infinity=True, width=32), st.sampled_from([0.0, 1.0, 1e-45, 0.5]))
ids = st.lists(st.integers(min_value=0, max_value=2**32 - 1), max_size=40)


@st.composite
def valid_submissions(draw) -> client_pb2.SubmitRequest:
    """Requests the policy accepts, so that acceptance and completion are exercised too."""
    req = client_pb2.SubmitRequest(model=draw(st.sampled_from(["sim-a", "sim-b"])),
                                   slo_class=draw(st.sampled_from(["", "batch", "interactive"])),
                                   max_tokens=draw(st.integers(min_value=1, max_value=8)),
                                   idempotency_key=draw(st.sampled_from(["", "k1", "k2"])))
    req.prompt_token_ids.ids.extend(draw(st.lists(st.integers(min_value=1, max_value=400), min_size=1, max_size=20)))
    req.sampling.temperature = draw(st.sampled_from([0.0, 0.5, 1.0]))
    req.sampling.top_p = draw(st.sampled_from([0.0, 0.9, 1.0]))
    return req


@st.composite
def wild_submissions(draw) -> client_pb2.SubmitRequest:
    req = client_pb2.SubmitRequest(model=draw(text), slo_class=draw(text), max_tokens=draw(
        st.integers(min_value=0, max_value=2**32 - 1) | st.integers(min_value=1, max_value=8)),
        user_id=draw(text), idempotency_key=draw(text))
    if draw(st.booleans()):
        req.prompt = draw(st.text(max_size=200))
    else:
        req.prompt_token_ids.ids.extend(draw(ids))
    s = req.sampling
    s.temperature, s.top_p = draw(floats), draw(floats)
    s.stop_token_ids.extend(draw(st.lists(st.integers(min_value=0, max_value=2**32 - 1), max_size=30)))
    if draw(st.booleans()):
        s.seed = draw(st.integers(min_value=0, max_value=2**64 - 1))
    return req


def _code(exc: grpc.aio.AioRpcError) -> grpc.StatusCode:
    assert exc.code() in CALLER_CODES, (exc.code(), exc.details())
    assert len(exc.details()) <= 1_000
    return exc.code()


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                     HealthCheck.too_slow])
@given(req=st.one_of(valid_submissions(), wild_submissions()), rid=st.one_of(text, st.text(alphabet="0123456789abcdef:", min_size=30, max_size=40)),
       offset=st.integers(min_value=0, max_value=2**32 - 1))
def test_client_api_never_crashes(bg, req, rid, offset):
    """This test verifies that for any Submit, GetStatus, Cancel and Stream a caller can
    send, the answer is OK or a caller's-mistake status with a bounded message, and a
    submission that was accepted is remembered (checked to finish below)."""
    async def go():
        c = bg.client
        try:
            sub = await c.submit(req, timeout=20)
            bg.accepted.add(sub.request_id)
        except grpc.aio.AioRpcError as exc:
            _code(exc)
        for call in (c.status(rid), c.cancel(rid)):
            try:
                await call
            except grpc.aio.AioRpcError as exc:
                _code(exc)
        try:
            await asyncio.wait_for(c.collect(rid, offset), 20)
        except grpc.aio.AioRpcError as exc:
            _code(exc)

    bg.run(go())


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                    HealthCheck.too_slow])
@given(worker=text, requeue=st.booleans(), path=text, policy_text=st.one_of(text, st.just("slo_classes: {}")))
def test_admin_api_never_crashes(bg, worker, requeue, path, policy_text):
    """This test verifies that for any DrainWorker and ReloadPolicy an admin can send, the
    answer is OK or a caller's-mistake status (no INTERNAL), and the running policy and
    workers survive (a bad policy is refused; a drain of a real worker is undone)."""
    async def go():
        c = bg.client
        for call in (c.drain(worker, requeue), c.reload_policy(path=path), c.reload_policy(text=policy_text),
                     c.queue(), c.workers(), c.plan()):
            try:
                await call
            except grpc.aio.AioRpcError as exc:
                _code(exc)
        if worker in bg.rt.controller.workers:
            await c.drain(worker, resume=True)

    bg.run(go())


def test_every_accepted_request_finishes(bg):
    """This test verifies that every request the property tests above got accepted reaches
    an end (finished, or cancelled by a generated Cancel) — none is stuck. It runs after them
    (pytest keeps file order)."""
    assert bg.accepted, "no generated submission was accepted: the strategies miss the valid space"

    async def go():
        ends = {}
        deadline = asyncio.get_running_loop().time() + 90
        pending = set(bg.accepted)
        while pending and asyncio.get_running_loop().time() < deadline:
            for rid in list(pending):
                st_ = await bg.client.status(rid)
                if st_.status in ("finished", "cancelled", "failed"):
                    ends[rid] = st_.status
                    pending.discard(rid)
            await asyncio.sleep(0.5)
        return ends, pending

    ends, pending = bg.run(go(), timeout=120)
    assert not pending, f"{len(pending)} accepted requests never finished"
    assert "failed" not in ends.values()
    assert math.isfinite(len(ends))
