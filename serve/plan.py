"""One executable plan per request: encode -> denoising segments (each a model and the steps it takes) -> decode.

The plan is plain data (frozen dataclasses of strings and ints), made by `make_plan` from a resolved request and the
model pair, before anything runs: the in-process Engine runs it stage by stage (serve/engine.py), and the Serve app's
orchestrator can map each entry to the deployment holding that model. A segment's `stop` is known up front for fixed
switch policies (step:K, ratio:R, boundary:R given the sampler's timesteps) and None for the adaptive policy, which
decides while sketching; the render segment then starts wherever the sketch stopped (`start` None).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from serve.models import ModelPair
from serve.request import GenerationParams


@dataclass(frozen=True)
class Segment:
    role: Literal["sketch", "render"]
    model: str  # the source (hub id or diffusers directory)
    subfolder: str | None  # the transformer inside `model` (None: "transformer", or a bare transformer directory)
    start: int | None  # first step; None: where the previous segment stopped
    stop: int | None  # one past the last step; None: decided while running (the switch policy)
    guidance_scale: float

    @property
    def steps(self) -> int | None:
        return None if self.start is None or self.stop is None else self.stop - self.start


@dataclass(frozen=True)
class Plan:
    family: str  # serve.families adapter name
    encode: str  # the source whose text encoder runs (the sketch pipeline's; shared by both models)
    segments: tuple[Segment, ...]
    decode: str  # the source whose VAE decodes (the sketch pipeline's: it owns the latent space)
    num_inference_steps: int

    @property
    def switch_step(self) -> int | None:
        """K, if known before running."""
        return self.segments[0].stop


def switch_step(params: GenerationParams, scheduler_config: dict | None = None) -> int | None:
    """K for fixed policies (boundary needs the sampler's timesteps, from `scheduler_config`); None if only running
    the sketch can tell."""
    n = params.num_inference_steps
    if params.switch.kind in ("step", "ratio"):
        import torch

        return params.switch.tracker(torch.zeros(n)).switch_step
    if params.switch.kind == "boundary" and scheduler_config is not None:
        from serve.stages import make_scheduler

        return params.switch.tracker(make_scheduler(scheduler_config, params, "cpu").timesteps).switch_step
    return None


def make_plan(family: str, params: GenerationParams, models: ModelPair, scheduler_config: dict | None = None) -> Plan:
    k = switch_step(params, scheduler_config)
    n = params.num_inference_steps
    return Plan(
        family=family,
        encode=models.sketch,
        segments=(
            Segment("sketch", models.sketch, None, 0, k, params.guidance_scale),
            Segment("render", models.render, models.render_subfolder, k, n, params.render_guidance),
        ),
        decode=models.sketch,
        num_inference_steps=n,
    )
