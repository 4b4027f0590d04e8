"""Token ids to text: one rule for the text a worker streams and the text the controller
rebuilds from stored ids (a reader who resumes after the stream was read and trimmed gets
what a live reader got).

A model with a tokenizer decodes with it, special tokens skipped. A simulated model has
none: its ids are UTF-8 bytes (the controller tokenizes its text prompts that way), and
ids past 255 carry no text. A stream holds back a trailing incomplete UTF-8 sequence
(it decodes to U+FFFD) until a later token completes it; one still incomplete when the
request ends is never shown."""

from __future__ import annotations

REPLACEMENT = "\ufffd"
# Tokens an incomplete character can span: a UTF-8 sequence is at most 4 bytes.
MAX_PENDING_TOKENS = 4


def decode(tokenizer, ids: list[int]) -> str:
    """The text of `ids` (`tokenizer` None: a simulated model's byte ids)."""
    if tokenizer is None:
        return bytes(i for i in ids if 0 <= i < 256).decode("utf-8", errors="replace")
    return tokenizer.decode(ids, skip_special_tokens=True)


def streamed_text(tokenizer, ids: list[int]) -> str:
    """The text a stream of `ids` has shown once all of them are in: the decoding of the
    longest prefix that does not end in an incomplete character."""
    for n in range(len(ids), max(-1, len(ids) - MAX_PENDING_TOKENS - 1), -1):
        text = decode(tokenizer, ids[:n])
        if not text.endswith(REPLACEMENT):
            return text
    return decode(tokenizer, ids).rstrip(REPLACEMENT)


def next_piece(tokenizer, ids: list[int], shown: str) -> str | None:
    """The text to stream after `shown` now that `ids` are in; None to hold back (an
    incomplete character at the end, or a decoding that rewrote what was shown)."""
    text = decode(tokenizer, ids)
    if text.endswith(REPLACEMENT) or not text.startswith(shown):
        return None
    return text[len(shown):]
