"""The Ray worker group (deployments/worker_group.py) on local Ray with two fake GPUs, in a replica's placement group.

Rank 0 is the replica's own process (bundle 0), rank 1 an actor on bundle 1; ranks talk over gloo and xfuser's USP
is real. First the start-up checks of the group inside a placement group, then the Serve app with a
2-rank Ulysses sketcher, compared with the one-rank engine (float32, relative error <= 1e-5), through a rank's death
and the replica's replacement, to its shutdown.
"""

from __future__ import annotations

import os
import time

import pytest

import ray

TOL = 1e-5
STEPS = {"num_inference_steps": 3, "switch": "step:2"}  # 2 sketch steps, 1 render step
APP = "srd-parallel-test"


@pytest.fixture(scope="module")
def ray_local(ray_cluster, tiny_models):
    """The session's local Ray (tests/conftest.py: two fake GPUs), with the tiny models built."""
    yield


def _worker_pids() -> set[int]:
    """Processes of ParallelWorker actors (Ray titles an actor process `ray::<Class>`), zombies excluded, of this
    session's Ray only: its processes descend from this one (another test run on the machine has its own)."""
    parents, workers = {}, set()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    state, ppid = f.read().rsplit(")", 1)[1].split()[:2]
                parents[int(entry)] = int(ppid)
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    if state != "Z" and f.read().startswith(b"ray::ParallelWorker"):
                        workers.add(int(entry))
            except (OSError, ValueError):
                pass

    def ours(pid: int) -> bool:
        while pid > 1:
            if pid == os.getpid():
                return True
            pid = parents.get(pid, 0)
        return False

    return {pid for pid in workers if ours(pid)}


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


# ---------------------------------------------------------------------------------------------------------------------
# Through the Serve app: a sketch replica with 2 fake-GPU bundles running 2-rank Ulysses
# ---------------------------------------------------------------------------------------------------------------------

CPU = {"resources": {"num_cpus": 0.5}}
APP_CONFIG = {
    "engine": {"preset": "tiny"},
    "encoder": CPU,
    # Two bundles of one fake GPU each: the replica (rank 0) on the first, the rank-1 actor on the second.
    "sketcher": {"resources": {"num_cpus": 0.5, "num_gpus": 1}, "parallel": {"ulysses_degree": 2},
                 "serve_options": {"health_check_period_s": 1.0}},
    "renderer": CPU,
    "decoder": CPU,
}


@pytest.fixture(scope="module")
def app(ray_local, serve_http, tmp_path_factory):
    from ray import serve

    from deployments.app import build_app
    from deployments.config import AppConfig

    config = AppConfig.model_validate({**APP_CONFIG, "jobs": {"data_dir": str(tmp_path_factory.mktemp("data"))}})
    assert config.sketcher.deployment_options()["placement_group_bundles"] == [{"CPU": 0.5, "GPU": 1}] * 2
    assert config.sketcher.deployment_options()["placement_group_strategy"] == "STRICT_PACK"
    try:  # on the session's Serve (tests/conftest.py `serve_http`)
        yield serve.run(build_app(config), name=APP, route_prefix=None), config
    finally:
        serve.delete(APP)


def test_serve_app_ulysses2_sketcher_equals_one_rank(app, tiny_config, make_params, rel_err):
    from ray import serve

    from serve.engine import Engine
    from serve.jobs import state as jobs
    from serve.jobs.results import ResultStore
    from serve.jobs.store import JobStore
    from serve.pipeline.artifacts import EMBEDS, HANDOFF, LATENTS
    from serve.pipeline.encode import EncodeStage
    from serve.pipeline.registry import PIPELINE
    from serve.pipeline.segment import RenderStage, SketchStage
    from serve.pipeline.stage import Planner
    from serve.request import VideoRequest

    app, config = app
    store, results = JobStore(config.jobs.store), ResultStore(config.jobs.results)

    def job_with_embeds(params, embeds) -> str:
        """A job record and its encode step's output, as the orchestrator and the encoder leave them."""
        job = store.create(jobs.new_job(params.to_dict(), "tiny"))
        results.put(job.id, EMBEDS.file, EMBEDS.encode(embeds))
        return job.id

    planner = Planner(tiny_config, PIPELINE)

    def step(params, name):
        return next(s for s in planner.steps(params) if s.name == name)

    (rank1,) = _worker_pids()  # the sketch replica's second rank
    # "odd": 3x3x3 = 27 tokens over 2 ranks, so xfuser pads the sequence (and USP must ignore the padding).
    requests = {"even": make_params(**STEPS), "odd": make_params(height=48, width=48, num_frames=9, seed=1, **STEPS)}
    embeds = dict(zip(requests, EncodeStage.load(tiny_config)(list(requests.values()))))
    sketcher, renderer = SketchStage.load(tiny_config), RenderStage.load(tiny_config)
    sketch = serve.get_deployment_handle("Sketcher", APP)
    render = serve.get_deployment_handle("Renderer", APP)
    for key, params in requests.items():
        job_id = job_with_embeds(params, embeds[key])
        assert sketch.run.remote(step(params, "sketch"), job_id, params).result().steps_done == 2
        handoff = HANDOFF.decode(results.get(job_id, HANDOFF.file))
        (expected,) = sketcher([(params, embeds[key])])
        assert handoff.step_index == expected.step_index == 2
        assert rel_err(handoff.latents, expected.latents) <= TOL
        render.run.remote(step(params, "render"), job_id, params).result()
        assert rel_err(LATENTS.decode(results.get(job_id, LATENTS.file)), renderer([expected])[0]) <= TOL

    # And a whole job through the ingress handle (encode, sketch on 2 ranks, render, decode).
    request = {"prompt": "a red fox in the snow", "seed": 7, "height": 32, "width": 32, "num_frames": 5, **STEPS}
    result = app.generate.remote(request).result()
    assert result.job.status == "completed" and result.job.switch_step == 2
    reference = Engine(tiny_config).generate(VideoRequest(**request).resolve(tiny_config.defaults), decode=False)
    assert rel_err(result.latents, reference.latents) <= TOL
    assert _worker_pids() == {rank1}

    # A rank dies: the next call (the new batch's prompt embeddings, sent before its first step) fails naming it, the
    # replica's health check fails, and Serve replaces the replica (its ranks with it); the new replica's group
    # computes the same result.
    os.kill(rank1, 9)
    job_id = job_with_embeds(requests["even"], embeds["even"])
    with pytest.raises(Exception, match=r"sketch worker rank 1 died during 'hold_prompts'"):
        sketch.run.remote(step(requests["even"], "sketch"), job_id, requests["even"]).result()
    assert _wait(lambda: len(_worker_pids()) == 1 and rank1 not in _worker_pids(), timeout_s=120), _worker_pids()
    (new_rank1,) = _worker_pids()
    result = app.generate.remote(request).result()
    assert result.job.status == "completed" and rel_err(result.latents, reference.latents) <= TOL

    # The replica stops (Serve calls the stage deployment's __del__, which shuts the group down): every rank goes away.
    serve.delete(APP)
    assert _wait(lambda: not _worker_pids()), _worker_pids()
