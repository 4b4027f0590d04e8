"""What the HF engine measures of its own passes: a record of every finished pass (for
the profiler and the benchmarks), smoothed throughputs, and the batch-dependent cost
model the worker reports to the planner (backends/cost_fit.py)."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from qlmserve.backends.cost_fit import CostFit

from .forward import ForwardPass

_EMA = 0.2  # smoothing of the measured throughputs reported in stats()


@dataclass(frozen=True)
class PassRecord:
    """One finished forward pass, for the profiler: compute time excludes pauses."""

    prefill: bool
    batch: int
    new_tokens: int
    context_tokens: int  # KV positions attended over, summed over the batch
    seconds: float
    pauses: int
    paused_s: float  # time the pass spent paused by expert-level preemption
    cpu_seconds: float  # CPU time of the engine thread in the pass (see ForwardPass.cpu_s)
    ls_rows: int = 0  # latency-sensitive sequences among `batch`
    # An LS decode run over the layers below a paused BE pass before it merged into it
    # (EXPERT): part of a pass, not a whole one, so fits of whole passes leave it out.
    catch_up: bool = False


class PassMeter:
    def __init__(self, keep: int = 4096) -> None:
        self.records: deque[PassRecord] = deque(maxlen=keep)
        self.prefill_tps = 0.0  # prompt tokens per second of prefill passes, smoothed
        self.decode_tps = 0.0  # tokens per second per sequence of decode passes, smoothed
        self.cost = CostFit()

    def record(self, p: ForwardPass, *, catch_up: bool = False) -> None:
        new = sum(p.new_tokens)
        ctx = sum(s.kv_len for s in p.seqs)
        ls_rows = sum(1 for s in p.seqs if s.latency_sensitive)
        self.records.append(PassRecord(p.is_prefill, len(p.seqs), new, ctx, p.compute_s, p.pauses,
                                       p.paused_s, p.cpu_s, ls_rows, catch_up))
        if p.compute_s <= 0 or catch_up:
            return
        if p.is_prefill:
            self.prefill_tps += _EMA * (new / p.compute_s - self.prefill_tps)
            self.cost.prefill(new, p.compute_s)
        else:
            self.decode_tps += _EMA * (1.0 / p.compute_s - self.decode_tps)
            self.cost.decode(len(p.seqs), ctx, p.compute_s)
