"""`qlm bench chaos`: SIGKILLs under load, and what they cost.

On loopback, in a temporary folder: a private redis-server (appendfsync always), two
controllers on it (one leads, one stands by), simulated workers that dial both, and a
bounded load of clients that submit under idempotency keys and resume by offset
(`QlmClient.generate_reliably`). At random moments one component gets SIGKILL — the
leading controller, the standby, a worker, Redis — in a shuffled round, and is started
again. At the end every acknowledged request is checked against Redis.

Recovery, per component (from the SIGKILL):
  - leader: until another controller holds the leader lease (it then plans and takes the
    workers);
  - standby: until the restarted controller answers the Client API again (the leader
    served throughout: this is the time to full redundancy);
  - worker: for each latency-sensitive request it was running, until a token of it is
    written by another worker;
  - redis: until tokens are written again (the restart is `--restart-delay` after the kill).

Columns: acknowledged (Submit answered), completed (every token, status finished), lost
(acknowledged, not completed), duplicated tokens (tokens a client received twice or that
Redis holds beyond max_tokens).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from qlmserve.ui import console

COMPONENTS = ("leader", "standby", "worker", "redis")

POLICY = """
tick_interval_ms: 50
heartbeat_timeout_s: 5
max_running_per_worker: 8
default_slo_class: batch
slo_classes:
  interactive: {ttft_s: 2.0, priority: 10, latency_sensitive: true}
  batch: {ttft_s: 60.0, priority: 1}
models:
  sim-a: {max_context: 1024, weight_bytes: 1000000, output_prior: {mean: 40, std: 20}}
