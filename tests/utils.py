"""Shared helpers of the tests: policies, controllers, workers, requests."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from qlmserve.controller.policy import PolicyConfig, parse_policy
from qlmserve.controller.redis_server import free_port
from qlmserve.credentials import resolve_token

REPO = Path(__file__).resolve().parent.parent

# A fast simulated fleet: decode steps of a few milliseconds, short outputs.
SIM_POLICY = """
tick_interval_ms: 50
heartbeat_timeout_s: {heartbeat}
max_running_per_worker: 8
default_slo_class: batch
slo_classes:
  interactive: {{ttft_s: 2.0, priority: 10, latency_sensitive: true, admission: {{max_prompt_tokens: 256}}}}
  batch: {{ttft_s: 60.0, priority: 1}}
models:
  sim-a: {{max_context: 512, weight_bytes: 1000000, output_prior: {{mean: 16, std: 8}}}}
  sim-b: {{max_context: 512, weight_bytes: 1000000, output_prior: {{mean: 16, std: 8}}}}
planner: {{policy: {policy}}}
grouping: {{window_s: 0.5}}
access: {{anonymous_clients: true}}
"""

SIM_PROFILE = """
name: test-fast
prefill_base_s: 0.001
prefill_per_token_s: 0.00001
decode_base_s: 0.004
decode_per_seq_s: 0.0005
load_fixed_s: 0.05
"""


def sim_policy_text(policy: str = "edf", heartbeat: float = 2.0) -> str:
    return SIM_POLICY.format(policy=policy, heartbeat=heartbeat)


def sim_policy(policy: str = "edf", heartbeat: float = 2.0) -> PolicyConfig:
    return parse_policy(sim_policy_text(policy, heartbeat))


def write_sim_files(tmp: Path, policy: str = "edf", heartbeat: float = 2.0) -> tuple[Path, Path]:
    pol = tmp / "policy.yaml"
    pol.write_text(sim_policy_text(policy, heartbeat))
    prof = tmp / "profile.yaml"
    prof.write_text(SIM_PROFILE)
    return pol, prof


def qlm_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "qlmserve.cli", *args]


def data_dir_of(log_dir: Path) -> Path:
    """The data folder (tokens, private Redis) beside a test's log folder."""
    return log_dir.parent / "data"


def admin_token(data_dir: Path, wait_s: float = 60.0) -> str:
    """The admin token a controller wrote in its data folder (waiting for a controller
    process that is still starting to write it)."""
    deadline = time.monotonic() + wait_s
    while (tok := resolve_token(None, str(data_dir), "admin")) is None:
        if time.monotonic() > deadline:
            raise TimeoutError(f"no admin token under {data_dir}")
        time.sleep(0.05)
    return tok


def start_worker(address: str, worker_id: str, profile: Path, log_dir: Path, engine: str = "sim",
                 extra: tuple[str, ...] = ()) -> subprocess.Popen:
    log_dir.mkdir(parents=True, exist_ok=True)
    args = ["worker", "--controller", address, "--id", worker_id, "--engine", engine,
            "--data-dir", str(data_dir_of(log_dir)), *extra]
    if engine == "sim":
        args += ["--sim-profile", str(profile)]
    out = open(log_dir / f"{worker_id}.log", "ab")  # noqa: SIM115 - the child owns it
    return subprocess.Popen(qlm_cmd(*args), stdout=out, stderr=subprocess.STDOUT,
                            env=dict(os.environ, PYTHONUNBUFFERED="1"))


def start_controller(redis_url: str, prefix: str, policy: Path, log_dir: Path, port: int | None = None
                     ) -> tuple[subprocess.Popen, int]:
    port = port or free_port()
    log_dir.mkdir(parents=True, exist_ok=True)
    out = open(log_dir / "controller.log", "ab")  # noqa: SIM115
    p = subprocess.Popen(qlm_cmd("serve", "--redis", redis_url, "--prefix", prefix, "--policy", str(policy),
                                 "--port", str(port), "--data-dir", str(data_dir_of(log_dir))),
                         stdout=out, stderr=subprocess.STDOUT,
                         env=dict(os.environ, PYTHONUNBUFFERED="1"))
    return p, port


def stop(p: subprocess.Popen, sig: int = signal.SIGTERM) -> None:
    if p.poll() is None:
        p.send_signal(sig)
        try:
            p.wait(timeout=15)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


async def wait_until(pred, timeout_s: float = 30.0, interval: float = 0.05, what: str = "condition"):
    deadline = time.monotonic() + timeout_s
    while True:
        res = pred()
        if asyncio.iscoroutine(res):
            res = await res
        if res:
            return res
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        await asyncio.sleep(interval)


def start_vllm_worker(qlm: Path, address: str, worker_id: str, log_dir: Path, extra: tuple[str, ...] = ()
                      ) -> subprocess.Popen:
    """`qlm worker --engine vllm` from the vLLM virtualenv, in a process group of its own:
    vLLM's engine core and CPU worker are its children, and killing the group kills a
    machine's worth of processes at once."""
    log_dir.mkdir(parents=True, exist_ok=True)
    out = open(log_dir / f"{worker_id}.log", "ab")  # noqa: SIM115 - the child owns it
    return subprocess.Popen([str(qlm), "worker", "--controller", address, "--id", worker_id, "--engine", "vllm",
                             "--data-dir", str(data_dir_of(log_dir)), *extra], stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                            env=dict(os.environ, PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1"))


def stop_group(p: subprocess.Popen, sig: int = signal.SIGTERM, timeout_s: float = 60.0) -> None:
    """Stop a process started with start_new_session=True and everything it started."""
    if p.poll() is None:
        try:
            os.killpg(p.pid, sig)
            p.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
        except ProcessLookupError:
            pass
    try:  # children left behind by a parent that died first
        os.killpg(p.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
