"""Shared fixtures: the tiny preset, built once per session into a private model cache, one local Ray for the
session, small request helpers; and the tests' tiers.

Every test runs on the CPU with the tiny preset (random weights, diffusers' layout) at tiny sizes and few steps.

Tiers (pytest markers, given here and nowhere else, by test module; `python -m pytest -q -m fast` runs one):
    fast   the engine, requests, CLI, config: no Ray, minutes on two cores
    ray    anything that starts Ray or the Serve app
    slow   training, the toy preset's quality, sequence-parallel ranks as processes, the benchmarks' smoke runs
`python -m pytest -q` runs all three. A test module that TIERS does not name (nor a pattern in it) fails
test_frontdoor_tiers.py and meanwhile counts as slow.
"""

from __future__ import annotations

import asyncio
import fnmatch
import os
import threading
from pathlib import Path

# Triton kernels (kernels/srd_kernels) run in Triton's CPU interpreter here. Set before anything imports triton: its
# own library functions are built for the mode it finds at import, and a kernel cannot mix the two.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

TIERS: dict[str, str] = {
    # fast: no Ray
    "test_batching": "fast",
    "test_checkpoint": "fast",
    "test_cli": "fast",
    "test_frontdoor_cli": "fast",
    "test_frontdoor_tiers": "fast",
    "test_handoff": "fast",
    "test_job_store": "fast",
    "test_parity": "fast",
    "test_random_init": "fast",
    "test_request": "fast",
    "test_results": "fast",
    "test_switch": "fast",
    "test_toy_data": "fast",
    "test_video": "fast",
    "test_app_config": "fast",
    "test_autoscaling": "fast",  # the cost-aware policy on synthetic load
    "test_placement": "fast",  # the placement planner and `srd plan`
    "test_simulate": "fast",  # the cluster simulator: closed forms, the app's policy and planner inside it, faults
    "test_kuberay": "fast",  # the RayService manifest against the Serve YAML and Serve's schema
    "test_metrics": "fast",  # the Grafana dashboard against the metric names (test_app scrapes the metrics)
    "test_bench_vae_tiling": "fast",
    "test_speed": "fast",  # speed profiles in the configs, the request defaults and `srd generate --speed`
    "test_lora": "fast",  # LoRA adapters per stage and request: parity with diffusers, batching, LRU, bad input
    # ray: starts Ray or the Serve app
    "test_app": "ray",
    "test_app_api": "fast",  # the HTTP API through FastAPI's TestClient, jobs driven in-process
    "test_openapi_fuzz": "fast",  # schemathesis against the API's own OpenAPI schema, in-process
    "test_app_faults": "ray",
    "test_app_parts": "fast",  # the progress reporter, in-process
    "test_drive": "fast",  # the drive loop over the stage deployments, in-process: retry, cancel, takeover
    "test_latency_classes": "fast",  # class order, aging, preemption with exact resume, elastic switch, in-process
    "test_pipeline": "fast",  # the declared pipeline, its steps, and a stage added to it
    "test_parallel_ray": "ray",
    "test_parallel_groups": "ray",  # the process and the Ray worker group under one test (a killed rank)
    "test_frontdoor_serve": "ray",
    "test_autoscaling_ray": "ray",  # the cost-aware policy driving the app (fake GPUs)
    "test_app_lora": "ray",  # LoRA adapters over HTTP: per-stage sets, the LRU in the metrics, a killed Renderer
    "test_playground": "ray",  # the web playground in headless Chromium against the app on the toy preset
    # slow: training, quality, the benchmarks' smoke runs
    "test_toy_preset": "slow",
    "test_schedules_served": "slow",  # toy-preset schedules over HTTP, in-process (20-step 64x64 videos)
    "test_toy_train": "slow",
    "test_parallel": "slow",  # sequence-parallel ranks as processes (gloo, xfuser): tens of seconds each
    "test_bench": "slow",
    "test_bench_families": "slow",
    "test_bench_scaling": "slow",
    "test_bench_serve": "slow",
    "test_bench_classes": "slow",  # the latency-class benchmark's smoke run (~35 s)
    "test_bench_kernels": "slow",
    # families of modules (fnmatch patterns), for modules not named above
    "test_app_*": "ray",
    "test_families_*": "fast",
    "test_kernels*": "fast",
    # single tests outside their module's tier ("module::test")
    "test_kernels::test_a_restarted_stage_loads_its_compiled_blocks_from_the_cache": "slow",  # two CPU compiles
    "test_app_config::test_serve_build_accepts_the_app": "ray",  # Ray's `serve build` CLI in a subprocess
    "test_playground::test_the_page_and_what_it_reads_from_the_api": "fast",  # the page's files and /v1/models
}
DEFAULT_TIER = "slow"


