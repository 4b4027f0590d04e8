"""A resumable forward pass: the model's decoder walked one stage at a time.

NOTE(why not transformers' ContinuousBatchingManager / generate_batch): that manager
already does continuous batching over a paged cache, but it runs `model.forward` whole:
once a batch starts an iteration it goes through every layer before the scheduler sees
it again. Expert-level preemption (QLLM) needs to stop a best-effort batch *between*
decoder layers, and between a layer's attention and its MoE stage, keep the batch's
hidden states, run latency-sensitive work, and resume at the same stage. So the engine
walks `model.model.layers` itself, calling the family's own modules (norms, attention
with its q/k norms / biases / rotary, the MoE block with its router, fused experts and
shared expert) and only replacing the KV cache with its own paged one (`KVView`).

A pass has 2 * num_layers stages (attention, MoE, per layer) and a cursor. In these
pre-norm architectures a stage boundary is a point where `hidden` (the residual
stream) is the whole state of the in-flight tokens: the next stage's residual is
`hidden` itself and routing is recomputed from it. So pausing keeps just `hidden`
[B, T, H] (plus the KV the finished stages wrote) and resuming repeats no work.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from .kv_cache import MirrorLayer, PagedKVCache
from .sequence import Sequence

if TYPE_CHECKING:
    from transformers import PreTrainedModel


class KVView:
    """The `past_key_values` an attention module sees during one pass.

    Duck-types the one `Cache` method attention modules call, `update(k, v, layer_idx)`:
    it writes the pass's new keys/values into the paged pool and returns every sequence's
    whole context as a padded [B, kv_heads, context, head_dim] tensor.

    The context is gathered a block at a time: one index_select per layer over the rows'
    block tables copies each block as one contiguous chunk, and needs no per-position
    slot index (which would cost a handful of extra tensor ops per pass to build). A
    decode pass on CPU instead reuses the layer's mirror when it holds this batch one
    token behind (see PagedKVCache.mirror), and gathers only to rebuild it."""

    def __init__(self, kv: PagedKVCache, blocks: torch.Tensor, batch: int, width: int, context: int,
                 write_slots: torch.Tensor, write_rows: torch.Tensor | None,
                 mirror: tuple[tuple, tuple, list[int]] | None = None) -> None:
        self.kv = kv
        self.blocks = blocks  # [B * width] block ids, row-major (a short row repeats its first block)
        self.batch = batch
        self.width = width
        self.context = context
        self.write_slots = write_slots  # [N] slots of the pass's valid new tokens
        self.write_rows = write_rows  # [B, T] bool of valid new tokens; None when no padding
        # (mirror key before this pass's token, key after it, each row's write position)
        self.mirror = mirror
        self._mirror_index: dict[int, torch.Tensor] = {}  # mirror width -> flat write index per row
        self._gathered = kv.gather_buffer(batch * width)  # [2, B * width, block_size, kvh, D]
        if mirror is None:
            # Every layer gathers into the same buffer, so the [B, kv_heads, context, head_dim]
            # views attention gets are made once per pass, not per layer.
            dense = self._gathered.view(2, batch, -1, *self._gathered.shape[3:])[:, :, :context].transpose(2, 3)
            self._keys, self._values = dense[0], dense[1]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int,
               *args: object, **kwargs: object) -> tuple[torch.Tensor, torch.Tensor]:
        # Few tensor ops per layer on purpose: on CPU each costs microseconds however small.
        new = torch.stack((key_states, value_states)).transpose(2, 3)  # [2, B, T, kvh, D]
        if self.write_rows is None:
            new = new.reshape(2, -1, *new.shape[3:])
        else:
            new = new[:, self.write_rows]  # [2, N, kvh, D]
        if new.dtype != self.kv.dtype:
            new = new.to(self.kv.dtype)
        self.kv.layer_slots[layer_idx].index_copy_(1, self.write_slots, new)
        if self.mirror is not None:
            return self._mirrored(layer_idx, new)
        torch.index_select(self.kv.layer_blocks[layer_idx], 1, self.blocks, out=self._gathered)
        return self._keys, self._values

    def _mirrored(self, layer_idx: int, new: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`new`: [2, B, kvh, D], the pass's keys and values (one token per row)."""
        assert self.kv.mirror is not None and self.mirror is not None
        before, after, positions = self.mirror
        m = self.kv.mirror[layer_idx]
        if m is not None and m.key == before and m.width * self.kv.block_size >= self.context:
            index = self._mirror_index.get(m.width)
            if index is None:
                row = m.width * self.kv.block_size
                index = torch.tensor([r * row + p for r, p in enumerate(positions)], dtype=torch.long)
                self._mirror_index[m.width] = index
            m.slots.index_copy_(1, index, new)
        else:
            # Gathered straight into the mirror (the new token already is in the pool): a
            # rebuild costs what every step cost without the mirror. It holds the batch's
            # whole blocks, so a row growing into a new block rebuilds it (every
            # block_size steps of a steady batch).
            data, buf = self.kv.mirror_storage(layer_idx, self.batch * self.width)
            torch.index_select(self.kv.layer_blocks[layer_idx], 1, self.blocks, out=data)
            m = MirrorLayer(key=(), data=data, width=self.width, buf=buf)
            self.kv.mirror[layer_idx] = m
        m.key = after
        return m.heads[0, :, :, : self.context], m.heads[1, :, :, : self.context]  # [B, kvh, context, D]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.context


