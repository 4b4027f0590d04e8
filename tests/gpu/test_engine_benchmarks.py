"""The HF engine benchmarks measure what they say: the same work on both sides."""

from __future__ import annotations

import dataclasses

import pytest

from qlmserve.backends.engine import PreemptionMode
from qlmserve.bench.chunked import ChunkedOptions
from qlmserve.bench.chunked import run as run_chunked
from qlmserve.bench.engine import EngineBenchOptions, bench_throughput
from qlmserve.bench.preemption import PreemptionOptions, build_workload, run_mode, summarize

pytestmark = pytest.mark.gpu


def test_throughput_bench_compares_equal_work(tiny_models):
    """This test verifies that: 1. the throughput benchmark's engine and generate() produce
    the same tokens for every prompt (prompts reaching eos early are left out, so both
    emit max_tokens per sequence); 2. in lockstep each side ran one step per token, the
    first being the prefill: decode token counts are equal; 3. every timing is positive."""
    opts = EngineBenchOptions(batch=3, prompt_len=8, max_tokens=6, reps=1)
    r = bench_throughput(opts, tiny_models["mixtral"])
    assert r["engine_matches_generate"] == 3
    rep = r["reps"][0]
    assert rep["engine_tokens"] == rep["generate_tokens"] == 3 * 6
    assert rep["engine_decode_tokens"] == rep["generate_decode_tokens"] == 3 * 5
    assert all(v > 0 for k, v in rep.items() if k.endswith("_s"))
    assert r["ratio_decode_cpu"] > 0


def test_preemption_bench_runs_the_same_work_in_every_mode(tiny_models, tmp_path):
    """This test verifies that: 1. FCFS and EXPERT runs of one backlog round both finish
    all its requests; 2. they produce the same BE tokens (same requests to completion),
    so BE tokens per CPU-second compare the cost of one job; 3. the machine-speed
    normalisation found plain full-batch decode passes in both runs."""
    # A length table in the published ShareGPT-lengths format, so the test needs no shared/ folder.
    table = tmp_path / "lengths.csv"
    rows = [(900, 300), (2400, 500), (400, 120), (3100, 700), (1500, 410), (700, 90), (2000, 380), (1100, 260)]
    table.write_text("num_prefill_tokens,num_decode_tokens,num_total_tokens,pd_ratio\n"
                     + "".join(f"{p},{d},{p + d},{p / d}\n" for p, d in rows * 8))
    opts = PreemptionOptions(window_s=0.5, max_batch_size=4, be_backlog=2, be_stream=1.0, trace=str(table))
    work = build_workload(dataclasses.replace(opts, seed=3), capacity=6.0)
    assert work.arrivals and work.be_lengths
    runs = {m: run_mode(opts, tiny_models["mixtral"], m, work) for m in (PreemptionMode.NONE, PreemptionMode.EXPERT)}
    none, expert = runs[PreemptionMode.NONE], runs[PreemptionMode.EXPERT]
    assert none["complete"] and expert["complete"]
    assert none["be_tokens"] == expert["be_tokens"] > 0
    assert none["ls_tokens"] == expert["ls_tokens"] > 0
    assert len(expert["ls_ttft"]) == expert["ls_requests"] == len(work.arrivals)
    for r in runs.values():
        assert r["full_batch_step_cpu_s"] > 0 and r["engine_cost_steps"] > 0
    summary = summarize(PreemptionMode.EXPERT, [expert])
    assert summary["be_tokens_per_engine_cpu_s"] > 0 and summary["be_tokens_per_step"] > 0


def test_chunked_prefill_bench_runs_the_same_work_per_budget(tiny_models):
    """This test verifies that: 1. every budget's runs produce the same BE tokens (the
    same requests to completion), so BE tokens per second compare one job; 2. a budget
    below the BE prompts takes more prefill passes than none; 3. every LS request got
    its first token, timed on both clocks."""
    opts = ChunkedOptions(budgets=[16], rounds=1, be_requests=2, be_prompt=40, be_output=3, ls_prompt=8,
                          ls_output=2)
    report = run_chunked(opts, tiny_models["mixtral"])
    none, chunked = report["rows"]
    runs = report["runs"]
    assert {r["be_tokens"] for rs in runs.values() for r in rs} == {2 * 3}
    assert chunked["budget"] == 16 and chunked["prefill_passes"] > none["prefill_passes"]
    assert all(r["ls_ttft_s"] > 0 and r["ls_ttft_cpu_s"] > 0 for rs in runs.values() for r in rs)
    assert none["be_tok_per_cpu_s_ratio"] == 1.0 and chunked["be_tok_per_cpu_s"] > 0