planner: {policy: edf}
grouping: {window_s: 0.5}
access: {anonymous_clients: true}
"""

PROFILE = """
name: chaos-fast
prefill_base_s: 0.002
prefill_per_token_s: 0.00001
decode_base_s: 0.01
decode_per_seq_s: 0.001
load_fixed_s: 0.05
"""


def register_bench(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("chaos", help="SIGKILL controllers, workers and Redis under load; count losses")
    p.add_argument("--kills", type=int, default=20, help="kills per component (default 20)")
    p.add_argument("--interval", type=float, default=3.0, help="mean seconds between kills")
    p.add_argument("--rate", type=float, default=6.0, help="requests per second offered")
    p.add_argument("--workers", type=int, default=3)
    p.add_argument("--restart-delay", type=float, default=0.3, help="seconds before a killed process restarts")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", dest="json_out", help="also write the results here")
    p.add_argument("--keep", help="keep the run's folder (logs) here instead of a temporary one")
    p.set_defaults(func=cmd_chaos)


@dataclass
class Proc:
    name: str
    args: list[str]
    log: Path
    p: subprocess.Popen | None = None

    def start(self) -> None:
        out = open(self.log, "ab")  # noqa: SIM115 - the child owns it
        self.p = subprocess.Popen(self.args, stdout=out, stderr=subprocess.STDOUT,
                                  env=dict(os.environ, PYTHONUNBUFFERED="1"))

    def kill(self) -> None:
        if self.p and self.p.poll() is None:
            self.p.send_signal(signal.SIGKILL)
            self.p.wait()

    def stop(self) -> None:
        if self.p and self.p.poll() is None:
            self.p.terminate()
            try:
                self.p.wait(10)
            except subprocess.TimeoutExpired:
                self.p.kill()


@dataclass
class Outcome:
    acknowledged: int = 0
    refused: int = 0
    completed: int = 0
    lost: int = 0
    duplicated: int = 0
    errors: list[str] = field(default_factory=list)
    recovery: dict[str, list[float]] = field(default_factory=lambda: {c: [] for c in COMPONENTS})
    kills: dict[str, int] = field(default_factory=lambda: {c: 0 for c in COMPONENTS})


def cmd_chaos(args) -> int:
    return asyncio.run(_main(args))


def _qlm(*a: str) -> list[str]:
    return [sys.executable, "-m", "qlmserve.cli", *a]


async def _main(args) -> int:
    from qlmserve.controller.redis_server import PrivateRedis, stable_port

    base = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="qlm-chaos-"))
    base.mkdir(parents=True, exist_ok=True)
    (base / "policy.yaml").write_text(POLICY)
    (base / "profile.yaml").write_text(PROFILE)
    logs = base / "logs"
    logs.mkdir(exist_ok=True)
    redis_srv = PrivateRedis(base / "redis", appendfsync="always").start()
    url = redis_srv.url
    ports = [stable_port(), stable_port()]  # restarted on the same ports
    addresses = ",".join(f"127.0.0.1:{p}" for p in ports)
    ctrls = {cid: Proc(cid, _qlm("serve", "--redis", url, "--port", str(port), "--policy", str(base / "policy.yaml"),
                                 "--data-dir", str(base / "data"), "--id", cid, "--lease-ttl", "1.0"),
                       logs / f"{cid}.log") for cid, port in zip(("c0", "c1"), ports)}
    workers = [Proc(f"w{i}", _qlm("worker", "--controller", addresses, "--id", f"w{i}", "--engine", "sim",
                                  "--sim-profile", str(base / "profile.yaml"), "--data-dir", str(base / "data"),
                                  "--max-batch", "8"), logs / f"w{i}.log") for i in range(args.workers)]
    out = Outcome()
    rng = random.Random(args.seed)
    con = console(stderr=True)
    import redis as redis_sync

    r = redis_sync.Redis.from_url(url, decode_responses=True, socket_timeout=2)
    try:
        ctrls["c0"].start()
        await _wait(lambda: _lease_holder(r) == "c0", 60, "the first controller to lead")
        ctrls["c1"].start()
        for w in workers:
            w.start()
        await _wait(lambda: _healthy_workers(r) >= len(workers), 90, "workers")
        con.print(f"chaos: {args.kills} kills per component, load {args.rate}/s, folder {base}")
        load = asyncio.create_task(_load(addresses, args, out, rng))
        plan = [c for c in COMPONENTS for _ in range(args.kills)]
        rng.shuffle(plan)
        for i, comp in enumerate(plan):
            await asyncio.sleep(rng.uniform(0.5, 1.5) * args.interval)
            rec = await _kill(comp, ctrls, workers, redis_srv, r, args, rng)
            out.kills[comp] += 1
            if rec is not None:
                out.recovery[comp].extend(rec if isinstance(rec, list) else [rec])
            con.print(f"  kill {i + 1}/{len(plan)}: {comp}, recovered in "
                      f"{_fmt(rec)}", highlight=False)
            r = redis_sync.Redis.from_url(url, decode_responses=True, socket_timeout=2)
        load.stop = True  # type: ignore[attr-defined]
        await asyncio.wait_for(load, timeout=300)
        _verify(r, out)
    finally:
        for p in list(workers) + list(ctrls.values()):
            p.stop()
        redis_srv.stop()
    result = _summary(out, args)
    _print(result)
    if args.json_out:
        Path(args.json_out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json_out).write_text(json.dumps(result, indent=2))
    ok = result["lost"] == 0 and result["duplicated_tokens"] == 0
    return 0 if ok else 1


def _fmt(rec) -> str:
    if rec is None:
        return "-"
    vals = rec if isinstance(rec, list) else [rec]
    return ", ".join(f"{v:.2f}s" for v in vals) if vals else "(no LS request running)"


def _lease_holder(r) -> str | None:
    try:
        v = r.get("qlm:leader")
    except Exception:  # noqa: BLE001 - Redis may be down mid-chaos
        return None
    return v.split("|", 1)[0] if v else None


def _healthy_workers(r) -> int:
    try:
        return sum(1 for w in r.smembers("qlm:workers") if r.hget(f"qlm:worker:{w}", "connected") == "1")
    except Exception:  # noqa: BLE001
        return 0


async def _wait(pred, timeout_s: float, what: str, interval: float = 0.02) -> float:
    t0 = time.monotonic()
    while True:
        res = await asyncio.to_thread(pred)
        if res:
            return time.monotonic() - t0
        if time.monotonic() - t0 > timeout_s:
            raise TimeoutError(f"timed out waiting for {what}")
        await asyncio.sleep(interval)


async def _kill(comp, ctrls, workers, redis_srv, r, args, rng):
    if comp in ("leader", "standby"):
        leader = _lease_holder(r)
        if leader is None:
            await _wait(lambda: _lease_holder(r) is not None, 30, "a leader")
            leader = _lease_holder(r)
        victim = ctrls[leader] if comp == "leader" else next(p for cid, p in ctrls.items() if cid != leader)
        t0 = time.monotonic()
        victim.kill()
        if comp == "leader":
            rec = await _wait(lambda: _lease_holder(r) not in (None, leader), 30, "failover")
        await asyncio.sleep(args.restart_delay)
        victim.start()
        if comp == "standby":
            await _wait(lambda: _answers(victim), 60, "the standby to answer")
            rec = time.monotonic() - t0
        return rec
    if comp == "worker":
        victim = rng.choice(workers)
        running = await asyncio.to_thread(r.hgetall, f"qlm:worker:{victim.name}:running")
        ls = []
        for rid in running:
            h = await asyncio.to_thread(r.hmget, f"qlm:req:{rid}", "ls", "generated", "status")
            if h[0] == "1" and h[2] in ("running", "swapped"):
                ls.append((rid, int(h[1] or 0)))
        t0 = time.monotonic()
        victim.kill()
        recs = []
        pending = dict(ls)
        deadline = t0 + 60
        while pending and time.monotonic() < deadline:
            for rid, gen in list(pending.items()):
                h = await asyncio.to_thread(r.hmget, f"qlm:req:{rid}", "worker_id", "generated", "status")
                if h[2] in ("finished", "cancelled", "failed") or (h[0] not in (victim.name, "")
                                                                  and int(h[1] or 0) > gen):
                    recs.append(time.monotonic() - t0)
                    del pending[rid]
            await asyncio.sleep(0.01)
        recs += [60.0] * len(pending)
        await asyncio.sleep(args.restart_delay)
        victim.start()
        return recs
    # redis
    before = await asyncio.to_thread(_tokens_written, r)
    t0 = time.monotonic()
    redis_srv.proc.send_signal(signal.SIGKILL)
    redis_srv.proc.wait()
    await asyncio.sleep(args.restart_delay)
    for attempt in range(3):
        redis_srv.spawn()  # from the main thread: it dies with this process
        try:
            await asyncio.to_thread(redis_srv.wait_ready)
            break
        except RuntimeError as exc:
            if attempt == 2:
                raise
            print(f"  redis restart failed, again: {str(exc)[:160]}", file=sys.stderr)
    r2 = __import__("redis").Redis.from_url(redis_srv.url, decode_responses=True, socket_timeout=2)
    await _wait(lambda: _tokens_written(r2) > before, 60, "tokens after the Redis restart")
    return time.monotonic() - t0


def _tokens_written(r) -> int:
    try:
        return int(r.xlen("qlm:ttftlog")) + sum(int(v) for k, v in r.hgetall("qlm:lengths").items()
                                                if k.endswith("|sum") for v in [float(v)])
    except Exception:  # noqa: BLE001
        return -1


def _answers(proc: Proc) -> bool:
    import grpc

    port = proc.args[proc.args.index("--port") + 1]
    ch = grpc.insecure_channel(f"127.0.0.1:{port}")
    try:
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        res = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service="qlmserve.v1.Client"),
                                                   timeout=0.5)
        return res.status == health_pb2.HealthCheckResponse.SERVING
    except grpc.RpcError:
        return False
    finally:
        ch.close()


async def _load(addresses: str, args, out: Outcome, rng: random.Random) -> None:
    from qlmserve.client import QlmClient, submit_request

    task = asyncio.current_task()
    task.stop = False  # type: ignore[attr-defined]
    results: list = []
    async with QlmClient(addresses) as client:
        inflight = set()
        i = 0
        while not task.stop:  # type: ignore[attr-defined]
            ls = rng.random() < 0.3
            n = rng.randint(20, 80)
            req = submit_request("sim-a", prompt_token_ids=[rng.randint(3, 500) for _ in range(rng.randint(2, 20))],
                                 max_tokens=n, slo_class="interactive" if ls else "batch",
                                 idempotency_key=f"chaos-{args.seed}-{i}")
            i += 1
            t = asyncio.create_task(_one(client, req, out, results))
            inflight.add(t)
            t.add_done_callback(inflight.discard)
            await asyncio.sleep(rng.expovariate(args.rate))
        await asyncio.gather(*inflight)
    out.results = results  # type: ignore[attr-defined]


async def _one(client, req, out: Outcome, results: list) -> None:
    import grpc

    acked = {"id": None}

    def on_chunk(res, chunk) -> None:
        acked["id"] = res.request_id

    try:
        res = await client.generate_reliably(req, retry_for_s=240, on_chunk=on_chunk)
        out.acknowledged += 1
        results.append((res, req.max_tokens))
    except grpc.aio.AioRpcError as exc:
        if exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and acked["id"] is None:
            out.refused += 1
            return
        out.acknowledged += acked["id"] is not None
        out.errors.append(f"{exc.code().name}: {exc.details()[:200]}")
        results.append((None, req.max_tokens))
    except RuntimeError as exc:  # a gap or duplicate in the stream
        out.acknowledged += 1
        out.duplicated += 1
        out.errors.append(str(exc)[:200])
        results.append((None, req.max_tokens))


def _verify(r, out: Outcome) -> None:
    for res, max_tokens in getattr(out, "results", []):
        if res is None:
            out.lost += 1
            continue
        ids = [int(x) for x in (r.get(f"qlm:req:{res.request_id}:ids") or "").split(",") if x]
        status = r.hget(f"qlm:req:{res.request_id}", "status")
        if len(ids) > max_tokens or len(res.token_ids) > max_tokens:
            out.duplicated += max(len(ids), len(res.token_ids)) - max_tokens
        if status == "finished" and res.token_ids == ids and len(ids) == max_tokens:
            out.completed += 1
        else:
            out.lost += 1
            out.errors.append(f"{res.request_id}: status {status}, client {len(res.token_ids)} tokens, "
                              f"redis {len(ids)}, max {max_tokens}")


def _summary(out: Outcome, args) -> dict:
    rec = {}
    for c in COMPONENTS:
        v = np.array(out.recovery[c]) if out.recovery[c] else np.array([np.nan])
        rec[c] = {"kills": out.kills[c], "samples": len(out.recovery[c]),
                  "p50_s": float(np.nanpercentile(v, 50)), "p99_s": float(np.nanpercentile(v, 99)),
                  "max_s": float(np.nanmax(v))}
    return {"acknowledged": out.acknowledged, "refused": out.refused, "completed": out.completed, "lost": out.lost,
            "duplicated_tokens": out.duplicated, "recovery": rec, "errors": out.errors[:20],
            "setup": {"kills_per_component": args.kills, "interval_s": args.interval, "rate": args.rate,
                      "workers": args.workers, "restart_delay_s": args.restart_delay, "seed": args.seed,
                      "lease_ttl_s": 1.0, "redis_appendfsync": "always"}}


def _print(result: dict) -> None:
    from rich.table import Table

    t = Table(title="qlm bench chaos: SIGKILLs under load")
    for col in ("acknowledged", "completed", "lost", "duplicated tokens", "refused (retry hint)"):
        t.add_column(col, justify="right")
    t.add_row(str(result["acknowledged"]), str(result["completed"]), str(result["lost"]),
              str(result["duplicated_tokens"]), str(result["refused"]))
    console().print(t)
    t = Table(title="Recovery after SIGKILL (seconds)")
    for col in ("component", "kills", "samples", "p50", "p99", "max"):
        t.add_column(col, justify="right" if col != "component" else "left")
    for c, v in result["recovery"].items():
        t.add_row(c, str(v["kills"]), str(v["samples"]), f"{v['p50_s']:.2f}", f"{v['p99_s']:.2f}", f"{v['max_s']:.2f}")
    console().print(t)
    for e in result["errors"]:
        print("  error:", e, file=sys.stderr)
