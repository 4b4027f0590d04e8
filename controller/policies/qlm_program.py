"""The QLM policy's stochastic program: its data, the PuLP model, and the solve.

The policy (qlm.py) decides which groups enter the program and computes every
coefficient from the RWT estimator; this module only states the mixed-integer
program and solves it with HiGHS in-process. See QlmPolicy.solve for the algorithm.

Variables (all binary), named so that `.lp` dumps read:
  x_g{i}_w{j}      group i is queued on worker j, at its pair's `order` among the
                   program groups there (at most one worker; a group queued nowhere is
                   served last and delays no one)
  y_g{i}_w{j}      group i meets its SLO on worker j (y <= x)
  u_w{j}_o{k}      worker j takes option k (its model for this plan: stay, or drain /
                   clear the running batch and load another model); one per worker
  p_w{j}           worker j protects latency-sensitive groups from its best-effort
                   running work (expert-level preemption, eviction or KV swap)
  z_g{i}_w{j}_s{s} (SAA) group i meets its SLO on worker j in scenario s

Constraints, per candidate pair (i, j):
  chance: TTFT beta-quantile of the group's last request <= its slack, where the
          quantile is the reference quantile (nothing of the program ahead) plus what
          the program groups ahead add: their mean and, linearised, their variance
          (the standard deviation is concave in the variance, so its tangent at the
          reference is an upper bound: the constraint stays conservative);
  saa:    the same with the TTFT drawn in each scenario, one z per scenario.
"""

from __future__ import annotations

import math
import re
import time
from dataclasses import dataclass, field

import numpy as np
import pulp
from scipy import special

from qlmserve.controller.estimator import sample_sum
from qlmserve.controller.policies.op_rules import ModelChange


@dataclass(frozen=True)
class Option:
    """What a worker serves in this plan."""

    key: str  # "stay", "drain:<model>", "clear:<model>", "load:<model>"
    model: str | None  # model of the groups it can take
    cost: float  # objective units (lost work of cleared requests)
    change: ModelChange | None  # the swap carried out now, if any


@dataclass
class ProgramWorker:
    worker_id: str
    options: list[Option]  # one for a worker that keeps its queue ("fixed")
    fixed: bool  # its kept queue decides its model; no u variables
    protect: str | None = None  # protection mechanism available (op_rules EXPERT / EVICT / SWAP)
    protect_cost: float = 0.0  # objective units when protected
    pause_cap_s: float | None = None  # expert preemption: LS work here must fit max_pause_s
    step_per_slot: float = 0.0  # seconds of TTFT one decode token of work ahead adds (step / slots)


@dataclass
class Pair:
    """Group i on worker j."""

    gi: int
    wj: int
    order: tuple  # place among the program groups on this worker (smaller is ahead)
    add_mean: float  # seconds it adds to the TTFT of program groups behind it here (decode + prefill)
    add_var: float  # variance it adds
    prefill_s: float  # its prefill passes here (part of add_mean; added even while slots are free)
    ref: dict[int, tuple[float, float]]  # option index -> reference TTFT (mean, var) of its last request
    ref_ls: tuple[float, float] | None = None  # with protection (option of index 0 only)
    free_s: float = 0.0  # decode seconds of work ahead that free slots absorb at the reference
    current: bool = False  # the group sits on this worker now


@dataclass
class ProgramGroup:
    group_id: str
    value: float  # objective weight: class weight x requests
    slack_s: float  # the oldest request's deadline - now
    latency_sensitive: bool
    tokens_mean: float  # total decode tokens of its requests (for SAA draws)
    tokens_var: float


@dataclass
class Program:
    method: str  # "chance" | "saa"
    beta: float
    groups: list[ProgramGroup]
    workers: list[ProgramWorker]
    pairs: list[Pair]
    scenarios: int = 16
    seed: int = 0
    # Objective units per unit of value for queueing a group that misses its SLO in deadline
    # order rather than last (drop_hopeless off); small against any group meeting its SLO.
    place_reward: float = 0.0
    stickiness: float = 1e-3  # objective units per group kept on its worker (break ties without churn)


