"""The OpenAI-compatible HTTP API against a real controller and a simulated worker: the
official `openai` package, a raw SSE reader (httpx), a client that drops mid-stream and
resumes, the error answers, and the requests' classes in Redis."""

from __future__ import annotations

import asyncio
import json
import os
import ssl
from pathlib import Path

import httpx
import openai
import pytest

from qlmserve.controller.auth import digest
from qlmserve.controller.redis_server import PrivateRedis
from qlmserve.controller.runtime import ControllerRuntime, RuntimeOptions
from qlmserve.credentials import local_token_path
from tests.utils import start_worker, stop, write_sim_files

pytestmark = pytest.mark.integration

CLIENT_TOKEN = "client-token-of-tenant-acme"


async def _cluster(redis_url: str, prefix: str, tmp_path: Path, policy_edit=None, tokens: str | None = None,
                   workers: int = 1):
    policy, profile = write_sim_files(tmp_path)
    if policy_edit:
        policy.write_text(policy_edit(policy.read_text()))
    tokens_file = None
    if tokens:
        tokens_file = tmp_path / "tokens.txt"
        tokens_file.write_text(tokens)
    rt = await ControllerRuntime(RuntimeOptions(policy_path=str(policy), redis_url=redis_url, prefix=prefix,
                                                data_dir=str(tmp_path / "data"), http_port=0,
                                                tokens_file=str(tokens_file) if tokens_file else None)).start()
    procs = [start_worker(rt.address, f"w{i}", profile, tmp_path / "logs") for i in range(workers)]
    try:
        await rt.wait_for_workers(workers, timeout_s=60)
    except BaseException:
        for p in procs:
            stop(p)
        await rt.stop()
        raise
    return rt, procs


@pytest.fixture
async def cluster(redis_url: str, prefix: str, tmp_path: Path):
    rt, procs = await _cluster(redis_url, prefix, tmp_path)
    try:
        yield rt
    finally:
        for p in procs:
            stop(p)
        await rt.stop()


def _sse(lines: list[str]) -> tuple[list[dict], bool]:
    """The JSON events of an SSE body and whether it ended with [DONE]."""
    events, done = [], False
    for line in lines:
        if not line:
            continue
        assert line.startswith("data: "), line
        data = line[len("data: "):]
        if data == "[DONE]":
            done = True
            continue
        assert not done, "an event after [DONE]"
        events.append(json.loads(data))
    return events, done


async def test_openai_package_completions_and_chat(cluster):
    """This test verifies that:
    1. the `openai` package's completions.create and chat.completions.create work, with and
       without stream=True: max_tokens tokens, finish_reason 'length', usage in the response
       and in the last chunk (prompt tokens as the controller counted them);
    2. GET /v1/models lists the policy's models;
    3. each request is in Redis with its class: from the x-qlm-slo-class header, from the
       body's `slo_class`, else the policy's default class; `user` becomes user_id;
    4. the x-qlm-request-id header names the request that the response's id carries."""
    rt = cluster
    store = rt.controller.store
    cl = openai.AsyncOpenAI(base_url=rt.http.url + "/v1", api_key="EMPTY", max_retries=0)
    models = await cl.models.list()
    assert sorted(m.id for m in models.data) == ["sim-a", "sim-b"]

    raw = await cl.completions.with_raw_response.create(model="sim-a", prompt="hello world", max_tokens=7,
                                                        extra_headers={"x-qlm-slo-class": "interactive"}, user="u1")
    rid = raw.headers["x-qlm-request-id"]
    c = raw.parse()
    assert c.id == f"cmpl-{rid}" and c.choices[0].finish_reason == "length"
    assert c.usage.completion_tokens == 7 and c.usage.prompt_tokens == len(b"hello world")
    req = await store.get_request(rid)
    assert (req.slo_class, req.user_id, req.status.value, req.generated) == ("interactive", "u1", "finished", 7)

    chat = await cl.chat.completions.create(model="sim-b", messages=[{"role": "user", "content": "hi"}],
                                            max_tokens=5, extra_body={"slo_class": "interactive"})
    assert chat.choices[0].message.role == "assistant" and chat.choices[0].finish_reason == "length"
    assert chat.usage.completion_tokens == 5
    req = await store.get_request(chat.id.removeprefix("chatcmpl-"))
    assert req.slo_class == "interactive" and req.model == "sim-b"
    assert req.prompt_tokens == len(b"user: hi\nassistant:") == chat.usage.prompt_tokens  # the plain template

    stream = await cl.completions.create(model="sim-a", prompt=[1, 2, 3], max_tokens=9, stream=True)
    chunks = [ch async for ch in stream]
    assert chunks[-1].choices[0].finish_reason == "length" and chunks[-1].usage.completion_tokens == 9
    ids = [t for ch in chunks for t in ch.qlm_token_ids]
    rid = chunks[0].id.removeprefix("cmpl-")
    assert ids == await store.generated_ids(rid) and len(ids) == 9
    req = await store.get_request(rid)
    assert req.slo_class == "batch" and req.prompt_token_ids == [1, 2, 3]  # the policy's default class

    stream = await cl.chat.completions.create(model="sim-a", messages=[{"role": "system", "content": "be brief"},
                                                                       {"role": "user", "content": "hi"}],
                                              max_completion_tokens=6, stream=True,
                                              stream_options={"include_usage": True})
    chunks = [ch async for ch in stream]
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 6


