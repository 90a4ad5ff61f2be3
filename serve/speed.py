"""Speed profiles: one word for a whole stack of levers, declared once here and read by the engine config (and so by
the Serve config, which embeds it), `srd generate --speed` and the request defaults.

- `exact`: no lever, float32: the output equals diffusers' eager pipeline (the parity oracle).
- `fast`: bfloat16, cuDNN FP8 attention, torchao FP8 linear layers and regional compile on both denoising stages:
  the levers that stayed within 1 point of prompt adherence on the toy pair (bench/RESULTS.md, "Toy quality of
  the speed levers").
- `fastest`: `fast` plus render step caching at 0.2, the threshold that passed the same bar there.

The default is by device: `fast` on CUDA, `exact` elsewhere (on the CPU the levers cannot run, and float32 is what
the parity tests compare). A lever a stage cannot run falls back and the stage's KernelReport says why.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import MappingProxyType
from typing import Literal

from srd_kernels.config import KernelConfig

SpeedName = Literal["exact", "fast", "fastest"]


@dataclass(frozen=True)
class SpeedProfile:
    """What one speed profile sets: the compute dtype, each denoising stage's levers, the requests' render caching."""

    dtype: Literal["float32", "bfloat16"]
    sketch_kernels: KernelConfig
    render_kernels: KernelConfig
    render_cache: float  # a request's `render_cache` when it leaves it unset

    def kernels(self, role: str) -> KernelConfig:
        return getattr(self, f"{role}_kernels")


_FP8_COMPILED = KernelConfig(attention="cudnn-fp8", fp8_linear=True, compile=True)

PROFILES: MappingProxyType[str, SpeedProfile] = MappingProxyType({
    "exact": SpeedProfile("float32", KernelConfig(), KernelConfig(), render_cache=0.0),
    "fast": SpeedProfile("bfloat16", _FP8_COMPILED, _FP8_COMPILED, render_cache=0.0),
    "fastest": SpeedProfile("bfloat16", _FP8_COMPILED, _FP8_COMPILED, render_cache=0.2),
})


def default_speed(device: str) -> SpeedName:
    """The profile a config gets when it names none: `fast` on a CUDA device, `exact` elsewhere."""
    return "fast" if device.split(":")[0] == "cuda" else "exact"
