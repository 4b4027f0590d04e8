"""Short runs of `qlm bench chaos`, `qlm bench overload` and `qlm bench-submit` (the full
campaigns are the commands themselves; the README gives their figures)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from tests.utils import qlm_cmd

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_chaos_smoke(tmp_path: Path):
    """This test verifies that one SIGKILL of each component (leader, standby, worker,
    Redis) under load loses no acknowledged request and duplicates no token, and that each
    component recovers."""
    out = tmp_path / "chaos.json"
    p = subprocess.run(qlm_cmd("bench", "chaos", "--kills", "1", "--interval", "1.0", "--rate", "3",
                               "--keep", str(tmp_path / "run"), "--json", str(out)),
                       capture_output=True, text=True, timeout=280)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res["acknowledged"] > 0 and res["lost"] == 0 and res["duplicated_tokens"] == 0
    assert all(v["kills"] == 1 for v in res["recovery"].values())


def test_overload_smoke(tmp_path: Path):
    """This test verifies that at 5x the sustained rate the excess is refused, every
    refusal carries a retry hint, and nothing acknowledged is lost."""
    out = tmp_path / "overload.json"
    p = subprocess.run(qlm_cmd("bench", "overload", "--duration", "10", "--calibrate-s", "3", "--max-queued", "60",
                               "--json", str(out)),
                       capture_output=True, text=True, timeout=280)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res["lost"] == 0 and res["totals"]["refused"] > 0
    assert res["totals"]["refused_with_hint"] == res["totals"]["refused"]


def test_submit_bench_smoke(tmp_path: Path):
    """This test verifies that `qlm bench-submit` measures unary Submit and SubmitBatch side
    by side: every submission of each row acknowledged, the calls in flight being the
    submissions in flight over the batch size, and the controller's CPU counted."""
    out = tmp_path / "submit.json"
    p = subprocess.run(qlm_cmd("bench-submit", "--requests", "96", "--concurrency", "16", "--batch", "1,8",
                               "--json", str(out)), capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    rows = json.loads(out.read_text())
    assert [(r["batch"], r["concurrency"], r["calls_in_flight"], r["requests"]) for r in rows] == [
        (1, 16, 16, 96), (8, 16, 2, 96)]
    # CPU time comes in clock ticks (10 ms): a short run may count none.
    assert all(r["accepted_per_s"] > 0 and r["controller_cpu_us_per_req"] >= 0 for r in rows)
