"""The HTTP API in front of a real tiny Hugging Face model: text, stop strings and chat
over a real tokenizer (the simulated engine's tokens have no text)."""

from __future__ import annotations

from pathlib import Path

import openai
import pytest

from qlmserve.controller.runtime import ControllerRuntime, RuntimeOptions

pytestmark = [pytest.mark.integration, pytest.mark.gpu]

POLICY = """
tick_interval_ms: 50
heartbeat_timeout_s: 10
default_slo_class: batch
slo_classes:
  interactive: {{ttft_s: 5.0, priority: 10, latency_sensitive: true}}
  batch: {{ttft_s: 60.0}}
models:
  tiny-mixtral: {{path: {path}, kind: mixtral, tiny_seed: 0, max_context: 512}}
planner: {{policy: qlm}}
access: {{anonymous_clients: true}}
"""


async def test_text_stop_strings_and_chat_over_a_real_tokenizer(redis_url: str, prefix: str, tmp_path: Path):
    """This test verifies that, greedy, against an HF worker:
    1. a completion's text is the tokenizer's decoding of the token ids stored in Redis,
       streamed or not;
    2. a stop string ends the text just before its first occurrence (finish_reason 'stop'),
       streamed or not, and the rest of the request is cancelled;
    3. a chat completion's prompt is the plain template's tokens (the tiny tokenizer has
       no chat template)."""
    model_dir = tmp_path / "tiny-mixtral"
    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY.format(path=model_dir))
    rt = await ControllerRuntime(RuntimeOptions(policy_path=str(policy), redis_url=redis_url, prefix=prefix,
                                                worker_log_dir=str(tmp_path / "logs"), http_port=0,
                                                data_dir=str(tmp_path / "data"))).start()
    rt.workers.append(rt.spawn_worker("hf-0", ["--preload", "tiny-mixtral", "--device", "cpu"]))
    try:
        await rt.wait_for_workers(1, timeout_s=120)
        store, tok = rt.controller.store, rt.controller.tokenizers.get("tiny-mixtral")
        cl = openai.AsyncOpenAI(base_url=rt.http.url + "/v1", api_key="EMPTY", max_retries=0, timeout=120)
        args = {"model": "tiny-mixtral", "prompt": "the queue holds", "max_tokens": 24, "temperature": 0}
        full = await cl.completions.create(**args)
        text = full.choices[0].text
        ids = await store.generated_ids(full.id.removeprefix("cmpl-"))
        assert text == tok.decode(ids, skip_special_tokens=True) and len(ids) == full.usage.completion_tokens > 8
        chunks = [c async for c in await cl.completions.create(**args, stream=True)]
        assert "".join(c.choices[0].text for c in chunks) == text

        k = next(i for i in range(3, len(text) - 2) if text.find(text[i:i + 2]) == i and text[i:i + 2].strip())
        stop = text[k:k + 2]
        cut = await cl.completions.create(**args, stop=[stop])
        assert cut.choices[0].text == text[:k] and cut.choices[0].finish_reason == "stop"
        chunks = [c async for c in await cl.completions.create(**args, stop=[stop], stream=True)]
        assert "".join(c.choices[0].text for c in chunks) == text[:k]
        assert chunks[-1].choices[0].finish_reason == "stop"
        req = await store.get_request(cut.id.removeprefix("cmpl-"))
        assert req.status.value in ("cancelled", "finished")

        chat = await cl.chat.completions.create(model="tiny-mixtral", messages=[{"role": "user", "content": "hi"}],
                                                max_tokens=5, temperature=0)
        assert chat.usage.prompt_tokens == len(tok.encode("user: hi\nassistant:"))
        assert chat.choices[0].message.content == tok.decode(
            await store.generated_ids(chat.id.removeprefix("chatcmpl-")), skip_special_tokens=True)
    finally:
        await rt.stop()
