"""The engine's configuration: which models, where, and how. Shared by the CLI, the tests and every deployment."""

from __future__ import annotations

import dataclasses
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from serve.calibration import Calibration, load_calibration
from serve.denoise import DEFAULT_MAX_TOKENS_PER_FORWARD
from serve.families.base import Family, family_of
from serve.lora import LoraSpec, adapter_state_dict, check_adapter, check_registry_names, meta_model
from serve.models import PRESETS, ModelPair, Weights, is_pipeline, preset_models
from serve.request import GenerationDefaults, GenerationParams, InvalidRequest
from serve.speed import PROFILES, SpeedName, SpeedProfile, default_speed
from serve.switch import make_plan
from srd_kernels.config import KernelConfig

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


class VaeTiling(BaseModel):
    """Tile geometry of diffusers' `AutoencoderKLWan.enable_tiling`, in pixels, used when `vae_tiling` is on.

    The defaults were chosen by measurement (bench/RESULTS.md, run 3): tiles up to 720x704 with 64 px of blended
    overlap across the width. Wan's VAE decodes one latent frame at a time with a causal feature cache, so its peak
    depends on the frame size, not on the frame count: tiling is spatial only. Frames taller than
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
    render: str | None = Field(
        None, description="Render pipeline or transformer (hub id or dir); overrides the preset. A full pipeline "
        "renders with the preset's render transformer (Wan2.2-A14B: `transformer_2`).")
    device: str = Field("cpu", description="torch device of the stage models.")
    speed: SpeedName | None = Field(
        None, description="Speed profile, one word for a stack of levers (serve/speed.py): exact (float32, no "
        "lever: diffusers' output), fast (bfloat16, FP8 attention and linear layers, regional compile on both "
        "denoising stages), fastest (fast, and requests cache render steps unless they set `render_cache`). None: "
        "by `device`, fast on cuda, exact elsewhere. `dtype`, `sketch_kernels` and `render_kernels`, where given, "
        "win over the profile's.")
    dtype: Literal["float32", "bfloat16"] | None = Field(
        None, description="Weights and activations dtype; None: the speed profile's (float32 for exact, bfloat16 "
        "for fast and fastest). Given, it wins over the profile.")
    max_tokens_per_forward: int = Field(
        DEFAULT_MAX_TOKENS_PER_FORWARD, ge=1,
        description="Rows (CFG halves, batched requests) share one transformer forward while under this many tokens.",
    )
    weights: Weights = Field(
        "pretrained",
        description="random-init builds each model from the sources' configs with random weights, for benchmarks "
        "where no checkpoint is reachable: the cost equals the real weights', the outputs are noise.",
    )
    vae_tiling: bool = Field(False, description="Decode in spatial tiles (diffusers' AutoencoderKLWan tiling).")
    vae_tile: VaeTiling = Field(default_factory=VaeTiling, description="Tile geometry when `vae_tiling` is on.")
    calibration: str | None = Field(
        None, description="The model pair's calibration file (`switch: quality:T`); default: the preset's, when its "
        "models are the preset's.")
    sketch_kernels: KernelConfig | None = Field(
        None, description="Speed levers of the sketch transformer (attention backend, FP8 linear layers, regional "
        "compile). None: the speed profile's, warmed up at the preset's default shape. Given, it replaces the "
        "profile's levers for this stage (a lever it leaves out is off).")
    render_kernels: KernelConfig | None = Field(
        None, description="Speed levers of the render transformer; None: the speed profile's (as `sketch_kernels`).")
    compile_cache_dir: str | None = Field(
        None, description="Persistent directory of TorchInductor's and Triton's compile caches for both denoising "
        "stages (a stage's own `compile_cache_dir` wins), so that a restarted replica loads compiled kernels "
        "instead of compiling for minutes; `srd warm` fills it ahead of a deployment. None: torch's default (a "
        "per-user temporary directory).")
    loras: dict[str, LoraSpec] = Field(
        default_factory=dict, description="LoRA adapters requests may name (`sketch_loras`, `render_loras`), by "
        "name: each a file, directory or hub id, the stage whose model it fits, and optional request defaults "
        "(serve/lora.py). Checked against the stage model's config before anything loads.")
    max_loaded_loras: int = Field(
        4, ge=1, description="Adapters a denoising stage keeps loaded in its transformer (per replica, least "
        "recently used evicted first); also the most adapters one request applies to a stage.")

    @field_validator("loras")
    @classmethod
    def _adapter_names(cls, value: dict[str, LoraSpec]) -> dict[str, LoraSpec]:
        check_registry_names(value)
        return value

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
    def speed_name(self) -> SpeedName:
        """The speed profile in force: `speed`, else the device's default."""
        return self.speed or default_speed(self.device)

    @property
    def speed_profile(self) -> SpeedProfile:
        return PROFILES[self.speed_name]

    @property
    def compute_dtype(self) -> str:
        """`dtype`, else the speed profile's."""
        return self.dtype or self.speed_profile.dtype

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.compute_dtype]

    @property
    def defaults(self) -> GenerationDefaults:
        """The preset's request defaults, with the speed profile's render caching."""
        return dataclasses.replace(PRESETS[self.preset].defaults, render_cache=self.speed_profile.render_cache)

    def models(self) -> ModelPair:
        """The preset's model pair with `sketch` and `render` put in its place. A render source that is a full
        pipeline keeps the preset's render subfolder (Wan2.2-A14B's `transformer_2`); a transformer directory has
        none."""
        preset = PRESETS[self.preset]
        if self.sketch and self.render:
            base = ModelPair(self.sketch, self.render)
        else:
            base = preset_models(preset)
        render = self.render or base.render
        return ModelPair(sketch=self.sketch or base.sketch, render=render,
                         render_subfolder=preset.render_subfolder if is_pipeline(render) else None)

    def pair_calibration(self) -> Calibration | None:
        """The calibration of the models this config runs: `calibration`, else the preset's for its own models."""
        path = self.calibration
        if path is None and not (self.sketch or self.render):
            path = PRESETS[self.preset].calibration
        return None if path is None else load_calibration(path)

    def check_switch(self, params: GenerationParams) -> None:
        """InvalidRequest naming `switch` when `quality:T` cannot be met here: no calibration of these models, or none
        of its schedules of that quality (a JSON file read, no weights; the family checks the rest)."""
        if params.switch.kind in ("quality", "floor"):
            try:
                make_plan(params, calibration=self.pair_calibration())
            except ValueError as e:
                raise InvalidRequest("switch", str(e)) from None

    def stage_loras(self, role: str) -> dict[str, LoraSpec]:
        """The registry's adapters of the `role` model."""
        return {name: spec for name, spec in self.loras.items() if spec.stage == role}

    def check_loras(self, roles: tuple[str, ...] = ("sketch", "render")) -> None:
        """Raise ValueError naming the adapter and the module where a registered adapter does not fit its stage's
        model: each adapter's LoRA matrices against the model built from its config on the meta device (the
        adapter files are read, no model weights load)."""
        from serve.models import ModelError

        family, pair = self.family(), self.models()
        for role in roles:
            adapters = self.stage_loras(role)
            if not adapters:
                continue
            source, subfolder = pair.transformer(role)
            model = meta_model(family.transformer_config(source, role, subfolder))
            for name, spec in adapters.items():
                try:
                    state_dict, _ = adapter_state_dict(family.pipeline_class, spec)
                    check_adapter(name, state_dict, model)
                except (OSError, ValueError, ModelError) as e:
                    raise ValueError(f"`loras.{name}` (stage {role}): {e}") from e

    def family(self) -> Family:
        """The model family adapter, from the sketch pipeline's model_index.json (no weights load)."""
        return family_of(self.models().sketch)

    def stage_kernels(self, role: str) -> KernelConfig:
        """The stage's levers: `{role}_kernels` where given, else the speed profile's, warmed up at the preset's
        default shape so that the compile happens at load; `compile_cache_dir` where the stage names none."""
        levers = getattr(self, f"{role}_kernels")
        if levers is None:
            d = self.defaults
            levers = self.speed_profile.kernels(role)
            if levers.compile:
                levers = levers.model_copy(update={"warmup_frames": d.num_frames, "warmup_height": d.height,
                                                   "warmup_width": d.width})
        if self.compile_cache_dir and levers.compile_cache_dir is None:
            levers = levers.model_copy(update={"compile_cache_dir": self.compile_cache_dir})
        return levers

    def kernels_for(self, role: str, family: Family) -> tuple[KernelConfig, str | None]:
        """The stage's levers for this family, and why the speed profile's were dropped (None: they were not).
        Levers given in `{role}_kernels` are refused before any weights load where the family's transformer has
        no support for them (the levers address Wan's blocks and self-attention layers); the profile's are
        dropped there, with the reason. So is compile on a stage that serves LoRA adapters (`_without_compile`)."""
        levers = self.stage_kernels(role)
        if levers.any and family.name != "wan":
            if getattr(self, f"{role}_kernels") is not None:
                raise ValueError(f"`{role}_kernels` sets speed levers, which support the wan family only; the model "
                                 f"pair is {family.name}")
            return KernelConfig(), (f"speed {self.speed_name}: its levers support the wan family only, the model "
                                    f"pair is {family.name}")
        if levers.compile and self.stage_loras(role):
            return self._without_compile(role, levers)
        return levers, None

    def _without_compile(self, role: str, levers: KernelConfig) -> tuple[KernelConfig, str | None]:
        """A stage with LoRA adapters runs its blocks uncompiled: PEFT's layers change the compiled blocks' modules,
        so every new adapter set recompiles them, and with fullgraph compile the block's 8th graph (dynamo's
        recompile_limit) is a hard error (README, "LoRA adapters"). Levers given with `compile` are refused; the
        profile's lose `compile` and `fp8_linear` (which pays only compiled), with the reason."""
        if getattr(self, f"{role}_kernels") is not None:
            raise ValueError(f"`{role}_kernels.compile` cannot serve the {role} stage's LoRA adapters (`loras`): "
                             "each adapter set recompiles the blocks, up to dynamo's recompile limit; turn it off")
        kept = levers.model_copy(update={"compile": False, "fp8_linear": False})
        return kept, (f"speed {self.speed_name}: compile and fp8_linear dropped, the {role} stage serves LoRA "
                      "adapters (compiled blocks recompile per adapter set)")
