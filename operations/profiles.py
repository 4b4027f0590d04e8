"""Cost models from published GPU and model figures (configs/gpu_profiles.yaml).

`load_profile("A100-80GB", "llama-2-7b")` returns the `WorkerProfile` of that pair,
derived by the formulas documented at the top of the YAML file (or taken from its
`overrides` section when a measured profile exists). A YAML file holding just the
WorkerProfile fields (a measured profile, e.g. under configs/profiles/) loads with
`load_profile_file(path)`.
"""

from __future__ import annotations

import dataclasses
from functools import lru_cache
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field

from qlmserve.operations.costs import WorkerProfile
from qlmserve.yaml_config import parse_yaml_model

DEFAULT_GPU_PROFILES = Path(__file__).resolve().parent.parent / "configs" / "gpu_profiles.yaml"


class ProfileError(ValueError):
    """An invalid or unknown profile; the message names the file and the field."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class GpuSpec(_Strict):
    memory_bytes: int = Field(gt=0)
    """Device memory of one GPU."""
    hbm_bytes_per_s: float = Field(gt=0)
    """Device memory bandwidth."""
    fp16_flops: float = Field(gt=0)
    """Dense FP16/BF16 tensor throughput."""
    pcie_bytes_per_s: float = Field(gt=0)
    """Host link bandwidth, one direction."""
    mbu: float | None = Field(default=None, gt=0, le=1)
    """This GPU's decode bandwidth utilisation when measured; efficiency.mbu otherwise."""


class ModelArch(_Strict):
    params: float = Field(gt=0)
    """Parameter count."""
    active_params: float | None = Field(default=None, gt=0)
    """Parameters one token passes through (mixture of experts); `params` when absent."""
    weight_bytes: int = Field(gt=0)
    """Bytes of the served weights (a model swap moves these)."""
    num_layers: int = Field(ge=1)
    """Decoder layers (expert-level preemption pauses at their boundaries)."""
    kv_bytes_per_token: int = Field(gt=0)
    """KV-cache bytes of one token over all layers."""
    max_context: int = Field(ge=16)
    """Longest prompt + output."""


class Efficiency(_Strict):
    mbu: float = Field(gt=0, le=1)
    """Memory-bandwidth utilisation of a decode pass."""
    mfu: float = Field(gt=0, le=1)
    """FLOPs utilisation of prefill matmuls."""
    pcie_efficiency: float = Field(gt=0, le=1)
    """Sustained share of the PCIe link for large copies."""
    disk_bytes_per_s: float = Field(gt=0)
    """Cold model load rate, disk to device."""
    load_fixed_s: float = Field(ge=0)
    """Fixed cost of a model swap."""
    gpu_memory_utilization: float = Field(gt=0, le=1)
    """Share of device memory for weights and KV cache."""
    tensor_parallel_efficiency: float = Field(gt=0, le=1)
    """Scaling of bandwidth and FLOPs when a worker spans several GPUs."""


