"""Stages 3-4 of the NOTE: the program over the groups at risk and their candidates
(program.py states it as a MILP), its MIP start, the solve, and the decision it gives."""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from qlmserve.controller.estimator import QueueCursor
from qlmserve.controller.policies.op_rules import (
    PREEMPTION_MODES,
    ModelChange,
    ls_requests_needing_slots,
    protection_cost_s,
    protection_mechanism,
    removal_mechanism,
    victim_cost_s,
)
from qlmserve.controller.policies.qlm.decision import Decision, Score
from qlmserve.controller.policies.qlm.program import (
    Option,
    Pair,
    Program,
    ProgramGroup,
    ProgramModel,
    ProgramSolution,
    ProgramWorker,
    build_model,
    solve_program,
)
from qlmserve.controller.policies.qlm.risk import candidates_of
from qlmserve.controller.policies.qlm.tick import Tick
from qlmserve.controller.snapshot import GroupState, WorkerState
from qlmserve.operations.batching import PreemptionMode

# Below this many (group, worker) pairs every group enters the program and every worker is
# a candidate (the program is then exact up to its order restriction; see the NOTE).
FULL_PROGRAM_PAIRS = 48
# With drop_hopeless off, a group the program cannot make meet its SLO still keeps its
# deadline place unless that costs another group its SLO (Program.place_reward).
PLACE_REWARD = 0.01


@dataclass
class ProgramContext:
    program: Program
    kept: dict[str, list[str]]  # worker -> kept queue (groups outside the program)
    group_ids: list[str]
    worker_ids: list[str]
    protect_of: dict[str, str]  # worker -> mechanism its p variable stands for
    unplaced: dict[str, str]  # groups at risk with no feasible pair -> the worker whose tail they go to
    full: bool = False  # every group and worker is in the program (a small instance)


@dataclass
class Built:
    ctx: ProgramContext
    model: ProgramModel


def options(tick: Tick, w: WorkerState, models: set[str], base_models: set[str]) -> list[Option]:
    """A worker with no kept queue: keep its model (index 0), or swap to another."""
    current = w.loading_model or w.active_model
    opts = [Option("stay", current, 0.0, None)]
    running = [r for r in w.running if not r.swapped]
    swap_ok = "model_swap" in tick.ops
    for m in sorted(models):
        if m == current or not w.can_serve(m):
            continue
        if swap_ok or current is None or m in base_models:
            change = None if running or w.loading_model else ModelChange(m)
            opts.append(Option(f"{'drain' if running else 'load'}:{m}", m, 0.0, change))
        mech = removal_mechanism(tick.cfg, w, running, model_change=True) if swap_ok else None
        if mech is not None and w.loading_model is None:
            lost = sum(victim_cost_s(w, r, mech) for r in running)
            opts.append(Option(f"clear:{m}", m, lost * tick.value_rate(w), ModelChange(m, mech)))
    return opts


