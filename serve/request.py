"""The request schema shared by the CLI, HTTP and deployment handles.

`VideoRequest` is what a caller sends: field-level checks only, every knob optional but the prompt. The model's
defaults fill the gaps in `VideoRequest.resolve`, which also runs the checks that need them (K against N), and
returns a frozen `GenerationParams` that every stage reads.
"""

from __future__ import annotations

import dataclasses
import math
import secrets
from collections.abc import Collection, Mapping
from dataclasses import MISSING, dataclass, fields
from typing import TYPE_CHECKING

from pydantic import BaseModel, ConfigDict, Field, field_validator

from serve.priority import DEFAULT_PRIORITY, Priority
from serve.switch import SWITCH_SYNTAX, SwitchPolicy, parse_switch

if TYPE_CHECKING:
    from serve.denoise import LatentSpec
    from serve.lora import LoraSpec


class InvalidRequest(ValueError):
    """A request the engine cannot run; `field` names the offending request field."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field


@dataclass(frozen=True)
class GenerationDefaults:
    """What a model preset uses when a request leaves a field out."""

    width: int
    height: int
    num_frames: int
    num_inference_steps: int
    guidance_scale: float
    flow_shift: float
    switch: str
    fps: int = 16
    guidance_scale_2: float | None = None  # the render stage's guidance; None: the same as guidance_scale
    render_cache: float = 0.0  # render step caching; EngineConfig.defaults sets its speed profile's


@dataclass(frozen=True)
class RequestLimits:
    """What one request may cost, checked before a job is created (per preset, overridable in the app config).

    Tokens per video are the transformer's sequence length (the family's `LatentSpec.tokens`); attention's cost
    grows with its square, so with `max_steps` it bounds a request's compute and memory."""

    max_tokens_per_video: int
    max_steps: int = 100
    max_prompt_chars: int = 2000
    max_body_bytes: int = 64 * 1024

    def check(self, params: GenerationParams, spec: LatentSpec, given: Collection[str] = ()) -> None:
        """Raise InvalidRequest naming the field that goes over a limit; `given` (the fields the caller set, e.g.
        `VideoRequest.model_fields_set`) picks the name the caller used for the frame size or length."""
        for name in ("prompt", "negative_prompt"):
            if len(getattr(params, name)) > self.max_prompt_chars:
                raise InvalidRequest(name, f"`{name}` has {len(getattr(params, name))} characters; at most "
                                           f"{self.max_prompt_chars} are accepted")
        if params.num_inference_steps > self.max_steps:
            raise InvalidRequest("num_inference_steps", f"`num_inference_steps` is {params.num_inference_steps}; "
                                                        f"at most {self.max_steps} are accepted")
        tokens = spec.tokens(params.num_frames, params.height, params.width)
        if tokens > self.max_tokens_per_video:
            raise InvalidRequest(
                _token_field(params, spec, given), f"a {params.width}x{params.height} video of {params.num_frames} "
                f"frames is {tokens} tokens; at most {self.max_tokens_per_video} are accepted")


