"""The HF engine's scheduling settings, per PreemptionMode. Who joins an iteration and
what it prefills is the engines' shared rule (operations.batching.plan_iteration); this
is what is particular to the HF engine's passes:

- NONE: iteration-level FCFS (vLLM / TGI default): no pass is ever interrupted.
- ITERATION: at every pass boundary latency-sensitive (LS) work goes first; a running
  pass is never interrupted.
- EXPERT (QLLM): as ITERATION, and a best-effort (BE) pass also stops at the next stage
  boundary (between layers, or between a layer's attention and its MoE block) when LS
  work can start; it resumes later where it stopped.
"""

from __future__ import annotations

from dataclasses import dataclass

from qlmserve.operations.batching import DEFAULT_MAX_PREFILL_TOKENS, PreemptionMode, prioritized

from .sequence import Sequence


@dataclass
class SchedulingPolicy:
    mode: PreemptionMode = PreemptionMode.NONE
    max_pause_s: float = 2.0  # a paused BE pass is no longer paused once it waited this long
    # QLLM Algorithm 1 runs LS decode ahead of BE decode. When a BE decode pass is paused
    # and LS sequences are ready to decode, they run the layers below the pause point and
    # then join the paused batch, so the LS token costs no extra pass over the upper layers.
    ls_decode_joins_paused: bool = True
    max_prefill_tokens: int = DEFAULT_MAX_PREFILL_TOKENS  # prompt tokens one iteration may prefill

    @property
    def prioritized(self) -> bool:
        return prioritized(self.mode)

    def pass_preemptible(self, seqs: list[Sequence]) -> bool:
        """A pass may be paused under EXPERT unless it carries an LS prefill (the work that
        preemption exists to speed up). LS decode rows in a BE pass just wait a little."""
        if self.mode is not PreemptionMode.EXPERT:
            return False
        return not any(s.latency_sensitive and s.is_prefill for s in seqs)

    def may_pause(self, paused_s: float) -> bool:
        return self.mode is PreemptionMode.EXPERT and paused_s < self.max_pause_s
