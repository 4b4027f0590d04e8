"""Engine-managed paged KV cache.

One pool tensor per model holds the keys and values of every layer:
    pool[layer, 0 (key) | 1 (value), slot, kv_head, head_dim]
Slots are grouped into fixed-size blocks; each sequence owns a block table, so a
sequence's KV grows a block at a time and is freed, swapped out or swapped in as a set
of blocks (the vLLM layout, without its custom kernels: attention gathers a sequence's
slots into a padded [batch, kv_heads, context, head_dim] view with one index per layer).

On CPU a decode batch also keeps a dense copy of its context between steps
(`MirrorLayer`, see `PagedKVCache.mirror`), so that a step writes one token per row
instead of gathering the whole context again.

Capacity is reserved at admission (prompt + remaining max_tokens), so a running
sequence can never run out of KV mid-iteration; the controller, not the engine, decides
whom to evict or swap when the queue wants more than fits.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from .prefix_index import PrefixIndex

BLOCK_SIZE = 16


@dataclass
class MirrorLayer:
    """One layer's dense copy of a decode batch's context, in the gathered layout
    [2, rows * width, block_size, kv_heads, head_dim] (each row `width` blocks)."""

    key: tuple  # (the batch's Sequence objects in row order, the KV length of each) it holds
    data: torch.Tensor
    width: int  # blocks per row: the mirror serves contexts up to width * block_size
    buf: torch.Tensor  # the flat storage under `data`, reused when the batch changes
    # Views made once per rebuild rather than per step (each costs a tensor op):
    # [2, rows * width * block_size, kv_heads, head_dim] to write tokens into, and
    # [2, rows, kv_heads, width * block_size, head_dim] for attention to slice.
    slots: torch.Tensor = field(init=False)
    heads: torch.Tensor = field(init=False)

    def __post_init__(self) -> None:
        d = self.data
        self.slots = d.view(2, -1, *d.shape[3:])
        self.heads = d.view(2, d.shape[1] // self.width, -1, *d.shape[3:]).transpose(2, 3)


@dataclass
class HostKV:
    """A sequence's KV in host memory after swap_out: [layers, 2, tokens, kv_heads, head_dim]."""

    data: torch.Tensor
    tokens: int

    @property
    def nbytes(self) -> int:
        return self.data.numel() * self.data.element_size()


