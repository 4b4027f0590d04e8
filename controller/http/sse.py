"""Server-sent events and the OpenAI response objects (completion, chat completion,
their stream chunks).

Every streamed chunk also carries `qlm_offset` (the index of its first token) and
`qlm_token_ids`, so that a client that drops can resume at the right token through
GET /v1/requests/{id}/stream?offset=K (clients that do not know them ignore them)."""

from __future__ import annotations

import json

DONE = b"data: [DONE]\n\n"


def event(obj: dict) -> bytes:
    return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion_id(rid: str, chat: bool) -> str:
    return ("chatcmpl-" if chat else "cmpl-") + rid


def chunk(rid: str, model: str, created: int, chat: bool, text: str, finish_reason: str | None,
          offset: int, token_ids: list[int], use: dict | None = None, first: bool = False) -> dict:
    if chat:
        delta: dict = {"content": text}
        if first:
            delta["role"] = "assistant"
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        obj = "chat.completion.chunk"
    else:
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}
        obj = "text_completion"
    out = {"id": completion_id(rid, chat), "object": obj, "created": created, "model": model, "choices": [choice],
           "qlm_offset": offset, "qlm_token_ids": token_ids}
    if use is not None:
        out["usage"] = use
    return out


def response(rid: str, model: str, created: int, chat: bool, text: str, finish_reason: str, use: dict) -> dict:
    if chat:
        choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                  "finish_reason": finish_reason}
        obj = "chat.completion"
    else:
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}
        obj = "text_completion"
    return {"id": completion_id(rid, chat), "object": obj, "created": created, "model": model, "choices": [choice],
            "usage": use}
