"""The HF engine's prefix cache: which blocks of the paged KV pool hold a full block of a
token chain, so that a new sequence whose prompt starts with that chain reuses them.

A block's key is a hash of the token block chain (operations.prefix_cache.chain_key:
blake2b over the parent block's key and the block's `block_size` token ids, here
kv_cache.BLOCK_SIZE = 16 tokens), so one key names one whole prefix. Only full blocks are
keyed, and a sequence always feeds at least its last prompt token itself (its logits give
the first output token).

Blocks are reference-counted by the sequences whose block tables hold them. A keyed block
that no sequence holds any more stays in the pool, idle, and is found by the next prompt
that starts with its chain; idle blocks are the ones taken back, least recently used
first, when the pool has no free block left (memory pressure). Freeing a sequence (finish,
eviction, abort, swap-out) turns its keyed blocks idle; a model swap starts a new pool and
with it an empty index; a swapped-in sequence's blocks are fresh copies, keyed again only
where the chain has no block yet. So the index never names a block whose content is not
that chain's KV: a keyed block is never written again (a sequence writes only past its
kv_len, and its shared blocks are all below it).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

from qlmserve.operations.prefix_cache import chain_key, chain_keys


class PrefixIndex:
    """Keys of pool blocks, their reference counts and the idle LRU (module doc)."""

    def __init__(self, block_size: int) -> None:
        self.block_size = block_size
        self.by_key: dict[int, int] = {}  # key -> block
        self.key_of: dict[int, int] = {}  # block -> key
        self.refs: dict[int, int] = {}  # block -> sequences holding it (every held block)
        self.idle: OrderedDict[int, None] = OrderedDict()  # keyed blocks no one holds, LRU first
        self._seq_keys: dict[str, list[int]] = {}  # a sequence's chain keys so far
        self._waiting_keys: dict[str, tuple[int, list[int]]] = {}  # seq -> (tokens, keys) before admission
        self.lookup_tokens = 0
        self.hit_tokens = 0
        self.evicted_blocks = 0

    # -- lookups -------------------------------------------------------------------------

    def _keys_for(self, seq_id: str, tokens: Sequence[int]) -> list[int]:
        """Chain keys of every full block a new sequence may reuse (not its last token's)."""
        usable = (len(tokens) - 1) // self.block_size
        hit = self._waiting_keys.get(seq_id)
        if hit is not None and hit[0] == len(tokens):
            return hit[1]
        keys = chain_keys(tokens, self.block_size, usable)
        self._waiting_keys[seq_id] = (len(tokens), keys)
        return keys

    def peek(self, seq_id: str, tokens: Sequence[int]) -> int:
        """Tokens a new sequence would find cached now."""
        n = 0
        for k in self._keys_for(seq_id, tokens):
            if k not in self.by_key:
                break
            n += 1
        return n * self.block_size

    def share(self, seq_id: str, tokens: Sequence[int]) -> list[int]:
        """A new sequence starts: the cached blocks of its prefix, now held by it too."""
        keys = self._keys_for(seq_id, tokens)
        self._waiting_keys.pop(seq_id, None)
        blocks: list[int] = []
        for k in keys:
            b = self.by_key.get(k)
            if b is None:
                break
            blocks.append(b)
            self.hold(b)
        self._seq_keys[seq_id] = keys[:len(blocks)]
        self.lookup_tokens += len(tokens)
        self.hit_tokens += len(blocks) * self.block_size
        return blocks

    # -- holding and letting go ------------------------------------------------------------

    def hold(self, block: int) -> None:
        self.refs[block] = self.refs.get(block, 0) + 1
        self.idle.pop(block, None)

    def release(self, block: int) -> bool:
        """A sequence lets go of a block; True when the block is free (not kept idle)."""
        n = self.refs.get(block, 0) - 1
        if n > 0:
            self.refs[block] = n
            return False
        self.refs.pop(block, None)
        if block in self.key_of:
            self.idle[block] = None  # the most recently used
            return False
        return True

    def keyed_blocks(self, seq_id: str) -> int:
        """Full blocks of a sequence whose chain keys are known (shared or registered)."""
        return len(self._seq_keys.get(seq_id, ()))

    def forget_seq(self, seq_id: str) -> None:
        self._seq_keys.pop(seq_id, None)
        self._waiting_keys.pop(seq_id, None)

    def take_idle(self) -> int | None:
        """The least recently used idle block, unkeyed (the pool reuses it), or None."""
        if not self.idle:
            return None
        block, _ = self.idle.popitem(last=False)
        del self.by_key[self.key_of.pop(block)]
        self.evicted_blocks += 1
        return block

    # -- keying computed blocks --------------------------------------------------------------

    def register(self, seq_id: str, table: Sequence[int], tokens: Sequence[int], kv_len: int) -> None:
        """Key the sequence's full blocks that now have KV (positions below kv_len)."""
        keys = self._seq_keys.setdefault(seq_id, [])
        full = kv_len // self.block_size
        bs = self.block_size
        while len(keys) < full:
            i = len(keys)
            k = chain_key(keys[-1] if keys else 0, tokens[i * bs:(i + 1) * bs])
            keys.append(k)
            b = table[i]
            if k not in self.by_key and b not in self.key_of:
                self.by_key[k] = b
                self.key_of[b] = k

    def summary(self, limit: int) -> frozenset[int]:
        """At most `limit` keys: blocks held by running sequences, then the most recent idle ones."""
        out: list[int] = []
        for b in self.refs:
            if len(out) >= limit:
                return frozenset(out)
            k = self.key_of.get(b)
            if k is not None:
                out.append(k)
        for b in reversed(self.idle):
            if len(out) >= limit:
                break
            out.append(self.key_of[b])
        return frozenset(out)