def program(tick: Tick, base: Decision, score: Score, at_risk: list[str], cap_pairs: int) -> Built | None:
    groups_n, workers_n = len(tick.groups), len(tick.workers)
    full = groups_n * workers_n <= FULL_PROGRAM_PAIRS
    k = workers_n if full else tick.policy.candidates
    risky = list(tick.groups) if full else at_risk[: max(1, cap_pairs // (k + 1))]
    risky_set = set(risky)
    cand = {gid: candidates_of(tick, tick.groups[gid], k) for gid in risky}
    cand = {gid: ws for gid, ws in cand.items() if ws}
    if not cand:
        return None
    kept0 = {wid: [gid for gid in q if gid not in risky_set] for wid, q in base.queues.items()}

    # Kept groups the risky ones could push past their deadline join the program.
    pulled: dict[str, str] = {}
    for wid in {w.worker_id for ws in cand.values() for w in ws}:
        q = kept0.get(wid, [])
        if not q:
            continue
        incoming = sorted(((tick.groups[gid].deadline, tick.add_mean(gid, wid)) for gid, ws in cand.items()
                           if any(w.worker_id == wid for w in ws)))
        for gid in q:
            f = score.forecasts.get(gid)
            if f is None:
                continue
            margin = f.slack_s[-1] - f.timing.last.quantile(tick.beta)
            push = 1.5 * sum(a for dl, a in incoming if dl <= tick.groups[gid].deadline + 1e-9)
            if push > margin:
                pulled[gid] = wid
    for gid, wid in pulled.items():
        cand[gid] = [tick.workers[wid]]
    return build(tick, base, cand, full)


def build(tick: Tick, base: Decision, cand: dict[str, list[WorkerState]], full: bool) -> Built | None:
    """The program for these candidates. A candidate group with no feasible pair (it
    cannot meet its SLO on any candidate, or no candidate can take its model) stays
    out of the program and is served last (`ProgramContext.unplaced`)."""
    in_program = set(cand)
    kept = {wid: [gid for gid in q if gid not in in_program] for wid, q in base.queues.items()}
    base_worker = {gid: wid for wid, q in base.queues.items() for gid in q}
    gids = sorted(cand, key=lambda gid: (tick.groups[gid].deadline, gid))
    gindex = {gid: i for i, gid in enumerate(gids)}
    wids = sorted({w.worker_id for ws in cand.values() for w in ws})
    windex = {wid: j for j, wid in enumerate(wids)}
    models = {tick.groups[gid].model for gid in gids}

    pworkers: list[ProgramWorker] = []
    protect_of: dict[str, str] = {}
    starts: dict[str, list[QueueCursor]] = {}
    for wid in wids:
        w = tick.workers[wid]
        wm = tick.fc.workers[wid]
        fixed = bool(kept.get(wid))
        if fixed:
            cur = tick.fc.cursor(wid)
            states = [replace(cur)]
            for gid in kept[wid]:
                cur.push(tick.fc.groups[gid])
                states.append(replace(cur))
            starts[wid] = states
            opts = [Option("kept", None, 0.0, None)]
        else:
            base_models = {tick.groups[g].model for g in base.queues.get(wid, [])}
            opts = options(tick, w, models, base_models)
        mech = protection_mechanism(tick.cfg, w)
        ls_here = [gid for gid, ws in cand.items() if tick.groups[gid].latency_sensitive and w in ws]
        pcost, cap = 0.0, None
        if mech is not None and ls_here:
            protect_of[wid] = mech
            pcost = protection_cost_s(tick.cfg, w, [tick.groups[g] for g in ls_here], wm.slots, mech) * tick.value_rate(w)
            cap = tick.cfg.planner.max_pause_s if mech == PreemptionMode.EXPERT else None
        else:
            mech = None
        pworkers.append(ProgramWorker(wid, opts, fixed, mech, pcost, cap, wm.step_s / wm.slots))

    pairs: list[Pair] = []
    index: dict[tuple[str, str], int] = {}
    for gid in gids:
        g = tick.groups[gid]
        gw = tick.fc.groups[gid]
        for w in cand[gid]:
            wid = w.worker_id
            j = windex[wid]
            pw = pworkers[j]
            wm = tick.fc.workers[wid]
            ref: dict[int, tuple[float, float]] = {}
            ref_ls = None
            state = None
            if pw.fixed:
                at = insertion(tick, g, kept[wid], starts[wid], base.queues[wid] if base_worker.get(gid) == wid
                                     else None, in_program)
                if at is None:
                    continue
                state = starts[wid][at]
                t = state.timing(gw).last
                ref[0] = (t.mean_s, t.var_s2)
                if pw.protect is not None:
                    t = replace(state, protect_ls=True).timing(gw).last
                    ref_ls = (t.mean_s, t.var_s2)
                index[gid, wid] = at
            else:
                for kk, opt in enumerate(pw.options):
                    if opt.model != g.model:
                        continue
                    cleared = opt.change is not None and opt.change.clear is not None
                    t = tick.fc.cursor(wid, False, cleared).timing(gw).last
                    ref[kk] = (t.mean_s, t.var_s2)
                if not ref:
                    continue
                if pw.protect is not None and 0 in ref:
                    t = tick.fc.cursor(wid, True).timing(gw).last
                    ref_ls = (t.mean_s, t.var_s2)
                index[gid, wid] = 0
                if 0 in ref:
                    state = tick.fc.cursor(wid)
            work = gw.work
            free_s = 0.0
            if state is not None:  # slots still free at the reference absorb work ahead
                free = state.table.free - state.queued.count - (work.count - 1)
                free_s = max(0, free) * state.table.item_mean * wm.step_s / wm.slots
            pairs.append(Pair(
                gi=gindex[gid], wj=j, order=(index[gid, wid], g.deadline, gid),
                add_mean=tick.add_mean(gid, wid), add_var=work.var * (wm.step_s / wm.slots) ** 2,
                prefill_s=wm.prefill_s(work), free_s=free_s, ref=ref, ref_ls=ref_ls,
                current=base_worker.get(gid) == wid))
    if not pairs:
        return None
    with_pair = sorted({pr.gi for pr in pairs})
    unplaced = [gid for gid in gids if gindex[gid] not in set(with_pair)]
    if unplaced:
        remap = {old: new for new, old in enumerate(with_pair)}
        gids = [gids[i] for i in with_pair]
        pairs = [replace(pr, gi=remap[pr.gi]) for pr in pairs]
    pgroups = [ProgramGroup(gid, tick.value[gid], tick.fc.groups[gid].slack_s[-1],
                            tick.groups[gid].latency_sensitive, tick.fc.groups[gid].work.tokens,
                            tick.fc.groups[gid].work.var) for gid in gids]
    planner = tick.cfg.planner
    program = Program(planner.method, tick.beta, pgroups, pworkers, pairs, scenarios=planner.scenarios,
                      seed=int(tick.snap.now * 1000) % (2**31),
                      place_reward=0.0 if planner.drop_hopeless else PLACE_REWARD)
    ctx = ProgramContext(program, kept, gids, wids, protect_of,
                          {gid: base_worker.get(gid) or cand[gid][0].worker_id for gid in unplaced}, full)
    model = build_model(program)
    meter = tick.policy.clock.meter
    meter.charge("pair", len(pairs))
    return Built(ctx, model)


def insertion(tick: Tick, g: GroupState, kept: list[str], states: list[QueueCursor], own_queue: list[str] | None,
               in_program: set[str]) -> int | None:
    """Where `g` goes among a worker's kept groups: where it was (its own worker), else
    at its deadline among the groups that can still meet theirs; moved earlier if
    needed so that it joins a block of its own model (no extra model swap)."""
    if own_queue is not None:
        return sum(1 for h in own_queue[: own_queue.index(g.group_id)] if h not in in_program)
    at = next((i for i, h in enumerate(kept) if h in tick.hopeless or tick.groups[h].deadline > g.deadline),
              len(kept))
    for i in range(at, -1, -1):
        if states[i].model in (g.model, None) or (i < len(kept) and tick.groups[kept[i]].model == g.model):
            return i
    return None


def mip_start(tick: Tick, built: Built, base: Decision, base_score: Score) -> np.ndarray:
    """The program's columns for the base plan: every group where the base plan has it,
    meeting its SLO where the base plan's forecast says so and the program's
    (conservative) rows agree. A feasible incumbent as good as the base plan lets
    HiGHS prune from its first node."""
    m = built.model
    ctx = built.ctx
    where = {gid: wid for wid, q in base.queues.items() for gid in q}
    start = np.zeros(m.num_cols)
    meets = base_score.forecasts
    ys = set()
    stays = {(pr.gi, pr.wj) for pr in ctx.program.pairs if 0 in pr.ref}  # option 0: the worker keeps its model
    for (i, j), c in m.vars.x.items():
        gid = ctx.group_ids[i]
        if where.get(gid) == ctx.worker_ids[j] and (i, j) in stays:
            start[c] = 1.0
            f = meets.get(gid)
            if f is not None and f.meets(tick.beta):
                y = m.vars.y[i, j]
                start[y] = 1.0
                ys.add(y)
    for (j, k), c in m.vars.u.items():
        start[c] = 1.0 if k == 0 else 0.0
    for _ in range(3):  # y only tightens the rows it is in: drop those of violated rows
        bad = m.violated(start)
        if not len(bad):
            break
        for r in bad:
            for c in m.row_cols(int(r)):
                if c in ys:
                    start[c] = 0.0
    return start


def run_solver(tick: Tick, built: Built, base: Decision, limit_s: float,
                  base_score: Score) -> tuple[ProgramSolution | None, str]:
    m = built.model
    start = mip_start(tick, built, base, base_score)
    try:
        sol = solve_program(m, limit_s, start=start, clock=tick.policy.clock)
    except RuntimeError as exc:
        return None, f"solver error: {exc}"
    if sol is None:
        return None, f"no integer solution within {limit_s * 1e3:.0f} ms"
    return sol, ""


def assemble(tick: Tick, built: Built, sol: ProgramSolution) -> Decision:
    ctx = built.ctx
    program = ctx.program
    inserts: dict[str, list[tuple[tuple, str]]] = {}
    order_of = {(pr.gi, pr.wj): pr.order for pr in program.pairs}
    for gi, wj in sol.placed.items():
        inserts.setdefault(ctx.worker_ids[wj], []).append((order_of[gi, wj], ctx.group_ids[gi]))
    queues: dict[str, list[str]] = {}
    for wid in tick.workers:
        kept = ctx.kept.get(wid, [])
        ins = sorted(inserts.get(wid, []))
        q: list[str] = []
        k = 0
        for i, gid in enumerate(kept):
            while k < len(ins) and ins[k][0][0] <= i:
                q.append(ins[k][1])
                k += 1
            q.append(gid)
        q.extend(gid for _, gid in ins[k:])
        queues[wid] = q
    # Groups queued nowhere (they miss their SLO wherever they would go): served last.
    tail = dict(ctx.unplaced)
    placed = {ctx.group_ids[gi] for gi in sol.placed}
    for pr in program.pairs:
        gid = ctx.group_ids[pr.gi]
        if gid not in placed and (pr.current or gid not in tail):
            tail[gid] = ctx.worker_ids[pr.wj]
    for gid, wid in sorted(tail.items(), key=lambda kv: (tick.groups[kv[0]].deadline, kv[0])):
        queues.setdefault(wid, []).append(gid)
    changes: dict[str, ModelChange] = {}
    cost = 0.0
    for wj, k in sol.options.items():
        pw = program.workers[wj]
        opt = pw.options[k]
        cost += opt.cost
        if opt.change is not None:
            changes[pw.worker_id] = opt.change
    protected = {}
    for wj in sol.protected:
        wid = program.workers[wj].worker_id
        mech = ctx.protect_of[wid]
        w = tick.workers[wid]
        q = [tick.groups[g] for g in queues.get(wid, [])]
        slots = tick.fc.workers[wid].slots
        if mech not in PREEMPTION_MODES and not ls_requests_needing_slots(w, q, slots, mech):
            continue  # free slots suffice: nothing to evict, nothing to credit
        protected[wid] = mech
        cost += protection_cost_s(tick.cfg, w, q, slots, mech) * tick.value_rate(w)
    return Decision(queues, protected, changes, cost)
