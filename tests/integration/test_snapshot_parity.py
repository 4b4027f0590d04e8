"""One state, two adapters: the controller (Redis + worker reports) and the simulator
(simulated workers) hand the planner the same snapshot, field by field."""

from __future__ import annotations

import dataclasses
import time

import pytest
import redis

from qlmserve.backends.engine import TokenEvent
from qlmserve.backends.token_sink import TokenSink
from qlmserve.backends.worker import cost_to_pb
from qlmserve.controller.core import Controller
from qlmserve.controller.length_band import length_band
from qlmserve.controller.request import Request
from qlmserve.controller.service.convert import report_from_pb
from qlmserve.controller.snapshot import ClusterSnapshot
from qlmserve.controller.store import RedisStore
from qlmserve.operations.batching import PreemptionMode
from qlmserve.operations.ops import SetPreemption
from qlmserve.operations.plan import Plan
from qlmserve.operations.profiles import load_gpu_profiles
from qlmserve.pb import worker_pb2
from qlmserve.sim.driver import SimOptions, Simulation
from qlmserve.sim.fleet import uniform_fleet
from qlmserve.sim.request import SimStatus
from qlmserve.traces import WorkloadRequest

pytestmark = pytest.mark.integration

MODELS = ["llama-2-7b", "mistral-7b"]


class FixedClock:
    def __init__(self, t: float) -> None:
        self.t = t

    def now(self) -> float:
        return self.t


def _policy():
    from qlmserve.controller.policy import PolicyConfig

    t = load_gpu_profiles()
    return PolicyConfig.model_validate({
        "max_running_per_worker": 24,  # below the fleet's 32: the smaller limit must win in both
        "slo_classes": {"interactive": {"ttft_s": 2.0, "priority": 2, "latency_sensitive": True},
                        "batch": {"ttft_s": 60.0, "priority": 0}},
        "models": {m: {"kind": "llama", "max_context": t.model(m).max_context,
                       "weight_bytes": t.model(m).weight_bytes} for m in MODELS},
        "grouping": {"window_s": 2.0, "max_group_size": 3, "length_bands_per_octave": 2},  # bands reach both
        "planner": {"policy": "edf"},
        # The simulator's requests carry trace block ids, not token ids: prompts are not keyed here.
        "dispatch": {"prefix_block_tokens": 0},
    })


def _canon(snap: ClusterSnapshot) -> dict:
    """Everything in a snapshot, with group ids replaced by their first request's id (the
    two sources name groups differently)."""
    gname = {g.group_id: g.request_ids[0] for g in snap.groups}

    def group(g):
        d = dataclasses.asdict(g)
        d["group_id"] = gname[g.group_id]
        return d

    def worker(w):
        d = dataclasses.asdict(w)
        d["running"] = sorted(({**dataclasses.asdict(r), "group_id": None} for r in w.running),
                              key=lambda r: r["request_id"])
        d["profile"] = dataclasses.replace(w.profile, name="")
        return d

    return {"now": snap.now, "groups": sorted((group(g) for g in snap.groups), key=lambda g: g["group_id"]),
            "workers": sorted((worker(w) for w in snap.workers), key=lambda w: w["worker_id"]),
            "length_stats": {k: dataclasses.astuple(v) for k, v in snap.length_stats.items()},
            "model_bytes": dict(snap.model_bytes)}


