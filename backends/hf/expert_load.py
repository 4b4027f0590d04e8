"""Expert activations of an MoE model, per layer and per engine step.

Every MoE family the engine serves (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE) routes through
a top-k router module (`layer.mlp.gate`) whose output ends with the chosen expert ids
(tokens x k). A forward hook on each router counts them: `total[layer, expert]` since the
model was loaded, `step[layer, expert]` in the engine's last step (every pass of it). The
engine reports the totals (EngineStats.expert_activations); `imbalance()` is the hottest
expert's share over the mean, per layer.

`skew_router` (for measurements) adds a bias to one expert's router logit before top-k,
so a routing distribution can be skewed on purpose.
"""

from __future__ import annotations

from collections.abc import Callable

import torch


def routers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The router of each decoder layer of an MoE model ([] for a dense one)."""
    out = []
    for layer in getattr(getattr(model, "model", model), "layers", []):
        gate = getattr(getattr(layer, "mlp", None), "gate", None)
        if gate is not None and hasattr(gate, "top_k") and hasattr(gate, "weight") and gate.weight.dim() == 2:
            out.append(gate)
    return out


class ExpertLoad:
    """Counts of expert activations per layer (module doc)."""

    def __init__(self, model: torch.nn.Module) -> None:
        self._routers = routers(model)
        self.num_layers = len(self._routers)
        self.num_experts = int(self._routers[0].weight.shape[0]) if self._routers else 0
        self.total = torch.zeros(self.num_layers, self.num_experts, dtype=torch.long)
        self.step = torch.zeros_like(self.total)
        self._hooks = [r.register_forward_hook(self._counter(i)) for i, r in enumerate(self._routers)]

    def _counter(self, layer: int) -> Callable:
        def hook(_module, _inputs, output):
            ids = output[-1].reshape(-1)
            counts = torch.bincount(ids.cpu(), minlength=self.num_experts)[: self.num_experts]
            self.step[layer] += counts
            self.total[layer] += counts

        return hook

    def begin_step(self) -> None:
        self.step.zero_()

    def imbalance(self, counts: torch.Tensor | None = None) -> list[float]:
        """Per layer: the busiest expert's activations over the mean (1.0: even)."""
        c = (self.step if counts is None else counts).double()
        mean = c.mean(dim=1).clamp(min=1e-9)
        return (c.max(dim=1).values / mean).tolist()

    def remove(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []


def skew_router(model: torch.nn.Module, expert: int, bias: float) -> Callable[[], None]:
    """Raise one expert's router logit by `bias` in every layer (top-k recomputed as the
    Mixtral-family routers do: softmax, top-k, renormalised); returns the undo."""
    hooks = []
    for r in routers(model):
        def hook(module, _inputs, output):
            logits = output[0].clone()
            logits[:, expert] += bias
            probs = torch.softmax(logits.float(), dim=-1)
            top, idx = torch.topk(probs, module.top_k, dim=-1)
            if getattr(module, "norm_topk_prob", True):
                top = top / top.sum(dim=-1, keepdim=True)
            return logits, top.to(output[1].dtype), idx

        hooks.append(r.register_forward_hook(hook, prepend=True))

    def undo() -> None:
        for h in hooks:
            h.remove()

    return undo
