"""The discrete-event simulator: fleet files, worker mechanics, operations, determinism."""

from __future__ import annotations

from pathlib import Path

import pytest

from qlmserve.backends.engine import PreemptionMode
from qlmserve.controller.policy import PolicyConfig
from qlmserve.operations.ops import Evict, LoadModel, SetPreemption, SwapIn, SwapOut
from qlmserve.sim.clock import EventClock
from qlmserve.sim.driver import SimOptions, Simulation
from qlmserve.sim.fleet import FleetError, load_fleet, parse_fleet, uniform_fleet
from qlmserve.sim.metrics import summarize
from qlmserve.sim.request import SimRequest, SimStatus
from qlmserve.sim.worker import SimWorker
from qlmserve.traces import BUNDLED_AZURE_SLICE, WorkloadSpec, build_workload, load_trace

REPO = Path(__file__).resolve().parents[2]


class Sink:
    def __init__(self) -> None:
        self.finished: list[SimRequest] = []
        self.requeued: list[tuple[SimRequest, str]] = []

    def on_finished(self, r, now):
        self.finished.append(r)

    def on_requeue(self, r, now, reason):
        self.requeued.append((r, reason))

    def on_worker_changed(self, w):
        pass


def worker(models=("llama-2-7b", "mistral-7b"), warm=(), mode=PreemptionMode.NONE, batch=32):
    fleet = uniform_fleet(1, "A100-80GB", list(models), warm_models=list(warm), preemption=mode, max_batch_size=batch)
    clock, sink = EventClock(), Sink()
    return clock, sink, SimWorker(fleet.workers[0], clock, sink)


def sreq(rid, prompt=500, out=100, ls=False, model="llama-2-7b", arrival=0.0):
    return SimRequest(rid=rid, model=model, slo_class="ls" if ls else "be", group_id="g", prompt_tokens=prompt,
                      output_tokens=out, max_tokens=4000, arrival=arrival, ttft_s=20.0, tpot_s=None,
                      latency_sensitive=ls, priority=1 if ls else 0)


def run_until(clock: EventClock, t: float) -> None:
    clock.advance_to(t)


def test_fleet_files_load_and_errors_name_file_line_field(tmp_path):
    """This test verifies that:
    1. the shipped fleet files load (64 A100 workers; a heterogeneous fleet with tensor parallelism);
    2. an unknown GPU is reported with the file, its line and the field path;
    3. an unknown key and a model that does not fit a GPU are refused the same way."""
    f64 = load_fleet(REPO / "configs" / "fleet-64xA100.yaml")
    assert len(f64.workers) == 64 and f64.workers[0].worker_id == "a100-000"
    het = load_fleet(REPO / "configs" / "fleet-hetero.yaml")
    assert {w.gpu for w in het.workers} == {"A10-24GB", "A100-80GB", "H100-80GB"}
    assert any(w.tensor_parallel == 4 and "llama-2-70b" in w.models for w in het.workers)
    bad = "name: x\nworkers:\n  - name: a\n    count: 2\n    gpu: Z80\n    models: [llama-2-7b]\n"
    with pytest.raises(FleetError, match=r"f.yaml:5: field 'workers.0.gpu': unknown gpu 'Z80'"):
        parse_fleet(bad, source="f.yaml")
    with pytest.raises(FleetError, match=r"f.yaml:4: field 'workers.0.cnt'"):
        parse_fleet("workers:\n  - name: a\n    gpu: A10-24GB\n    cnt: 2\n    models: [llama-2-7b]\n",
                    source="f.yaml")
    with pytest.raises(FleetError, match="does not fit"):
        parse_fleet("workers:\n  - {name: a, count: 1, gpu: A100-80GB, models: [llama-2-70b]}\n", source="f.yaml")


def test_decode_stretch_matches_step_by_step_time():
    """This test verifies that:
    1. a request alone gets its first token after its prefill and finishes after exactly the sum
       of its decode steps (the closed-form stretch equals stepping one by one);
    2. a second request joining mid-stretch cuts it at the in-flight step, and tokens are conserved."""
    clock, sink, w = worker()
    p = w.profile
    a = sreq("a", prompt=500, out=50)
    w.assign([a], 0.0)
    w.poke(0.0)
    clock.advance_to(100.0)
    assert a.first_token_at == pytest.approx(p.prefill_time(500))
    expect = p.prefill_time(500) + sum(p.decode_step_time(1, 501 + i) for i in range(49))
    assert a.finished_at == pytest.approx(expect)
    clock, sink, w = worker()
    a, b = sreq("a", out=200), sreq("b", out=20)
    w.assign([a], 0.0)
    w.poke(0.0)
    clock.advance_to(1.0)
    w.assign([b], 1.0)
    w.poke(1.0)
    clock.advance_to(100.0)
    assert a.generated == 200 and b.generated == 20 and len(sink.finished) == 2
    # it waits for the in-flight step, then shares an iteration (its prefill + a's decode step)
    step = p.decode_step_time(1, 800)
    assert 1.0 < b.first_token_at <= 1.0 + step + p.prefill_time(500) + step + 1e-9


