"""Expert-level preemption (QLLM) in HFEngine: pause a best-effort pass between layers or
between attention and MoE, run latency-sensitive work, resume without recomputation."""

from __future__ import annotations

import dataclasses

import pytest
from gpu_helpers import make_engine, make_requests, reference_tokens, run_until_idle, tokens_of

from qlmserve.backends.engine import EngineRequest, PreemptionMode

pytestmark = pytest.mark.gpu


class ArrivalHook:
    """Adds a request the first time `module` runs on a batch of `rows` rows: a request that
    arrives (through the thread-safe add_request) while a pass is inside that stage."""

    def __init__(self, engine, module, request: EngineRequest, rows: int) -> None:
        self.engine, self.request, self.rows, self.fired = engine, request, rows, False
        self.handle = module.register_forward_pre_hook(self, with_kwargs=True)

    def __call__(self, module, args, kwargs=None):  # noqa: ANN001, ANN204
        hidden = args[0] if args else kwargs["hidden_states"]
        if not self.fired and hidden.shape[0] == self.rows:
            self.fired = True
            self.engine.add_request(self.request)


class RowCounter:
    """Records the batch rows of every call of a module (an independent count of work)."""

    def __init__(self, module) -> None:
        self.calls: list[int] = []
        module.register_forward_pre_hook(self, with_kwargs=True)

    def __call__(self, module, args, kwargs):  # noqa: ANN001, ANN204
        hidden = args[0] if args else kwargs["hidden_states"]
        self.calls.append(int(hidden.shape[0]))


def _collect(engine, into: dict[str, list[int]]) -> list[str]:
    ids = []
    for e in engine.step():
        into.setdefault(e.request_id, []).append(e.token_id)
        ids.append(e.request_id)
    return ids


@pytest.mark.parametrize("kind", ["mixtral", "qwen2_moe"])
@pytest.mark.parametrize(("layer", "stage", "resume_at"), [(3, "mlp", (4, "attention")),
                                                            (5, "self_attn", (5, "moe"))])
def test_expert_preemption_is_exact_and_recomputes_nothing(tiny_models, device, kind, layer, stage,
                                                           resume_at):
    """This test verifies that: 1. an LS request arriving while a BE decode pass is inside
    a given layer stage pauses that pass at the next boundary (after a whole layer, or
    between a layer's attention and its MoE block); 2. the same step() returns the LS
    request's first token and no BE token; 3. the next step lets the LS decode join the
    paused batch and resumes it where it stopped: the BE rows go through the lower layers
    exactly once (no recomputation) and the upper layers once, merged with the LS row;
    4. the pass log records the LS catch-up as a part pass of its own and the merged pass
    with its LS row; 5. every request's tokens equal HF generate() for it alone."""
    folder = tiny_models[kind]
    engine = make_engine({"m": (kind, folder)}, device, preemption=PreemptionMode.EXPERT)
    be = make_requests(3, max_tokens=8, seed=20)
    ls = dataclasses.replace(make_requests(1, max_tokens=6, seed=21)[0], request_id="ls",
                             latency_sensitive=True)
    for r in be:
        engine.add_request(r)
    got: dict[str, list[int]] = {}
    _collect(engine, got)  # BE prefill
    _collect(engine, got)  # one BE decode step
    layers = engine.model.model.layers
    hook = ArrivalHook(engine, getattr(layers[layer], stage), ls, rows=3)
    bottom, top = RowCounter(layers[0].self_attn), RowCounter(layers[-1].self_attn)

    assert _collect(engine, got) == ["ls"]
    assert hook.fired and engine.paused_stage == resume_at
    assert bottom.calls == [3, 1] and top.calls == [1]  # BE up to the pause; LS prefill whole
    hook.handle.remove()

    ids = _collect(engine, got)
    assert sorted(ids) == ["ls", *sorted(r.request_id for r in be)]
    assert engine.paused_stage is None
    # LS catch-up ran the bottom alone; BE rows did not pass layer 0 again; top merged.
    assert bottom.calls == [3, 1, 1] and top.calls == [1, 4]
    # The pass log tells the catch-up (a part of a pass) from the merged whole pass.
    catch_up = [rec for rec in engine.pass_log if rec.catch_up]
    assert [(rec.batch, rec.ls_rows, rec.prefill) for rec in catch_up] == [(1, 1, False)]
    merged = engine.pass_log[-1]
    assert (merged.batch, merged.ls_rows, merged.pauses, merged.catch_up) == (4, 1, 1, False)

    got_rest = tokens_of(run_until_idle(engine))
    for r in [*be, ls]:
        assert got[r.request_id] + got_rest.get(r.request_id, []) == reference_tokens(folder, device, r)


