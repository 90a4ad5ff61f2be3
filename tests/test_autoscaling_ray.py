"""The cost-aware policy driving the real app on local Ray (fake GPUs, half a GPU per denoiser replica).

The app is deployed from a Serve config (as `serve deploy` does), the application-level policy beside its args.
One app, two loads in turn: twelve jobs arriving a quarter second apart, sketch-heavy (K = N-1), then twelve
render-heavy (K = 1), each loading one stage and barely the other: the loaded stage gets a second replica while the
other keeps one, and once its work is done it goes back to one. The jobs arrive spread out, as a service's do,
rather than in one burst: a burst of twelve one-step jobs is a queue of twelve steps at the idle stage, which is
briefly as much work as the policy's target, while spread out they leave it at most a step or two. The stages'
`target_ongoing_requests` is set so high that Ray's default policy would never add a replica: the scaling seen is
the cost-aware policy's, from the work the replicas report. (That the K of the requests, not their number, decides
is shown on synthetic load in test_autoscaling.py.)
"""

from __future__ import annotations

import time

from ray import serve

APP = "srd-autoscale"
JOBS, STEPS = 12, 50
ARRIVAL_S = 0.25  # between two jobs: longer than an idle stage's step, far shorter than a loaded stage's job
SHAPE = {"height": 128, "width": 128, "num_frames": 17}
DENOISER = {
    "resources": {"num_cpus": 0.5, "num_gpus": 0.5},
    "batching": {"max_batch_size": 1, "batch_wait_timeout_s": 0.0},
    "max_ongoing_requests": 2,  # the rest wait at the orchestrator's handle, for a new replica to take
    "autoscaling": {"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 100,
                    "upscale_delay_s": 0, "downscale_delay_s": 1,
                    "metrics_interval_s": 0.5, "look_back_period_s": 2},
}
POLICY = {"policy_function": "deployments.autoscaling:CostAwarePolicy",
          # 0.5 s of queued work per replica, 0.6 s with the hysteresis: measured on 2 cores with the jobs spread
          # out, the loaded stage's work peaks at 12-23 s (sketch) and 10-12 s (render), the idle stage's stays
          # under 0.03 s, so the bar sits ~20x from each
          "policy_kwargs": {"target_work_s": 0.5, "hysteresis": 0.2, "cooldown_s": 0}}


def deploy(data_dir) -> None:
    from ray.serve.context import _get_global_client
    from ray.serve.schema import ServeDeploySchema

    stage = {"resources": {"num_cpus": 0.5}}
    config = ServeDeploySchema.model_validate({"applications": [{
        "name": APP, "route_prefix": "/autoscale", "import_path": "deployments.app:app_builder",
        "autoscaling_policy": POLICY,
        "args": {"engine": {"preset": "tiny"}, "jobs": {"data_dir": str(data_dir)},
                 "encoder": stage, "decoder": stage, "sketcher": DENOISER, "renderer": DENOISER},
    }]})
    _get_global_client().deploy_apps(config, _blocking=True)


def replicas(deployment: str) -> int:
    """Replicas starting or running: what the autoscaler asked for."""
    states = serve.status().applications[APP].deployments[deployment].replica_states
    return sum(n for state, n in states.items() if str(state).endswith(("RUNNING", "STARTING")))


def run_load(handle, switch: int, loaded: str, idle: str) -> None:
    """Twelve jobs with K = `switch`: all complete, `loaded` got a second replica meanwhile, `idle` kept one; then
    `loaded` is back to one replica (its work is done)."""
    most = {loaded: 1, idle: 1}
    ids = []
    for i in range(JOBS):
        ids.append(handle.submit.remote({"prompt": f"ball {i}", "seed": i, "num_inference_steps": STEPS,
                                         "switch": f"step:{switch}", **SHAPE}).result().id)
        time.sleep(ARRIVAL_S)
        for name in most:
            most[name] = max(most[name], replicas(name))
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        for name in most:
            most[name] = max(most[name], replicas(name))
        statuses = [handle.status.remote(job_id).result().status for job_id in ids]
        if all(s in ("completed", "failed") for s in statuses):
            break
        time.sleep(0.5)
    assert statuses == ["completed"] * JOBS
    assert most == {loaded: 2, idle: 1}
    deadline = time.monotonic() + 120
    while replicas(loaded) > 1:
        assert time.monotonic() < deadline, f"{loaded} kept {replicas(loaded)} replicas with no work left"
        time.sleep(0.5)


def test_the_loaded_stage_scales_and_the_other_stays(serve_http, tiny_models, tmp_path):
    deploy(tmp_path)
    try:
        handle = serve.get_app_handle(APP)
        run_load(handle, STEPS - 1, "Sketcher", "Renderer")  # sketch-heavy
        run_load(handle, 1, "Renderer", "Sketcher")  # render-heavy
    finally:
        serve.delete(APP)