@dataclass
class ProgramVars:
    y: dict[tuple[int, int], pulp.LpVariable] = field(default_factory=dict)
    x: dict[tuple[int, int], pulp.LpVariable] = field(default_factory=dict)
    u: dict[tuple[int, int], pulp.LpVariable] = field(default_factory=dict)
    p: dict[int, pulp.LpVariable] = field(default_factory=dict)
    z: dict[tuple[int, int, int], pulp.LpVariable] = field(default_factory=dict)


@dataclass
class ProgramSolution:
    status: str  # "optimal" | "feasible" (time limit with an incumbent)
    objective: float
    on_time: dict[int, int]  # group index -> worker index (y = 1)
    placed: dict[int, int]  # group index -> worker index (x = 1; on_time when no x)
    options: dict[int, int]  # worker index -> option index
    protected: set[int]
    solve_s: float


_ILLEGAL = re.compile(r"[^A-Za-z0-9_]")


def _tag(s: str) -> str:
    return _ILLEGAL.sub("_", s)[:24]


def _expr(terms: list[tuple[pulp.LpVariable, float]], constant: float = 0.0) -> pulp.LpAffineExpression:
    """A linear expression that sums the coefficients of repeated variables
    (pulp.LpAffineExpression built from a list keeps only the last one)."""
    coef: dict[pulp.LpVariable, float] = {}
    for var, c in terms:
        coef[var] = coef.get(var, 0.0) + c
    return pulp.LpAffineExpression(list(coef.items()), constant=constant)


def _quantile_terms(mean: float, var: float, beta: float) -> tuple[float, float, float]:
    """(beta-quantile, its z-score, sigma) of a TTFT with these moments, gamma-shaped like
    WaitEstimate.quantile (normal when the shape is large)."""
    sd = math.sqrt(max(var, 0.0))
    q = _draw((mean, var), beta)
    if sd <= 1e-12 or mean <= 0:
        return q, _normal_z(beta), max(sd, 1e-6)
    return q, (q - mean) / sd, sd


def _normal_z(beta: float) -> float:
    return float(special.ndtri(beta))


