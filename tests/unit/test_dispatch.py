"""Dispatch: from a plan's virtual queues to the requests each worker takes now."""

from __future__ import annotations

from dataclasses import replace

from qlmserve.controller.dispatch import dispatch
from qlmserve.controller.snapshot import ClusterSnapshot, GroupState, RunningRequest, WorkerState
from qlmserve.operations.batching import PreemptionMode
from qlmserve.operations.costs import WorkerProfile
from qlmserve.operations.ops import SetPreemption, SwapOut
from qlmserve.operations.plan import Plan

MODEL = "m"


def _worker(wid: str, running: int, slots: int = 4, model: str = MODEL) -> WorkerState:
    run = tuple(RunningRequest(f"{wid}-r{i}", "old", model, "batch", 100, 10, 512, False, 0.0, 1.0)
                for i in range(running))
    return WorkerState(wid, model, frozenset(), 10**6, 0, slots, run, WorkerProfile())


def _group(gid: str, size: int, ttft_s: float, ls: bool = False, model: str = MODEL) -> GroupState:
    return GroupState(gid, model, "c", tuple(f"{gid}-{i}" for i in range(size)), (0.0,) * size, (100,) * size,
                      (256,) * size, ttft_s, 0, 1.0, ls)


def _taken(assignments) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for a in assignments:
        out.setdefault(a.worker_id, []).append(a.request_id)
    return out


def test_free_slots_take_work_other_queues_cannot_start_now():
    """This test verifies that:
    1. each worker takes its own queue's requests first, in queue order, up to its free slots;
    2. a worker whose whole queue is served and still has free slots takes the requests that
       wait in other queues beyond what their workers can start now, next in their queue first
       (the plan's order is the policy's priority);
    3. it never takes a request of a model it does not hold."""
    snap = ClusterSnapshot(0.0, (_group("a", 3, 60.0), _group("b", 3, 10.0), _group("c", 2, 5.0, model="other")),
                           (_worker("w0", 3), _worker("w1", 1)), {}, {})
    plan = Plan({"w0": ["a", "b", "c"], "w1": []})
    got = _taken(dispatch(plan, snap, 8)[0])
    assert got["w0"] == ["a-0"]
    # w1 has 3 free slots: what w0 would start next (a's rest, then b); c is another model
    assert got["w1"] == ["a-1", "a-2", "b-0"]


def test_slots_freed_by_the_plans_swap_out_go_to_the_requests_it_dispatches():
    """This test verifies that a full worker whose plan swaps out two best-effort requests
    takes two latency-sensitive requests in the same tick (the worker runs the swap first)."""
    snap = ClusterSnapshot(0.0, (_group("ls", 3, 1.0, ls=True),), (_worker("w0", 4),), {}, {})
    plan = Plan({"w0": ["ls"]}, [SwapOut("w0", ("w0-r0", "w0-r1"))])
    assert _taken(dispatch(plan, snap, 4)[0]) == {"w0": ["ls-0", "ls-1"]}
    assert dispatch(Plan({"w0": ["ls"]}), snap, 4)[0] == []


def test_swapped_out_requests_resume_after_the_ls_head_and_before_queued_best_effort():
    """This test verifies that dispatch, every tick (kept plans too), resumes swapped-out
    requests into free slots after the latency-sensitive groups at the queue head and
    before the queued best-effort groups, oldest first."""
    w = _worker("w0", 1, slots=4)
    swapped = tuple(RunningRequest(f"s{i}", "old", MODEL, "batch", 100, 20, 512, False, float(i), 1.0, swapped=True)
                    for i in (2, 1))
    w = WorkerState("w0", MODEL, frozenset(), 10**6, 0, 4, w.running + swapped, WorkerProfile())
    snap = ClusterSnapshot(0.0, (_group("ls", 1, 1.0, ls=True), _group("be", 3, 600.0)), (w,), {}, {})
    assignments, ops = dispatch(Plan({"w0": ["ls", "be"]}, source="kept"), snap, 4)
    assert [(op.kind.value, op.request_ids) for op in ops] == [("swap_in", ("s1", "s2"))]
    assert _taken(assignments) == {"w0": ["ls-0"]}


