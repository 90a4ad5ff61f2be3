"""What one denoising segment hands the next (the HANDOFF artifacts of serve/pipeline/artifacts.py).

Everything needed to resume denoising exactly where the previous segment stopped: the latent, the step index, which
of the plan's segments continues it, the sampler (the diffusers scheduler object itself: UniPC is multistep, so its
state includes earlier model outputs and the last sample; plus `sampler_extra`, the state a family's pipeline keeps
outside its scheduler, e.g. CogVideoX's previous x0 and generator state), the prompt embeddings and the resolved
request. Tensors live on the CPU, so a hand-off is bytes in a file (serve/checkpoint.py) that any process resumes.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch

from serve.request import GenerationParams


def _to_device(value, device):
    if isinstance(value, torch.Tensor):
        return value.detach().to(device)
    if isinstance(value, list):
        return [_to_device(v, device) for v in value]
    return value


def move_scheduler(scheduler, device):
    """A copy of `scheduler` with all of its tensor state (sigmas, model_outputs, last_sample...) on `device`."""
    moved = copy.copy(scheduler)
    for name, value in vars(scheduler).items():
        if isinstance(value, (torch.Tensor, list)):
            setattr(moved, name, _to_device(value, device))
    return moved


@dataclass
class PromptEmbeds:
    """umT5 embeddings of one request, [1, L, D]; `negative` is None when guidance is off."""

    prompt: torch.Tensor
    negative: torch.Tensor | None

    def to(self, device, dtype=None) -> PromptEmbeds:
        neg = None if self.negative is None else self.negative.to(device, dtype)
        return PromptEmbeds(self.prompt.to(device, dtype), neg)


@dataclass
class Handoff:
    params: GenerationParams
    embeds: PromptEmbeds
    latents: torch.Tensor  # float32, the sample after `step_index` steps, in the family's layout (LatentSpec)
    step_index: int  # steps already taken (K after the sketch): the next segment starts here
    scheduler: object  # the diffusers scheduler, mid-trajectory
    segment: int = 1  # index in the request's plan (serve/switch.py) of the segment that continues the trajectory
    rates: list[float] = field(default_factory=list)  # adaptive policy's d_k values, for inspection
    timings: dict[str, float] = field(default_factory=dict)
    # Sampler state the family's pipeline keeps outside the scheduler (denoise.Sampler), tensors by name
    sampler_extra: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def preview_latents(self) -> torch.Tensor:
        """The sketch's estimate of the clean latent (UniPC keeps x0-predictions as its model outputs; CogVideoX's
        sampler keeps the last one in `sampler_extra`)."""
        if "pred_original_sample" in self.sampler_extra:
            return self.sampler_extra["pred_original_sample"]
        outputs = [o for o in getattr(self.scheduler, "model_outputs", []) if o is not None]
        return outputs[-1] if outputs else self.latents

    def cpu(self) -> Handoff:
        return Handoff(
            params=self.params, embeds=self.embeds.to("cpu"), latents=self.latents.detach().cpu(),
            step_index=self.step_index, scheduler=move_scheduler(self.scheduler, "cpu"), segment=self.segment,
            rates=list(self.rates),
            timings=dict(self.timings),
            sampler_extra={k: v.detach().cpu() for k, v in self.sampler_extra.items()},
        )
