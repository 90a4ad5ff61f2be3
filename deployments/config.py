"""Typed configuration of the disaggregated app: one model per deployment, one `AppConfig` over all of them.

Each deployment's Ray Serve options (resources, replicas or autoscaling, max_ongoing_requests, placement group) are
derived here, in `deployment_options()`; the builder in deployments/app.py only merges them (defaults first, user
overrides last). Every field carries a description, so the Serve YAML's `args:` section documents itself.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, model_validator

from serve.config import EngineConfig
from serve.jobs.config import JobsConfig
from serve.priority import Priority
from serve.models import PRESETS
from serve.request import RequestLimits
from serve.parallel import ParallelConfig  # degrees and attention backend of a stage's worker group (validated there)


# Serve options that a typed field decides: `serve_options` may not set them a second way.
OWNED_OPTIONS = {
    "name": "the builder", "num_replicas": "num_replicas", "autoscaling_config": "autoscaling",
    "max_ongoing_requests": "max_ongoing_requests", "placement_group_bundles": "resources and parallel",
    "placement_group_strategy": "placement_strategy",
}


def config_key(deployment: str) -> str:
    """A stage deployment's field in AppConfig (and in a Serve config's `args`): Sketcher -> `sketcher`."""
    return deployment.lower()


class _Config(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Resources(_Config):
    """What one replica (or one rank of a parallel stage) reserves from Ray."""

    num_cpus: float = Field(1.0, ge=0, description="CPUs per replica (Ray sets the replica's torch threads from it).")
    num_gpus: float = Field(0.0, ge=0, description="GPUs per replica or per rank; fractions share a GPU.")


class Batching(_Config):
    """@serve.batch settings of a stage; a batch only ever holds requests of one latent shape."""

    max_batch_size: int = Field(4, ge=1, description="Most requests one batched engine call takes.")
    batch_wait_timeout_s: float = Field(
        0.05, ge=0, description="How long a batch waits for more same-shape requests after its first one."
    )


class Autoscaling(_Config):
    """Ray Serve autoscaling (replaces `num_replicas` when set): on ongoing requests per replica, unless the Serve
    config gives the application the cost-aware policy (deployments/autoscaling.py), which sizes the stages from
    their queued work instead and uses only the bounds and delays below."""

    min_replicas: int = Field(1, ge=0, description="Fewest replicas (0 lets an idle stage scale to zero).")
    max_replicas: int = Field(1, ge=1, description="Most replicas.")
    target_ongoing_requests: float = Field(2.0, gt=0, description="Ongoing requests per replica to aim for.")
    upscale_delay_s: float = Field(30.0, ge=0, description="How long load must stay high before adding replicas.")
    downscale_delay_s: float = Field(600.0, ge=0, description="How long load must stay low before removing replicas.")
    metrics_interval_s: float = Field(10.0, gt=0, description="How often each replica reports its load.")
    look_back_period_s: float = Field(30.0, gt=0, description="The window over which reported load is averaged.")

    @model_validator(mode="after")
    def _bounds(self) -> Autoscaling:
        if self.min_replicas > self.max_replicas:
            raise ValueError(
                f"`min_replicas` ({self.min_replicas}) must not exceed `max_replicas` ({self.max_replicas})"
            )
        return self


class DeploymentConfig(_Config):
    """What every deployment of the app has: resources, replicas (fixed or autoscaled), request concurrency."""

    resources: Resources = Field(default_factory=Resources, description="Ray resources per replica.")
    num_replicas: int = Field(1, ge=1, description="Fixed replica count (ignored when `autoscaling` is set).")
    autoscaling: Autoscaling | None = Field(None, description="Autoscale between min and max replicas instead.")
    max_ongoing_requests: int = Field(16, ge=1, description="Requests one replica takes at once (others queue).")
    serve_options: dict[str, Any] = Field(
        default_factory=dict,
        description="Any other @serve.deployment option (health_check_period_s, graceful_shutdown_timeout_s, "
        "ray_actor_options.runtime_env...), applied last. Options the typed fields own are refused here.",
    )

    @model_validator(mode="after")
    def _one_place_per_option(self) -> DeploymentConfig:
        for key in OWNED_OPTIONS.keys() & self.serve_options.keys():
            raise ValueError(f"`serve_options.{key}` is set by `{OWNED_OPTIONS[key]}`; set that instead")
        for key in ("num_cpus", "num_gpus") & self.serve_options.get("ray_actor_options", {}).keys():
            raise ValueError(f"`serve_options.ray_actor_options.{key}` is set by `resources.{key}`; set that instead")
        return self

    def deployment_options(self) -> dict:
        """Serve options derived from the typed fields (the builder merges `serve_options` over them)."""
        options = {
            "max_ongoing_requests": self.max_ongoing_requests,
            "ray_actor_options": {"num_cpus": self.resources.num_cpus, "num_gpus": self.resources.num_gpus},
        }
        if self.autoscaling is None:
            options["num_replicas"] = self.num_replicas
        else:
            options["autoscaling_config"] = self.autoscaling.model_dump()
        return options


class StageConfig(DeploymentConfig):
    """A deployment of pipeline stages (deployments/stage.py): engine calls over batches of requests."""

    batching: Batching = Field(default_factory=Batching, description="Batching of same-shape requests.")

    def stage_options(self) -> dict:
        """What its stages' `load` takes from this config (serve/pipeline/stage.py)."""
        return {}

    @model_validator(mode="after")
    def _room_for_a_batch(self) -> StageConfig:
        if self.max_ongoing_requests < self.batching.max_batch_size:
            raise ValueError(
                f"`max_ongoing_requests` ({self.max_ongoing_requests}) must be >= `batching.max_batch_size` "
                f"({self.batching.max_batch_size}), else a replica never sees enough requests to fill a batch"
            )
        return self


