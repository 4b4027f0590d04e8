"""Engine-agnostic benchmark pieces: an engine thread that records when every token
came out, request logs, percentiles, deterministic prompts. Any Engine (HF, vLLM,
simulated) runs under them; the vLLM benchmark imports them in the vLLM virtualenv, so
nothing here imports an engine.
"""

from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass, field

from qlmserve.backends.engine import Engine, EngineRequest, TokenEvent


def prompt_ids(length: int, salt: int) -> list[int]:
    """Deterministic ordinary token ids (no special tokens) of a given length."""
    return [3 + (salt * 7919 + i * 104729) % 500 for i in range(length)]


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    s = sorted(values)
    k = (len(s) - 1) * q / 100.0
    lo, hi = math.floor(k), math.ceil(k)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


@dataclass
class TokenLog:
    """When each request arrived and when each of its tokens came out of step()."""

    arrival: dict[str, float] = field(default_factory=dict)
    token_times: dict[str, list[float]] = field(default_factory=dict)
    finished: dict[str, float] = field(default_factory=dict)

    def record(self, events: list[TokenEvent], now: float) -> None:
        for e in events:
            self.token_times.setdefault(e.request_id, []).append(now)
            if e.finished:
                self.finished[e.request_id] = now

    def ttft(self, rid: str) -> float | None:
        times = self.token_times.get(rid)
        return times[0] - self.arrival[rid] if times else None


class EngineLoop(threading.Thread):
    """Steps an engine on its own thread, as the worker does; requests arrive from others."""

    def __init__(self, engine: Engine, log: TokenLog) -> None:
        super().__init__(daemon=True, name="engine-loop")
        self.engine, self.log = engine, log
        self._halt = threading.Event()
        self.error: BaseException | None = None
        # (wall time, CPU time of this thread) after every step: with one torch thread all
        # model work runs on this thread, so CPU time is what the engine really got from
        # a machine it shares with other processes.
        self.samples: list[tuple[float, float]] = []

    def run(self) -> None:
        try:
            self.samples.append((time.perf_counter(), time.thread_time()))
            while not self._halt.is_set():
                if self.engine.has_work():
                    events = self.engine.step()
                    now = time.perf_counter()
                    self.log.record(events, now)
                    self.samples.append((now, time.thread_time()))
                else:
                    time.sleep(0.0005)
        except BaseException as exc:  # noqa: BLE001 - reported by the caller
            self.error = exc

    def cpu_seconds(self, start: float, end: float) -> float:
        """CPU time the engine thread used between two wall-clock instants (step granularity)."""
        inside = [cpu for wall, cpu in self.samples if start <= wall <= end]
        before = [cpu for wall, cpu in self.samples if wall < start]
        base = before[-1] if before else (inside[0] if inside else 0.0)
        return (inside[-1] - base) if inside else 0.0

    def stop(self) -> None:
        self._halt.set()
        self.join()
        if self.error is not None:
            raise RuntimeError("engine loop failed") from self.error


def submit(engine: Engine, log: TokenLog, request: EngineRequest) -> None:
    log.arrival[request.request_id] = time.perf_counter()
    engine.add_request(request)
