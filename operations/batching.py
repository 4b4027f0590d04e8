"""How an engine batches: the preemption modes and the one set of rules every engine
follows (the HF engine, the simulated engine inside a worker, the simulator's
event-driven worker), and that the controller's dispatch and planner count on.

The rules are pure functions over each engine's own sequence type (`Batchable`): an
engine describes its state in a `BatchView` and applies the `IterationPlan` that
`plan_iteration` returns. NOTE(the rules):

- Admission order (`admission_order`). NONE: queue order (arrival at the engine; a
  sequence preempted for KV goes back to the front, as in vLLM). ITERATION / EXPERT:
  latency-sensitive (LS) first, then higher `priority`, then queue order.
- Admission (`plan_iteration`). A waiting sequence joins when the engine serves its
  model (one for another model is skipped: it waits for a model swap, it never blocks),
  the running sequences are below `batch_limit` (LS ones under ITERATION / EXPERT may
  go up to LS_BATCH_FACTOR x max_batch_size), its KV fits, and the iteration has
  prefill budget left. Under NONE the first one that does not fit stops the rest
  (FCFS head-of-line blocking); under ITERATION / EXPERT it is skipped.
- Iteration composition. An iteration prefills at most `max_prefill_tokens` prompt
  tokens; a longer prompt is prefilled in chunks over several iterations, and its first
  token comes at the end of the iteration that prefills its last chunk. Sequences
  already prefilling take the budget first (in admission order), then new ones.
  Under ITERATION / EXPERT, when LS work can start (an LS sequence is prefilling, or an
  LS one waits and may join), the iteration is LS-only: LS chunks alone, no decode and
  no best-effort prefill, so the LS first token does not wait for them; best-effort
  prompts are chunked in the iterations after, beside the decode step of the running
  sequences. An LS-only iteration has LS_PREFILL_FACTOR times the budget; a longer LS
  prompt is chunked over consecutive LS-only iterations. Under NONE the budget goes in
  admission order, LS or not (the vLLM default is class-blind).
- Preemption victim (`preemption_victim`). When the KV cache cannot hold the next decode
  step, the latest-admitted best-effort sequence goes back to the waiting queue (its
  KV is recomputed later, as vLLM does); LS sequences only when no best-effort one is
  left. Running sequences keep their KV before new ones are admitted: admission only
  gets the KV the decode step leaves (so a new prompt never pushes a running one out).
  The HF engine reserves a sequence's whole KV (prompt + max_tokens) at admission, so
  it never needs a victim (`BatchView.kv_held` None).

NOTE(for the estimator: what bounds an LS request's wait for its first token). Under
ITERATION and EXPERT, an LS request that an engine can take (its model active, fewer
than LS_BATCH_FACTOR x max_batch_size running, KV free) gets its first token after
  1. the rest of the iteration in flight when it arrives: at most one decode step of the
     running batch plus prefill_time(<= max_prefill_tokens) (under EXPERT a best-effort
     pass pauses at its next layer boundary instead, so only a layer of it, unless it
     has already been paused for max_pause_s: then it finishes first), then
  2. LS-only iterations that prefill, ls_prefill_budget(max_prefill_tokens) at a time,
     the LS prompt tokens ahead of it (LS sequences already prefilling, then waiting LS
     ones of higher priority or earlier arrival) and then its own prompt (prompt +
     tokens kept from an earlier run); each such iteration takes prefill_time(its chunk
     tokens), with no decode step. Its first token comes at the end of the one holding
     its last chunk.
So TTFT <= in-flight iteration + sum over those iterations of prefill_time(chunk), with
ceil((ahead + own) / ls_prefill_budget) iterations (each adds prefill_base_s). Under
NONE it waits for everything ahead of it in arrival order; each iteration then carries
<= max_prefill_tokens of prefill plus one decode step.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Generic, Protocol, TypeVar


class PreemptionMode(str, enum.Enum):
    NONE = "none"  # iteration-level FCFS: a new request joins at the next iteration
    ITERATION = "iteration"  # latency-sensitive requests go first at each iteration boundary
    EXPERT = "expert"  # QLLM: pause a best-effort batch between layers / attention and experts


# Under ITERATION and EXPERT a latency-sensitive request may join beyond max_batch_size, up
# to this factor times it (KV must still fit): making it wait for a best-effort request to
# finish, or taking one off the device for it, would put back the head-of-line blocking
# these modes exist to remove. Every engine, the simulator and the controller share it.
LS_BATCH_FACTOR = 2

# Prompt tokens one iteration may prefill (the policy's `max_prefill_tokens` default).
DEFAULT_MAX_PREFILL_TOKENS = 2048

# An LS-only iteration may prefill this many times `max_prefill_tokens`. The budget keeps
# a mixed iteration short for the decode step it carries; an LS-only one carries none, and
# only LS work that arrives meanwhile waits for it. Chunking a 19k-token LS prompt by 2,048
# cost it nine extra iteration overheads (0.1 s on the A100 profiles): on ls2m at the
# FCFS-50% load QLM met 94.4% of LS requests within reach, 98.0% with this factor 4
# (`qlm bench --scenario ls2m`, README).
LS_PREFILL_FACTOR = 4


def ls_prefill_budget(max_prefill_tokens: int) -> int:
    """Prompt tokens an LS-only iteration may prefill."""
    return LS_PREFILL_FACTOR * max_prefill_tokens


def batch_limit(mode: PreemptionMode | str, latency_sensitive: bool, max_batch_size: int) -> int:
    """How many running sequences a request may join under `mode`."""
    if latency_sensitive and prioritized(mode):
        return max_batch_size * LS_BATCH_FACTOR
    return max_batch_size


def prioritized(mode: PreemptionMode | str) -> bool:
    """ITERATION and EXPERT put latency-sensitive work first; NONE is class-blind FCFS."""
    return PreemptionMode(mode) is not PreemptionMode.NONE


class Batchable(Protocol):
    """What the rules read of a sequence (each engine's own type has these)."""

    @property
    def latency_sensitive(self) -> bool: ...

    @property
    def priority(self) -> int: ...

    @property
    def model(self) -> str: ...


T = TypeVar("T", bound=Batchable)


def precedence(s: Batchable | object) -> tuple[bool, int]:
    """Who goes first under ITERATION / EXPERT (ties by queue order): latency-sensitive
    requests, then higher `priority`. Every engine orders by it, the vLLM adapter included
    (it maps it onto vLLM's priorities)."""
    return (not s.latency_sensitive, -s.priority)


def admission_order(waiting: Iterable[T], mode: PreemptionMode | str) -> list[T]:
    """NONE: queue order. ITERATION / EXPERT: by `precedence`, then queue order (a stable
    sort)."""
    if not prioritized(mode):
        return list(waiting)
    return sorted(waiting, key=precedence)


def preemption_victim(running: Sequence[T], admitted_order: Callable[[T], int]) -> T:
    """The sequence to preempt (recompute later) when KV runs out: the latest-admitted
    best-effort one; latency-sensitive ones only when none is best-effort."""
    return max(running, key=lambda s: (not s.latency_sensitive, admitted_order(s)))


@dataclass
class BatchView(Generic[T]):
    """An engine's state at an iteration boundary, in the terms of the rules. KV is in
    the engine's own unit (tokens, or blocks for a paged cache)."""

    mode: PreemptionMode
    max_batch_size: int
    max_prefill_tokens: int
    model: str | None  # the active model (None: none loaded, nothing is admitted)
    kv_free: int  # KV units not held or reserved
    running: int  # sequences holding KV (prefilling, decoding, paused)
    waiting: Sequence[T]  # queue order
    prefilling: Sequence[T]  # running, prompt not all prefilled yet; admission order
    decoding: Sequence[T]  # running, ready for a decode step; admission order
    kv_need: Callable[[T], int]  # KV units a waiting sequence needs to be admitted
    prompt_left: Callable[[T], int]  # prompt tokens (with tokens of an earlier run) still to prefill
    # KV units each decoding sequence adds in a decode step beyond what it holds (0 when
    # KV was reserved at admission).
    decode_need: int = 1
    # KV units a running sequence frees when preempted; None: this engine never preempts
    # (it reserved a sequence's whole KV at admission).
    kv_held: Callable[[T], int] | None = None
    admitted_order: Callable[[T], int] | None = None


@dataclass
class IterationPlan(Generic[T]):
    """What one iteration does; the engine applies it."""

    admitted: list[T] = field(default_factory=list)  # waiting -> running, in admission order
    prefill: list[tuple[T, int]] = field(default_factory=list)  # (sequence, prompt tokens it prefills now)
    decode: list[T] = field(default_factory=list)  # sequences taking one decode step
    preempted: list[T] = field(default_factory=list)  # running -> front of the waiting queue (recompute)
    ls_only: bool = False  # latency-sensitive prefill alone (no decode, no best-effort prefill)

    @property
    def prefill_tokens(self) -> int:
        return sum(n for _, n in self.prefill)

    @property
    def runs(self) -> bool:
        """Whether the iteration computes anything (it may only preempt)."""
        return bool(self.prefill or self.decode)


def ls_can_start(view: BatchView[T]) -> bool:
    """Is there latency-sensitive work that could start now (ITERATION / EXPERT)? Cheap:
    engines ask it at stage boundaries while a pass runs."""
    if any(s.latency_sensitive for s in view.prefilling):
        return True
    if view.running >= batch_limit(view.mode, True, view.max_batch_size):
        return False
    return any(s.latency_sensitive and s.model == view.model and view.kv_need(s) <= view.kv_free
               for s in view.waiting)


def plan_iteration(view: BatchView[T], *, ls_only: bool = False) -> IterationPlan[T]:
    """The next iteration of an engine (see the module NOTE). `ls_only`: only
    latency-sensitive work may run (a best-effort pass is paused); the plan is empty
    when there is none."""
    if prioritized(view.mode):
        plan = _compose(view, [s for s in view.prefilling if s.latency_sensitive],
                        [s for s in admission_order(view.waiting, view.mode) if s.latency_sensitive],
                        view.kv_free, budget=ls_prefill_budget(view.max_prefill_tokens))
        if plan.prefill or ls_only:
            plan.ls_only = True
            return plan
    elif ls_only:
        return IterationPlan()
    decode, preempted = list(view.decoding), []
    kv_free = view.kv_free
    if view.kv_held is not None:
        assert view.admitted_order is not None, "an engine that preempts names the admission order"
        while decode and kv_free < len(decode) * view.decode_need:
            victim = preemption_victim(decode, view.admitted_order)
            decode.remove(victim)
            preempted.append(victim)
            kv_free += view.kv_held(victim)
    # New sequences get the KV this decode step leaves.
    plan = _compose(view, view.prefilling, admission_order(view.waiting, view.mode),
                    kv_free - len(decode) * view.decode_need)
    plan.decode, plan.preempted = decode, preempted
    return plan


def _compose(view: BatchView[T], prefilling: Sequence[T], candidates: Sequence[T], kv_free: int,
             budget: int | None = None) -> IterationPlan[T]:
    """Prefill chunks: the sequences already prefilling first, then new admissions, while
    the iteration's prefill budget (`max_prefill_tokens` unless given) lasts."""
    plan: IterationPlan[T] = IterationPlan()
    budget = view.max_prefill_tokens if budget is None else budget
    for s in prefilling:
        if budget <= 0:
            break
        n = min(view.prompt_left(s), budget)
        plan.prefill.append((s, n))
        budget -= n
    if view.model is None:
        return plan
    running = view.running
    fcfs = not prioritized(view.mode)
    for s in candidates:
        if budget <= 0:
            break  # nothing more can start prefilling in this iteration
        if s.model != view.model:
            continue  # it waits for a model swap; blocking on it would stall the engine
        need = view.kv_need(s)
        if running >= batch_limit(view.mode, s.latency_sensitive, view.max_batch_size) or need > kv_free:
            if fcfs:
                break  # FCFS: nobody overtakes the head of the queue
            continue
        plan.admitted.append(s)
        running += 1
        kv_free -= need
        n = min(view.prompt_left(s), budget)
        plan.prefill.append((s, n))
        budget -= n
    return plan
