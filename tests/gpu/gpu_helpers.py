"""Shared helpers of the tests/gpu suite: engines, requests and HF generate() references."""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path

import torch

from qlmserve.backends.engine import EngineRequest, PreemptionMode, TokenEvent
from qlmserve.backends.hf.engine import HFEngine
from qlmserve.operations.model_spec import ModelSpec


def make_engine(paths: dict[str, tuple[str, Path]], device: str, *, active: str | None = None,
                max_batch_size: int = 4, preemption: PreemptionMode = PreemptionMode.NONE,
                **kwargs: object) -> HFEngine:
    """paths: model name -> (kind, folder). float32 so batched and alone agree bit-closely."""
    models = {name: ModelSpec(path=str(p), kind=kind, max_context=256) for name, (kind, p) in paths.items()}
    return HFEngine(models, device=device, max_batch_size=max_batch_size, dtype=torch.float32,
                    preemption=preemption, initial_model=active or next(iter(paths)), **kwargs)


def make_requests(n: int, model: str = "m", *, seed: int = 0, max_tokens: int = 10,
                  min_prompt: int = 3, max_prompt: int = 40, **fields: object) -> list[EngineRequest]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        length = int(torch.randint(min_prompt, max_prompt + 1, (1,), generator=g))
        prompt = torch.randint(3, 500, (length,), generator=g).tolist()
        out.append(EngineRequest(f"{model}-r{i}", model, prompt, max_tokens=max_tokens, **fields))
    return out


@functools.lru_cache(maxsize=8)
def _reference_model(folder: str, device: str):  # noqa: ANN202
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).to(device).eval()


def reference_tokens(folder: Path, device: str, request: EngineRequest) -> list[int]:
    """HF generate() greedy output of the request alone (its whole output, from scratch)."""
    model = _reference_model(str(folder), device)
    ids = torch.tensor([request.prompt_token_ids], device=device)
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=request.max_tokens,
                             do_sample=False, pad_token_id=0)
    return out[0, ids.shape[1]:].tolist()


def run_until_idle(engine: HFEngine, *, on_step: Callable[[int], None] | None = None,
                   max_steps: int = 10_000) -> dict[str, list[TokenEvent]]:
    """Step until the engine has no work; returns the events per request."""
    events: dict[str, list[TokenEvent]] = {}
    for i in range(max_steps):
        if on_step is not None:
            on_step(i)
        if not engine.has_work():
            break
        for e in engine.step():
            events.setdefault(e.request_id, []).append(e)
    else:
        raise AssertionError("engine did not become idle")
    return events


def tokens_of(events: dict[str, list[TokenEvent]]) -> dict[str, list[int]]:
    return {rid: [e.token_id for e in evs] for rid, evs in events.items()}


def check_events(events: list[TokenEvent], first_index: int = 0) -> None:
    """Indices are consecutive and exactly the last event is marked finished."""
    assert [e.index for e in events] == list(range(first_index, first_index + len(events)))
    assert [e.finished for e in events] == [False] * (len(events) - 1) + [True]
    assert events[-1].finish_reason is not None