async def test_raw_sse_and_resume_after_a_drop(cluster):
    """This test verifies that:
    1. a streamed completion is server-sent events, `data: {json}` each, ending `data: [DONE]`,
       with the request id in the x-qlm-request-id header;
    2. a client that drops mid-stream and resumes through GET /v1/requests/{id}/stream?offset=K
       gets every token once: the ids it read plus the resumed ones are the request's ids in
       Redis, none lost, none repeated; the request kept running while no one read it."""
    rt = cluster
    store = rt.controller.store
    n = 200
    async with httpx.AsyncClient(base_url=rt.http.url, timeout=30) as http:
        got: list[int] = []
        async with http.stream("POST", "/v1/completions",
                               json={"model": "sim-a", "prompt": [5, 6, 7], "max_tokens": n, "stream": True}) as r:
            assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
            rid = r.headers["x-qlm-request-id"]
            async for line in r.aiter_lines():
                if line.startswith("data: {"):
                    ev = json.loads(line[6:])
                    assert ev["qlm_offset"] == len(got)
                    got += ev["qlm_token_ids"]
                if len(got) >= 10:
                    break  # drop the connection mid-stream
        assert 10 <= len(got) < n
        async with http.stream("GET", f"/v1/requests/{rid}/stream", params={"offset": len(got)}) as r:
            assert r.status_code == 200
            events, done = _sse([line async for line in r.aiter_lines()])
        assert done and events[-1]["choices"][0]["finish_reason"] == "length"
        assert events[0]["qlm_offset"] == len(got)
        resumed = [t for ev in events for t in ev["qlm_token_ids"]]
        ids = await store.generated_ids(rid)
        assert got + resumed == ids and len(ids) == n
        assert events[-1]["usage"]["completion_tokens"] == n

        # The whole stream of a finished request, read raw: one SSE body ending in [DONE].
        r = await http.post("/v1/completions", json={"model": "sim-b", "prompt": "abc", "max_tokens": 4,
                                                      "stream": True})
        events, done = _sse(r.text.split("\n"))
        assert done and [t for ev in events for t in ev["qlm_token_ids"]] == \
            await store.generated_ids(r.headers["x-qlm-request-id"])


async def _error(r: httpx.Response, status: int, param: str | None = None) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    if param is not None:
        assert err["param"] == param and f"'{param}'" in err["message"], err
    return err


