"""Fixtures of the tests that run real (tiny) Hugging Face models: the models are built
once per session into a temporary folder, with seeded random weights (no download)."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers is imported anywhere

from pathlib import Path

import pytest
import torch

from qlmserve.tiny_models import TINY_KINDS, ensure_tiny_model

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(scope="session", autouse=True)
def _few_threads() -> None:
    # The CI box has two cores shared with other jobs; tiny models gain nothing from more.
    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = Path(os.environ.get("QLM_TINY_MODELS") or tmp_path_factory.mktemp("tiny-models"))
    return {kind: ensure_tiny_model(kind, root / kind, seed=0) for kind in TINY_KINDS}


@pytest.fixture(params=DEVICES)
def device(request: pytest.FixtureRequest) -> str:
    return request.param
