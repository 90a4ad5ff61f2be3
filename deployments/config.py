"""Typed configuration of the disaggregated app: one model per deployment, one `AppConfig` over all of them.

Each deployment's Ray Serve options (resources, replicas or autoscaling, max_ongoing_requests, placement group) are
derived here, in `deployment_options()`; the builder in deployments/app.py only merges them (defaults first, user
overrides last). Every field carries a description, so the Serve YAML's `args:` section documents itself.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from serve.engine import EngineConfig
from serve.parallel import ParallelConfig  # degrees and attention backend of a stage's worker group (validated there)


# Serve options that a typed field decides: `serve_options` may not set them a second way.
OWNED_OPTIONS = {
    "name": "the builder", "num_replicas": "num_replicas", "autoscaling_config": "autoscaling",
    "max_ongoing_requests": "max_ongoing_requests", "placement_group_bundles": "resources and parallel",
    "placement_group_strategy": "placement_strategy",
}


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
    """Ray Serve autoscaling on ongoing requests per replica (replaces `num_replicas` when set)."""

    min_replicas: int = Field(1, ge=0, description="Fewest replicas (0 lets an idle stage scale to zero).")
    max_replicas: int = Field(1, ge=1, description="Most replicas.")
    target_ongoing_requests: float = Field(2.0, gt=0, description="Ongoing requests per replica to aim for.")
    upscale_delay_s: float = Field(30.0, ge=0, description="How long load must stay high before adding replicas.")
    downscale_delay_s: float = Field(600.0, ge=0, description="How long load must stay low before removing replicas.")

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
    """A pipeline stage: a deployment that runs engine calls over batches of requests."""

    batching: Batching = Field(default_factory=Batching, description="Batching of same-shape requests.")

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
        description="Batching of same-shape decodes (an untiled 480p/81-frame VAE decode peaks at ~34 GiB alone).",
    )


class ServiceConfig(DeploymentConfig):
    """Ingress, pipeline and job store: I/O-bound (they wait on handles), so they reserve no CPU by default."""

    resources: Resources = Field(default_factory=lambda: Resources(num_cpus=0.0), description="Ray resources.")
    max_ongoing_requests: int = Field(
        1000, ge=1, description="Requests one replica takes at once; its calls are short or wait on other stages."
    )


class JobStoreConfig(ServiceConfig):
    max_finished_jobs: int = Field(
        256, ge=1,
        description="Finished jobs (records and results: mp4, latents, preview) kept in memory; the oldest go first. "
        "A 480p/81-frame job holds ~10 MB of latents plus its mp4.",
    )


class AppConfig(_Config):
    """The whole app: the engine (models, device, dtype) and one config per deployment."""

    engine: EngineConfig = Field(default_factory=EngineConfig, description="Models, device and dtype of all stages.")
    encoder: EncoderConfig = Field(default_factory=EncoderConfig, description="Text encoder stage.")
    sketcher: SketcherConfig = Field(default_factory=SketcherConfig, description="Large-model (sketch) stage.")
    renderer: RendererConfig = Field(default_factory=RendererConfig, description="Small-model (render) stage.")
    decoder: DecoderConfig = Field(default_factory=DecoderConfig, description="VAE decode and mp4 stage.")
    pipeline: ServiceConfig = Field(default_factory=ServiceConfig, description="Runs each job through the stages.")
    job_store: JobStoreConfig = Field(
        default_factory=JobStoreConfig, description="Job records and results (one replica: it holds the state)."
    )
    ingress: ServiceConfig = Field(default_factory=ServiceConfig, description="HTTP API (FastAPI) and handle API.")

    @model_validator(mode="after")
    def _cross_checks(self) -> AppConfig:
        if self.job_store.autoscaling is not None or self.job_store.num_replicas != 1:
            raise ValueError("`job_store` must have exactly one replica (it holds the job records); "
                             "remove `job_store.autoscaling` and `job_store.num_replicas`")
        if self.engine.device.startswith("cuda"):
            for name in ("encoder", "sketcher", "renderer", "decoder"):
                if getattr(self, name).resources.num_gpus <= 0:
                    raise ValueError(
                        f"`{name}.resources.num_gpus` is 0 but `engine.device` is {self.engine.device!r}: "
                        "a replica without a GPU reservation sees no CUDA device"
                    )
        return self
