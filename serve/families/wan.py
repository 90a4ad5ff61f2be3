"""The Wan family: Wan2.1 (a large and a small model) and Wan2.2-A14B (a high-noise and a low-noise expert).

Oracle: diffusers' `WanPipeline`. Components: umT5 text encoder (prompts padded to 512 tokens), `AutoencoderKLWan`
(latents [B, 16, F', H', W'] normalised by the VAE's latents_mean/std), `WanTransformer3DModel`, and the UniPC
flow-matching sampler, whose whole mid-trajectory state lives in the scheduler object (so `denoise.Sampler`'s default
hooks are WanPipeline's). Wan2.2-A14B is one pipeline directory with two transformers: `transformer` (high noise)
sketches and `transformer_2` (low noise) renders (`ModelPair.render_subfolder`); its `boundary_ratio` (0.875) is the
`boundary:R` switch and its `guidance_scale_2` the request's `guidance_scale_2`. Parallel: xfuser's USP (Ulysses,
ring) and this engine's CFG-parallel.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from serve.denoise import DEFAULT_SAMPLER, LatentSpec
from serve.families.base import Family, ModelCapabilities, check_same


class WanFamily(Family):
    name = "wan"
    pipeline_class = "WanPipeline"
    transformer_class = "WanTransformer3DModel"
    transformer_components = ("transformer", "transformer_2")
    capabilities = ModelCapabilities(
        family="wan",
        transformer_classes=("WanTransformer3DModel",),
        ulysses=True,
        ring=True,
        max_cfg_degree=2,  # xfuser offers CFG-parallel for Wan image-to-video only; text-to-video's is ParallelDenoiser
        xfuser_wrapper="xfuser.model_executor.models.transformers.transformer_wan:xFuserWanTransformer3DWrapper",
    )
    sampler = DEFAULT_SAMPLER

    def check_compatible(self, pair) -> None:
        from serve.models import ModelError, _locate, is_pipeline, read_config

        sketch_src, render_src = _locate(pair.sketch, "sketch"), _locate(pair.render, "render")
        if not is_pipeline(sketch_src):
            raise ModelError(f"sketch model {pair.sketch!r} must be a full pipeline directory (model_index.json)")
        from serve.families.base import read_model_index

        if read_model_index(sketch_src).get("expand_timesteps"):
            raise ModelError(f"sketch model {pair.sketch!r} is a Wan2.2 TI2V pipeline (`expand_timesteps`): its "
                             "per-token timesteps are not supported by this engine")
        sketch = self.transformer_config(sketch_src, "sketch")
        render = self.transformer_config(render_src, "render", pair.render_subfolder)
        check_same(("in_channels", "out_channels", "text_dim", "patch_size"), sketch, render, pair.sketch, pair.render)
        if is_pipeline(render_src) and Path(render_src).is_dir():
            vae_s = read_config(sketch_src, "vae", "the sketch VAE config")
            vae_r = read_config(render_src, "vae", "the render VAE config")
            for key in ("z_dim", "latents_mean", "latents_std", "temperal_downsample"):
                if vae_s.get(key) != vae_r.get(key):
                    raise ModelError(
                        f"render model {pair.render!r} uses a different VAE than sketch model {pair.sketch!r} "
                        f"({key} differs): the latent cannot be handed over"
                    )

    def latent_spec(self, source: str) -> LatentSpec:
        from serve.models import _locate, read_config

        source = _locate(source, "sketch")
        vae = read_config(source, "vae", "the VAE config")
        transformer = self.transformer_config(source, "sketch")
        return LatentSpec(
            channels=transformer["in_channels"], temporal=vae.get("scale_factor_temporal") or 4,
            spatial=vae.get("scale_factor_spatial") or 8, patch=tuple(transformer["patch_size"]),
        )

    def max_sequence_length(self, pipe) -> int:
        return 512  # WanPipeline's default

    def decode(self, pipe, latents: torch.Tensor) -> np.ndarray:
        """Latents [B, C, F', H', W'] -> uint8 frames [B, F, H, W, 3], as WanPipeline's output_type="np" path."""
        vae = pipe.vae
        with torch.inference_mode():
            z = latents.to(vae.device, vae.dtype)
            mean = torch.tensor(vae.config.latents_mean).view(1, vae.config.z_dim, 1, 1, 1).to(z.device, z.dtype)
            inv_std = 1.0 / torch.tensor(vae.config.latents_std).view(1, vae.config.z_dim, 1, 1, 1).to(z.device,
                                                                                                        z.dtype)
            video = vae.decode(z / inv_std + mean, return_dict=False)[0]
            frames = pipe.video_processor.postprocess_video(video, output_type="np")
        return (np.asarray(frames) * 255).round().clip(0, 255).astype(np.uint8)

    def preview(self, pipe, handoff) -> np.ndarray:
        """One image [H, W, 3] from the first latent frame of the sketch's clean-latent estimate (Wan's VAE is
        causal, so the first latent frame decodes alone into the first video frame, at a fraction of a full
        decode)."""
        return self.decode(pipe, handoff.preview_latents[:, :, :1])[0, 0]


FAMILY = WanFamily()