def _token_field(params: GenerationParams, spec: LatentSpec, given: Collection[str]) -> str:
    """The request field to blame for too many tokens: the larger factor (frame area in tokens, or latent frames),
    under the name the caller gave it (size, width or height; seconds or num_frames)."""
    frames, height, width = spec.grid(params.num_frames, params.height, params.width)
    spatial = (height // spec.patch[1]) * (width // spec.patch[2])
    temporal = frames // spec.patch[0]
    spatial_names = [n for n in ("size", "width", "height") if n in given]
    temporal_names = [n for n in ("seconds", "num_frames") if n in given]
    if "width" in spatial_names and "height" in spatial_names and params.height > params.width:
        spatial_names.remove("width")
    if temporal_names and (temporal > spatial or not spatial_names):
        return temporal_names[0]
    return spatial_names[0] if spatial_names else "size"


def parse_size(value: str) -> tuple[int, int]:
    """OpenAI's `size`, "WIDTHxHEIGHT", as (width, height)."""
    width, sep, height = value.lower().partition("x")
    if not sep or not width.isdigit() or not height.isdigit():
        raise ValueError(f"`size` must be WIDTHxHEIGHT in pixels, such as \"832x480\", but is {value!r}")
    return int(width), int(height)


def parse_seconds(value: str) -> float:
    """OpenAI's `seconds` (a string such as "4"): a finite, positive number of seconds."""
    try:
        seconds = float(value)
    except ValueError:
        raise ValueError(f"`seconds` must be a number of seconds such as \"4\", but is {value!r}") from None
    if not math.isfinite(seconds) or seconds <= 0 or seconds > 3600:
        raise ValueError(f"`seconds` must be a positive number of seconds (at most 3600) but is {value!r}")
    return seconds


def frames_for_seconds(seconds: float, fps: int) -> int:
    """The 4n+1 frame count (Wan's VAE compresses time 4x) nearest to `seconds` at `fps`: 4 s at 16 fps is 65
    frames; the clip then lasts (frames - 1) / fps seconds."""
    return 4 * max(0, round(seconds * fps / 4)) + 1


class LoraChoice(BaseModel):
    """One adapter a request applies to a stage's model: a name from the server's registry (GET /v1/models) and
    its scale."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    name: str = Field(description="The adapter's name in the server's registry.")
    scale: float = Field(1.0, description="Its weight: the LoRA's output times this (finite; 0 turns it off).")


class VideoRequest(BaseModel):
    """A video request. OpenAI's Video API fields (`model`, `size`, `seconds`) and diffusers' names (`width`,
    `height`, `num_frames`, ...) are both accepted; a field given both ways must agree."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    prompt: str = Field(description="What the video shows.")
    model: str | None = Field(None, description="The served model name (GET /v1/models lists it); default: the "
                                                "app's only model.")
    size: str | None = Field(None, description="OpenAI's frame size, \"WIDTHxHEIGHT\" in pixels, each a multiple "
                                               "of 16 (the same as `width` and `height`).")
    seconds: str | None = Field(
        None, description="OpenAI's clip duration in seconds, as a string. Frames = the 4n+1 count nearest to "
        "seconds x the model's fps (4n+1 because Wan's VAE compresses time 4x), e.g. \"4\" at 16 fps is 65 frames. "
        "Use `num_frames` for an exact count.")
    input_reference: object | None = Field(
        None, description="Not supported: this server does text-to-video only; a reference image is refused.")
    negative_prompt: str | None = Field(None, description="What to steer away from (classifier-free guidance).")
    width: int | None = Field(None, description="Frame width in pixels, a multiple of 16.")
    height: int | None = Field(None, description="Frame height in pixels, a multiple of 16.")
    num_frames: int | None = Field(None, description="Frame count, of the form 4n+1 (Wan's VAE is 4x temporal).")
    num_inference_steps: int | None = Field(None, description="Denoising steps N, sketch and render together.")
    guidance_scale: float | None = Field(None, description="Classifier-free guidance scale; <= 1 disables it.")
    guidance_scale_2: float | None = Field(
        None, description="Guidance scale of the render stage (diffusers' `guidance_scale_2`, Wan2.2's low-noise "
        "expert); <= 1 disables it there. Default: the model's (Wan2.2-A14B: 3.0), else the same as `guidance_scale`.")
    flow_shift: float | None = Field(None, description="Flow-matching shift of the UniPC sampler.")
    seed: int | None = Field(None, description="Seed of the initial noise (diffusers' CPU generator); random if unset.")
    switch: str | None = Field(
        None, description=f"Which model denoises which steps: {SWITCH_SYNTAX} (README, \"Switch policies\")."
    )
    render_cache: float | None = Field(
        None, ge=0.0, le=1.0, description="Render step caching: a render step reuses the last transformer output "
        "while the accumulated relative change of its input latents stays below this (0: off, the exact output; "
        "larger skips more steps, at a cost in quality). Default: the server's speed profile's (off, except with "
        "`fastest`).")
    priority: Priority | None = Field(
        None, description="Latency class: interactive, standard or batch. Each stage serves waiting work by class, "
        "then by age; a running batch of a lower class yields to a higher one at a denoising step boundary and "
        "later resumes exactly (README, \"Latency classes\"). Default: the bearer token's, else the server's.")
    sketch_loras: list[LoraChoice] | None = Field(
        None, description="LoRA adapters of the sketch (large) model, by name from GET /v1/models, each with its "
        "scale. An adapter's registry entry may bring default steps and sketch guidance, which fields given here "
        "win over.")
    render_loras: list[LoraChoice] | None = Field(
        None, description="LoRA adapters of the render (small) model, as `sketch_loras`; an adapter's default "
        "guidance is the render's (`guidance_scale_2`).")

    @field_validator("prompt")
    @classmethod
    def _prompt_not_empty(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("`prompt` must not be empty")
        return value

    @field_validator("prompt", "negative_prompt", "model")
    @classmethod
    def _utf8_text(cls, value: str | None, info) -> str | None:
        if value is not None:  # a lone surrogate (JSON "\ud800") could not be stored or encoded later
            try:
                value.encode("utf-8")
            except UnicodeEncodeError as e:
                raise ValueError(f"`{info.field_name}` is not valid Unicode text: {e.reason} at position "
                                 f"{e.start}") from None
        return value

    @field_validator("width", "height", "num_frames", "num_inference_steps", "guidance_scale", "guidance_scale_2",
                     "flow_shift", "seed", mode="before")
    @classmethod
    def _not_a_bool(cls, value, info):
        if isinstance(value, bool):  # pydantic's lax mode would read true as 1
            raise ValueError(f"`{info.field_name}` must be a number, not {str(value).lower()}")
        return value

    @field_validator("size")
    @classmethod
    def _size_parses(cls, value: str | None) -> str | None:
        if value is not None:
            for name, pixels in zip(("width", "height"), parse_size(value)):
                if pixels < 16 or pixels % 16:
                    raise ValueError(f"`size` {value!r}: the {name} must be a positive multiple of 16 but is {pixels}")
        return value

    @field_validator("seconds", mode="before")
    @classmethod
    def _seconds_parses(cls, value) -> str | None:
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, (str, int, float)):
            raise ValueError(f"`seconds` must be a string such as \"4\" but is {value!r}")
        parse_seconds(str(value))
        return str(value)

    @field_validator("input_reference")
    @classmethod
    def _no_reference(cls, value: object | None) -> None:
        if value is not None:
            raise ValueError("`input_reference` is not supported: this server generates video from text only")
        return None

    @field_validator("width", "height")
    @classmethod
    def _multiple_of_16(cls, value: int | None, info) -> int | None:
        if value is not None and (value < 16 or value % 16):
            raise ValueError(f"`{info.field_name}` must be a positive multiple of 16 but is {value}")
        return value

    @field_validator("num_frames")
    @classmethod
    def _frames_4n_plus_1(cls, value: int | None) -> int | None:
        if value is not None and (value < 1 or (value - 1) % 4):
            raise ValueError(f"`num_frames` must be of the form 4n+1 (1, 5, 9, ..., 81) but is {value}")
        return value

    @field_validator("num_inference_steps")
    @classmethod
    def _steps_positive(cls, value: int | None) -> int | None:
        if value is not None and value < 1:
            raise ValueError(f"`num_inference_steps` must be >= 1 but is {value}")
        return value

    @field_validator("guidance_scale", "guidance_scale_2")
    @classmethod
    def _guidance_non_negative(cls, value: float | None, info) -> float | None:
        if value is not None and value < 0:
            raise ValueError(f"`{info.field_name}` must be >= 0 but is {value}")
        return value

    @field_validator("flow_shift")
    @classmethod
    def _shift_positive(cls, value: float | None) -> float | None:
        if value is not None and value <= 0:
            raise ValueError(f"`flow_shift` must be > 0 but is {value}")
        return value

    @field_validator("seed")
    @classmethod
    def _seed_range(cls, value: int | None) -> int | None:
        if value is not None and not 0 <= value < 2**63:
            raise ValueError(f"`seed` must be in [0, 2**63) but is {value}")
        return value

    @field_validator("switch")
    @classmethod
    def _switch_parses(cls, value: str | None) -> str | None:
        if value is not None:
            parse_switch(value)
        return value

    def resolve(self, defaults: GenerationDefaults, priority: str = DEFAULT_PRIORITY,
                loras: Mapping[str, LoraSpec] | None = None, max_loras: int | None = None) -> GenerationParams:
        """Fill unset fields from `defaults` (and the latency class from `priority`, the caller's default); raise
        InvalidRequest for combinations that cannot run. `loras` is the server's adapter registry (serve/lora.py):
        the adapters a request names must be there, of the stage it names them for, at most `max_loras` a stage
        (the config's `max_loaded_loras`; None: no bound); their defaults (steps, guidance) come before
        `defaults`."""
        chosen: dict[str, tuple] = {}
        if self.sketch_loras or self.render_loras:
            from serve.lora import resolve_loras

            chosen, filled = resolve_loras(
                defaults, loras or {}, {"sketch_loras": self.sketch_loras, "render_loras": self.render_loras},
                {"num_inference_steps": self.num_inference_steps, "guidance_scale": self.guidance_scale,
                 "guidance_scale_2": self.guidance_scale_2}, max_loras)
            defaults = dataclasses.replace(defaults, **filled)
        steps = self.num_inference_steps or defaults.num_inference_steps
        switch = parse_switch(self.switch or defaults.switch)
        try:
            switch.check_steps(steps)
        except ValueError as e:
            raise InvalidRequest("switch", str(e)) from e
        width, height = self.width, self.height
        if self.size is not None:
            width, height = parse_size(self.size)
            for name, given, pixels in (("width", self.width, width), ("height", self.height, height)):
                if given is not None and given != pixels:
                    raise InvalidRequest("size", f"`size` {self.size!r} and `{name}` {given} disagree; give one")
        num_frames = self.num_frames
        if self.seconds is not None:
            if self.num_frames is not None:
                raise InvalidRequest("seconds", "`seconds` and `num_frames` both set the length; give one")
            num_frames = frames_for_seconds(parse_seconds(self.seconds), defaults.fps)
        return GenerationParams(
            prompt=self.prompt,
            negative_prompt=self.negative_prompt or "",
            width=width or defaults.width,
            height=height or defaults.height,
            num_frames=num_frames or defaults.num_frames,
            num_inference_steps=steps,
            guidance_scale=defaults.guidance_scale if self.guidance_scale is None else self.guidance_scale,
            flow_shift=self.flow_shift or defaults.flow_shift,
            seed=secrets.randbits(63) if self.seed is None else self.seed,
            switch=switch,
            fps=defaults.fps,
            guidance_scale_2=defaults.guidance_scale_2 if self.guidance_scale_2 is None else self.guidance_scale_2,
            render_cache=defaults.render_cache if self.render_cache is None else self.render_cache,
            priority=self.priority or priority,
            sketch_loras=chosen.get("sketch_loras", ()),
            render_loras=chosen.get("render_loras", ()),
        )


@dataclass(frozen=True)
class GenerationParams:
    """A fully resolved request: what every stage reads. Immutable, cheap to pickle."""

    prompt: str
    negative_prompt: str
    width: int
    height: int
    num_frames: int
    num_inference_steps: int
    guidance_scale: float
    flow_shift: float
    seed: int
    switch: SwitchPolicy
    fps: int
    # The render stage's guidance (None: guidance_scale). Each stage's own scale decides whether that stage runs
    # classifier-free guidance (> 1), so with both > 1 the engine equals diffusers' WanPipeline(guidance_scale,
    # guidance_scale_2); where diffusers lets the first scale alone switch CFG on or off for both experts, it differs.
    guidance_scale_2: float | None = None
    # Render step caching threshold (kernels/srd_kernels/step_cache.py); 0 is off: the output equals the uncached one.
    render_cache: float = 0.0
    priority: str = DEFAULT_PRIORITY  # latency class (serve/priority.py): how its stages' queues order it
    # LoRA adapters per stage, ((name, scale), ...) in the request's order (serve/lora.py): part of the denoising
    # stages' batch key, and of the job record and the hand-off, so a resumed job applies the same set.
    sketch_loras: tuple[tuple[str, float], ...] = ()
    render_loras: tuple[tuple[str, float], ...] = ()

    @property
    def render_guidance(self) -> float:
        return self.guidance_scale if self.guidance_scale_2 is None else self.guidance_scale_2

    @property
    def shape_key(self) -> tuple[int, int, int]:
        """Requests with equal keys have equal latent shapes and can share a batched forward."""
        return (self.num_frames, self.height, self.width)

    @property
    def do_cfg(self) -> bool:
        """Whether negative embeddings are needed: either stage guides."""
        return self.guidance_scale > 1.0 or self.render_guidance > 1.0

    def to_dict(self) -> dict:
        """Plain JSON-able data (the switch policy as its spec string), for checkpoints that must not be pickles."""
        data = {f.name: getattr(self, f.name) for f in fields(self)}
        data["switch"] = str(self.switch)
        for name in ("sketch_loras", "render_loras"):
            data[name] = [{"name": n, "scale": s} for n, s in data[name]]
        return data

    @classmethod
    def from_dict(cls, data: dict) -> GenerationParams:
        """The inverse of `to_dict`; raise ValueError on missing or unknown keys (a checkpoint from another version)."""
        names = {f.name for f in fields(cls)}
        required = {f.name for f in fields(cls) if f.default is MISSING}  # fields added later have defaults
        missing, unknown = sorted(required - set(data)), sorted(set(data) - names)
        if missing or unknown:
            raise ValueError(f"GenerationParams data has missing keys {missing} and unknown keys {unknown}")
        loras = {name: tuple((c["name"], float(c["scale"])) for c in data.get(name, ()))
                 for name in ("sketch_loras", "render_loras")}
        return cls(**{**data, "switch": parse_switch(data["switch"]), **loras})

    def loras(self, role: str) -> tuple[tuple[str, float], ...]:
        """The adapters (name, scale) the request applies to the `role` model's stage (sketch or render)."""
        return self.sketch_loras if role == "sketch" else self.render_loras