class GpuProfileTable(_Strict):
    gpus: dict[str, GpuSpec]
    models: dict[str, ModelArch]
    efficiency: Efficiency
    overrides: dict[str, dict[str, float | int | str]] = {}

    def gpu(self, name: str) -> GpuSpec:
        try:
            return self.gpus[name]
        except KeyError:
            raise ProfileError(f"unknown gpu {name!r}; known: {', '.join(sorted(self.gpus))}") from None

    def model(self, name: str) -> ModelArch:
        try:
            return self.models[name]
        except KeyError:
            raise ProfileError(f"unknown model {name!r}; known: {', '.join(sorted(self.models))}") from None

    def _scale(self, tp: int) -> float:
        return tp * (self.efficiency.tensor_parallel_efficiency if tp > 1 else 1.0)

    def profile(self, gpu: str, model: str, tensor_parallel: int = 1) -> WorkerProfile:
        """The derived (or overridden) WorkerProfile of `model` on `tensor_parallel` x `gpu`."""
        if tensor_parallel < 1:
            raise ProfileError(f"tensor_parallel must be >= 1, got {tensor_parallel}")
        g, m, e = self.gpu(gpu), self.model(model), self.efficiency
        key = f"{gpu}/{model}" if tensor_parallel == 1 else f"{gpu}/{model}/tp{tensor_parallel}"
        s = self._scale(tensor_parallel)
        bw = g.hbm_bytes_per_s * s * (g.mbu if g.mbu is not None else e.mbu)
        flops = g.fp16_flops * s * e.mfu
        per_token = 2.0 * (m.active_params or m.params) / flops
        decode_base = m.weight_bytes / bw
        link = g.pcie_bytes_per_s * e.pcie_efficiency * tensor_parallel  # one link per GPU
        derived = WorkerProfile(
            prefill_base_s=decode_base,
            prefill_per_token_s=per_token,
            decode_base_s=decode_base,
            decode_per_seq_s=per_token,
            decode_per_ctx_token_s=m.kv_bytes_per_token / bw,
            kv_bytes_per_token=m.kv_bytes_per_token,
            kv_swap_bytes_per_s=link,
            load_cold_bytes_per_s=e.disk_bytes_per_s,
            load_warm_bytes_per_s=link,
            load_fixed_s=e.load_fixed_s,
            name=key,
        )
        over = self.overrides.get(key)
        if over:
            fields = {f.name for f in dataclasses.fields(WorkerProfile)}
            unknown = set(over) - fields
            if unknown:
                raise ProfileError(f"overrides[{key!r}]: unknown WorkerProfile fields {sorted(unknown)}")
            derived = dataclasses.replace(derived, **over)
        return derived

    def kv_capacity_tokens(self, gpu: str, model: str, tensor_parallel: int = 1) -> int:
        """KV-cache tokens that fit beside the weights (0 when the weights do not fit)."""
        g, m = self.gpu(gpu), self.model(model)
        budget = g.memory_bytes * tensor_parallel * self.efficiency.gpu_memory_utilization - m.weight_bytes
        return max(0, int(budget // m.kv_bytes_per_token))


def parse_gpu_profiles(text: str, source: str = "<string>") -> GpuProfileTable:
    table, _ = parse_yaml_model(text, GpuProfileTable, source, ProfileError, what="a GPU profile table")
    return table


@lru_cache(maxsize=8)
def _load_table(path: str, mtime: float) -> GpuProfileTable:
    return parse_gpu_profiles(Path(path).read_text(), source=path)


def load_gpu_profiles(path: str | Path | None = None) -> GpuProfileTable:
    p = Path(path) if path is not None else DEFAULT_GPU_PROFILES
    try:
        mtime = p.stat().st_mtime
    except OSError as exc:
        raise ProfileError(f"{p}: cannot read GPU profiles: {exc.strerror}") from None
    return _load_table(str(p), mtime)


def load_profile(gpu: str, model: str, path: str | Path | None = None, tensor_parallel: int = 1) -> WorkerProfile:
    """The WorkerProfile of `model` on `gpu` from configs/gpu_profiles.yaml (or `path`)."""
    return load_gpu_profiles(path).profile(gpu, model, tensor_parallel)


def load_profile_file(path: str | Path) -> WorkerProfile:
    """A YAML mapping of WorkerProfile fields (optionally under a `profile:` key)."""
    p = Path(path)
    try:
        data = yaml.safe_load(p.read_text())
    except OSError as exc:
        raise ProfileError(f"{p}: cannot read profile: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise ProfileError(f"{p}: invalid YAML: {exc}") from None
    if isinstance(data, dict) and isinstance(data.get("profile"), dict):
        data = data["profile"]
    if not isinstance(data, dict):
        raise ProfileError(f"{p}: a profile must be a mapping of WorkerProfile fields")
    fields = {f.name: f for f in dataclasses.fields(WorkerProfile)}
    unknown = set(data) - set(fields)
    if unknown:
        raise ProfileError(f"{p}: unknown WorkerProfile fields {sorted(unknown)}; valid: {sorted(fields)}")
    for k, v in data.items():
        if k != "name" and (not isinstance(v, (int, float)) or v < 0):
            raise ProfileError(f"{p}: field '{k}' must be a number >= 0, got {v!r}")
    return WorkerProfile(**data)