def pack_rows(feed: list[tuple[Sequence, int]], waste: float = 0.25) -> list[list[tuple[Sequence, int]]]:
    """Prefill rows (sequence, tokens) grouped into passes, longest first. A pass pads every
    row to its longest, so rows share one only while the padding stays within `waste` of
    what they feed: chunking leaves a budget's remainder beside whole chunks (384 + 128
    tokens padded to 2 x 384 would compute 50% more than they feed); equal rows, and
    prompts of about one length, still go in one pass."""
    groups: list[list[tuple[Sequence, int]]] = []
    fed = 0
    for row in sorted(feed, key=lambda r: -r[1]):
        if groups and groups[-1][0][1] * (len(groups[-1]) + 1) <= (1 + waste) * (fed + row[1]):
            groups[-1].append(row)
            fed += row[1]
        else:
            groups.append([row])
            fed = row[1]
    return groups


class ForwardPass:
    """One forward pass of a set of sequences, runnable stage by stage."""

    def __init__(self, model: PreTrainedModel, kv: PagedKVCache, seqs: list[Sequence], *,
                 preemptible: bool, feed: list[int] | None = None, prefill: bool | None = None) -> None:
        """`feed`: tokens each sequence feeds (its first pending ones); default all its
        pending tokens. A prefill chunk feeds part of a prompt: its KV advances by the
        chunk and it samples no token until a pass feeds its last pending token.
        `prefill`: a pass of prompt chunks (default: when some row feeds several tokens;
        chunks of one token each are prefill too, though shaped like a decode pass)."""
        if not seqs:
            raise ValueError("a forward pass needs at least one sequence")
        feed = [s.num_pending for s in seqs] if feed is None else list(feed)
        if len(feed) != len(seqs) or any(not 0 < n <= s.num_pending for s, n in zip(seqs, feed, strict=True)):
            raise ValueError(f"feed {feed} does not fit the pending tokens {[s.num_pending for s in seqs]}")
        self.model = model
        self.kv = kv
        self.layers = model.model.layers
        self.num_stages = 2 * len(self.layers)
        self.preemptible = preemptible
        self.cursor = 0  # next stage: layer = cursor // 2, attention if even else MoE
        self.created = time.perf_counter()
        self.compute_s = 0.0  # time spent running stages (not paused)
        # CPU time of the engine thread in those stages: with one torch thread on CPU all
        # the math runs on this thread, so this is the pass's cost on an idle core even
        # when other processes share the machine (the profiler can fit on it).
        self.cpu_s = 0.0
        self.paused_s = 0.0  # total time spent paused (starvation bound)
        self.paused_at: float | None = None
        self.pauses = 0
        self.seqs: list[Sequence] = []
        self.new_tokens: list[int] = []
        device = kv.device
        for seq, n in zip(seqs, feed, strict=True):
            # Blocks for the new tokens are taken now, so a later stage never allocates.
            kv.ensure(seq.id, seq.kv_len + n)
        self.seqs = list(seqs)
        self.feed = feed  # parallel to seqs
        self._prepare()
        self._prefill = self.t_max > 1 if prefill is None else prefill
        t_max = self.t_max
        # One tensor from one padded list (no per-row tensor copies).
        chunks = (seq.pending[:n] for seq, n in zip(seqs, feed, strict=True))
        rows = [chunk + [0] * (t_max - len(chunk)) for chunk in chunks]
        ids = torch.tensor(rows, dtype=torch.long)
        self.hidden = model.model.embed_tokens(ids.to(device))

    # -- metadata (rebuilt when sequences leave or join mid-pass) ---------------------------

    def _prepare(self) -> None:
        """Positions, KV blocks / slots and the attention mask of the member sequences.

        Runs once per pass, i.e. once per decode step, so it is built from plain Python
        lists with a few whole-batch tensor ops (no per-sequence tensors)."""
        device = self.kv.device
        seqs = self.seqs
        bs = self.kv.block_size
        past_l = [seq.kv_len for seq in seqs]
        total_l = [p + n for p, n in zip(past_l, self.feed, strict=True)]
        self.new_tokens = new_l = list(self.feed)
        self.t_max = t_max = max(new_l)
        ctx = max(total_l)
        same_total = min(total_l) == ctx
        padded = min(new_l) != t_max
        tables = [self.kv.table(seq.id) for seq in seqs]
        width = -(-ctx // bs)
        # A row shorter than the longest repeats its first block up to the common width;
        # the mask hides those key positions (or no row is shorter).
        blocks = [b for tb in tables for b in (tb[:width] + [tb[0]] * (width - len(tb)))]
        writes = [tb[pos // bs] * bs + pos % bs
                  for tb, p, t in zip(tables, past_l, total_l, strict=True) for pos in range(p, t)]
        past = torch.tensor(past_l, dtype=torch.long)
        if t_max == 1:
            positions = past[:, None]  # [B, 1]
            valid = None
        else:
            t = torch.arange(t_max, dtype=torch.long)
            positions = past[:, None] + t[None, :]  # [B, T]
            valid = t[None, :] < torch.tensor(new_l, dtype=torch.long)[:, None] if padded else None
        # No mask where SDPA's mask-free path is exactly right and the faster one:
        #  - a prefill from position 0 with no padding: is_causal (aligned, q == kv length),
        #    SDPA's flash path instead of repeat_kv + a masked kernel;
        #  - on CUDA, decode rows that all attend over the same context length (a mask would
        #    keep SDPA off its flash kernel). On CPU a decode pass keeps its (possibly
        #    all-true) mask on purpose: with one, HF's sdpa_attention_forward folds each KV
        #    head's query heads into one [B, kv_heads, groups, D] query (pack_gqa), which
        #    runs faster there than SDPA's enable_gqa path taken without a mask (measured
        #    in the engine at batch 16: ~300 vs ~350 us per layer; 2x in isolation).
        decode_no_mask = t_max == 1 and same_total and device.type != "cpu"
        no_mask = decode_no_mask or (t_max > 1 and not padded and same_total and max(past_l) == 0)
        if no_mask:
            self.mask = None
        else:
            keys = torch.arange(ctx, dtype=torch.long)
            total = torch.tensor(total_l, dtype=torch.long)
            # Query t of a sequence sees keys 0..its own position; a padding query sees its
            # whole context (it must see something, or SDPA returns NaN for the row).
            last_visible = torch.minimum(positions, (total - 1)[:, None])
            self.mask = (keys[None, None, :] <= last_visible[:, :, None])[:, None].to(device)  # [B, 1, T, ctx]
        self.position_ids = positions.to(device)
        mirror = None
        if t_max == 1 and self.kv.mirror is not None:
            rows = tuple(seqs)
            mirror = ((rows, tuple(past_l)), (rows, tuple(total_l)), past_l)
        self.view = KVView(self.kv, torch.tensor(blocks, dtype=torch.long, device=device), len(seqs), width, ctx,
                           torch.tensor(writes, dtype=torch.long, device=device),
                           valid.to(device) if valid is not None else None, mirror)
        # Where each row's last new token sits; None: at t_max - 1 in every row.
        self.last_index = (torch.tensor([n - 1 for n in new_l], dtype=torch.long, device=device)
                           if padded else None)
        self.rotary: tuple[torch.Tensor, torch.Tensor] | None = None

    # -- running ----------------------------------------------------------------------------

    @property
    def done(self) -> bool:
        return self.cursor >= self.num_stages

    @property
    def layer(self) -> int:
        return self.cursor // 2

    @property
    def is_prefill(self) -> bool:
        return self._prefill

    @torch.inference_mode()
    def run(self, should_pause: Callable[[ForwardPass], bool] | None = None) -> bool:
        """Run stages until the pass is done (True) or `should_pause` asks it to stop at a
        stage boundary (False). Pauses are only considered after the first stage ran and
        only for preemptible passes."""
        if self.paused_at is not None:
            self.paused_s += time.perf_counter() - self.paused_at
            self.paused_at = None
        t0, c0 = time.perf_counter(), time.thread_time()
        ran = 0
        if self.rotary is None:
            self.rotary = self.model.model.rotary_emb(self.hidden, self.position_ids)
        while not self.done:
            if ran and self.preemptible and should_pause is not None and should_pause(self):
                self.compute_s += time.perf_counter() - t0
                self.cpu_s += time.thread_time() - c0
                self.paused_at = time.perf_counter()
                self.pauses += 1
                return False
            self._run_stage()
            ran += 1
        if self.hidden.is_cuda:
            torch.cuda.synchronize(self.hidden.device)  # so compute_s is the real pass time
        self.compute_s += time.perf_counter() - t0
        self.cpu_s += time.thread_time() - c0
        return True

    def _run_stage(self) -> None:
        layer = self.layers[self.layer]
        if self.cursor % 2 == 0:
            h = layer.input_layernorm(self.hidden)
            h, _ = layer.self_attn(
                hidden_states=h,
                position_embeddings=self.rotary,
                attention_mask=self.mask,
                position_ids=self.position_ids,
                past_key_values=self.view,
            )
        else:
            h = layer.mlp(layer.post_attention_layernorm(self.hidden))
        self.hidden = self.hidden + h
        self.cursor += 1

    @torch.inference_mode()
    def logits(self, rows: list[int] | None = None) -> torch.Tensor:
        """[R, vocab] float logits at the last new token of each of `rows` (default every
        sequence); the pass must be done."""
        if self.last_index is None:
            last = self.hidden[:, -1]
        else:
            every = torch.arange(len(self.seqs), device=self.hidden.device)
            last = self.hidden[every, self.last_index]
        if rows is not None:
            last = last[torch.tensor(rows, dtype=torch.long, device=last.device)]
        return self.model.lm_head(self.model.model.norm(last)).float()

    @property
    def completes(self) -> list[bool]:
        """Per sequence: does this pass feed its last pending token (so it samples one)?"""
        return [seq.kv_len + n == seq.num_tokens for seq, n in zip(self.seqs, self.feed, strict=True)]

    def commit(self) -> None:
        """The pass finished every layer: its new tokens now have KV everywhere."""
        for seq, n in zip(self.seqs, self.feed, strict=True):
            seq.kv_len += n

    # -- membership changes at a stage boundary --------------------------------------------

    def drop(self, seq_ids: set[str]) -> list[Sequence]:
        """Remove sequences from a paused pass (evict / abort / swap). Their partial KV
        writes for this pass lie beyond their kv_len and are simply overwritten later."""
        keep = [i for i, s in enumerate(self.seqs) if s.id not in seq_ids]
        gone = [s for s in self.seqs if s.id in seq_ids]
        if not gone:
            return []
        self.seqs = [self.seqs[i] for i in keep]
        self.feed = [self.feed[i] for i in keep]
        if self.seqs:
            hidden = self.hidden[torch.tensor(keep, device=self.hidden.device)]
            self._prepare()
            self.hidden = hidden[:, : self.t_max]
        return gone

    def merge(self, other: ForwardPass) -> None:
        """Let the sequences of `other`, which reached the same stage, join this pass: from
        here on they run as one batch (QLLM merges LS jobs into the BE batch in-layer)."""
        if other.cursor != self.cursor or self.is_prefill or other.is_prefill or other.t_max != 1 or self.t_max != 1:
            raise ValueError("only decode passes paused at the same stage can merge")
        self.seqs += other.seqs
        self.feed += other.feed
        self.hidden = torch.cat([self.hidden, other.hidden])
        self._prepare()