def build_model(program: Program) -> tuple[pulp.LpProblem, ProgramVars]:
    """The program as a PuLP problem (maximise)."""
    prob = pulp.LpProblem(f"qlm_{program.method}", pulp.LpMaximize)
    v = ProgramVars()
    G, W = program.groups, program.workers
    by_w: dict[int, list[Pair]] = {}
    for pr in program.pairs:
        by_w.setdefault(pr.wj, []).append(pr)
    for prs in by_w.values():
        prs.sort(key=lambda pr: pr.order)

    for j, w in enumerate(W):
        if not w.fixed:
            for k, opt in enumerate(w.options):
                v.u[j, k] = pulp.LpVariable(f"u_w{j}_o{k}_{_tag(w.worker_id)}_{_tag(opt.key)}", cat="Binary")
            prob += pulp.lpSum(v.u[j, k] for k in range(len(w.options))) == 1, f"one_option_w{j}"
        if w.protect is not None:
            v.p[j] = pulp.LpVariable(f"p_w{j}_{_tag(w.worker_id)}", cat="Binary")
            if not w.fixed:  # protection is about the running batch: only when the worker keeps it
                prob += v.p[j] <= v.u[j, 0], f"protect_needs_stay_w{j}"
    for pr in program.pairs:
        i, j = pr.gi, pr.wj
        name = f"g{i}_w{j}_{_tag(G[i].group_id)}"
        v.y[i, j] = pulp.LpVariable(f"y_{name}", cat="Binary")
        v.x[i, j] = pulp.LpVariable(f"x_{name}", cat="Binary")
        prob += v.y[i, j] <= v.x[i, j], f"meet_needs_place_{name}"
        if not W[j].fixed:
            prob += v.x[i, j] <= pulp.lpSum(v.u[j, k] for k in pr.ref), f"model_{name}"

    pairs_of: dict[int, list[Pair]] = {}
    for pr in program.pairs:
        pairs_of.setdefault(pr.gi, []).append(pr)
    for i, prs in pairs_of.items():
        prob += pulp.lpSum(v.x[pr.gi, pr.wj] for pr in prs) <= 1, f"one_place_g{i}"

    ahead_var = v.x  # a queued group delays those behind it, whether it meets its SLO or not
    if program.method == "saa":
        _saa_constraints(prob, program, v, by_w, ahead_var)
    else:
        _chance_constraints(prob, program, v, by_w, ahead_var)

    # Expert-level preemption pauses the best-effort batch only for max_pause_s.
    for j, w in enumerate(W):
        if w.protect == "expert" and w.pause_cap_s is not None and j in by_w:
            ls = [pr for pr in by_w[j] if G[pr.gi].latency_sensitive]
            if ls:
                total = sum(pr.add_mean for pr in ls)
                prob += (pulp.lpSum(pr.add_mean * v.y[pr.gi, j] for pr in ls)
                         <= w.pause_cap_s + total * (1 - v.p[j])), f"pause_cap_w{j}"

    terms = []
    if program.method == "saa":
        s_n = program.scenarios
        for (i, j, _s), var in v.z.items():
            terms.append((var, G[i].value / s_n))
    else:
        for (i, j), var in v.y.items():
            terms.append((var, G[i].value))
    for pr in program.pairs:
        if pr.current:
            terms.append((ahead_var[pr.gi, pr.wj], program.stickiness))
        if program.place_reward:
            terms.append((v.x[pr.gi, pr.wj], program.place_reward * G[pr.gi].value))
    for (j, k), var in v.u.items():
        if W[j].options[k].cost:
            terms.append((var, -W[j].options[k].cost))
    for j, var in v.p.items():
        if W[j].protect_cost:
            terms.append((var, -W[j].protect_cost))
    prob += _expr(terms), "weighted_requests_meeting_slo"
    return prob, v


def _ref_terms(program: Program, v: ProgramVars, pr: Pair, ref_q: dict[int, float], ls_q: float | None
               ) -> tuple[list, float, float]:
    """The pair's reference quantile (ref_q: per option of its worker; ls_q: with
    protection) as linear terms in the worker's option and protection plus a constant,
    and the largest value it can take."""
    w = program.workers[pr.wj]
    terms: list[tuple[pulp.LpVariable, float]] = []
    if w.fixed:
        const = hi = ref_q[0]
    else:
        const = 0.0
        terms = [(v.u[pr.wj, k], q) for k, q in ref_q.items()]
        hi = max(ref_q.values())
    if ls_q is not None and pr.wj in v.p and program.groups[pr.gi].latency_sensitive and 0 in ref_q:
        delta = max(0.0, ref_q[0] - ls_q)
        if delta > 0:
            terms.append((v.p[pr.wj], -delta))
    return terms, const, hi


def _add_le(prob: pulp.LpProblem, terms: list[tuple[pulp.LpVariable, float]], rhs: float, name: str) -> None:
    """prob += sum(terms) <= rhs, built once (repeated variables summed)."""
    prob.addConstraint(pulp.LpConstraint(_expr(terms), sense=pulp.LpConstraintLE, rhs=rhs, name=name), name)


