"""`qlm serve | submit | status | cancel | queue | workers | plan | policy | drain`.

Tables for people, `--json` for scripts."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import signal
import sys
import time

from google.protobuf.json_format import MessageToDict

from qlmserve.controller.leader import LEASE_TTL_S
from qlmserve.credentials import add_credential_args, resolve_token, tls_from_args
from qlmserve.ui import console

DEFAULT_ADDRESS = "127.0.0.1:50051"


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="run the controller (and optionally local CPU workers)")
    p.add_argument("--policy", help="policy YAML (default: the embedded default policy)")
    p.add_argument("--redis", help="Redis URL (default: start a private redis-server in the data folder)")
    p.add_argument("--data-dir", default="var/qlm", help="private Redis data and tiny models (default: var/qlm)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=50051)
    p.add_argument("--metrics-port", type=int, help="serve Prometheus metrics on this port")
    p.add_argument("--http-port", type=int,
                   help="serve the OpenAI-compatible HTTP API on this port (0: a free one; default: 8000 or the "
                        "next free port with the private Redis, off with --redis)")
    p.add_argument("--no-http", action="store_true", help="do not serve the HTTP API")
    p.add_argument("--prefix", default="qlm", help="Redis key prefix (one deployment per prefix)")
    p.add_argument("--local-workers", type=int, default=0, help="start N worker processes beside the controller")
    p.add_argument("--worker-engine", default="hf", choices=["hf", "sim"])
    p.add_argument("--worker-log-dir", help="keep local workers' logs here")
    p.add_argument("--tokens", help="known tokens, one 'ROLE NAME TOKEN' per line (roles: client, admin, worker); "
                                    "the data folder's admin and worker tokens are always known too")
    p.add_argument("--tls-cert", help="PEM certificate of this controller (TLS on)")
    p.add_argument("--tls-key", help="PEM key of --tls-cert")
    p.add_argument("--tls-client-ca", help="require client certificates signed by this CA (mutual TLS; a "
                                           "certificate named 'worker:<id>' identifies a worker)")
    p.add_argument("--insecure", action="store_true",
                   help="listen beyond loopback without TLS, or with anonymous clients allowed")
    p.add_argument("--policy-dir", help="the only folder ReloadPolicy may read (default: the policy file's)")
    p.add_argument("--worker-redis", help="Redis URL for workers, where the controller may not create ACL users")
    p.add_argument("--lease-ttl", type=float, default=LEASE_TTL_S,
                   help=f"leader lease seconds: a standby controller takes over within about this (default {LEASE_TTL_S})")
    p.add_argument("--id", dest="controller_id", help="this controller's name in the leader lease (default: random)")
    p.add_argument("--redis-fsync", default="everysec", choices=["everysec", "always"],
                   help="private redis-server: appendfsync")
    p.set_defaults(func=cmd_serve)


    p = sub.add_parser("submit", help="submit a request and stream its tokens")
    _addr(p)
    p.add_argument("--model", required=True)
    p.add_argument("--class", dest="slo_class", default="")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--prompt")
    g.add_argument("--prompt-ids", help="comma-separated token ids")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int)
    p.add_argument("--user", default="")
    p.add_argument("--idempotency-key", default="")
    p.add_argument("--no-wait", action="store_true", help="print the request id and return")
    p.set_defaults(func=cmd_submit)

    p = sub.add_parser("stream", help="resume the token stream of a request")
    _addr(p)
    p.add_argument("request_id")
    p.add_argument("--offset", type=int, default=0)
    p.set_defaults(func=cmd_stream)

    for name, fn, help_ in (("status", cmd_status, "the state of a request"), ("cancel", cmd_cancel, "cancel a request")):
        p = sub.add_parser(name, help=help_)
        _addr(p)
        p.add_argument("request_id")
        p.set_defaults(func=fn)

    for name, fn, help_ in (("queue", cmd_queue, "groups, virtual queues, per-class counts, predicted waits"),
                            ("workers", cmd_workers, "workers and their state"),
                            ("plan", cmd_plan, "the plan of the last tick")):
        p = sub.add_parser(name, help=help_)
        _addr(p)
        p.set_defaults(func=fn)

    p = sub.add_parser("policy", help="check or reload a policy file")
    psub = p.add_subparsers(dest="policy_cmd", metavar="ACTION")
    c = psub.add_parser("check", help="validate a policy file")
    c.add_argument("file")
    c.add_argument("--json", action="store_true")
    c.set_defaults(func=cmd_policy_check)
    r = psub.add_parser("reload", help="make the controller load a policy file")
    _addr(r)
    r.add_argument("file", nargs="?", default="")
    r.set_defaults(func=cmd_policy_reload)

    p = sub.add_parser("drain", help="stop giving a worker new work")
    _addr(p)
    p.add_argument("worker_id")
    p.add_argument("--requeue", action="store_true", help="hand its running requests back at once")
    p.add_argument("--resume", action="store_true", help="undo a drain: give the worker work again")
    p.set_defaults(func=cmd_drain)


def _addr(p: argparse.ArgumentParser) -> None:
    p.add_argument("--controller", default=DEFAULT_ADDRESS,
                   help=f"controller address (default {DEFAULT_ADDRESS}); several, comma-separated")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    add_credential_args(p)


def _client(args):
    """A QlmClient with the caller's token (admin's by default: the CLI is the operator's)."""
    from qlmserve.client import QlmClient

    token = resolve_token(args.token_file, args.data_dir, "admin")
    return QlmClient(args.controller, token=token, tls=tls_from_args(args))


