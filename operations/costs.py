"""Cost models of serving work and of the operations, shared by the planner, the
simulated engine and the simulator. Parameters come from measurement (the HF
engine's profiler) or from published GPU figures (configs/gpu_profiles.yaml)."""

from __future__ import annotations

from dataclasses import dataclass, replace


@dataclass(frozen=True)
class WorkerProfile:
    """Per-worker speed: step time = base + per-token/per-sequence terms (seconds)."""

    prefill_base_s: float = 0.005  # fixed cost of a prefill pass
    prefill_per_token_s: float = 0.0002  # per prompt token in the pass
    decode_base_s: float = 0.02  # one decode iteration, batch of one
    decode_per_seq_s: float = 0.001  # added per sequence in the batch
    decode_per_ctx_token_s: float = 0.0  # added per context token in the batch (attention)
    kv_bytes_per_token: int = 4096  # KV cache bytes of one token (all layers)
    kv_swap_bytes_per_s: float = 10e9  # device <-> host copy bandwidth
    load_cold_bytes_per_s: float = 2e9  # disk -> device
    load_warm_bytes_per_s: float = 20e9  # host RAM -> device
    load_fixed_s: float = 0.5  # process/graph set-up of a model load
    name: str = "default"

    def slowed(self, factor: float) -> WorkerProfile:
        """The same worker running `factor` times slower (every duration times `factor`):
        what a simulated engine runs on when one machine stands in for a fleet in real time
        (`qlm bench live`)."""
        f = factor
        return replace(self, prefill_base_s=self.prefill_base_s * f, prefill_per_token_s=self.prefill_per_token_s * f,
                       decode_base_s=self.decode_base_s * f, decode_per_seq_s=self.decode_per_seq_s * f,
                       decode_per_ctx_token_s=self.decode_per_ctx_token_s * f,
                       kv_swap_bytes_per_s=self.kv_swap_bytes_per_s / f,
                       load_cold_bytes_per_s=self.load_cold_bytes_per_s / f,
                       load_warm_bytes_per_s=self.load_warm_bytes_per_s / f, load_fixed_s=self.load_fixed_s * f)

    def prefill_time(self, tokens: int) -> float:
        return self.prefill_base_s + self.prefill_per_token_s * max(0, tokens)

    def decode_step_time(self, batch: int, context_tokens: int = 0) -> float:
        return (
            self.decode_base_s
            + self.decode_per_seq_s * max(1, batch)
            + self.decode_per_ctx_token_s * max(0, context_tokens)
        )

    def decode_tokens_per_s(self, batch: int) -> float:
        """Aggregate decode throughput at this batch size."""
        return max(1, batch) / self.decode_step_time(batch)

    def model_load_time(self, weight_bytes: int, warm: bool) -> float:
        bw = self.load_warm_bytes_per_s if warm else self.load_cold_bytes_per_s
        return self.load_fixed_s + weight_bytes / bw

    def kv_swap_time(self, tokens: int) -> float:
        return tokens * self.kv_bytes_per_token / self.kv_swap_bytes_per_s

    def request_service_time(self, prompt_tokens: int, output_tokens: float, batch: int) -> float:
        """Time a request occupies one of `batch` slots: its prefill plus its decode steps."""
        return self.prefill_time(prompt_tokens) + output_tokens * self.decode_step_time(batch)

