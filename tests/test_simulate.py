"""The cluster simulator (deployments/simulate): against a queue's closed form, with the app's own policy and
planner inside it, a killed replica's job resumed from its checkpoint, and runs that repeat for a seed."""

from __future__ import annotations

import pytest

import deployments.autoscaling
from deployments.simulate.config import SimConfig
from deployments.simulate.run import merge, simulate
from serve.placement import CARDS, plan

# Explicit per-call seconds (no cost table): every stage free but the sketch, so the sketcher is the only server.
FREE = {"source": "test", "encode_s": 0.0, "sketch_step_s": 0.0, "render_step_s": 0.0, "decode_s": 0.0,
        "preview_s": 0.0}
NO_WAITS = {"layout": {"kind": "plan", "policy": "fixed", "plan_request": {"num_inference_steps": 10,
                                                                          "switch": "step:5"},
                       "batching": {"Encoder": {"batch_wait_timeout_s": 0.0}}},
            "jobs": {"poll_interval_s": 0.001, "max_unfinished_jobs": 100000}}
REQUEST = {"num_inference_steps": 10, "switch": "step:5"}


def config(**overrides) -> SimConfig:
    return SimConfig.model_validate(merge(NO_WAITS, overrides))


def test_one_sketcher_is_an_md1_queue():
    """Poisson arrivals, a fixed service time D at one replica taking one call at a time: M/D/1, whose mean time in
    the system is D + rho D / (2 (1 - rho)) (Pollaczek-Khinchine)."""
    service, rho = 10.0, 0.5
    run = simulate(config(
        costs={"measured": {**FREE, "sketch_step_s": service / 5}},
        workload={"kind": "poisson", "rate_per_hour": 3600 * rho / service, "duration_s": 400_000,
                  "mix": [{"request": REQUEST}]}, timeline_step_s=3600))
    latency = [end - start for start, end, _ in run["latencies"]]
    expected = service + rho * service / (2 * (1 - rho))
    assert run["completed"] > 19_000
    assert sum(latency) / len(latency) == pytest.approx(expected, rel=0.04)
    assert run["stages"]["Sketcher"]["busy_share"] == pytest.approx(rho, rel=0.03)


def test_a_killed_renderer_resumes_from_the_hand_off():
    """One job: sketch 10 s, render 10 s. The Renderer dies 5 s into the render and is back 20 s later: the job
    ends at kill + restart + one whole render, and the sketch is not run again."""
    costs = {"measured": {**FREE, "sketch_step_s": 2.0, "render_step_s": 2.0}}
    one = {"kind": "at-once", "count": 1, "mix": [{"request": REQUEST}]}
    clean = simulate(config(costs=costs, workload=one))
    render_start = clean["classes"]["default"]["p50_s"] - 10.0
    kill_at, restart = render_start + 5.0, 20.0
    faulted = simulate(config(costs=costs, workload=one,
                              faults=[{"deployment": "Renderer", "at_s": kill_at, "restart_s": restart}]))
    assert faulted["completed"] == 1
    assert faulted["classes"]["default"]["p50_s"] == pytest.approx(kill_at + restart + 10.0, abs=1e-6)
    assert faulted["calls_started"]["sketch"] == 1 and faulted["calls_started"]["render"] == 2
    assert faulted["reruns_after_checkpoint"] == 0


def test_a_killed_orchestrator_hands_its_jobs_over_after_the_lease():
    costs = {"measured": {**FREE, "sketch_step_s": 2.0, "render_step_s": 2.0}}
    one = {"kind": "at-once", "count": 1, "mix": [{"request": REQUEST}]}
    run = simulate(config(costs=costs, workload=one, layout={"orchestrators": 2}, jobs={"lease_s": 7.0},
                          faults=[{"deployment": "Orchestrator", "at_s": 15.0, "restart_s": 100.0}]))
    # the render call (10 s..20 s) goes on; its driver died at 15 s; the other orchestrator takes the job over at
    # 22 s and renders again (the first render's result was never recorded)
    assert run["completed"] == 1
    assert run["classes"]["default"]["p50_s"] == pytest.approx(15.0 + 7.0 + 10.0, abs=0.01)


BURSTY = {"cluster": {"gpus": 8, "card": "h200"},
          "layout": {"kind": "plan", "policy": "app", "control_period_s": 5.0},
          "jobs": {"max_unfinished_jobs": 100000},
          "workload": {"kind": "phases", "repeat": 1,
                       "phases": [{"duration_s": 600, "rate_per_hour": 40}, {"duration_s": 600, "rate_per_hour": 400}]}}


def test_the_policy_is_the_apps_own(monkeypatch):
    """Patching the app's sizing function changes the simulated replicas: the simulator calls it, not a copy."""
    own = simulate(SimConfig.model_validate(BURSTY))
    monkeypatch.setattr(deployments.autoscaling, "size_stage", lambda load, target, hysteresis: load.min_replicas)
    pinned = simulate(SimConfig.model_validate(BURSTY))
    assert own["stages"]["Sketcher"]["peak_replicas"] > 1
    assert pinned["stages"]["Sketcher"]["peak_replicas"] == 1
    assert pinned["classes"]["default"]["p95_s"] > own["classes"]["default"]["p95_s"]


def test_the_cost_aware_policy_scales_up_through_rays_delay():
    """Ray Serve wraps an application policy in its upscale delay (30 s here); the policy's own cooldown must not
    restart that delay on every call, or it never scales (it did before the fix in deployments/autoscaling.py)."""
    run = simulate(SimConfig.model_validate(merge(BURSTY, {"layout": {"control_period_s": 1.0}, "workload": {
        "kind": "at-once", "count": 40}})))
    sketchers = [row["Sketcher.ready"] for row in run["timeline"] if row["t"] <= 120]
    assert max(sketchers) == run["stages"]["Sketcher"]["peak_replicas"] > 1


def test_the_layout_is_the_planners():
    run = simulate(SimConfig.model_validate(merge(BURSTY, {"cluster": {"gpus": 32}, "layout": {"policy": "fixed"},
                                                           "workload": {"kind": "at-once", "count": 1}})))
    placement = plan(32, CARDS["h200"], 480, 832, 81, 50, 10)
    assert run["stages"]["Sketcher"]["peak_replicas"] == placement.sketchers
    assert run["stages"]["Renderer"]["peak_replicas"] == placement.renderers


def test_a_seed_gives_one_run():
    first, again = (simulate(SimConfig.model_validate(BURSTY)) for _ in range(2))
    other = simulate(SimConfig.model_validate({**BURSTY, "seed": 1}))
    assert first == again
    assert other["latencies"] != first["latencies"]


def test_importing_the_simulator_starts_no_ray():
    import ray

    import deployments.simulate.run  # noqa: F401

    assert not ray.is_initialized()


def test_bad_config_names_the_field():
    with pytest.raises(ValueError, match="workload.duration_s"):
        SimConfig.model_validate({"workload": {"kind": "poisson", "rate_per_hour": 10}})
    with pytest.raises(ValueError, match="cluster.card"):
        simulate(SimConfig.model_validate({"cluster": {"card": "a100"}, "workload": {"kind": "at-once", "count": 1}}))
