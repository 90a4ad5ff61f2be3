"""The Ray worker group (deployments/worker_group.py) on local Ray with two fake GPUs, in a replica's placement group.

Rank 0 is the replica's own process (bundle 0), rank 1 an actor on bundle 1; ranks talk over gloo and xfuser's USP
is real. First the group alone inside a placement group (start-up checks, a dead rank), then the Serve app with a
2-rank Ulysses sketcher, compared with the one-rank engine (float32, relative error <= 1e-5).
"""

from __future__ import annotations

import importlib.util
import os
import time

import pytest

ray = pytest.importorskip("ray")
pytestmark = pytest.mark.skipif(importlib.util.find_spec("xfuser") is None, reason="needs the `parallel` extra")

TOL = 1e-5
STEPS = {"num_inference_steps": 3, "switch": "step:2"}  # 2 sketch steps, 1 render step
APP = "srd-parallel-test"


@pytest.fixture(scope="module")
def ray_local(tiny_models):
    with pytest.MonkeyPatch.context() as env:
        env.setenv("RAY_AUTH_MODE", "disabled")
        ray.init(num_cpus=4, num_gpus=2, object_store_memory=100 * 1024**2, include_dashboard=False,
                 log_to_driver=False)
        try:
            yield
        finally:
            ray.shutdown()


def _worker_pids() -> set[int]:
    """Processes of ParallelWorker actors (Ray titles an actor process `ray::<Class>`), zombies excluded."""
    pids = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    if f.read().startswith(b"ray::ParallelWorker"):
                        pids.add(int(entry))
            except OSError:
                pass
    return pids


def _wait(condition, timeout_s: float = 60.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.2)
    return False


# ---------------------------------------------------------------------------------------------------------------------
# The group alone
# ---------------------------------------------------------------------------------------------------------------------


def test_start_up_checks_run_before_any_rank_starts(ray_local, tiny_config):
    from ray.util.placement_group import placement_group, remove_placement_group

    from deployments.worker_group import RayWorkerGroup
    from serve.parallel import ParallelConfig

    with pytest.raises(ValueError, match="outside a placement group"):
        RayWorkerGroup(tiny_config, ParallelConfig(ulysses_degree=2))
    pg = placement_group([{"CPU": 0.5, "GPU": 1}] * 2, strategy="STRICT_PACK")
    ray.get(pg.ready(), timeout=60)
    try:
        with pytest.raises(ValueError, match=r"2 x 2 x 1 = 4 ranks must equal the sketch replica's .* bundles \(2\)"):
            RayWorkerGroup(tiny_config, ParallelConfig(ulysses_degree=2, cfg_degree=2), placement_group=pg)
        with pytest.raises(ValueError, match=r"head count \(2\) must be divisible by `ulysses_degree` \(4\)"):
            RayWorkerGroup(tiny_config, ParallelConfig(ulysses_degree=4), role="render", placement_group=pg)
        assert not _worker_pids()
    finally:
        remove_placement_group(pg)


class Replica:
    """A stand-in for a stage replica: a worker group over the placement group it was scheduled in."""

    def __init__(self, engine_config, degrees: dict):
        from deployments.worker_group import parallel_denoiser
        from serve.engine import SketchStage
        from serve.parallel import ParallelConfig

        self.stage = SketchStage(engine_config, denoiser=parallel_denoiser(engine_config, ParallelConfig(**degrees),
                                                                           "sketch"))

    def info(self):
        return self.stage.denoiser.group.info

    def sketch(self, params, embeds):
        return self.stage([(params, embeds)])[0]

    def check_health(self):
        self.stage.denoiser.group.check_health()


