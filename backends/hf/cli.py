"""`qlm` subcommands of the HF engine: build tiny models, profile an engine, benchmark it.

  qlm models build-tiny --kind mixtral --out models/tiny-mixtral [--seed 0] [--layers 8]
  qlm profile --model models/tiny-mixtral --kind mixtral --out configs/profiles/cpu-tiny-mixtral.yaml
  qlm bench-engine preemption|chunked|throughput|batching|warm|all [--json out.json]
  qlm bench-engine vllm   (HF engine vs vLLM; needs the vLLM virtualenv, `make vllm`)
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

BENCH_CHOICES = ("preemption", "chunked", "throughput", "batching", "warm", "all", "vllm", "prefix", "experts")


def _parse_overrides(items: list[str]) -> dict[str, Any]:
    """`key=value` pairs for the transformers config; values are parsed as YAML scalars."""
    import yaml

    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"--set expects key=value, got {item!r}")
        out[key] = yaml.safe_load(value)
    return out


def cmd_build_tiny(args: argparse.Namespace) -> int:
    from rich.console import Console

    from qlmserve.bench.hf_bench_common import BENCH_LAYERS, BENCH_SHAPE
    from qlmserve.tiny_models import ensure_tiny_model

    overrides = _parse_overrides(args.set or [])
    layers = args.layers
    if args.bench_shape:
        overrides = {**BENCH_SHAPE, **overrides}
        layers = layers or BENCH_LAYERS
    path = ensure_tiny_model(args.kind, args.out, seed=args.seed, num_layers=layers or 8, **overrides)
    Console().print(f"tiny {args.kind} model (seed {args.seed}) ready in [bold]{path}[/bold]")
    return 0


def cmd_profile(args: argparse.Namespace) -> int:
    import torch
    from rich.console import Console
    from rich.table import Table

    from qlmserve.operations.model_spec import ModelSpec

    from .engine import HFEngine
    from .profile import ProfileOptions, profile_engine

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(args.threads)
    spec = ModelSpec(path=str(args.model), kind=args.kind, max_context=args.max_context)
    engine = HFEngine({"model": spec}, device=args.device, max_batch_size=args.max_batch_size,
                      initial_model="model")
    name = args.name or os.path.splitext(os.path.basename(args.out))[0]
    result = profile_engine(engine, "model", name=name, opts=ProfileOptions(clock=args.clock))
    engine.close()
    result.setup["model_kind"] = args.kind
    result.setup["command"] = "qlm " + " ".join(sys.argv[1:]) if sys.argv[0].endswith("qlm") else None
    path = result.write(args.out)
    table = Table(title=f"WorkerProfile {name} ({result.setup['device']}, {result.setup['architecture']})")
    table.add_column("field")
    table.add_column("value", justify="right")
    for key, value in vars(result.profile).items():
        table.add_row(key, f"{value:.4g}" if isinstance(value, float) else str(value))
    console = Console()
    console.print(table)
    console.print(f"written to [bold]{path}[/bold]")
    return 0


def cmd_bench_engine(args: argparse.Namespace) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.which == "vllm":
        from qlmserve.bench.vllm_compare import CompareOptions
        from qlmserve.bench.vllm_compare import main as run_compare

        run_compare(CompareOptions(kind=args.kind, model_root=args.model_root, threads=args.threads, seed=args.seed,
                                   reps=args.reps), args.json)
        return 0
    if args.which == "prefix":
        from qlmserve.bench.prefix_engine import PrefixBenchOptions
        from qlmserve.bench.prefix_engine import main as run_prefix

        run_prefix(PrefixBenchOptions(kind=args.kind, model_root=args.model_root, device=args.device,
                                      threads=args.threads, rounds=args.rounds, offset=args.prefix_offset,
                                      requests=args.prefix_requests, rate=args.prefix_rate), args.json)
        return 0
    if args.which == "experts":
        from qlmserve.bench.expert_skew import ExpertBenchOptions
        from qlmserve.bench.expert_skew import main as run_experts

        run_experts(ExpertBenchOptions(kind=args.kind, model_root=args.model_root, device=args.device,
                                       threads=args.threads, rounds=args.rounds), args.json)
        return 0
    which = ["preemption", "chunked", "throughput", "batching", "warm"] if args.which == "all" else [args.which]
    if "preemption" in which:
        from qlmserve.bench.preemption import PreemptionOptions
        from qlmserve.bench.preemption import main as run_preemption

        opts = PreemptionOptions(kind=args.kind, model_root=args.model_root, device=args.device,
                                 threads=args.threads, seed=args.seed, window_s=args.window,
                                 rounds=args.rounds, load=args.load, max_pause_s=args.max_pause,
                                 workload=args.workload, be_backlog=args.be_backlog)
        out = args.json if len(which) == 1 else (args.json and args.json.replace(".json", "-preemption.json"))
        run_preemption(opts, out)
    if "chunked" in which:
        from qlmserve.bench.chunked import ChunkedOptions
        from qlmserve.bench.chunked import main as run_chunked

        budgets = [int(b) for b in args.budgets.split(",") if b.strip()]
        copts = ChunkedOptions(kind=args.kind, model_root=args.model_root, device=args.device, threads=args.threads,
                               budgets=budgets, rounds=args.rounds)
        out = args.json if len(which) == 1 else (args.json and args.json.replace(".json", "-chunked.json"))
        run_chunked(copts, out)
    rest = [w for w in which if w not in ("preemption", "chunked")]
    if rest:
        from qlmserve.bench.engine import EngineBenchOptions
        from qlmserve.bench.engine import main as run_engine

        opts = EngineBenchOptions(kind=args.kind, model_root=args.model_root, device=args.device,
                                  threads=args.threads, seed=args.seed, reps=args.reps)
        out = args.json if len(which) == len(rest) else (args.json and args.json.replace(".json", "-engine.json"))
        run_engine(rest, opts, out)
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    from qlmserve.tiny_models import TINY_KINDS

    p = sub.add_parser("models", help="local model folders (tiny models with seeded weights)")
    msub = p.add_subparsers(dest="models_command", metavar="ACTION")
    b = msub.add_parser("build-tiny", help="build a tiny model + tokenizer with seeded random weights")
    b.add_argument("--kind", choices=TINY_KINDS, required=True)
    b.add_argument("--out", required=True, help="folder to write (kept when it already holds this build)")
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--layers", type=int, default=None, help="decoder layers (default 8)")
    b.add_argument("--bench-shape", action="store_true",
                   help="the wider benchmark shape (hidden 256, experts 1024) instead of the test shape")
    b.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override a transformers config field, e.g. --set hidden_size=128")
    b.set_defaults(func=cmd_build_tiny)

    p = sub.add_parser("profile", help="measure an HF engine and write the WorkerProfile YAML the simulator reads")
    p.add_argument("--model", required=True, help="model folder (from_pretrained)")
    p.add_argument("--kind", choices=TINY_KINDS, default="mixtral")
    p.add_argument("--out", required=True, help="YAML to write, e.g. configs/profiles/cpu-tiny-mixtral.yaml")
    p.add_argument("--name", default=None, help="profile name (default: the file name)")
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    p.add_argument("--max-batch-size", type=int, default=16)
    p.add_argument("--max-context", type=int, default=512)
    p.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                   help="pass times: wall clock, or the engine thread's CPU time (CPU, --threads 1; "
                        "for a machine shared with other jobs)")
    p.set_defaults(func=cmd_profile)

    p = sub.add_parser("bench-engine", help="benchmarks of the HF engine (preemption, chunked prefill, throughput, "
                                            "batching, warm) and of the HF engine against vLLM (vllm)")
    p.add_argument("which", choices=BENCH_CHOICES)
    p.add_argument("--json", default=None, help="write the full report as JSON here")
    p.add_argument("--kind", choices=TINY_KINDS, default="mixtral")
    p.add_argument("--model-root", default=None, help="where benchmark models are built (default ~/.cache/qlmserve)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--window", type=float, default=10.0, help="preemption: seconds of arrivals per round and mode")
    p.add_argument("--rounds", type=int, default=3, help="preemption, chunked: rounds (modes / budgets interleaved)")
    p.add_argument("--budgets", default="1024,512,256,128",
                   help="chunked: prefill budgets (tokens per iteration) compared with no chunking")
    p.add_argument("--workload", choices=("backlog", "open"), default="backlog",
                   help="preemption: BE backlog kept queued + Poisson LS, or everything open-loop Poisson")
    p.add_argument("--be-backlog", type=int, default=8, help="preemption/backlog: BE requests waiting beyond the batch")
    p.add_argument("--load", type=float, default=1.3, help="preemption/open: arrival rate / calibrated capacity")
    p.add_argument("--max-pause", type=float, default=2.0, help="preemption: max_pause_s of EXPERT mode")
    p.add_argument("--prefix-offset", type=int, default=2000, help="prefix: first Mooncake trace row of the slice")
    p.add_argument("--prefix-requests", type=int, default=60, help="prefix: requests in the slice")
    p.add_argument("--prefix-rate", type=float, default=2.0, help="prefix: arrival rate, requests per second")
    p.add_argument("--reps", type=int, default=3, help="throughput: lockstep engine / generate() runs; vllm: decode runs")
    p.set_defaults(func=cmd_bench_engine)
