"""The generated protobuf and gRPC modules, generated on first import when stale.
Only edge code (servicers, clients, converters) imports this."""

from qlmserve.protos import ensure_generated

ensure_generated()

from qlmserve.v1 import admin_pb2, admin_pb2_grpc, client_pb2, client_pb2_grpc, worker_pb2, worker_pb2_grpc  # noqa: E402

__all__ = ["admin_pb2", "admin_pb2_grpc", "client_pb2", "client_pb2_grpc", "worker_pb2", "worker_pb2_grpc"]
