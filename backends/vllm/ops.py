"""What the vLLM engine carries out, in QLM's terms (operations.ops.Capability).

  - evict: vLLM's abort; the request is requeued with its tokens and recomputed.
  - model_swap: one vLLM engine per model, started cold or woken warm (model_engine.py).
  - iteration_preemption: vLLM's priority scheduling plus QLM's batch rule (engine.py).
Not offered, so the planner never sends them (WorkerState.supported_ops):
  - kv_swap: vLLM has no per-request API to move a request's KV to host memory and back;
  - expert_preemption: vLLM runs a forward pass whole, it cannot pause between layers;
  - warm_start on request: vLLM can only put an engine it started to sleep; a model
    swapped away sleeps at level 1 by itself where vLLM has sleep mode (CUDA).
"""

from __future__ import annotations

from qlmserve.operations.ops import Capability

SUPPORTED_OPS = frozenset({Capability.EVICT, Capability.MODEL_SWAP, Capability.ITERATION_PREEMPTION})
