"""Policy YAML: validated on load, errors that name the file, the line and the field."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import pytest
import yaml

from qlmserve.controller.policies import create_policy, policy_names
from qlmserve.controller.policy import PolicyError, load_policy, parse_policy
from qlmserve.controller.runtime import default_policy

pytestmark = pytest.mark.unit
CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def _policy_files() -> list[Path]:
    return sorted(p for p in CONFIGS.glob("*.yaml") if "slo_classes" in (yaml.safe_load(p.read_text()) or {}))


@pytest.mark.parametrize("path", _policy_files(), ids=lambda p: p.name)
def test_every_policy_in_configs_loads(path: Path):
    """This test verifies that:
    1. every policy file shipped in configs/ validates;
    2. its planner policy name exists in the registry."""
    cfg = load_policy(path)
    assert cfg.slo_classes and cfg.models
    create_policy(cfg.planner.policy, cfg)


def test_embedded_default_policy(tmp_path: Path):
    """This test verifies that:
    1. the embedded default policy validates and names two models with tiny seeds;
    2. their relative paths resolve against the data folder."""
    cfg = default_policy(tmp_path)
    assert len(cfg.models) == 2
    for spec in cfg.models.values():
        assert spec.tiny_seed is not None and Path(spec.path).parent == tmp_path / "models"
    assert cfg.planner.policy in policy_names()
    text = resources.files("qlmserve").joinpath("data/default_policy.yaml").read_text()
    assert parse_policy(text).slo_classes["interactive"].latency_sensitive


GOOD = """\
slo_classes:
  interactive:
    ttft_s: 2
models:
  m:
    max_context: 128
"""


@pytest.mark.parametrize("text, line, field, words", [
    (GOOD.replace("ttft_s: 2", "ttft_s: -2"), 3, "slo_classes.interactive.ttft_s", "greater than 0"),
    (GOOD.replace("ttft_s: 2", "ttft_s: 2\n    colour: red"), 4, "slo_classes.interactive.colour", "Extra inputs"),
    (GOOD.replace("max_context: 128", "max_context: lots"), 6, "models.m.max_context", "integer"),
    (GOOD + "planner:\n  operations: [evict, teleport]\n", 8, "planner.operations.1", "evict"),
    (GOOD + "default_slo_class: gold\n", None, "<root>", "'gold' is not one of"),
    (GOOD + "max_prefill_tokens: 0\n", 7, "max_prefill_tokens", "greater than or equal to 1"),
    ("models: {m: {}}\n", None, "slo_classes", "Field required"),
])
def test_invalid_policy_names_file_line_field(text: str, line: int | None, field: str, words: str, tmp_path: Path):
    """This test verifies that:
    1. an invalid policy raises PolicyError;
    2. the message names the file, the line (where the field has one) and the field."""
    path = tmp_path / "policy.yaml"
    path.write_text(text)
    with pytest.raises(PolicyError) as ei:
        load_policy(path)
    msg = str(ei.value)
    where = f"{path}:{line}:" if line else f"{path}"
    assert msg.startswith(where), msg
    assert f"field '{field}'" in msg and words in msg, msg


def test_yaml_syntax_error_and_missing_file(tmp_path: Path):
    """This test verifies that:
    1. broken YAML is reported with its line;
    2. a missing file is a PolicyError, not a traceback."""
    path = tmp_path / "p.yaml"
    path.write_text("slo_classes:\n  a: {ttft_s: 1\nmodels: {}\n")
    with pytest.raises(PolicyError, match=r"p.yaml:\d+: invalid YAML"):
        load_policy(path)
    with pytest.raises(PolicyError, match="cannot read policy"):
        load_policy(tmp_path / "absent.yaml")


def test_unknown_policy_name_lists_valid_ones():
    """This test verifies that:
    1. an unknown planner policy name raises ValueError listing the valid names."""
    cfg = parse_policy(GOOD + "planner: {policy: magic}\n")
    with pytest.raises(ValueError, match="valid policies: .*edf.*fcfs"):
        create_policy(cfg.planner.policy, cfg)
