"""Which speed levers a stage's transformer gets: one typed config per stage (sketch, render) in `EngineConfig`.

Every lever is off by default: the engine's default output equals diffusers' eager bf16/fp32 forward (the parity
oracle). bench/kernels.py measures each lever's speed and its error against that eager output on the H200.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

# "auto" times the importable backends at the stage's own shape at load time and keeps the fastest one whose
# output stays within the accuracy bound of its kind (kernels.attention.select_backend).
AttentionName = Literal["sdpa", "cudnn", "flash", "sage", "cudnn-fp8", "auto"]


class KernelConfig(BaseModel):
    """Speed levers of one stage's transformer, applied at load time (kernels.apply.apply_kernels)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    attention: AttentionName = Field(
        "sdpa",
        description="Self-attention backend: sdpa (torch's default dispatch, the reference), cudnn or flash "
        "(torch SDPA pinned to that kernel), sage (SageAttention, 8-bit QK), cudnn-fp8 (cuDNN frontend FP8 SDPA), "
        "or auto (time the importable ones at load and keep the fastest accurate one). A backend that cannot run "
        "here falls back to sdpa, and the stage's report says why.",
    )
    fp8_linear: bool = Field(
        False,
        description="Quantize the transformer blocks' linear layers to FP8 through torchao (dynamic activations, "
        "rowwise scales). Pays only with `compile` (unfused quantization is slower than bf16).",
    )
    fused_norm_rope: bool = Field(
        False,
        description="Self-attention's RMSNorm across heads and RoPE on q and k as one Triton kernel "
        "(srd_kernels.norm_rope) instead of about ten eager passes. Compiled blocks get such a fusion from Inductor "
        "already; this is for stages that run eagerly. Needs Triton on a CUDA device, else the stage reports the "
        "fallback.",
    )
    compile: bool = Field(
        False, description="Regional torch.compile of the repeated transformer blocks (diffusers' "
        "`compile_repeated_blocks`), warmed at load when `warmup_shape` is set.",
    )
    compile_cache_dir: str | None = Field(
        None, description="Inductor/Triton cache directory, so that a restarted replica reuses compiled kernels; "
        "None keeps torch's default (a per-user temporary directory).",
    )
    warmup_frames: int | None = Field(
        None, ge=1, description="With `compile`: num_frames of the warm-up forward at load (with warmup_height/"
        "width); None skips the warm-up and the first request pays the compile.",
    )
    warmup_height: int = Field(480, ge=16, description="Height of the warm-up forward, in pixels.")
    warmup_width: int = Field(832, ge=16, description="Width of the warm-up forward, in pixels.")

    @property
    def any(self) -> bool:
        return self.attention != "sdpa" or self.fp8_linear or self.fused_norm_rope or self.compile

    @classmethod
    def from_label(cls, label: str, **settings) -> KernelConfig:
        """The config a lever label names, as the benches write them: `+`-joined `attn:NAME`, `fp8_linear`,
        `norm_rope`, `compile` (e.g. "attn:cudnn-fp8+fp8_linear+compile"); `settings` sets the other fields."""
        levers: dict = {}
        for token in [t for t in label.split("+") if t]:
            if token.startswith("attn:"):
                levers["attention"] = token.removeprefix("attn:")
            elif token in LEVER_TOKENS:
                levers[LEVER_TOKENS[token]] = True
            else:
                raise ValueError(f"unknown lever {token!r} in {label!r}; known: attn:NAME, {', '.join(LEVER_TOKENS)}")
        return cls(**levers, **settings)


LEVER_TOKENS = {"fp8_linear": "fp8_linear", "norm_rope": "fused_norm_rope", "compile": "compile"}
