"""Regional torch.compile: each repeated transformer block compiled once (diffusers'
`ModelMixin.compile_repeated_blocks`, which compiles the class listed in the model's `_repeated_blocks`), so the
compile costs one block's graph instead of the whole model's. The Inductor and Triton caches can live in a given
directory so that a restarted replica loads the compiled kernels instead of compiling again (torch's FX graph cache
and Triton's kernel cache; the first start still pays)."""

from __future__ import annotations

import os

import torch


def set_cache_dir(path: str) -> None:
    """Point Inductor's and Triton's on-disk caches at `path` (before the first compile of the process). The
    environment is set outright, not defaulted: Inductor writes its default directory into TORCHINDUCTOR_CACHE_DIR
    the first time anything asks for it (importing diffusers does), so a default would always be taken already."""
    os.makedirs(path, exist_ok=True)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = os.path.abspath(path)
    os.environ["TRITON_CACHE_DIR"] = os.path.join(os.path.abspath(path), "triton")


def compile_blocks(transformer: torch.nn.Module, fullgraph: bool = True) -> None:
    transformer.compile_repeated_blocks(fullgraph=fullgraph)


def warm_up(transformer: torch.nn.Module, latent_shape: tuple[int, ...], text_tokens: int = 512) -> None:
    """One forward at the preset's shape, so that the compile happens at load, not on the first request."""
    param = next(transformer.parameters())
    generator = torch.Generator(param.device).manual_seed(0)
    dtype = transformer.dtype
    latents = torch.randn(latent_shape, generator=generator, device=param.device, dtype=dtype)
    text = torch.randn((latent_shape[0], text_tokens, transformer.config.text_dim), generator=generator,
                       device=param.device, dtype=dtype)
    timestep = torch.full((latent_shape[0],), 500, device=param.device, dtype=torch.long)
    with torch.inference_mode():
        transformer(hidden_states=latents, timestep=timestep, encoder_hidden_states=text, return_dict=False)
