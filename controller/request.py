"""A request's lifecycle: one str enum (readable in Redis and over gRPC) and one class
that owns the request's state."""

from __future__ import annotations

import enum
import hashlib
import json
from dataclasses import dataclass, field


class RequestStatus(str, enum.Enum):
    QUEUED = "queued"  # durable in Redis, waiting in its group
    RUNNING = "running"  # a worker holds it (KV on the device)
    SWAPPED = "swapped"  # a worker holds it, KV in host memory
    FINISHED = "finished"
    CANCELLED = "cancelled"
    FAILED = "failed"

    def is_finished(self) -> bool:
        return self in _FINISHED


_FINISHED = frozenset({RequestStatus.FINISHED, RequestStatus.CANCELLED, RequestStatus.FAILED})


@dataclass
class Sampling:
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()

    def to_json(self) -> str:
        return json.dumps({"temperature": self.temperature, "top_p": self.top_p, "seed": self.seed,
                           "stop_token_ids": list(self.stop_token_ids)})

    @classmethod
    def from_json(cls, text: str) -> Sampling:
        d = json.loads(text) if text else {}
        return cls(temperature=d.get("temperature", 0.0), top_p=d.get("top_p", 1.0), seed=d.get("seed"),
                   stop_token_ids=tuple(d.get("stop_token_ids", ())))


@dataclass
class Request:
    request_id: str
    model: str
    slo_class: str
    prompt_token_ids: list[int]
    max_tokens: int
    arrival: float
    ttft_slo_s: float
    latency_sensitive: bool = False
    priority: int = 0
    sampling: Sampling = field(default_factory=Sampling)
    user_id: str = ""
    tenant: str = ""  # whose quota it counts against (from the caller's credential)
    length_band: int = 0  # its prompt's length band at submission (controller/length_band.py)
    status: RequestStatus = RequestStatus.QUEUED
    group_id: str = ""
    worker_id: str = ""
    attempts: int = 0
    generated: int = 0
    first_token_at: float | None = None
    finish_at: float | None = None
    finish_reason: str = ""
    error: str = ""

    @property
    def prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def cost(self) -> int:
        """Tokens it may occupy (prompt + max_tokens): what admission limits count."""
        return self.prompt_tokens + self.max_tokens

    def fingerprint(self) -> str:
        """Digest of what the caller asked for: a retry under one idempotency key must ask
        for the same thing."""
        return self._fingerprint(json.dumps(self.prompt_token_ids), self.sampling.to_json())

    def to_redis(self) -> dict[str, str]:
        """Fields written once at submission; status fields change through Lua scripts."""
        return self._fields(json.dumps(self.prompt_token_ids), self.sampling.to_json())

    def submission(self) -> tuple[str, dict[str, str]]:
        """fingerprint() and to_redis() at once, the prompt turned into text once (by the C
        JSON encoder): every submission pays for this in the controller's event loop."""
        prompt, sampling = json.dumps(self.prompt_token_ids), self.sampling.to_json()
        return self._fingerprint(prompt, sampling), self._fields(prompt, sampling)

    def _fingerprint(self, prompt_json: str, sampling: str) -> str:
        # Byte for byte the JSON of [model, slo_class, prompt ids, max_tokens, sampling,
        # user_id, tenant] that earlier versions digested: stored fingerprints stay valid.
        head = json.dumps([self.model, self.slo_class])[:-1]
        tail = json.dumps([self.max_tokens, sampling, self.user_id, self.tenant])[1:]
        body = f"{head}, {prompt_json}, {tail}"
        return hashlib.sha256(body.encode()).hexdigest()[:32]

    def _fields(self, prompt_json: str, sampling: str) -> dict[str, str]:
        return {
            "id": self.request_id,
            "model": self.model,
            "slo_class": self.slo_class,
            "prompt": prompt_json[1:-1].replace(", ", ","),  # "12,7,9"
            "prompt_tokens": str(self.prompt_tokens),
            "max_tokens": str(self.max_tokens),
            "arrival": repr(self.arrival),
            "ttft_slo": repr(self.ttft_slo_s),
            "ls": "1" if self.latency_sensitive else "0",
            "priority": str(self.priority),
            "sampling": sampling,
            "user_id": self.user_id,
            "tenant": self.tenant,
            "cost": str(self.cost),
            "length_band": str(self.length_band),
            "status": self.status.value,
            "group_id": self.group_id,
            "worker_id": "",
            "attempts": "0",
            "generated": "0",
        }

    @classmethod
    def from_redis(cls, h: dict[str, str]) -> Request:
        def f(key: str) -> float | None:
            v = h.get(key)
            return float(v) if v not in (None, "") else None

        prompt = h.get("prompt", "")
        return cls(
            request_id=h["id"],
            model=h["model"],
            slo_class=h["slo_class"],
            prompt_token_ids=[int(x) for x in prompt.split(",")] if prompt else [],
            max_tokens=int(h["max_tokens"]),
            arrival=float(h["arrival"]),
            ttft_slo_s=float(h["ttft_slo"]),
            latency_sensitive=h.get("ls") == "1",
            priority=int(h.get("priority", "0")),
            sampling=Sampling.from_json(h.get("sampling", "")),
            user_id=h.get("user_id", ""),
            tenant=h.get("tenant", ""),
            length_band=int(h.get("length_band", "0")),
            status=RequestStatus(h.get("status", "queued")),
            group_id=h.get("group_id", ""),
            worker_id=h.get("worker_id", ""),
            attempts=int(h.get("attempts", "0")),
            generated=int(h.get("generated", "0")),
            first_token_at=f("first_token_at"),
            finish_at=f("finish_at"),
            finish_reason=h.get("finish_reason", ""),
            error=h.get("error", ""),
        )