def _chance_constraints(prob, program: Program, v: ProgramVars, by_w, ahead_var) -> None:
    beta = program.beta
    for j, prs in by_w.items():
        for idx, pr in enumerate(prs):
            i = pr.gi
            ahead = prs[:idx]
            # sd(V) <= sd(V1) + (V - V1) / (2 sd(V1)) for every V (the square root is concave):
            # linearised at V1, half-way through the variance the program groups ahead can add,
            # the chance constraint stays conservative and is tight for a typical queue.
            q_terms = {k: _quantile_terms(m, s2, beta) for k, (m, s2) in pr.ref.items()}
            z = max(t[1] for t in q_terms.values())
            v_ref = min(t[2] for t in q_terms.values()) ** 2
            v1 = max(v_ref + 0.5 * sum(h.add_var for h in ahead), 1e-6)
            sd1 = math.sqrt(v1)
            slope = z / (2.0 * sd1)
            offset = z * (sd1 - v1 / (2.0 * sd1) + v_ref / (2.0 * sd1) - math.sqrt(v_ref))  # tangent at V1 vs sd(V_ref)
            ref_q = {k: t[0] + offset for k, t in q_terms.items()}
            ls_q = _quantile_terms(*pr.ref_ls, beta)[0] + offset if pr.ref_ls is not None else None
            ref, const, hi = _ref_terms(program, v, pr, ref_q, ls_q)
            slack = program.groups[i].slack_s
            # Decode work ahead (and its variance) delays the group once the free slots are
            # used up: a max with zero, as two constraints; prefill passes always add.
            always = [(ahead_var[h.gi, j], h.prefill_s) for h in ahead]
            decode = [(ahead_var[h.gi, j], h.add_mean - h.prefill_s + slope * h.add_var) for h in ahead]
            big_m = max(0.0, hi + sum(max(0.0, h.add_mean + slope * h.add_var) for h in ahead) - slack)
            meet = [(v.y[i, j], big_m)]
            _add_le(prob, ref + always + decode + meet, slack + big_m - const + pr.free_s, f"slo_g{i}_w{j}")
            if pr.free_s > 0 and ahead:
                _add_le(prob, ref + always + meet, slack + big_m - const, f"slo_free_g{i}_w{j}")


def _draw(mv: tuple[float, float], u: float) -> float:
    """The u-quantile of a TTFT with these moments (gamma-shaped, normal for large shapes)."""
    m, s2 = mv
    if s2 <= 1e-12 or m <= 0:
        return max(0.0, m)
    k = m * m / s2
    if k >= 400:
        return m + math.sqrt(s2) * _normal_z(u)
    return float(special.gammaincinv(k, u)) * s2 / m


# NOTE(chance-vs-saa): which method plans better, measured with
# `qlm bench-solver --compare-methods --instances 24 --draws 100 --load L` (seeded random
# snapshots, 200 ms budget, 16 scenarios; every plan judged by 100 exact replays of sampled
# output lengths, qlmserve/bench/replay.py; share of request weight meeting its TTFT):
#
#              load 0.7                        load 1.5
#   16 x 4     chance .873  saa .878  edf .872  chance .847  saa .885  edf .878
#   64 x 8     chance .927  saa .892  edf .928  chance .926  saa .892  edf .924
#
# SAA wins on small programs (16 x 4: every group and worker in the program, solved to
# optimality), most under overload (+0.038 +- 0.011, 13 wins to 0): its objective is the
# expected number of requests meeting the SLO, the quantity judged, while the chance
# program counts only groups made safe at beta and serves the rest last, giving up groups
# that still had a 30-80 % chance. On larger programs (64 x 8) chance wins (-0.035 +- 0.010
# for SAA): the SAA program is `scenarios` times larger, HiGHS stops at the time limit with
# an incumbent (or none), and 16 scenarios over-fit their own sample. Hence the default,
# method "chance", which scales; "saa" suits small fleets with budget to spare.


