"""A model as the policy names it: where its weights are, its family, its context and
the prior of its output lengths. The controller's policy (controller/policy.py) and the
engines (backends/) read the same spec."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class OutputPrior(_Strict):
    mean: float = Field(default=128.0, gt=0)
    """Prior mean of output tokens per request until enough requests have finished."""
    std: float = Field(default=128.0, ge=0)
    """Prior standard deviation of output tokens."""
    weight: int = Field(default=20, ge=0)
    """How many observed requests the prior counts as (a pseudo-count)."""


class ModelSpec(_Strict):
    path: str | None = None
    """Local folder for `from_pretrained` (HF engine); relative paths resolve against the policy file."""
    kind: Literal["mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "llama"] = "mixtral"
    """Model family, used to build tiny models and choose the engine's layer walk."""
    max_context: int = Field(default=2048, ge=16)
    """Longest prompt + output the model serves."""
    weight_bytes: int | None = Field(default=None, ge=0)
    """Size of the weights; used by the model-swap cost model when the worker has not measured it."""
    output_prior: OutputPrior = OutputPrior()
    tiny_seed: int | None = None
    """When set and `path` holds no model yet, build a tiny random-weight model of `kind`
    there with this seed (demos and tests; real weights never need it)."""
    tiny_layers: int = Field(default=8, ge=1)
    """Decoder layers of that tiny model."""
