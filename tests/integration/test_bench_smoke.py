"""Short runs of `qlm bench chaos` and `qlm bench overload` (the full campaigns are the
commands themselves; the README gives their figures)."""

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
