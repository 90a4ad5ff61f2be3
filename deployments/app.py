"""The app builder: a config in, the deployment graph out.

    build_app(AppConfig) -> Application     one stage deployment per deployment name of the pipeline
                                            (serve/pipeline/registry.py), the orchestrator, the ingress; each
                                            deployment's options from its typed config
    app_builder(args)                       for a Serve config YAML: `import_path: deployments.app:app_builder`
    app                                     the default (toy, CPU) app, for `serve build deployments.app:app`

The graph: Ingress -> Orchestrator -> Encoder, Sketcher, Renderer, Decoder. No deployment holds job state: every
replica opens the job store (SQLite file or PostgreSQL, `jobs.store_url`) and the results location itself. Running it
on this machine is deployments/local.py.
"""

from __future__ import annotations

from ray import serve
from ray.serve.deployment import Application

from deployments.config import AppConfig, DeploymentConfig
from deployments.ingress import Ingress
from deployments.orchestrator import Orchestrator
from deployments.stage import StageDeployment
from serve.pipeline.registry import PIPELINE
from serve.pipeline.stage import Pipeline

__all__ = ["AppConfig", "app", "app_builder", "build_app"]

APP_NAME = "srd"
# Defaults every deployment starts from; its typed config comes next, its `serve_options` last.
# A model that fails to load three times will not load on the twentieth try (Serve's default): fail the deploy in
# minutes, not after twenty loads of a 14B checkpoint.
DEFAULT_OPTIONS = {"health_check_period_s": 10.0, "health_check_timeout_s": 30.0,
                   "graceful_shutdown_timeout_s": 20.0, "max_constructor_retry_count": 3}


def deployment_options(name: str, config: DeploymentConfig) -> dict:
    """Defaults first, then what the typed config derives, then the user's `serve_options`."""
    derived = config.deployment_options()
    overrides = dict(config.serve_options)
    actor_options = {**derived.pop("ray_actor_options"), **overrides.pop("ray_actor_options", {})}
    return {**DEFAULT_OPTIONS, **derived, **overrides, "ray_actor_options": actor_options, "name": name}


def build_app(config: AppConfig, pipeline: Pipeline = PIPELINE) -> Application:
    def deployment(cls, name: str, deployment_config: DeploymentConfig):
        return serve.deployment(cls, **deployment_options(name, deployment_config))

    stages = {
        name: deployment(StageDeployment, name, config.stage_config(name)).bind(
            name, config.engine, config.stage_config(name), config.jobs, pipeline)
        for name in pipeline.deployments()
    }
    orchestrator = deployment(Orchestrator, "Orchestrator", config.orchestrator).bind(
        stages, config.engine, config.orchestrator, config.jobs, pipeline)
    return deployment(serve.ingress()(Ingress), "Ingress", config.ingress).bind(orchestrator, config)


def app_builder(args: dict) -> Application:
    """Serve's application-builder entry point: `args` from the config YAML, validated as an AppConfig."""
    return build_app(AppConfig.model_validate(args))


app = build_app(AppConfig())
