"""The batching rules every engine follows (operations/batching.py), as one table.

Each row is a situation (a preemption mode, limits, requests already decoding, requests
that then arrive in order) and the decisions of the iterations that follow: what each
one prefills (which requests it admits, and how many prompt tokens each gets), which
running requests take a decode step, and which one KV pressure sends back to the queue.
Every row runs on each engine it applies to, driven to the situation through its own
interface: the HF engine (a tiny Llama on CPU), the simulated engine (event clock) and
the simulator's worker. Rows on the pure functions follow.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path

import pytest

from qlmserve.backends.engine import Engine, EngineRequest
from qlmserve.backends.sim_engine import SimEngine, SimModel
from qlmserve.operations.batching import (
    BatchView,
    PreemptionMode,
    admission_order,
    batch_limit,
    ls_can_start,
    ls_prefill_budget,
    plan_iteration,
    preemption_victim,
)
from qlmserve.operations.costs import WorkerProfile
from qlmserve.sim.clock import EventClock
from qlmserve.sim.fleet import ModelRuntime, WorkerSpec
from qlmserve.sim.request import SimRequest
from qlmserve.sim.worker import SimWorker

NONE, ITER = PreemptionMode.NONE, PreemptionMode.ITERATION
RUNNING_TOKENS = 40  # max_tokens of the requests already decoding: none finishes during a row
WAITING_TOKENS = 8
PROFILE = WorkerProfile(prefill_base_s=0.01, prefill_per_token_s=0.0001, decode_base_s=0.02, decode_per_seq_s=0.001)


@dataclass(frozen=True)
class Req:
    rid: str
    prompt: int
    ls: bool = False
    priority: int = 0
    model: str = "m"


@dataclass(frozen=True)
class Step:
    """One iteration's decisions."""

    prefill: dict[str, int]  # request -> prompt tokens prefilled (a new request here was admitted)
    decode: frozenset[str] = frozenset()  # requests already decoding that took a decode step
    preempted: frozenset[str] = frozenset()  # running requests sent back to the queue (KV)


@dataclass(frozen=True)
class Row:
    name: str
    mode: PreemptionMode
    running: tuple[Req, ...]  # admitted in this order, each has its first token
    waiting: tuple[Req, ...]  # then arrive, in this order
    steps: tuple[Step, ...]
    max_batch: int = 4
    budget: int = 2048
    # KV left for new requests at the first observed iteration, in tokens (None: plenty);
    # negative: the decode step of the running requests does not fit by that much.
    kv_room: int | None = None
    engines: tuple[str, ...] = ("hf", "sim_engine", "sim_worker")
    why_not_all: str = ""  # when a row skips an engine: why the situation cannot arise there


def S(prefill: dict[str, int], decode: set[str] = frozenset(), preempted: set[str] = frozenset()) -> Step:  # noqa: N802
    return Step(prefill, frozenset(decode), frozenset(preempted))