def tier_of(module: str, test: str | None = None) -> str | None:
    """A test's tier from TIERS: its own entry, else its module's, else the first pattern its module matches;
    None if nothing names it (it then runs as DEFAULT_TIER, and test_frontdoor_tiers.py fails)."""
    if test is not None and f"{module}::{test}" in TIERS:
        return TIERS[f"{module}::{test}"]
    if module in TIERS:
        return TIERS[module]
    return next((tier for key, tier in TIERS.items() if "*" in key and fnmatch.fnmatchcase(module, key)), None)


def pytest_collection_modifyitems(config, items):
    """Every test gets its tier marker (fast, ray or slow), here in one place (TIERS); the tiers run in that order,
    fast, slow, ray, so that the session's local Ray (`ray_cluster`), idle between the ray tier's tests but never
    free on two cores, is up only while they run."""
    tiers = {}
    for item in items:
        tiers[item] = tier_of(Path(str(item.fspath)).stem, getattr(item, "originalname", item.name)) or DEFAULT_TIER
        item.add_marker(getattr(pytest.mark, tiers[item]))
    items.sort(key=lambda item: ("fast", "slow", "ray").index(tiers[item]))

# Small enough that a denoising step takes milliseconds, large enough to have several tokens and latent frames.
SMALL = {"height": 32, "width": 32, "num_frames": 5, "num_inference_steps": 4}
PROMPT = "a red ball bouncing"


@pytest.fixture(scope="session", autouse=True)
def srd_cache(tmp_path_factory):
    """A fresh model cache for the whole session (never the user's ~/.cache/srd). Subprocesses and Ray workers
    started by tests inherit it through the environment."""
    path = tmp_path_factory.mktemp("srd-cache")
    saved = {k: os.environ.get(k) for k in ("SRD_CACHE", "TOKENIZERS_PARALLELISM")}
    os.environ["SRD_CACHE"] = str(path)
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    yield path
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture(scope="session")
def tiny_models(srd_cache):
    """The tiny preset's ModelPair: a full sketch pipeline directory and a render transformer directory."""
    from serve.tiny import ensure_tiny_models

    return ensure_tiny_models()


@pytest.fixture(scope="session")
def tiny_config(tiny_models):
    from serve.engine import EngineConfig

    return EngineConfig(preset="tiny", speed="exact")  # the parity oracle, whatever the device's default


@pytest.fixture(scope="session")
def engine(tiny_config):
    """One in-process engine on the tiny preset, shared by the tests that only read from it."""
    from serve.engine import Engine

    return Engine(tiny_config)


@pytest.fixture(scope="session")
def make_params():
    """make_params(**fields) -> GenerationParams: a validated tiny request, SMALL sizes unless overridden."""
    from serve.models import PRESETS
    from serve.request import VideoRequest

    def make(**fields):
        fields = {"prompt": PROMPT, "seed": 0, **SMALL, **fields}
        return VideoRequest(**fields).resolve(PRESETS["tiny"].defaults)

    return make


class LoopThread:
    """An asyncio event loop on a thread of its own: objects bound to one loop (a stage deployment's batch queues
    and device lock) serve every test of a module; `run(coroutine)` waits for its result."""

    def __init__(self):
        self.loop = asyncio.new_event_loop()
        threading.Thread(target=self.loop.run_forever, daemon=True, name="test-loop").start()

    def run(self, coroutine, timeout_s: float = 120.0):
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout_s)

    def close(self) -> None:
        async def cancel_the_rest():
            tasks = [task for task in asyncio.all_tasks() if task is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        self.run(cancel_the_rest())
        self.loop.call_soon_threadsafe(self.loop.stop)


@pytest.fixture(scope="module")
def loop():
    thread = LoopThread()
    yield thread
    thread.close()


class InProcessApp:
    """The app's parts in this process, without Ray: the stage deployments (deployments/stage.py) of a pipeline, each
    loaded once on `loop`, and drive loops over them, as the orchestrator runs them; a real job store and results
    directory. `driver(worker, call)` makes a Driver whose stage call may be wrapped: `call(step, job_id, params,
    run)` with `run` the real call; `start()` runs one in the background, as an orchestrator replica does."""

    def __init__(self, engine_config, jobs, loop, pipeline=None, stage_config=None):
        from ray.serve.batching import _BatchQueue

        from deployments.config import Batching, StageConfig
        from deployments.stage import StageDeployment
        from serve.jobs.results import ResultStore
        from serve.jobs.store import JobStore
        from serve.pipeline.registry import PIPELINE
        from serve.pipeline.stage import Planner

        # Serve's batch queue runs on any event loop; only its check of max_ongoing_requests against the batch size
        # reads the replica's deployment config, which exists in a replica alone.
        self._saved_warning = _BatchQueue._warn_if_max_batch_size_exceeds_max_ongoing_requests
        _BatchQueue._warn_if_max_batch_size_exceeds_max_ongoing_requests = lambda queue: None
        self.pipeline = pipeline or PIPELINE
        self.jobs, self.loop = jobs, loop
        self.store, self.results = JobStore(jobs.store, jobs.store_table), ResultStore(jobs.results)
        stage_config = stage_config or StageConfig(batching=Batching(max_batch_size=4, batch_wait_timeout_s=0.0))

        async def build():
            return {name: StageDeployment(name, engine_config, stage_config, jobs, self.pipeline)
                    for name in self.pipeline.deployments()}

        self.deployments = loop.run(build())
        self._hosts = {stage.name: self.deployments[stage.deployment] for stage in self.pipeline.stages}
        self._planner = Planner(engine_config, self.pipeline)
        self._running = []

    def driver(self, worker: str = "driver-a", call=None):
        from serve.jobs.drive import Driver

        async def real(step, job_id, params):
            return await self._hosts[step.stage].run(step, job_id, params)

        async def wrapped(step, job_id, params):
            return await call(step, job_id, params, real)

        return Driver(self.store, self._planner.steps, wrapped if call else real, self.jobs, worker)

    def start(self):
        """An orchestrator: a driver claiming and driving jobs in the background until `close`."""
        driver = self.driver("orchestrator")

        async def start():
            self._running.append(asyncio.create_task(driver.run()))

        self.loop.run(start())
        return driver

    def close(self) -> None:
        from ray.serve.batching import _BatchQueue

        for task in self._running:
            self.loop.loop.call_soon_threadsafe(task.cancel)
        _BatchQueue._warn_if_max_batch_size_exceeds_max_ongoing_requests = self._saved_warning


@pytest.fixture(scope="session")
def in_process_app():
    """InProcessApp, the class (test modules cannot import conftest)."""
    return InProcessApp


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual.double() - expected.double()).norm() / expected.double().norm())


