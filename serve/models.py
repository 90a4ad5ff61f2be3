"""Model sources, presets and the compatibility check between a sketch pipeline and a render model.

A model source is a hub id ("Wan-AI/Wan2.1-T2V-14B-Diffusers") or a local directory in diffusers' layout. The
sketch source is a full pipeline (text encoder, tokenizer, VAE, scheduler, transformer); the render source is a full
pipeline or a bare transformer directory. Everything loads through diffusers' `from_pretrained`, on the tiny preset
as on the real checkpoints; each stage loads only the components it uses.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from serve.request import GenerationDefaults

# diffusers is imported inside the loaders: importing it takes seconds, and the CLI checks a request against the
# preset defaults defined here before that, so that a bad flag fails at once.
if TYPE_CHECKING:
    from diffusers import WanPipeline, WanTransformer3DModel


class ModelError(ValueError):
    """A model source that cannot be found, loaded or paired; the message says which and why."""


@dataclass(frozen=True)
class ModelPair:
    """Where the sketch pipeline and the render transformer come from."""

    sketch: str
    render: str


@dataclass(frozen=True)
class Preset:
    name: str
    models: ModelPair | None  # None: built on first use (tiny)
    defaults: GenerationDefaults


WAN21_T2V = Preset(
    "wan2.1-t2v",
    ModelPair("Wan-AI/Wan2.1-T2V-14B-Diffusers", "Wan-AI/Wan2.1-T2V-1.3B-Diffusers"),
    GenerationDefaults(
        width=832, height=480, num_frames=81, num_inference_steps=50, guidance_scale=5.0, flow_shift=3.0,
        switch="ratio:0.2",
    ),
)
TINY = Preset(
    "tiny",
    None,
    GenerationDefaults(
        width=64, height=64, num_frames=17, num_inference_steps=10, guidance_scale=5.0, flow_shift=3.0,
        switch="ratio:0.3",
    ),
)
PRESETS = {p.name: p for p in (WAN21_T2V, TINY)}


def preset_models(preset: Preset) -> ModelPair:
    if preset.models is not None:
        return preset.models
    from serve.tiny import ensure_tiny_models

    return ensure_tiny_models()


def _looks_like_path(source: str) -> bool:
    return source.startswith((".", "/", "~")) or source.count("/") != 1 or os.sep in source.replace("/", "")


def _locate(source: str, role: str) -> str:
    """A local directory as an absolute path, or the hub id unchanged; a clear error for a missing directory."""
    path = Path(source).expanduser()
    if path.is_dir():
        return str(path.resolve())
    if path.exists() or _looks_like_path(source):
        raise ModelError(f"{role} model directory {source!r} does not exist (or is not a directory)")
    return source  # a hub id: from_pretrained resolves (and may download) it


def _load(what: str, source: str, loader, **kwargs):
    try:
        return loader(source, **kwargs)
    except (OSError, ValueError, EnvironmentError) as e:
        raise ModelError(f"cannot load {what} from {source!r}: {e}") from e


def _is_pipeline(source: str) -> bool:
    path = Path(source)
    if path.is_dir():
        return (path / "model_index.json").is_file()
    return True  # hub ids used here name pipelines


def _transformer_config(source: str, role: str) -> dict:
    from diffusers import WanTransformer3DModel

    kwargs = {"subfolder": "transformer"} if _is_pipeline(source) else {}
    return _load(f"the {role} transformer config", source, WanTransformer3DModel.load_config, **kwargs)


def check_compatible(models: ModelPair) -> None:
    """Fail before loading weights if the render model cannot continue the sketch model's latent."""
    sketch_src, render_src = _locate(models.sketch, "sketch"), _locate(models.render, "render")
    if not _is_pipeline(sketch_src):
        raise ModelError(f"sketch model {models.sketch!r} must be a full pipeline directory (model_index.json)")
    sketch, render = _transformer_config(sketch_src, "sketch"), _transformer_config(render_src, "render")
    for key in ("in_channels", "out_channels", "text_dim", "patch_size"):
        if sketch.get(key) != render.get(key):
            raise ModelError(
                f"render model {models.render!r} is incompatible with sketch model {models.sketch!r}: "
                f"{key} is {render.get(key)} but the sketch model has {sketch.get(key)}"
            )
    if _is_pipeline(render_src) and Path(render_src).is_dir():
        from diffusers import AutoencoderKLWan

        vae_s = _load("the sketch VAE config", sketch_src, AutoencoderKLWan.load_config, subfolder="vae")
        vae_r = _load("the render VAE config", render_src, AutoencoderKLWan.load_config, subfolder="vae")
        for key in ("z_dim", "latents_mean", "latents_std", "temperal_downsample"):
            if vae_s.get(key) != vae_r.get(key):
                raise ModelError(
                    f"render model {models.render!r} uses a different VAE than sketch model {models.sketch!r} "
                    f"({key} differs): the latent cannot be handed over"
                )


def check_device(device: str) -> None:
    """Fail with one clear line, before any weights load, when `device` is a GPU this torch cannot use."""
    if torch.device(device).type == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            f"`device` is {device!r} but torch {torch.__version__} sees no CUDA GPU "
            f"({'a CPU-only build' if torch.version.cuda is None else 'no driver or no visible GPU'})"
        )


def load_pipeline(source: str, components: tuple[str, ...], device: str, dtype: torch.dtype) -> WanPipeline:
    """The sketch pipeline with only `components` loaded (others None): e.g. ("text_encoder", "tokenizer")."""
    from diffusers import WanPipeline

    check_device(device)
    source = _locate(source, "sketch")
    skip = {c: None for c in ("text_encoder", "tokenizer", "vae", "transformer") if c not in components}
    pipe = _load("the pipeline", source, WanPipeline.from_pretrained, dtype=dtype, **skip)
    return pipe.to(device)


def load_transformer(source: str, role: str, device: str, dtype: torch.dtype) -> WanTransformer3DModel:
    from diffusers import WanTransformer3DModel

    check_device(device)
    source = _locate(source, role)
    kwargs = {"subfolder": "transformer"} if _is_pipeline(source) else {}
    model = _load(f"the {role} transformer", source, WanTransformer3DModel.from_pretrained, dtype=dtype, **kwargs)
    return model.to(device).eval().requires_grad_(False)


def load_scheduler_config(source: str) -> dict:
    from diffusers import UniPCMultistepScheduler

    source = _locate(source, "sketch")
    return dict(_load("the scheduler config", source, UniPCMultistepScheduler.load_config, subfolder="scheduler"))


def latent_spec(source: str):
    """The latent geometry the sketch pipeline's VAE and transformer imply (read from configs, no weights)."""
    from diffusers import AutoencoderKLWan

    from serve.stages import LatentSpec

    source = _locate(source, "sketch")
    vae = _load("the VAE config", source, AutoencoderKLWan.load_config, subfolder="vae")
    transformer = _transformer_config(source, "sketch")
    return LatentSpec(
        channels=transformer["in_channels"], temporal=vae.get("scale_factor_temporal") or 4,
        spatial=vae.get("scale_factor_spatial") or 8, patch=tuple(transformer["patch_size"]),
    )
