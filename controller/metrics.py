"""Prometheus metrics of the controller, in one registry so tests can run several controllers.

Names keep the `qlm_` prefix and follow what operators of vLLM and llm-d look for
(waiting/running requests, queue time, TTFT, TPOT, KV-cache usage), with `model` and
`slo_class` labels where a request is counted. README "Metrics" lists each one;
configs/grafana/qlm-dashboard.json charts them (tests/unit/test_dashboard.py checks
that every query there names a metric exported here)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

# Seconds a request waits or takes to its first token: from tens of ms to an hour (batch).
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 300, 600, 1800, 3600)
TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.15, 0.3, 0.6, 1.2, 2.5)
SHORT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2)
LOAD_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 40, 80, 160)


class ControllerMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        req = ["model", "slo_class"]
        self.submitted = Counter("qlm_requests_submitted", "Requests accepted (durable in Redis)", req, registry=r)
        self.rejected = Counter("qlm_requests_rejected", "Requests refused at submission or failed while waiting",
                                ["reason"], registry=r)
        self.waiting = Gauge("qlm_requests_waiting", "Requests waiting in the queue", req, registry=r)
        self.running = Gauge("qlm_requests_running", "Requests held by workers (running or swapped)", req, registry=r)
        self.queue_time = Histogram("qlm_queue_time_seconds", "Arrival to first assignment to a worker", req,
                                    buckets=LATENCY_BUCKETS, registry=r)
        self.ttft = Histogram("qlm_ttft_seconds", "Time to first token (arrival to the first token in Redis)", req,
                              buckets=LATENCY_BUCKETS, registry=r)
        self.tpot = Histogram("qlm_tpot_seconds", "Time per output token after the first, per finished request",
                              req, buckets=TPOT_BUCKETS, registry=r)
        self.slo_attainment = Gauge("qlm_slo_attainment", "Finished requests that met their TTFT target (0-1)",
                                    ["slo_class"], registry=r)
        self.finished = Gauge("qlm_requests_finished", "Finished requests (Redis class counters)", ["slo_class"],
                              registry=r)
        self.operations = Counter("qlm_operations", "Operations sent to workers: evict, swap_out, swap_in, "
                                  "load_model, warm_model, set_preemption, move_group, ...", ["kind"], registry=r)
        self.kv_usage = Gauge("qlm_kv_cache_usage_ratio", "KV-cache tokens used / capacity, per worker", ["worker"],
                              registry=r)
        self.kv_used = Gauge("qlm_kv_cache_used_tokens", "KV-cache tokens used, per worker", ["worker"], registry=r)
        self.model_loads = Counter("qlm_model_loads", "Model loads the workers completed, warm (from a host-RAM "
                                   "copy) or cold (from disk)", ["model", "kind"], registry=r)
        self.model_load_seconds = Histogram("qlm_model_load_seconds", "Seconds a model load took, as the worker "
                                            "measured it", ["model", "kind"], buckets=LOAD_BUCKETS, registry=r)
        self.tick_seconds = Histogram("qlm_tick_seconds", "Whole tick: snapshot, plan, actuation",
                                      buckets=SHORT_BUCKETS, registry=r)
        self.solve_seconds = Histogram("qlm_solve_seconds", "Planner solve time by the source of the plan",
                                       ["source"], buckets=SHORT_BUCKETS, registry=r)
        self.workers = Gauge("qlm_workers", "Connected healthy workers", registry=r)
        self.http_requests = Counter("qlm_http_requests", "HTTP API requests by endpoint and status code",
                                     ["endpoint", "code"], registry=r)

    def serve(self, port: int, addr: str = "127.0.0.1") -> None:
        start_http_server(port, addr=addr, registry=self.registry)

    def exported_names(self) -> set[str]:
        """Every series name this registry exports (histogram _bucket/_sum/_count, counter _total)."""
        suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",)}
        return {m.name + s for m in self.registry.collect() for s in suffixes.get(m.type, ("",))}
