"""Trace loaders on slices of the published files, and the workload builder."""

from __future__ import annotations

from pathlib import Path

import pytest

from qlmserve.traces import (
    BUNDLED_AZURE_SLICE,
    TraceError,
    WorkloadSpec,
    build_workload,
    detect_format,
    fit_lengths,
    load_trace,
)

DATA = Path(__file__).resolve().parent.parent / "data" / "traces"
MOONCAKE = DATA / "mooncake_fast25_synthetic_head30.jsonl"
LENGTHS = DATA / "sharegpt_8k_lengths_llama2tok_head50.csv"


def test_azure_slice_loads_as_published():
    """This test verifies that:
    1. the bundled Azure slice (CRLF, 7-decimal wall-clock timestamps) is detected and loads 2000 rows;
    2. arrivals are seconds from the first row, keeping the 100 ns digits;
    3. the lengths are the file's columns."""
    assert detect_format(BUNDLED_AZURE_SLICE) == "azure"
    t = load_trace(BUNDLED_AZURE_SLICE)
    assert len(t.records) == 2000 and t.real_arrivals
    first, second = t.records[0], t.records[1]
    # 18:15:46.6805900 -> 18:15:50.9951690
    assert second.arrival_s == pytest.approx(50.9951690 - 46.6805900, abs=1e-6)
    assert (first.prompt_tokens, first.output_tokens) == (374, 44)
    assert (second.prompt_tokens, second.output_tokens) == (396, 109)
    assert all(a.arrival_s <= b.arrival_s for a, b in zip(t.records, t.records[1:]))
    assert 4.0 < t.rate < 5.5


def test_mooncake_slice_loads_with_prefix_blocks():
    """This test verifies that:
    1. the Mooncake JSONL format is detected and its ms timestamps become seconds;
    2. hash_ids are kept (one per 512-token block) and the first one becomes a prefix id."""
    assert detect_format(MOONCAKE) == "mooncake"
    t = load_trace(MOONCAKE)
    assert len(t.records) == 30
    r0, r2 = t.records[0], t.records[2]
    assert (r0.prompt_tokens, r0.output_tokens) == (40160, 6)
    assert r2.arrival_s == pytest.approx(0.040)
    assert len(r0.hash_ids) == pytest.approx(r0.prompt_tokens / 512, abs=1)
    wl = build_workload(t, WorkloadSpec(class_mix={"c": 1}, model_mix={"m": 1}))
    assert wl[0].prefix_id == f"h{r0.hash_ids[0]}"


def test_length_table_gets_seeded_arrivals():
    """This test verifies that:
    1. a length table loads its prefill/decode columns;
    2. Poisson arrivals at the asked rate come from the seed (same seed, same times; another seed differs);
    3. gamma arrivals with cv > 1 are burstier than Poisson."""
    assert detect_format(LENGTHS) == "lengths"
    a = load_trace(LENGTHS, rate=5.0, seed=1)
    b = load_trace(LENGTHS, rate=5.0, seed=1)
    c = load_trace(LENGTHS, rate=5.0, seed=2)
    assert len(a.records) == 50 and not a.real_arrivals
    assert (a.records[0].prompt_tokens, a.records[0].output_tokens) == (74, 918)
    assert [r.arrival_s for r in a.records] == [r.arrival_s for r in b.records]
    assert [r.arrival_s for r in a.records] != [r.arrival_s for r in c.records]
    import numpy as np

    big = load_trace(LENGTHS, rate=5.0, seed=3, arrivals="gamma", cv=3.0)
    gaps_g = np.diff([r.arrival_s for r in big.records])
    gaps_p = np.diff([r.arrival_s for r in a.records])
    assert gaps_g.std() / gaps_g.mean() > gaps_p.std() / gaps_p.mean()


def test_bad_files_name_file_and_line(tmp_path):
    """This test verifies that:
    1. a wrong header names the file and line 1;
    2. a bad row names its line."""
    bad = tmp_path / "x.csv"
    bad.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:15:46.68,12,3\nnot-a-time,1,2\n")
    with pytest.raises(TraceError, match=r"x.csv:3"):
        load_trace(bad)
    hdr = tmp_path / "y.csv"
    hdr.write_text("a,b\n1,2\n")
    with pytest.raises(TraceError, match=r"y.csv:1"):
        load_trace(hdr)


def test_workload_builder_scales_loops_and_assigns():
    """This test verifies that:
    1. a load multiplier divides arrival times;
    2. replaying over a window longer than the scaled trace loops it back to back and fills the window;
    3. class and model shares follow the mix, reproducibly for a seed;
    4. lengths are clipped to the model's context."""
    t = load_trace(BUNDLED_AZURE_SLICE)
    spec = WorkloadSpec(class_mix={"ls": 0.2, "be": 0.8}, model_mix={"a": 0.5, "b": 0.5}, load=2.0,
                        max_context={"a": 512, "b": 4096}, seed=7)
    once = build_workload(t, spec)
    assert len(once) == 2000
    assert once[1].arrival == pytest.approx(t.records[1].arrival_s / 2)
    window = 3 * t.period_s / 2.0
    looped = build_workload(t, WorkloadSpec(class_mix={"ls": 0.2, "be": 0.8}, model_mix={"a": 0.5, "b": 0.5},
                                            load=2.0, window_s=window, max_context={"a": 512, "b": 4096}, seed=7))
    assert 5900 <= len(looped) <= 6000
    assert max(r.arrival for r in looped) < window
    assert {r.loop for r in looped} == {0, 1, 2}
    assert looped[2000].arrival == pytest.approx(t.period_s / 2.0)
    ls_share = sum(r.slo_class == "ls" for r in looped) / len(looped)
    assert 0.17 < ls_share < 0.23
    assert all(r.prompt_tokens + r.output_tokens <= 512 for r in looped if r.model == "a")
    again = build_workload(t, WorkloadSpec(class_mix={"ls": 0.2, "be": 0.8}, model_mix={"a": 0.5, "b": 0.5},
                                           load=2.0, window_s=window, max_context={"a": 512, "b": 4096}, seed=7))
    assert again == looped


def test_fit_lengths_keeps_an_output():
    """This test verifies that:
    1. a pair that fits is unchanged;
    2. an over-long prompt is cut so that at least `min_output` tokens remain for the output."""
    assert fit_lengths(100, 50, 4096) == (100, 50)
    assert fit_lengths(5000, 300, 4096) == (4095, 1)
    assert fit_lengths(5000, 300, 4096, min_output=16) == (4080, 16)
    assert fit_lengths(1000, 5000, 4096) == (1000, 3096)