async def test_controller_and_simulator_build_the_same_snapshot(redis_url: str, prefix: str):
    """This test verifies that:
    1. the same cluster state (waiting groups, a requeued request that carries 7 tokens,
       running requests with progress and a first token, a swapped-out request, one worker
       in expert mode, a batch limit below the engine's, host RAM and host KV, groups placed
       in the last plan) gives field-by-field equal ClusterSnapshots through the
       controller's adapter (Redis, the worker's protobuf report) and the simulator's;
    2. in both, the requeued request is planned with its tokens (prompt + 7, max_tokens - 7),
       the worker's mode in force, servable models and host memory reach the planner, and
       its cost model is the engine's (batch-dependent) profile;
    3. a worker's prefix-cache report and the requests' sessions (user ids) reach both."""
    policy = _policy()
    fleet = uniform_fleet(2, "A100-80GB", MODELS, initial_models=MODELS, max_batch_size=32, host_ram_gb=64)
    fleet = dataclasses.replace(fleet, workers=tuple(dataclasses.replace(w, host_kv_tokens=50_000)
                                                     for w in fleet.workers))
    w0, w1 = (w.worker_id for w in fleet.workers)
    t0 = time.time() - 5.0
    spec = [  # (id, model, class, arrival offset, prompt tokens, output tokens)
        ("a1", "llama-2-7b", "batch", 0.0, 100, 200), ("a2", "llama-2-7b", "batch", 0.5, 80, 300),
        ("b1", "llama-2-7b", "interactive", 1.0, 40, 64), ("c1", "mistral-7b", "batch", 1.2, 500, 400),
        ("r1", "llama-2-7b", "batch", 1.5, 120, 250), ("r2", "llama-2-7b", "batch", 1.6, 60, 100),
        ("s1", "llama-2-7b", "batch", 1.7, 90, 150), ("q1", "llama-2-7b", "batch", 1.8, 70, 120),
    ]
    now = t0 + 5.0

    workload = [WorkloadRequest(rid, t0 + dt, model, cls, prompt, out, "u7" if rid in ("r1", "a2") else "", None, i, 0)
                for i, (rid, model, cls, dt, prompt, out) in enumerate(spec)]
    sim = Simulation(policy, fleet, workload, policy_name="edf", options=SimOptions(max_tokens=1000))
    by_id = sim.by_id

    # ---- the controller's side: Redis and a worker's report -------------------------------
    store = RedisStore.from_url(redis_url, prefix)
    ctl = Controller(store, policy, redis_url=redis_url, clock=FixedClock(now))
    gids = {}
    for rid, model, cls, dt, prompt, _out in spec:
        slo = policy.slo_classes[cls]
        max_tokens = by_id[rid].max_tokens  # what the client asked (the simulator's request holds it)
        req = Request(rid, model, cls, list(range(1, prompt + 1)), max_tokens, t0 + dt, slo.ttft_s,
                      latency_sensitive=slo.latency_sensitive, priority=slo.priority,
                      user_id="u7" if rid in ("r1", "a2") else "",
                      length_band=length_band(prompt, policy.grouping.length_bands_per_octave,  # as Controller.submit
                                              slo.latency_sensitive))
        gids[rid] = (await store.submit(req, t0 + dt, policy.grouping)).group_id
    h0, _ = await ctl.worker_connected(w0, "sim", "A100-80GB", MODELS, {})
    h1, _ = await ctl.worker_connected(w1, "sim", "A100-80GB", MODELS, {})
    sink = TokenSink(redis.Redis.from_url(redis_url), prefix, w0)
    progress = {"r1": 12, "r2": 3, "s1": 20, "q1": 7}
    for rid, n in progress.items():
        await store.assign(rid, gids[rid], w0, t0 + 2.0)
        sink.write([(TokenEvent(rid, 5, i), 1, "") for i in range(n)])
    await store.set_swapped("s1", w0, True)
    await ctl._requeue("q1", w0, t0 + 3.0)  # handed back with 7 tokens: waiting again

    # ---- the simulator's side: the same state on simulated workers ------------------------
    for rid, *_ in spec:
        sim.waiting.join(by_id[rid], by_id[rid].arrival)
    rows = {r.request_id: r for r in (await store.get_requests(list(progress))).values()}
    sw0 = sim.workers[w0]
    for rid, n in progress.items():
        r = by_id[rid]
        sim.waiting.remove(r)
        r.generated, r.first_token_at, r.worker_id = n, rows[rid].first_token_at, w0
        if rid == "s1":
            r.status = SimStatus.SWAPPED
            sw0.swapped[rid] = r
        elif rid == "q1":
            sim.on_requeue(r, t0 + 3.0, "evict")
            r.worker_id = None
        else:
            r.status, r.prefilled = SimStatus.RUNNING, True
            sw0.running.append(r)
    sim.workers[w1].submit_op(SetPreemption(w1, PreemptionMode.EXPERT, 2.0), now)
    sw0.prefix.insert([11, 12, 13])  # blocks its prefix cache holds (reported to the planner)

    # ---- the reports a worker in that state sends ----------------------------------------
    for h, w in ((h0, sim.workers[w0]), (h1, sim.workers[w1])):
        running = [worker_pb2.RunningEntry(request_id=r.rid, attempt=1, swapped=r.rid in w.swapped)
                   for r in [*w.running, *w.swapped.values()]]
        state = worker_pb2.WorkerState(
            active_model=w.active_model, kv_capacity_tokens=w.kv_capacity, kv_used_tokens=w.kv_used,
            running=running, max_batch_size=w.spec.max_batch_size, device="A100-80GB", preemption=w.mode.value,
            cost=cost_to_pb(w.profile), servable_models=sorted(w.spec.models), host_ram_bytes=w.spec.host_ram_bytes,
            host_kv_capacity_tokens=w.spec.host_kv_tokens, host_kv_used_tokens=w.host_kv_used,
            prefix_cache=worker_pb2.PrefixCacheReport(block_tokens=w.prefix.block_tokens,
                                                      blocks=sorted(w.prefix.summary()),
                                                      queued_prefill_tokens=w.queued_prefill_tokens()))
        await ctl.worker_report(h, report_from_pb(state))

    # ---- the same last plan on both sides ------------------------------------------------
    sim_gid = {r: by_id[r].group_id for r, *_ in spec}
    queues = {w0: [gids["a1"], gids["b1"]], w1: [gids["c1"], gids["q1"]]}
    ctl.last_plan = Plan(virtual_queues=queues)
    sim._positions = Plan(virtual_queues={w0: [sim_gid["a1"], sim_gid["b1"]],
                                          w1: [sim_gid["c1"], sim_gid["q1"]]}).placement()

    live = await ctl.snapshot()
    simulated = sim._snapshot(now)
    await store.close()

    a, b = _canon(live), _canon(simulated)
    for key in a:
        assert a[key] == b[key], key
    q = next(g for g in live.groups if "q1" in g.request_ids)
    i = q.request_ids.index("q1")
    assert (q.prompt_tokens[i], q.max_tokens[i]) == (70 + 7, 1000 - 7)
    ws = {w.worker_id: w for w in live.workers}
    assert ws[w0].prefix.blocks == frozenset({11, 12, 13})
    assert {r.request_id: r.session for r in ws[w0].running}["r1"] == "u7"
    assert next(g for g in live.groups if "a2" in g.request_ids).sessions[1] == "u7"
    assert ws[w1].preemption_mode is PreemptionMode.EXPERT and ws[w0].max_batch_size == 24
    assert ws[w0].servable_models == frozenset(MODELS) and ws[w0].host_kv_capacity_tokens == 50_000
    assert ws[w0].host_ram_models == 64 * 2**30 // max(policy.models[m].weight_bytes for m in MODELS)
    assert ws[w0].profile.decode_per_seq_s > 0  # the engine's batch-dependent cost model


