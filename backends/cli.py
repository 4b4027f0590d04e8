"""`qlm worker`: a worker process that dials a controller and runs one engine."""

from __future__ import annotations

import argparse
import logging
import sys

from qlmserve.credentials import add_credential_args, resolve_token, tls_from_args

# The controller's default address (controller/cli.py serves on it by default).
DEFAULT_ADDRESS = "127.0.0.1:50051"


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("worker", help="run a worker that dials a controller")
    p.add_argument("--controller", default=DEFAULT_ADDRESS,
                   help="controller address; several, comma-separated, and the worker finds the leader")
    add_credential_args(p)
    p.add_argument("--id", default="", help="worker id (default: host-pid)")
    p.add_argument("--engine", default="hf", choices=["hf", "sim", "vllm"],
                   help="vllm: run from the vLLM virtualenv (make vllm; .venv-vllm/bin/qlm)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--max-batch", type=int, default=16)
    p.add_argument("--kv-capacity", type=int, help="KV cache capacity in tokens")
    p.add_argument("--preload", help="model to load before taking work")
    p.add_argument("--preemption", default="none", choices=["none", "iteration", "expert"])
    p.add_argument("--max-pause", type=float, default=2.0)
    p.add_argument("--sim-profile", help="WorkerProfile YAML for --engine sim")
    p.add_argument("--sim-fleet", help="for --engine sim: a fleet file; the worker is its --sim-worker (models, "
                                       "profiles, KV, host memory as the simulator gives them)")
    p.add_argument("--sim-worker", help="the worker id in --sim-fleet (default: --id)")
    p.add_argument("--time-scale", type=float, default=1.0,
                   help="with --sim-fleet: run this many times slower than the profiles (one machine for a fleet)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="CPU threads of the HF or vLLM engine (default 1)")
    p.add_argument("--prefix-cache", action="store_true",
                   help="keep full KV blocks findable by their token chain (--engine hf; --engine sim models "
                        "it): a prompt that starts with cached blocks skips their prefill (reported to the planner)")
    p.set_defaults(func=cmd_worker)


def cmd_worker(args) -> int:
    import importlib.util

    from qlmserve.backends.factory import SimFleetWorker
    from qlmserve.backends.worker import WorkerOptions, run_worker

    if args.engine == "vllm" and importlib.util.find_spec("vllm") is None:
        print(f"error: field 'engine': vllm is not installed for {sys.executable}; vLLM has a virtualenv of its "
              "own: run `make vllm`, then start the worker with .venv-vllm/bin/qlm", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return run_worker(WorkerOptions(controller=args.controller, worker_id=args.id, engine=args.engine,
                                    device=args.device, max_batch_size=args.max_batch,
                                    kv_capacity_tokens=args.kv_capacity, preload=args.preload,
                                    preemption=args.preemption, max_pause_s=args.max_pause,
                                    sim_profile=args.sim_profile, seed=args.seed, threads=args.threads,
                                    prefix_cache=args.prefix_cache,
                                    sim_fleet=SimFleetWorker(args.sim_fleet, args.sim_worker or args.id,
                                                             args.time_scale) if args.sim_fleet else None,
                                    token_loader=lambda: resolve_token(args.token_file, args.data_dir, "worker"),
                                    tls=tls_from_args(args)))