async def test_errors_name_the_field(cluster):
    """This test verifies that bad input is answered with the OpenAI error body and the
    matching status: 400 naming the field (controller validation and HTTP-only fields alike),
    404 for an unknown model or request, 416 for a resume offset past the request's tokens,
    and that an Idempotency-Key retry returns the first request while the key reused with
    another payload is 409."""
    rt = cluster
    async with httpx.AsyncClient(base_url=rt.http.url, timeout=30) as http:
        async def post(body, headers=None, path="/v1/completions"):
            return await http.post(path, json=body, headers=headers)

        ok = {"model": "sim-a", "prompt": "x", "max_tokens": 2}
        await _error(await post(ok | {"temperature": -1}), 400, "temperature")
        await _error(await post(ok | {"top_p": 2}), 400, "top_p")
        await _error(await post(ok | {"max_tokens": 0}), 400, "max_tokens")
        await _error(await post(ok | {"max_tokens": "many"}), 400, "max_tokens")
        await _error(await post(ok | {"max_tokens": 10_000}), 400, "prompt")  # past the context
        await _error(await post(ok | {"n": 2}), 400, "n")
        await _error(await post(ok | {"echo": True}), 400, "echo")
        await _error(await post(ok | {"prompt": ["a", "b"]}), 400, "prompt")
        await _error(await post(ok | {"prompt": ""}), 400, "prompt")
        await _error(await post({"prompt": "x"}), 400, "model")
        await _error(await post(ok, {"x-qlm-slo-class": "gold"}), 400, "slo_class")
        await _error(await post(ok | {"user": "u" * 100_000}), 400, "user")
        err = await _error(await http.post("/v1/completions", content=b"{not json"), 400)
        assert "JSON" in err["message"]
        await _error(await http.post("/v1/completions", content=b" " * (17 << 20)), 413)
        await _error(await post({"model": "sim-a", "messages": []}, path="/v1/chat/completions"), 400, "messages")
        await _error(await post({"model": "sim-a", "messages": [{"role": "wizard", "content": "x"}]},
                                path="/v1/chat/completions"), 400, "messages.0.role")
        await _error(await post(ok | {"model": "gpt-9"}), 404, "model")
        await _error(await post({"model": "gpt-9", "messages": [{"role": "user", "content": "x"}]},
                                path="/v1/chat/completions"), 404, "model")
        await _error(await http.get(f"/v1/requests/{'0' * 32}/stream"), 404)
        await _error(await http.get("/v1/requests/nope/stream"), 404)
        r = await post(ok)
        rid = r.headers["x-qlm-request-id"]
        await _error(await http.get(f"/v1/requests/{rid}/stream", params={"offset": 99}), 416, "offset")
        await _error(await http.get(f"/v1/requests/{rid}/stream", params={"offset": "x"}), 400, "offset")
        st = (await http.get(f"/v1/requests/{rid}")).json()
        assert st["status"] == "finished" and st["generated_tokens"] == 2 and st["slo_class"] == "batch"
        first = await post(ok, {"idempotency-key": "k1"})
        again = await post(ok, {"idempotency-key": "k1"})
        assert first.headers["x-qlm-request-id"] == again.headers["x-qlm-request-id"]
        assert again.json()["choices"][0]["text"] == first.json()["choices"][0]["text"]
        await _error(await post(ok | {"prompt": "y"}, {"idempotency-key": "k1"}), 409, "idempotency_key")


