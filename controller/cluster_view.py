"""One view of the cluster, whatever its source, and the one function that builds the
planner's snapshot from it (STYLE 16).

The controller adapts Redis and its workers' reports into a `ClusterView`
(controller/core.py); the simulator adapts its simulated workers (qlmserve/sim/driver.py).
`build_snapshot` then applies every rule that turns a view into the planner's input
(GroupState, WorkerState, ClusterSnapshot): a requeued request is planned with the
tokens it already produced, a worker's batch is the smaller of the policy's and the
engine's limits, its warm-copy room follows its host RAM and the models' sizes, SLO
targets come from the policy's classes. Two builders of the same input drift; one
cannot (tests/integration/test_snapshot_parity.py feeds one state through both adapters).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace

from qlmserve.controller.estimator import LengthLearner, Moments
from qlmserve.controller.length_band import LengthKey
from qlmserve.controller.policy import PolicyConfig
from qlmserve.controller.request_order import depends_on_time, order_requests
from qlmserve.controller.snapshot import ClusterSnapshot, GroupState, LengthStats, RunningRequest, WorkerState
from qlmserve.operations.batching import PreemptionMode
from qlmserve.operations.costs import WorkerProfile
from qlmserve.operations.ops import Capability
from qlmserve.operations.prefix_cache import PrefixReport

# Warm copies a worker is assumed to hold when it reports no host RAM figure.
DEFAULT_HOST_RAM_MODELS = 2
_NOWHERE: tuple[None, int] = (None, 0)  # a group's place before its first plan


@dataclass(frozen=True)
class RequestView:
    """A request as its source knows it. `ttft_s` and `latency_sensitive` are the values
    stored with the request, used when the policy no longer has its class."""

    request_id: str
    group_id: str
    model: str
    slo_class: str
    arrival: float
    prompt_tokens: int  # the client's prompt
    max_tokens: int  # as the client asked
    generated_tokens: int = 0  # produced so far (a requeued request carries them)
    first_token_at: float | None = None
    swapped: bool = False  # KV in host memory (a running request)
    ttft_s: float = 60.0
    latency_sensitive: bool = False
    prefix_blocks: tuple[int, ...] = ()  # its prompt's prefix block ids (operations/prefix_cache.py)
    session: str = ""  # stickiness key (the user, or the conversation)
    length_band: int = 0  # its prompt's length band (controller/length_band.py), as submitted


@dataclass(frozen=True)
class GroupView:
    group_id: str
    model: str
    slo_class: str
    created_at: float
    waiting: tuple[RequestView, ...]  # oldest first


@dataclass(frozen=True)
class WorkerView:
    worker_id: str
    healthy: bool
    draining: bool
    gpu: str
    active_model: str | None
    loading_model: str | None  # a model swap in progress (reported, or sent and not answered)
    warm_models: frozenset[str]
    kv_capacity_tokens: int
    kv_used_tokens: int
    engine_max_batch: int  # the engine's own limit; 0: not reported
    profile: WorkerProfile  # the engine's cost model
    preemption_mode: PreemptionMode
    servable_models: frozenset[str] | None  # None: every model of the policy
    host_ram_bytes: int  # for warm copies; 0: not reported
    host_kv_capacity_tokens: int | None
    host_kv_used_tokens: int
    running: tuple[RequestView, ...]
    supported_ops: frozenset[Capability] | None = None  # what its engine carries out; None: every operation
    max_prefill_tokens: int | None = None  # its engine's prefill budget per iteration; None: the policy's
    prefix: PrefixReport | None = None  # its prefix cache and prefill backlog; None: not reported


@dataclass(frozen=True)
class ClusterView:
    now: float
    groups: tuple[GroupView, ...]
    workers: tuple[WorkerView, ...]
    model_bytes: Mapping[str, int]  # weight sizes: model-swap costs, warm copies per host RAM


def missed_while_waiting(view: ClusterView, policy: PolicyConfig) -> list[RequestView]:
    """Waiting requests of `fail_fast` classes whose TTFT target has passed: the controller
    fails them and the simulator drops them, by this one rule."""
    targets = {name: slo.ttft_s for name, slo in policy.slo_classes.items() if slo.on_miss == "fail_fast"}
    if not targets:
        return []  # the usual case: no need to walk every waiting group
    out = []
    for g in view.groups:
        ttft_s = targets.get(g.slo_class)
        if ttft_s is not None:
            out.extend(r for r in g.waiting if r.arrival + ttft_s < view.now)
    return out


def without(view: ClusterView, request_ids: set[str]) -> ClusterView:
    """The view with these waiting requests gone (other groups keep their view objects, so
    their cached states stay)."""
    if not request_ids:
        return view

    def drop(g: GroupView) -> GroupView:
        kept = tuple(r for r in g.waiting if r.request_id not in request_ids)
        return g if len(kept) == len(g.waiting) else GroupView(g.group_id, g.model, g.slo_class, g.created_at, kept)

    return replace(view, groups=tuple(drop(g) for g in view.groups))


def learned_lengths(policy: PolicyConfig, observed: Mapping[LengthKey, Moments],
                    running: Iterable[RunningRequest]) -> dict[LengthKey, LengthStats]:
    """The output-length distribution the estimator reads: the policy's prior plus the
    observed (already forgotten) moments, with running requests as censored lengths."""
    return LengthLearner(policy, observed).length_stats(running)


def group_state(g: GroupView, policy: PolicyConfig, placement: Mapping[str, tuple[str, int]],
                now: float = 0.0) -> GroupState:
    """A waiting group, its requests in its class's request order (controller/request_order.py).
    A request requeued with tokens must prefill them again and may produce only what its
    max_tokens leaves."""
    slo = policy.slo_classes.get(g.slo_class)
    reqs = order_requests(g.waiting, slo, policy, now)
    wid, pos = placement.get(g.group_id, (None, 0))
    return GroupState(
        group_id=g.group_id, model=g.model, slo_class=g.slo_class,
        request_ids=tuple(r.request_id for r in reqs), arrivals=tuple(r.arrival for r in reqs),
        prompt_tokens=tuple(r.prompt_tokens + r.generated_tokens for r in reqs),
        max_tokens=tuple(max(1, r.max_tokens - r.generated_tokens) for r in reqs),
        ttft_s=slo.ttft_s if slo else (reqs[0].ttft_s if reqs else 60.0),
        priority=slo.priority if slo else 0, weight=slo.weight if slo else 1.0,
        latency_sensitive=slo.latency_sensitive if slo else (reqs[0].latency_sensitive if reqs else False),
        worker_id=wid, position=pos, created_at=g.created_at,
        prefix_blocks=tuple(r.prefix_blocks for r in reqs) if any(r.prefix_blocks for r in reqs) else (),
        sessions=tuple(r.session for r in reqs) if any(r.session for r in reqs) else (),
        length_band=reqs[0].length_band if reqs else 0)  # one band per group (its open-group key)


def running_request(r: RequestView, policy: PolicyConfig) -> RunningRequest:
    slo = policy.slo_classes.get(r.slo_class)
    return RunningRequest(r.request_id, r.group_id, r.model, r.slo_class, r.prompt_tokens, r.generated_tokens,
                          r.max_tokens, slo.latency_sensitive if slo else r.latency_sensitive, r.arrival,
                          r.first_token_at, swapped=r.swapped, session=r.session, length_band=r.length_band)


def host_ram_models(host_ram_bytes: int, model_bytes: Mapping[str, int], models: Iterable[str]) -> int:
    """How many models a worker may keep warm: its host RAM over the largest model it serves."""
    sizes = [model_bytes.get(m, 0) for m in models]
    biggest = max(sizes, default=0)
    if host_ram_bytes <= 0 or biggest <= 0:
        return DEFAULT_HOST_RAM_MODELS
    return int(host_ram_bytes // biggest)


def worker_state(w: WorkerView, policy: PolicyConfig, model_bytes: Mapping[str, int]) -> WorkerState:
    limit = policy.max_running_per_worker
    batch = min(limit, w.engine_max_batch) if w.engine_max_batch else limit
    serves = w.servable_models if w.servable_models is not None else frozenset(policy.models)
    return WorkerState(
        worker_id=w.worker_id, active_model=w.active_model, warm_models=w.warm_models,
        kv_capacity_tokens=w.kv_capacity_tokens, kv_used_tokens=w.kv_used_tokens, max_batch_size=batch,
        running=tuple(running_request(r, policy) for r in w.running), profile=w.profile, healthy=w.healthy,
        draining=w.draining, gpu=w.gpu, host_ram_models=host_ram_models(w.host_ram_bytes, model_bytes, serves),
        loading_model=w.loading_model, servable_models=w.servable_models, preemption_mode=w.preemption_mode,
        host_kv_capacity_tokens=w.host_kv_capacity_tokens, host_kv_used_tokens=w.host_kv_used_tokens,
        supported_ops=w.supported_ops, max_prefill_tokens=w.max_prefill_tokens or policy.max_prefill_tokens,
        prefix=w.prefix)


class StateCache:
    """States built from views, reused while a source hands in the same view object again
    (both sources keep a group's view until the group changes): a tick then costs what
    changed, not every waiting request. A group whose view is the same but whose place in
    the last plan moved gets a copy of its state at the new place."""

    def __init__(self) -> None:
        # group -> (its view, its state, the (worker, position) the state holds)
        self._groups: dict[str, tuple[GroupView, GroupState, tuple[str | None, int]]] = {}
        self._workers: dict[str, tuple[WorkerView, WorkerState]] = {}
        self._timed: tuple[PolicyConfig, frozenset[str]] | None = None  # classes whose order ages

    def groups(self, views: Iterable[GroupView], policy: PolicyConfig, placement: Mapping[str, tuple[str, int]],
               now: float = 0.0) -> tuple[GroupState, ...]:
        """The states of the groups with requests waiting, in the views' order. This loop runs
        over every waiting group each tick (~5,000 at 60,000 waiting): it does no more than
        look a group up unless the group changed."""
        if self._timed is None or self._timed[0] is not policy:
            self._timed = (policy, frozenset(n for n, slo in policy.slo_classes.items() if depends_on_time(slo)))
        timed = self._timed[1]
        entries = self._groups
        out = []
        for g in views:
            if not g.waiting:
                continue
            gid = g.group_id
            hit = entries.get(gid)
            place = placement.get(gid, _NOWHERE)
            if hit is None or hit[0] is not g or g.slo_class in timed:
                st = group_state(g, policy, placement, now)
                entries[gid] = (g, st, place)
            elif hit[2] != place:  # only its place moved
                st = hit[1].at(*place)
                entries[gid] = (g, st, place)
            else:
                st = hit[1]
            out.append(st)
        return tuple(out)

    def worker(self, w: WorkerView, policy: PolicyConfig, model_bytes: Mapping[str, int]) -> WorkerState:
        hit = self._workers.get(w.worker_id)
        if hit is not None and hit[0] is w:
            return hit[1]
        st = worker_state(w, policy, model_bytes)
        self._workers[w.worker_id] = (w, st)
        return st

    def forget(self, live_groups: Iterable[str]) -> None:
        """Drop the groups a source no longer has."""
        keep = set(live_groups)
        self.discard([g for g in self._groups if g not in keep])

    def discard(self, group_ids: Iterable[str]) -> None:
        """Drop these groups (a source that knows which ones left)."""
        for gid in group_ids:
            self._groups.pop(gid, None)


def build_snapshot(view: ClusterView, policy: PolicyConfig, placement: Mapping[str, tuple[str, int]],
                   length_stats: dict[LengthKey, LengthStats], cache: StateCache | None = None
                   ) -> ClusterSnapshot:
    """The planner's input. `placement` is group -> (worker, position) in the last plan;
    `length_stats` comes from `learned_lengths`; `cache` reuses states of unchanged views."""
    c = cache or StateCache()
    groups = c.groups(view.groups, policy, placement, view.now)
    workers = tuple(c.worker(w, policy, view.model_bytes) for w in view.workers)
    return ClusterSnapshot(now=view.now, groups=groups, workers=workers, length_stats=length_stats,
                           model_bytes=dict(view.model_bytes))
