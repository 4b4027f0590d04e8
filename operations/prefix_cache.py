"""A prefix cache as data: which KV blocks of earlier prompts an engine still holds, and
what a new prompt saves by starting with them.

A prompt is a chain of blocks of `block_tokens` tokens; a block's id stands for the whole
prefix up to it (Mooncake traces publish such ids, one per 512-token block, in
`hash_ids`; an engine hashes the token chain itself with `chain_key`). A prompt's leading blocks that the
cache holds skip their prefill; the first block missing ends the hit (the blocks after it
were computed on another prefix). Only full blocks are cached; at least one prompt token is
always prefilled (the one whose logits give the first output token).

`PrefixCache` is the simulated engines' model of an engine's cache (qlmserve/sim, and
backends/sim_engine.py): an LRU over block ids bounded by the KV capacity, in blocks.
Cached blocks that no running sequence holds are reclaimable (an engine evicts them when
it needs the room, as vLLM's prefix cache does), so the cache does not reduce admission.
A worker reports a bounded summary of its cache (`summary`, the most recently used ids)
to the planner, which counts a group's saved prefill with `leading_hits`.
"""

from __future__ import annotations

import hashlib
import struct
from collections import OrderedDict
from collections.abc import Collection, Sequence
from dataclasses import dataclass

# The block size of the Mooncake traces' hash_ids (tokens per id).
MOONCAKE_BLOCK_TOKENS = 512
# The block size the engines key prompt token chains by (the HF engine's KV block,
# backends/hf/kv_cache.BLOCK_SIZE, and the live simulated engine's; the controller keys
# prompts the same way: dispatch.prefix_block_tokens).
ENGINE_BLOCK_TOKENS = 16
# Block ids a worker reports at most (the policy's `dispatch.max_reported_blocks` overrides).
DEFAULT_REPORTED_BLOCKS = 4096


def chain_key(parent: int, tokens: Sequence[int]) -> int:
    """The id of a block of token ids after the chain whose last id is `parent` (0: none):
    blake2b of both (ids as little-endian int32), so one id names one whole prefix, in any
    process."""
    return _block_key(parent, struct.pack(f"<{len(tokens)}i", *tokens))


def _block_key(parent: int, packed: bytes) -> int:
    h = hashlib.blake2b(parent.to_bytes(8, "little"), digest_size=8)
    h.update(packed)
    return int.from_bytes(h.digest(), "little")


def chain_keys(tokens: Sequence[int], block_tokens: int, blocks: int | None = None) -> list[int]:
    """Ids of the first `blocks` (default: all) full blocks of `tokens`: the ids chain_key
    gives block by block, with the prompt packed once (every submission hashes its prompt)."""
    n = len(tokens) // block_tokens
    if blocks is not None:
        n = min(blocks, n)
    packed = struct.pack(f"<{n * block_tokens}i", *tokens[:n * block_tokens])
    size = 4 * block_tokens
    out: list[int] = []
    parent = 0
    for i in range(n):
        parent = _block_key(parent, packed[i * size:(i + 1) * size])
        out.append(parent)
    return out


@dataclass(frozen=True)
class PrefixReport:
    """What a worker tells the planner about its prefix cache and its prefill backlog."""

    block_tokens: int  # tokens per block id
    blocks: frozenset[int]  # cached block ids, at most the policy's bound (the most recent)
    queued_prefill_tokens: int = 0  # prompt tokens still to prefill there, net of cache hits

    def saved(self, blocks: Sequence[int], prompt_tokens: int) -> int:
        """Prefill a prompt starting with `blocks` saves on this worker."""
        return saved_prefill_tokens(blocks, self.blocks, self.block_tokens, prompt_tokens)


def leading_hits(blocks: Sequence[int], held: Collection[int]) -> int:
    """How many of a prompt's leading blocks `held` contains (the hit ends at the first miss)."""
    n = 0
    for b in blocks:
        if b not in held:
            break
        n += 1
    return n


def saved_prefill_tokens(blocks: Sequence[int], held: Collection[int], block_tokens: int, prompt_tokens: int) -> int:
    """Prompt tokens a prompt starting with `blocks` need not prefill where `held` is cached."""
    if not blocks or not held or block_tokens <= 0:
        return 0
    return max(0, min(leading_hits(blocks, held) * block_tokens, prompt_tokens - 1))


class PrefixCache:
    """An LRU cache of block ids, at most `capacity_blocks` of them (see the module doc)."""

    def __init__(self, capacity_blocks: int, block_tokens: int = MOONCAKE_BLOCK_TOKENS) -> None:
        if block_tokens <= 0:
            raise ValueError(f"block_tokens must be > 0, got {block_tokens}")
        self.capacity_blocks = max(0, int(capacity_blocks))
        self.block_tokens = block_tokens
        self._lru: OrderedDict[int, None] = OrderedDict()  # oldest first
        self.lookup_tokens = 0  # prompt tokens looked up
        self.hit_tokens = 0  # of them, found cached (prefill saved)
        self.evicted_blocks = 0

    def __len__(self) -> int:
        return len(self._lru)

    def __contains__(self, block: int) -> bool:
        return block in self._lru

    def peek(self, blocks: Sequence[int], prompt_tokens: int) -> int:
        """Tokens a prompt would save now (no bookkeeping, no LRU move)."""
        return saved_prefill_tokens(blocks, self._lru, self.block_tokens, prompt_tokens)

    def lookup(self, blocks: Sequence[int], prompt_tokens: int) -> int:
        """A prompt starts: the tokens it saves; its hit blocks become the most recent."""
        saved = self.peek(blocks, prompt_tokens)
        self.lookup_tokens += prompt_tokens
        self.hit_tokens += saved
        for b in blocks[:saved // self.block_tokens]:
            self._lru.move_to_end(b)
        return saved

    def insert(self, blocks: Sequence[int]) -> None:
        """A prompt's blocks were computed: they are cached (the oldest go past the capacity)."""
        for b in blocks:
            if b in self._lru:
                self._lru.move_to_end(b)
            else:
                self._lru[b] = None
        self._trim()

    def resize(self, capacity_blocks: int) -> None:
        self.capacity_blocks = max(0, int(capacity_blocks))
        self._trim()

    def clear(self) -> None:
        """The KV the blocks lived in is gone (another model loaded)."""
        self._lru.clear()

    def summary(self, limit: int = DEFAULT_REPORTED_BLOCKS) -> frozenset[int]:
        """At most `limit` block ids, the most recently used: what the worker reports."""
        if limit <= 0:
            return frozenset()
        if len(self._lru) <= limit:
            return frozenset(self._lru)
        out = []
        for b in reversed(self._lru):
            out.append(b)
            if len(out) >= limit:
                break
        return frozenset(out)

    @property
    def hit_rate(self) -> float:
        return self.hit_tokens / self.lookup_tokens if self.lookup_tokens else 0.0

    def _trim(self) -> None:
        while len(self._lru) > self.capacity_blocks:
            self._lru.popitem(last=False)
            self.evicted_blocks += 1
