"""Admin API servicer: queue state, workers, plan, policy reload, drain."""

from __future__ import annotations

import asyncio

import grpc

from qlmserve.controller import policy_source, validation
from qlmserve.controller.core import Controller
from qlmserve.controller.policy import parse_policy
from qlmserve.pb import admin_pb2, admin_pb2_grpc


class AdminService(admin_pb2_grpc.AdminServicer):
    def __init__(self, controller: Controller) -> None:
        self.c = controller

    async def GetQueue(self, unused_request, unused_context):
        c = self.c
        snap = await c.snapshot()
        now = snap.now
        waits = c.predicted_waits()
        plan = c.last_plan
        groups = []
        for g in snap.groups:
            wid = plan.queue_of(g.group_id) or ""
            groups.append(admin_pb2.GroupInfo(
                group_id=g.group_id, model=g.model, slo_class=g.slo_class, waiting=g.size, worker_id=wid,
                position=plan.virtual_queues.get(wid, []).index(g.group_id) if wid else 0,
                oldest_wait_s=now - min(g.arrivals) if g.arrivals else 0.0, deadline_in_s=g.deadline - now,
                predicted_wait_s=waits.get(g.group_id, 0.0),
                predicted_attainment=plan.predicted_attainment.get(g.group_id, 0.0)))
        stats = await c.store.class_stats()
        classes = []
        names = sorted(set(c.policy.slo_classes) | {g.slo_class for g in snap.groups})
        for name in names:
            slo = c.slo_of(name)
            classes.append(admin_pb2.ClassCounts(
                slo_class=name, waiting=sum(g.size for g in snap.groups if g.slo_class == name),
                running=sum(1 for w in snap.workers for r in w.running if r.slo_class == name),
                finished=stats.get(name, {}).get("finished", 0), met_slo=stats.get(name, {}).get("met", 0),
                ttft_slo_s=slo.ttft_s if slo else 0.0))
        vqs = [admin_pb2.VirtualQueue(worker_id=w, group_ids=q) for w, q in sorted(plan.virtual_queues.items())]
        return admin_pb2.QueueState(groups=groups, classes=classes, virtual_queues=vqs, now=now)

    async def ListWorkers(self, unused_request, unused_context):
        c = self.c
        now = c.clock.now()
        out = []
        for wid, h in sorted(c.workers.items()):
            r = h.report
            out.append(admin_pb2.WorkerInfo(
                worker_id=wid, engine=h.engine, device=h.device, healthy=h.connected and r is not None,
                draining=h.draining, active_model=(r.active_model or "") if r else "",
                warm_models=r.warm_models if r else [], kv_capacity_tokens=r.kv_capacity_tokens if r else 0,
                kv_used_tokens=r.kv_used_tokens if r else 0, max_batch_size=r.max_batch_size if r else 0,
                running=[rid for rid, (_a, sw) in r.running.items() if not sw] if r else [],
                swapped=[rid for rid, (_a, sw) in r.running.items() if sw] if r else [],
                prefill_tokens_per_s=r.prefill_tokens_per_s if r else 0.0,
                decode_tokens_per_s=r.decode_tokens_per_s if r else 0.0, last_seen_s_ago=now - h.last_seen,
                preemption=r.preemption if r else ""))
        return admin_pb2.WorkerList(workers=out)

    async def GetPlan(self, unused_request, unused_context):
        p = await self.c.store.load_plan() or {}
        ops = []
        for op in p.get("operations", []):
            ops.append(admin_pb2.PlannedOperation(
                kind=op["kind"], worker_id=op.get("worker_id") or op.get("dst_worker_id") or "",
                request_ids=op.get("request_ids", []), model=op.get("model", ""), group_id=op.get("group_id", ""),
                reason=op.get("reason", "")))
        vqs = [admin_pb2.VirtualQueue(worker_id=w, group_ids=q) for w, q in sorted(p.get("virtual_queues", {}).items())]
        return admin_pb2.PlanState(virtual_queues=vqs, operations=ops, source=p.get("source", ""),
                                   solve_time_s=p.get("solve_time_s", 0.0), created_at=p.get("created_at", 0.0),
                                   note=p.get("note", ""), tick=p.get("tick", 0),
                                   operations_sent=self._operations_sent())

    def _operations_sent(self) -> dict[str, int]:
        return {s.labels["kind"]: int(s.value) for m in self.c.metrics.operations.collect() for s in m.samples
                if s.name.endswith("_total")}

    async def ReloadPolicy(self, request, unused_context):
        c = self.c
        max_bytes = c.policy.limits.max_policy_bytes
        if request.text:
            text = policy_source.check_text(request.text, max_bytes)
            source, path = "<policy sent by the admin>", None
        else:
            name = request.path or (str(c.policy_path) if c.policy_path else "")
            validation.text(name, "path", 4096)
            text, resolved = await policy_source.read_policy_file(c.policy_dir, name, max_bytes)
            source, path = str(resolved), str(resolved)
        # PolicyError -> INVALID_ARGUMENT, naming the source, line and field
        cfg = await asyncio.to_thread(parse_policy, text, source, c.policy_dir)
        await c.reload_policy(cfg)
        if path is not None:
            c.policy_path = path
        return admin_pb2.ReloadPolicyResponse(policy_name=cfg.planner.policy, slo_classes=sorted(cfg.slo_classes),
                                              models=sorted(cfg.models))

    async def DrainWorker(self, request, unused_context):
        validation.worker_id(request.worker_id, self.c.policy.limits)
        if request.resume:
            await self.c.undrain(request.worker_id)
            return admin_pb2.DrainWorkerResponse(requeued=0)
        n = await self.c.drain(request.worker_id, request.requeue_running)
        return admin_pb2.DrainWorkerResponse(requeued=n)


def add_to_server(server: grpc.aio.Server, controller: Controller) -> None:
    admin_pb2_grpc.add_AdminServicer_to_server(AdminService(controller), server)
