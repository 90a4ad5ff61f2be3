"""The app builder and the ways to run the app.

    build_app(AppConfig) -> Application     the deployment graph, each deployment's options from its typed config
    app_builder(args)                       for a Serve config YAML: `import_path: deployments.app:app_builder`
    app                                     the default (tiny, CPU) app, for `serve build deployments.app:app`
    run_local(...)                          `srd serve`: local Ray, the app over HTTP, until Ctrl-C
    generate_local(...)                     `srd generate --via-serve`: one job through the app on local Ray

The graph: Ingress -> Pipeline -> Encoder, Sketcher, Renderer, Decoder; all of them -> JobStore.
"""

from __future__ import annotations

import importlib
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path

import yaml
from ray import serve
from ray.serve.deployment import Application

from deployments.config import AppConfig, DeploymentConfig, Resources
from deployments.decoder import Decoder
from deployments.encoder import Encoder
from deployments.ingress import Ingress
from deployments.jobs import TERMINAL, JobStore, VideoJob, VideoResult
from deployments.pipeline import Pipeline
from deployments.renderer import Renderer
from deployments.sketcher import Sketcher
from serve.engine import EngineConfig
from serve.request import VideoRequest

__all__ = ["AppConfig", "app", "app_builder", "build_app", "generate_local", "run_local"]

APP_NAME = "srd"
# Defaults every deployment starts from; its typed config comes next, its `serve_options` last.
DEFAULT_OPTIONS = {"health_check_period_s": 10.0, "health_check_timeout_s": 30.0,
                   "graceful_shutdown_timeout_s": 20.0}


def deployment_options(name: str, config: DeploymentConfig) -> dict:
    """Defaults first, then what the typed config derives, then the user's `serve_options`."""
    derived = config.deployment_options()
    overrides = dict(config.serve_options)
    actor_options = {**derived.pop("ray_actor_options"), **overrides.pop("ray_actor_options", {})}
    return {**DEFAULT_OPTIONS, **derived, **overrides, "ray_actor_options": actor_options, "name": name}


def build_app(config: AppConfig) -> Application:
    def deployment(cls, name: str, deployment_config: DeploymentConfig):
        return serve.deployment(cls, **deployment_options(name, deployment_config))

    engine = config.engine
    store = deployment(JobStore, "JobStore", config.job_store).bind(config.job_store.max_finished_jobs)
    encoder = deployment(Encoder, "Encoder", config.encoder).bind(engine, config.encoder, store)
    sketcher = deployment(Sketcher, "Sketcher", config.sketcher).bind(engine, config.sketcher, store)
    renderer = deployment(Renderer, "Renderer", config.renderer).bind(engine, config.renderer, store)
    decoder = deployment(Decoder, "Decoder", config.decoder).bind(engine, config.decoder, store)
    pipeline = deployment(Pipeline, "Pipeline", config.pipeline).bind(encoder, sketcher, renderer, decoder, store)
    return deployment(Ingress, "Ingress", config.ingress).bind(pipeline, store, engine.defaults)


def app_builder(args: dict) -> Application:
    """Serve's application-builder entry point: `args` from the config YAML, validated as an AppConfig."""
    return build_app(AppConfig.model_validate(args))


app = build_app(AppConfig())


def local_config(engine: EngineConfig) -> AppConfig:
    """The app on this one machine: the four stages share its CPUs (a quarter each, so they fit however few cores
    it has) and, on CUDA, GPU 0 (a quarter each)."""
    cpus = len(os.sched_getaffinity(0)) / 4
    share = Resources(num_cpus=cpus, num_gpus=0.25 if engine.device.startswith("cuda") else 0.0)
    return AppConfig.model_validate({
        "engine": engine.model_dump(),
        **{stage: {"resources": share.model_dump()} for stage in ("encoder", "sketcher", "renderer", "decoder")},
    })


def load_serve_config(config_path: str) -> list[tuple[str, str | None, Application]]:
    """The applications of a Serve config YAML (as `serve deploy` takes it): (name, route_prefix, app) each."""
    from ray.serve.schema import ServeDeploySchema

    path = Path(config_path)
    if not path.is_file():
        raise ValueError(f"--config {config_path!r} is not a file")
    schema = ServeDeploySchema.model_validate(yaml.safe_load(path.read_text()))
    apps = []
    for spec in schema.applications:
        if spec.deployments or spec.runtime_env:
            raise ValueError(
                f"application {spec.name!r} in {config_path!r} sets `deployments` or `runtime_env`, which "
                "`srd serve` does not apply: put deployment settings in `args` (AppConfig), or use `serve run`"
            )
        module_name, _, attr = spec.import_path.partition(":")
        target = getattr(importlib.import_module(module_name), attr)
        built = target if isinstance(target, Application) else target(spec.args or {})
        apps.append((spec.name, spec.route_prefix, built))
    return apps


def run_local(config_path: str | None = None, preset: str = "toy", host: str = "127.0.0.1", port: int = 8000) -> None:
    """`srd serve`: start (or join, with RAY_ADDRESS) Ray, deploy the app, serve HTTP on host:port until Ctrl-C."""
    import ray

    if config_path:
        apps = load_serve_config(config_path)
    else:
        apps = [(APP_NAME, "/", build_app(local_config(EngineConfig(preset=preset))))]
    ray.init()
    try:
        serve.start(http_options={"host": host, "port": port})
        for name, route_prefix, application in apps:
            serve.run(application, name=name, route_prefix=route_prefix)
        print(f"srd serve: {', '.join(n for n, _, _ in apps)} ready on http://{host}:{port} "
              f"(API docs at /docs); Ctrl-C stops", flush=True)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        serve.shutdown()
        ray.shutdown()


def generate_local(request: VideoRequest, engine: EngineConfig,
                   on_update: Callable[[VideoJob], None] | None = None, poll_s: float = 0.2) -> VideoResult:
    """One job through the disaggregated app on a local Ray (no HTTP proxy), over its deployment handle.

    Starts Ray and the app, submits, reports every status change to `on_update`, and shuts down what it started.
    """
    import ray

    started = not ray.is_initialized()
    if started:  # quiet: progress goes to `on_update`, a failure into the job's record; warnings still show
        ray.init(logging_level=logging.WARNING)
    try:
        quiet = {"log_level": "WARNING", "enable_access_log": False}
        serve.start(proxy_location="Disabled", logging_config=quiet)
        handle = serve.run(build_app(local_config(engine)), name=f"{APP_NAME}-generate", route_prefix=None,
                           logging_config=quiet)
        job = handle.submit.remote(request).result()
        while job.status not in TERMINAL:
            time.sleep(poll_s)
            updated = handle.status.remote(job.id).result()
            if on_update is not None and updated.version != job.version:
                on_update(updated)
            job = updated
        return handle.result.remote(job.id).result()
    finally:
        if started:
            serve.shutdown()
            ray.shutdown()
        else:
            serve.delete(f"{APP_NAME}-generate")
