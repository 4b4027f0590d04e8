"""Benchmark: QLM's HF engine against vLLM (CPU) on the same tiny MoE model and batch.

`qlm bench-engine vllm` runs the HF half in this process and the vLLM half in a process
of the vLLM virtualenv (`python -m qlmserve.bench.vllm_compare HALF.json`), one after the
other so that they never share the cores; both halves run this module's code on the
Engine interface, the same requests in the same order.

- decode: `batch` prompts of `prompt_len` tokens, greedy, up to `max_tokens` each, added
  at once; decode = after every sequence has its first token. Tokens per wall second and
  per CPU second of every process of the engine (the HF engine runs in this process with
  one torch thread; vLLM's runs in three: this client, its engine core, its CPU worker
  with one OpenMP thread). Median of `reps` runs. The outputs of the two are compared.
- ls_ttft: `batch + be_backlog` best-effort requests at t=0 (a full batch and a backlog
  behind it), then `ls_requests` latency-sensitive ones every `ls_gap_s`; time to first
  token of each, measured at the engine's step() (as the worker sees it). HF engine
  under FCFS, iteration-level and expert-level preemption; vLLM under FCFS (every
  priority equal) and iteration-level preemption (QLM's batch rule plus vLLM's priority
  scheduler). Best-effort tokens per wall second over the whole run (same work in every
  mode), per wall second and per CPU second of the engine's processes (the latter
  varies less on a machine shared with other jobs).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from qlmserve.backends.engine import Engine, EngineRequest, PreemptionMode

from .engine_loop import EngineLoop, TokenLog, percentile, prompt_ids, submit

MODEL = "bench"
MAX_CONTEXT = 512
MODES = {"hf": ("none", "iteration", "expert"), "vllm": ("none", "iteration")}


@dataclass
class CompareOptions:
    kind: str = "mixtral"
    model_root: str | None = None
    threads: int = 1
    seed: int = 0
    batch: int = 16
    prompt_len: int = 64
    max_tokens: int = 64
    reps: int = 3
    be_backlog: int = 8
    be_max_tokens: int = 128
    ls_requests: int = 8
    ls_gap_s: float = 0.5
    ls_prompt_len: int = 32
    ls_max_tokens: int = 8
    timeout_s: float = 600.0


def _cpu_seconds() -> float:
    """CPU time of this process and its children alive now (vLLM's engine processes)."""
    try:
        import psutil
    except ImportError:  # the main virtualenv: the HF engine runs in this process alone
        return time.process_time()
    me = psutil.Process()
    total = 0.0
    for p in [me, *me.children(recursive=True)]:
        try:
            t = p.cpu_times()
            total += t.user + t.system
        except psutil.NoSuchProcess:
            pass
    return total


def make_engine(which: str, path: str, opts: CompareOptions) -> Engine:
    from qlmserve.operations.model_spec import ModelSpec

    spec = {MODEL: ModelSpec(path=path, kind=opts.kind, max_context=MAX_CONTEXT)}
    if which == "hf":
        import torch

        from qlmserve.backends.hf.engine import HFEngine

        torch.set_num_threads(opts.threads)
        return HFEngine(spec, device="cpu", max_batch_size=opts.batch, initial_model=MODEL)
    from qlmserve.backends.vllm.engine import VLLMEngine
    from qlmserve.backends.vllm.options import VLLMOptions

    return VLLMEngine(spec, max_batch_size=opts.batch, options=VLLMOptions(threads=opts.threads, seed=opts.seed),
                      initial_model=MODEL)


def decode_run(engine: Engine, opts: CompareOptions, tag: str) -> dict:
    prompts = [prompt_ids(opts.prompt_len, i) for i in range(opts.batch)]
    for i, p in enumerate(prompts):
        engine.add_request(EngineRequest(f"{tag}-{i}", MODEL, p, max_tokens=opts.max_tokens))
    outputs: dict[str, list[int]] = {}
    decode_at: tuple[float, float] | None = None  # (wall, cpu) once every sequence has a token
    decode_tokens = 0
    while engine.has_work():
        events = engine.step()
        for e in events:
            outputs.setdefault(e.request_id, []).append(e.token_id)
        if decode_at is None:
            if len(outputs) == len(prompts):
                decode_at = (time.perf_counter(), _cpu_seconds())
        else:
            decode_tokens += len(events)
    assert decode_at is not None
    wall, cpu = time.perf_counter() - decode_at[0], _cpu_seconds() - decode_at[1]
    return {"decode_tokens": decode_tokens, "decode_tok_per_s": decode_tokens / wall,
            "decode_tok_per_cpu_s": decode_tokens / cpu,
            "outputs": [outputs[f"{tag}-{i}"] for i in range(len(prompts))]}


def backlog_run(engine: Engine, mode: str, opts: CompareOptions, tag: str) -> dict:
    engine.set_preemption(PreemptionMode(mode), 2.0)
    log = TokenLog()
    loop = EngineLoop(engine, log)
    loop.start()
    be = [EngineRequest(f"{tag}-be{i}", MODEL, prompt_ids(opts.prompt_len, 100 + i), max_tokens=opts.be_max_tokens)
          for i in range(opts.batch + opts.be_backlog)]
    t0, cpu0 = time.perf_counter(), _cpu_seconds()
    for r in be:
        submit(engine, log, r)
    ls = []
    time.sleep(1.0)  # the batch runs, the backlog waits
    for i in range(opts.ls_requests):
        r = EngineRequest(f"{tag}-ls{i}", MODEL, prompt_ids(opts.ls_prompt_len, 500 + i),
                          max_tokens=opts.ls_max_tokens, latency_sensitive=True, priority=10)
        submit(engine, log, r)
        ls.append(r.request_id)
        time.sleep(opts.ls_gap_s)
    deadline = time.monotonic() + opts.timeout_s
    while len(log.finished) < len(be) + len(ls):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{mode}: {len(log.finished)} of {len(be) + len(ls)} requests finished")
        time.sleep(0.01)
    cpu = _cpu_seconds() - cpu0
    loop.stop()
    seconds = max(log.finished.values()) - t0
    ls_ttft = [log.ttft(r) for r in ls]
    be_tokens = sum(len(log.token_times.get(r.request_id, [])) for r in be)
    return {"mode": mode, "ls_ttft_p50_s": percentile(ls_ttft, 50), "ls_ttft_max_s": max(ls_ttft),
            "be_ttft_p50_s": percentile([log.ttft(r.request_id) for r in be], 50),
            "be_tok_per_s": be_tokens / seconds, "be_tok_per_cpu_s": be_tokens / cpu, "seconds": seconds}


def run_half(which: str, path: str, opts: CompareOptions) -> dict:
    """Everything one engine does in this benchmark (runs in that engine's virtualenv)."""
    t0 = time.perf_counter()
    engine = make_engine(which, path, opts)
    start_s = time.perf_counter() - t0
    try:
        decode_run(engine, CompareOptions(**{**asdict(opts), "max_tokens": 4}), "warm")  # first-pass costs
        reps = [decode_run(engine, opts, f"rep{k}") for k in range(opts.reps)]
        backlog = [backlog_run(engine, mode, opts, f"bl-{mode}") for mode in MODES[which]]
    finally:
        engine.close()
    return {"engine": which, "start_s": start_s,
            "decode_tok_per_s": statistics.median(r["decode_tok_per_s"] for r in reps),
            "decode_tok_per_cpu_s": statistics.median(r["decode_tok_per_cpu_s"] for r in reps),
            "decode_reps": [{k: v for k, v in r.items() if k != "outputs"} for r in reps],
            "outputs": reps[-1]["outputs"], "backlog": backlog}


def run(opts: CompareOptions, vllm_python: Path, log_path: Path) -> dict:
    from qlmserve.bench.hf_bench_common import ensure_bench_model

    path = str(ensure_bench_model(opts.kind, opts.model_root, seed=opts.seed))
    hf = run_half("hf", path, opts)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    half = log_path.with_suffix(".half.json")
    half.write_text(json.dumps({"path": path, "options": asdict(opts)}))
    with open(log_path, "wb") as log:
        code = subprocess.call([str(vllm_python), "-m", "qlmserve.bench.vllm_compare", str(half)], stdout=log,
                               stderr=subprocess.STDOUT, env=dict(os.environ, PYTHONUNBUFFERED="1"))
    if code != 0:
        raise RuntimeError(f"the vLLM half failed ({code}); its log: {log_path}")
    vllm = json.loads(half.with_suffix(".out.json").read_text())
    same = sum(a == b for a, b in zip(hf.pop("outputs"), vllm.pop("outputs"), strict=True))
    return {"benchmark": "hf-vs-vllm", "setup": {**asdict(opts), "model": path, "cpu_count": os.cpu_count(),
                                                 "load_average_1m_at_end": round(os.getloadavg()[0], 2)},
            "hf": hf, "vllm": vllm, "same_outputs": same}


def print_report(report: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    s = report["setup"]
    console = Console(width=max(Console().width, 120))
    t = Table(title=f"Decode, batch {s['batch']}, prompt {s['prompt_len']}, up to {s['max_tokens']} tokens each, "
                    f"median of {s['reps']} runs ({s['threads']} thread per engine)")
    for c in ("engine", "decode tok/s", "decode tok/CPU-s (all its processes)", "engine start"):
        t.add_column(c, justify="right")
    for who, name in (("hf", "QLM HF engine"), ("vllm", "vLLM (AsyncLLM, CPU)")):
        r = report[who]
        t.add_row(name, f"{r['decode_tok_per_s']:.0f}", f"{r['decode_tok_per_cpu_s']:.0f}", f"{r['start_s']:.1f} s")
    console.print(t)
    console.print(f"vLLM / HF decode tok/s: {report['vllm']['decode_tok_per_s'] / report['hf']['decode_tok_per_s']:.2f}x "
                  f"(per CPU-s {report['vllm']['decode_tok_per_cpu_s'] / report['hf']['decode_tok_per_cpu_s']:.2f}x); "
                  f"greedy outputs equal for {report['same_outputs']}/{s['batch']} sequences")
    t = Table(title=f"LS TTFT behind a best-effort backlog: {s['batch']} + {s['be_backlog']} BE requests "
                    f"({s['be_max_tokens']} tokens), {s['ls_requests']} LS every {s['ls_gap_s']} s")
    for c in ("engine", "mode", "LS TTFT p50", "LS TTFT max", "BE TTFT p50", "BE tok/s", "BE tok/CPU-s", "run"):
        t.add_column(c, justify="right")
    for who in ("hf", "vllm"):
        for b in report[who]["backlog"]:
            t.add_row(who, b["mode"], f"{b['ls_ttft_p50_s'] * 1000:.0f} ms", f"{b['ls_ttft_max_s'] * 1000:.0f} ms",
                      f"{b['be_ttft_p50_s']:.2f} s", f"{b['be_tok_per_s']:.0f}", f"{b['be_tok_per_cpu_s']:.0f}",
                      f"{b['seconds']:.1f} s")
    console.print(t)
    console.print(f"[dim]model {s['model']}; load average at the end {s['load_average_1m_at_end']}[/dim]")


def main(opts: CompareOptions, out: str | None) -> dict:
    from qlmserve.vllm_venv import vllm_python

    python = vllm_python()
    if python is None:
        raise SystemExit("qlm bench-engine vllm needs the vLLM virtualenv: run `make vllm`")
    log_path = Path(out).with_suffix(".vllm.log") if out else Path("out/bench/hf-vs-vllm.vllm.log")
    report = run(opts, python, log_path)
    print_report(report)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":  # the vLLM half; vLLM spawns processes, which must not run it again
    spec_path = Path(sys.argv[1])
    spec = json.loads(spec_path.read_text())
    result = run_half("vllm", spec["path"], CompareOptions(**spec["options"]))
    spec_path.with_suffix(".out.json").write_text(json.dumps(result))
