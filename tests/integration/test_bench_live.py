"""`qlm bench live` end to end, small: the real stack against the simulator's prediction."""

from __future__ import annotations

import pytest

from qlmserve.bench.live import LiveOptions, print_report, run
from qlmserve.ui import console

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_bench_live_runs_the_real_stack_beside_the_prediction(tmp_path):
    """This test verifies that:
    1. `qlm bench live` starts a private Redis, the controller and one simulated worker
       process per fleet worker, replays the scenario's workload through gRPC and gets
       every request's tokens back (no unserved request, tokens equal to the trace's
       output lengths coded into the prompts);
    2. the live figures sit beside the simulator's prediction of the same run, and on
       this uncongested run both meet every SLO."""
    opts = LiveOptions(scenario="a", policies=("fcfs",), load=1.0, workers=2, window_s=20.0, slowdown=1.0,
                       out=str(tmp_path))
    report = run(opts, console())
    print_report(console(), report)
    (r,) = report.runs
    live, predicted = r["live"], r["predicted"]
    assert live["requests"] == predicted["requests"] > 0
    assert live["finished"] == live["requests"]
    assert sum(c["unserved"] for c in live["classes"].values()) == 0
    assert live["client_errors"]["count"] == 0
    assert live["attainment"] == predicted["attainment"] == 1.0
    assert abs(live["throughput_tok_s"] - predicted["throughput_tok_s"]) / predicted["throughput_tok_s"] < 0.25


def test_bench_live_finds_the_load_on_the_prediction(tmp_path):
    """This test verifies that:
    1. `--find-load fcfs=0.5` searches the load on the simulator's prediction of the same
       fleet and workload, every step recorded, and the run uses the load it chose;
    2. `--predict-only` gives the prediction alone (no live run), and the report prints it."""
    opts = LiveOptions(scenario="a", policies=("fcfs",), workers=2, window_s=20.0, find_load="fcfs=0.5",
                       predict_only=True, out=str(tmp_path))
    report = run(opts, console())
    print_report(console(), report)
    search = report.setup["load_search"]
    assert search["baseline"] == "fcfs" and len(search["steps"]) >= 2
    assert report.setup["load"] == search["load"] in [s["load"] for s in search["steps"]]
    (r,) = report.runs
    assert "live" not in r
    closest = min(abs(s["attainment"] - 0.5) for s in search["steps"])
    assert abs(r["predicted"]["attainment"] - 0.5) == pytest.approx(closest)
