"""The app's layout as the simulator runs it, taken from the app's own decisions: the placement planner
(serve.placement.plan, gpu_shares, serve_config) and the typed AppConfig that a Serve config's `args` validate into
(deployments/config.py). A Serve config file (`srd plan --write-config`, deployments/configs/gpu.yaml) can be
simulated as it is."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import yaml

from deployments.config import AppConfig, Autoscaling, Batching, config_key
from deployments.simulate.config import DEPLOYMENTS, LayoutConfig
from serve.models import PRESETS
from serve.pipeline.registry import PIPELINE
from serve.placement import (CARDS, MEMORY_HEADROOM, SIDE_GPU_SHARE, Placement, gpu_shares, plan, serve_config,
                             video_cost)
from serve.request import GenerationParams, VideoRequest
from serve.switch import make_plan


@dataclass(frozen=True)
class DeploymentSpec:
    """One stage deployment: its GPU share, replicas, batching and autoscaling bounds."""

    name: str
    num_gpus: float
    replicas: int  # fixed count, or the autoscaled start (min_replicas, as Serve starts it)
    autoscaling: Autoscaling | None
    max_ongoing_requests: int
    batching: Batching


@dataclass(frozen=True)
class Layout:
    """Every stage deployment, the app-level policy's kwargs and the orchestrators."""

    deployments: dict[str, DeploymentSpec]
    policy_kwargs: dict
    max_running_jobs: int
    lines: list[str] = field(default_factory=list)  # what the planner printed, for the report


def plan_params(request: dict, preset: str) -> GenerationParams:
    """The planning request resolved against the preset, as `srd plan` resolves its flags."""
    return VideoRequest(prompt="plan", seed=0, **request).resolve(PRESETS[preset].defaults)


def sketch_steps(params: GenerationParams) -> int:
    """K: the large model's steps of the request's plan (all its sketch segments), as `srd plan` counts them."""
    return sum(s.stop - s.start for s in make_plan(params).segments if s.role == "sketch")


def all_sketch_placement(gpus: int, card_name: str, params: GenerationParams) -> Placement:
    """Every GPU a sketcher, the encoder and decoder beside them at the planner's side shares, one renderer (it
    only passes step:N requests' empty render segment on) at a side share: the all-14B deployment on `gpus`."""
    card = CARDS[card_name]
    n = params.num_inference_steps
    cost = video_cost(card, params.height, params.width, params.num_frames, n, n, params.guidance_scale > 1)
    need = cost.sketch_gib + cost.side_gib + cost.render_gib
    if need > card.memory_gib * MEMORY_HEADROOM:
        raise ValueError(f"an all-sketch GPU needs {need:.1f} GiB, over a {card.name}'s room")
    shares = {**gpu_shares("sketchers"), "renderer": SIDE_GPU_SHARE}
    rate = gpus / (cost.sketch_s + cost.encode_s + cost.decode_s)
    return Placement(gpus, card, cost, gpus, 1, "sketchers", shares, 3600 * rate)


def from_serve_config(doc: dict, config: LayoutConfig, lines: list[str]) -> Layout:
    (application,) = doc["applications"]
    app = AppConfig.model_validate(application.get("args") or {})
    policy = (application.get("autoscaling_policy") or {})
    kwargs = {**(policy.get("policy_kwargs") or {}), **config.policy_kwargs}
    specs = {}
    for name in DEPLOYMENTS:
        stage = app.stage_config(name)
        auto = stage.autoscaling
        if auto is not None:
            bounds = {"min_replicas": config.min_replicas.get(name, auto.min_replicas),
                      "max_replicas": config.max_replicas.get(name, auto.max_replicas)}
            if config.target_ongoing_requests is not None:
                bounds["target_ongoing_requests"] = config.target_ongoing_requests
            auto = auto.model_copy(update=bounds)
        batching = stage.batching.model_copy(update=config.batching.get(name, {}))
        ongoing = config.max_ongoing_requests.get(name, stage.max_ongoing_requests)
        if ongoing < batching.max_batch_size:
            raise ValueError(f"`layout.max_ongoing_requests.{name}` ({ongoing}) must be >= its batch size "
                             f"({batching.max_batch_size})")
        if getattr(stage, "parallel", None) is not None and stage.parallel.world_size > 1:
            raise ValueError(f"`{config_key(name)}.parallel`: replicas of several ranks are not simulated")
        specs[name] = DeploymentSpec(name, stage.resources.num_gpus, auto.min_replicas if auto else stage.num_replicas,
                                     auto, ongoing, batching)
    running = config.max_running_jobs or app.orchestrator.max_running_jobs
    return Layout(specs, kwargs, running, lines)


def build_layout(config: LayoutConfig, gpus: int, card: str, preset: str, config_dir: Path | None = None) -> Layout:
    """The layout of `config` on `gpus` devices of `card`."""
    if config.kind == "serve-config":
        path = Path(config.serve_config)
        if not path.is_absolute() and config_dir is not None:
            path = config_dir / path
        return from_serve_config(yaml.safe_load(path.read_text()), config, [f"Serve config {path}"])
    if card not in CARDS:
        raise ValueError(f"`cluster.card` {card!r} is not in the cost table; it has {', '.join(CARDS)}")
    params = plan_params(config.plan_request, preset)
    k = sketch_steps(params)
    if config.kind == "all-sketch":
        placement = all_sketch_placement(gpus, card, params)
    else:
        placement = plan(gpus, CARDS[card], params.height, params.width, params.num_frames,
                         params.num_inference_steps, k, params.guidance_scale > 1)
    doc = serve_config(placement, preset)
    head = f"{config.kind}: {params.height}x{params.width}x{params.num_frames}, N={params.num_inference_steps}, K={k}"
    return from_serve_config(doc, config, [head, *placement.lines()])


def stage_deployment(stage: str) -> str:
    """The deployment that hosts a stage (serve/pipeline/registry.py)."""
    return PIPELINE.stage(stage).deployment