def test_evict_requeues_with_tokens_kept():
    """This test verifies that:
    1. an Evict at a step boundary sends the request back (reason evict) with its generated tokens;
    2. handed over again, it re-prefills prompt + generated tokens (recompute counted) and produces
       only the rest of its output."""
    clock, sink, w = worker()
    a, b = sreq("a", out=300), sreq("b", out=300)
    w.assign([a, b], 0.0)
    w.poke(0.0)
    clock.advance_to(2.0)
    w.submit_op(Evict(w.worker_id, ("a",)), 2.0)
    w.poke(2.0)
    clock.advance_to(2.5)
    assert [(r.rid, why) for r, why in sink.requeued] == [("a", "evict")]
    kept = a.generated
    assert 0 < kept < 300 and a.status == SimStatus.WAITING and not a.prefilled
    w.assign([a], 2.5)
    w.poke(2.5)
    clock.advance_to(200.0)
    assert a.generated == 300 and a.recompute_tokens == 500 + kept and a.evictions == 1
    assert {r.rid for r in sink.finished} == {"a", "b"}


def test_swap_out_in_restores_without_recompute():
    """This test verifies that:
    1. SwapOut parks a running request's KV in host memory (it stops producing tokens), charging the copy;
    2. SwapIn brings it back and it continues from the same token with no recomputation;
    3. the worker's operation time is the two copies."""
    clock, sink, w = worker()
    a, b = sreq("a", out=300), sreq("b", out=300)
    w.assign([a, b], 0.0)
    w.poke(0.0)
    clock.advance_to(2.0)
    w.submit_op(SwapOut(w.worker_id, ("a",)), 2.0)
    w.poke(2.0)
    clock.advance_to(3.0)
    assert a.status == SimStatus.SWAPPED and "a" in w.swapped
    kept = a.generated
    kv = a.kv_tokens
    clock.advance_to(4.0)
    assert a.generated == kept  # paused while swapped
    w.submit_op(SwapIn(w.worker_id, ("a",)), 4.0)
    w.poke(4.0)
    clock.advance_to(200.0)
    assert a.generated == 300 and a.recompute_tokens == 0 and a.swaps == 1
    assert w.counters.op_s == pytest.approx(2 * w.profile.kv_swap_time(kv))


def test_model_load_warm_is_cheaper_than_cold_and_evicts_old_batch():
    """This test verifies that:
    1. a LoadModel hands the running batch of the old model back to the queue (tokens kept);
    2. loading a model whose weights are warm in host RAM takes fixed + bytes / PCIe, a cold one
       fixed + bytes / disk, and the warm one is faster;
    3. after the load the worker serves the new model."""
    clock, sink, w = worker(warm=("mistral-7b",))
    a = sreq("a", out=500)
    w.assign([a], 0.0)
    w.poke(0.0)
    clock.advance_to(1.0)
    w.submit_op(LoadModel(w.worker_id, "mistral-7b"), 1.0)
    w.poke(1.0)
    assert w.loading_model == "mistral-7b"
    clock.advance_to(60.0)
    assert w.active_model == "mistral-7b" and sink.requeued[0][1] == "model swap" and a.generated > 0
    warm_s = w.counters.load_s
    rt = w.spec.models["mistral-7b"]
    assert warm_s == pytest.approx(rt.profile.model_load_time(rt.weight_bytes, True))
    w.submit_op(LoadModel(w.worker_id, "llama-2-7b"), 60.0)
    w.poke(60.0)
    clock.advance_to(200.0)
    cold_s = w.counters.load_s - warm_s
    assert w.counters.loads_warm == 1 and w.counters.loads_cold == 1 and warm_s < cold_s
    b = sreq("b", out=5)
    w.assign([b], 200.0)
    w.poke(200.0)
    clock.advance_to(300.0)
    assert b.finished_at is not None


def _ls_ttft(mode: PreemptionMode) -> float:
    clock, sink, w = worker(mode=mode)
    w.submit_op(SetPreemption(w.worker_id, mode, max_pause_s=2.0), 0.0)
    be = [sreq(f"be{i}", prompt=4000, out=50) for i in range(8)]  # one long prefill iteration
    w.assign(be, 0.0)
    w.poke(0.0)
    arrive = 0.9
    clock.advance_to(arrive)
    ls = sreq("ls", prompt=200, out=5, ls=True, arrival=arrive)
    w.assign([ls], arrive)
    w.poke(arrive)
    clock.advance_to(100.0)
    assert all(r.generated == 50 for r in be) and ls.generated == 5
    return ls.first_token_at - arrive