class EncoderConfig(StageConfig):
    cache_size: int = Field(
        1024, ge=0, description="Prompt embeddings kept, keyed by (prompt, negative_prompt, guidance on); 0 disables."
    )

    def stage_options(self) -> dict:
        return {"cache_size": self.cache_size}


class DenoiserConfig(StageConfig):
    """The sketch or render stage. Its replica's GPUs come from a placement group: one bundle per rank."""

    parallel: ParallelConfig = Field(default_factory=ParallelConfig, description="Ranks per replica.")
    placement_strategy: Literal["STRICT_PACK", "PACK"] = Field(
        "STRICT_PACK", description="STRICT_PACK keeps a replica's ranks on one node (NVLink, no cross-node NCCL)."
    )

    @property
    def placement_group_bundles(self) -> list[dict[str, float]]:
        """Rank 0 is the replica itself (first bundle, as Serve requires); ranks 1.. take the others."""
        bundle = {"CPU": self.resources.num_cpus, "GPU": self.resources.num_gpus}
        return [dict(bundle) for _ in range(self.parallel.world_size)]

    def deployment_options(self) -> dict:
        return {
            **super().deployment_options(),
            "placement_group_bundles": self.placement_group_bundles,
            "placement_group_strategy": self.placement_strategy,
        }


class SketcherConfig(DenoiserConfig):
    pass


class RendererConfig(DenoiserConfig):
    pass


class DecoderConfig(StageConfig):
    batching: Batching = Field(
        default_factory=lambda: Batching(max_batch_size=1),
        description="Batching of same-shape decodes (an untiled 480p/81-frame bf16 VAE decode peaks at 4.4 GiB).",
    )


class ServiceConfig(DeploymentConfig):
    """Ingress and orchestrator: I/O-bound (they wait on handles and the store), so they reserve no CPU."""

    resources: Resources = Field(default_factory=lambda: Resources(num_cpus=0.0), description="Ray resources.")
    max_ongoing_requests: int = Field(
        1000, ge=1, description="Requests one replica takes at once; its calls are short or wait on other stages."
    )


class IngressConfig(ServiceConfig):
    max_queued_requests: int = Field(
        1000, ge=-1, description="Serve's bound on requests waiting for an ingress replica; beyond it clients get "
        "503 (-1: unbounded). Jobs themselves are bounded by `jobs.max_unfinished_jobs`.")

    def deployment_options(self) -> dict:
        return {**super().deployment_options(), "max_queued_requests": self.max_queued_requests}


class OrchestratorConfig(ServiceConfig):
    max_running_jobs: int = Field(
        256, ge=1, description="Jobs one orchestrator replica drives at once (the stages' queues do the pacing).")


