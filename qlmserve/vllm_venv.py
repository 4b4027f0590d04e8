"""Where the vLLM virtualenv lives (`make vllm` creates `.venv-vllm`).

vLLM pins its own torch and transformers, so it gets a virtualenv of its own; a vLLM
worker (`qlm worker --engine vllm`) runs from there. Controllers, tests and benchmarks
in the main virtualenv start it through these paths. QLM_VLLM_PYTHON names another
interpreter.
"""

from __future__ import annotations

import os
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
VLLM_PYTHON_ENV = "QLM_VLLM_PYTHON"
DEFAULT_VENV = REPO / ".venv-vllm"
# `make vllm` writes it last: a virtualenv without it is a half-finished install.
INSTALLED_STAMP = ".installed"


def vllm_python() -> Path | None:
    """The Python of the vLLM virtualenv, or None where there is none (or it is unfinished)."""
    named = os.environ.get(VLLM_PYTHON_ENV)
    if named:
        return Path(named) if Path(named).is_file() else None
    python = DEFAULT_VENV / "bin" / "python"
    return python if python.is_file() and (DEFAULT_VENV / INSTALLED_STAMP).is_file() else None


def vllm_qlm() -> Path | None:
    """The `qlm` entry point of the vLLM virtualenv."""
    python = vllm_python()
    qlm = python.parent / "qlm" if python else None
    return qlm if qlm is not None and qlm.is_file() else None