def _saa_constraints(prob, program: Program, v: ProgramVars, by_w, ahead_var) -> None:
    rng = np.random.default_rng(program.seed)
    S = program.scenarios
    G = program.groups
    # Decode tokens of every program group in every scenario (moment-matched gamma).
    tokens = sample_sum(np.array([g.tokens_mean for g in G]), np.array([g.tokens_var for g in G]), S, rng)
    # One uniform per worker and scenario: the references of the groups on one worker move
    # together (they share its running batch and kept queue).
    uni = rng.uniform(0.0005, 0.9995, size=(len(program.workers), S))
    for j, prs in by_w.items():
        w = program.workers[j]
        for idx, pr in enumerate(prs):
            i = pr.gi
            ahead = prs[:idx]
            always = [(ahead_var[h.gi, j], h.prefill_s) for h in ahead]
            for s in range(S):
                u_js = float(uni[j, s])
                ref_q = {k: _draw(mv, u_js) for k, mv in pr.ref.items()}
                ls_q = _draw(pr.ref_ls, u_js) if pr.ref_ls is not None else None
                ref, const, hi = _ref_terms(program, v, pr, ref_q, ls_q)
                decode = [(ahead_var[h.gi, j], float(tokens[s, h.gi]) * w.step_per_slot) for h in ahead]
                big_m = max(0.0, hi + sum(a for _, a in always + decode) - G[i].slack_s)
                zv = pulp.LpVariable(f"z_g{i}_w{j}_s{s}", cat="Binary")
                v.z[i, j, s] = zv
                _add_le(prob, [(zv, 1.0), (v.y[i, j], -1.0)], 0.0, f"scenario_needs_place_g{i}_w{j}_s{s}")
                meet = [(zv, big_m)]
                _add_le(prob, ref + always + decode + meet, G[i].slack_s + big_m - const + pr.free_s,
                        f"slo_g{i}_w{j}_s{s}")
                if pr.free_s > 0 and ahead:
                    _add_le(prob, ref + always + meet, G[i].slack_s + big_m - const, f"slo_free_g{i}_w{j}_s{s}")


class _WarmHiGHS(pulp.HiGHS):
    """pulp.HiGHS that hands the variables' initial values to HiGHS as a MIP start."""

    def callSolver(self, lp):  # noqa: N802 (PuLP's name)
        cols, vals = [], []
        for var in lp.variables():
            if var.varValue is not None:
                cols.append(var.index)
                vals.append(float(var.varValue))
        if cols:
            lp.solverModel.setSolution(len(cols), np.array(cols, dtype=np.int32), np.array(vals, dtype=np.float64))
        super().callSolver(lp)


def solve_program(program: Program, time_limit_s: float,
                  built: tuple[pulp.LpProblem, ProgramVars] | None = None) -> ProgramSolution | None:
    """Solve with HiGHS in-process; None when no integer-feasible solution was found in time.
    Variables with an initial value (setInitialValue) are handed to HiGHS as a MIP start."""
    t0 = time.perf_counter()
    prob, v = built if built is not None else build_model(program)
    solver = _WarmHiGHS(msg=False, timeLimit=max(1e-3, time_limit_s), gapRel=1e-4, threads=1)
    prob.solve(solver)
    status = pulp.LpStatus[prob.status]
    if status != "Optimal" or prob.sol_status not in (pulp.LpSolutionOptimal, pulp.LpSolutionIntegerFeasible):
        return None
    on = lambda var: var.varValue is not None and var.varValue > 0.5  # noqa: E731
    on_time = {i: j for (i, j), var in v.y.items() if on(var)}
    placed = {i: j for (i, j), var in v.x.items() if on(var)}
    options = {}
    for j, w in enumerate(program.workers):
        options[j] = 0 if w.fixed else next((k for k in range(len(w.options)) if on(v.u[j, k])), 0)
    protected = {j for j, var in v.p.items() if on(var)}
    return ProgramSolution(
        status="optimal" if prob.sol_status == pulp.LpSolutionOptimal else "feasible",
        objective=float(pulp.value(prob.objective) or 0.0), on_time=on_time, placed=placed,
        options=options, protected=protected, solve_s=time.perf_counter() - t0)