class LimitsConfig(_Config):
    """Per-request limits; unset fields keep the preset's (serve/models.py)."""

    max_tokens_per_video: int | None = Field(None, ge=1, description="Tokens of a video: the transformer's sequence "
                                             "length, ((frames-1)//4+1)*(height/16)*(width/16) for Wan.")
    max_steps: int | None = Field(None, ge=1, description="Most `num_inference_steps`.")
    max_prompt_chars: int | None = Field(None, ge=1, description="Longest prompt (and negative prompt).")
    max_body_bytes: int | None = Field(None, ge=1024, description="Largest request body; beyond it 413.")

    def over(self, preset: RequestLimits) -> RequestLimits:
        return dataclasses.replace(preset, **{k: v for k, v in self.model_dump().items() if v is not None})


class TokenPriority(_Config):
    """A bearer token's default latency class."""

    token: SecretStr = Field(description="One of the accepted tokens (`tokens`, or the environment's).")
    priority: Priority = Field(description="The class of its requests that name none: interactive, standard, batch.")


class AuthConfig(_Config):
    """Optional bearer-token auth of the HTTP API: on when any token is configured. A job is visible only to the
    token that created it."""

    tokens: list[SecretStr] = Field(default_factory=list, description="Accepted bearer tokens.")
    tokens_env: str | None = Field("SRD_API_TOKENS", description="Environment variable (read in the ingress "
                                   "replica) with more tokens, comma-separated.")
    token_priorities: list[TokenPriority] = Field(
        default_factory=list, description="Per-token default latency class; other tokens' requests that name no "
        "`priority` get `jobs.classes.default`.")


class AppConfig(_Config):
    """The whole app: the engine (models, device, dtype) and one config per deployment."""

    engine: EngineConfig = Field(default_factory=EngineConfig, description="Models, device and dtype of all stages.")
    model_name: str | None = Field(None, description="The served model name (OpenAI's `model`); default: the "
                                                     "engine's preset name.")
    encoder: EncoderConfig = Field(default_factory=EncoderConfig, description="Text encoder stage.")
    sketcher: SketcherConfig = Field(default_factory=SketcherConfig, description="Large-model (sketch) stage.")
    renderer: RendererConfig = Field(default_factory=RendererConfig, description="Small-model (render) stage.")
    decoder: DecoderConfig = Field(default_factory=DecoderConfig, description="VAE decode and mp4 stage.")
    orchestrator: OrchestratorConfig = Field(default_factory=OrchestratorConfig,
                                             description="Drives jobs through the stages (stateless).")
    ingress: IngressConfig = Field(default_factory=IngressConfig, description="HTTP API (FastAPI) and handle API.")
    jobs: JobsConfig = Field(default_factory=JobsConfig, description="Job store, results location, retries.")
    limits: LimitsConfig = Field(default_factory=LimitsConfig, description="Per-request limits.")
    auth: AuthConfig = Field(default_factory=AuthConfig, description="Bearer-token auth of the HTTP API.")

    @property
    def served_model(self) -> str:
        return self.model_name or self.engine.preset

    @property
    def request_limits(self) -> RequestLimits:
        return self.limits.over(PRESETS[self.engine.preset].limits)

    def stage_config(self, deployment: str) -> StageConfig:
        """A stage deployment's config, by the deployment's name (Encoder: `encoder`); a deployment this config has
        no field for runs with StageConfig's defaults."""
        config = getattr(self, config_key(deployment), None)
        return config if isinstance(config, StageConfig) else StageConfig()

    @model_validator(mode="after")
    def _cross_checks(self) -> AppConfig:
        if self.engine.device.startswith("cuda"):
            for name in type(self).model_fields:
                if isinstance(getattr(self, name), StageConfig) and getattr(self, name).resources.num_gpus <= 0:
                    raise ValueError(
                        f"`{name}.resources.num_gpus` is 0 but `engine.device` is {self.engine.device!r}: "
                        "a replica without a GPU reservation sees no CUDA device"
                    )
        for name, role in (("sketcher", "sketch"), ("renderer", "render")):
            if self.engine.stage_loras(role) and getattr(self, name).parallel.world_size > 1:
                raise ValueError(f"`engine.loras` registers {role} adapters but `{name}.parallel` runs "
                                 f"{getattr(self, name).parallel.world_size} ranks, which load no adapters")
        return self