async def test_controller_fails_what_missed_its_target_while_waiting_in_a_fail_fast_class(redis_url: str,
                                                                                          prefix: str):
    """This test verifies that the controller applies the same rule as the simulator
    (cluster_view.missed_while_waiting): a waiting request of a `fail_fast` class whose TTFT
    target has passed is failed with a reason and leaves the snapshot; one of a `run_late`
    class, as old, keeps waiting."""
    base = _policy().model_dump()
    base["slo_classes"]["interactive"]["on_miss"] = "fail_fast"
    from qlmserve.controller.policy import PolicyConfig
    from qlmserve.controller.request import RequestStatus

    policy = PolicyConfig.model_validate(base)
    store = RedisStore.from_url(redis_url, prefix)
    clock = FixedClock(1000.0)
    ctl = Controller(store, policy, redis_url=redis_url, clock=clock)
    for rid, cls in (("i1", "interactive"), ("b1", "batch")):
        slo = policy.slo_classes[cls]
        await store.submit(Request(rid, "llama-2-7b", cls, [1, 2, 3], 8, 1000.0, slo.ttft_s,
                                   latency_sensitive=slo.latency_sensitive), 1000.0, policy.grouping)
    assert {r for g in (await ctl.snapshot()).groups for r in g.request_ids} == {"i1", "b1"}
    clock.t = 1000.0 + 2.5  # past interactive's 2 s, well within batch's 60 s
    snap = await ctl.snapshot()
    assert {r for g in snap.groups for r in g.request_ids} == {"b1"}
    failed = await store.get_request("i1")
    assert failed.status is RequestStatus.FAILED and "missed" in failed.error
    await store.close()