async def test_bearer_tokens_and_roles(redis_url: str, prefix: str, tmp_path: Path):
    """This test verifies that HTTP honours the gRPC tokens and roles: where the policy
    refuses anonymous clients, no key or an unknown key is 401 and a worker's key is 403;
    a client key submits (its tenant stored with the request) and so does an admin key."""
    rt, procs = await _cluster(redis_url, prefix, tmp_path,
                               lambda t: t.replace("anonymous_clients: true", "anonymous_clients: false"),
                               tokens=f"client acme sha256:{digest(CLIENT_TOKEN)}\n")
    try:
        url = rt.http.url
        body = {"model": "sim-a", "prompt": "x", "max_tokens": 2}
        worker_token = local_token_path(tmp_path / "data", "worker").read_text().strip()
        admin_token = local_token_path(tmp_path / "data", "admin").read_text().strip()
        async with httpx.AsyncClient(base_url=url, timeout=30) as http:
            r = await http.post("/v1/completions", json=body)
            await _error(r, 401)
            assert r.headers["www-authenticate"] == "Bearer"
            await _error(await http.post("/v1/completions", json=body, headers={"authorization": "Bearer nope"}), 401)
            await _error(await http.get("/v1/models", headers={"authorization": "Bearer nope"}), 401)
            await _error(await http.post("/v1/completions", json=body,
                                         headers={"authorization": f"Bearer {worker_token}"}), 403)
        cl = openai.AsyncOpenAI(base_url=url + "/v1", api_key=CLIENT_TOKEN, max_retries=0)
        raw = await cl.completions.with_raw_response.create(**body)
        req = await rt.controller.store.get_request(raw.headers["x-qlm-request-id"])
        assert req.tenant == "acme" and raw.parse().usage.completion_tokens == 2
        adm = openai.AsyncOpenAI(base_url=url + "/v1", api_key=admin_token, max_retries=0)
        assert (await adm.completions.create(**body)).usage.completion_tokens == 2
        with pytest.raises(openai.AuthenticationError):
            await openai.AsyncOpenAI(base_url=url + "/v1", api_key="EMPTY", max_retries=0).completions.create(**body)
    finally:
        for p in procs:
            stop(p)
        await rt.stop()


async def test_overload_is_429_with_retry_after(redis_url: str, prefix: str, tmp_path: Path):
    """This test verifies that past the admission limit (overload.max_queued with no worker
    to drain the queue) a submission is 429 with a Retry-After header, and that every
    request acknowledged before it is in Redis, queued."""
    policy, _ = write_sim_files(tmp_path)
    policy.write_text(policy.read_text() + "overload: {max_queued: 5, best_effort_share: 0.6}\n")
    rt = await ControllerRuntime(RuntimeOptions(policy_path=str(policy), redis_url=redis_url, prefix=prefix,
                                                data_dir=str(tmp_path / "data"), http_port=0)).start()
    try:
        async with httpx.AsyncClient(base_url=rt.http.url, timeout=30) as http:
            acked = []
            for _ in range(3):
                async with http.stream("POST", "/v1/completions", json={"model": "sim-a", "prompt": "x",
                                                                         "max_tokens": 4, "stream": True}) as r:
                    assert r.status_code == 200
                    acked.append(r.headers["x-qlm-request-id"])
            r = await http.post("/v1/completions", json={"model": "sim-a", "prompt": "x", "max_tokens": 4})
            err = await _error(r, 429)
            assert err["type"] == "rate_limit_error" and "queued requests" in err["message"]
            assert 1 <= int(r.headers["retry-after"]) <= 60
        for rid in acked:
            assert (await rt.controller.store.get_request(rid)).status.value == "queued"
    finally:
        await rt.stop()


async def test_redis_away_is_503(prefix: str, tmp_path: Path):
    """This test verifies that a submission while Redis is unreachable is 503 with the
    OpenAI error body and a Retry-After (nothing acknowledged), not a 500."""
    redis = PrivateRedis(tmp_path / "redis").start()
    policy, _ = write_sim_files(tmp_path)
    rt = await ControllerRuntime(RuntimeOptions(policy_path=str(policy), redis_url=redis.url, prefix=prefix,
                                                data_dir=str(tmp_path / "data"), http_port=0)).start()
    try:
        redis.stop()
        async with httpx.AsyncClient(base_url=rt.http.url, timeout=60) as http:
            r = await asyncio.wait_for(http.post("/v1/completions", json={"model": "sim-a", "prompt": "x",
                                                                           "max_tokens": 4}), 60)
            err = await _error(r, 503)
            assert err["type"] == "service_unavailable" and r.headers["retry-after"]
            assert "x-qlm-request-id" not in r.headers
    finally:
        await rt.stop()


