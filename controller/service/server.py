"""Builds the controller's gRPC server: client, admin and worker services, plus
standard health checking and server reflection."""

from __future__ import annotations

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from qlmserve.controller.core import Controller
from qlmserve.controller.service import admin, client, worker_link
from qlmserve.controller.service.interceptor import ErrorMappingInterceptor
from qlmserve.pb import admin_pb2, client_pb2, worker_pb2

SERVICE_NAMES = (
    client_pb2.DESCRIPTOR.services_by_name["Client"].full_name,
    admin_pb2.DESCRIPTOR.services_by_name["Admin"].full_name,
    worker_pb2.DESCRIPTOR.services_by_name["WorkerLink"].full_name,
)

# Generous limits: prompts of tens of thousands of token ids fit in one message.
_OPTIONS = [("grpc.max_receive_message_length", 64 * 1024 * 1024),
            ("grpc.max_send_message_length", 64 * 1024 * 1024),
            ("grpc.keepalive_time_ms", 10_000), ("grpc.keepalive_timeout_ms", 5_000),
            ("grpc.http2.max_pings_without_data", 0), ("grpc.keepalive_permit_without_calls", 1)]


async def build_server(controller: Controller, address: str) -> tuple[grpc.aio.Server, int, health.HealthServicer]:
    server = grpc.aio.server(interceptors=[ErrorMappingInterceptor()], options=_OPTIONS)
    client.add_to_server(server, controller)
    admin.add_to_server(server, controller)
    worker_link.add_to_server(server, controller)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    for name in SERVICE_NAMES + ("",):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    reflection.enable_server_reflection(SERVICE_NAMES + (health.SERVICE_NAME, reflection.SERVICE_NAME), server)
    port = server.add_insecure_port(address)
    if port == 0:
        raise OSError(f"cannot listen on {address}")
    return server, port, health_servicer