r1, r2 = Req("r1", 16), Req("r2", 16)
ROWS = [
    Row("none: arrival order, the batch limit holds", NONE, (r1,), (Req("b1", 16), Req("l1", 16, ls=True)),
        (S({"b1": 16}, {"r1"}),), max_batch=2),
    Row("iteration: LS first, beyond the batch limit, in an LS-only iteration", ITER, (r1, r2),
        (Req("b1", 16), Req("l1", 16, ls=True)),
        (S({"l1": 16}), S({}, {"r1", "r2", "l1"})), max_batch=2),
    Row("none: LS waits for a batch slot", NONE, (r1, r2), (Req("l1", 16, ls=True),),
        (S({}, {"r1", "r2"}),), max_batch=2),
    Row("iteration: LS room ends at twice the batch", ITER, (Req("l0", 16, ls=True), Req("l1", 16, ls=True)),
        (Req("l2", 16, ls=True),), (S({}, {"l0", "l1"}),), max_batch=1),
    Row("iteration: higher priority first, then arrival", ITER, (),
        (Req("p0", 16), Req("p5a", 16, priority=5), Req("p5b", 16, priority=5)),
        (S({"p5a": 16, "p5b": 16}),), max_batch=2),
    Row("none: a request whose KV does not fit blocks those behind it", NONE, (Req("r1", 100),),
        (Req("big", 150), Req("small", 16)), (S({}, {"r1"}),), kv_room=128),
    Row("iteration: a request whose KV does not fit is skipped", ITER, (Req("r1", 100),),
        (Req("big", 150), Req("small", 16)), (S({"small": 16}, {"r1"}),), kv_room=128),
    Row("none: a request for another model is skipped, never blocks", NONE, (r1,),
        (Req("o1", 16, model="n"), Req("b1", 16)), (S({"b1": 16}, {"r1"}),),
        engines=("sim_worker",), why_not_all="the engines refuse another model's request in add_request"),
    Row("iteration: LS prefill first, BE chunked behind it", ITER, (r1,), (Req("b1", 80), Req("l1", 20, ls=True)),
        (S({"l1": 20}), S({"b1": 32}, {"r1", "l1"}), S({"b1": 32}, {"r1", "l1"}), S({"b1": 16}, {"r1", "l1"})),
        budget=32),
    Row("iteration: an LS prompt over the LS-only budget (4x) takes consecutive LS-only iterations", ITER, (r1,),
        (Req("l1", 150, ls=True), Req("b1", 16)),
        (S({"l1": 64}), S({"l1": 64}), S({"l1": 22}), S({"b1": 16}, {"r1", "l1"})), budget=16),
    Row("none: the budget goes in arrival order, LS or not", NONE, (r1,), (Req("b1", 50), Req("l1", 20, ls=True)),
        (S({"b1": 32}, {"r1"}), S({"b1": 18, "l1": 14}, {"r1"}), S({"l1": 6}, {"r1", "b1"})), budget=32),
    Row("KV runs out: the latest-admitted best-effort request is preempted", NONE,
        (Req("a", 20), Req("l", 20, ls=True), Req("b", 20)), (), (S({}, {"a", "l"}, {"b"}),), kv_room=-1,
        engines=("sim_engine", "sim_worker"), why_not_all="the HF engine reserves prompt + max_tokens at admission"),
    Row("KV runs out: best-effort before latency-sensitive", NONE, (Req("a", 20), Req("l", 20, ls=True)), (),
        (S({}, {"l"}, {"a"}),), kv_room=-1,
        engines=("sim_engine", "sim_worker"), why_not_all="the HF engine reserves prompt + max_tokens at admission"),
]


def _prompt(req: Req) -> list[int]:
    """Ordinary token ids (no special ones), different per request."""
    salt = sum(map(ord, req.rid))
    return [3 + (salt * 7919 + i * 104729) % 500 for i in range(req.prompt)]


# ---------------------------------------------------------------------- the three engines


class Driver:
    """An engine driven through its own interface. `step()` runs one iteration and reports
    its decisions from what changed: prompt tokens with KV, tokens generated, running."""

    def __init__(self) -> None:
        self.max_tokens: dict[str, int] = {}

    def add(self, reqs: list[Req], running: bool) -> None:
        for r in reqs:
            self.max_tokens[r.rid] = RUNNING_TOKENS if running else WAITING_TOKENS
        self._add(reqs)

    def step(self) -> Step:
        bp, bg, br = self.prefilled(), self.generated(), self.running()
        self._step()
        ap, ag, ar = self.prefilled(), self.generated(), self.running()
        finished = {k for k, g in ag.items() if g >= self.max_tokens[k]}
        return Step({k: v - bp.get(k, 0) for k, v in ap.items() if v > bp.get(k, 0)},
                    frozenset(k for k, g in ag.items() if bg.get(k, 0) > 0 and g > bg[k]),
                    frozenset(br - ar - finished))

    def _add(self, reqs: list[Req]) -> None:
        raise NotImplementedError

    def _step(self) -> None:
        raise NotImplementedError

    def prefilled(self) -> dict[str, int]:
        """Prompt tokens with KV, per request seen."""
        raise NotImplementedError

    def generated(self) -> dict[str, int]:
        raise NotImplementedError

    def running(self) -> set[str]:
        raise NotImplementedError

    def _request(self, r: Req) -> EngineRequest:
        return EngineRequest(r.rid, r.model, _prompt(r), max_tokens=self.max_tokens[r.rid],
                             latency_sensitive=r.ls, priority=r.priority)


class EngineDriver(Driver):
    """A driver of an `Engine` (add_request / step / stats); subclasses read each
    sequence's progress from the engine's own record of it."""

    engine: Engine

    def __init__(self) -> None:
        super().__init__()
        self._last: dict[str, tuple[int, int]] = {}  # request -> (prompt tokens with KV, generated)

    def _add(self, reqs: list[Req]) -> None:
        for r in reqs:
            self.engine.add_request(self._request(r))

    def _step(self) -> None:
        self.engine.step()

    def _progress(self) -> dict[str, tuple[int, int]]:
        raise NotImplementedError

    def prefilled(self) -> dict[str, int]:
        self._last.update(self._progress())  # (a finished request keeps its last figures)
        return {k: v[0] for k, v in self._last.items()}

    def generated(self) -> dict[str, int]:
        self._last.update(self._progress())
        return {k: v[1] for k, v in self._last.items()}

    def running(self) -> set[str]:
        return set(self.engine.stats().running)