def test_bench_http_runs_and_checks_every_request(tmp_path: Path):
    """This test verifies that `qlm bench-http` (a small load) completes every request over
    both APIs, finds each acknowledged request finished with the tokens its client read,
    and that with a tiny queue limit the refusals are clear (429 / RESOURCE_EXHAUSTED),
    never failures."""
    import subprocess
    import sys

    out = tmp_path / "bench.json"
    p = subprocess.run([sys.executable, "-m", "qlmserve.cli", "bench-http", "--requests", "40", "--concurrency", "16",
                        "--max-queued", "6", "--json", str(out)],
                       check=False, capture_output=True, text=True, timeout=240)
    assert p.returncode == 0, p.stdout + p.stderr
    res = json.loads(out.read_text())
    assert res["lost"] == []
    for ph in res["phases"]:
        assert ph["failed"] == 0 and ph["short"] == 0 and ph["completed"] + sum(ph["refused"].values()) == 40
        assert set(ph["refused"]) <= {"429", "RESOURCE_EXHAUSTED"}
    assert sum(sum(ph["refused"].values()) for ph in res["phases"]) > 0


def _samples(rt, name: str) -> list:
    return [s for m in rt.controller.metrics.registry.collect() for s in m.samples if s.name == name]


async def test_metrics_follow_the_requests(cluster):
    """This test verifies that requests served through HTTP show in the controller's metrics
    with their model and class: submitted, queue time, TTFT and TPOT histograms, SLO
    attainment per class, a cold model load with its seconds, KV-cache usage of the worker,
    and the HTTP requests by endpoint and status."""
    from tests.utils import wait_until

    rt = cluster
    cl = openai.AsyncOpenAI(base_url=rt.http.url + "/v1", api_key="EMPTY", max_retries=0)
    for cls in ("interactive", "batch"):
        await cl.completions.create(model="sim-a", prompt="abc", max_tokens=6, extra_body={"slo_class": cls})
    with pytest.raises(openai.NotFoundError):
        await cl.completions.create(model="nope", prompt="abc", max_tokens=6)

    def count(name: str, **labels) -> float:
        return sum(s.value for s in _samples(rt, name) if all(s.labels.get(k) == v for k, v in labels.items()))

    await wait_until(lambda: count("qlm_tpot_seconds_count", model="sim-a") == 2 and
                     count("qlm_slo_attainment", slo_class="interactive") == 1.0, timeout_s=10, what="metrics")
    for cls in ("interactive", "batch"):
        for name in ("qlm_requests_submitted_total", "qlm_queue_time_seconds_count", "qlm_ttft_seconds_count",
                     "qlm_tpot_seconds_count"):
            assert count(name, model="sim-a", slo_class=cls) == 1, (name, cls)
    assert count("qlm_model_loads_total", model="sim-a", kind="cold") == 1
    assert count("qlm_model_load_seconds_count", model="sim-a", kind="cold") == 1
    assert [s.labels["worker"] for s in _samples(rt, "qlm_kv_cache_usage_ratio")] == ["w0"]
    assert count("qlm_http_requests_total", endpoint="/v1/completions", code="200") == 2
    assert count("qlm_http_requests_total", endpoint="/v1/completions", code="404") == 1


