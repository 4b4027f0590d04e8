"""A Python client of the QLM gRPC API (async), used by the CLI, the demo and the tests.

Any other language needs only proto/ to do the same.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import grpc

from qlmserve.credentials import TlsOptions, open_channel
from qlmserve.pb import admin_pb2, admin_pb2_grpc, client_pb2, client_pb2_grpc


@dataclass(frozen=True)
class SubmitRefused:
    """One item of submit_many that was not accepted: what Submit would have raised for it."""

    code: grpc.StatusCode
    message: str
    retry_after_s: float | None = None  # RESOURCE_EXHAUSTED: when a retry may succeed

    @classmethod
    def from_pb(cls, st) -> SubmitRefused:
        from google.rpc import error_details_pb2

        code = next((c for c in grpc.StatusCode if c.value[0] == st.code), grpc.StatusCode.UNKNOWN)
        info = error_details_pb2.RetryInfo()
        retry = next((info.retry_delay.ToTimedelta().total_seconds() for d in st.details if d.Unpack(info)), None)
        return cls(code, st.message, retry)


@dataclass
class GenerateResult:
    request_id: str
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str = ""
    first_token_s: float | None = None  # seconds from the call to the first token


def submit_request(model: str, *, prompt: str | None = None, prompt_token_ids: list[int] | None = None,
                   slo_class: str = "", max_tokens: int = 16, temperature: float = 0.0, top_p: float = 1.0,
                   seed: int | None = None, user_id: str = "", idempotency_key: str = "") -> client_pb2.SubmitRequest:
    sampling = client_pb2.SamplingParams(temperature=temperature, top_p=top_p)
    if seed is not None:
        sampling.seed = seed
    req = client_pb2.SubmitRequest(model=model, slo_class=slo_class, max_tokens=max_tokens, sampling=sampling,
                                   user_id=user_id, idempotency_key=idempotency_key)
    if prompt_token_ids is not None:
        req.prompt_token_ids.ids.extend(prompt_token_ids)
    elif prompt is not None:
        req.prompt = prompt
    return req


def channel_target(address: str) -> str:
    """'h1:p1,h2:p2' (several controllers) as one gRPC target: the channel picks one that
    answers and moves on when it goes away. Every controller serves the Client and Admin APIs."""
    parts = [a.strip() for a in address.split(",") if a.strip()]
    if len(parts) <= 1:
        return address
    import ipaddress

    def v4(hostport: str) -> bool:
        try:
            return isinstance(ipaddress.ip_address(hostport.rsplit(":", 1)[0]), ipaddress.IPv4Address)
        except ValueError:
            return False

    if all(v4(p) for p in parts):
        return "ipv4:" + ",".join(parts)
    return parts[0]  # names: gRPC resolves one name per target


class QlmClient:
    def __init__(self, address: str, token: str | None = None, tls: TlsOptions | None = None) -> None:
        self.address = address
        self.channel = open_channel(channel_target(address), token, tls)
        self.client = client_pb2_grpc.ClientStub(self.channel)
        self.admin = admin_pb2_grpc.AdminStub(self.channel)

    async def close(self) -> None:
        await self.channel.close()

    async def __aenter__(self) -> QlmClient:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def submit(self, req: client_pb2.SubmitRequest, timeout: float | None = 30) -> client_pb2.SubmitResponse:
        return await self.client.Submit(req, timeout=timeout, wait_for_ready=True)

    async def submit_many(self, reqs: list[client_pb2.SubmitRequest], timeout: float | None = 30
                          ) -> list[client_pb2.SubmitResponse | SubmitRefused]:
        """Submit many requests in one call (SubmitBatch); one answer per request, in order.
        The call as a whole fails only when it cannot be served (auth, a batch over the
        policy's limit, the controller away); a refused item is a SubmitRefused."""
        reply = await self.client.SubmitBatch(client_pb2.SubmitBatchRequest(requests=reqs), timeout=timeout,
                                              wait_for_ready=True)
        return [r.accepted if r.WhichOneof("outcome") == "accepted" else SubmitRefused.from_pb(r.error)
                for r in reply.results]

    def generate(self, req: client_pb2.SubmitRequest) -> AsyncIterator[client_pb2.TokenChunk]:
        return self.client.Generate(req, wait_for_ready=True)

    def stream(self, request_id: str, offset: int = 0) -> AsyncIterator[client_pb2.TokenChunk]:
        return self.client.Stream(client_pb2.StreamRequest(request_id=request_id, offset=offset), wait_for_ready=True)

    async def status(self, request_id: str) -> client_pb2.RequestStatus:
        return await self.client.GetStatus(client_pb2.RequestRef(request_id=request_id), timeout=30)

    async def cancel(self, request_id: str) -> client_pb2.RequestStatus:
        return await self.client.Cancel(client_pb2.RequestRef(request_id=request_id), timeout=30)

    async def collect(self, request_id: str, offset: int = 0, into: GenerateResult | None = None) -> GenerateResult:
        """Read a request's tokens from `offset` to the end."""
        res = into or GenerateResult(request_id)
        async for chunk in self.stream(request_id, offset):
            _take(res, chunk)
            if chunk.finished:
                break
        return res

    async def generate_reliably(self, req: client_pb2.SubmitRequest, *, retry_for_s: float = 120.0,
                                on_chunk=None) -> GenerateResult:
        """Submit and read every token, surviving a controller restart or a dropped stream:
        the submission is retried under one idempotency key (so it is accepted exactly
        once) and the stream resumes at the offset already received."""
        import asyncio
        import uuid

        if not req.idempotency_key:
            req.idempotency_key = uuid.uuid4().hex
        loop = asyncio.get_running_loop()
        deadline = loop.time() + retry_for_s
        res: GenerateResult | None = None
        while True:
            try:
                if res is None:
                    sub = await self.submit(req, timeout=10)
                    res = GenerateResult(sub.request_id)
                async for chunk in self.stream(res.request_id, len(res.token_ids)):
                    _take(res, chunk)
                    if on_chunk is not None:
                        on_chunk(res, chunk)
                    if chunk.finished:
                        return res
            except grpc.aio.AioRpcError as exc:
                if exc.code() not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED,
                                      grpc.StatusCode.CANCELLED) or loop.time() > deadline:
                    raise
            await asyncio.sleep(0.2)

    async def queue(self) -> admin_pb2.QueueState:
        return await self.admin.GetQueue(admin_pb2.GetQueueRequest(), timeout=30)

    async def workers(self) -> admin_pb2.WorkerList:
        return await self.admin.ListWorkers(admin_pb2.ListWorkersRequest(), timeout=30)

    async def plan(self) -> admin_pb2.PlanState:
        return await self.admin.GetPlan(admin_pb2.GetPlanRequest(), timeout=30)

    async def reload_policy(self, path: str = "", text: str = "") -> admin_pb2.ReloadPolicyResponse:
        return await self.admin.ReloadPolicy(admin_pb2.ReloadPolicyRequest(path=path, text=text), timeout=30)

    async def drain(self, worker_id: str, requeue_running: bool = False, resume: bool = False
                    ) -> admin_pb2.DrainWorkerResponse:
        return await self.admin.DrainWorker(admin_pb2.DrainWorkerRequest(
            worker_id=worker_id, requeue_running=requeue_running, resume=resume), timeout=30)


def _take(res: GenerateResult, chunk: client_pb2.TokenChunk) -> None:
    # A chunk that overlaps what we hold (a resume from an earlier offset) adds only the new part.
    start = len(res.token_ids) - chunk.index
    if start < 0:
        raise RuntimeError(f"gap in the token stream of {res.request_id}: have {len(res.token_ids)}, "
                           f"got a chunk at {chunk.index}")
    new = list(chunk.token_ids)[start:]
    res.token_ids.extend(new)
    if start == 0:
        res.text += chunk.text
    if chunk.finished:
        res.finish_reason = chunk.finish_reason