def test_a_dead_rank_fails_the_call_and_the_health_check(ray_local, tiny_config, make_params):
    from ray.util.placement_group import placement_group, remove_placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    from serve.engine import EncodeStage
    from serve.parallel import WorkerDiedError

    params = make_params(**STEPS)
    (embeds,) = EncodeStage(tiny_config)([params])
    pg = placement_group([{"CPU": 0.5, "GPU": 1}] * 2, strategy="STRICT_PACK")
    ray.get(pg.ready(), timeout=60)
    replica = ray.remote(Replica).options(
        num_cpus=0.5, num_gpus=1,
        scheduling_strategy=PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=0),
    ).remote(tiny_config, {"ulysses_degree": 2})
    try:
        info = ray.get(replica.info.remote(), timeout=300)
        assert [(i["rank"], i["sp_rank"], i["backend"]) for i in info] == [(0, 0, "gloo"), (1, 1, "gloo")]
        assert _worker_pids() == {info[1]["pid"]}  # rank 0 is the replica itself, rank 1 an actor
        os.kill(info[1]["pid"], 9)
        with pytest.raises(ray.exceptions.RayTaskError) as error:
            ray.get(replica.sketch.remote(params, embeds), timeout=120)
        assert isinstance(error.value.cause, WorkerDiedError)
        assert "sketch worker rank 1 died during 'denoise'" in str(error.value)
        # From now on the replica reports itself unhealthy, so Serve replaces it (and its group).
        with pytest.raises(ray.exceptions.RayTaskError, match="rank 1 died"):
            ray.get(replica.check_health.remote(), timeout=30)
    finally:
        ray.kill(replica)
        remove_placement_group(pg)


# ---------------------------------------------------------------------------------------------------------------------
# Through the Serve app: a sketch replica with 2 fake-GPU bundles running 2-rank Ulysses
# ---------------------------------------------------------------------------------------------------------------------

CPU = {"resources": {"num_cpus": 0.5}}
APP_CONFIG = {
    "encoder": CPU,
    # Two bundles of one fake GPU each: the replica (rank 0) on the first, the rank-1 actor on the second.
    "sketcher": {"resources": {"num_cpus": 0.5, "num_gpus": 1}, "parallel": {"ulysses_degree": 2}},
    "renderer": CPU,
    "decoder": CPU,
}


@pytest.fixture(scope="module")
def app(ray_local):
    from ray import serve

    from deployments.app import build_app
    from deployments.config import AppConfig

    config = AppConfig.model_validate(APP_CONFIG)
    assert config.sketcher.deployment_options()["placement_group_bundles"] == [{"CPU": 0.5, "GPU": 1}] * 2
    assert config.sketcher.deployment_options()["placement_group_strategy"] == "STRICT_PACK"
    serve.start(proxy_location="Disabled")
    try:
        yield serve.run(build_app(config), name=APP, route_prefix=None)
    finally:
        serve.shutdown()


def test_serve_app_ulysses2_sketcher_equals_one_rank(app, tiny_config, make_params, rel_err):
    from ray import serve

    from serve.engine import EncodeStage, Engine, RenderStage, SketchStage
    from serve.request import VideoRequest

    (rank1,) = _worker_pids()  # the sketch replica's second rank
    # "odd": 3x3x3 = 27 tokens over 2 ranks, so xfuser pads the sequence (and USP must ignore the padding).
    requests = {"even": make_params(**STEPS), "odd": make_params(height=48, width=48, num_frames=9, seed=1, **STEPS)}
    embeds = dict(zip(requests, EncodeStage(tiny_config)(list(requests.values()))))
    sketcher, renderer = SketchStage(tiny_config), RenderStage(tiny_config)
    store = serve.get_deployment_handle("JobStore", APP)
    sketch = serve.get_deployment_handle("Sketcher", APP)
    render = serve.get_deployment_handle("Renderer", APP)
    for key, params in requests.items():
        job = store.create.remote(params).result()
        handoff = sketch.sketch.remote(job.id, params, embeds[key]).result()
        (expected,) = sketcher([(params, embeds[key])])
        assert handoff.step_index == expected.step_index == 2
        assert rel_err(handoff.latents, expected.latents) <= TOL
        final = render.render.remote(job.id, handoff).result()
        assert rel_err(final, renderer([expected])[0]) <= TOL

    # And a whole job through the ingress handle (encode, sketch on 2 ranks, render, decode).
    request = {"prompt": "a red fox in the snow", "seed": 7, "height": 32, "width": 32, "num_frames": 5, **STEPS}
    result = app.generate.remote(request).result()
    assert result.job.status == "completed" and result.job.switch_step == 2
    reference = Engine(tiny_config).generate(VideoRequest(**request).resolve(tiny_config.defaults), decode=False)
    assert rel_err(result.latents, reference.latents) <= TOL
    assert _worker_pids() == {rank1}

    # The replica stops (Serve calls Sketcher.__del__, which shuts the group down): every rank goes away.
    serve.delete(APP)
    assert _wait(lambda: not _worker_pids()), _worker_pids()
