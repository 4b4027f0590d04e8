"""The fluid bound of a scenario with one best-effort class at W/3 whose work is mostly
decode (ls2, mm3; Scenario.output_bound):
the share of the offered work that any scheduler could have started by its deadline.

Every request counts and runs to completion, so the work started on time is at most what
the fleet produces until the last best-effort deadline, window + TTFT, at the best model
placement: with model shares s_m and a fleet of one model m producing c_m output tokens
per second at saturation, a fleet split to follow the shares produces 1 / sum(s_m / c_m).
The bound is that capacity times (window + TTFT) over the output tokens offered. It is a
fluid figure (it ignores the batch slots already running when a deadline passes, and that
a scheduler favouring short outputs counts more requests per token), so a policy can pass
it by a little; far below it a policy wastes capacity, far above it no target can be met.

The count bound drops the shares: it takes the requests cheapest first (output tokens
over their model's per-worker rate at saturation) while the fleet's worker-seconds until
window + TTFT last. No scheduler, even one that knew every output length and ignored the
deadlines inside the window, starts more requests on time.

On prompt-heavy scenarios (output_bound False) the prefill bound does the same with each
request's prefill seconds (its prompt at the per-token rate of its model on one worker,
the pass's fixed cost left out), leaving out the latency-sensitive requests whose own
prefill on an idle worker exceeds their TTFT. It ignores prefix-cache hits, which save
prefill, so a scheduler reusing prefixes could pass it; nothing else could.
"""

from __future__ import annotations

from dataclasses import replace

from qlmserve.bench.scenarios import Scenario


def mix_capacity(sc: Scenario, capacity_tok_s: float, measure) -> dict | None:
    """Output tokens per second of the fleet split across the models by their shares, from
    one saturated single-model fleet per model (`measure(scenario)`: its output tokens/s;
    a one-model scenario's own measured capacity is that already); None for scenarios
    without one W/3 class or where output tokens do not measure the work (prompt-heavy)."""
    if sc.be_ttft_window_share is None or not sc.output_bound:
        return None
    if len(sc.model_mix) == 1:
        per_model = {m: capacity_tok_s for m in sc.model_mix}
    else:
        per_model = {m: measure(replace(sc, models=(m,), initial_models=(m,), model_mix={m: 1.0}, warm_models=()))
                     for m in sc.model_mix}
    total = sum(sc.model_mix.values())
    tok_s = 1.0 / sum(share / total / per_model[m] for m, share in sc.model_mix.items())
    return {"per_model_tok_s": per_model, "mix_tok_s": tok_s,
            "method": "each model alone on the whole fleet (model-aware FCFS at saturation), split by the "
                      "model shares"}


def _be_ttft_s(sc: Scenario, window_s: float) -> float:
    """The best-effort TTFT target (W/3): the window's last deadline is window + this."""
    return max(c["ttft_s"] for c in sc.classes_for(window_s).values() if not c.get("latency_sensitive"))


def count_bound(sc: Scenario, workers: int, window_s: float, requests, mix: dict | None) -> float | None:
    """The count bound for a workload (`requests`: output_tokens and model each)."""
    if mix is None or not requests:
        return None
    ttft = _be_ttft_s(sc, window_s)
    per_worker = {m: v / workers for m, v in mix["per_model_tok_s"].items()}
    budget, n = workers * (window_s + ttft), 0
    for cost in sorted(r.output_tokens / per_worker[r.model] for r in requests):
        budget -= cost
        if budget < 0:
            break
        n += 1
    return n / len(requests)


def fluid_bound(sc: Scenario, window_s: float, offered_tok_s: float, mix: dict | None) -> float | None:
    """The bound for a workload offering `offered_tok_s` output tokens per second over the
    window (the workload's own: its outputs average a little off the trace's mean that the
    load is scaled by, 8,832 tok/s against 1.48 x 5,563 on ls2)."""
    if mix is None:
        return None
    ttft = _be_ttft_s(sc, window_s)
    return min(1.0, mix["mix_tok_s"] * (window_s + ttft) / (offered_tok_s * window_s))


def has_prefill_bound(sc: Scenario) -> bool:
    """Whether the scenario gets the prefill bound: prompt-heavy, one W/3 best-effort class."""
    return not sc.output_bound and sc.be_ttft_window_share is not None


def prefill_bound(sc: Scenario, workers: int, window_s: float, requests) -> float | None:
    """The prefill bound for a workload (`requests`: prompt_tokens, model and slo_class each)."""
    if not has_prefill_bound(sc) or not requests:
        return None
    profiles = sc.model_profiles(workers)
    ttft = {c: v["ttft_s"] for c, v in sc.classes_for(window_s).items()}
    reach = [r for r in requests if profiles[r.model].prefill_time(r.prompt_tokens) <= ttft[r.slo_class]]
    budget, n = workers * (window_s + _be_ttft_s(sc, window_s)), 0
    for cost in sorted(profiles[r.model].prefill_per_token_s * r.prompt_tokens for r in reach):
        budget -= cost
        if budget < 0:
            break
        n += 1
    return n / len(requests)
