"""The autoscaling decisions of a simulated run, made by the app's and Ray's own code, not a copy of either:

- app: `deployments.autoscaling.CostAwarePolicy`, wrapped by Ray Serve's `_apply_app_level_autoscaling_config` as
  Serve's controller wraps an application-level policy (scaling factors, upscale/downscale delays);
- ray-default: `replica_queue_length_autoscaling_policy`, wrapped by `_apply_autoscaling_config` as the controller
  wraps a deployment's policy.

Both are called with Ray Serve's own `AutoscalingContext`, filled from the simulated replicas' reports. Ray's delay
logic reads the wall clock (`time.time()` in ray.serve.autoscaling_policy); while a policy runs, that module's clock
is the simulation's. Bounds are applied after the policy as the controller's `apply_bounds` does (min/max clip).
"""

from __future__ import annotations

import contextlib
import math
import types
from collections.abc import Iterator
from dataclasses import dataclass

from ray.serve import autoscaling_policy as ray_policy
from ray.serve._private.common import DeploymentID, ReplicaID
from ray.serve.config import AutoscalingConfig, AutoscalingContext

from deployments.autoscaling import CostAwarePolicy
from deployments.config import Autoscaling

APP = "srd"


@dataclass
class StageView:
    """One autoscaled deployment as the controller sees it at a control tick (window means of the reports)."""

    name: str
    target: int
    running: list[int]  # replica ids serving
    total_requests: float  # ongoing at replicas + queued at handles
    queued_requests: float  # queued at handles
    metrics: dict[str, dict[int, float]]  # custom metric -> replica id -> value (record_autoscaling_stats)
    autoscaling: Autoscaling


@contextlib.contextmanager
def _clock(now: float) -> Iterator[None]:
    """Ray's delay logic on simulated time."""
    real = ray_policy.time
    ray_policy.time = types.SimpleNamespace(time=lambda: now)
    try:
        yield
    finally:
        ray_policy.time = real


class Autoscaler:
    """Decides every autoscaled stage's target replicas at a control tick."""

    def __init__(self, kind: str, policy_kwargs: dict):
        if kind not in ("app", "ray-default", "fixed"):
            raise ValueError(f"`layout.policy` must be app, ray-default or fixed but is {kind!r}")
        self.kind = kind
        self._state: dict[str, dict] = {}
        self._configs: dict[str, AutoscalingConfig] = {}
        if kind == "app":
            self._policy = ray_policy._apply_app_level_autoscaling_config(CostAwarePolicy(**policy_kwargs))
        elif kind == "ray-default":
            self._policy = ray_policy._apply_autoscaling_config(ray_policy.replica_queue_length_autoscaling_policy)

    def _context(self, view: StageView, now: float) -> AutoscalingContext:
        deployment = DeploymentID(name=view.name, app_name=APP)
        if view.name not in self._configs:
            self._configs[view.name] = AutoscalingConfig(**view.autoscaling.model_dump())
        ids = {rid: ReplicaID(f"{view.name}-{rid}", deployment) for rid in view.running}
        auto = view.autoscaling
        return AutoscalingContext(
            deployment_id=deployment, deployment_name=view.name, app_name=APP,
            current_num_replicas=len(view.running), target_num_replicas=view.target,
            running_replicas=list(ids.values()), total_num_requests=view.total_requests,
            total_queued_requests=view.queued_requests,
            aggregated_metrics={name: {ids[r]: v for r, v in values.items() if r in ids}
                                for name, values in view.metrics.items()},
            raw_metrics=None, capacity_adjusted_min_replicas=auto.min_replicas,
            capacity_adjusted_max_replicas=auto.max_replicas, policy_state=dict(self._state.get(view.name, {})),
            last_scale_up_time=None, last_scale_down_time=None, current_time=now, config=self._configs[view.name])

    def decide(self, views: list[StageView], now: float) -> dict[str, int]:
        """Target replicas by deployment name."""
        if self.kind == "fixed":
            return {v.name: v.autoscaling.max_replicas for v in views}
        contexts = {v.name: self._context(v, now) for v in views}
        with _clock(now):
            if self.kind == "app":
                by_id = {ctx.deployment_id: ctx for ctx in contexts.values()}
                decisions, states = self._policy(by_id)
                decided = {d.name: n for d, n in decisions.items()}
                self._state.update({d.name: s for d, s in (states or {}).items()})
            else:
                decided = {}
                for name, ctx in contexts.items():
                    decided[name], self._state[name] = self._policy(ctx)
        out = {}
        for view in views:
            count = decided.get(view.name, view.target)
            auto = view.autoscaling
            out[view.name] = max(auto.min_replicas, min(auto.max_replicas, math.ceil(count)))
        return out
