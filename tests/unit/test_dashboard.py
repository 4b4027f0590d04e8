"""The Grafana dashboard (configs/grafana/qlm-dashboard.json) charts what the controller
exports: every query names only metrics of controller/metrics.py, and every metric
there is charted."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from qlmserve.controller.metrics import ControllerMetrics

pytestmark = pytest.mark.unit

DASHBOARD = Path(__file__).resolve().parents[2] / "configs" / "grafana" / "qlm-dashboard.json"
METRIC = re.compile(r"\bqlm_[a-z0-9_]+\b")


def _panels(panels: list[dict]):
    for p in panels:
        yield p
        yield from _panels(p.get("panels", []))


def test_every_query_names_an_exported_metric():
    """This test verifies that:
    1. the dashboard is valid JSON with panels, each chart with at least one query;
    2. every `qlm_*` name in a query or template variable is a series the controller
       exports (histogram _bucket/_sum/_count, counter _total, gauge);
    3. every metric family the controller exports appears in some query."""
    dash = json.loads(DASHBOARD.read_text())
    exported = ControllerMetrics().exported_names()
    queries = []
    charts = [p for p in _panels(dash["panels"]) if p["type"] != "row"]
    assert charts
    for p in charts:
        assert p.get("targets"), p["title"]
        queries += [t["expr"] for t in p["targets"]]
    queries += [v["query"] for v in dash["templating"]["list"] if v["type"] == "query"]
    used = {name for q in queries for name in METRIC.findall(q)}
    assert used and used <= exported, sorted(used - exported)
    families = {m.name for m in ControllerMetrics().registry.collect()}
    charted = {f for f in families if used & {f + s for s in ("", "_total", "_bucket", "_sum", "_count")}}
    assert charted == families, sorted(families - charted)
