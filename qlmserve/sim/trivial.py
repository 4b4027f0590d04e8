"""A deliberately trivial policy (Llumnix's "Flood" in spirit), for measuring the simulator
itself: groups in arrival order, each on the worker of its model with the fewest queued
requests. No estimator, no operations; O(groups x log workers) per tick. Not in the
controller's registry: the simulator takes it as an injected scheduler."""

from __future__ import annotations

import heapq

from qlmserve.controller.policies.base import SchedulingPolicy
from qlmserve.controller.snapshot import ClusterSnapshot
from qlmserve.operations.plan import Plan


class LeastQueuedPolicy(SchedulingPolicy):
    name = "least-queued"

    def solve(self, snapshot: ClusterSnapshot) -> Plan:
        t0 = self.clock.now()
        self.charge_bookkeeping(snapshot)
        queues: dict[str, list[str]] = {w.worker_id: [] for w in snapshot.workers if w.accepts_work}
        heaps: dict[str | None, list[tuple[int, str]]] = {}
        for w in snapshot.workers:
            if w.accepts_work:
                load = w.active
                heaps.setdefault(w.loading_model or w.active_model, []).append((load, w.worker_id))
        for h in heaps.values():
            heapq.heapify(h)
        for g in sorted(snapshot.groups, key=lambda g: (min(g.arrivals), g.group_id)):
            h = heaps.get(g.model) or heaps.get(None)
            if not h:
                continue
            load, wid = heapq.heappop(h)
            queues[wid].append(g.group_id)
            heapq.heappush(h, (load + g.size, wid))
        return Plan(virtual_queues=queues, source=self.name, solve_time_s=self.clock.now() - t0)
