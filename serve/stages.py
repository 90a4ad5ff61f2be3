"""The four stages as plain functions over torch tensors, and the classes that hold each stage's models.

    encode(prompts) -> PromptEmbeds           umT5, once per request, shared by both models
    sketch(requests) -> Handoff               large model, steps 0..K-1 (K from the switch policy)
    render(handoffs) -> latents               small model, steps K..N-1, resuming the same sampler
    decode(latents) -> frames                 Wan VAE

The denoising maths follow diffusers' `WanPipeline.__call__` line for line (same noise, timesteps, guidance formula
and scheduler calls), so that with switch step:K the result equals WanPipeline(transformer, transformer_2,
boundary_ratio) bit for bit up to float rounding. What diffusers does not offer, and is written here: stopping and
resuming the loop at a step chosen while it runs, and one forward over the rows of several requests (each with its
own timestep, guidance and sampler), which is what lets a deployment batch requests.

Each call takes a list of requests; nothing per request is stored on a shared object, so one stage object can
serve concurrent batches.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from srd_kernels.step_cache import StepCache
from serve.handoff import Handoff, PromptEmbeds, move_scheduler
from serve.request import GenerationParams
from serve.switch import SwitchTracker

# (index of the request in the call, denoising steps done so far (sketch and render count together), N)
# -> False to cancel that request at this step boundary.
StepCallback = Callable[[int, int, int], bool]

# One 480p/81-frame Wan video is 32,760 tokens: at that size a batch of 2 is no faster than 2 calls (DESIGN.md),
# so rows are only stacked while they stay under about one such video.
DEFAULT_MAX_TOKENS_PER_FORWARD = 32_768


@dataclass(frozen=True)
class Cancelled:
    """Returned in place of a result for a request whose callback asked to stop."""

    step_index: int


@dataclass(frozen=True)
class LatentSpec:
    """Latent geometry of a video VAE: channels, the temporal/spatial compression factors, the transformer's patch,
    and the axis order of the family's latents ("CF": [B, C, F', H', W'] as Wan; "FC": [B, F', C, H', W'] as
    CogVideoX)."""

    channels: int = 16
    temporal: int = 4
    spatial: int = 8
    patch: tuple[int, int, int] = (1, 2, 2)
    layout: str = "CF"

    def canonical(self, latents: torch.Tensor) -> torch.Tensor:
        """The family's latents as [B, C, F', H', W'], the layout every output uses (DESIGN.md: `--save-latents`,
        the LATENTS checkpoint, the decode stage's input) and the video VAEs decode."""
        return latents.permute(0, 2, 1, 3, 4).contiguous() if self.layout == "FC" else latents

    def shape(self, params: GenerationParams) -> tuple[int, ...]:
        frames = (params.num_frames - 1) // self.temporal + 1
        h, w = params.height // self.spatial, params.width // self.spatial
        return (1, frames, self.channels, h, w) if self.layout == "FC" else (1, self.channels, frames, h, w)

    def tokens(self, params: GenerationParams) -> int:
        shape = self.shape(params)
        f, h, w = (shape[1] if self.layout == "FC" else shape[2]), shape[3], shape[4]
        return (f // self.patch[0]) * (h // self.patch[1]) * (w // self.patch[2])


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
    """How a family's pipeline drives its diffusers scheduler, as hooks of the one denoising loop below.

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
        _, _, f, h, w = latents.shape
        p = self.transformer.config.patch_size
        return (f // p[0]) * (h // p[1]) * (w // p[2])

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
class _Trajectory:
    """One request's denoising state inside a stage call (never outlives the call)."""

    params: GenerationParams
    embeds: PromptEmbeds
    latents: torch.Tensor
    scheduler: object
    step: int
    guidance: float
    extra: dict[str, torch.Tensor] = field(default_factory=dict)
    tracker: SwitchTracker | None = None
    stopped: bool = False
    cancelled: bool = False
    seconds: float = 0.0
    rates: list[float] = field(default_factory=list)
    cache: StepCache | None = None  # render step caching (params.render_cache > 0)

    @property
    def running(self) -> bool:
        return not (self.stopped or self.cancelled or self.step >= self.params.num_inference_steps)


def _denoise(denoiser, trajectories: list[_Trajectory], on_step: StepCallback | None, sampler: Sampler) -> None:
    """Advance every trajectory until it finishes, switches (sketch) or is cancelled; same-shape ones share forwards."""
    start = time.perf_counter()
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
            run = [tr for tr in trs if outputs.get(id(tr)) is None]
            if run:
                timesteps = torch.stack([tr.scheduler.timesteps[tr.step] for tr in run])
                noise = denoiser(
                    torch.cat([tr.latents for tr in run]), timesteps, [tr.embeds for tr in run],
                    [tr.guidance for tr in run],
                )
                for tr, out in zip(run, noise.unsqueeze(1).unbind(0)):
                    outputs[id(tr)] = out
                    if tr.cache is not None:
                        tr.cache.store(tr.latents, out)
            for i, tr in zip(members, trs):
                out = outputs[id(tr)]
                tr.latents = sampler.step(tr.scheduler, tr.extra, out, tr.step, tr.latents)
                tr.step += 1
                if tr.tracker is not None and tr.tracker.after_step(tr.step - 1, out):
                    tr.stopped = True
                if on_step is not None and on_step(i, tr.step, tr.params.num_inference_steps) is False:
                    tr.cancelled = True
                tr.seconds = time.perf_counter() - start


def sketch(
    denoiser,
    requests: list[tuple[GenerationParams, PromptEmbeds]],
    scheduler_config: dict,
    spec: LatentSpec,
    device,
    on_step: StepCallback | None = None,
    sampler: Sampler = DEFAULT_SAMPLER,
) -> list[Handoff | Cancelled]:
    """Run each request from pure noise until its switch policy hands over (or it reaches N)."""
    trajectories = []
    for params, embeds in requests:
        scheduler = sampler.scheduler(scheduler_config, params, device)
        tracker = params.switch.tracker(scheduler.timesteps)
        extra: dict[str, torch.Tensor] = {}
        latents = sampler.initial_latents(params, spec, device, scheduler, extra)
        trajectories.append(
            _Trajectory(
                params=params, embeds=embeds.to(device), latents=latents, scheduler=scheduler, step=0,
                guidance=params.guidance_scale, extra=extra, tracker=tracker, stopped=tracker.switch_step == 0,
            )
        )
    with torch.inference_mode():
        _denoise(denoiser, trajectories, on_step, sampler)
    return [
        Cancelled(tr.step) if tr.cancelled else Handoff(
            params=tr.params, embeds=tr.embeds, latents=tr.latents, step_index=tr.step, scheduler=tr.scheduler,
            rates=list(tr.tracker.rates), timings={"sketch": tr.seconds}, sampler_extra=tr.extra,
        ).cpu()
        for tr in trajectories
    ]


def render(denoiser, handoffs: list[Handoff], device, on_step: StepCallback | None = None,
           sampler: Sampler = DEFAULT_SAMPLER, report: dict | None = None) -> list[torch.Tensor | Cancelled]:
    """Finish each hand-off's trajectory (steps K..N-1) with the render model at the render guidance
    (`params.render_guidance`); returns float32 latents on the CPU. A request with `render_cache` > 0 reuses the
    last output on steps whose input barely moved (kernels/srd_kernels/step_cache.py); `report`, if given, receives per
    hand-off index how many render steps that skipped."""
    trajectories = [
        _Trajectory(
            params=h.params, embeds=h.embeds.to(device), latents=h.latents.to(device),
            scheduler=move_scheduler(h.scheduler, device), step=h.step_index, guidance=h.params.render_guidance,
            extra={k: v.to(device) for k, v in h.sampler_extra.items()},
            cache=StepCache(h.params.render_cache) if h.params.render_cache > 0 else None,
        )
        for h in handoffs
    ]
    with torch.inference_mode():
        _denoise(denoiser, trajectories, on_step, sampler)
    if report is not None:
        report.update({i: tr.cache.skipped if tr.cache else 0 for i, tr in enumerate(trajectories)})
    return [Cancelled(tr.step) if tr.cancelled else tr.latents.float().cpu() for tr in trajectories]


def encode(pipe, requests: list[GenerationParams], device) -> list[PromptEmbeds]:
    """umT5 embeddings through diffusers' own `encode_prompt` (padded to 512 tokens, as WanPipeline does)."""
    with torch.inference_mode():
        prompt, negative = pipe.encode_prompt(
            prompt=[r.prompt for r in requests], negative_prompt=[r.negative_prompt for r in requests],
            do_classifier_free_guidance=True, max_sequence_length=512, device=device,
        )
    return [
        PromptEmbeds(prompt[i : i + 1].cpu(), negative[i : i + 1].cpu() if r.do_cfg else None)
        for i, r in enumerate(requests)
    ]


def decode(pipe, latents: torch.Tensor) -> np.ndarray:
    """Latents [B, C, F', H', W'] -> uint8 frames [B, F, H, W, 3], as WanPipeline's output_type="np" path."""
    vae = pipe.vae
    with torch.inference_mode():
        z = latents.to(vae.device, vae.dtype)
        mean = torch.tensor(vae.config.latents_mean).view(1, vae.config.z_dim, 1, 1, 1).to(z.device, z.dtype)
        inv_std = 1.0 / torch.tensor(vae.config.latents_std).view(1, vae.config.z_dim, 1, 1, 1).to(z.device, z.dtype)
        video = vae.decode(z / inv_std + mean, return_dict=False)[0]
        frames = pipe.video_processor.postprocess_video(video, output_type="np")
    return (np.asarray(frames) * 255).round().clip(0, 255).astype(np.uint8)


def decode_preview(pipe, handoff: Handoff) -> np.ndarray:
    """One image [H, W, 3] from the first latent frame of the sketch's clean-latent estimate (Wan's VAE is causal,
    so the first latent frame decodes alone into the first video frame, at a fraction of a full decode)."""
    return decode(pipe, handoff.preview_latents[:, :, :1])[0, 0]
