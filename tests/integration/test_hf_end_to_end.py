"""A real tiny Hugging Face MoE model behind the whole control plane."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import torch

from qlmserve.client import QlmClient, submit_request
from qlmserve.controller.runtime import ControllerRuntime, RuntimeOptions

pytestmark = [pytest.mark.integration, pytest.mark.gpu]

POLICY = """
tick_interval_ms: 50
heartbeat_timeout_s: 10
max_running_per_worker: 8
slo_classes:
  interactive: {{ttft_s: 5.0, priority: 10, latency_sensitive: true}}
  batch: {{ttft_s: 60.0}}
models:
  tiny-mixtral: {{path: {path}, kind: mixtral, tiny_seed: 0, max_context: 512}}
planner: {{policy: qlm}}
access: {{anonymous_clients: true}}
"""


async def test_real_model_tokens_match_generate(redis_url: str, prefix: str, tmp_path: Path):
    """This test verifies that:
    1. a worker running the HF engine serves requests submitted over gRPC, through Redis;
    2. with greedy decoding, the streamed tokens equal Hugging Face `generate()` on the
       same prompt, for several concurrent requests of different lengths;
    3. a text prompt is tokenized by the controller and streamed back as text."""
    model_dir = tmp_path / "tiny-mixtral"
    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY.format(path=model_dir))
    rt = await ControllerRuntime(RuntimeOptions(policy_path=str(policy), redis_url=redis_url, prefix=prefix,
                                                worker_log_dir=str(tmp_path / "logs"),
                                                data_dir=str(tmp_path / "data"))).start()
    rt.workers.append(rt.spawn_worker("hf-0", ["--preload", "tiny-mixtral", "--device", "cpu"]))
    try:
        await rt.wait_for_workers(1, timeout_s=120)
        prompts = [[5 + i, 17, 33, 40 + 3 * i, 9] * (i + 1) for i in range(4)]
        async with QlmClient(rt.address) as client:
            results = await asyncio.wait_for(asyncio.gather(*(
                client.generate_reliably(submit_request("tiny-mixtral", prompt_token_ids=p, max_tokens=12,
                                                        slo_class="batch")) for p in prompts)), timeout=120)
            text = await asyncio.wait_for(client.generate_reliably(
                submit_request("tiny-mixtral", prompt="hello queue", max_tokens=6, slo_class="interactive")), 60)
    finally:
        await rt.stop()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    for prompt, res in zip(prompts, results):
        with torch.no_grad():
            out = model.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False)
        expected = out[0, len(prompt):].tolist()
        assert res.token_ids == expected
    tok = AutoTokenizer.from_pretrained(model_dir)
    assert text.token_ids and text.text == tok.decode(text.token_ids, skip_special_tokens=True)
