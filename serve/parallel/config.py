"""What a stage's worker group is allowed to be, checked before any rank starts or any weights load.

    ParallelConfig       the degrees (cfg x ulysses x ring) and the attention backend, validated on their own
    check_parallel(...)  the checks that need the model (heads vs Ulysses, what its family declares in
                         serve/families/) and the placement (one rank per bundle)
    latent_tokens        a latent's sequence length, which ring attention needs divisible by the degree

No xfuser import: the app config and the driver use these.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from serve.families import base as _families
from serve.families.base import ModelCapabilities

@dataclass(frozen=True)
class AttentionBackend:
    """One attention kernel xfuser can call inside USP."""

    xfuser_name: str | None  # xfuser's AttentionBackendType member; None: let xfuser pick
    returns_lse: bool | None  # ring attention merges partial results by log-sum-exp; None: depends on xfuser's pick
    description: str


ATTENTION_BACKENDS: dict[str, AttentionBackend] = {
    "sdpa": AttentionBackend("SDPA", False, "torch scaled_dot_product_attention, torch picks the kernel"),
    "sdpa_flash": AttentionBackend("SDPA_FLASH", True, "torch's flash-attention kernel (returns log-sum-exp)"),
    "sdpa_efficient": AttentionBackend("SDPA_EFFICIENT", True, "torch's memory-efficient kernel (returns LSE)"),
    "cudnn": AttentionBackend("CUDNN", True, "torch's cuDNN attention kernel (returns LSE)"),
    "flash": AttentionBackend("FLASH", True, "the flash-attn 2 package (returns LSE)"),
    "flash_3": AttentionBackend("FLASH_3", True, "the flash-attn 3 package, Hopper (returns LSE)"),
    "auto": AttentionBackend(None, None, "xfuser's own choice (cuDNN on an H100 without flash-attn 3/4)"),
}
LSE_BACKENDS = tuple(name for name, b in ATTENTION_BACKENDS.items() if b.returns_lse)


class ParallelConfig(BaseModel):
    """How one stage spreads a transformer forward over ranks. World size = cfg x ulysses x ring."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    cfg_degree: int = Field(
        1, description="1, or 2 to run the cond and uncond halves of classifier-free guidance on separate rank groups."
    )
    ulysses_degree: int = Field(
        1, description="Ulysses sequence parallelism (all-to-all over heads); must divide the attention head count."
    )
    ring_degree: int = Field(
        1, description="Ring attention sequence parallelism; needs an attention backend that returns log-sum-exp."
    )
    attention_backend: Literal[tuple(ATTENTION_BACKENDS)] = Field(  # type: ignore[valid-type]
        "sdpa",
        description=(
            "Attention kernel inside USP. Default `sdpa` (torch's own choice): on the H100, xfuser's automatic pick "
            "(cuDNN) was slower (bench/RESULTS.md, run 4); bench/xfuser_overhead.py measures each. Ring needs one of "
            + ", ".join(LSE_BACKENDS) + "."
        ),
    )

    @model_validator(mode="after")
    def _check(self) -> ParallelConfig:
        for name in ("cfg_degree", "ulysses_degree", "ring_degree"):
            if getattr(self, name) < 1:
                raise ValueError(f"`{name}` must be at least 1 but is {getattr(self, name)}")
        if self.cfg_degree not in (1, 2):
            raise ValueError(
                f"`cfg_degree` must be 1 or 2 (one rank group per half of classifier-free guidance: cond and "
                f"uncond) but is {self.cfg_degree}"
            )
        if self.ring_degree > 1 and not ATTENTION_BACKENDS[self.attention_backend].returns_lse:
            raise ValueError(
                f"`ring_degree` {self.ring_degree} needs an attention backend that returns log-sum-exp (ring "
                f"attention merges partial results with it), one of {', '.join(LSE_BACKENDS)}; "
                f"`attention_backend` is {self.attention_backend!r}"
            )
        return self

    @property
    def sp_degree(self) -> int:
        return self.ulysses_degree * self.ring_degree

    @property
    def world_size(self) -> int:
        return self.cfg_degree * self.sp_degree

    def check_tokens(self, tokens: int) -> None:
        """Ring attention cannot mask the zero padding xfuser adds to split the sequence evenly (Ulysses can, by
        trimming padded keys), so with ring the token count must divide evenly."""
        if self.ring_degree > 1 and tokens % self.sp_degree:
            raise ValueError(
                f"with `ring_degree` {self.ring_degree} the latent's token count ({tokens}) must be divisible by "
                f"ulysses_degree x ring_degree = {self.sp_degree}; choose another width/height/num_frames"
            )


def declared_capabilities() -> dict[str, ModelCapabilities]:
    """What each model family declares it supports in parallel (serve/families/), by transformer class name."""
    return {name: f.capabilities for f in _families.families() for name in f.capabilities.transformer_classes}


def capabilities_for(transformer_config: dict) -> ModelCapabilities:
    name = transformer_config.get("_class_name")
    capabilities = declared_capabilities()
    if name not in capabilities:
        raise ValueError(
            f"no parallel support is declared for transformer class {name!r}; supported: {', '.join(capabilities)}"
        )
    return capabilities[name]


def check_parallel(
    config: ParallelConfig, transformer_config: dict, bundles: int | None = None, role: str = "sketch"
) -> ModelCapabilities:
    """The checks that need the model's config or the placement; run before spawning ranks or loading weights."""
    caps = capabilities_for(transformer_config)
    heads = transformer_config["num_attention_heads"]
    if config.world_size > 1 and caps.xfuser_wrapper is None:
        raise ValueError(
            f"the {caps.family} family runs on one rank only in this engine (no sequence or CFG parallelism is "
            f"declared for it): cfg_degree x ulysses_degree x ring_degree must be 1 but is {config.world_size}"
        )
    if config.ulysses_degree > 1 and not caps.ulysses:
        raise ValueError(f"the {caps.family} family does not support Ulysses parallelism (`ulysses_degree` > 1)")
    if config.ring_degree > 1 and not caps.ring:
        raise ValueError(f"the {caps.family} family does not support ring attention (`ring_degree` > 1)")
    if config.cfg_degree > caps.max_cfg_degree:
        raise ValueError(
            f"`cfg_degree` {config.cfg_degree} is more than the {caps.family} family supports ({caps.max_cfg_degree})"
        )
    if heads % config.ulysses_degree:
        raise ValueError(
            f"the {role} transformer's attention head count ({heads}) must be divisible by `ulysses_degree` "
            f"({config.ulysses_degree}): Ulysses gives each rank heads/ulysses_degree heads"
        )
    if bundles is not None and bundles != config.world_size:
        raise ValueError(
            f"cfg_degree x ulysses_degree x ring_degree = {config.cfg_degree} x {config.ulysses_degree} x "
            f"{config.ring_degree} = {config.world_size} ranks must equal the {role} replica's placement-group "
            f"bundles ({bundles}): one rank per bundle"
        )
    return caps


def load_transformer_config(engine_config, role: str) -> dict:
    """The config of the stage's transformer (heads, patch size), read without loading weights."""
    from serve import models

    source, subfolder = engine_config.models().transformer(role)
    return models._transformer_config(models._locate(source, role), role, subfolder)


def latent_tokens(shape, patch) -> int:
    _, _, f, h, w = shape
    return (f // patch[0]) * (h // patch[1]) * (w // patch[2])

