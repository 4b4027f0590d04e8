"""The caller's side of authentication: which token to send, and a gRPC channel that sends
it (and speaks TLS when asked). Used by the CLI, the client library and workers.

A token comes from `--token-file`, else the QLM_TOKEN environment variable, else the file
`qlm serve` wrote for this role under `<data-dir>/tokens/` (so the CLI and local workers
on the same data folder need no flags). Tokens are never printed or logged.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc

TOKEN_ENV = "QLM_TOKEN"
DATA_DIR_ENV = "QLM_DATA_DIR"
DEFAULT_DATA_DIR = "var/qlm"


def tokens_dir(data_dir: str | Path) -> Path:
    return Path(data_dir) / "tokens"


def local_token_path(data_dir: str | Path, role: str) -> Path:
    return tokens_dir(data_dir) / f"{role}.token"


def resolve_token(token_file: str | None = None, data_dir: str | None = None, role: str = "admin") -> str | None:
    if token_file:
        return Path(token_file).read_text().strip() or None
    env = os.environ.get(TOKEN_ENV, "").strip()
    if env:
        return env
    base = data_dir or os.environ.get(DATA_DIR_ENV) or DEFAULT_DATA_DIR
    path = local_token_path(base, role)
    try:
        return path.read_text().strip() or None
    except OSError:
        return None


@dataclass(frozen=True)
class TlsOptions:
    """Client side of TLS: the CA that signed the controller's certificate, and for mutual TLS
    this caller's certificate and key. `server_name` overrides the name checked in the
    controller's certificate (when dialing an address the certificate does not name)."""

    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    server_name: str | None = None

    @property
    def enabled(self) -> bool:
        return bool(self.ca_file or self.cert_file)

    def credentials(self) -> grpc.ChannelCredentials:
        def read(p: str | None) -> bytes | None:
            return Path(p).read_bytes() if p else None

        return grpc.ssl_channel_credentials(root_certificates=read(self.ca_file), private_key=read(self.key_file),
                                            certificate_chain=read(self.cert_file))


class _Bearer:
    """Adds `authorization: Bearer <token>` to a call's metadata."""

    def __init__(self, token: str) -> None:
        self._header = ("authorization", f"Bearer {token}")

    def _details(self, d: grpc.aio.ClientCallDetails) -> grpc.aio.ClientCallDetails:
        md = list(d.metadata or []) + [self._header]
        return grpc.aio.ClientCallDetails(d.method, d.timeout, md, d.credentials, d.wait_for_ready)


# grpc.aio files each interceptor under one call type only (the first base class it
# matches), so each call type gets an interceptor object of its own.
class _BearerUnaryUnary(_Bearer, grpc.aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(self, continuation, client_call_details, request):
        return await continuation(self._details(client_call_details), request)


class _BearerUnaryStream(_Bearer, grpc.aio.UnaryStreamClientInterceptor):
    async def intercept_unary_stream(self, continuation, client_call_details, request):
        return await continuation(self._details(client_call_details), request)


class _BearerStreamStream(_Bearer, grpc.aio.StreamStreamClientInterceptor):
    async def intercept_stream_stream(self, continuation, client_call_details, request_iterator):
        return await continuation(self._details(client_call_details), request_iterator)


MESSAGE_OPTIONS = [("grpc.max_send_message_length", 64 * 1024 * 1024),
                   ("grpc.max_receive_message_length", 64 * 1024 * 1024)]


def open_channel(address: str, token: str | None = None, tls: TlsOptions | None = None,
                 options: Sequence[tuple[str, object]] = ()) -> grpc.aio.Channel:
    opts = list(MESSAGE_OPTIONS) + list(options)
    interceptors = [cls(token) for cls in (_BearerUnaryUnary, _BearerUnaryStream, _BearerStreamStream)] if token \
        else None
    if tls is not None and tls.enabled:
        if tls.server_name:
            opts.append(("grpc.ssl_target_name_override", tls.server_name))
        return grpc.aio.secure_channel(address, tls.credentials(), options=opts, interceptors=interceptors)
    return grpc.aio.insecure_channel(address, options=opts, interceptors=interceptors)


def add_credential_args(p: argparse.ArgumentParser) -> None:
    """The options every CLI command that dials the controller takes (qlm worker too)."""
    p.add_argument("--token-file", help="file holding the bearer token (default: $QLM_TOKEN, else the token "
                                        "`qlm serve` wrote under --data-dir)")
    p.add_argument("--data-dir", help="the data folder of a local `qlm serve` (default: $QLM_DATA_DIR or var/qlm)")
    p.add_argument("--tls-ca", help="CA of the controller's certificate (TLS on)")
    p.add_argument("--tls-cert", help="this caller's certificate (mutual TLS)")
    p.add_argument("--tls-key", help="key of --tls-cert")
    p.add_argument("--tls-server-name", help="name to check in the controller's certificate")


def tls_from_args(args: argparse.Namespace) -> TlsOptions | None:
    if not (args.tls_ca or args.tls_cert):
        return None
    return TlsOptions(args.tls_ca, args.tls_cert, args.tls_key, args.tls_server_name)
