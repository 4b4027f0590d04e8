"""Chat messages -> prompt token ids: the model's own chat template where its tokenizer
has one, else a plain template (the tiny and simulated models have none)."""

from __future__ import annotations

from qlmserve.controller.exceptions import InvalidRequest
from qlmserve.controller.tokenizers import TokenizerCache


def plain_template(messages: list[dict[str, str]]) -> str:
    """`role: content` lines, then `assistant:` for the model to continue."""
    return "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"


def render(tokenizers: TokenizerCache, model: str, messages: list[dict[str, str]]) -> list[int]:
    """Prompt token ids of a conversation (call off the event loop: it tokenizes)."""
    tok = tokenizers.get(model)
    if tok is not None and getattr(tok, "chat_template", None):
        try:
            text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        except Exception as exc:  # noqa: BLE001 - templates raise what they like (e.g. roles must alternate)
            raise InvalidRequest(f"field 'messages': the model's chat template refused them: "
                                 f"{str(exc)[:200]}") from None
        return list(tok.encode(text, add_special_tokens=False))  # the template writes its special tokens
    return tokenizers.encode(model, plain_template(messages))
