"""`qlm bench relay`: tokens per second one controller relays from workers to streaming
clients (issue 13).

On loopback, in a temporary folder: a private redis-server, one controller (`qlm serve`),
`--workers` simulated-engine workers with a fast cost model (they produce tokens as fast as
the machine lets them), and `--clients` clients that each loop over Generate (submit and
stream every token through the controller) for `--duration` seconds. It prints the tokens
the clients received per second, requests completed, and the CPU seconds the controller,
Redis and the workers spent. Everything shares this machine's cores: the figure is what
one controller relays here, with its workers and clients beside it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
from pathlib import Path

from qlmserve.ui import console

POLICY = """
tick_interval_ms: 100
heartbeat_timeout_s: 10
max_running_per_worker: {batch}
default_slo_class: batch
slo_classes:
  interactive: {{ttft_s: 5.0, priority: 10, latency_sensitive: true}}
  batch: {{ttft_s: 600.0, priority: 1}}
models:
  sim-a: {{max_context: 4096, weight_bytes: 1000000, output_prior: {{mean: {tokens}, std: 1}}}}
planner: {{policy: edf}}
access: {{anonymous_clients: true, default_quota: {{}}}}
"""

# A worker iteration of ~2 ms: the engine is not what limits the relay.
PROFILE = """
name: relay
prefill_base_s: 0.001
prefill_per_token_s: 0.000001
decode_base_s: 0.002
decode_per_seq_s: 0.00001
load_fixed_s: 0.01
"""


def register_bench(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("relay", help="tokens/s one controller relays from sim workers to streaming clients")
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--clients", type=int, default=32, help="concurrent streaming clients")
    p.add_argument("--max-tokens", type=int, default=256, help="tokens per request")
    p.add_argument("--batch", type=int, default=16, help="requests a worker runs at once")
    p.add_argument("--duration", type=float, default=30.0, help="seconds measured (after a 5 s warm-up)")
    p.add_argument("--json", dest="json_out", help="also write the results here")
    p.set_defaults(func=cmd_relay)


def cmd_relay(args) -> int:
    return asyncio.run(_main(args))


async def _main(args) -> int:
    import redis

    from qlmserve.bench.local_stack import LocalStack, cpu_s
    from qlmserve.client import QlmClient, submit_request

    base = Path(tempfile.mkdtemp(prefix="qlm-relay-"))
    (base / "policy.yaml").write_text(POLICY.format(batch=args.batch, tokens=args.max_tokens))
    (base / "profile.yaml").write_text(PROFILE)
    stack = LocalStack(base, args.workers, args.batch).start()
    r = redis.Redis.from_url(stack.redis.url, decode_responses=True)
    received = [0]
    done = [0]
    measuring = [False]
    try:
        await stack.wait_workers(r)
        stop_at = time.monotonic() + 5.0 + args.duration
        async with QlmClient(stack.address) as client:

            async def one_client(k: int) -> None:
                i = 0
                while time.monotonic() < stop_at:
                    req = submit_request("sim-a", prompt_token_ids=[3 + (k + i) % 400] * 16,
                                         max_tokens=args.max_tokens, slo_class="batch")
                    i += 1
                    async for chunk in client.generate(req):
                        if measuring[0]:
                            received[0] += len(chunk.token_ids)
                        if chunk.finished:
                            if measuring[0]:
                                done[0] += 1
                            break

            tasks = [asyncio.create_task(one_client(k)) for k in range(args.clients)]
            await asyncio.sleep(5.0)  # warm-up: batches fill
            pids = {"controller": [stack.controller.pid], "redis": [stack.redis.proc.pid],
                    "workers": [w.pid for w in stack.workers]}
            cpu0 = {k: sum(cpu_s(p) for p in v) for k, v in pids.items()}
            mine0 = time.process_time()
            measuring[0] = True
            t0 = time.monotonic()
            await asyncio.sleep(args.duration)
            measuring[0] = False
            dt = time.monotonic() - t0
            cpu = {k: sum(cpu_s(p) for p in v) - cpu0[k] for k, v in pids.items()}
            cpu["clients"] = time.process_time() - mine0
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
    finally:
        stack.stop()
    result = {"tokens_per_s": received[0] / dt, "requests_per_s": done[0] / dt, "seconds": dt,
              "cpu_s": cpu, "setup": {"workers": args.workers, "clients": args.clients,
                                      "max_tokens": args.max_tokens, "batch": args.batch}}
    console().print(f"relayed {result['tokens_per_s']:.0f} tokens/s to {args.clients} streaming clients from "
                    f"{args.workers} sim workers ({result['requests_per_s']:.1f} requests/s of {args.max_tokens} "
                    f"tokens) over {dt:.0f} s; CPU seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in cpu.items()))
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(result, indent=2))
    return 0
