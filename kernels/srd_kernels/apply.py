"""Apply a stage's `KernelConfig` to its loaded transformer and report what it chose (the stage logs the report at
load time and keeps it as `stage.kernels`)."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import torch

from srd_kernels import attention, linear, norm_rope
from srd_kernels import compile as regional
from srd_kernels.config import KernelConfig

logger = logging.getLogger(__name__)


@dataclass
class KernelReport:
    """What one stage's transformer runs with, and why (fallbacks name their reason)."""

    stage: str
    attention: str = "sdpa"
    attention_reason: str = "default"
    fp8_linear_layers: int = 0
    fp8_reason: str = "off"
    fused_norm_rope: bool = False
    norm_rope_reason: str = "off"
    compiled: bool = False
    warmup_seconds: float | None = None
    notes: list[str] = field(default_factory=list)
    speed: str | None = None  # the engine's speed profile (serve/speed.py), named in the line when set

    @property
    def fell_back(self) -> bool:
        """A lever that was asked for does not run (its reason says why)."""
        reasons = (self.attention_reason, self.fp8_reason, self.norm_rope_reason)
        return bool(self.notes) or any(r.startswith("fallback") for r in reasons)

    def line(self) -> str:
        warm = f", warm-up {self.warmup_seconds:.1f} s" if self.warmup_seconds is not None else ""
        speed = f" (speed {self.speed})" if self.speed else ""
        notes = "".join(f"; {note}" for note in self.notes)
        return (f"{self.stage} kernels{speed}: attention={self.attention} ({self.attention_reason}); "
                f"fp8_linear={self.fp8_linear_layers} layers ({self.fp8_reason}); "
                f"fused_norm_rope={self.fused_norm_rope} ({self.norm_rope_reason}); compiled={self.compiled}{warm}"
                f"{notes}")


def latent_shape(transformer, frames: int, height: int, width: int, spatial: int = 8, temporal: int = 4):
    return (1, transformer.config.in_channels, (frames - 1) // temporal + 1, height // spatial, width // spatial)


def _tokens(transformer, shape) -> int:
    p = transformer.config.patch_size
    return (shape[2] // p[0]) * (shape[3] // p[1]) * (shape[4] // p[2])


def apply_kernels(transformer: torch.nn.Module, config: KernelConfig, stage: str) -> KernelReport:
    """Set the attention backend, FP8 linear layers and regional compile on a Wan-architecture transformer."""
    report = KernelReport(stage)
    device, dtype = next(transformer.parameters()).device, transformer.dtype
    heads, head_dim = transformer.config.num_attention_heads, transformer.config.attention_head_dim
    frames = config.warmup_frames or 81
    shape = latent_shape(transformer, frames, config.warmup_height, config.warmup_width)

    backend, reason = config.attention, "configured"
    if backend == "auto":
        measured = attention.measure_backends((1, _tokens(transformer, shape), heads, head_dim), device, dtype)
        backend, reason = attention.select_backend(measured)
    elif (why := attention.unavailable(backend, device, head_dim, dtype)) is not None:
        backend, reason = "sdpa", f"fallback: {why}"
    report.attention, report.attention_reason = backend, reason

    if config.fused_norm_rope:
        why = norm_rope.unavailable(device)
        if why is None and not attention.norm_rope_fusable(transformer):
            why = "a self-attention layer's q/k norm is not a torch.nn.RMSNorm with a weight"
        report.fused_norm_rope = why is None
        if why is not None:
            report.norm_rope_reason = f"fallback to torch: {why}"
        else:
            report.norm_rope_reason = "Triton interpreter" if device.type == "cpu" else "Triton"
    if backend != "sdpa" or report.fused_norm_rope:
        attention.set_self_attention(transformer, backend, report.fused_norm_rope)

    if config.fp8_linear:
        if (why := linear.unavailable(device)) is not None:
            report.fp8_reason = f"fallback to {dtype}: {why}"
        else:
            report.fp8_linear_layers = linear.quantize_blocks_fp8(transformer)
            report.fp8_reason = "torchao dynamic FP8, rowwise"

    if config.compile:
        if config.compile_cache_dir:
            regional.set_cache_dir(config.compile_cache_dir)
        regional.compile_blocks(transformer)
        report.compiled = True
        if config.warmup_frames is not None:
            t0 = time.perf_counter()
            regional.warm_up(transformer, shape)
            report.warmup_seconds = time.perf_counter() - t0
    logger.info(report.line())
    return report
