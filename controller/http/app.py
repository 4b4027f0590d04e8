"""The FastAPI app and its uvicorn server, run as a task in the controller's event loop
(the same loop as the gRPC server and the tick: no thread, no second process)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from qlmserve.controller.auth import Authenticator
from qlmserve.controller.core import Controller
from qlmserve.controller.http.errors import error_body
from qlmserve.controller.http.routes import build_router

log = logging.getLogger("qlm.http")

DEFAULT_PORT = 8000
PORT_SEARCH = 100  # the embedded default tries 8000..8099


_ENDPOINTS = {"/v1/completions", "/v1/chat/completions", "/v1/models", "/health"}


def endpoint_of(path: str) -> str:
    """The metric label of a path: its route, never a request id (bounded label values)."""
    if path in _ENDPOINTS:
        return path
    if path.startswith("/v1/requests/"):
        return "/v1/requests/{id}/stream" if path.endswith("/stream") else "/v1/requests/{id}"
    return "other"


class CountRequests:
    """ASGI middleware: qlm_http_requests_total{endpoint, code}, counted when the status is sent."""

    def __init__(self, app, counter) -> None:
        self.app, self.counter = app, counter

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        endpoint = endpoint_of(scope["path"])

        async def counted(message):
            if message["type"] == "http.response.start":
                self.counter.labels(endpoint, str(message["status"])).inc()
            await send(message)

        return await self.app(scope, receive, counted)


def build_app(c: Controller, auth: Authenticator) -> FastAPI:
    app = FastAPI(title="QLM", description="OpenAI-compatible API of the QLM controller", docs_url=None,
                  redoc_url=None, openapi_url=None)
    app.include_router(build_router(c, auth))
    app.add_middleware(CountRequests, counter=c.metrics.http_requests)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_request: Request, exc: RequestValidationError) -> JSONResponse:
        err = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
        field = ".".join(str(x) for x in err["loc"][1:]) or None
        return JSONResponse(error_body(f"field '{field}': {err['msg']}" if field else err["msg"],
                                       "invalid_request_error", field, 400), status_code=400)

    return app


class _Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self):
        yield  # the controller process owns SIGINT/SIGTERM (qlm serve stops everything in order)


def bind(host: str, port: int, search: int = 1) -> socket.socket:
    """A listening-ready socket on `port`, or the next free one of `search` ports (0: any)."""
    family = socket.AF_INET6 if ":" in host.strip("[]") else socket.AF_INET
    last: OSError | None = None
    for p in range(port, port + max(1, search)) if port else [0]:
        s = socket.socket(family, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host.strip("[]"), p))
            return s
        except OSError as exc:
            s.close()
            last = exc
    raise OSError(f"no free port for the HTTP API in {port}..{port + search - 1} on {host}: {last}")


class HttpServer:
    def __init__(self, c: Controller, auth: Authenticator, host: str, cert_file: str | None = None,
                 key_file: str | None = None, client_ca_file: str | None = None) -> None:
        kw = {}
        if cert_file:
            kw = {"ssl_certfile": cert_file, "ssl_keyfile": key_file}
            if client_ca_file:
                kw |= {"ssl_ca_certs": client_ca_file, "ssl_cert_reqs": ssl.CERT_REQUIRED}
        self.host = host
        self.tls = bool(cert_file)
        self.config = uvicorn.Config(build_app(c, auth), lifespan="off", log_level="warning", access_log=False,
                                     timeout_graceful_shutdown=2, timeout_keep_alive=30, **kw)
        self.server = _Server(self.config)
        self.port = 0
        self._task: asyncio.Task | None = None

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{'https' if self.tls else 'http'}://{host}:{self.port}"

    async def start(self, port: int, search: int = 1) -> int:
        sock = bind(self.host, port, search)
        self.port = sock.getsockname()[1]
        self._task = asyncio.create_task(self.server.serve(sockets=[sock]), name="http-api")
        while not self.server.started:
            if self._task.done():
                self._task.result()  # raises what stopped it
                raise OSError(f"the HTTP API did not start on {self.url}")
            await asyncio.sleep(0.01)
        return self.port

    async def stop(self) -> None:
        if self._task is None:
            return
        self.server.should_exit = True
        try:
            await asyncio.wait_for(self._task, timeout=5)
        except (TimeoutError, asyncio.CancelledError, SystemExit):
            self._task.cancel()