def _logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def _run(coro) -> int:
    import grpc

    try:
        return asyncio.run(coro) or 0
    except grpc.aio.AioRpcError as exc:
        print(f"error: {exc.code().name}: {exc.details()}", file=sys.stderr)
        return 1


# ---- serve / worker ------------------------------------------------------------------

def cmd_serve(args) -> int:
    from qlmserve.controller.runtime import ControllerRuntime, RuntimeOptions

    _logging()
    from qlmserve.controller.service.server import ServerTls
    from qlmserve.credentials import tokens_dir

    if bool(args.tls_cert) != bool(args.tls_key):
        print("error: --tls-cert and --tls-key go together", file=sys.stderr)
        return 2
    tls = ServerTls(args.tls_cert, args.tls_key, args.tls_client_ca) if args.tls_cert else None
    opts = RuntimeOptions(policy_path=args.policy, redis_url=args.redis, data_dir=args.data_dir, host=args.host,
                          port=args.port, metrics_port=args.metrics_port, prefix=args.prefix,
                          local_workers=args.local_workers, worker_engine=args.worker_engine,
                          worker_log_dir=args.worker_log_dir, tokens_file=args.tokens, tls=tls,
                          insecure=args.insecure, policy_dir=args.policy_dir, worker_redis_url=args.worker_redis,
                          lease_ttl_s=args.lease_ttl, redis_fsync=args.redis_fsync,
                          controller_id=args.controller_id, http_port=args.http_port, no_http=args.no_http)

    async def main() -> None:
        rt = await ControllerRuntime(opts).start()
        role = "leader" if rt.controller.is_leader else "standby"
        print(f"qlm controller listening on {rt.address} ({role}); admin and worker tokens in "
              f"{tokens_dir(args.data_dir)}", flush=True)
        if rt.http is not None:
            print(f"OpenAI-compatible HTTP API on {rt.http.url}/v1", flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        await rt.stop()

    from qlmserve.controller.policy import PolicyError
    from qlmserve.controller.process_guard import FolderBusy
    from qlmserve.controller.runtime import UnsafeBind

    try:
        asyncio.run(main())
    except (PolicyError, UnsafeBind, FolderBusy) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


# ---- client commands -----------------------------------------------------------------

def cmd_submit(args) -> int:
    from qlmserve.client import GenerateResult, _take, submit_request

    ids = [int(x) for x in args.prompt_ids.split(",")] if args.prompt_ids else None
    req = submit_request(args.model, prompt=args.prompt, prompt_token_ids=ids, slo_class=args.slo_class,
                         max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                         seed=args.seed, user_id=args.user, idempotency_key=args.idempotency_key)

    async def main() -> int:
        async with _client(args) as c:
            if args.no_wait:
                r = await c.submit(req)
                print(json.dumps(MessageToDict(r, preserving_proto_field_name=True)) if args.json else r.request_id)
                return 0
            t0 = time.perf_counter()
            res = None
            async for chunk in c.generate(req):
                if res is None:
                    res = GenerateResult(chunk.request_id)
                if res.first_token_s is None and chunk.token_ids:
                    res.first_token_s = time.perf_counter() - t0
                _take(res, chunk)
                if not args.json:
                    print(chunk.text, end="", flush=True)
            if args.json:
                print(json.dumps({"request_id": res.request_id, "token_ids": res.token_ids, "text": res.text,
                                  "finish_reason": res.finish_reason, "ttft_s": res.first_token_s}))
            else:
                print(f"\n[{res.request_id}] {len(res.token_ids)} tokens, finish={res.finish_reason}, "
                      f"ttft={res.first_token_s:.3f}s", file=sys.stderr)
            return 0

    return _run(main())


def cmd_stream(args) -> int:
    async def main() -> int:
        async with _client(args) as c:
            res = await c.collect(args.request_id, args.offset)
            if args.json:
                print(json.dumps({"request_id": res.request_id, "token_ids": res.token_ids, "text": res.text,
                                  "finish_reason": res.finish_reason}))
            else:
                print(res.text)
        return 0

    return _run(main())


def _print_message(msg, as_json: bool) -> None:
    print(json.dumps(MessageToDict(msg, preserving_proto_field_name=True, always_print_fields_with_no_presence=True),
                     indent=None if as_json else 2))


def cmd_status(args) -> int:
    async def main() -> int:
        async with _client(args) as c:
            _print_message(await c.status(args.request_id), args.json)
        return 0

    return _run(main())


def cmd_cancel(args) -> int:
    async def main() -> int:
        async with _client(args) as c:
            _print_message(await c.cancel(args.request_id), args.json)
        return 0

    return _run(main())


def cmd_queue(args) -> int:
    from rich.table import Table

    async def main() -> int:
        async with _client(args) as c:
            q = await c.queue()
        if args.json:
            _print_message(q, True)
            return 0
        con = console()
        t = Table(title="SLO classes")
        for col in ("class", "TTFT SLO s", "waiting", "running", "finished", "met SLO", "attainment"):
            t.add_column(col, justify="right" if col != "class" else "left")
        for k in q.classes:
            att = f"{100 * k.met_slo / k.finished:.1f}%" if k.finished else "-"
            t.add_row(k.slo_class, f"{k.ttft_slo_s:g}", str(k.waiting), str(k.running), str(k.finished),
                      str(k.met_slo), att)
        con.print(t)
        t = Table(title="Groups (waiting requests)")
        for col in ("group", "model", "class", "waiting", "worker", "pos", "oldest wait s", "deadline in s",
                    "pred. wait s", "pred. attain."):
            t.add_column(col)
        for g in q.groups:
            t.add_row(g.group_id, g.model, g.slo_class, str(g.waiting), g.worker_id or "-", str(g.position),
                      f"{g.oldest_wait_s:.2f}", f"{g.deadline_in_s:.2f}", f"{g.predicted_wait_s:.2f}",
                      f"{g.predicted_attainment:.2f}")
        con.print(t)
        t = Table(title="Virtual queues")
        t.add_column("worker")
        t.add_column("groups, head first")
        for v in q.virtual_queues:
            t.add_row(v.worker_id, " ".join(v.group_ids) or "-")
        con.print(t)
        return 0

    return _run(main())


def cmd_workers(args) -> int:
    from rich.table import Table

    async def main() -> int:
        async with _client(args) as c:
            ws = await c.workers()
        if args.json:
            _print_message(ws, True)
            return 0
        t = Table(title="Workers")
        for col in ("worker", "engine", "device", "healthy", "model", "warm", "running", "swapped", "KV used",
                    "prefill tok/s", "decode tok/s", "preemption", "seen s ago"):
            t.add_column(col)
        for w in ws.workers:
            t.add_row(w.worker_id, w.engine, w.device, "yes" if w.healthy else "NO" + (" (draining)" if w.draining else ""),
                      w.active_model or "-", ",".join(w.warm_models) or "-", str(len(w.running)), str(len(w.swapped)),
                      f"{w.kv_used_tokens}/{w.kv_capacity_tokens}", f"{w.prefill_tokens_per_s:.0f}",
                      f"{w.decode_tokens_per_s:.1f}", w.preemption or "-", f"{w.last_seen_s_ago:.1f}")
        console().print(t)
        return 0

    return _run(main())


def cmd_plan(args) -> int:
    from rich.table import Table

    async def main() -> int:
        async with _client(args) as c:
            p = await c.plan()
        if args.json:
            _print_message(p, True)
            return 0
        con = console()
        con.print(f"tick {p.tick}: source={p.source} solve={1000 * p.solve_time_s:.1f} ms {p.note}")
        t = Table(title="Virtual queues")
        t.add_column("worker")
        t.add_column("groups, head first")
        for v in p.virtual_queues:
            t.add_row(v.worker_id, " ".join(v.group_ids) or "-")
        con.print(t)
        t = Table(title="Operations")
        for col in ("kind", "worker", "requests", "model", "group", "reason"):
            t.add_column(col)
        for op in p.operations:
            t.add_row(op.kind, op.worker_id, ",".join(op.request_ids) or "-", op.model or "-", op.group_id or "-",
                      op.reason)
        con.print(t)
        return 0

    return _run(main())


def cmd_policy_check(args) -> int:
    from qlmserve.controller.policies import create_policy
    from qlmserve.controller.policy import PolicyError, load_policy

    try:
        cfg = load_policy(args.file)
        create_policy(cfg.planner.policy, cfg)
    except PolicyError as exc:
        print(f"invalid: {exc}", file=sys.stderr)
        return 1
    except ValueError as exc:
        print(f"invalid: {args.file}: field 'planner.policy': {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(cfg.model_dump_json())
    else:
        print(f"ok: {args.file}: policy {cfg.planner.policy}, classes {sorted(cfg.slo_classes)}, "
              f"models {sorted(cfg.models)}")
    return 0


def cmd_policy_reload(args) -> int:
    from pathlib import Path

    async def main() -> int:
        async with _client(args) as c:
            # The policy goes as text: the controller reads no file the operator names.
            text = Path(args.file).read_text() if args.file else ""
            r = await c.reload_policy(text=text)
            print(f"reloaded: policy {r.policy_name}, classes {list(r.slo_classes)}, models {list(r.models)}")
        return 0

    return _run(main())


def cmd_drain(args) -> int:
    async def main() -> int:
        async with _client(args) as c:
            r = await c.drain(args.worker_id, args.requeue, resume=args.resume)
            if args.resume:
                print(f"{args.worker_id} takes work again")
            else:
                print(f"draining {args.worker_id}; {r.requeued} running requests handed back")
        return 0

    return _run(main())
