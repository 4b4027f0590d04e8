"""`qlm top`: the operator's live view in a terminal, from the Admin gRPC API (no
Prometheus or Grafana needed): queue depth, attainment per class, workers, and
requests and operations per second, refreshed every `--interval` seconds."""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from dataclasses import dataclass, field

from qlmserve.ui import console


def register(sub: argparse._SubParsersAction) -> None:
    from qlmserve.controller.cli import _addr

    p = sub.add_parser("top", help="live view: queue depth, attainment per class, workers, operations per second")
    _addr(p)
    p.add_argument("--interval", type=float, default=1.0, help="seconds between refreshes (default 1)")
    p.add_argument("--once", action="store_true", help="read twice, --interval apart, print one frame and exit "
                                                       "(--json: as JSON)")
    p.set_defaults(func=cmd_top)


@dataclass
class Frame:
    """One reading of the Admin API, and the rates since the previous one."""

    at: float
    queue: object  # admin_pb2.QueueState
    workers: object  # admin_pb2.WorkerList
    plan: object  # admin_pb2.PlanState
    finished_per_s: dict[str, float] = field(default_factory=dict)
    ops_per_s: dict[str, float] = field(default_factory=dict)


async def read(client, prev: Frame | None) -> Frame:
    q, ws, p = await asyncio.gather(client.queue(), client.workers(), client.plan())
    f = Frame(time.monotonic(), q, ws, p)
    if prev is not None and f.at > prev.at:
        dt = f.at - prev.at
        before = {k.slo_class: k.finished for k in prev.queue.classes}
        f.finished_per_s = {k.slo_class: max(0, k.finished - before.get(k.slo_class, 0)) / dt for k in q.classes}
        ops0 = dict(prev.plan.operations_sent)
        f.ops_per_s = {k: max(0, v - ops0.get(k, 0)) / dt for k, v in p.operations_sent.items()}
    return f


def as_dict(f: Frame) -> dict:
    from google.protobuf.json_format import MessageToDict

    def d(m):
        return MessageToDict(m, preserving_proto_field_name=True, always_print_fields_with_no_presence=True)

    return {"classes": d(f.queue)["classes"], "groups": len(f.queue.groups), "workers": d(f.workers)["workers"],
            "tick": f.plan.tick, "plan_source": f.plan.source, "finished_per_s": f.finished_per_s,
            "operations_per_s": f.ops_per_s, "operations_sent": dict(f.plan.operations_sent)}


def render(f: Frame):
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    q, p = f.queue, f.plan
    healthy = sum(1 for w in f.workers.workers if w.healthy)
    waiting = sum(k.waiting for k in q.classes)
    running = sum(k.running for k in q.classes)
    head = Text(f"queue depth {waiting} waiting in {len(q.groups)} groups, {running} running | workers "
                f"{healthy}/{len(f.workers.workers)} healthy | tick {p.tick}, plan by {p.source or '-'} in "
                f"{1000 * p.solve_time_s:.1f} ms | {time.strftime('%H:%M:%S')}", style="bold")
    t = Table(title="SLO classes", title_justify="left")
    for col in ("class", "TTFT SLO s", "waiting", "running", "finished", "done/s", "attainment"):
        t.add_column(col, justify="left" if col == "class" else "right")
    for k in q.classes:
        att = f"{100 * k.met_slo / k.finished:.1f}%" if k.finished else "-"
        t.add_row(k.slo_class, f"{k.ttft_slo_s:g}", str(k.waiting), str(k.running), str(k.finished),
                  f"{f.finished_per_s.get(k.slo_class, 0.0):.1f}", att)
    w = Table(title="Workers", title_justify="left")
    for col in ("worker", "healthy", "model", "running", "swapped", "KV used", "decode tok/s", "preemption"):
        w.add_column(col)
    for x in f.workers.workers:
        kv = f"{100 * x.kv_used_tokens / x.kv_capacity_tokens:.0f}%" if x.kv_capacity_tokens else "-"
        w.add_row(x.worker_id, "yes" if x.healthy else ("draining" if x.draining else "NO"), x.active_model or "-",
                  str(len(x.running)), str(len(x.swapped)), kv, f"{x.decode_tokens_per_s:.1f}", x.preemption or "-")
    ops = ", ".join(f"{k} {v:.1f}" for k, v in sorted(f.ops_per_s.items()) if v) or "none"
    total = sum(f.ops_per_s.values())
    return Group(head, t, w, Text(f"operations/s: {total:.1f} ({ops}); sent since start: "
                                  f"{sum(p.operations_sent.values())}"))


def cmd_top(args) -> int:
    from rich.live import Live

    from qlmserve.controller.cli import _client, _run

    async def main() -> int:
        async with _client(args) as c:
            prev = await read(c, None)
            if args.once or args.json:
                await asyncio.sleep(args.interval)
                f = await read(c, prev)
                if args.json:
                    print(json.dumps(as_dict(f)))
                else:
                    console().print(render(f))
                return 0
            with Live(render(prev), console=console(), screen=False, auto_refresh=False) as live:
                while True:
                    await asyncio.sleep(args.interval)
                    prev = await read(c, prev)
                    live.update(render(prev), refresh=True)

    try:
        return _run(main())
    except KeyboardInterrupt:
        return 0