class HFDriver(EngineDriver):
    def __init__(self, row: Row, folder: Path) -> None:
        import torch

        from qlmserve.backends.hf.engine import HFEngine
        from qlmserve.backends.hf.kv_cache import BLOCK_SIZE
        from qlmserve.operations.model_spec import ModelSpec

        super().__init__()
        kv = None
        if row.kv_room is not None:
            # Every running request reserved prompt + max_tokens - 1 tokens, in whole blocks.
            held = sum(-(-(r.prompt + RUNNING_TOKENS - 1) // BLOCK_SIZE) * BLOCK_SIZE for r in row.running)
            kv = held + row.kv_room
        self.engine = HFEngine({"m": ModelSpec(path=str(folder), kind="llama", max_context=256)}, device="cpu",
                               max_batch_size=row.max_batch, kv_capacity_tokens=kv, dtype=torch.float32,
                               preemption=row.mode, initial_model="m", max_prefill_tokens=row.budget)
        self.engine._stop_ids = frozenset()  # noqa: SLF001 - random weights may pick eos; rows count tokens

    def _progress(self) -> dict[str, tuple[int, int]]:
        return {seq.id: (min(seq.kv_len, seq.num_prompt), seq.num_generated)
                for seq in self.engine._seqs.values()}  # noqa: SLF001 - the engine's record of each sequence


class SimEngineDriver(EngineDriver):
    def __init__(self, row: Row) -> None:
        super().__init__()
        kv = 100_000
        if row.kv_room is not None:
            # After one iteration each running request holds prompt + 1 token, and the
            # next decode step needs one more each.
            kv = sum(r.prompt + 1 for r in row.running) + len(row.running) + row.kv_room
        self.clock = EventClock()
        self.engine = SimEngine(PROFILE, [SimModel("m", 10**9)], active_model="m", clock=self.clock,
                                kv_capacity_tokens=kv, max_batch_size=row.max_batch, preemption=row.mode,
                                max_prefill_tokens=row.budget)

    def _progress(self) -> dict[str, tuple[int, int]]:
        seqs = [*self.engine._running, *self.engine._waiting]  # noqa: SLF001 - the engine's sequences
        return {s.id: (len(s.request.prompt_token_ids) if s.prefilled else s.computed, len(s.generated)) for s in seqs}


class Sink:
    def on_finished(self, r, now):  # noqa: ANN001, ANN201
        pass

    def on_requeue(self, r, now, reason):  # noqa: ANN001, ANN201
        pass

    def on_worker_changed(self, w):  # noqa: ANN001, ANN201
        pass


class SimWorkerDriver(Driver):
    def __init__(self, row: Row) -> None:
        kv = 100_000
        if row.kv_room is not None:
            kv = sum(r.prompt + 1 for r in row.running) + len(row.running) + row.kv_room
        models = {m: ModelRuntime(m, PROFILE, kv, 32, 10**9, 4096) for m in ("m", "n")}
        spec = WorkerSpec("w0", "test", 1, models, "m", (), row.max_batch, 0, None, row.mode)
        self.clock = EventClock()
        self.worker = SimWorker(spec, self.clock, Sink(), max_prefill_tokens=row.budget)
        self.reqs: dict[str, SimRequest] = {}
        self.preempted: set[str] = set()  # by the plan of the unit about to run
        super().__init__()

    def _add(self, reqs: list[Req]) -> None:
        batch = [SimRequest(rid=r.rid, model=r.model, slo_class="c", group_id="g", prompt_tokens=r.prompt,
                            output_tokens=self.max_tokens[r.rid], max_tokens=self.max_tokens[r.rid], arrival=0.0,
                            ttft_s=1.0, tpot_s=None, latency_sensitive=r.ls, priority=r.priority) for r in reqs]
        self.reqs.update({r.rid: r for r in batch})
        now = self.clock.now()
        self.worker.assign(batch, now)
        self._advance(lambda: self.worker.poke(now), now)  # a decode stretch in flight stops at its step

    def _advance(self, act, until: float) -> None:  # noqa: ANN001
        """Run `act` and the clock to `until`; the worker plans its next unit on the way,
        and what that plan preempts is what the next unit decided."""
        recomputes = {k: r.recomputes for k, r in self.reqs.items()}
        act()
        self.clock.advance_to(until)
        self.preempted |= {k for k, r in self.reqs.items() if r.recomputes > recomputes[k]}

    def step(self) -> Step:
        """The worker plans a unit when the one before ends (its admissions and
        preemptions happen then); the unit's chunks and decode rows are its own."""
        u = self.worker.unit
        assert u is not None and u.kind in ("iter", "segment"), "the worker has no iteration to run"
        got = Step({r.rid: n for r, n in u.prefill}, frozenset(r.rid for r in u.decode), frozenset(self.preempted))
        self.preempted = set()
        self._advance(lambda: None, u.end)
        return got

    def generated(self) -> dict[str, int]:
        return {k: r.generated for k, r in self.reqs.items()}


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from qlmserve.tiny_models import ensure_tiny_model

    root = Path(os.environ.get("QLM_TINY_MODELS") or tmp_path_factory.mktemp("tiny-models"))
    return ensure_tiny_model("llama", root / "llama", seed=0)


CASES = [pytest.param(row, engine, id=f"{engine}: {row.name}",
                      marks=[pytest.mark.gpu] if engine == "hf" else [])
         for row in ROWS for engine in row.engines]


@pytest.mark.parametrize(("row", "engine"), CASES)
def test_engines_follow_the_batching_rules(row: Row, engine: str, request: pytest.FixtureRequest) -> None:
    """This test verifies that: 1. in each situation of the table, driven through its own
    interface, the engine makes the row's decisions, iteration by iteration: whom it
    admits and how many prompt tokens each request prefills (LS first under
    ITERATION / EXPERT, at most the budget per iteration), which running requests take a
    decode step, and which one it preempts when KV runs out; 2. the requests already
    decoding took exactly one iteration to start (the situation is what the row says)."""
    if engine == "hf":
        d: Driver = HFDriver(row, request.getfixturevalue("tiny_llama"))
    elif engine == "sim_engine":
        d = SimEngineDriver(row)
    else:
        d = SimWorkerDriver(row)
    if row.running:
        d.add(list(row.running), running=True)
        d.step()
        assert d.generated() == {r.rid: 1 for r in row.running}, "the running requests start in one iteration"
    if row.waiting:
        d.add(list(row.waiting), running=False)
    for i, want in enumerate(row.steps):
        assert d.step() == want, f"iteration {i + 1}"


# ---------------------------------------------------------------------- the pure functions


@dataclass(eq=False)
class Seq:
    name: str
    prompt: int = 10
    latency_sensitive: bool = False
    priority: int = 0
    model: str = "m"
    order: int = 0
    done: int = 0


def view(mode: PreemptionMode, waiting: list[Seq], *, prefilling: list[Seq] = (), decoding: list[Seq] = (),
         running: int | None = None, kv_free: int = 10_000, budget: int = 100, batch: int = 4,
         model: str | None = "m", preempts: bool = True) -> BatchView[Seq]:
    return BatchView(mode=mode, max_batch_size=batch, max_prefill_tokens=budget, model=model, kv_free=kv_free,
                     running=len(prefilling) + len(decoding) if running is None else running, waiting=waiting,
                     prefilling=list(prefilling), decoding=list(decoding), kv_need=lambda s: s.prompt + 1,
                     prompt_left=lambda s: s.prompt - s.done, kv_held=(lambda s: s.prompt) if preempts else None,
                     admitted_order=lambda s: s.order)


def names(seqs) -> list[str]:  # noqa: ANN001
    return [s.name if isinstance(s, Seq) else f"{s[0].name}:{s[1]}" for s in seqs]


def test_pure_rules():
    """This test verifies that: 1. admission order is queue order under NONE and LS, then
    priority, then queue order otherwise; 2. the LS batch room is LS_BATCH_FACTOR x the
    batch under ITERATION / EXPERT only; 3. the victim is the latest-admitted BE sequence,
    an LS one only when no BE one runs; 4. nothing is admitted while no model is active
    (sequences already prefilling still get their chunks); 5. an `ls_only` plan holds LS
    work only, or nothing; 6. new sequences get only the KV the decode step leaves;
    7. ls_can_start sees LS prefilling, or an LS sequence that fits."""
    a, b = Seq("a"), Seq("b", priority=3)
    ls = Seq("ls", latency_sensitive=True)
    assert names(admission_order([a, b, ls], NONE)) == ["a", "b", "ls"]
    assert names(admission_order([a, b, ls], ITER)) == ["ls", "b", "a"]
    assert names(admission_order([a, b, ls], PreemptionMode.EXPERT)) == ["ls", "b", "a"]
    assert [batch_limit(m, True, 4) for m in (NONE, ITER, PreemptionMode.EXPERT)] == [4, 8, 8]
    assert batch_limit(ITER, False, 4) == 4
    x, y, z = Seq("x", order=1), Seq("y", latency_sensitive=True, order=3), Seq("z", order=2)
    assert preemption_victim([x, y, z], lambda s: s.order).name == "z"
    assert preemption_victim([y], lambda s: s.order).name == "y"

    half = Seq("half", prompt=50, done=20)
    plan = plan_iteration(view(NONE, [a], prefilling=[half], model=None))
    assert names(plan.prefill) == ["half:30"] and plan.admitted == []
    plan = plan_iteration(view(ITER, [a, b], decoding=[x]), ls_only=True)
    assert plan.ls_only and not plan.prefill and not plan.decode
    plan = plan_iteration(view(NONE, [a], decoding=[x]), ls_only=True)
    assert not plan.prefill and not plan.decode
    # 11 KV free: the decode step of x and z takes 2, a needs 11: it waits.
    plan = plan_iteration(view(NONE, [a], decoding=[x, z], kv_free=11))
    assert plan.admitted == [] and names(plan.decode) == ["x", "z"] and plan.preempted == []
    plan = plan_iteration(view(NONE, [a], decoding=[x, z], kv_free=1))
    assert names(plan.preempted) == ["z"] and names(plan.decode) == ["x"] and plan.admitted == []
    plan = plan_iteration(view(NONE, [], decoding=[x, z], kv_free=1, preempts=False))
    assert plan.preempted == [] and names(plan.decode) == ["x", "z"]  # KV reserved: never a victim

    assert not ls_can_start(view(ITER, [a], decoding=[x]))
    assert ls_can_start(view(ITER, [ls], decoding=[x]))
    assert not ls_can_start(view(ITER, [ls], decoding=[x], kv_free=5))
    assert not ls_can_start(view(ITER, [ls], running=8))
    assert ls_can_start(view(ITER, [], prefilling=[dataclasses.replace(ls, done=3)], running=8))
    assert not ls_can_start(view(ITER, [dataclasses.replace(ls, model="n")]))


@pytest.mark.parametrize(("mode", "waiting", "prefilling", "budget", "want"), [
    (NONE, ["be:50", "ls:20"], [], 32, ["be:32"]),
    (NONE, ["ls:20"], ["be:18"], 32, ["be:18", "ls:14"]),
    (ITER, ["be:50", "ls:20"], [], 32, ["ls:20"]),  # LS alone
    (ITER, ["ls:200"], [], 32, ["ls:128"]),  # an LS-only iteration: 4x the budget
    (ITER, ["ls:90", "be:5"], ["ls2:50"], 32, ["ls2:50", "ls:78"]),  # 4x the budget, prefilling LS first
    (ITER, ["be:50", "ls:20"], ["ls2:5"], 32, ["ls2:5", "ls:20"]),  # prefilling LS first
    (ITER, ["be:50", "be2:20"], ["be3:10"], 32, ["be3:10", "be:22"]),
    (ITER, ["be:10", "be2:10"], [], 15, ["be:10", "be2:5"]),
])
def test_prefill_composition(mode, waiting, prefilling, budget, want):
    """This test verifies that: 1. an iteration prefills at most the budget; sequences
    already prefilling take it first, then new ones in admission order; 2. a prompt over
    what is left is chunked; 3. under ITERATION an iteration with LS work holds LS chunks
    only, with 4x the budget; 4. under NONE LS and BE share the budget in arrival
    order."""
    def seq(spec: str, prefilling: bool) -> Seq:
        name, n = spec.split(":")
        return Seq(name, prompt=int(n) + (7 if prefilling else 0), latency_sensitive=name.startswith("ls"),
                   done=7 if prefilling else 0)

    plan = plan_iteration(view(mode, [seq(w, False) for w in waiting], prefilling=[seq(p, True) for p in prefilling],
                               budget=budget))
    assert names(plan.prefill) == want
    assert plan.prefill_tokens <= (ls_prefill_budget(budget) if plan.ls_only else budget)
    assert plan.ls_only == (mode is ITER and any(n.startswith("ls") for n in want))
