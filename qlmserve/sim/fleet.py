"""Fleet descriptions (configs/fleet-*.yaml): typed, validated, loaded only here.

A fleet is a list of worker groups; each group names a GPU type, how many workers,
the models they may serve and the one each starts with. Speeds come from
configs/gpu_profiles.yaml (or a measured profile file), per (gpu, model), so a worker
that swaps from a 7B to a 13B model also changes speed and KV capacity.

Errors name the file, the line and the field (`FleetError`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator

from qlmserve.operations.batching import PreemptionMode
from qlmserve.operations.costs import WorkerProfile
from qlmserve.operations.profiles import GpuProfileTable, ProfileError, load_gpu_profiles, load_profile_file
from qlmserve.yaml_config import field_error, parse_yaml_model, read_config

GIB = 1 << 30


class FleetError(ValueError):
    """An invalid fleet file; the message names the file, line and field."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class WorkerGroupConfig(_Strict):
    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")
    """Worker ids are `<name>-<index>` (index zero-padded)."""
    count: int = Field(ge=1, le=100_000)
    """Workers in this group."""
    gpu: str
    """A GPU of gpu_profiles.yaml (e.g. A100-80GB)."""
    tensor_parallel: int = Field(default=1, ge=1, le=16)
    """GPUs per worker (one model instance spans them)."""
    models: list[str] = Field(min_length=1)
    """Models these workers may serve."""
    initial_models: list[str] | None = None
    """Model each worker starts with, assigned round-robin over the group; default models[0]."""
    warm_models: list[str] = []
    """Models whose weights start in host RAM (warm start)."""
    max_batch_size: int = Field(default=32, ge=1)
    """Sequences one worker runs at once."""
    host_ram_gb: float = Field(default=256.0, ge=0)
    """Host RAM for warm model copies, GiB."""
    host_kv_gb: float | None = Field(default=None, ge=0)
    """Host RAM for swapped-out KV, GiB; unlimited when absent."""
    preemption: PreemptionMode = PreemptionMode.NONE
    """Preemption mode the workers start in (the planner may change it)."""
    profile_file: str | None = None
    """A measured WorkerProfile YAML used for every model instead of the derived ones."""

    @model_validator(mode="after")
    def _check(self) -> WorkerGroupConfig:
        for field_name, names in (("initial_models", self.initial_models or []), ("warm_models", self.warm_models)):
            bad = [m for m in names if m not in self.models]
            if bad:
                raise ValueError(f"{field_name} {bad} are not in models {self.models}")
        return self


class FleetConfig(_Strict):
    name: str = "fleet"
    """Name used in reports."""
    gpu_profiles: str | None = None
    """Path of the GPU profile table, relative to the fleet file; configs/gpu_profiles.yaml by default."""
    workers: list[WorkerGroupConfig] = Field(min_length=1)

    @model_validator(mode="after")
    def _unique(self) -> FleetConfig:
        names = [g.name for g in self.workers]
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise ValueError(f"worker group names must be unique, repeated: {sorted(dup)}")
        return self


@dataclass(frozen=True)
class ModelRuntime:
    """How one model runs on one worker."""

    name: str
    profile: WorkerProfile
    kv_capacity_tokens: int
    num_layers: int
    weight_bytes: int
    max_context: int


@dataclass(frozen=True)
class WorkerSpec:
    """One simulated worker, fully resolved."""

    worker_id: str
    gpu: str
    tensor_parallel: int
    models: dict[str, ModelRuntime]
    initial_model: str
    warm_models: tuple[str, ...]
    max_batch_size: int
    host_ram_bytes: int
    host_kv_tokens: int | None  # swapped-out KV the host may hold (tokens of the initial model)
    preemption: PreemptionMode