def test_latency_sensitive_groups_take_room_beyond_a_full_batch_under_preemption_modes():
    """This test verifies that a worker whose batch is full takes the latency-sensitive group
    at its queue head beyond the batch limit when it runs (or the plan sets) ITERATION or
    EXPERT, as the engines admit them, but never a best-effort group; under NONE it takes none."""
    snap = ClusterSnapshot(0.0, (_group("ls", 2, 1.0, ls=True), _group("be", 2, 60.0)), (_worker("w0", 4),), {}, {})
    plan = Plan({"w0": ["ls", "be"]})
    assert dispatch(plan, snap, 4)[0] == []  # NONE: no room
    expert = replace(snap, workers=(replace(snap.workers[0], preemption_mode=PreemptionMode.EXPERT),))
    assert _taken(dispatch(plan, expert, 4)[0]) == {"w0": ["ls-0", "ls-1"]}
    planned = Plan({"w0": ["ls", "be"]}, [SetPreemption("w0", PreemptionMode.ITERATION)])
    assert _taken(dispatch(planned, snap, 4)[0]) == {"w0": ["ls-0", "ls-1"]}


def test_latency_sensitive_requests_take_room_anywhere_before_best_effort_work():
    """This test verifies that, under a plan that puts latency-sensitive work first:
    1. a latency-sensitive group planned on a full worker sends its requests to another
       worker of its model that has free slots, before that worker's own best-effort queue;
    2. requests of the group that find no room anywhere wait (none is lost or doubled);
    3. a plan without the flag (FCFS) keeps its queue order: the free slots go to the
       worker's own best-effort group."""
    snap = ClusterSnapshot(0.0, (_group("ls", 4, 2.0, ls=True), _group("be", 3, 100.0)),
                           (_worker("w0", 4), _worker("w1", 2)), {}, {})
    plan = Plan({"w0": ["ls"], "w1": ["be"]}, latency_sensitive_first=True)
    assert _taken(dispatch(plan, snap, 4)[0]) == {"w1": ["ls-0", "ls-1"]}
    fcfs = Plan({"w0": ["ls"], "w1": ["be"]})
    assert _taken(dispatch(fcfs, snap, 4)[0]) == {"w1": ["be-0", "be-1"]}


def test_late_requests_wait_behind_on_time_ones_under_late_last():
    """This test verifies that under Plan.late_last:
    1. a best-effort request whose deadline has passed is passed over while an on-time
       request of the worker's queue waits, even one behind it in the queue;
    2. late requests take the slots the on-time ones leave, in queue order;
    3. a worker backfilling from another queue takes that queue's on-time requests first;
    4. without late_last the queue order stands (the baselines' behaviour)."""
    late = GroupState("late", MODEL, "c", ("late-0", "late-1"), (0.0, 1.0), (100, 100), (256, 256), 10.0, 0, 1.0, False)
    fresh = GroupState("fresh", MODEL, "c", ("fresh-0",), (25.0,), (100,), (256,), 10.0, 0, 1.0, False)
    snap = ClusterSnapshot(30.0, (late, fresh), (_worker("w0", 3),), {}, {})
    assert _taken(dispatch(Plan({"w0": ["late", "fresh"]}, late_last=True), snap, 4)[0]) == {"w0": ["fresh-0"]}
    assert _taken(dispatch(Plan({"w0": ["late", "fresh"]}), snap, 4)[0]) == {"w0": ["late-0"]}
    roomy = ClusterSnapshot(30.0, (late, fresh), (_worker("w0", 1),), {}, {})
    assert _taken(dispatch(Plan({"w0": ["late", "fresh"]}, late_last=True), roomy, 4)[0]) == \
        {"w0": ["fresh-0", "late-0", "late-1"]}
    # w1 serves w0's queue beyond w0's (full) batch: the on-time request first
    two = ClusterSnapshot(30.0, (late, fresh), (_worker("w0", 4), _worker("w1", 3)), {}, {})
    assert _taken(dispatch(Plan({"w0": ["late", "fresh"], "w1": []}, late_last=True), two, 4)[0]) == \
        {"w1": ["fresh-0"]}


