"""Tiny models with seeded random weights, built locally (no hub download).

Each kind is a real `transformers` class (MixtralForCausalLM, Qwen2MoeForCausalLM, ...)
so the engine walks exactly the layers a full-size checkpoint has; only the sizes are
small. The folder holds what `from_pretrained` needs: config, safetensors weights,
generation config and a byte-level BPE tokenizer trained on a small built-in text, so
`AutoTokenizer.from_pretrained(folder)` and `AutoModelForCausalLM.from_pretrained(folder)`
work offline.

A `qlm-tiny.json` marker records the build spec; `ensure_tiny_model` rebuilds only when
the folder is missing or the spec differs, so test sessions and benchmarks reuse it.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from transformers import PretrainedConfig, PreTrainedTokenizerFast

TINY_KINDS = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "llama")
MARKER = "qlm-tiny.json"
# Bump when the build recipe changes so stale folders are rebuilt.
_RECIPE_VERSION = 1

SPECIAL_TOKENS = ("<pad>", "<s>", "</s>")  # ids 0, 1, 2: pad, bos, eos

# Training text for the tokenizer: a few paragraphs are enough for a 512-entry byte-level
# BPE (the 256 byte symbols guarantee every string is encodable; merges only shorten it).
_CORPUS = """\
Queue management for large language model serving decides which request runs where and when.
A request waits in a queue, joins a running batch, produces its first token, then one token per
iteration until it reaches a stop token or its token limit. Latency-sensitive requests have a
short time-to-first-token target; best-effort requests only need to finish eventually.
The controller groups requests that arrived close together and that share a model and a class,
estimates how long each group will wait on each worker, and solves a stochastic program that
places and orders the groups so that as many requests as possible meet their targets.
Workers carry out the plan: they evict requests, swap key-value caches to host memory and back,
swap models, keep warm copies of weights in host memory, and pause a mixture-of-experts batch
between layers so that an urgent request can run at once.
The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs.
How vexingly quick daft zebras jump! Sphinx of black quartz, judge my vow.
0 1 2 3 4 5 6 7 8 9 10 100 1000 2024 2025 3.14 42 7 x y z + - * / = ( ) [ ] { } < > , . ; : ! ?
def forward(self, hidden_states): return self.mlp(self.norm(hidden_states)) + hidden_states
"""


def _base_config(kind: str, num_layers: int, vocab_size: int) -> dict[str, Any]:
    """Small but structurally faithful shapes per family (GQA, top-2 of 8 experts)."""
    common: dict[str, Any] = dict(
        vocab_size=vocab_size,
        hidden_size=64,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        # A much wider init than the 0.02 default: the logits of a random model are then
        # far from flat (top-1/top-2 gaps ~0.1 instead of ~0.001), so greedy choices are not
        # decided by float rounding when batch shapes differ, and outputs do not collapse
        # into one repeated token (which would hide KV-cache bugs in tests).
        initializer_range=0.4,
    )
    if kind == "mixtral":
        return common | dict(intermediate_size=128, num_local_experts=8, num_experts_per_tok=2)
    if kind == "qwen2_moe":
        return common | dict(
            intermediate_size=128,
            moe_intermediate_size=64,
            shared_expert_intermediate_size=128,
            num_experts=8,
            num_experts_per_tok=2,
            decoder_sparse_step=1,
            norm_topk_prob=False,
        )
    if kind == "qwen3_moe":
        return common | dict(
            intermediate_size=128,
            moe_intermediate_size=64,
            num_experts=8,
            num_experts_per_tok=2,
            decoder_sparse_step=1,
            head_dim=16,
            norm_topk_prob=True,
        )
    if kind == "olmoe":
        return common | dict(intermediate_size=64, num_experts=8, num_experts_per_tok=2)
    if kind == "llama":
        return common | dict(intermediate_size=128)
    raise ValueError(f"unknown tiny model kind {kind!r}; valid kinds: {', '.join(TINY_KINDS)}")


def tiny_config(kind: str, *, num_layers: int = 8, vocab_size: int = 512, **overrides: Any) -> PretrainedConfig:
    """The `transformers` config of a tiny model of `kind`, with `overrides` applied."""
    from transformers import LlamaConfig, MixtralConfig, OlmoeConfig, Qwen2MoeConfig, Qwen3MoeConfig

    classes = {
        "mixtral": MixtralConfig,
        "qwen2_moe": Qwen2MoeConfig,
        "qwen3_moe": Qwen3MoeConfig,
        "olmoe": OlmoeConfig,
        "llama": LlamaConfig,
    }
    values = _base_config(kind, num_layers, vocab_size) | overrides
    return classes[kind](**values)


def build_tokenizer(vocab_size: int = 512) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on the built-in corpus (deterministic)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    # Repeat the corpus so merge counts are stable; training is single-pass and fast.
    tok.train_from_iterator([_CORPUS] * 4, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token=SPECIAL_TOKENS[0],
        bos_token=SPECIAL_TOKENS[1],
        eos_token=SPECIAL_TOKENS[2],
        model_max_length=2048,
    )


def _spec(kind: str, seed: int, num_layers: int, overrides: dict[str, Any]) -> dict[str, Any]:
    return {
        "recipe": _RECIPE_VERSION,
        "kind": kind,
        "seed": seed,
        "num_layers": num_layers,
        "overrides": {k: overrides[k] for k in sorted(overrides)},
    }


def ensure_tiny_model(
    kind: str, path: str | Path, *, seed: int = 0, num_layers: int = 8, **config_overrides: Any
) -> Path:
    """Build a tiny `kind` model with seeded random weights into `path` unless the folder
    already holds the same build. Returns the folder.

    `config_overrides` go into the `transformers` config (e.g. `hidden_size=512` for a
    benchmark shape whose iteration time is clearly above Python overhead)."""
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    if kind not in TINY_KINDS:
        raise ValueError(f"unknown tiny model kind {kind!r}; valid kinds: {', '.join(TINY_KINDS)}")
    path = Path(path)
    spec = _spec(kind, seed, num_layers, dict(config_overrides))
    marker = path / MARKER
    if marker.is_file():
        try:
            if json.loads(marker.read_text()) == spec:
                return path
        except json.JSONDecodeError:
            pass  # a torn marker means a torn build: rebuild
    vocab_size = int(config_overrides.pop("vocab_size", 512))
    config = tiny_config(kind, num_layers=num_layers, vocab_size=vocab_size, **config_overrides)
    tokenizer = build_tokenizer(vocab_size)
    if len(tokenizer) > vocab_size:
        raise ValueError(f"tokenizer has {len(tokenizer)} entries, more than vocab_size={vocab_size}")

    # Build into a sibling temp folder and rename, so a crash never leaves a half folder
    # that a marker check could mistake for a finished one.
    tmp = path.with_name(path.name + ".building")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    # Seeding the global RNG right before construction makes `_init_weights` deterministic.
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.eval()
    model.generation_config = GenerationConfig(
        bos_token_id=1, eos_token_id=2, pad_token_id=0, do_sample=False
    )
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / MARKER).write_text(json.dumps(spec, indent=2))
    if path.exists():
        shutil.rmtree(path)
    tmp.rename(path)
    return path