async def test_qlm_top_shows_the_operators_view(cluster, tmp_path: Path):
    """This test verifies that `qlm top` reads the Admin API into the operator's view: per
    class the finished requests and attainment, the worker with its model, and the
    operations the controller sent (here the cold load of the model), as a table and as JSON."""
    import subprocess
    import sys

    rt = cluster
    cl = openai.AsyncOpenAI(base_url=rt.http.url + "/v1", api_key="EMPTY", max_retries=0)
    await asyncio.gather(*(cl.completions.create(model="sim-a", prompt="abc", max_tokens=4,
                                                 extra_body={"slo_class": "interactive"}) for _ in range(3)))
    base = [sys.executable, "-m", "qlmserve.cli", "top", "--once", "--interval", "0.3", "--controller", rt.address,
            "--data-dir", str(tmp_path / "data")]
    p = await asyncio.to_thread(subprocess.run, base + ["--json"], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    top = json.loads(p.stdout)
    cls = {c["slo_class"]: c for c in top["classes"]}
    assert cls["interactive"]["finished"] == 3 and cls["interactive"]["met_slo"] == 3
    assert [w["worker_id"] for w in top["workers"]] == ["w0"] and top["workers"][0]["active_model"] == "sim-a"
    assert top["operations_sent"]["load_model"] >= 1
    assert [(s.labels, s.value) for s in _samples(rt, "qlm_model_loads_total")] == \
        [({"model": "sim-a", "kind": "cold"}, 1.0)]  # a repeated load of the active model is no load
    p = await asyncio.to_thread(subprocess.run, base, capture_output=True, text=True, timeout=60,
                                env=dict(os.environ, COLUMNS="160"))
    assert p.returncode == 0, p.stderr
    assert "interactive" in p.stdout and "100.0%" in p.stdout and "w0" in p.stdout and "operations/s" in p.stdout


async def test_https_with_the_controllers_certificate(redis_url: str, prefix: str, tmp_path: Path):
    """This test verifies that a controller with a certificate serves the HTTP API over TLS
    too (https, the same certificate as gRPC): a client trusting it completes a request,
    a plaintext request does not get an answer."""
    from qlmserve.controller.service.server import ServerTls
    from tests.integration.test_trust import _self_signed

    cert, key = _self_signed(tmp_path, "localhost")
    policy, _ = write_sim_files(tmp_path)
    rt = await ControllerRuntime(RuntimeOptions(policy_path=str(policy), redis_url=redis_url, prefix=prefix,
                                                data_dir=str(tmp_path / "data"), tls=ServerTls(str(cert), str(key)),
                                                local_workers=1, worker_engine="sim", http_port=0,
                                                worker_log_dir=str(tmp_path / "logs"))).start()
    try:
        await rt.wait_for_workers(1, timeout_s=60)
        assert rt.http.url.startswith("https://")
        async with httpx.AsyncClient(base_url=rt.http.url, verify=ssl.create_default_context(cafile=str(cert)),
                                     timeout=60) as https:
            r = await https.post("/v1/completions", json={"model": "sim-a", "prompt": "hi", "max_tokens": 3})
            assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3
        async with httpx.AsyncClient(base_url=rt.http.url.replace("https://", "http://"), timeout=10) as plain:
            with pytest.raises(httpx.HTTPError):
                await plain.get("/v1/models")
    finally:
        await rt.stop()


def test_qlm_serve_embedded_default_serves_http_on_8000_or_next(tmp_path: Path):
    """This test verifies that `qlm serve` on embedded defaults (private Redis, the embedded
    policy) serves the HTTP API on 8000 or the next free port, prints which, and answers
    there with the embedded policy's models."""
    import re
    import signal
    import subprocess
    import sys

    p = subprocess.Popen([sys.executable, "-m", "qlmserve.cli", "serve", "--data-dir", str(tmp_path / "data"),
                          "--port", "0"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        url = None
        for line in p.stdout:
            m = re.search(r"OpenAI-compatible HTTP API on (http://127\.0\.0\.1:(\d+))/v1", line)
            if m:
                url, port = m.group(1), int(m.group(2))
                break
        assert url is not None and 8000 <= port < 8100
        r = httpx.get(url + "/v1/models", timeout=30)
        assert sorted(m["id"] for m in r.json()["data"]) == ["tiny-mixtral", "tiny-qwen-moe"]
    finally:
        p.send_signal(signal.SIGTERM)
        p.wait(timeout=30)