def test_latency_sensitive_requests_out_of_reach_are_served_late_under_late_last():
    """This test verifies that under Plan.late_last (QLM, drop_hopeless):
    1. a latency-sensitive request whose own prefill (12k tokens: 2.4 s at 0.2 ms a token)
       outlasts its 2 s target is not served first: it waits behind the on-time
       best-effort request of its worker's queue, while an in-reach latency-sensitive
       request beside it in the same group still goes first;
    2. it takes a slot the on-time requests leave;
    3. without late_last (strict priority) it is served first, as before."""
    ls = GroupState("ls", MODEL, "c", ("ls-0", "ls-1"), (29.9, 29.9), (12_000, 100), (16, 16), 2.0, 1, 1.0, True)
    be = GroupState("be", MODEL, "c", ("be-0",), (25.0,), (100,), (256,), 10.0, 0, 1.0, False)
    full = ClusterSnapshot(30.0, (ls, be), (_worker("w0", 2),), {}, {})
    plan = Plan({"w0": ["ls", "be"]}, latency_sensitive_first=True, late_last=True)
    assert _taken(dispatch(plan, full, 4)[0]) == {"w0": ["ls-1", "be-0"]}
    roomy = ClusterSnapshot(30.0, (ls, be), (_worker("w0", 0),), {}, {})
    assert _taken(dispatch(plan, roomy, 4)[0]) == {"w0": ["ls-1", "be-0", "ls-0"]}
    strict = Plan({"w0": ["ls", "be"]}, latency_sensitive_first=True)
    assert _taken(dispatch(strict, full, 4)[0])["w0"][:2] == ["ls-0", "ls-1"]


def _ls_worker(wid: str, pending_be: int, pending_ls: int = 0, mode=PreemptionMode.NONE) -> WorkerState:
    """A worker with 4 slots whose running requests have not produced a token yet: best-effort
    prompts of `pending_be` tokens and LS prompts of `pending_ls`."""
    run = tuple(RunningRequest(f"{wid}-{k}{i}", "old", MODEL, "c", n, 0, 16, k == "ls", 0.0, None)
                for k, n in (("be", pending_be), ("ls", pending_ls)) if n for i in range(1))
    return WorkerState(wid, MODEL, frozenset(), 10**6, 0, 4, run, WorkerProfile(), preemption_mode=mode,
                       max_prefill_tokens=2048)


