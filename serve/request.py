"""The request schema shared by the CLI, HTTP and deployment handles.

`VideoRequest` is what a caller sends: field-level checks only, every knob optional but the prompt. The model's
defaults fill the gaps in `VideoRequest.resolve`, which also runs the checks that need them (K against N), and
returns a frozen `GenerationParams` that every stage reads.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, fields

from pydantic import BaseModel, ConfigDict, Field, field_validator

from serve.switch import SwitchPolicy, parse_switch


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


class VideoRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    prompt: str = Field(description="What the video shows.")
    negative_prompt: str | None = Field(None, description="What to steer away from (classifier-free guidance).")
    width: int | None = Field(None, description="Frame width in pixels, a multiple of 16.")
    height: int | None = Field(None, description="Frame height in pixels, a multiple of 16.")
    num_frames: int | None = Field(None, description="Frame count, of the form 4n+1 (Wan's VAE is 4x temporal).")
    num_inference_steps: int | None = Field(None, description="Denoising steps N, sketch and render together.")
    guidance_scale: float | None = Field(None, description="Classifier-free guidance scale; <= 1 disables it.")
    flow_shift: float | None = Field(None, description="Flow-matching shift of the UniPC sampler.")
    seed: int | None = Field(None, description="Seed of the initial noise (diffusers' CPU generator); random if unset.")
    switch: str | None = Field(
        None, description="When sketching hands over: step:K | ratio:R | adaptive:THR[:MIN:MAX] | boundary:R."
    )

    @field_validator("prompt")
    @classmethod
    def _prompt_not_empty(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("`prompt` must not be empty")
        return value

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

    @field_validator("guidance_scale")
    @classmethod
    def _guidance_non_negative(cls, value: float | None) -> float | None:
        if value is not None and value < 0:
            raise ValueError(f"`guidance_scale` must be >= 0 but is {value}")
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

    def resolve(self, defaults: GenerationDefaults) -> GenerationParams:
        """Fill unset fields from `defaults`; raise InvalidRequest for combinations that cannot run."""
        steps = self.num_inference_steps or defaults.num_inference_steps
        switch = parse_switch(self.switch or defaults.switch)
        try:
            switch.check_steps(steps)
        except ValueError as e:
            raise InvalidRequest("switch", str(e)) from e
        return GenerationParams(
            prompt=self.prompt,
            negative_prompt=self.negative_prompt or "",
            width=self.width or defaults.width,
            height=self.height or defaults.height,
            num_frames=self.num_frames or defaults.num_frames,
            num_inference_steps=steps,
            guidance_scale=defaults.guidance_scale if self.guidance_scale is None else self.guidance_scale,
            flow_shift=self.flow_shift or defaults.flow_shift,
            seed=secrets.randbits(63) if self.seed is None else self.seed,
            switch=switch,
            fps=defaults.fps,
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

    @property
    def shape_key(self) -> tuple[int, int, int]:
        """Requests with equal keys have equal latent shapes and can share a batched forward."""
        return (self.num_frames, self.height, self.width)

    @property
    def do_cfg(self) -> bool:
        return self.guidance_scale > 1.0

    def to_dict(self) -> dict:
        """Plain JSON-able data (the switch policy as its spec string), for checkpoints that must not be pickles."""
        data = {f.name: getattr(self, f.name) for f in fields(self)}
        data["switch"] = str(self.switch)
        return data

    @classmethod
    def from_dict(cls, data: dict) -> GenerationParams:
        """The inverse of `to_dict`; raise ValueError on missing or unknown keys (a checkpoint from another version)."""
        names = {f.name for f in fields(cls)}
        missing, unknown = sorted(names - set(data)), sorted(set(data) - names)
        if missing or unknown:
            raise ValueError(f"GenerationParams data has missing keys {missing} and unknown keys {unknown}")
        return cls(**{**data, "switch": parse_switch(data["switch"])})
