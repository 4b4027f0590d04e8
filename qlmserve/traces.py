"""Request traces as published, and the workload builder that turns one into requests.

Three formats, each read as its source publishes it (so any file of the same source
works, not a converted copy):

- Azure LLM inference trace (CSV ``TIMESTAMP,ContextTokens,GeneratedTokens``; wall-clock
  timestamps with 7 decimals, CRLF lines), e.g. ``AzureLLMInferenceTrace_conv.csv``.
- Mooncake trace (JSON lines: ``timestamp`` in ms from the trace start, ``input_length``,
  ``output_length``, ``hash_ids``: one id per 512-token prefix block).
- Length table (CSV ``num_prefill_tokens,num_decode_tokens,...``, no arrivals): arrivals are
  generated, Poisson or gamma (burstier for cv > 1), from a seed.

Traces carry no model and no SLO class. `build_workload` assigns them from a seed and
scales the load: a rate multiplier divides the inter-arrival times, and the scaled trace
is replayed back to back over a fixed window, so that a short trace can load a large
fleet for as long as asked.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime
from pathlib import Path

import numpy as np

from qlmserve.operations.prefix_cache import MOONCAKE_BLOCK_TOKENS

TRACE_FORMATS = ("azure", "mooncake", "lengths")

# Where `qlm bench` looks for the full public traces, relative to the repository root,
# and the slice bundled with the package (the demo's default).
SHARED_TRACES_DIR = Path(__file__).resolve().parent.parent.parent / "shared" / "traces"
BUNDLED_AZURE_SLICE = Path(__file__).resolve().parent / "data" / "azure2023_conv_slice.csv"


class TraceError(ValueError):
    """A trace file that cannot be read; the message names the file and the line."""


@dataclass(frozen=True)
class TraceRecord:
    """One request of a trace, as published (lengths in the source tokenizer's tokens)."""

    arrival_s: float  # seconds from the first request of the trace
    prompt_tokens: int
    output_tokens: int
    hash_ids: tuple[int, ...] = ()  # Mooncake prefix blocks (512 tokens each); () when unknown


@dataclass(frozen=True)
class Trace:
    name: str  # file name, used in reports
    fmt: str  # one of TRACE_FORMATS
    records: tuple[TraceRecord, ...]  # sorted by arrival
    real_arrivals: bool  # False when the arrivals were generated (length tables)

    @property
    def span_s(self) -> float:
        """Time from the first to the last arrival."""
        return self.records[-1].arrival_s - self.records[0].arrival_s if self.records else 0.0

    @property
    def period_s(self) -> float:
        """Length of one replay of the trace: its span plus one mean gap, so that a loop of
        the trace keeps the mean rate."""
        n = len(self.records)
        if n < 2:
            return 1.0
        return self.span_s * n / (n - 1)

    @property
    def rate(self) -> float:
        """Mean arrival rate, requests per second."""
        return len(self.records) / self.period_s if self.records else 0.0

    def head(self, n: int) -> Trace:
        return replace(self, records=self.records[:n])


# ---------------------------------------------------------------------------------------
# Loaders
# ---------------------------------------------------------------------------------------

def _parse_azure_timestamp(text: str) -> float:
    """Seconds since the epoch (naive, as published) of '2023-11-16 18:15:46.6805900'.

    datetime keeps only microseconds; the trace has 100 ns digits, so the fraction is
    parsed on its own."""
    text = text.strip()
    whole, _, frac = text.partition(".")
    base = datetime.strptime(whole, "%Y-%m-%d %H:%M:%S")
    seconds = (base - datetime(1970, 1, 1)).total_seconds()
    if frac:
        if not frac.isdigit():
            raise ValueError(f"bad fractional seconds {frac!r}")
        seconds += int(frac) / 10 ** len(frac)
    return seconds


def load_azure_csv(path: str | Path, limit: int | None = None) -> Trace:
    """An Azure LLM inference trace (``TIMESTAMP,ContextTokens,GeneratedTokens``)."""
    path = Path(path)
    records: list[TraceRecord] = []
    t0: float | None = None
    with _open_text(path) as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None:
            raise TraceError(f"{path}: empty file")
        cols = [h.strip() for h in header]
        try:
            i_ts, i_in, i_out = cols.index("TIMESTAMP"), cols.index("ContextTokens"), cols.index("GeneratedTokens")
        except ValueError:
            raise TraceError(
                f"{path}:1: expected columns TIMESTAMP,ContextTokens,GeneratedTokens, got {','.join(cols)}"
            ) from None
        for lineno, row in enumerate(reader, start=2):
            if not row or all(not c.strip() for c in row):
                continue
            try:
                ts = _parse_azure_timestamp(row[i_ts])
                prompt, output = int(row[i_in]), int(row[i_out])
            except (ValueError, IndexError) as exc:
                raise TraceError(f"{path}:{lineno}: cannot parse {row!r}: {exc}") from None
            if t0 is None:
                t0 = ts
            records.append(TraceRecord(ts - t0, prompt, output))
            if limit is not None and len(records) >= limit:
                break
    return _finish(path, "azure", records, real_arrivals=True)


def load_mooncake_jsonl(path: str | Path, limit: int | None = None) -> Trace:
    """A Mooncake trace (JSON lines with ``timestamp`` in ms, lengths and ``hash_ids``)."""
    path = Path(path)
    records: list[TraceRecord] = []
    t0: float | None = None
    with _open_text(path) as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
                ts = float(obj["timestamp"]) / 1000.0
                rec = TraceRecord(0.0, int(obj["input_length"]), int(obj["output_length"]),
                                  tuple(int(h) for h in obj.get("hash_ids", ())))
            except (ValueError, KeyError, TypeError) as exc:
                raise TraceError(f"{path}:{lineno}: cannot parse Mooncake record: {exc}") from None
            if t0 is None:
                t0 = ts
            records.append(replace(rec, arrival_s=ts - t0))
            if limit is not None and len(records) >= limit:
                break
    return _finish(path, "mooncake", records, real_arrivals=True)


def load_length_table(path: str | Path, *, rate: float = 1.0, arrivals: str = "poisson", cv: float = 1.0,
                      seed: int = 0, limit: int | None = None) -> Trace:
    """A length table (``num_prefill_tokens,num_decode_tokens,...``) with generated arrivals.

    arrivals: "poisson" (exponential gaps at `rate` req/s) or "gamma" (gamma gaps with mean
    1/rate and coefficient of variation `cv`; cv > 1 is burstier than Poisson).
    """
    path = Path(path)
    if rate <= 0:
        raise TraceError(f"{path}: rate must be > 0, got {rate}")
    if arrivals not in ("poisson", "gamma"):
        raise TraceError(f"{path}: arrivals must be 'poisson' or 'gamma', got {arrivals!r}")
    if arrivals == "gamma" and cv <= 0:
        raise TraceError(f"{path}: cv must be > 0, got {cv}")
    lengths: list[tuple[int, int]] = []
    with _open_text(path) as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None:
            raise TraceError(f"{path}: empty file")
        cols = [h.strip() for h in header]
        try:
            i_in, i_out = cols.index("num_prefill_tokens"), cols.index("num_decode_tokens")
        except ValueError:
            raise TraceError(
                f"{path}:1: expected columns num_prefill_tokens,num_decode_tokens, got {','.join(cols)}"
            ) from None
        for lineno, row in enumerate(reader, start=2):
            if not row:
                continue
            try:
                # Some length tables store token counts as floats ("74.0").
                lengths.append((int(float(row[i_in])), int(float(row[i_out]))))
            except (ValueError, IndexError) as exc:
                raise TraceError(f"{path}:{lineno}: cannot parse {row!r}: {exc}") from None
            if limit is not None and len(lengths) >= limit:
                break
    rng = np.random.default_rng(seed)
    n = len(lengths)
    if arrivals == "poisson":
        gaps = rng.exponential(1.0 / rate, size=n)
    else:
        shape = 1.0 / (cv * cv)
        gaps = rng.gamma(shape, (1.0 / rate) / shape, size=n)
    times = np.concatenate([[0.0], np.cumsum(gaps[1:])]) if n else np.zeros(0)
    records = [TraceRecord(float(t), p, o) for t, (p, o) in zip(times, lengths)]
    return _finish(path, "lengths", records, real_arrivals=False)


def detect_format(path: str | Path) -> str:
    """Guess a trace's format from its first line."""
    path = Path(path)
    with _open_text(path) as f:
        first = f.readline().strip()
    if first.startswith("{"):
        return "mooncake"
    cols = {c.strip() for c in first.split(",")}
    if {"TIMESTAMP", "ContextTokens", "GeneratedTokens"} <= cols:
        return "azure"
    if {"num_prefill_tokens", "num_decode_tokens"} <= cols:
        return "lengths"
    raise TraceError(f"{path}:1: unknown trace format (first line {first[:80]!r})")


def load_trace(path: str | Path, fmt: str = "auto", *, limit: int | None = None, rate: float = 1.0,
               arrivals: str = "poisson", cv: float = 1.0, seed: int = 0) -> Trace:
    """Load any supported trace; `rate`, `arrivals`, `cv` and `seed` apply to length tables."""
    if fmt == "auto":
        fmt = detect_format(path)
    if fmt == "azure":
        return load_azure_csv(path, limit=limit)
    if fmt == "mooncake":
        return load_mooncake_jsonl(path, limit=limit)
    if fmt == "lengths":
        return load_length_table(path, rate=rate, arrivals=arrivals, cv=cv, seed=seed, limit=limit)
    raise TraceError(f"{path}: unknown format {fmt!r}; valid: auto, {', '.join(TRACE_FORMATS)}")


def resolve_trace_path(name: str, traces_dir: str | Path | None = None) -> Path:
    """A trace by path, or by file name in `traces_dir` (default ../shared/traces); the Azure
    conversation trace falls back to the bundled slice when the full file is absent."""
    p = Path(name)
    if p.exists():
        return p
    base = Path(traces_dir) if traces_dir is not None else SHARED_TRACES_DIR
    if (base / name).exists():
        return base / name
    if name in ("azure2023_conv.csv", BUNDLED_AZURE_SLICE.name):
        return BUNDLED_AZURE_SLICE
    raise TraceError(f"trace {name!r} not found (looked in {base})")


def _open_text(path: Path):
    try:
        return path.open(newline="", encoding="utf-8")
    except OSError as exc:
        raise TraceError(f"{path}: cannot read trace: {exc.strerror}") from None


def _finish(path: Path, fmt: str, records: list[TraceRecord], real_arrivals: bool) -> Trace:
    if not records:
        raise TraceError(f"{path}: no requests")
    # Published traces are sorted; a stable sort keeps equal timestamps in file order.
    records.sort(key=lambda r: r.arrival_s)
    return Trace(name=path.name, fmt=fmt, records=tuple(records), real_arrivals=real_arrivals)


# ---------------------------------------------------------------------------------------
# Workload builder
# ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class WorkloadRequest:
    """One request to replay: a plain record, no behaviour."""

    request_id: str
    arrival: float  # seconds from the start of the run
    model: str
    slo_class: str
    prompt_tokens: int
    output_tokens: int  # what the request will produce (its max_tokens when it runs to length)
    user_id: str
    prefix_id: str | None  # first prefix block of the prompt (prefix-cache / stickiness), if known
    source_index: int  # row of the trace it replays
    loop: int  # which replay of the trace (0 for the first)
    # Prefix blocks of the prompt (Mooncake hash_ids, MOONCAKE_BLOCK_TOKENS each), full blocks
    # only; () when unknown or when the prompt was cut or rescaled (its blocks no longer apply).
    # Each replay of the trace gets ids of its own: a loop does not re-ask the same prompts.
    hash_ids: tuple[int, ...] = ()


@dataclass(frozen=True)
class WorkloadSpec:
    """How a trace becomes a workload. Everything random is drawn from `seed`."""

    class_mix: Mapping[str, float]  # slo class -> share of requests (normalised)
    model_mix: Mapping[str, float]  # model -> share of requests (normalised)
    load: float = 1.0  # rate multiplier: inter-arrival times are divided by it
    window_s: float | None = None  # replay the scaled trace in a loop until this long; None = once
    max_requests: int | None = None  # stop after this many requests
    prompt_scale: float = 1.0  # multiply prompt lengths
    output_scale: float = 1.0  # multiply output lengths
    max_context: Mapping[str, int] = field(default_factory=dict)  # model -> prompt + output limit
    min_output_tokens: int = 1
    num_users: int = 1000  # users drawn Zipf(1.2)-like over this many ids
    seed: int = 0

    def __post_init__(self) -> None:
        for name, mix in (("class_mix", self.class_mix), ("model_mix", self.model_mix)):
            if not mix:
                raise ValueError(f"{name} must name at least one entry")
            if any(v < 0 for v in mix.values()) or sum(mix.values()) <= 0:
                raise ValueError(f"{name} shares must be >= 0 with a positive sum, got {dict(mix)}")
        if self.load <= 0:
            raise ValueError(f"load must be > 0, got {self.load}")
        if self.window_s is not None and self.window_s <= 0:
            raise ValueError(f"window_s must be > 0, got {self.window_s}")
        if self.prompt_scale <= 0 or self.output_scale <= 0:
            raise ValueError(f"length scales must be > 0, got {self.prompt_scale}, {self.output_scale}")
        if self.min_output_tokens < 1:
            raise ValueError(f"min_output_tokens must be >= 1, got {self.min_output_tokens}")
        for m, ctx in self.max_context.items():
            if ctx < self.min_output_tokens + 1:
                raise ValueError(f"max_context[{m!r}] = {ctx} leaves no room for a prompt")


def _draw(rng: np.random.Generator, mix: Mapping[str, float], n: int) -> list[str]:
    names = sorted(mix)
    p = np.array([mix[k] for k in names], dtype=float)
    p /= p.sum()
    idx = rng.choice(len(names), size=n, p=p)
    return [names[i] for i in idx]


def fit_lengths(prompt: int, output: int, max_context: int | None, min_output: int = 1) -> tuple[int, int]:
    """Clip a (prompt, output) pair to a model's context: the output keeps at least
    `min_output` tokens, the prompt is cut from the front first (as a serving front end
    truncating an over-long conversation would), then the output."""
    prompt, output = max(1, prompt), max(min_output, output)
    if max_context is None or prompt + output <= max_context:
        return prompt, output
    prompt = min(prompt, max_context - min_output)
    output = min(output, max_context - prompt)
    return prompt, output


def build_workload(trace: Trace, spec: WorkloadSpec) -> list[WorkloadRequest]:
    """Requests sorted by arrival. Arrival times are the trace's, divided by `spec.load`;
    with `window_s` the scaled trace repeats back to back (each loop starting one scaled
    period after the last) until the window is full."""
    rng = np.random.default_rng(spec.seed)
    period = trace.period_s / spec.load
    base = [(r.arrival_s - trace.records[0].arrival_s) / spec.load for r in trace.records]
    out: list[tuple[float, int, int]] = []  # (arrival, source index, loop)
    loop = 0
    while True:
        offset = loop * period
        stop = False
        for i, t in enumerate(base):
            at = offset + t
            if spec.window_s is not None and at >= spec.window_s:
                stop = True
                break
            out.append((at, i, loop))
            if spec.max_requests is not None and len(out) >= spec.max_requests:
                stop = True
                break
        loop += 1
        if stop or spec.window_s is None:
            break
    n = len(out)
    classes = _draw(rng, spec.class_mix, n)
    models = _draw(rng, spec.model_mix, n)
    # Zipf-like user popularity (a few heavy users), drawn once per request.
    ranks = np.arange(1, max(1, spec.num_users) + 1, dtype=float)
    user_p = ranks**-1.2
    user_p /= user_p.sum()
    users = rng.choice(len(ranks), size=n, p=user_p)
    id_span = 1 + max((h for rec in trace.records for h in rec.hash_ids), default=-1)
    requests = []
    for k, ((at, i, lp), cls, model, user) in enumerate(zip(out, classes, models, users)):
        rec = trace.records[i]
        prompt = int(round(rec.prompt_tokens * spec.prompt_scale))
        output = int(round(rec.output_tokens * spec.output_scale))
        prompt, output = fit_lengths(prompt, output, spec.max_context.get(model), spec.min_output_tokens)
        prefix = f"h{rec.hash_ids[0] + lp * id_span}" if rec.hash_ids else None
        blocks: tuple[int, ...] = ()
        if rec.hash_ids and prompt == rec.prompt_tokens:
            blocks = tuple(h + lp * id_span for h in rec.hash_ids[:prompt // MOONCAKE_BLOCK_TOKENS])
        requests.append(WorkloadRequest(
            request_id=f"r{k:07d}", arrival=float(at), model=model, slo_class=cls,
            prompt_tokens=prompt, output_tokens=output, user_id=f"u{int(user)}",
            prefix_id=prefix, source_index=i, loop=lp, hash_ids=blocks,
        ))
    return requests


def describe_workload(requests: Iterable[WorkloadRequest]) -> dict:
    """Summary figures of a workload (for reports)."""
    reqs = list(requests)
    if not reqs:
        return {"requests": 0}
    span = max(r.arrival for r in reqs) - min(r.arrival for r in reqs)
    by_class: dict[str, int] = {}
    by_model: dict[str, int] = {}
    for r in reqs:
        by_class[r.slo_class] = by_class.get(r.slo_class, 0) + 1
        by_model[r.model] = by_model.get(r.model, 0) + 1
    prompts = np.array([r.prompt_tokens for r in reqs])
    outputs = np.array([r.output_tokens for r in reqs])
    return {
        "requests": len(reqs),
        "span_s": span,
        "rate": len(reqs) / span if span > 0 else math.inf,
        "classes": by_class,
        "models": by_model,
        "prompt_mean": float(prompts.mean()),
        "output_mean": float(outputs.mean()),
        "output_tokens_per_s": float(outputs.sum() / span) if span > 0 else math.inf,
    }
