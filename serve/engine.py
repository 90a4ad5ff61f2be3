"""Stage objects (each holds one stage's models) and the in-process engine that chains them.

The Ray deployments hold one stage object each; the CLI and the tests hold an `Engine`, which runs the same stage
objects one after another in one process.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from srd_kernels.apply import KernelReport, apply_kernels
from srd_kernels.config import KernelConfig
from serve import stages
from serve.families.base import Family, family_of
from serve.handoff import Handoff, PromptEmbeds
from serve.models import PRESETS, ModelPair, Weights, preset_models
from serve.plan import Plan, make_plan, run_plan
from serve.request import GenerationDefaults, GenerationParams

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


class VaeTiling(BaseModel):
    """Tile geometry of diffusers' `AutoencoderKLWan.enable_tiling`, in pixels, used when `vae_tiling` is on.

    The defaults were chosen by measurement (bench/RESULTS.md; H100, random-init weights of the real Wan2.1 VAE):
    tiles up to 720x704 with 64 px of blended overlap across the width. At 720p/81 frames in bfloat16 they cut the
    decode peak from 10.1 to 5.5 GiB for +5% time (float32 at 480p: 8.8 -> 7.4 GiB, +8.5%). At 480p/81 bfloat16 an
    untiled decode already peaks at 4.4 GiB, so tiling is off by default. diffusers' own geometry (256 px tiles,
    192 px stride) costs +138% at 480p. Wan's VAE decodes one latent frame at a time with a causal feature cache,
    so its peak depends on the frame size, not on the frame count: tiling is spatial only. Frames taller than
    `tile_sample_min_height` are split into rows `tile_sample_stride_height` apart.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    tile_sample_min_height: int = Field(720, ge=8, description="Tile height in pixels; a frame no taller is one row.")
    tile_sample_min_width: int = Field(704, ge=8, description="Tile width in pixels; a frame no wider is one column.")
    tile_sample_stride_height: int = Field(720, ge=8, description="Pixels between tile rows (tile - stride blend).")
    tile_sample_stride_width: int = Field(640, ge=8, description="Pixels between tile columns (tile - stride blend).")

    @model_validator(mode="after")
    def _tiles_cover_the_frame(self) -> VaeTiling:
        for axis in ("height", "width"):
            tile, stride = getattr(self, f"tile_sample_min_{axis}"), getattr(self, f"tile_sample_stride_{axis}")
            if tile % 8 or stride % 8:
                raise ValueError(
                    f"`tile_sample_min_{axis}` and `tile_sample_stride_{axis}` must be multiples of 8 (the VAE's "
                    f"spatial factor) but are {tile} and {stride}"
                )
            if stride > tile:
                raise ValueError(
                    f"`tile_sample_stride_{axis}` must be <= `tile_sample_min_{axis}` ({tile}) but is {stride}: "
                    f"the tiles would leave gaps"
                )
        return self


class EngineConfig(BaseModel):
    """Which models, where, and how: shared by the CLI, the tests and every deployment."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    preset: str = Field("toy", description="Model pair and request defaults: a name in serve.models.PRESETS.")
    sketch: str | None = Field(None, description="Sketch pipeline (hub id or diffusers dir); overrides the preset.")
    render: str | None = Field(None, description="Render pipeline or transformer (hub id or dir); overrides the preset.")
    device: str = Field("cpu", description="torch device of the stage models.")
    dtype: Literal["float32", "bfloat16"] = Field("float32", description="Weights and activations dtype.")
    max_tokens_per_forward: int = Field(
        stages.DEFAULT_MAX_TOKENS_PER_FORWARD, ge=1,
        description="Rows (CFG halves, batched requests) share one transformer forward while under this many tokens.",
    )
    weights: Weights = Field(
        "pretrained",
        description="random-init builds each model from the sources' configs with random weights, for benchmarks "
        "where no checkpoint is reachable: the cost equals the real weights', the outputs are noise.",
    )
    vae_tiling: bool = Field(False, description="Decode in spatial tiles (diffusers' AutoencoderKLWan tiling).")
    vae_tile: VaeTiling = Field(default_factory=VaeTiling, description="Tile geometry when `vae_tiling` is on.")
    sketch_kernels: KernelConfig = Field(
        default_factory=KernelConfig, description="Speed levers of the sketch transformer (attention backend, FP8 "
        "linear layers, regional compile); all off by default.")
    render_kernels: KernelConfig = Field(
        default_factory=KernelConfig, description="Speed levers of the render transformer; all off by default.")

    @field_validator("preset")
    @classmethod
    def _known_preset(cls, value: str) -> str:
        if value not in PRESETS:
            raise ValueError(f"`preset` must be one of {', '.join(sorted(PRESETS))} but is {value!r}")
        return value

    @field_validator("device")
    @classmethod
    def _torch_device(cls, value: str) -> str:
        # Only the spelling is checked here: a config may be built on a machine without the GPU it names (a Ray
        # head node); the loaders check that the device is there.
        try:
            torch.device(value)
        except (RuntimeError, TypeError):
            raise ValueError(f"`device` must be a torch device such as cpu, cuda or cuda:1 but is {value!r}") from None
        return value

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def defaults(self) -> GenerationDefaults:
        return PRESETS[self.preset].defaults

    def models(self) -> ModelPair:
        if self.sketch and self.render:
            return ModelPair(sketch=self.sketch, render=self.render)
        base = preset_models(PRESETS[self.preset])
        return ModelPair(sketch=self.sketch or base.sketch, render=self.render or base.render,
                         render_subfolder=None if self.render else base.render_subfolder)

    def family(self) -> Family:
        """The model family adapter, from the sketch pipeline's model_index.json (no weights load)."""
        return family_of(self.models().sketch)

    def kernels_for(self, role: str, family: Family) -> KernelConfig:
        """The stage's kernel levers, refused before any weights load where the family's transformer has no
        support for them (the levers address Wan's blocks and self-attention layers)."""
        config = getattr(self, f"{role}_kernels")
        if config.any and family.name != "wan":
            raise ValueError(f"`{role}_kernels` sets speed levers, which support the wan family only; the model "
                             f"pair is {family.name}")
        return config


