"""Only the right parties get in: the anonymous attacks of issue 11, tried against a real
controller on loopback, each answered UNAUTHENTICATED or PERMISSION_DENIED."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
import redis

from qlmserve.client import QlmClient, submit_request
from qlmserve.controller.auth import Role, digest
from qlmserve.controller.runtime import ControllerRuntime, RuntimeOptions, UnsafeBind
from qlmserve.controller.service.server import ServerTls
from qlmserve.credentials import TlsOptions, open_channel
from qlmserve.pb import admin_pb2, worker_pb2, worker_pb2_grpc
from tests.utils import admin_token, start_worker, stop, write_sim_files

pytestmark = pytest.mark.integration

CLIENT_TOKEN = "client-token-of-tenant-acme"
OTHER_WORKER_TOKEN = "worker-token-granting-w9-only"


@pytest.fixture
async def cluster(redis_url: str, prefix: str, tmp_path: Path):
    """A controller whose policy refuses anonymous clients, a tokens file with a client
    token (tenant acme) and a worker token for `w9` only, and one worker w0."""
    policy, profile = write_sim_files(tmp_path)
    policy.write_text(policy.read_text().replace("access: {anonymous_clients: true}",
                                                 "access: {anonymous_clients: false}"))
    tokens = tmp_path / "tokens.txt"
    tokens.write_text(f"client acme {CLIENT_TOKEN}\nworker w9 sha256:{digest(OTHER_WORKER_TOKEN)}\n")
    rt = await ControllerRuntime(RuntimeOptions(policy_path=str(policy), redis_url=redis_url, prefix=prefix,
                                                data_dir=str(tmp_path / "data"), tokens_file=str(tokens))).start()
    workers = [start_worker(rt.address, "w0", profile, tmp_path / "logs")]
    try:
        await rt.wait_for_workers(1, timeout_s=60)
        yield rt, tmp_path
    finally:
        for w in workers:
            stop(w)
        await rt.stop()


async def _code(coro) -> grpc.StatusCode:
    with pytest.raises(grpc.aio.AioRpcError) as ei:
        await coro
    return ei.value.code()


async def _connect(address: str, token: str | None, worker_id: str) -> tuple[grpc.StatusCode | None, object]:
    """Open a WorkerLink session as `worker_id`; returns (error code or None, first message)."""
    async with open_channel(address, token) as ch:
        stub = worker_pb2_grpc.WorkerLinkStub(ch)

        async def hello():
            yield worker_pb2.WorkerMessage(hello=worker_pb2.Hello(worker_id=worker_id, engine="sim"))
            await asyncio.sleep(3)

        call = stub.Connect(hello())
        try:
            async for msg in call:
                return None, msg
        except grpc.aio.AioRpcError as exc:
            return exc.code(), exc.details()
    return None, None


async def test_anonymous_and_wrong_role_calls_are_refused(cluster):
    """This test verifies that:
    1. every Admin call without a token is UNAUTHENTICATED: queue, workers, plan, drain,
       and a reload of a system file;
    2. a client token may not call Admin (PERMISSION_DENIED), and an unknown token is
       UNAUTHENTICATED;
    3. with anonymous clients off, an anonymous Submit is UNAUTHENTICATED, and a client
       token submits (its tenant recorded on the request);
    4. nothing was drained or reloaded by the refused calls."""
    rt, tmp = cluster
    async with QlmClient(rt.address) as anon:
        for call in (anon.queue(), anon.workers(), anon.plan(), anon.drain("w0"), anon.reload_policy("/etc/passwd"),
                     anon.submit(submit_request("sim-a", prompt="x"))):
            assert await _code(call) == grpc.StatusCode.UNAUTHENTICATED
    async with QlmClient(rt.address, token="not-a-token") as bad:
        assert await _code(bad.submit(submit_request("sim-a", prompt="x"))) == grpc.StatusCode.UNAUTHENTICATED
    async with QlmClient(rt.address, token=CLIENT_TOKEN) as client:
        for call in (client.queue(), client.drain("w0"), client.reload_policy(text="x: 1")):
            assert await _code(call) == grpc.StatusCode.PERMISSION_DENIED
        sub = await client.submit(submit_request("sim-a", prompt="hello", max_tokens=3))
        assert (await client.status(sub.request_id)).status in ("queued", "running", "finished")
    assert rt.controller.workers["w0"].draining is False
    assert rt.controller.policy.planner.policy == "edf"
    r = redis.Redis.from_url(rt.controller.redis_url, decode_responses=True)
    assert r.hget(f"{rt.opts.prefix}:req:{sub.request_id}", "tenant") == "acme"


async def test_worker_link_needs_the_worker_credential(cluster):
    """This test verifies that:
    1. an anonymous WorkerLink session posing as worker w0 is UNAUTHENTICATED, and so is
       one with a client token (PERMISSION_DENIED: wrong role);
    2. a worker token that grants w9 cannot open a session as w0 (PERMISSION_DENIED);
    3. a second session for the live worker id w0 is refused (ALREADY_EXISTS), even with a
       valid worker token;
    4. a session the credential does grant gets a Welcome whose Redis URL carries a user of
       its own, not the controller's password, and that user can neither read the plan nor
       load or run Lua of its own."""
    rt, tmp = cluster
    code, _ = await _connect(rt.address, None, "w0")
    assert code == grpc.StatusCode.UNAUTHENTICATED
    code, _ = await _connect(rt.address, CLIENT_TOKEN, "w0")
    assert code == grpc.StatusCode.PERMISSION_DENIED
    code, _ = await _connect(rt.address, OTHER_WORKER_TOKEN, "w0")
    assert code == grpc.StatusCode.PERMISSION_DENIED
    local_worker_token = (tmp / "data" / "tokens" / "worker.token").read_text().strip()
    code, _ = await _connect(rt.address, local_worker_token, "w0")
    assert code == grpc.StatusCode.ALREADY_EXISTS
    code, msg = await _connect(rt.address, OTHER_WORKER_TOKEN, "w9")
    assert code is None and msg.WhichOneof("body") == "welcome"
    url = msg.welcome.redis_url
    controller_password = redis.connection.parse_url(rt.controller.redis_url).get("password")
    assert controller_password and controller_password not in url
    assert f"{rt.opts.prefix}-worker-w9" in url
    w = redis.Redis.from_url(url, decode_responses=True)
    with pytest.raises(redis.exceptions.NoPermissionError):
        w.get(f"{rt.opts.prefix}:plan")
    with pytest.raises(redis.exceptions.NoPermissionError):
        w.eval("return 1", 0)
    with pytest.raises(redis.exceptions.NoPermissionError):
        w.script_load("return 1")
    with pytest.raises(redis.exceptions.NoPermissionError):
        w.keys("*")
    # The session ended with the call: its Redis user is gone with it.
    await asyncio.sleep(0.5)
    with pytest.raises((redis.exceptions.AuthenticationError, redis.exceptions.ConnectionError)):
        redis.Redis.from_url(url).ping()


async def test_policy_reload_reads_only_the_policy_folder(cluster):
    """This test verifies that:
    1. an admin cannot make the controller read a system file, /dev/zero, or a path that
       climbs out of the policy folder (PERMISSION_DENIED, and the file's lines are not echoed);
    2. a FIFO inside the policy folder is refused at once as not a regular file
       (INVALID_ARGUMENT), without blocking the controller;
    3. policy text sent by the admin is applied; oversize text is refused."""
    rt, tmp = cluster
    async with QlmClient(rt.address, token=admin_token(tmp / "data")) as admin:
        for path in ("/etc/passwd", "/dev/zero", "../../../../etc/passwd"):
            with pytest.raises(grpc.aio.AioRpcError) as ei:
                await admin.reload_policy(path)
            assert ei.value.code() == grpc.StatusCode.PERMISSION_DENIED
            assert "root:" not in ei.value.details()
        fifo = tmp / "pipe.yaml"
        os.mkfifo(fifo)
        with pytest.raises(grpc.aio.AioRpcError) as ei:
            await asyncio.wait_for(admin.reload_policy(str(fifo)), timeout=5)
        assert ei.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "regular file" in ei.value.details()
        text = (tmp / "policy.yaml").read_text().replace("policy: edf", "policy: sjf")
        r = await admin.reload_policy(text=text)
        assert r.policy_name == "sjf"
        with pytest.raises(grpc.aio.AioRpcError) as ei:
            await admin.reload_policy(text="#" * 2_000_000)
        assert ei.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_no_plaintext_beyond_loopback(tmp_path: Path):
    """This test verifies that:
    1. a controller asked to listen beyond loopback without TLS refuses to start;
    2. with TLS but a policy that allows anonymous clients it still refuses;
    3. --insecure lets it through (the operator's explicit choice)."""
    policy, _ = write_sim_files(tmp_path)
    from qlmserve.controller.policy import load_policy

    cfg = load_policy(policy)
    rt = ControllerRuntime(RuntimeOptions(policy_path=str(policy), host="0.0.0.0"))
    with pytest.raises(UnsafeBind, match="TLS"):
        rt.check_bind(cfg)
    rt = ControllerRuntime(RuntimeOptions(policy_path=str(policy), host="0.0.0.0",
                                          tls=ServerTls("c.pem", "k.pem")))
    with pytest.raises(UnsafeBind, match="anonymous"):
        rt.check_bind(cfg)
    ControllerRuntime(RuntimeOptions(policy_path=str(policy), host="0.0.0.0", insecure=True)).check_bind(cfg)


def _self_signed(tmp: Path, name: str) -> tuple[Path, Path]:
    cert, key = tmp / f"{name}.pem", tmp / f"{name}.key"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", f"/CN={name}",
                    "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True)
    return cert, key


async def test_tls_server(redis_url: str, prefix: str, tmp_path: Path):
    """This test verifies that:
    1. a controller with a certificate serves clients that trust it, with their token;
    2. a plaintext client cannot talk to it;
    3. its local workers dial it over TLS and serve requests."""
    cert, key = _self_signed(tmp_path, "localhost")
    policy, _ = write_sim_files(tmp_path)
    rt = await ControllerRuntime(RuntimeOptions(policy_path=str(policy), redis_url=redis_url, prefix=prefix,
                                                data_dir=str(tmp_path / "data"), tls=ServerTls(str(cert), str(key)),
                                                local_workers=1, worker_engine="sim",
                                                worker_log_dir=str(tmp_path / "logs"))).start()
    try:
        await rt.wait_for_workers(1, timeout_s=60)
        tls = TlsOptions(ca_file=str(cert), server_name="localhost")
        async with QlmClient(rt.address, token=admin_token(tmp_path / "data"), tls=tls) as c:
            res = await asyncio.wait_for(c.generate_reliably(submit_request("sim-a", prompt="hi", max_tokens=5)), 60)
            assert len(res.token_ids) == 5
            assert (await c.workers()).workers[0].healthy
        async with QlmClient(rt.address) as plain:
            with pytest.raises(grpc.aio.AioRpcError) as ei:
                await plain.status("0" * 32)
            assert ei.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        await rt.stop()


def test_token_file_roles(tmp_path: Path):
    """This test verifies that:
    1. a tokens file maps tokens (in clear or as sha256:) to roles and names;
    2. a malformed line is an error naming the file and line, never echoing the token."""
    from qlmserve.controller.auth import TokenBook

    book = TokenBook.parse(f"# comment\nclient acme tok-1\nworker gpu-* sha256:{digest('tok-2')}\n")
    assert book.lookup("tok-1").role is Role.CLIENT and book.lookup("tok-1").name == "acme"
    assert book.lookup("tok-2").name == "gpu-*" and book.lookup("nope") is None
    with pytest.raises(ValueError) as ei:
        TokenBook.parse("client secret-token-here\n", source="t.txt")
    assert "t.txt:1" in str(ei.value) and "secret-token-here" not in str(ei.value)
    assert admin_pb2.ReloadPolicyRequest(text="x").text == "x"


def _ca_signed(tmp: Path, ca: tuple[Path, Path], name: str, cn: str, san: str | None = None) -> tuple[Path, Path]:
    key, csr, cert = tmp / f"{name}.key", tmp / f"{name}.csr", tmp / f"{name}.pem"
    subprocess.run(["openssl", "req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={cn}", "-keyout", str(key),
                    "-out", str(csr)], check=True, capture_output=True)
    ext = tmp / f"{name}.ext"
    ext.write_text(f"subjectAltName={san}\n" if san else "basicConstraints=CA:FALSE\n")
    subprocess.run(["openssl", "x509", "-req", "-in", str(csr), "-CA", str(ca[0]), "-CAkey", str(ca[1]),
                    "-CAcreateserial", "-days", "2", "-out", str(cert), "-extfile", str(ext)],
                   check=True, capture_output=True)
    return cert, key


async def test_mutual_tls_worker_identity(redis_url: str, prefix: str, tmp_path: Path):
    """This test verifies that:
    1. with --tls-client-ca, a worker whose certificate is named `worker:w7` (signed by that
       CA) connects without a token, as w7, whatever id it sends;
    2. a caller without a client certificate cannot connect at all."""
    ca = _self_signed(tmp_path, "ca")
    server = _ca_signed(tmp_path, ca, "server", "localhost", "DNS:localhost,IP:127.0.0.1")
    worker = _ca_signed(tmp_path, ca, "worker", "worker:w7")
    policy, profile = write_sim_files(tmp_path)
    rt = await ControllerRuntime(RuntimeOptions(
        policy_path=str(policy), redis_url=redis_url, prefix=prefix, data_dir=str(tmp_path / "data"),
        tls=ServerTls(str(server[0]), str(server[1]), client_ca_file=str(ca[0])))).start()
    w = subprocess.Popen([sys.executable, "-m", "qlmserve.cli", "worker", "--controller", rt.address, "--id", "w7",
                          "--engine", "sim", "--sim-profile", str(profile), "--data-dir", str(tmp_path / "nothing"),
                          "--tls-ca", str(ca[0]), "--tls-cert", str(worker[0]), "--tls-key", str(worker[1]),
                          "--tls-server-name", "localhost"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        await rt.wait_for_workers(1, timeout_s=60)
        assert list(rt.controller.workers) == ["w7"]
        async with QlmClient(rt.address, token=admin_token(tmp_path / "data"),
                             tls=TlsOptions(ca_file=str(ca[0]), server_name="localhost")) as no_cert:
            with pytest.raises(grpc.aio.AioRpcError) as ei:
                await no_cert.workers()
            assert ei.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        stop(w)
        await rt.stop()
