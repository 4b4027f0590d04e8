"""Who runs next inside one HF engine, per PreemptionMode.

- NONE: iteration-level FCFS (vLLM / TGI default). Requests join in arrival order when
  a batch slot and KV are free; the head of the queue blocks the rest (no overtaking).
- ITERATION: at every pass boundary latency-sensitive (LS) requests go first (then
  higher `priority`, then arrival); a running pass is never interrupted.
- EXPERT (QLLM): as ITERATION, and a best-effort (BE) pass also stops at the next stage
  boundary (between layers, or between a layer's attention and its MoE block) when LS
  work can start; it resumes later where it stopped.

Under ITERATION and EXPERT an LS request may join beyond `max_batch_size` (up to
`LS_BATCH_FACTOR` times it, backends.engine.batch_limit). KV must still fit.
"""

from __future__ import annotations

from dataclasses import dataclass

from qlmserve.backends.engine import PreemptionMode, batch_limit, precedence

from .sequence import Sequence


@dataclass
class SchedulingPolicy:
    mode: PreemptionMode = PreemptionMode.NONE
    max_pause_s: float = 2.0  # a paused BE pass is no longer paused once it waited this long
    # QLLM Algorithm 1 runs LS decode ahead of BE decode. When a BE decode pass is paused
    # and LS sequences are ready to decode, they run the layers below the pause point and
    # then join the paused batch, so the LS token costs no extra pass over the upper layers.
    ls_decode_joins_paused: bool = True

    @property
    def prioritized(self) -> bool:
        return self.mode is not PreemptionMode.NONE

    def admission_order(self, waiting: list[Sequence]) -> list[Sequence]:
        if not self.prioritized:
            return list(waiting)
        return sorted(waiting, key=lambda s: (*precedence(s.request), s.arrival))

    def batch_limit(self, seq: Sequence, max_batch_size: int) -> int:
        return batch_limit(self.mode, seq.latency_sensitive, max_batch_size)

    def blocks_queue(self) -> bool:
        """Under FCFS a request that cannot join stops every request behind it."""
        return not self.prioritized

    def pass_preemptible(self, seqs: list[Sequence]) -> bool:
        """A pass may be paused under EXPERT unless it carries an LS prefill (the work that
        preemption exists to speed up). LS decode rows in a BE pass just wait a little."""
        if self.mode is not PreemptionMode.EXPERT:
            return False
        return not any(s.latency_sensitive and s.is_prefill for s in seqs)

    def may_pause(self, paused_s: float) -> bool:
        return self.mode is PreemptionMode.EXPERT and paused_s < self.max_pause_s