@dataclass(frozen=True)
class Fleet:
    name: str
    workers: tuple[WorkerSpec, ...]
    source: str

    @property
    def models(self) -> list[str]:
        return sorted({m for w in self.workers for m in w.models})

    def describe(self) -> str:
        parts: dict[tuple, int] = {}
        for w in self.workers:
            key = (w.gpu if w.tensor_parallel == 1 else f"{w.tensor_parallel}x{w.gpu}", tuple(sorted(w.models)))
            parts[key] = parts.get(key, 0) + 1
        return ", ".join(f"{n} x {gpu} [{'/'.join(models)}]" for (gpu, models), n in parts.items())

    def model_bytes(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for w in self.workers:
            for m in w.models.values():
                out.setdefault(m.name, m.weight_bytes)
        return out

    def max_context(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for w in self.workers:
            for m in w.models.values():
                out[m.name] = min(out.get(m.name, m.max_context), m.max_context)
        return out


def parse_fleet(text: str, source: str = "<string>", base_dir: Path | None = None,
                profiles: GpuProfileTable | None = None) -> Fleet:
    cfg, node = parse_yaml_model(text, FleetConfig, source, FleetError, what="a fleet")
    return build_fleet(cfg, source=source, base_dir=base_dir, profiles=profiles, node=node)


def build_fleet(cfg: FleetConfig, source: str = "<config>", base_dir: Path | None = None,
                profiles: GpuProfileTable | None = None, node: yaml.Node | None = None) -> Fleet:
    base_dir = base_dir or Path.cwd()

    def fail(loc: tuple, msg: str) -> FleetError:
        return FleetError(field_error(source, node, loc, msg))

    if profiles is None:
        path = (base_dir / cfg.gpu_profiles) if cfg.gpu_profiles else None
        try:
            profiles = load_gpu_profiles(path)
        except ProfileError as exc:
            raise fail(("gpu_profiles",), str(exc)) from None
    workers: list[WorkerSpec] = []
    for gi, g in enumerate(cfg.workers):
        loc = ("workers", gi)
        if g.gpu not in profiles.gpus:
            raise fail(loc + ("gpu",), f"unknown gpu {g.gpu!r}; known: {sorted(profiles.gpus)}")
        measured = None
        if g.profile_file:
            try:
                measured = load_profile_file(base_dir / g.profile_file)
            except ProfileError as exc:
                raise fail(loc + ("profile_file",), str(exc)) from None
        runtimes: dict[str, ModelRuntime] = {}
        for mi, m in enumerate(g.models):
            if m not in profiles.models:
                raise fail(loc + ("models", mi), f"unknown model {m!r}; known: {sorted(profiles.models)}")
            arch = profiles.models[m]
            kv = profiles.kv_capacity_tokens(g.gpu, m, g.tensor_parallel)
            if kv < arch.max_context:
                raise fail(loc + ("models", mi),
                           f"{m!r} does not fit {g.tensor_parallel} x {g.gpu}: room for {kv} KV tokens, "
                           f"less than one {arch.max_context}-token context")
            prof = measured or profiles.profile(g.gpu, m, g.tensor_parallel)
            runtimes[m] = ModelRuntime(m, prof, kv, arch.num_layers, arch.weight_bytes, arch.max_context)
        host_ram = int(g.host_ram_gb * GIB)
        warm_bytes = sum(runtimes[m].weight_bytes for m in g.warm_models)
        if warm_bytes > host_ram:
            raise fail(loc + ("warm_models",), f"{warm_bytes} bytes of warm weights exceed host_ram_gb "
                                               f"({host_ram} bytes)")
        initial = g.initial_models or [g.models[0]]
        width = max(3, len(str(g.count - 1)))
        for i in range(g.count):
            first = initial[i % len(initial)]
            host_kv = None
            if g.host_kv_gb is not None:
                host_kv = int(g.host_kv_gb * GIB) // runtimes[first].profile.kv_bytes_per_token
            workers.append(WorkerSpec(
                worker_id=f"{g.name}-{i:0{width}d}", gpu=g.gpu, tensor_parallel=g.tensor_parallel,
                models=runtimes, initial_model=first, warm_models=tuple(g.warm_models),
                max_batch_size=g.max_batch_size, host_ram_bytes=host_ram, host_kv_tokens=host_kv,
                preemption=g.preemption,
            ))
    return Fleet(name=cfg.name, workers=tuple(workers), source=source)


def load_fleet(path: str | Path) -> Fleet:
    path = Path(path)
    return parse_fleet(read_config(path, FleetError, "fleet"), source=str(path), base_dir=path.parent)


def uniform_fleet(count: int, gpu: str, models: list[str], *, initial_models: list[str] | None = None,
                  max_batch_size: int = 32, tensor_parallel: int = 1, host_ram_gb: float = 256.0,
                  warm_models: list[str] | None = None, preemption: PreemptionMode = PreemptionMode.NONE,
                  name: str = "w", profiles: GpuProfileTable | None = None) -> Fleet:
    """A fleet of `count` identical workers, built without a file (benches and tests)."""
    cfg = FleetConfig(name=f"{count}x{gpu}", workers=[WorkerGroupConfig(
        name=name, count=count, gpu=gpu, tensor_parallel=tensor_parallel, models=models,
        initial_models=initial_models, warm_models=warm_models or [], max_batch_size=max_batch_size,
        host_ram_gb=host_ram_gb, preemption=preemption)])
    return build_fleet(cfg, source=cfg.name, profiles=profiles)
