"""The cost-aware autoscaling policy on synthetic load, without Ray running: Ray Serve's own AutoscalingContext
objects carry what the stage replicas would report (queued steps times measured seconds per step)."""

from __future__ import annotations

import pytest
from ray.serve._private.common import DeploymentID, ReplicaID
from ray.serve.config import AutoscalingConfig, AutoscalingContext

from deployments.autoscaling import CostAwarePolicy, StageLoad, share_budget, size_stage

# Per-step seconds of the order measured on the H200 at 480p/81 (bench/RESULTS.md, "Kernels": 14B ~3.3 s, 1.3B
# ~0.63 s per forward): the policy's inputs here, not a claim.
SKETCH_STEP_S, RENDER_STEP_S = 3.28, 0.62
SKETCH, RENDER, INGRESS = (DeploymentID(name=n, app_name="srd") for n in ("Sketcher", "Renderer", "Ingress"))


def replica_reports(jobs: list[int], step_s: float) -> dict[str, float]:
    """What one stage replica reports for jobs with these remaining steps (StageRunner.autoscaling_stats)."""
    steps = float(sum(jobs))
    return {"queued_steps": steps, "step_s": step_s, "queued_work_s": steps * step_s, "jobs": float(len(jobs))}


def context(deployment: DeploymentID, replicas: list[dict[str, float]], target: int | None = None,
            lo: int = 1, hi: int = 8, now: float = 1000.0, state: dict | None = None, queued: float = 0.0,
            ongoing: float = 0.0) -> AutoscalingContext:
    ids = [ReplicaID(f"r{i}", deployment) for i in range(len(replicas))]
    names = replicas[0].keys() if replicas else ()
    return AutoscalingContext(
        deployment_id=deployment, deployment_name=deployment.name, app_name="srd",
        current_num_replicas=len(replicas), target_num_replicas=len(replicas) if target is None else target,
        running_replicas=ids, total_num_requests=ongoing, total_queued_requests=queued,
        aggregated_metrics={name: {rid: r[name] for rid, r in zip(ids, replicas)} for name in names},
        raw_metrics=None, capacity_adjusted_min_replicas=lo, capacity_adjusted_max_replicas=hi,
        policy_state=state or {}, last_scale_up_time=None, last_scale_down_time=None, current_time=now,
        config=AutoscalingConfig(min_replicas=lo, max_replicas=hi, target_ongoing_requests=2),
    )


def load(requests: int, n: int, k: int) -> tuple[list[dict], list[dict]]:
    """One sketcher and one renderer replica holding `requests` jobs of N=n steps switching at K=k."""
    return [replica_reports([k] * requests, SKETCH_STEP_S)], [replica_reports([n - k] * requests, RENDER_STEP_S)]


def test_sketch_heavy_load_scales_the_sketcher_only():
    sketch, render = load(requests=4, n=50, k=45)  # sketch 590 s of work, render 12 s
    decisions, _ = CostAwarePolicy(target_work_s=120, cooldown_s=0)(
        {SKETCH: context(SKETCH, sketch), RENDER: context(RENDER, render)})
    assert decisions == {SKETCH: 5, RENDER: 1}


def test_render_heavy_load_scales_the_renderer_only():
    sketch, render = load(requests=8, n=50, k=5)  # sketch 131 s, render 223 s
    decisions, _ = CostAwarePolicy(target_work_s=120, cooldown_s=0)(
        {SKETCH: context(SKETCH, sketch), RENDER: context(RENDER, render)})
    assert decisions == {SKETCH: 1, RENDER: 2}


def test_same_request_count_different_k_sizes_differently():
    """Ray's default would see the same ongoing requests in both cases; the K of the requests decides here."""
    policy = CostAwarePolicy(target_work_s=60, cooldown_s=0)
    early = policy({SKETCH: context(SKETCH, load(6, 50, 5)[0]), RENDER: context(RENDER, load(6, 50, 5)[1])})[0]
    late = policy({SKETCH: context(SKETCH, load(6, 50, 25)[0]), RENDER: context(RENDER, load(6, 50, 25)[1])})[0]
    assert early[SKETCH] < late[SKETCH] and early[RENDER] > late[RENDER]


