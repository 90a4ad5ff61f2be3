"""The one denoising loop: batched trajectories, classifier-free guidance, step caching.

The maths follow diffusers' `WanPipeline.__call__` line for line (same noise, timesteps, guidance formula and
scheduler calls), so that a plan's segments give what diffusers gives with the transformer swapped at the same steps,
up to float rounding. What diffusers does not offer, and is written here: stopping and resuming the loop at a step
chosen while it runs (a trajectory leaves the loop at its segment's end as a hand-off and continues later, in another
process), and one forward over the rows of several requests, each with its own timestep, guidance and sampler,
which is what lets a deployment batch requests.

Nothing per request is stored on a shared object: a `Trajectory` lives for one call, so one stage can serve
concurrent batches.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from serve.handoff import PromptEmbeds
from serve.request import GenerationParams
from serve.switch import Plan, SwitchTracker
from srd_kernels.step_cache import StepCache

# (index of the request in the call, denoising steps done so far (all segments together), N)
# -> False to cancel that request at this step boundary, PREEMPT to stop it there and keep its trajectory.
StepCallback = Callable[[int, int, int], object]
PREEMPT = "preempt"  # an on_step answer: yield the device; a preemptible trajectory leaves the loop to resume later

# Rows are stacked into one forward only while they stay under about one 480p/81-frame Wan video: at that size a
# batch of two is no faster than two calls (bench/RESULTS.md, run 1).
DEFAULT_MAX_TOKENS_PER_FORWARD = 32_768


@dataclass(frozen=True)
class Cancelled:
    """Returned in place of a result for a request whose callback asked to stop."""

    step_index: int


@dataclass(frozen=True)
class Preempted:
    """Returned by a stage deployment for a job whose segment yielded after `step_index` steps: its trajectory is
    stored (the step's `resume` artifact), and the step's next call continues it from exactly there."""

    step_index: int


def patch_tokens(frames: int, height: int, width: int, patch: tuple[int, int, int]) -> int:
    """A transformer's sequence length for a latent grid of frames x height x width, in patches."""
    return (frames // patch[0]) * (height // patch[1]) * (width // patch[2])


@dataclass(frozen=True)
class LatentSpec:
    """Latent geometry of a video VAE: channels, the temporal/spatial compression factors, the transformer's patch,
    and the axis order of the family's latents ("CF": [B, C, F', H', W'] as Wan; "FC": [B, F', C, H', W'] as
    CogVideoX). The defaults are Wan2.1's."""

    channels: int = 16
    temporal: int = 4
    spatial: int = 8
    patch: tuple[int, int, int] = (1, 2, 2)
    layout: str = "CF"

    def canonical(self, latents: torch.Tensor) -> torch.Tensor:
        """The family's latents as [B, C, F', H', W'], the layout every output uses (`--save-latents`, the LATENTS
        artifact, the decode stage's input) and the video VAEs decode."""
        return latents.permute(0, 2, 1, 3, 4).contiguous() if self.layout == "FC" else latents

    def grid(self, num_frames: int, height: int, width: int) -> tuple[int, int, int]:
        """Latent frames, height and width of a video."""
        return (num_frames - 1) // self.temporal + 1, height // self.spatial, width // self.spatial

    def shape(self, params: GenerationParams) -> tuple[int, ...]:
        f, h, w = self.grid(params.num_frames, params.height, params.width)
        return (1, f, self.channels, h, w) if self.layout == "FC" else (1, self.channels, f, h, w)

    def tokens(self, num_frames: int, height: int, width: int) -> int:
        """Tokens of a video: the transformer's sequence length, what a request's size limit counts."""
        return patch_tokens(*self.grid(num_frames, height, width), self.patch)


WAN_LATENTS = LatentSpec()


def initial_noise(params: GenerationParams, spec: LatentSpec, device) -> torch.Tensor:
    """The seed contract: the same draw as WanPipeline.prepare_latents with a CPU generator."""
    generator = torch.Generator("cpu").manual_seed(params.seed)
    # diffusers is imported here, not at the top: the ingress and the orchestrator use this module's types and
    # need not load diffusers (over a second of every replica's start on a small machine)
    from diffusers.utils.torch_utils import randn_tensor

    return randn_tensor(spec.shape(params), generator=generator, device=torch.device(device), dtype=torch.float32)


def make_scheduler(config: dict, params: GenerationParams, device):
    """A fresh sampler for one request (never shared: multistep samplers keep per-trajectory state)."""
    import diffusers

    cls = getattr(diffusers, config["_class_name"])
    overrides = {"flow_shift": params.flow_shift} if "flow_shift" in config else {}
    scheduler = cls.from_config(config, **overrides)
    scheduler.set_timesteps(params.num_inference_steps, device=device)
    if hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(0)
    return scheduler


class Sampler:
    """How a family's pipeline drives its diffusers scheduler, as hooks of the loop below.

    The default is what WanPipeline does (and most diffusers pipelines): noise from the seed, then
    `scheduler.step(output, t, latents)`, all state inside the scheduler. A family whose pipeline keeps sampler state
    outside the scheduler (CogVideoX's DPM keeps the previous x0 and draws noise from the pipeline's generator) keeps
    it in `extra`, a dict of tensors that travels in the hand-off (`Handoff.sampler_extra`)."""

    def scheduler(self, config: dict, params: GenerationParams, device):
        return make_scheduler(config, params, device)

    def initial_latents(self, params: GenerationParams, spec: LatentSpec, device, scheduler,
                        extra: dict[str, torch.Tensor]) -> torch.Tensor:
        return initial_noise(params, spec, device)

    def step(self, scheduler, extra: dict[str, torch.Tensor], output: torch.Tensor, step_index: int,
             latents: torch.Tensor) -> torch.Tensor:
        return scheduler.step(output, scheduler.timesteps[step_index], latents, return_dict=False)[0]


DEFAULT_SAMPLER = Sampler()


class GuidedDenoiser:
    """The transformer plus classifier-free guidance over the rows of several requests.

    Cond rows of all requests, then uncond rows of those with guidance > 1, are stacked and run in as few forwards
    as `max_tokens_per_forward` allows (at least one row each); the guided output is diffusers' formula
    uncond + g * (cond - uncond). The sequence-parallel denoisers in serve/parallel/ keep this interface.
    """

    def __init__(self, transformer, max_tokens_per_forward: int = DEFAULT_MAX_TOKENS_PER_FORWARD):
        self.transformer = transformer
        self.max_tokens_per_forward = max_tokens_per_forward

    @property
    def dtype(self) -> torch.dtype:
        return self.transformer.dtype

    def tokens(self, latents: torch.Tensor) -> int:
        """Sequence length of one row (Wan: [B, C, F', H', W'] latents, a (t, h, w) patch)."""
        return patch_tokens(*latents.shape[2:], self.transformer.config.patch_size)

    def call(self, latents: torch.Tensor, timesteps: torch.Tensor, embeds: torch.Tensor) -> torch.Tensor:
        """One transformer forward over these rows, with the model's own inputs (a family's denoiser adds its
        positional inputs here)."""
        return self.transformer(
            hidden_states=latents, timestep=timesteps, encoder_hidden_states=embeds, return_dict=False,
        )[0]

    def forward_rows(self, latents: torch.Tensor, timesteps: torch.Tensor, embeds: torch.Tensor) -> torch.Tensor:
        rows = max(1, self.max_tokens_per_forward // self.tokens(latents))
        outputs = [
            self.call(latents[i : i + rows], timesteps[i : i + rows], embeds[i : i + rows])
            for i in range(0, latents.shape[0], rows)
        ]
        return torch.cat(outputs)

    def __call__(
        self, latents: torch.Tensor, timesteps: torch.Tensor, embeds: list[PromptEmbeds], guidance: list[float]
    ) -> torch.Tensor:
        dtype = self.dtype
        x = latents.to(dtype)
        guided = [i for i, g in enumerate(guidance) if g > 1.0]
        all_x = torch.cat([x, x[guided]])
        all_t = torch.cat([timesteps, timesteps[guided]])
        all_e = torch.cat([e.prompt for e in embeds] + [embeds[i].negative for i in guided]).to(dtype)
        out = self.forward_rows(all_x, all_t, all_e)
        return combine_guidance(out[: len(embeds)], out[len(embeds) :], guided, guidance)


def combine_guidance(cond: torch.Tensor, uncond: torch.Tensor, guided: list[int], guidance: list[float]):
    """Rows of `cond`, with uncond + g * (cond - uncond) for the guided ones (uncond rows in `guided` order)."""
    rows = list(cond.unbind(0))
    for j, i in enumerate(guided):
        rows[i] = uncond[j] + guidance[i] * (cond[i] - uncond[j])
    return torch.stack(rows)


@dataclass
class Trajectory:
    """One request's denoising state inside a stage call: segment `segment` of its `plan`, from `step` until `stop`
    (which an adaptive `tracker` may bring forward), or until its callback cancels it."""

    params: GenerationParams
    embeds: PromptEmbeds
    latents: torch.Tensor
    scheduler: object
    step: int
    stop: int
    guidance: float
    extra: dict[str, torch.Tensor] = field(default_factory=dict)
    tracker: SwitchTracker | None = None
    plan: Plan | None = None
    segment: int = 0
    cache: StepCache | None = None  # render step caching (params.render_cache > 0)
    cancelled: bool = False
    preempted: bool = False  # it yielded before its segment's end; its state resumes it exactly (a hand-off)
    seconds: float = 0.0

    @property
    def running(self) -> bool:
        return not self.cancelled and self.step < self.stop

    @property
    def preemptible(self) -> bool:
        """Whether all of its state is what a hand-off carries: not while an adaptive rule (its past outputs) or a
        step cache (its cached output) is part of it; those run to their segment's end."""
        return self.tracker is None and self.cache is None


def run(denoiser, trajectories: list[Trajectory], sampler: Sampler, on_step: StepCallback | None = None) -> None:
    """Advance every trajectory to its stop (or its cancel); trajectories of the same shape share forwards."""
    start = time.perf_counter()
    with torch.inference_mode():
        while True:
            running = [i for i, tr in enumerate(trajectories) if tr.running]
            if not running:
                break
            groups: dict[tuple, list[int]] = {}
            for i in running:
                groups.setdefault(tuple(trajectories[i].latents.shape), []).append(i)
            for members in groups.values():
                trs = [trajectories[i] for i in members]
                outputs = {id(tr): tr.cache.reuse(tr.latents) for tr in trs if tr.cache is not None}
                computed = [tr for tr in trs if outputs.get(id(tr)) is None]
                if computed:
                    timesteps = torch.stack([tr.scheduler.timesteps[tr.step] for tr in computed])
                    noise = denoiser(
                        torch.cat([tr.latents for tr in computed]), timesteps, [tr.embeds for tr in computed],
                        [tr.guidance for tr in computed],
                    )
                    for tr, out in zip(computed, noise.unsqueeze(1).unbind(0)):
                        outputs[id(tr)] = out
                        if tr.cache is not None:
                            tr.cache.store(tr.latents, out)
                for i, tr in zip(members, trs):
                    out = outputs[id(tr)]
                    tr.latents = sampler.step(tr.scheduler, tr.extra, out, tr.step, tr.latents)
                    tr.step += 1
                    if tr.tracker is not None and tr.tracker.after_step(tr.step - 1, out):
                        tr.stop = tr.step
                    verdict = None if on_step is None else on_step(i, tr.step, tr.params.num_inference_steps)
                    if verdict is False:
                        tr.cancelled = True
                    elif verdict == PREEMPT and tr.running and tr.preemptible:
                        tr.stop, tr.preempted = tr.step, True
                    tr.seconds = time.perf_counter() - start
