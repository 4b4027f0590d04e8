"""QLM: SLO-aware queue management by a stochastic program over request groups.

The planner is a pipeline of stages, one module each (the NOTE in `policy.QlmPolicy.solve`
explains the algorithm once):

  tick.py           what one solve computes from the snapshot and every stage reads
  base_plan.py      stage 1: the base decision (last plan, or EDF from scratch)
  risk.py           stage 2: groups at risk, hopeless groups, candidate workers
  program_build.py  stages 3-4: the program over the groups at risk, solved by HiGHS
  program.py        the program stated once as a binary MILP (row form, PuLP for dumps)
  repair.py         stage 4: local search with the exact estimator
  fast_path.py      latency-sensitive protection of queues that start with LS groups
  decision.py       a candidate plan and its score
"""

from qlmserve.controller.policies.qlm.policy import QlmPolicy

__all__ = ["QlmPolicy"]