def test_expert_preemption_cuts_latency_sensitive_ttft():
    """This test verifies that:
    1. without preemption a latency-sensitive request handed over during a long best-effort pass
       waits for the pass to end;
    2. with expert-level preemption it starts at the next layer boundary: its TTFT is at most one
       layer of the pass plus its own prefill, and the best-effort requests still complete."""
    none = _ls_ttft(PreemptionMode.NONE)
    expert = _ls_ttft(PreemptionMode.EXPERT)
    clock, sink, w = worker()
    p, layers = w.profile, w.runtime.num_layers
    pass_s = p.prefill_time(8 * 4000)
    assert expert <= pass_s / layers + p.prefill_time(200) + 1e-9
    assert none > pass_s - 0.9
    assert none > 20 * expert


POLICY = {
    "tick_interval_ms": 100, "max_running_per_worker": 16,
    "slo_classes": {"interactive": {"ttft_s": 5, "priority": 1, "latency_sensitive": True},
                    "batch": {"ttft_s": 120, "priority": 0}},
    "models": {"llama-2-7b": {"kind": "llama", "max_context": 4096, "weight_bytes": 13480000000},
               "mistral-7b": {"kind": "llama", "max_context": 4096, "weight_bytes": 14480000000}},
}


def _run(policy: str, ops: list[str]) -> tuple[list[tuple], dict]:
    cfg = PolicyConfig.model_validate({**POLICY, "planner": {"policy": policy, "operations": ops}})
    fleet = uniform_fleet(2, "A100-80GB", ["llama-2-7b", "mistral-7b"], initial_models=["llama-2-7b"])
    wl = build_workload(load_trace(BUNDLED_AZURE_SLICE).head(300), WorkloadSpec(
        class_mix={"interactive": 0.3, "batch": 0.7}, model_mix={"llama-2-7b": 0.7, "mistral-7b": 0.3},
        load=4.0, max_context={"llama-2-7b": 4096, "mistral-7b": 4096}, seed=3))
    res = Simulation(cfg, fleet, wl, options=SimOptions()).run()
    rows = [(r.rid, r.worker_id, r.first_token_at, r.finished_at, r.generated, r.evictions) for r in res.requests]
    s = summarize(res)
    for k in ("sim_wall_s", "solve_ms_p50", "solve_ms_p99", "planner_wall_s"):  # wall-clock figures
        s.pop(k)
    return rows, s


def test_simulation_is_deterministic_and_serves_everything():
    """This test verifies that:
    1. two runs of the same workload and policy give identical per-request timelines and summaries;
    2. every request finishes with all its tokens, on a two-model fleet that needs model swaps;
    3. the plans come from the registered policy (its name is the plan source)."""
    rows1, s1 = _run("edf", ["evict", "kv_swap", "model_swap", "warm_start", "load_balance", "preempt"])
    rows2, s2 = _run("edf", ["evict", "kv_swap", "model_swap", "warm_start", "load_balance", "preempt"])
    assert rows1 == rows2 and s1 == s2
    assert s1["finished"] == s1["requests"] == 300
    assert all(r[3] is not None for r in rows1)
    assert s1["ops"].get("load_model", 0) >= 1
    assert "edf" in s1["plan_sources"]


def test_injected_scheduler_and_solve_time_charge():
    """This test verifies that:
    1. a policy object can be injected instead of a registry name (the simulator's trivial policy);
    2. with the planner's time charged, plans apply later but every request is still served."""
    from qlmserve.sim.trivial import LeastQueuedPolicy

    cfg = PolicyConfig.model_validate({**POLICY, "planner": {"policy": "fcfs", "operations": []}})
    fleet = uniform_fleet(2, "A100-80GB", ["llama-2-7b", "mistral-7b"], initial_models=["llama-2-7b", "mistral-7b"])
    wl = build_workload(load_trace(BUNDLED_AZURE_SLICE).head(200), WorkloadSpec(
        class_mix={"interactive": 0.3, "batch": 0.7}, model_mix={"llama-2-7b": 0.5, "mistral-7b": 0.5},
        load=4.0, max_context={"llama-2-7b": 4096, "mistral-7b": 4096}, seed=1))
    res = Simulation(cfg, fleet, wl, scheduler=LeastQueuedPolicy(cfg)).run()
    assert res.policy == "least-queued" and all(r.finished_at is not None for r in res.requests)
    assert res.plan_sources.get("least-queued", 0) > 0
    charged = Simulation(cfg, fleet, wl, options=SimOptions(charge_solve_time=True)).run()
    assert all(r.finished_at is not None for r in charged.requests)


