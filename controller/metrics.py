"""Prometheus metrics of the controller, in one registry so tests can run several controllers."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server


class ControllerMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.submitted = Counter("qlm_requests_submitted", "Requests accepted (durable in Redis)", ["slo_class"], registry=r)
        self.rejected = Counter("qlm_requests_rejected", "Requests refused at submission", ["reason"], registry=r)
        self.queue_length = Gauge("qlm_queue_length", "Waiting requests", ["slo_class"], registry=r)
        self.running = Gauge("qlm_running", "Requests held by workers", ["slo_class"], registry=r)
        self.ttft = Histogram("qlm_ttft_seconds", "Time to first token as seen by the controller", ["slo_class"],
                              buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 300, 600, 1800, 3600), registry=r)
        self.operations = Counter("qlm_operations", "Operations sent to workers", ["kind"], registry=r)
        self.tick_seconds = Histogram("qlm_tick_seconds", "Whole tick: snapshot, plan, actuation",
                                      buckets=(0.001, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2), registry=r)
        self.solve_seconds = Histogram("qlm_solve_seconds", "Policy solve time", ["source"],
                                       buckets=(0.001, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2), registry=r)
        self.workers = Gauge("qlm_workers", "Connected healthy workers", registry=r)

    def serve(self, port: int, addr: str = "127.0.0.1") -> None:
        start_http_server(port, addr=addr, registry=self.registry)