class PagedKVCache:
    """Block pool plus per-sequence block tables and reservations."""

    def __init__(
        self,
        *,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        capacity_tokens: int,
        dtype: torch.dtype,
        device: torch.device,
        block_size: int = BLOCK_SIZE,
        prefix_cache: bool = False,
    ) -> None:
        self.block_size = block_size
        # Full blocks of finished and running sequences stay findable by their token chain
        # (prefix_index.py); None: no prefix cache, a freed block is free at once.
        self.prefix: PrefixIndex | None = PrefixIndex(block_size) if prefix_cache else None
        self.num_blocks = max(1, capacity_tokens // block_size)
        self.capacity_tokens = self.num_blocks * block_size
        self.device = device
        self.dtype = dtype
        # torch.empty does not touch the pages, so an unused capacity costs no RAM on CPU.
        self.pool = torch.empty(
            (num_layers, 2, self.num_blocks * block_size, num_kv_heads, head_dim), dtype=dtype, device=device
        )
        self.bytes_per_token = num_layers * 2 * num_kv_heads * head_dim * self.pool.element_size()
        # Per-layer views made once (a view costs a tensor op each time it is made):
        # [2, slots, kv_heads, head_dim] to write slots, [2, blocks, block_size, kv_heads,
        # head_dim] to gather blocks.
        self.layer_slots = [self.pool[i] for i in range(num_layers)]
        self.layer_blocks = [
            p.view(2, self.num_blocks, block_size, num_kv_heads, head_dim) for p in self.layer_slots
        ]
        # Where attention's gathered context goes (see `gather_buffer`).
        self._gather = torch.empty(0, dtype=dtype, device=device)
        # NOTE(decode mirror): a decode step's attention needs the batch's whole context as
        # one tensor per layer. Gathering it from the pool copies all of it every step, from
        # 4 KB blocks scattered over the pool that the CPU's prefetcher does not follow
        # (~0.9 ms of a 31 ms batch-16 step on the bench shape, more than generate()'s
        # torch.cat of a contiguous cache). While a batch stays the same (the same
        # sequences in the same order, each one token further) last step's dense copy is
        # still right but for the one new token per row, which is written into it besides
        # the pool. Anything else fails the key check and the layer gathers afresh. CPU
        # only: it is a second copy of the running batch's KV, which host RAM affords and
        # device memory should not (and HBM gathers cheaply).
        self.mirror: list[MirrorLayer | None] | None = [None] * num_layers if device.type == "cpu" else None
        self._free: list[int] = list(range(self.num_blocks - 1, -1, -1))  # pop() hands out low ids first
        self._tables: dict[str, list[int]] = {}
        self._reserved: dict[str, int] = {}  # blocks promised to a sequence (held or not yet allocated)
        self._reserved_total = 0

    # -- reservations ----------------------------------------------------------------------

    def blocks_for(self, tokens: int) -> int:
        return -(-tokens // self.block_size)

    @property
    def free_blocks(self) -> int:
        """Blocks neither held nor promised to a sequence."""
        return self.num_blocks - self._reserved_total

    def can_reserve(self, tokens: int) -> bool:
        return self.blocks_for(tokens) <= self.free_blocks

    def reserve(self, seq_id: str, tokens: int) -> None:
        """Promise `tokens` of KV to a sequence; allocation then cannot fail up to that."""
        want = self.blocks_for(tokens)
        have = self._reserved.get(seq_id, 0)
        if want <= have:
            return
        if want - have > self.num_blocks - self._reserved_total:
            raise MemoryError(f"KV cache: {tokens} tokens for {seq_id} do not fit")
        self._reserved[seq_id] = want
        self._reserved_total += want - have
        self._tables.setdefault(seq_id, [])

    def free(self, seq_id: str) -> None:
        """Release a sequence's blocks and its reservation (keyed blocks stay cached, idle)."""
        table = self._tables.pop(seq_id, [])
        if self.prefix is None:
            self._free.extend(reversed(table))
        else:
            self._free.extend(b for b in reversed(table) if self.prefix.release(b))
            self.prefix.forget_seq(seq_id)
        self._reserved_total -= self._reserved.pop(seq_id, 0)

    def forget(self, seq_id: str) -> None:
        """A sequence that never started leaves (its prompt's keys are dropped)."""
        if self.prefix is not None:
            self.prefix.forget_seq(seq_id)

    @property
    def used_tokens(self) -> int:
        """Tokens of blocks sequences hold (what the device memory holds for them; idle
        cached blocks are taken back on demand, so they are not counted)."""
        idle = len(self.prefix.idle) if self.prefix is not None else 0
        return (self.num_blocks - len(self._free) - idle) * self.block_size

    # -- prefix cache --------------------------------------------------------------------------

    def peek_prefix(self, seq_id: str, tokens: Sequence[int]) -> int:
        """Prompt tokens a sequence not started yet would find cached."""
        return self.prefix.peek(seq_id, tokens) if self.prefix is not None else 0

    def share_prefix(self, seq_id: str, tokens: Sequence[int]) -> int:
        """A sequence just reserved starts: its table begins with the cached blocks of its
        prefix; returns the tokens they cover (its kv_len)."""
        if self.prefix is None:
            return 0
        blocks = self.prefix.share(seq_id, tokens)
        self._tables[seq_id].extend(blocks)
        return len(blocks) * self.block_size

    def register_prefix(self, seq_id: str, tokens: Sequence[int], kv_len: int) -> None:
        """Key the sequence's full blocks computed so far."""
        if self.prefix is not None:
            self.prefix.register(seq_id, self._tables[seq_id], tokens, kv_len)

    def needs_register(self, seq_id: str, kv_len: int) -> bool:
        return self.prefix is not None and self.prefix.keyed_blocks(seq_id) < kv_len // self.block_size

    def _take_block(self) -> int:
        if self._free:
            return self._free.pop()
        block = self.prefix.take_idle() if self.prefix is not None else None
        if block is None:  # cannot happen within reservations (every held block is reserved)
            raise MemoryError("KV cache: no free block")
        return block

    @property
    def reserved_tokens(self) -> int:
        return self._reserved_total * self.block_size

    # -- slots -----------------------------------------------------------------------------

    def ensure(self, seq_id: str, tokens: int) -> list[int]:
        """Make sure the sequence's table covers `tokens` positions; returns the table."""
        table = self._tables[seq_id]
        need = self.blocks_for(tokens)
        if need > self._reserved[seq_id]:
            raise MemoryError(f"KV cache: {seq_id} outgrew its reservation ({tokens} tokens)")
        fresh = []
        while len(table) < need:
            fresh.append(self._take_block())
            table.append(fresh[-1])
            if self.prefix is not None:
                self.prefix.hold(fresh[-1])
        if fresh:
            # Attention reads a row's whole last block, and shorter rows read their
            # first block again, up to the batch's longest context; the mask hides those
            # positions, but they must hold finite numbers (a weight of 0 times NaN is NaN,
            # and an allocated block may hold whatever the pool's memory held).
            self._blocks_view()[:, :, fresh] = 0
        return table

    def _blocks_view(self) -> torch.Tensor:
        """The pool as [layers, 2, blocks, block_size, kv_heads, head_dim] (a view)."""
        p = self.pool
        return p.view(p.shape[0], 2, self.num_blocks, self.block_size, *p.shape[3:])

    def table(self, seq_id: str) -> list[int]:
        """The sequence's block ids in position order (the live list: do not modify)."""
        return self._tables[seq_id]

    def slots(self, seq_id: str, start: int, end: int) -> torch.Tensor:
        """Flat slot ids of positions [start, end) of a sequence (a CPU tensor)."""
        table = torch.tensor(self._tables[seq_id], dtype=torch.long)
        pos = torch.arange(start, end, dtype=torch.long)
        return table[pos // self.block_size] * self.block_size + pos % self.block_size

    def gather_buffer(self, blocks: int) -> torch.Tensor:
        """[2, blocks, block_size, kv_heads, head_dim] scratch for one layer's gathered keys
        and values, reused by every layer and pass: what it held is dead once the layer's
        attention ran (nothing keeps the gathered tensors). A fresh ~1 MB tensor per layer
        costs more than the copy into it on CPU (its pages are faulted in anew each time:
        hundreds of page faults per decode step)."""
        shape = (2, blocks, self.block_size, *self.pool.shape[3:])
        need = 2 * blocks * self.block_size * self.pool.shape[3] * self.pool.shape[4]
        if self._gather.numel() < need:
            # Grown with headroom so that a batch growing a block at a time does not
            # reallocate every time.
            self._gather = torch.empty(need + need // 2, dtype=self.dtype, device=self.device)
        return self._gather[:need].view(shape)

    def mirror_storage(self, layer: int, blocks: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(data [2, blocks, block_size, kv_heads, head_dim], its flat storage) for a layer's
        mirror, reusing the layer's last storage when large enough (a rebuild overwrites
        all of `data`)."""
        assert self.mirror is not None
        need = 2 * blocks * self.block_size * self.pool.shape[3] * self.pool.shape[4]
        old = self.mirror[layer]
        buf = old.buf if old is not None and old.buf.numel() >= need else None
        if buf is None:
            buf = torch.empty(need + need // 2, dtype=self.dtype, device=self.device)
        return buf[:need].view(2, blocks, self.block_size, *self.pool.shape[3:]), buf

    # -- swap ------------------------------------------------------------------------------

    def copy_out(self, seq_id: str, tokens: int, pin: bool) -> HostKV:
        """Copy the first `tokens` positions of a sequence to host memory and free it here."""
        slots = self.slots(seq_id, 0, tokens).to(self.device)
        data = self.pool[:, :, slots]  # advanced indexing: a fresh tensor, not a view
        if self.device.type == "cpu":
            host = data  # already a compact copy in host memory
        else:
            host = torch.empty(data.shape, dtype=data.dtype, pin_memory=pin)
            host.copy_(data, non_blocking=pin)
            torch.cuda.current_stream(self.device).synchronize()
        self.free(seq_id)
        return HostKV(host, tokens)

    def copy_in(self, seq_id: str, host: HostKV, reserve_tokens: int) -> None:
        """Reserve space for a swapped sequence and copy its KV back."""
        self.reserve(seq_id, max(reserve_tokens, host.tokens))
        self.ensure(seq_id, host.tokens)
        slots = self.slots(seq_id, 0, host.tokens).to(self.device)
        self.pool[:, :, slots] = host.data.to(self.device, non_blocking=host.data.is_pinned())