@pytest.mark.parametrize("mode", [PreemptionMode.NONE, PreemptionMode.ITERATION, PreemptionMode.EXPERT])
def test_latency_sensitive_requests_join_a_full_batch_beyond_its_limit_unless_fcfs(mode):
    """This test verifies that, as every engine admits them (operations.batching.batch_limit):
    1. under ITERATION and EXPERT a latency-sensitive request handed to a worker whose batch
       is full starts at once, beyond the batch limit, and the best-effort batch keeps running;
    2. a best-effort request never joins beyond the limit;
    3. under NONE (FCFS) the latency-sensitive request waits for a slot like anyone else."""
    clock, sink, w = worker(mode=mode, batch=4)
    w.assign([sreq(f"be{i}", prompt=200, out=400) for i in range(4)], 0.0)
    w.poke(0.0)
    run_until(clock, 1.0)
    w.assign([sreq("be-late", prompt=200, out=10), sreq("ls", prompt=200, out=5, ls=True, arrival=1.0)], 1.0)
    w.poke(1.0)
    run_until(clock, 1.5)
    running = {r.rid for r in w.running}
    assert {f"be{i}" for i in range(4)} <= running and "be-late" not in running
    ls = next(r for r in w.running + w.joining + sink.finished if r.rid == "ls")
    if mode == PreemptionMode.NONE:
        assert ls.first_token_at is None and len(w.running) == 4
    else:
        assert ls.first_token_at is not None and ls.first_token_at - 1.0 < 0.2


def test_a_fail_fast_class_drops_what_missed_its_target_while_waiting():
    """This test verifies that:
    1. with `on_miss: fail_fast`, waiting requests whose TTFT target passed are failed by
       the shared rule (cluster_view.missed_while_waiting), never served, and counted
       (summary `failed_fast`); the run ends with every request accounted for;
    2. with the default `run_late` the same overloaded run serves every request late."""
    classes = {"interactive": {"ttft_s": 1.0, "priority": 2, "latency_sensitive": True},
               "batch": {"ttft_s": 5.0, "priority": 0}}
    wl = build_workload(load_trace(BUNDLED_AZURE_SLICE).head(200), WorkloadSpec(
        class_mix={"interactive": 0.3, "batch": 0.7}, model_mix={"llama-2-7b": 1.0}, load=30.0,
        max_context={"llama-2-7b": 4096}, seed=1))
    fleet = uniform_fleet(1, "A100-80GB", ["llama-2-7b"], max_batch_size=8)
    out = {}
    for on_miss in ("run_late", "fail_fast"):
        cfg = PolicyConfig.model_validate({**POLICY, "slo_classes": {k: {**v, "on_miss": on_miss}
                                                                     for k, v in classes.items()},
                                           "planner": {"policy": "fcfs", "operations": []}})
        res = Simulation(cfg, fleet, wl).run()
        out[on_miss] = (res, summarize(res))
    late, late_s = out["run_late"]
    fast, fast_s = out["fail_fast"]
    assert all(r.first_token_at is not None for r in late.requests)
    assert sum(c["failed_fast"] for c in late_s["classes"].values()) == 0
    failed = [r for r in fast.requests if r.failed]
    assert failed and all(r.first_token_at is None and r.finished_at is not None for r in failed)
    assert sum(c["failed_fast"] for c in fast_s["classes"].values()) == len(failed)
    assert all(r.finished_at is not None for r in fast.requests)
    assert fast_s["attainment"] >= late_s["attainment"]  # capacity goes to requests that can still make it


def test_prefill_budget_comes_from_the_policy():
    """This test verifies that:
    1. the simulated workers prefill at most the policy's max_prefill_tokens per iteration
       (the budget the controller sends real workers in Welcome), unless SimOptions
       overrides it;
    2. a prompt over the budget is prefilled in chunks: its first token comes after
       ceil(prompt / budget) iterations, each charged prefill_time(chunk)."""
    cfg = PolicyConfig.model_validate({**POLICY, "max_prefill_tokens": 512})
    fleet = uniform_fleet(1, "A100-80GB", ["llama-2-7b"])
    assert [w.max_prefill_tokens for w in Simulation(cfg, fleet, []).workers.values()] == [512]
    sim = Simulation(cfg, fleet, [], options=SimOptions(max_prefill_tokens=64))
    assert [w.max_prefill_tokens for w in sim.workers.values()] == [64]
    clock, sink = EventClock(), Sink()
    w = SimWorker(fleet.workers[0], clock, sink, max_prefill_tokens=512)
    a = sreq("a", prompt=1300, out=3)
    w.assign([a], 0.0)
    w.poke(0.0)
    clock.advance_to(100.0)
    p = w.profile
    assert a.first_token_at == pytest.approx(2 * p.prefill_time(512) + p.prefill_time(276))
    assert w.counters.prefill_tokens == 1300 and a.generated == 3
