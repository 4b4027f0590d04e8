"""Builds the controller's gRPC server: client, admin and worker services, plus
standard health checking and server reflection, behind the one guard interceptor
(authentication, decoding, error mapping), on TLS when certificates are given."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from qlmserve.controller.auth import Authenticator
from qlmserve.controller.core import Controller
from qlmserve.controller.service import admin, client, worker_link
from qlmserve.controller.service.interceptor import GuardInterceptor
from qlmserve.pb import admin_pb2, client_pb2, worker_pb2

SERVICE_NAMES = (
    client_pb2.DESCRIPTOR.services_by_name["Client"].full_name,
    admin_pb2.DESCRIPTOR.services_by_name["Admin"].full_name,
    worker_pb2.DESCRIPTOR.services_by_name["WorkerLink"].full_name,
)

# Prompts of tens of thousands of token ids fit in one message; the policy's size limits
# (limits.*) bound every field inside it.
MAX_MESSAGE_BYTES = 16 * 1024 * 1024
_OPTIONS = [("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", 64 * 1024 * 1024),
            ("grpc.keepalive_time_ms", 10_000), ("grpc.keepalive_timeout_ms", 5_000),
            ("grpc.http2.max_pings_without_data", 0), ("grpc.keepalive_permit_without_calls", 1)]


@dataclass(frozen=True)
class ServerTls:
    """The server's certificate and key (PEM files); with `client_ca_file`, every caller
    must present a certificate that CA signed (mutual TLS; a worker's common name
    `worker:<id>` then identifies it)."""

    cert_file: str
    key_file: str
    client_ca_file: str | None = None

    def credentials(self) -> grpc.ServerCredentials:
        pair = (Path(self.key_file).read_bytes(), Path(self.cert_file).read_bytes())
        ca = Path(self.client_ca_file).read_bytes() if self.client_ca_file else None
        return grpc.ssl_server_credentials([pair], root_certificates=ca, require_client_auth=ca is not None)


async def build_server(controller: Controller, address: str, auth: Authenticator, tls: ServerTls | None = None
                       ) -> tuple[grpc.aio.Server, int, health.HealthServicer]:
    server = grpc.aio.server(interceptors=[GuardInterceptor(auth)], options=_OPTIONS)
    client.add_to_server(server, controller)
    admin.add_to_server(server, controller)
    worker_link.add_to_server(server, controller)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    for name in SERVICE_NAMES + ("",):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    reflection.enable_server_reflection(SERVICE_NAMES + (health.SERVICE_NAME, reflection.SERVICE_NAME), server)
    if tls is not None:
        port = server.add_secure_port(address, tls.credentials())
    else:
        port = server.add_insecure_port(address)
    if port == 0:
        raise OSError(f"cannot listen on {address}")
    return server, port, health_servicer