def test_latency_sensitive_requests_go_where_their_prompt_is_prefilled_in_time():
    """This test verifies that under Plan.latency_sensitive_first, with prefill at 0.2 ms
    per token (WorkerProfile's default):
    1. an LS group's requests stay on their planned worker while it gives them their first
       token in time, and spread to other workers once the prompts already handed over
       there would make the next one late (they are prefilled one after another);
    2. a worker under NONE with 30k best-effort prompt tokens ahead is switched to
       ITERATION for an LS request that would miss behind them (may_preempt), and is not
       when the policy does not enable preemption (it then stays on its planned worker, where
       it waits least);
    3. the LS-only iterations that prefill the prompts ahead count an iteration's
       overhead per 4 x 2,048 tokens: with 9,860 tokens ahead a 100-token prompt takes
       two iterations, 2.002 s (late; 1.997 s as one), with 9,800 1.99 s (in time)."""
    ls = GroupState("ls", MODEL, "i", ("ls-0", "ls-1", "ls-2"), (10.0,) * 3, (4000,) * 3, (16,) * 3, 2.0, 2,
                    1.0, True)
    snap = ClusterSnapshot(10.0, (ls,), (_ls_worker("w0", 0, mode=PreemptionMode.ITERATION),
                                         _ls_worker("w1", 0, mode=PreemptionMode.ITERATION)), {}, {})
    got = _taken(dispatch(Plan({"w0": ["ls"], "w1": []}, latency_sensitive_first=True), snap, 4)[0])
    assert got == {"w0": ["ls-0", "ls-1"], "w1": ["ls-2"]}  # 4k, 8k tokens fit 2 s on w0; 12k not

    one = GroupState("one", MODEL, "i", ("one-0",), (10.0,), (2000,), (16,), 2.0, 2, 1.0, True)
    snap = ClusterSnapshot(10.0, (one,), (_ls_worker("w0", 30_000), _ls_worker("w1", 30_000, 9000)), {}, {})
    plan = Plan({"w0": ["one"], "w1": []}, latency_sensitive_first=True)
    assignments, ops = dispatch(plan, snap, 4, may_preempt=True)
    assert _taken(assignments) == {"w0": ["one-0"]}
    assert [(op.worker_id, op.mode) for op in ops if isinstance(op, SetPreemption)] == \
        [("w0", PreemptionMode.ITERATION)]
    assignments, ops = dispatch(plan, snap, 4)
    assert _taken(assignments) == {"w0": ["one-0"]}
    assert not [op for op in ops if isinstance(op, SetPreemption)]

    short = GroupState("short", MODEL, "i", ("short-0",), (10.0,), (100,), (16,), 2.0, 2, 1.0, True)
    for ahead, where in ((9_800, "w0"), (9_860, "w1")):
        snap = ClusterSnapshot(10.0, (short,), (_ls_worker("w0", 0, ahead, mode=PreemptionMode.ITERATION),
                                                _ls_worker("w1", 0, mode=PreemptionMode.ITERATION)), {}, {})
        got = _taken(dispatch(Plan({"w0": ["short"], "w1": []}, latency_sensitive_first=True), snap, 4)[0])
        assert got == {where: ["short-0"]}, ahead


def test_an_ls_request_counts_the_best_effort_iteration_in_flight():
    """This test verifies that dispatch counts the best-effort iteration a worker runs now
    (a 2,048-token prefill chunk and a decode step, 0.42 s at WorkerProfile's default):
    1. a 9,000-token LS prompt (1.805 s of prefill) planned on a worker under ITERATION
       that is prefilling best-effort prompts goes to an idle worker instead, where it
       meets 2 s;
    2. with only LS prompts prefilling there (the iteration is theirs, already counted as
       prompts ahead) nothing extra is counted: a 100-token LS prompt stays."""
    ls = GroupState("ls", MODEL, "i", ("ls-0",), (10.0,), (9_000,), (16,), 2.0, 2, 1.0, True)
    snap = ClusterSnapshot(10.0, (ls,), (_ls_worker("w0", 30_000, mode=PreemptionMode.ITERATION),
                                         _ls_worker("w1", 0, mode=PreemptionMode.ITERATION)), {}, {})
    got = _taken(dispatch(Plan({"w0": ["ls"], "w1": []}, latency_sensitive_first=True), snap, 4)[0])
    assert got == {"w1": ["ls-0"]}
    short = GroupState("short", MODEL, "i", ("short-0",), (10.0,), (100,), (16,), 2.0, 2, 1.0, True)
    snap = ClusterSnapshot(10.0, (short,), (_ls_worker("w0", 0, 8_000, mode=PreemptionMode.ITERATION),
                                            _ls_worker("w1", 0, mode=PreemptionMode.ITERATION)), {}, {})
    got = _taken(dispatch(Plan({"w0": ["short"], "w1": []}, latency_sensitive_first=True), snap, 4)[0])
    assert got == {"w0": ["short-0"]}
