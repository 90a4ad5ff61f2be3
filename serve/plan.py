"""One executable plan per request: encode -> denoising segments (each a model and the steps it takes) -> decode.

The plan is plain data (frozen dataclasses of strings and ints), made by `make_plan` from a resolved request and the
model pair, before anything runs. Every caller runs it the same way:
    `run_plan`                 in one process, over stage objects: the Engine (serve/engine.py) and the benchmarks
    `Plan.stages`              the Serve app's orchestrator walks these names, calling the deployment of each
                               (deployments/orchestrator.py), one checkpoint per stage in the results store
A segment's `stop` is known up front for fixed switch policies (step:K, ratio:R, boundary:R given the sampler's
timesteps) and None for the adaptive policy, which decides while sketching; the render segment then starts wherever
the sketch stopped (`start` None).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

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

    @property
    def stages(self) -> tuple[str, ...]:
        """The stage names in running order: encode, one per segment (its role), decode."""
        return ("encode", *(segment.role for segment in self.segments), "decode")


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


@dataclass
class PlanRun:
    """What `run_plan` produced for a batch: each segment's outputs by role, the final latents, decoded frames."""

    outputs: dict[str, list]
    latents: list
    frames: Any  # the decode stage's output for the batch's stacked latents (None when not decoded)


def run_plan(
    plan: Plan,
    requests: list[GenerationParams],
    encode: Callable,
    denoise: Mapping[str, Callable],
    decode: Callable | None,
    on_step: Callable | None = None,
    around: Callable[[str, Callable[[], Any]], Any] | None = None,
) -> PlanRun:
    """Run `plan` in this process for a batch of requests sharing its stages.

    `encode(requests)`, `denoise[role](inputs, on_step=...)` and `decode(latents)` are the stage objects of
    serve/engine.py (or anything with their signatures): the first segment takes (request, embeddings) pairs, each
    later one the previous segment's hand-offs. `on_step(role, index, steps_done, n)` sees every denoising step;
    `around(stage, call)` wraps each stage call (the benchmarks time it and take its memory peak)."""
    import torch

    around = around or (lambda _, call: call())
    embeds = around("encode", lambda: encode(requests))
    inputs: list = list(zip(requests, embeds))
    outputs: dict[str, list] = {}
    for segment in plan.segments:
        report = on_step and (lambda i, s, n, role=segment.role: on_step(role, i, s, n))
        inputs = outputs[segment.role] = around(
            segment.role, lambda stage=denoise[segment.role], batch=inputs: stage(batch, on_step=report))
        first = plan.segments[0]
        if segment is first and first.stop is not None:
            for handoff in inputs:
                if getattr(handoff, "step_index", first.stop) != first.stop:
                    raise RuntimeError(f"the plan sketches {first.stop} steps but the sketch stage took "
                                       f"{handoff.step_index}")
    frames = None if decode is None else around("decode", lambda: decode(torch.cat(inputs)))
    return PlanRun(outputs, inputs, frames)
