"""Seeded generators of random cluster snapshots, for planner tests and benchmarks.

A snapshot is the middle of a busy run: workers decoding batches of their active
model (some loading another, some idle), groups of three SLO classes waiting, most
already placed in a virtual queue by an earlier plan and a few just arrived. `load`
scales the queued work against what the fleet can serve within the interactive
target, so one knob moves an instance from easy to hopeless.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from qlmserve.controller.length_band import CLASS_WIDE
from qlmserve.controller.policy import PolicyConfig
from qlmserve.controller.snapshot import ClusterSnapshot, GroupState, LengthStats, RunningRequest, WorkerState
from qlmserve.operations.costs import WorkerProfile

# name -> (ttft_s, priority, weight, latency_sensitive, share of groups)
CLASSES: dict[str, tuple[float, int, float, bool, float]] = {
    "interactive": (2.0, 2, 4.0, True, 0.4),
    "standard": (10.0, 1, 2.0, False, 0.3),
    "batch": (120.0, 0, 1.0, False, 0.3),
}
# name -> (kind, weight bytes, output mean, output std)
MODELS: dict[str, tuple[str, int, float, float]] = {
    "llama-8b": ("llama", 16 * 2**30, 128.0, 128.0),
    "mixtral-8x7b": ("mixtral", 26 * 2**30, 192.0, 160.0),
    "qwen-moe": ("qwen2_moe", 30 * 2**30, 96.0, 120.0),
}
ALL_OPERATIONS = ("evict", "kv_swap", "model_swap", "warm_start", "load_balance", "preempt")


def make_policy(models: int = 2, *, policy: str = "qlm", operations: tuple[str, ...] = ALL_OPERATIONS,
                method: str = "chance", solve_budget_ms: float = 50.0, beta: float = 0.9, scenarios: int = 16,
                drop_hopeless: bool = True, max_running_per_worker: int = 16) -> PolicyConfig:
    """A policy with the classes and the first `models` models above."""
    names = list(MODELS)[:models]
    return PolicyConfig.model_validate({
        "max_running_per_worker": max_running_per_worker,
        "slo_classes": {c: {"ttft_s": t, "priority": p, "weight": w, "latency_sensitive": ls}
                        for c, (t, p, w, ls, _) in CLASSES.items()},
        "models": {m: {"kind": MODELS[m][0], "weight_bytes": MODELS[m][1],
                       "output_prior": {"mean": MODELS[m][2], "std": MODELS[m][3], "weight": 20}}
                   for m in names},
        "planner": {"policy": policy, "operations": list(operations), "method": method,
                    "solve_budget_ms": solve_budget_ms, "beta": beta, "scenarios": scenarios,
                    "drop_hopeless": drop_hopeless},
    })


@dataclass(frozen=True)
class InstanceSpec:
    groups: int = 16
    workers: int = 4
    load: float = 1.0  # queued decode work / what the fleet decodes in one interactive TTFT target
    max_group_size: int = 12
    placed_fraction: float = 0.8  # groups already in a virtual queue (from an earlier plan)
    running_fill: float = 0.8  # busy share of each worker's batch slots
    idle_workers: float = 0.1  # share of workers with nothing loaded or running
    swapped_fraction: float = 0.05  # running requests whose KV is in host memory
    heterogeneous: bool = True  # some workers faster than others, some cannot hold every model
    max_age: float = 0.8  # groups arrived up to this fraction of their TTFT target ago
    now: float = 1000.0


def _profile(rng: np.random.Generator, heterogeneous: bool) -> WorkerProfile:
    speed = float(rng.choice([0.6, 1.0, 1.6])) if heterogeneous else 1.0
    return WorkerProfile(prefill_base_s=0.005 / speed, prefill_per_token_s=0.0002 / speed,
                         decode_base_s=0.02 / speed, decode_per_seq_s=0.001 / speed,
                         kv_bytes_per_token=131072, kv_swap_bytes_per_s=12e9,
                         load_cold_bytes_per_s=2e9, load_warm_bytes_per_s=20e9, load_fixed_s=0.5,
                         name=f"x{speed}")


def random_snapshot(config: PolicyConfig, spec: InstanceSpec, seed: int) -> ClusterSnapshot:
    rng = np.random.default_rng(seed)
    models = list(config.models)
    classes = list(config.slo_classes)
    shares = np.array([CLASSES.get(c, (0, 0, 0, False, 1.0))[4] for c in classes])
    shares = shares / shares.sum()
    now = spec.now
    batch = config.max_running_per_worker
    length_stats = {}
    for m in models:
        pr = config.models[m].output_prior
        for c in classes:
            length_stats[(m, c, CLASS_WIDE)] = LengthStats(pr.mean, pr.std**2, pr.weight)

    workers: list[WorkerState] = []
    for i in range(spec.workers):
        prof = _profile(rng, spec.heterogeneous)
        servable = None
        if spec.heterogeneous and len(models) > 1 and rng.random() < 0.25:
            servable = frozenset(rng.choice(models, size=len(models) - 1, replace=False).tolist())
        can = sorted(servable) if servable is not None else models
        idle = rng.random() < spec.idle_workers
        active = None if idle else str(rng.choice(can))
        loading = None
        if not idle and len(can) > 1 and rng.random() < 0.05:
            loading = str(rng.choice([m for m in can if m != active]))
        warm = frozenset(str(m) for m in can if m != active and rng.random() < 0.3)
        running = []
        if active is not None and loading is None:
            n_run = int(rng.binomial(batch, spec.running_fill))
            for j in range(n_run):
                c = str(rng.choice(classes, p=shares))
                st = length_stats[(active, c, CLASS_WIDE)]
                gen = int(rng.integers(1, max(2, int(2 * st.mean))))
                running.append(RunningRequest(
                    request_id=f"w{i}-r{j}", group_id=f"w{i}-old{j}", model=active, slo_class=c,
                    prompt_tokens=int(rng.integers(50, 1500)), generated_tokens=gen,
                    max_tokens=max(gen + 16, 1024), latency_sensitive=config.slo_classes[c].latency_sensitive,
                    arrival=now - float(rng.uniform(2, 60)), first_token_at=now - float(rng.uniform(0, 2)),
                    swapped=bool(rng.random() < spec.swapped_fraction)))
        kv_cap = int(batch * float(rng.choice([1200, 2000, 4000])))
        kv_used = min(kv_cap, sum(r.prompt_tokens + r.generated_tokens for r in running if not r.swapped))
        workers.append(WorkerState(
            worker_id=f"w{i:03d}", active_model=active, warm_models=warm, kv_capacity_tokens=kv_cap,
            kv_used_tokens=kv_used, max_batch_size=batch, running=tuple(running), profile=prof,
            gpu="sim", host_ram_models=2, loading_model=loading, servable_models=servable,
            host_kv_capacity_tokens=int(batch * 4000), host_kv_used_tokens=0))

    # Group sizes scaled so that total queued decode work matches `load`.
    fleet_tokens_per_ttft = sum(batch / w.profile.decode_step_time(batch) for w in workers) * \
        min(c.ttft_s for c in config.slo_classes.values())
    mean_out = np.mean([config.models[m].output_prior.mean for m in models])
    target_requests = max(spec.groups, int(spec.load * fleet_tokens_per_ttft / mean_out))
    sizes = rng.integers(1, spec.max_group_size + 1, size=spec.groups).astype(float)
    sizes = np.clip(np.round(sizes * target_requests / sizes.sum()), 1, spec.max_group_size).astype(int)

    groups: list[GroupState] = []
    for k in range(spec.groups):
        m = str(rng.choice(models))
        c = str(rng.choice(classes, p=shares))
        sc = config.slo_classes[c]
        n = int(sizes[k])
        # Arrived up to max_age x TTFT ago (a few nearly late), oldest first.
        first = now - float(rng.uniform(0.0, spec.max_age)) * sc.ttft_s
        arrivals = tuple(sorted(float(first + rng.uniform(0, min(1.5, now - first))) for _ in range(n)))
        arrivals = (first,) + arrivals[1:]
        prompts = tuple(int(x) for x in rng.integers(30, 1500, size=n))
        groups.append(GroupState(
            group_id=f"g{k:04d}-{c[:3]}", model=m, slo_class=c, request_ids=tuple(f"g{k}-q{j}" for j in range(n)),
            arrivals=arrivals, prompt_tokens=prompts, max_tokens=tuple(1024 for _ in range(n)),
            ttft_s=sc.ttft_s, priority=sc.priority, weight=sc.weight, latency_sensitive=sc.latency_sensitive,
            created_at=first))

    # Earlier plan: most groups sit in a queue of a worker that can serve their model.
    placed: dict[str, list[GroupState]] = {w.worker_id: [] for w in workers}
    by_model = {m: [w for w in workers if w.can_serve(m) and (w.active_model in (None, m) or w.loading_model == m)]
                for m in models}
    out_groups = []
    for g in groups:
        pool = by_model[g.model] or [w for w in workers if w.can_serve(g.model)]
        if pool and rng.random() < spec.placed_fraction:
            w = pool[int(rng.integers(len(pool)))]
            placed[w.worker_id].append(g)
        else:
            out_groups.append(g)
    for wid, gs in placed.items():
        gs.sort(key=lambda g: (g.deadline, g.group_id))
        for pos, g in enumerate(gs):
            out_groups.append(replace(g, worker_id=wid, position=pos))
    out_groups.sort(key=lambda g: g.group_id)
    bytes_ = {m: config.models[m].weight_bytes or 0 for m in models}
    return ClusterSnapshot(now=now, groups=tuple(out_groups), workers=tuple(workers),
                           length_stats=length_stats, model_bytes=bytes_)


def advance(snapshot: ClusterSnapshot, config: PolicyConfig, virtual_queues: dict[str, list[str]],
            dt: float, seed: int, target_groups: int | None = None) -> ClusterSnapshot:
    """The next tick's snapshot, roughly: time moves by `dt`, each worker's queue head
    loses the requests it could admit (a crude stand-in for dispatch), new groups arrive
    (back up to `target_groups`, at least one), and every queued group records the queue
    it sits in. For solver-timing sequences, not for judging schedules (that is the
    simulator's job)."""
    rng = np.random.default_rng(seed)
    now = snapshot.now + dt
    pos = {gid: (wid, i) for wid, q in virtual_queues.items() for i, gid in enumerate(q)}
    groups = {g.group_id: g for g in snapshot.groups}
    workers = []
    for w in snapshot.workers:
        q = virtual_queues.get(w.worker_id, [])
        free = int(rng.binomial(w.max_batch_size, min(1.0, dt / 4.0)))
        for gid in q:
            if free <= 0:
                break
            g = groups.get(gid)
            if g is None or g.model != w.active_model:
                break
            take = min(free, g.size)
            free -= take
            if take >= g.size:
                del groups[gid]
            else:
                groups[gid] = replace(g, request_ids=g.request_ids[take:], arrivals=g.arrivals[take:],
                                      prompt_tokens=g.prompt_tokens[take:], max_tokens=g.max_tokens[take:])
        running = tuple(replace(r, generated_tokens=r.generated_tokens + int(dt / 0.04)) for r in w.running)
        workers.append(replace(w, running=running))
    out = []
    for g in groups.values():
        wid, i = pos.get(g.group_id, (g.worker_id, g.position))
        out.append(replace(g, worker_id=wid, position=i))
    arrivals = max(1, (target_groups or len(snapshot.groups)) - len(out))
    fresh = random_snapshot(config, InstanceSpec(groups=arrivals, workers=1, now=now, placed_fraction=0.0,
                                                 max_age=0.05), seed + 7919)
    for k, g in enumerate(fresh.groups):
        out.append(replace(g, group_id=f"{g.group_id}-t{seed}-{k}", worker_id=None, position=0))
    return ClusterSnapshot(now=now, groups=tuple(out), workers=tuple(workers),
                           length_stats=snapshot.length_stats, model_bytes=snapshot.model_bytes)