@pytest.fixture(scope="session")
def rel_err():
    """rel_err(actual, expected) = |actual - expected| / |expected| (Frobenius norms, in float64)."""
    return relative_error


@pytest.fixture(scope="session")
def incompatible_renders(tiny_models, tmp_path_factory) -> dict[str, str]:
    """Render models the tiny sketch pipeline cannot hand over to, keyed by what differs: transformers with another
    text_dim or in_channels (built here, random weights) and a full pipeline whose VAE normalises latents differently."""
    import json
    import shutil

    from diffusers import WanTransformer3DModel

    root = tmp_path_factory.mktemp("incompatible")
    common = dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, freq_dim=64, ffn_dim=64,
                  num_layers=1, cross_attn_norm=True, qk_norm="rms_norm_across_heads", rope_max_seq_len=64)
    WanTransformer3DModel(in_channels=16, out_channels=16, text_dim=48, **common).save_pretrained(root / "text_dim")
    WanTransformer3DModel(in_channels=8, out_channels=8, text_dim=32, **common).save_pretrained(root / "in_channels")

    shutil.copytree(tiny_models.sketch, root / "vae_pipeline")
    vae_config = root / "vae_pipeline" / "vae" / "config.json"
    config = json.loads(vae_config.read_text())
    config["latents_mean"] = [m + 1.0 for m in config["latents_mean"]]
    vae_config.write_text(json.dumps(config))
    return {name: str(root / name) for name in ("text_dim", "in_channels", "vae_pipeline")}


@pytest.fixture(scope="session")
def serve_http(ray_cluster) -> str:
    """Serve on the session's Ray, its HTTP proxy on a free loopback port; the base URL. Apps come and go."""
    import socket

    from ray import serve

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()


@pytest.fixture(scope="session")
def ray_cluster(srd_cache):
    """One local Ray for every test of the session that needs one: no token auth (loopback only), CPUs for the
    stage replicas and more, two fake GPUs (sketcher and renderer each reserve one), a small object store, no
    dashboard. Reused as is if Ray is already initialised in this process. Tests delete the Serve apps they deploy
    (`serve.delete`), never Serve itself: `serve_http` keeps it for the session."""
    import ray

    if ray.is_initialized():
        yield ray
        return
    with pytest.MonkeyPatch.context() as env:
        env.setenv("RAY_AUTH_MODE", "disabled")
        # Serve checks its HTTP proxy every 10 s and replaces it after 3 failed checks: every 1 s here, so that
        # test_app_faults' killed proxy is back in seconds, not half a minute (read by Serve's controller at start).
        env.setenv("RAY_SERVE_PROXY_HEALTH_CHECK_PERIOD_S", "1")
        ray.init(num_cpus=4 + len(os.sched_getaffinity(0)), num_gpus=2, object_store_memory=100 * 1024**2,
                 include_dashboard=False, logging_level="WARNING", log_to_driver=False)
        try:
            yield ray
        finally:
            ray.shutdown()