def test_operations_on_a_paused_batch(tiny_models, device):
    """This test verifies that: 1. evict and swap_out work on sequences inside a paused
    pass (they leave it; the rest still resumes); 2. abort of one leaves the others; 3.
    after requeue / swap_in every request still equals generate()."""
    folder = tiny_models["mixtral"]
    engine = make_engine({"m": ("mixtral", folder)}, device, preemption=PreemptionMode.EXPERT)
    be = make_requests(4, max_tokens=9, seed=22)
    ls = dataclasses.replace(make_requests(1, max_tokens=4, seed=23)[0], request_id="ls",
                             latency_sensitive=True)
    for r in be:
        engine.add_request(r)
    got: dict[str, list[int]] = {}
    _collect(engine, got)
    _collect(engine, got)
    ArrivalHook(engine, engine.model.model.layers[2].mlp, ls, rows=4)
    assert _collect(engine, got) == ["ls"] and engine.paused_stage == (3, "attention")

    kept = engine.evict(be[0].request_id)
    engine.swap_out(be[1].request_id)
    engine.abort(be[2].request_id)
    assert engine.paused_stage == (3, "attention")
    rest = tokens_of(run_until_idle(engine))
    engine.add_request(dataclasses.replace(be[0], generated_token_ids=kept))
    engine.swap_in(be[1].request_id)
    for rid, toks in tokens_of(run_until_idle(engine)).items():
        rest.setdefault(rid, []).extend(toks)
    for r in [be[0], be[1], be[3], ls]:
        assert got.get(r.request_id, []) + rest.get(r.request_id, []) == reference_tokens(folder, device, r)
    assert be[2].request_id not in rest
    assert engine.stats().kv_used_tokens == 0


def test_max_pause_bounds_starvation(tiny_models, device):
    """This test verifies that: 1. while LS requests keep arriving, a paused BE pass lets
    LS work run only until it has waited max_pause_s (it is not paused beyond that, give or
    take one LS pass); 2. then it resumes and runs to its end although LS work is still
    waiting, so BE tokens keep coming."""
    folder = tiny_models["mixtral"]
    engine = make_engine({"m": ("mixtral", folder)}, device, preemption=PreemptionMode.EXPERT,
                         max_pause_s=0.05, max_batch_size=2)
    be = make_requests(2, max_tokens=30, seed=24)
    for r in be:
        engine.add_request(r)
    got: dict[str, list[int]] = {}
    _collect(engine, got)
    counter = iter(range(10_000))

    def flood(module, args, kwargs):  # noqa: ANN001, ANN202 - an LS arrival at every stage
        rid = f"ls{next(counter)}"
        engine.add_request(EngineRequest(rid, "m", [5, 6, 7], max_tokens=1, latency_sensitive=True))

    handle = engine.model.model.layers[1].mlp.register_forward_pre_hook(flood, with_kwargs=True)
    be_tokens_before = sum(len(got[r.request_id]) for r in be)
    ls_served = 0
    for _ in range(500):
        ids = _collect(engine, got)
        if any(rid.startswith("m-") for rid in ids):
            break
        ls_served += len(ids)
    handle.remove()
    assert sum(len(got[r.request_id]) for r in be) == be_tokens_before + 2
    record = [rec for rec in engine.pass_log if rec.batch == 2 and not rec.prefill][-1]
    # Paused, LS work ran (several requests) until the bound, then the BE pass finished
    # while LS requests were still arriving and waiting.
    assert record.pauses >= 1 and ls_served >= 2
    assert 0.05 <= record.paused_s < 0.05 + 1.0
    assert engine.has_work()
    run_until_idle(engine)


def test_iteration_and_fcfs_modes(tiny_models, device):
    """This test verifies that: 1. under ITERATION an LS request arriving mid-pass does
    not pause it, and its first token comes in the next step, before any BE token of
    that iteration, even with the batch full; 2. under NONE (FCFS) the same LS request
    waits until a batch slot frees."""
    folder = tiny_models["mixtral"]
    for mode in (PreemptionMode.ITERATION, PreemptionMode.NONE):
        engine = make_engine({"m": ("mixtral", folder)}, device, preemption=mode, max_batch_size=2)
        be = make_requests(2, max_tokens=6, seed=25)
        ls = dataclasses.replace(make_requests(1, max_tokens=3, seed=26)[0], request_id="ls",
                                 latency_sensitive=True)
        for r in be:
            engine.add_request(r)
        got: dict[str, list[int]] = {}
        _collect(engine, got)
        ArrivalHook(engine, engine.model.model.layers[3].mlp, ls, rows=2)
        assert sorted(_collect(engine, got)) == sorted(r.request_id for r in be)  # not paused
        if mode is PreemptionMode.ITERATION:
            assert _collect(engine, got) == ["ls"]
        else:
            steps_until_ls = 0
            while "ls" not in _collect(engine, got):
                steps_until_ls += 1
            assert steps_until_ls == 4  # the BE requests must finish their 6 tokens first
        run_until_idle(engine)


def test_request_preemption_check_returns_early(tiny_models, device):
    """This test verifies that: 1. request_preemption_check() called while an EXPERT pass
    runs makes it stop at the next stage boundary and step() return with no tokens, even
    with no LS request waiting (so the worker can run an operation at once); 2. the next
    step resumes the pass where it stopped and the tokens still equal generate()."""
    folder = tiny_models["qwen2_moe"]
    engine = make_engine({"m": ("qwen2_moe", folder)}, device, preemption=PreemptionMode.EXPERT)
    reqs = make_requests(2, max_tokens=5, seed=27)
    for r in reqs:
        engine.add_request(r)
    got: dict[str, list[int]] = {}
    _collect(engine, got)
    handle = engine.model.model.layers[6].self_attn.register_forward_pre_hook(
        lambda module, args: engine.request_preemption_check())
    assert _collect(engine, got) == [] and engine.paused_stage == (6, "moe")
    handle.remove()
    assert sorted(_collect(engine, got)) == sorted(r.request_id for r in reqs)
    rest = tokens_of(run_until_idle(engine))
    for r in reqs:
        assert got[r.request_id] + rest.get(r.request_id, []) == reference_tokens(folder, device, r)
