"""Admission under overload: which limits a submission must fit, and how long a refused
caller should wait before trying again.

The limits are checked inside Redis by the SUBMIT script (store.AdmissionArgs), against
queued-request and queued-token counters that every transition keeps, so that several
controllers share one view. This module only chooses the limits:

  - per class: `slo_classes.<c>.admission.max_queued` / `max_queued_tokens`;
  - per tenant: `access.tenants.<t>` (or `access.default_quota`): queued requests,
    queued tokens and tokens per minute;
  - overall: `overload.max_queued` / `max_queued_tokens`. Best-effort classes are refused
    once the queue holds `overload.best_effort_share` of these, latency-sensitive ones only
    at the full limit: best-effort work is shed first.

The retry hint is the time the fleet needs to drain the excess at the rate requests have
been leaving the queue lately (`DrainRate`), within the policy's bounds.
"""

from __future__ import annotations

import math
import time

from qlmserve.controller.exceptions import Overloaded
from qlmserve.controller.policy import PolicyConfig, SloClass
from qlmserve.controller.store import AdmissionArgs


class DrainRate:
    """Requests leaving the queue per second, smoothed (fed with the running count of
    finished requests, e.g. from Redis class counters, by whoever ticks)."""

    def __init__(self, half_life_s: float = 10.0) -> None:
        self.half_life_s = half_life_s
        self.per_s = 0.0
        self._last: tuple[float, float] | None = None

    def observe(self, finished_total: float, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        if self._last is not None:
            dt = now - self._last[1]
            if dt > 0:
                rate = max(0.0, finished_total - self._last[0]) / dt
                a = 1 - math.exp(-dt * math.log(2) / self.half_life_s)
                self.per_s += a * (rate - self.per_s)
        self._last = (finished_total, now)


def limits_for(policy: PolicyConfig, slo: SloClass, tenant: str) -> AdmissionArgs:
    quota = policy.access.quota(tenant)
    ov = policy.overload
    share = 1.0 if slo.latency_sensitive else ov.best_effort_share
    return AdmissionArgs(
        class_requests=slo.admission.max_queued,
        class_tokens=slo.admission.max_queued_tokens or 0,
        tenant_requests=quota.max_queued or 0,
        tenant_tokens=quota.max_queued_tokens or 0,
        all_requests=max(1, int(ov.max_queued * share)),
        all_tokens=max(1, int(ov.max_queued_tokens * share)) if ov.max_queued_tokens else 0,
        tenant_tokens_per_minute=quota.tokens_per_minute or 0,
    )


def refusal(policy: PolicyConfig, cls_name: str, limit: str, queued: int, cap: int, drain: DrainRate,
            now: float) -> Overloaded:
    """The error for a refused submission, with when to retry."""
    ov = policy.overload
    if limit == "tenant tokens per minute":
        wait = 60.0 - (now % 60.0)  # the next minute's budget
    else:
        excess = max(1, queued - cap + 1)
        if limit.endswith("tokens"):
            excess = 1  # token counts drain with whole requests; one request's worth is the unit
        wait = excess / drain.per_s if drain.per_s > 0 else ov.max_retry_after_s
    wait = min(ov.max_retry_after_s, max(ov.min_retry_after_s, wait))
    return Overloaded(f"class '{cls_name}': {limit} limit reached ({queued} of {cap}); retry in {wait:.1f} s",
                      retry_after_s=wait)
