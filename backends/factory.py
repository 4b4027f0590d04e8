"""Engines by name: `qlm worker --engine hf|sim|vllm`."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from qlmserve.backends.engine import Engine
from qlmserve.operations.batching import DEFAULT_MAX_PREFILL_TOKENS
from qlmserve.operations.model_spec import ModelSpec

ENGINE_NAMES = ("hf", "sim", "vllm")


@dataclass(frozen=True)
class SimFleetWorker:
    """A simulated worker described by a fleet file (qlmserve/sim/fleet.py): the same GPU,
    models, cost profiles, KV capacity and host memory the discrete-event simulator gives
    that worker, run `time_scale` times slower than the profiles say, so that one machine
    can stand in for a fleet in real time (`qlm bench live`)."""

    fleet_file: str
    worker_id: str
    time_scale: float = 1.0


def create_engine(kind: str, models: Mapping[str, ModelSpec], *, device: str = "auto", max_batch_size: int = 16,
                  kv_capacity_tokens: int | None = None, sim_profile: str | None = None, seed: int = 0,
                  sim_fleet: SimFleetWorker | None = None, max_prefill_tokens: int | None = None,
                  threads: int = 1, prefix_cache: bool = False) -> Engine:
    """`max_prefill_tokens`: prompt tokens one iteration may prefill (None: the default);
    `prefix_cache`: the HF engine keeps full KV blocks findable by their token chain (the
    simulated engine models the same cache)."""
    prefill = max_prefill_tokens or DEFAULT_MAX_PREFILL_TOKENS
    if kind == "hf":
        from qlmserve.backends.hf.engine import HFEngine

        return HFEngine(dict(models), device=device, max_batch_size=max_batch_size,
                        kv_capacity_tokens=kv_capacity_tokens, max_prefill_tokens=prefill, prefix_cache=prefix_cache)
    if kind == "sim" and sim_fleet is not None:
        return _fleet_sim_engine(sim_fleet, seed, prefill)
    if kind == "vllm":
        # Only in the vLLM virtualenv (make vllm): vLLM pins its own torch and transformers.
        from qlmserve.backends.vllm.engine import VLLMEngine
        from qlmserve.backends.vllm.options import VLLMOptions

        return VLLMEngine(dict(models), max_batch_size=max_batch_size, kv_capacity_tokens=kv_capacity_tokens,
                          options=VLLMOptions(device=device, threads=threads, seed=seed))
    if kind == "sim":
        from qlmserve.backends.sim_engine import OutputLengths, SimEngine, SimModel
        from qlmserve.operations.costs import WorkerProfile
        from qlmserve.operations.profiles import load_profile_file

        profile = load_profile_file(sim_profile) if sim_profile else WorkerProfile()
        sim_models = [SimModel(name, weight_bytes=spec.weight_bytes or 0) for name, spec in models.items()]
        # A simulated request runs to its max_tokens: replayed traces set max_tokens to the
        # trace's true output length, so the fleet sees the real length distribution.
        return SimEngine(profile, sim_models, max_batch_size=max_batch_size,
                         kv_capacity_tokens=kv_capacity_tokens or 100_000, seed=seed,
                         output_lengths=OutputLengths(kind="max_tokens"), max_prefill_tokens=prefill,
                         prefix_cache=prefix_cache)
    raise ValueError(f"unknown engine {kind!r}; valid engines: {', '.join(ENGINE_NAMES)}")


def _fleet_sim_engine(spec: SimFleetWorker, seed: int, max_prefill_tokens: int) -> Engine:
    from qlmserve.backends.sim_engine import OutputLengths, SimEngine, SimModel
    from qlmserve.sim.fleet import load_fleet

    fleet = load_fleet(spec.fleet_file)
    worker = next((w for w in fleet.workers if w.worker_id == spec.worker_id), None)
    if worker is None:
        raise ValueError(f"worker {spec.worker_id!r} is not in {spec.fleet_file} "
                         f"({', '.join(w.worker_id for w in fleet.workers)})")
    f = spec.time_scale
    models = [SimModel(m.name, weight_bytes=m.weight_bytes, num_layers=m.num_layers, profile=m.profile.slowed(f),
                       kv_capacity_tokens=m.kv_capacity_tokens) for m in worker.models.values()]
    engine = SimEngine(models[0].profile, models, active_model=worker.initial_model,
                       kv_capacity_tokens=worker.models[worker.initial_model].kv_capacity_tokens,
                       max_batch_size=worker.max_batch_size, host_ram_bytes=worker.host_ram_bytes,
                       host_kv_capacity_tokens=worker.host_kv_tokens, seed=seed, preemption=worker.preemption,
                       output_lengths=OutputLengths(kind="prompt"), device=worker.gpu,
                       warm_models=worker.warm_models, max_prefill_tokens=max_prefill_tokens)
    return engine
