"""Who is calling, and may they: bearer tokens with roles, checked in one place.

Every RPC passes through `Authenticator.check` (the gRPC interceptor calls it; an HTTP
front door calls the same method with its `Authorization` header). A caller is
identified by its bearer token (`authorization: Bearer <token>` metadata) or, when the
server requires client certificates (mutual TLS), by a certificate whose common name is
`worker:<id>`. Tokens are kept only as SHA-256 digests and never logged.

Roles: `client` (Client API, with a tenant name for quotas), `admin` (Admin API and the
Client API), `worker` (WorkerLink). A worker token names the worker id it grants, or a
pattern ending in `*` (`local-*`): a worker's identity comes from its credential, not
from the id it sends.
"""

from __future__ import annotations

import contextvars
import enum
import fnmatch
import hashlib
import hmac
import os
import secrets
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

TOKEN_BYTES = 32
CLIENT_SERVICE = "qlmserve.v1.Client"
ADMIN_SERVICE = "qlmserve.v1.Admin"
WORKER_SERVICE = "qlmserve.v1.WorkerLink"
WORKER_CN_PREFIX = "worker:"


class Role(str, enum.Enum):
    CLIENT = "client"
    ADMIN = "admin"
    WORKER = "worker"


# Which roles may call each service; services not listed (health, reflection) are public.
ROLES_OF_SERVICE: dict[str, frozenset[Role]] = {
    CLIENT_SERVICE: frozenset({Role.CLIENT, Role.ADMIN}),
    ADMIN_SERVICE: frozenset({Role.ADMIN}),
    WORKER_SERVICE: frozenset({Role.WORKER}),
}


class Unauthenticated(PermissionError):
    """No credential, or one the controller does not know (gRPC UNAUTHENTICATED)."""


class PermissionDenied(PermissionError):
    """A known credential without the role the call needs (gRPC PERMISSION_DENIED)."""


@dataclass(frozen=True)
class Principal:
    role: Role | None  # None: anonymous
    name: str  # tenant (client), admin name, or the worker id / pattern a worker token grants

    @property
    def anonymous(self) -> bool:
        return self.role is None

    def worker_id_for(self, asked: str) -> str:
        """The worker id this credential grants when the worker asks for `asked` ("" = any)."""
        if self.name.endswith("*"):
            if not asked:
                raise PermissionDenied("this worker credential names a pattern: the worker must send its id")
            if not fnmatch.fnmatchcase(asked, self.name):
                raise PermissionDenied("field 'hello.worker_id': not granted by this worker credential")
            return asked
        if asked and asked != self.name:
            raise PermissionDenied("field 'hello.worker_id': not granted by this worker credential")
        return self.name


# The caller of the RPC being served (set by the interceptor, read by servicers).
current_principal: contextvars.ContextVar[Principal | None] = contextvars.ContextVar("qlm_principal", default=None)


def digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def new_token() -> str:
    return secrets.token_urlsafe(TOKEN_BYTES)


@dataclass(frozen=True)
class TokenEntry:
    role: Role
    name: str
    sha256: str


class TokenBook:
    """Known tokens by digest. File format, one per line: `ROLE NAME TOKEN` (`#` comments);
    the token may be given as `sha256:<hex>` so the file need not hold it in clear."""

    def __init__(self, entries: Iterable[TokenEntry] = ()) -> None:
        self._by_digest: dict[str, TokenEntry] = {}
        for e in entries:
            self.add(e)

    def add(self, e: TokenEntry) -> None:
        self._by_digest[e.sha256] = e

    def __len__(self) -> int:
        return len(self._by_digest)

    def lookup(self, token: str) -> TokenEntry | None:
        d = digest(token)
        e = self._by_digest.get(d)
        # compare_digest: the dict lookup is by digest already; this keeps the final check constant-time.
        return e if e is not None and hmac.compare_digest(e.sha256, d) else None

    @classmethod
    def parse(cls, text: str, source: str = "<tokens>") -> TokenBook:
        book = cls()
        for n, raw in enumerate(text.splitlines(), 1):
            line = raw.split("#", 1)[0].strip()
            if not line:
                continue
            parts = line.split()
            if len(parts) != 3:
                raise ValueError(f"{source}:{n}: expected 'ROLE NAME TOKEN'")  # never echo the line: it holds a token
            role, name, tok = parts
            try:
                r = Role(role)
            except ValueError:
                raise ValueError(f"{source}:{n}: role must be one of {[x.value for x in Role]}") from None
            sha = tok[len("sha256:"):] if tok.startswith("sha256:") else digest(tok)
            book.add(TokenEntry(r, name, sha))
        return book

    @classmethod
    def load(cls, path: str | Path) -> TokenBook:
        return cls.parse(Path(path).read_text(), source=str(path))


class Authenticator:
    """Decides who a caller is and whether it may call a service."""

    def __init__(self, book: TokenBook, anonymous_clients: Callable[[], bool], anonymous_tenant: Callable[[], str],
                 trust_worker_certificates: bool = False) -> None:
        self.book = book
        self.anonymous_clients = anonymous_clients
        self.anonymous_tenant = anonymous_tenant
        self.trust_worker_certificates = trust_worker_certificates

    def identify(self, authorization: str | None, peer_common_name: str | None = None) -> Principal:
        if authorization:
            scheme, _, token = authorization.strip().partition(" ")
            if scheme.lower() != "bearer" or not token.strip():
                raise Unauthenticated("the authorization metadata must read 'Bearer <token>'")
            e = self.book.lookup(token.strip())
            if e is None:
                raise Unauthenticated("unknown token")
            return Principal(e.role, e.name)
        if self.trust_worker_certificates and peer_common_name and peer_common_name.startswith(WORKER_CN_PREFIX):
            return Principal(Role.WORKER, peer_common_name[len(WORKER_CN_PREFIX):])
        return Principal(None, self.anonymous_tenant())

    def authorize(self, p: Principal, service: str) -> None:
        roles = ROLES_OF_SERVICE.get(service)
        if roles is None:
            return  # health checking and reflection
        if p.anonymous:
            if service == CLIENT_SERVICE and self.anonymous_clients():
                return
            raise Unauthenticated(f"{service.rsplit('.', 1)[-1]} needs a token ('authorization: Bearer <token>')")
        if p.role not in roles:
            raise PermissionDenied(f"a {p.role.value} token may not call {service.rsplit('.', 1)[-1]}")

    def check(self, service: str, authorization: str | None, peer_common_name: str | None = None,
              unknown_as_anonymous: bool = False) -> Principal:
        """`unknown_as_anonymous` (the HTTP API): the OpenAI SDKs always send some key, so
        where the policy takes anonymous clients a key it does not know counts as none
        (what vLLM does without --api-key). It grants nothing anonymous callers lack."""
        try:
            p = self.identify(authorization, peer_common_name)
        except Unauthenticated:
            if not (unknown_as_anonymous and service == CLIENT_SERVICE and self.anonymous_clients()):
                raise
            p = Principal(None, self.anonymous_tenant())
        self.authorize(p, service)
        return p


def service_of(method: str) -> str:
    """'/qlmserve.v1.Client/Submit' -> 'qlmserve.v1.Client'."""
    return method.lstrip("/").split("/", 1)[0]


def write_secret(path: Path, text: str) -> None:
    """Write a file only its owner can read (mode 0600 from creation, never wider)."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.chmod(path, 0o600)
