"""Cost-aware autoscaling of the stages: an application-level policy for Ray Serve (2.60's policy API).

Ray's default policy counts ongoing requests per replica. Here a request's cost differs by stage and by request: a
job with K sketch steps of N costs the sketcher K steps and the renderer N-K, and a sketch step of the 14B model
costs ~5x a render step of the 1.3B. So each stage replica reports its queued work in seconds
(`record_autoscaling_stats`: the remaining steps of the jobs it holds times the seconds per step it measured, see
deployments/batching.py) and this policy sizes every stage from that:

    replicas = ceil(queued work / target_work_s)

with hysteresis (scale up only once the work exceeds the current replicas' share by `hysteresis`, down only once
one replica fewer would still hold it with that margin), a cooldown after each change, the deployment's own
min/max, and, because the policy sees all stages at once, an optional GPU budget (`max_total_replicas`) that the
sketcher and renderer share in proportion to their work. Requests still queued at the callers' handles count at
the mean work of the requests the stage's replicas hold.

Enable it in the Serve config, beside the application's `args` (the stages need an `autoscaling` config each):

    autoscaling_policy:
      policy_function: deployments.autoscaling:CostAwarePolicy
      policy_kwargs: {target_work_s: 120, hysteresis: 0.2, cooldown_s: 60, max_total_replicas: 8}

Ray applies each deployment's upscale/downscale delays after this policy. Deployments that report no queued work
(the ingress and the orchestrator, if autoscaled) get Ray's default policy.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

from ray.serve.autoscaling_policy import replica_queue_length_autoscaling_policy

WORK_METRIC = "queued_work_s"  # what a stage replica reports (deployments/batching.py StageRunner.autoscaling_stats)
JOBS_METRIC = "jobs"
STEP_METRIC = "step_s"


@dataclass(frozen=True)
class StageLoad:
    """One stage as the policy sees it: its work in seconds (None while no replica has timed a step yet)."""

    work_s: float | None
    replicas: int  # the current target
    min_replicas: int
    max_replicas: int


def size_stage(load: StageLoad, target_work_s: float, hysteresis: float) -> int:
    """Replicas for one stage's queued work: ceil(work / target), changed only past the hysteresis band, within
    min/max. Unmeasured work (no step timed yet) keeps the current count (at least one replica while any job waits,
    so the first step can be timed)."""
    current = load.replicas
    if load.work_s is None:
        wanted = current
    else:
        ideal = load.work_s / target_work_s
        if ideal > current * (1 + hysteresis):
            wanted = math.ceil(ideal)
        elif ideal < (current - 1) * (1 - hysteresis):
            wanted = math.ceil(ideal)
        else:
            wanted = current
    return max(load.min_replicas, min(load.max_replicas, wanted))


def share_budget(wanted: dict[str, int], loads: dict[str, StageLoad], budget: int | None) -> dict[str, int]:
    """Fit the stages' replicas into `budget` (their GPUs, say): while over it, take a replica from the stage with
    the least work per replica that is above its minimum."""
    sized = dict(wanted)
    if budget is None:
        return sized
    while sum(sized.values()) > budget:
        shrinkable = [s for s in sized if sized[s] > loads[s].min_replicas]
        if not shrinkable:
            break
        lightest = min(shrinkable, key=lambda s: (loads[s].work_s or 0.0) / sized[s])
        sized[lightest] -= 1
    return sized


def stage_work(ctx) -> float | None:
    """Seconds of work queued at a stage: what its replicas report, plus the requests still waiting at handles at
    the mean work of those the replicas hold. None if no replica has timed a step yet but work is queued."""
    metrics = ctx.aggregated_metrics or {}
    work = sum(metrics.get(WORK_METRIC, {}).values())
    jobs = sum(metrics.get(JOBS_METRIC, {}).values())
    timed = any(value > 0 for value in metrics.get(STEP_METRIC, {}).values())
    waiting = ctx.total_queued_requests or 0.0
    if (jobs > 0 and not timed) or (waiting > 0 and jobs == 0):
        return None
    return work + (waiting * work / jobs if waiting else 0.0)


class CostAwarePolicy:
    """Ray Serve application-level autoscaling policy (see the module docstring); kwargs from `policy_kwargs`."""

    def __init__(self, target_work_s: float = 120.0, hysteresis: float = 0.2, cooldown_s: float = 60.0,
                 max_total_replicas: int | None = None):
        if target_work_s <= 0:
            raise ValueError(f"`target_work_s` must be > 0 but is {target_work_s}")
        if not 0 <= hysteresis < 1:
            raise ValueError(f"`hysteresis` must be in [0, 1) but is {hysteresis}")
        if cooldown_s < 0:
            raise ValueError(f"`cooldown_s` must be >= 0 but is {cooldown_s}")
        self.target_work_s = target_work_s
        self.hysteresis = hysteresis
        self.cooldown_s = cooldown_s
        self.max_total_replicas = max_total_replicas

    def __call__(self, contexts: dict) -> tuple[dict, dict]:
        decisions, states, loads = {}, {}, {}
        for deployment_id, ctx in contexts.items():
            if WORK_METRIC not in (ctx.aggregated_metrics or {}):  # not a stage: Ray's default
                decisions[deployment_id], states[deployment_id] = replica_queue_length_autoscaling_policy(ctx)
                continue
            loads[deployment_id] = StageLoad(stage_work(ctx), ctx.target_num_replicas,
                                             ctx.capacity_adjusted_min_replicas, ctx.capacity_adjusted_max_replicas)
        wanted = {d: size_stage(load, self.target_work_s, self.hysteresis) for d, load in loads.items()}
        wanted = share_budget(wanted, loads, self.max_total_replicas)
        for deployment_id, count in wanted.items():
            ctx = contexts[deployment_id]
            now = ctx.current_time if ctx.current_time is not None else time.time()
            state = dict(ctx.policy_state)
            changed_at = state.get("srd_changed_at")
            # The cooldown runs only once Ray has applied what this policy asked for: until then Ray's own
            # upscale/downscale delay is running, and it restarts whenever the policy answers the current target.
            applied = state.get("srd_asked") == ctx.target_num_replicas
            cooling = changed_at is not None and now - changed_at < self.cooldown_s and applied
            if count != ctx.target_num_replicas and not cooling:
                state["srd_changed_at"], state["srd_asked"] = now, count
            else:
                count = ctx.target_num_replicas
            decisions[deployment_id], states[deployment_id] = count, state
        return decisions, states
