"""Protobuf <-> domain conversion, at the edge only."""

from __future__ import annotations

from qlmserve.controller.core import SubmitInput
from qlmserve.controller.request import Request
from qlmserve.controller.service.errors import status_of
from qlmserve.controller.store import SubmitResult
from qlmserve.controller.submit_batch import Outcome
from qlmserve.controller.workers import OpCommand, RunCommand, WorkerReport
from qlmserve.operations.batching import PreemptionMode
from qlmserve.operations.costs import WorkerProfile
from qlmserve.operations.ops import Capability
from qlmserve.pb import client_pb2, worker_pb2


def submit_from_pb(pb: client_pb2.SubmitRequest, tenant: str) -> SubmitInput:
    """The fields as sent; Controller.submit validates them (top_p 0 means off there)."""
    which = pb.WhichOneof("prompt_input")
    s = pb.sampling
    return SubmitInput(
        model=pb.model, slo_class=pb.slo_class,
        prompt=pb.prompt if which == "prompt" else None,
        prompt_token_ids=list(pb.prompt_token_ids.ids) if which == "prompt_token_ids" else None,
        max_tokens=pb.max_tokens, temperature=s.temperature, top_p=s.top_p,
        seed=s.seed if s.HasField("seed") else None, stop_token_ids=tuple(s.stop_token_ids),
        user_id=pb.user_id, idempotency_key=pb.idempotency_key, tenant=tenant)


def submit_response_to_pb(res: SubmitResult, prompt_tokens: int) -> client_pb2.SubmitResponse:
    return client_pb2.SubmitResponse(request_id=res.request_id, prompt_tokens=prompt_tokens, group_id=res.group_id,
                                     duplicate=res.duplicate)


def submit_result_to_pb(outcome: Outcome) -> client_pb2.SubmitResult:
    """One SubmitBatch item: Submit's answer, or the status Submit would have failed with."""
    if isinstance(outcome, BaseException):
        return client_pb2.SubmitResult(error=status_of(outcome))
    return client_pb2.SubmitResult(accepted=submit_response_to_pb(*outcome))


def status_to_pb(r: Request) -> client_pb2.RequestStatus:
    return client_pb2.RequestStatus(
        request_id=r.request_id, status=r.status.value, model=r.model, slo_class=r.slo_class, group_id=r.group_id,
        worker_id=r.worker_id, prompt_tokens=r.prompt_tokens, generated_tokens=r.generated, max_tokens=r.max_tokens,
        arrival_time=r.arrival, first_token_time=r.first_token_at or 0.0, finish_time=r.finish_at or 0.0,
        finish_reason=r.finish_reason, error=r.error, attempts=r.attempts)


def command_to_pb(cmd: RunCommand | OpCommand) -> worker_pb2.ControllerMessage:
    if isinstance(cmd, RunCommand):
        run = worker_pb2.RunRequest(
            request_id=cmd.request_id, attempt=cmd.attempt, model=cmd.model, prompt_token_ids=cmd.prompt_token_ids,
            generated_token_ids=cmd.generated_token_ids, max_tokens=cmd.max_tokens, temperature=cmd.temperature,
            top_p=cmd.top_p, stop_token_ids=list(cmd.stop_token_ids), latency_sensitive=cmd.latency_sensitive,
            priority=cmd.priority)
        if cmd.seed is not None:
            run.seed = cmd.seed
        return worker_pb2.ControllerMessage(run=run)
    return worker_pb2.ControllerMessage(op=worker_pb2.WorkerOp(
        op_id=cmd.op_id, kind=cmd.kind, request_ids=list(cmd.request_ids), model=cmd.model, mode=cmd.mode,
        max_pause_s=cmd.max_pause_s))


def report_from_pb(s: worker_pb2.WorkerState) -> WorkerReport:
    return WorkerReport(
        active_model=s.active_model or None, warm_models=list(s.warm_models),
        kv_capacity_tokens=s.kv_capacity_tokens, kv_used_tokens=s.kv_used_tokens,
        running={e.request_id: (e.attempt, e.swapped) for e in s.running}, waiting=list(s.waiting),
        max_batch_size=s.max_batch_size, prefill_tokens_per_s=s.prefill_tokens_per_s,
        decode_tokens_per_s=s.decode_tokens_per_s, device=s.device, loading_model=s.loading_model or None,
        preemption=PreemptionMode(s.preemption or "none"), profile=cost_from_pb(s.cost) if s.HasField("cost") else None,
        servable_models=list(s.servable_models), host_ram_bytes=s.host_ram_bytes,
        host_kv_capacity_tokens=s.host_kv_capacity_tokens if s.HasField("host_kv_capacity_tokens") else None,
        host_kv_used_tokens=s.host_kv_used_tokens, supported_ops=_capabilities(s.supported_ops),
        expert_activations=tuple(tuple(layer.activations) for layer in s.expert_load), **_prefix_cache(s))


def _prefix_cache(s: worker_pb2.WorkerState) -> dict:
    if not s.HasField("prefix_cache") or not s.prefix_cache.block_tokens:
        return {}
    p = s.prefix_cache
    return {"prefix_block_tokens": p.block_tokens, "prefix_blocks": tuple(p.blocks),
            "queued_prefill_tokens": p.queued_prefill_tokens}


def cost_from_pb(c: worker_pb2.CostModel) -> WorkerProfile:
    return WorkerProfile(
        prefill_base_s=c.prefill_base_s, prefill_per_token_s=c.prefill_per_token_s, decode_base_s=c.decode_base_s,
        decode_per_seq_s=c.decode_per_seq_s, decode_per_ctx_token_s=c.decode_per_ctx_token_s,
        kv_bytes_per_token=c.kv_bytes_per_token, kv_swap_bytes_per_s=c.kv_swap_bytes_per_s,
        load_cold_bytes_per_s=c.load_cold_bytes_per_s, load_warm_bytes_per_s=c.load_warm_bytes_per_s,
        load_fixed_s=c.load_fixed_s, name="reported")


def _capabilities(names: list[str]) -> tuple[Capability, ...] | None:
    """A worker that names no operation predates the field: it supports every operation.
    A name this controller does not know (a newer worker) offers nothing it could ask for."""
    if not names:
        return None
    known = {c.value for c in Capability}
    return tuple(sorted(Capability(n) for n in names if n in known))