@pytest.mark.parametrize("work_s, current, expected", [
    (130, 1, 2),   # over 1.2 replicas' share: up to ceil(130 / 100)
    (115, 1, 1),   # inside the band: stays
    (210, 2, 2),   # 2.1 replicas of work on 2: stays (band up to 2.4)
    (85, 2, 2),    # 0.85 replicas of work on 2: one replica would hold it with under 20% margin: stays
    (75, 2, 1),    # below 0.8 of one replica: down to 1
    (0, 3, 1),     # idle: down to min
    (5000, 2, 8),  # capped at max
])
def test_hysteresis_band_and_bounds(work_s, current, expected):
    assert size_stage(StageLoad(work_s, current, 1, 8), target_work_s=100, hysteresis=0.2) == expected


def test_unmeasured_work_keeps_the_count():
    assert size_stage(StageLoad(None, 2, 1, 8), target_work_s=100, hysteresis=0.2) == 2
    unmeasured = [{"queued_steps": 40.0, "step_s": 0.0, "queued_work_s": 0.0, "jobs": 4.0}]
    decisions, _ = CostAwarePolicy(target_work_s=1, cooldown_s=0)({SKETCH: context(SKETCH, unmeasured)})
    assert decisions == {SKETCH: 1}


def test_requests_waiting_at_handles_count_at_the_mean_work():
    replica = [replica_reports([10, 10], SKETCH_STEP_S)]  # 2 jobs, 65.6 s
    decisions, _ = CostAwarePolicy(target_work_s=100, cooldown_s=0)({SKETCH: context(SKETCH, replica, queued=4)})
    assert decisions == {SKETCH: 2}  # (2 + 4) jobs x 32.8 s = 197 s


def test_cooldown_holds_a_second_change():
    policy = CostAwarePolicy(target_work_s=120, cooldown_s=60)
    sketch, _ = load(requests=4, n=50, k=45)
    decisions, states = policy({SKETCH: context(SKETCH, sketch, now=1000.0)})
    assert decisions[SKETCH] == 5
    idle = [replica_reports([], SKETCH_STEP_S)] * 5
    held, _ = policy({SKETCH: context(SKETCH, idle, target=5, now=1030.0, state=states[SKETCH])})
    assert held[SKETCH] == 5
    later, _ = policy({SKETCH: context(SKETCH, idle, target=5, now=1061.0, state=states[SKETCH])})
    assert later[SKETCH] == 1


def test_a_shared_budget_goes_to_the_heavier_stage():
    loads = {"sketch": StageLoad(600, 1, 1, 8), "render": StageLoad(200, 1, 1, 8)}
    assert share_budget({"sketch": 6, "render": 2}, loads, budget=6) == {"sketch": 5, "render": 1}
    assert share_budget({"sketch": 6, "render": 2}, loads, budget=None) == {"sketch": 6, "render": 2}
    sketch, render = load(requests=8, n=50, k=25)  # sketch 656 s, render 124 s
    decisions, _ = CostAwarePolicy(target_work_s=60, cooldown_s=0, max_total_replicas=6)(
        {SKETCH: context(SKETCH, sketch), RENDER: context(RENDER, render)})
    assert decisions == {SKETCH: 5, RENDER: 1}  # 656 : 124 of 6 GPUs


def test_other_deployments_get_rays_default_policy():
    ingress = context(INGRESS, [{}, {}], ongoing=20.0)  # 20 ongoing on 2 replicas, target 2 per replica
    decisions, _ = CostAwarePolicy()({INGRESS: ingress})
    assert decisions[INGRESS] == pytest.approx(10)


def test_bad_kwargs_name_the_argument():
    with pytest.raises(ValueError, match="target_work_s"):
        CostAwarePolicy(target_work_s=0)
    with pytest.raises(ValueError, match="hysteresis"):
        CostAwarePolicy(hysteresis=1.0)
