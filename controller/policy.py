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
    max_queued: int = Field(default=100_000, ge=1)
    """Requests of this class that may wait at once; past it Submit answers RESOURCE_EXHAUSTED."""
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
    admission: AdmissionLimits = AdmissionLimits()


class PlannerConfig(_Strict):
    policy: str = "qlm"
    """Registry name: qlm, edf, fcfs, fcfs-oblivious, sjf, priority."""
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
    drop_hopeless: bool = False
    """Serve requests that can no longer meet their SLO last (named in results when on)."""
    ls_fast_path: bool = True
    """QLM: latency-sensitive groups at the head of a worker's queue always get preemption
    (expert-level on MoE workers, iteration-level on dense ones; LS requests join beyond the
    batch limit), not only when they would miss their SLO: their TTFT is kept as low as the
    worker allows."""


class GroupingConfig(_Strict):
    window_s: float = Field(default=2.0, gt=0)
    """Requests of one (model, class) arriving within this window share a group."""
    max_group_size: int = Field(default=64, ge=1)
    """A group is closed once it holds this many requests."""


class PolicyConfig(_Strict):
    tick_interval_ms: float = Field(default=100.0, gt=0)
    """How often the controller re-plans (it also re-plans when a request at risk arrives)."""
    heartbeat_timeout_s: float = Field(default=5.0, gt=0)
    """A worker silent this long is declared dead and its requests go back to the queue."""
    max_running_per_worker: int = Field(default=16, ge=1)
    """Requests the controller hands a worker at once (its batch); the rest wait in Redis."""
    max_prefill_tokens: int = Field(default=DEFAULT_MAX_PREFILL_TOKENS, ge=1)
    """Prompt tokens one iteration may prefill; longer prompts are prefilled in chunks over
    several iterations (latency-sensitive ones first: operations/batching.py)."""
    slo_classes: dict[str, SloClass]
    models: dict[str, ModelSpec]
    planner: PlannerConfig = PlannerConfig()
    grouping: GroupingConfig = GroupingConfig()
    default_slo_class: str | None = None
    """Class of a request that names none; must be one of slo_classes."""

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
