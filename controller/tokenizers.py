"""Tokenizers of the policy's models, loaded lazily from their local folders.

A model without a folder (a simulated model) tokenizes text as UTF-8 bytes, so that
text prompts still have a deterministic length."""

from __future__ import annotations

import threading
from collections.abc import Mapping
from typing import TYPE_CHECKING

from qlmserve.operations import detokenize

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from qlmserve.operations.model_spec import ModelSpec


class TokenizerCache:
    def __init__(self, models: Mapping[str, ModelSpec]) -> None:
        self.models = dict(models)
        self._cache: dict[str, PreTrainedTokenizerBase | None] = {}
        self._lock = threading.Lock()

    def get(self, model: str) -> PreTrainedTokenizerBase | None:
        with self._lock:
            if model not in self._cache:
                spec = self.models[model]
                tok = None
                if spec.path:
                    from transformers import AutoTokenizer

                    tok = AutoTokenizer.from_pretrained(spec.path, local_files_only=True)
                self._cache[model] = tok
            return self._cache[model]

    def load_all(self) -> None:
        """Load every tokenizer now (at start-up, off the event loop), not on first use."""
        for model in self.models:
            self.get(model)

    def encode(self, model: str, text: str) -> list[int]:
        tok = self.get(model)
        if tok is None:
            return list(text.encode("utf-8"))
        return list(tok.encode(text, add_special_tokens=True))

    def decode(self, model: str, ids: list[int]) -> str:
        return detokenize.decode(self.get(model), ids)

    def streamed_text(self, model: str, ids: list[int]) -> str:
        """The text a worker's stream of `ids` showed (operations/detokenize.py)."""
        return detokenize.streamed_text(self.get(model), ids)

    def vocab_size(self, model: str) -> int | None:
        """None for byte-tokenized (simulated) models: any id is accepted."""
        tok = self.get(model)
        return None if tok is None else len(tok)
