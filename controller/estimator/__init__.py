"""Request waiting time (RWT) estimation.

Three layers, each used by the next, each in its own module (`distributions` holds the
waiting-time and length distributions they share):

1. Output lengths (`lengths`). `LengthLearner` learns the output-length distribution of every
   (model, SLO class) online from finished requests, as sufficient statistics
   (count, sum, sum of squares) on top of the policy's prior (a pseudo-count). The
   planner sees a mean and a variance (`LengthStats`); the shape is taken to be a
   gamma distribution with those moments (right-skewed, positive, and exponential
   when the coefficient of variation is one), which is what lets us condition a
   running request's remaining length on the tokens it already produced and truncate
   at `max_tokens`.

2. One worker's service model (`service_model`: `WorkerModel`, `ReleaseTable`, `QueueCursor`). A worker
   runs up to `slots` sequences at once (continuous batching; `slots` is the batch
   limit, lowered when the KV cache cannot hold that many sequences). Every decode
   iteration advances every running sequence by one token and takes `step_s` (a
   function of the batch, from the WorkerProfile); every admitted request first takes a
   prefill pass that stalls the batch. Requests start in virtual-queue order on the
   first free slot (list scheduling), so a request's start is the time of the j-th slot
   release, j counting the requests ahead of it beyond the free slots. With queued
   lengths independent and identically distributed, each slot is an independent renewal
   process (its running request's remaining length, then fresh lengths): the first
   2 * slots releases, order statistics the CLT does not cover, come from a cached Monte
   Carlo table; later starts add the queued work beyond them spread over the slots,
   a sum of many lengths and so normal by the central limit theorem. A model swap in
   the queue drains the batch and then loads the weights (cold or warm).
   Latency-sensitive groups on a worker whose best-effort running work is paused
   (expert-level preemption) or evicted/swapped out see only the latency-sensitive
   running work ahead of them. Swapped-out requests are not ahead of the queue.

3. Groups in virtual queues (`forecast`: `Forecaster`). The TTFT of a group's requests in a given
   set of virtual queues: its first request and its last request (the group is
   admitted oldest first), each a `WaitEstimate` (mean and variance, gamma-shaped: the
   normal of the CLT deep in a queue, right-skewed near its head); the expected fraction
   of its requests that meet their deadline interpolates between the two.
"""

from qlmserve.controller.estimator.distributions import (
                                                         ZERO,
                                                         WaitEstimate,
                                                         normal_cdf,
                                                         normal_z,
                                                         prob_within_array,
                                                         quantile_array,
                                                         sample_sum,
)
from qlmserve.controller.estimator.forecast import (
                                                         Forecaster,
                                                         GroupForecast,
                                                         meets_all,
                                                         model_kind_is_moe,
                                                         predict_group_wait,
)
from qlmserve.controller.estimator.lengths import (
                                                         LengthLearner,
                                                         Moments,
                                                         RecentMoments,
                                                         merge_moments,
                                                         remaining_moments,
                                                         with_running,
)
from qlmserve.controller.estimator.service_model import GroupTiming, GroupWork, QueueCursor, Work, WorkerModel

__all__ = ["ZERO", "Forecaster", "GroupForecast", "GroupTiming", "GroupWork", "LengthLearner", "Moments",
           "QueueCursor", "RecentMoments", "WaitEstimate", "Work", "WorkerModel", "meets_all", "merge_moments",
           "model_kind_is_moe", "normal_cdf", "normal_z", "predict_group_wait", "prob_within_array",
           "quantile_array", "remaining_moments", "sample_sum", "with_running"]