def load_kernels(stage, config: EngineConfig, role: str, denoiser) -> KernelReport:
    """Apply the stage's levers to its own transformer (an injected denoiser is taken as it is)."""
    levers = config.kernels_for(role, stage.family)
    if denoiser is not None or not levers.any:
        return KernelReport(role)
    return apply_kernels(stage.denoiser.transformer, levers, role)


class EncodeStage:
    def __init__(self, config: EngineConfig):
        self.config = config
        self.family = config.family()
        self.pipe = self.family.load_pipeline(config.models().sketch, ("text_encoder", "tokenizer"), config.device,
                                              config.torch_dtype, config.weights)

    def __call__(self, requests: list[GenerationParams]) -> list[PromptEmbeds]:
        return self.family.encode(self.pipe, requests, self.config.device)


class SketchStage:
    def __init__(self, config: EngineConfig, denoiser=None):
        models = config.models()
        self.config = config
        self.family = config.family()
        self.family.check_compatible(models)
        self.scheduler_config = self.family.scheduler_config(models.sketch)
        self.spec = self.family.latent_spec(models.sketch)
        self.denoiser = denoiser or self.family.denoiser(
            self.family.load_transformer(models.sketch, "sketch", config.device, config.torch_dtype, config.weights),
            config.max_tokens_per_forward,
        )
        self.kernels = load_kernels(self, config, "sketch", denoiser)

    def __call__(self, requests: list[tuple[GenerationParams, PromptEmbeds]], on_step=None):
        for params, _ in requests:
            self.family.check_request(params)
        return stages.sketch(self.denoiser, requests, self.scheduler_config, self.spec, self.config.device, on_step,
                             self.family.sampler)


class RenderStage:
    def __init__(self, config: EngineConfig, denoiser=None):
        models = config.models()
        self.config = config
        self.family = config.family()
        self.denoiser = denoiser or self.family.denoiser(
            self.family.load_transformer(models.render, "render", config.device, config.torch_dtype, config.weights,
                                         subfolder=models.render_subfolder),
            config.max_tokens_per_forward,
        )
        self.spec = self.family.latent_spec(models.sketch)
        self.kernels = load_kernels(self, config, "render", denoiser)

    def __call__(self, handoffs: list[Handoff], on_step=None, report: dict | None = None):
        """The final latents of each hand-off, as [1, C, F', H', W'] whatever the family's own layout. `report`, if
        given, receives per hand-off index the render steps that step caching skipped (`params.render_cache`)."""
        latents = stages.render(self.denoiser, handoffs, self.config.device, on_step, self.family.sampler, report)
        return [x if isinstance(x, stages.Cancelled) else self.spec.canonical(x) for x in latents]


class DecodeStage:
    def __init__(self, config: EngineConfig):
        self.config = config
        self.family = config.family()
        self.pipe = self.family.load_pipeline(config.models().sketch, ("vae",), config.device, config.torch_dtype,
                                              config.weights)
        if config.vae_tiling:
            self.pipe.vae.enable_tiling(**config.vae_tile.model_dump())

    def __call__(self, latents: torch.Tensor) -> np.ndarray:
        return self.family.decode(self.pipe, latents)

    def preview(self, handoff: Handoff) -> np.ndarray:
        return self.family.preview(self.pipe, handoff)


@dataclass
class GenerationResult:
    params: GenerationParams
    latents: torch.Tensor  # float32 [1, C, F', H', W'], before VAE decode
    frames: np.ndarray | None  # uint8 [F, H, W, 3]
    switch_step: int
    timings: dict[str, float] = field(default_factory=dict)
    plan: Plan | None = None


class Engine:
    """All four stages in one process, running each request's plan (serve/plan.py): what `srd generate` runs."""

    def __init__(self, config: EngineConfig):
        self.family = config.family()
        self.family.check_compatible(config.models())  # a wrong model pair fails before any weights load
        for role in ("sketch", "render"):
            config.kernels_for(role, self.family)  # so do levers the family cannot take
        self.config = config
        self.encoder = EncodeStage(config)
        self.sketcher = SketchStage(config)
        self.renderer = RenderStage(config)
        self.decoder = DecodeStage(config)

    def plan(self, params: GenerationParams) -> Plan:
        """encode -> [sketch steps 0..K-1, render steps K..N-1] -> decode, for this request and this model pair."""
        return make_plan(self.family.name, params, self.config.models(), self.sketcher.scheduler_config)

    def generate(self, params: GenerationParams, decode: bool = True, on_step=None) -> GenerationResult:
        plan = self.plan(params)
        timings: dict[str, float] = {}

        def timed(stage: str, call):
            t0 = time.perf_counter()
            result = call()
            timings[stage] = time.perf_counter() - t0
            return result

        run = run_plan(plan, [params], self.encoder, {"sketch": self.sketcher, "render": self.renderer},
                       self.decoder if decode else None,
                       on_step=on_step and (lambda role, _, steps, n: on_step(role, steps, n)), around=timed)
        (handoff,) = run.outputs["sketch"]
        return GenerationResult(params, run.latents[0], None if run.frames is None else run.frames[0],
                                handoff.step_index, timings, plan)
