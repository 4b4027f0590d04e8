"""The YAML SLO policy: typed, validated, and loaded only here.

Downstream code receives a `PolicyConfig`, never a dict. Errors name the file, the
line and the field (`PolicyError`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from qlmserve.operations.batching import DEFAULT_MAX_PREFILL_TOKENS
from qlmserve.operations.model_spec import ModelSpec, OutputPrior
from qlmserve.operations.ops import OPERATION_NAMES, OperationName
from qlmserve.yaml_config import parse_yaml_model, read_config

__all__ = ["OPERATION_NAMES", "ModelSpec", "OperationName", "OutputPrior"]  # re-exported for policy readers



class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class AdmissionLimits(_Strict):
    max_queued: int = Field(default=2_000, ge=1)
    """Requests of this class that may wait at once; past it Submit answers RESOURCE_EXHAUSTED
    with a retry hint."""
    max_queued_tokens: int | None = Field(default=None, ge=1)
    """Tokens (prompt + max_tokens) of this class that may wait at once; None: no limit."""
    max_prompt_tokens: int | None = Field(default=None, ge=1)
    """Longest prompt accepted for this class (the model's own context limit applies too)."""
    max_tokens: int | None = Field(default=None, ge=1)
    """Largest max_tokens a request of this class may ask for."""


class SloClass(_Strict):
    ttft_s: float = Field(gt=0)
    """Time-to-first-token target, seconds from arrival."""
    tpot_s: float | None = Field(default=None, gt=0)
    """Optional time-per-output-token target, seconds."""
    priority: int = 0
    """Higher is more urgent: strict-priority ordering and who may preempt whom."""
    weight: float = Field(default=1.0, gt=0)
    """Weight of one request of this class in the planner's objective."""
    latency_sensitive: bool = False
    """Latency-sensitive requests may preempt best-effort ones inside a worker."""
    on_miss: Literal["run_late", "fail_fast"] = "run_late"
    """A request of this class still waiting when its TTFT target has passed can no longer
    meet it: `run_late` serves it anyway (it counts as a miss; under QLM's drop_hopeless after
    the requests that can still meet theirs), `fail_fast` fails it at once
    (status FAILED, "TTFT target missed before it started"), freeing the capacity for
    requests that can still meet theirs."""
    admission: AdmissionLimits = AdmissionLimits()
    request_order: Literal["fcfs", "sjf", "priority_aging"] = "fcfs"
    """Order of the requests inside a group of this class (controller/request_order.py):
    arrival, shortest prompt first, or shortest first with requests waiting past `aging_s`
    promoted (oldest first)."""
    aging_s: float | None = Field(default=None, ge=0)
    """priority_aging: a request waiting this long is promoted; default planner.aging_s."""


class PlannerConfig(_Strict):
    policy: str = "qlm"
    """Registry name: qlm, edf, fcfs, fcfs-oblivious, sjf, priority, backlog, load-aware,
    least-loaded, round-robin."""
    operations: list[OperationName] = list(OPERATION_NAMES)
    """Operations the planner may use; leave some out to measure their contribution."""
    solve_budget_ms: float = Field(default=50.0, gt=0)
    """Time budget of one solve; past it the best plan so far or the EDF heuristic stands."""
    method: Literal["chance", "saa"] = "chance"
    """Chance-constrained MILP (normal quantile) or sample-average approximation."""
    beta: float = Field(default=0.9, gt=0, lt=1)
    """Quantile of the waiting-time distribution a plan is judged at."""
    scenarios: int = Field(default=16, ge=1)
    """Output-length scenarios for method=saa."""
    aging_s: float = Field(default=5.0, ge=0)
    """SJF: a request waiting longer than this is promoted (priority aging)."""
    max_pause_s: float = Field(default=2.0, ge=0)
    """Longest a best-effort batch may stay paused by expert-level preemption."""
    length_half_life_s: float = Field(default=300.0, ge=0)
    """Output lengths learned online forget with this half-life (seconds), so that the
    estimator follows a workload whose outputs drift; 0 keeps every observation forever."""
    drop_hopeless: bool = True
    """QLM: serve work that can no longer meet its SLO last, behind every request that still
    can (run late; a class with on_miss: fail_fast fails it instead): groups that cannot
    meet anywhere go to the tail of their queue, and a request whose first token can no
    longer come by its deadline waits behind the on-time ones of its worker
    (Plan.late_last); a latency-sensitive one too (a prompt whose prefill alone outlasts
    its target). Serving the late ones first spends capacity on misses and makes the next
    ones late: on ls2 at the FCFS-50% load QLM met 79.0% without this and 81.7% with it
    (EDF alone 45.2%, EDF serving late requests last 81.6%); on ls2m at that load the 56
    interactive prompts out of reach of 2 s need 157 s of prefill, a sixth of the fleet's
    960 worker-seconds of the window, which serving them first took from requests on time."""
    shed_costly: bool = True
    """QLM, with drop_hopeless: when a model's fleet cannot serve its waiting work and the
    work the last 90 s of arrivals say is coming before their deadlines, the costliest
    best-effort groups (the most work per unit of weight) are served last, as hopeless
    ones are (Moore-Hodgson's rule on the fleet in the fluid limit:
    controller/policies/qlm/shed.py); only where most of the fleet's work is prefill,
    known at arrival. On ls2m (Mooncake) at the FCFS-50% load `qlm bench --scenario ls2m`
    measured QLM at 84.7% with it (commit 7df3805), 75.3% without (158d838)."""
    model_placement: Literal["program", "rule"] = "program"
    """QLM: who decides which model each worker serves. "program": the stochastic program
    picks model swaps per worker (a worker with no kept queue drains, clears or loads);
    "rule": the backlog rule (controller/policies/placement.py) as a stage before the
    program, which then places each model's groups on that model's workers. On mm3
    (window 120, load 1.5) "program" met 64.6%, "rule" 57.6%, the backlog baseline 41.2%."""
    switch_backlog: float | None = Field(default=None, gt=0)
    """Model placement (backlog rule): a worker moves to another model when that model's
    waiting requests beyond its free slots, per worker serving it, exceed this; default
    the batch (max_running_per_worker)."""
    switch_cooldown_s: float = Field(default=60.0, ge=0)
    """A worker that moved to another model stays at least this long (hysteresis)."""
    ls_fast_path: bool = True
    """QLM: latency-sensitive groups at the head of a worker's queue always get preemption
    (expert-level on MoE workers, iteration-level on dense ones; LS requests join beyond the
    batch limit), not only when they would miss their SLO: their TTFT is kept as low as the
    worker allows."""


class DispatchConfig(_Strict):
    """Engine-level dispatch (policies load-aware, least-loaded, round-robin:
    controller/policies/engine_dispatch.py)."""

    kv_saturation: float = Field(default=0.9, gt=0, le=1)
    """load-aware: KV use past this share of a worker's capacity counts as load, token for
    token (a new request waits for that much KV to free)."""
    sticky_slack_tokens: int = Field(default=4096, ge=0)
    """load-aware: a request of a session goes back to the worker that served the session
    while that worker's cost is within this many prefill tokens of the cheapest."""
    max_reported_blocks: int = Field(default=4096, ge=0)
    """Prefix-cache block ids a worker reports at most (the most recently used)."""
    prefix_block_tokens: int = Field(default=16, ge=0)
    """The controller keys each prompt by its chain of blocks of this many tokens, as the
    engines key their prefix caches (operations.prefix_cache.ENGINE_BLOCK_TOKENS), so that
    the planner counts what a worker's cache saves a request; 0: prompts are not keyed."""
    max_sessions: int = Field(default=100_000, ge=1)
    """Sessions whose last worker the planner remembers (the oldest are forgotten)."""


class GroupingConfig(_Strict):
    window_s: float = Field(default=2.0, gt=0)
    """Requests of one (model, class) arriving within this window share a group."""
    max_group_size: int = Field(default=64, ge=1)
    """A group is closed once it holds this many requests."""
    length_bands_per_octave: int = Field(default=0, ge=0, le=16)
    """Best-effort requests also group by prompt length, in bands of 1/n octave, and the
    estimator learns output lengths per band (controller/length_band.py); 0: by (model,
    class) only. 2 lifted QLM on one model (ls2: 79.4 -> 86.1% at the FCFS-50% load) but
    cost it on three (mm3: 65.3 -> 57.7% at 1.72), hence off by default. A change applies
    to requests submitted after it."""


class RequestLimits(_Strict):
    """Size limits of every string and list a client, an admin or a worker may send. Past a
    limit the RPC answers INVALID_ARGUMENT naming the field, never echoing its value."""

    max_prompt_chars: int = Field(default=200_000, ge=1)
    """Longest text prompt, in characters (the token limits of the class and model apply too)."""
    max_prompt_token_ids: int = Field(default=65_536, ge=1)
    """Most ids in a pre-tokenized prompt."""
    max_stop_token_ids: int = Field(default=16, ge=0)
    max_user_id_chars: int = Field(default=256, ge=0)
    max_idempotency_key_chars: int = Field(default=128, ge=0)
    max_name_chars: int = Field(default=128, ge=1)
    """Model, class, worker and tenant names, engine and device strings."""
    max_list_items: int = Field(default=4_096, ge=1)
    """Entries of a worker's Hello and state reports (running, waiting, models)."""
    max_error_chars: int = Field(default=2_000, ge=1)
    """Error text a worker reports for a failed request (longer text is cut)."""
    max_policy_bytes: int = Field(default=1_000_000, ge=1_000)
    """Largest policy text ReloadPolicy accepts."""
    max_submit_batch: int = Field(default=1_000, ge=1)
    """Most requests in one SubmitBatch call; past it the whole call is refused (field
    'requests'), nothing accepted. The message as a whole is also bounded (16 MiB)."""
    min_temperature: float = Field(default=1e-3, gt=0)
    """Smallest temperature above 0 (greedy); smaller ones overflow the softmax."""
    max_temperature: float = Field(default=100.0, gt=0)


class TenantQuota(_Strict):
    max_queued: int | None = Field(default=None, ge=1)
    """Requests of this tenant that may wait at once (every class together); None: no limit."""
    max_queued_tokens: int | None = Field(default=None, ge=1)
    """Tokens (prompt + max_tokens) of this tenant that may wait at once."""
    tokens_per_minute: int | None = Field(default=None, ge=1)
    """Tokens (prompt + max_tokens) this tenant may submit per minute."""


class AccessConfig(_Strict):
    anonymous_clients: bool = False
    """Let callers without a token use the Client API (as tenant `anonymous_tenant`). Admin
    and WorkerLink always need a token."""
    anonymous_tenant: str = "anonymous"
    default_quota: TenantQuota = TenantQuota(max_queued=1_000)
    """Quota of a tenant `tenants` does not name (the anonymous one included)."""
    tenants: dict[str, TenantQuota] = {}
    """Quotas by tenant name (the name a client token carries)."""

    def quota(self, tenant: str) -> TenantQuota:
        return self.tenants.get(tenant, self.default_quota)


class OverloadConfig(_Strict):
    max_queued: int = Field(default=5_000, ge=1)
    """Requests of every class that may wait at once."""
    max_queued_tokens: int | None = Field(default=None, ge=1)
    """Tokens of every class that may wait at once; None: no limit."""
    best_effort_share: float = Field(default=0.8, gt=0, le=1)
    """Best-effort (not latency-sensitive) classes are refused once the queue holds this share
    of max_queued / max_queued_tokens: they are shed before latency-sensitive ones."""
    min_retry_after_s: float = Field(default=0.5, gt=0)
    max_retry_after_s: float = Field(default=30.0, gt=0)


class PolicyConfig(_Strict):
    tick_interval_ms: float = Field(default=100.0, gt=0)
    """How often the controller re-plans (it also re-plans when a request at risk arrives)."""
    heartbeat_timeout_s: float = Field(default=5.0, gt=0)
    """A worker silent this long is declared dead and its requests go back to the queue."""
    finished_retention_s: float = Field(default=3600.0, ge=1)
    """A finished request, its tokens and its stream stay readable in Redis this long; Redis
    memory is bounded by the queue plus this window of traffic."""
    max_running_per_worker: int = Field(default=16, ge=1)
    """Requests the controller hands a worker at once (its batch); the rest wait in Redis."""
    max_prefill_tokens: int = Field(default=DEFAULT_MAX_PREFILL_TOKENS, ge=1)
    """Prompt tokens one iteration may prefill; longer prompts are prefilled in chunks over
    several iterations (latency-sensitive ones first: operations/batching.py)."""
    slo_classes: dict[str, SloClass]
    models: dict[str, ModelSpec]
    planner: PlannerConfig = PlannerConfig()
    grouping: GroupingConfig = GroupingConfig()
    dispatch: DispatchConfig = DispatchConfig()
    default_slo_class: str | None = None
    """Class of a request that names none; must be one of slo_classes."""
    access: AccessConfig = AccessConfig()
    limits: RequestLimits = RequestLimits()
    overload: OverloadConfig = OverloadConfig()

    @model_validator(mode="after")
    def _check_cross_fields(self) -> PolicyConfig:
        if not self.slo_classes:
            raise ValueError("slo_classes must name at least one class")
        if not self.models:
            raise ValueError("models must name at least one model")
        if self.default_slo_class is not None and self.default_slo_class not in self.slo_classes:
            raise ValueError(
                f"default_slo_class {self.default_slo_class!r} is not one of "
                f"{sorted(self.slo_classes)}"
            )
        return self

    def slo(self, name: str) -> SloClass:
        return self.slo_classes[name]


class PolicyError(ValueError):
    """An invalid policy file; the message names the file, line and field."""


def parse_policy(text: str, source: str = "<string>", base_dir: Path | None = None) -> PolicyConfig:
    """Parse and validate policy YAML; raises PolicyError naming source, line and field."""
    cfg, _ = parse_yaml_model(text, PolicyConfig, source, PolicyError, what="the policy")
    if base_dir is not None:
        models = {}
        for name, spec in cfg.models.items():
            if spec.path and not Path(spec.path).is_absolute():
                spec = spec.model_copy(update={"path": str((base_dir / spec.path).resolve())})
            models[name] = spec
        cfg = cfg.model_copy(update={"models": models})
    return cfg


def load_policy(path: str | Path) -> PolicyConfig:
    path = Path(path)
    return parse_policy(read_config(path, PolicyError, "policy"), source=str(path), base_dir=path.parent)
