"""The QLM policy's stochastic program: its data, the model, and the solve.

The policy (policy.py and program_build.py) decides which groups enter the program and computes every
coefficient from the RWT estimator; this module only states the mixed-integer
program and solves it with HiGHS in-process. See QlmPolicy.solve for the algorithm.

Variables (all binary), named so that `.lp` dumps (ProgramModel.to_pulp; `qlm bench-solver
--dump-lp DIR`) read:
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

import highspy
import numpy as np
import pulp
from scipy import special

from qlmserve.controller.estimator import sample_sum
from qlmserve.controller.policies.op_rules import ModelChange
from qlmserve.controller.solve_budget import SolveClock, highs_checkpoints
from qlmserve.operations.batching import PreemptionMode


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
    protect: str | None = None  # protection mechanism available (op_rules PreemptionMode.EXPERT / EVICT / SWAP)
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
    slack_s: float  # the last request's own deadline - now (the one its TTFT is held to)
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
    """Column index of every variable of a ProgramModel, by family."""

    y: dict[tuple[int, int], int] = field(default_factory=dict)
    x: dict[tuple[int, int], int] = field(default_factory=dict)
    u: dict[tuple[int, int], int] = field(default_factory=dict)
    p: dict[int, int] = field(default_factory=dict)
    z: dict[tuple[int, int, int], int] = field(default_factory=dict)


@dataclass
class ProgramModel:
    """The program as a binary MILP in row form (maximise cost . col subject to
    row_lo <= A col <= row_hi), with names for every column and row. It is stated once
    (build_model); HiGHS takes its arrays in one call (solve_program) and `to_pulp` gives
    the same program as a PuLP problem for `.lp` dumps and checks."""

    program: Program | None = None  # what it states
    vars: ProgramVars = field(default_factory=ProgramVars)
    col_names: list[str] = field(default_factory=list)
    cost: list[float] = field(default_factory=list)
    row_names: list[str] = field(default_factory=list)
    row_lo: list[float] = field(default_factory=list)
    row_hi: list[float] = field(default_factory=list)
    starts: list[int] = field(default_factory=lambda: [0])
    index: list[int] = field(default_factory=list)
    value: list[float] = field(default_factory=list)

    def col(self, name: str) -> int:
        self.col_names.append(name)
        self.cost.append(0.0)
        return len(self.col_names) - 1

    def row(self, terms: list[tuple[int, float]], lo: float, hi: float, name: str) -> None:
        """lo <= sum(terms) <= hi; the coefficients of a repeated column are summed."""
        coef: dict[int, float] = {}
        for c, a in terms:
            coef[c] = coef.get(c, 0.0) + a
        self.index.extend(coef)
        self.value.extend(coef.values())
        self.starts.append(len(self.index))
        self.row_names.append(name)
        self.row_lo.append(lo)
        self.row_hi.append(hi)

    def le(self, terms: list[tuple[int, float]], rhs: float, name: str) -> None:
        self.row(terms, -math.inf, rhs, name)

    def violated(self, col: np.ndarray) -> np.ndarray:
        """Indices of the rows these column values violate."""
        idx = np.asarray(self.index, dtype=np.int64)
        prod = np.asarray(self.value) * col[idx] if len(idx) else np.zeros(0)
        starts = np.asarray(self.starts)
        act = np.zeros(len(self.row_names))
        nonempty = starts[1:] > starts[:-1]
        if nonempty.any():
            act[nonempty] = np.add.reduceat(prod, starts[:-1][nonempty])
        return np.flatnonzero((act > np.asarray(self.row_hi) + 1e-7) | (act < np.asarray(self.row_lo) - 1e-7))

    def row_cols(self, r: int) -> list[int]:
        return self.index[self.starts[r]:self.starts[r + 1]]

    @property
    def num_cols(self) -> int:
        return len(self.col_names)

    def to_pulp(self) -> tuple[pulp.LpProblem, list[pulp.LpVariable]]:
        """The same program as a PuLP problem (maximise) and its variables by column."""
        prob = pulp.LpProblem("qlm_program", pulp.LpMaximize)
        cols = [pulp.LpVariable(n, cat="Binary") for n in self.col_names]
        for r, name in enumerate(self.row_names):
            a, b = self.starts[r], self.starts[r + 1]
            expr = pulp.LpAffineExpression([(cols[c], v) for c, v in zip(self.index[a:b], self.value[a:b])])
            lo, hi = self.row_lo[r], self.row_hi[r]
            if lo == hi:
                prob += expr == hi, name
            elif math.isinf(lo):
                prob += expr <= hi, name
            else:
                prob += expr >= lo, name
                if not math.isinf(hi):
                    prob += expr <= hi, f"{name}_hi"
        prob += pulp.LpAffineExpression([(cols[c], v) for c, v in enumerate(self.cost) if v]), \
            "weighted_requests_meeting_slo"
        return prob, cols


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


def build_model(program: Program) -> ProgramModel:
    """The program (maximise), stated once."""
    m = ProgramModel(program)
    v = m.vars
    G, W = program.groups, program.workers
    by_w: dict[int, list[Pair]] = {}
    for pr in program.pairs:
        by_w.setdefault(pr.wj, []).append(pr)
    for prs in by_w.values():
        prs.sort(key=lambda pr: pr.order)

    for j, w in enumerate(W):
        if not w.fixed:
            for k, opt in enumerate(w.options):
                v.u[j, k] = m.col(f"u_w{j}_o{k}_{_tag(w.worker_id)}_{_tag(opt.key)}")
            m.row([(v.u[j, k], 1.0) for k in range(len(w.options))], 1.0, 1.0, f"one_option_w{j}")
        if w.protect is not None:
            v.p[j] = m.col(f"p_w{j}_{_tag(w.worker_id)}")
            if not w.fixed:  # protection is about the running batch: only when the worker keeps it
                m.le([(v.p[j], 1.0), (v.u[j, 0], -1.0)], 0.0, f"protect_needs_stay_w{j}")
    for pr in program.pairs:
        i, j = pr.gi, pr.wj
        name = f"g{i}_w{j}_{_tag(G[i].group_id)}"
        v.y[i, j] = m.col(f"y_{name}")
        v.x[i, j] = m.col(f"x_{name}")
        m.le([(v.y[i, j], 1.0), (v.x[i, j], -1.0)], 0.0, f"meet_needs_place_{name}")
        if not W[j].fixed:
            m.le([(v.x[i, j], 1.0)] + [(v.u[j, k], -1.0) for k in pr.ref], 0.0, f"model_{name}")

    pairs_of: dict[int, list[Pair]] = {}
    for pr in program.pairs:
        pairs_of.setdefault(pr.gi, []).append(pr)
    for i, prs in pairs_of.items():
        m.le([(v.x[pr.gi, pr.wj], 1.0) for pr in prs], 1.0, f"one_place_g{i}")

    ahead_var = v.x  # a queued group delays those behind it, whether it meets its SLO or not
    if program.method == "saa":
        _saa_constraints(m, program, by_w, ahead_var)
    else:
        _chance_constraints(m, program, by_w, ahead_var)

    # Expert-level preemption pauses the best-effort batch only for max_pause_s:
    # sum(add_mean y) <= cap + total (1 - p).
    for j, w in enumerate(W):
        if w.protect == PreemptionMode.EXPERT and w.pause_cap_s is not None and j in by_w:
            ls = [pr for pr in by_w[j] if G[pr.gi].latency_sensitive]
            if ls:
                total = sum(pr.add_mean for pr in ls)
                m.le([(v.y[pr.gi, j], pr.add_mean) for pr in ls] + [(v.p[j], total)], w.pause_cap_s + total,
                     f"pause_cap_w{j}")

    cost = m.cost
    if program.method == "saa":
        s_n = program.scenarios
        for (i, _j, _s), c in v.z.items():
            cost[c] += G[i].value / s_n
    else:
        for (i, _j), c in v.y.items():
            cost[c] += G[i].value
    for pr in program.pairs:
        if pr.current:
            cost[ahead_var[pr.gi, pr.wj]] += program.stickiness
        if program.place_reward:
            cost[v.x[pr.gi, pr.wj]] += program.place_reward * G[pr.gi].value
    for (j, k), c in v.u.items():
        cost[c] -= W[j].options[k].cost
    for j, c in v.p.items():
        cost[c] -= W[j].protect_cost
    return m


def _ref_terms(program: Program, v: ProgramVars, pr: Pair, ref_q: dict[int, float], ls_q: float | None
               ) -> tuple[list[tuple[int, float]], float, float]:
    """The pair's reference quantile (ref_q: per option of its worker; ls_q: with
    protection) as linear terms in the worker's option and protection plus a constant,
    and the largest value it can take."""
    w = program.workers[pr.wj]
    terms: list[tuple[int, float]] = []
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


def _chance_constraints(m: ProgramModel, program: Program, by_w, ahead_var) -> None:
    beta = program.beta
    v = m.vars
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
            m.le(ref + always + decode + meet, slack + big_m - const + pr.free_s, f"slo_g{i}_w{j}")
            if pr.free_s > 0 and ahead:
                m.le(ref + always + meet, slack + big_m - const, f"slo_free_g{i}_w{j}")


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


def _saa_constraints(m: ProgramModel, program: Program, by_w, ahead_var) -> None:
    v = m.vars
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
                zv = v.z[i, j, s] = m.col(f"z_g{i}_w{j}_s{s}")
                m.le([(zv, 1.0), (v.y[i, j], -1.0)], 0.0, f"scenario_needs_place_g{i}_w{j}_s{s}")
                meet = [(zv, big_m)]
                m.le(ref + always + decode + meet, G[i].slack_s + big_m - const + pr.free_s, f"slo_g{i}_w{j}_s{s}")
                if pr.free_s > 0 and ahead:
                    m.le(ref + always + meet, G[i].slack_s + big_m - const, f"slo_free_g{i}_w{j}_s{s}")


# On a deterministic clock HiGHS stops by its own checkpoints; this wall-clock limit is only
# a guard against a runaway solve (it does not bind on a machine within 20x of the
# reference one, and would make that run machine-dependent if it did).
WORK_MODE_TIME_GUARD_S = 30.0


def solve_program(m: ProgramModel, time_limit_s: float, start: np.ndarray | None = None,
                  gap_rel: float = 1e-4, clock: SolveClock | None = None) -> ProgramSolution | None:
    """Solve with HiGHS in-process; None when no integer-feasible solution was found in time.
    `start` (a value per column) is handed to HiGHS as a MIP start. The model goes to
    HiGHS in one call, as arrays: handing it over a column and a row at a time (PuLP's
    HiGHS interface) took longer than HiGHS's own work on the 256 x 32 instances of
    `qlm bench-solver`.

    On a deterministic clock (the simulator) `time_limit_s` is modelled time: HiGHS stops
    after the number of its MIP interrupt checkpoints that the allowance buys
    (solve_budget.highs_checkpoints), which is the same on any machine, and the clock's
    meter is charged for the checkpoints it ran. HiGHS with one thread is deterministic;
    its wall-clock time limit is then only a guard (WORK_MODE_TIME_GUARD_S)."""
    now = clock.now if clock is not None else time.perf_counter
    t0 = now()
    n, rows = m.num_cols, len(m.row_names)
    h = highspy.Highs()
    h.setOptionValue("output_flag", False)
    h.setOptionValue("threads", 1)
    h.setOptionValue("mip_rel_gap", gap_rel)
    deterministic = clock is not None and clock.deterministic
    h.setOptionValue("time_limit", WORK_MODE_TIME_GUARD_S if deterministic else max(1e-3, time_limit_s))
    limit = highs_checkpoints(time_limit_s) if deterministic else None
    checkpoints = [0]

    def on_checkpoint(e: highspy.highs.HighsCallbackEvent) -> None:
        checkpoints[0] += 1
        if limit is not None and checkpoints[0] >= limit:
            e.interrupt()

    h.cbMipInterrupt.subscribe(on_checkpoint)
    ones = np.ones(n)
    status = h.passModel(n, rows, len(m.index), int(highspy.MatrixFormat.kRowwise), int(highspy.ObjSense.kMaximize),
                         0.0, np.asarray(m.cost, dtype=np.float64), np.zeros(n), ones,
                         np.asarray(m.row_lo, dtype=np.float64), np.asarray(m.row_hi, dtype=np.float64),
                         np.asarray(m.starts[:-1], dtype=np.int32), np.asarray(m.index, dtype=np.int32),
                         np.asarray(m.value, dtype=np.float64),
                         np.full(n, int(highspy.HighsVarType.kInteger), dtype=np.int32))
    if status == highspy.HighsStatus.kError:
        raise RuntimeError("HiGHS rejected the program")
    if start is not None:
        h.setSolution(n, np.arange(n, dtype=np.int32), np.asarray(start, dtype=np.float64))
    h.run()
    model_status = h.getModelStatus()
    info = h.getInfo()
    if clock is not None:
        clock.meter.charge("highs_setup")
        clock.meter.charge("highs_checkpoint", checkpoints[0])
    optimal = model_status == highspy.HighsModelStatus.kOptimal
    stopped = model_status in (highspy.HighsModelStatus.kTimeLimit, highspy.HighsModelStatus.kInterrupt)
    if not optimal and (not stopped or info.primal_solution_status != 2):
        return None  # infeasible, an error, or stopped with no integer solution
    col = np.asarray(h.getSolution().col_value) > 0.5
    v = m.vars
    on_time = {i: j for (i, j), c in v.y.items() if col[c]}
    placed = {i: j for (i, j), c in v.x.items() if col[c]}
    options = {j: 0 if w.fixed else next((k for k in range(len(w.options)) if col[v.u[j, k]]), 0)
               for j, w in enumerate(m.program.workers)}
    protected = {j for j, c in v.p.items() if col[c]}
    return ProgramSolution(status="optimal" if optimal else "feasible", objective=float(info.objective_function_value),
                           on_time=on_time, placed=placed, options=options, protected=protected,
                           solve_s=now() - t0)
