"""The CogVideoX family: CogVideoX-5B sketches, CogVideoX-2B renders (CogVideoX 1.0; 1.5's temporal patch is refused).

Oracle: diffusers' `CogVideoXPipeline.__call__` (0.42.1), mirrored step for step: T5 prompt embeddings padded to
the tokenizer's `model_max_length` (226 for the THUDM checkpoints, at most 226: the pipeline's default
`max_sequence_length`); noise `randn_tensor([B, F', C, H', W'])` from the CPU generator times the scheduler's
`init_noise_sigma`; per step one guided transformer call `uncond + g * (cond - uncond)` on the float output; then
`CogVideoXDDIMScheduler.step(out, t, latents)`, or for `CogVideoXDPMScheduler` `step(out, old_pred_original_sample,
t, t_prev, latents, generator=...)`, whose x0 history and generator the pipeline (not the scheduler) keeps: here they
live in the hand-off's `sampler_extra` ("pred_original_sample", "generator_state"), so a DPM trajectory resumes
exactly in another process. The render stage outputs the final latents as [B, C, F', H', W'] (the layout every
family's outputs use: `--save-latents`, the LATENTS checkpoint), which the VAE decodes after dividing by its
`scaling_factor`.
Not mirrored: `use_dynamic_cfg` (off by default in the pipeline; the engine's guidance is constant per stage), and
in bfloat16 the pipeline casts the latents to bf16 after every step where the engine keeps them in float32.

**5B -> 2B: what differs and what this engine does** (bench/RESULTS.md, "Model families", from the configs):
- Positional inputs. The 5B uses 3D RoPE passed into attention by the pipeline; the 2B has a fixed 3D sin-cos
  embedding in its patch embedding and no RoPE. diffusers' attention processor applies any rotary embedding it is
  given, so each model is called here with its own: `image_rotary_emb` computed from that model's config (the
  pipeline's own `_prepare_rotary_positional_embeddings`), None for a model without RoPE. The oracle does the same
  (the tests compute it per transformer, or drop it with a forward pre-hook).
- Latent space and sampler. The VAE architecture, text encoder, latent channels, patching and time embedding are
  shared and checked from the configs, but the VAE `scaling_factor` (0.7 vs 1.15258426) and the DDIM schedulers'
  `snr_shift_scale` (1.0 vs 3.0) differ. Choice: **the sketch pipeline owns the trajectory.** Its scheduler (and its
  state) continues after the switch, the render transformer is called on the same latent at the same integer
  timestep, and decode uses the sketch pipeline's VAE and scaling factor. This equals diffusers' own pipeline with
  the transformer swapped at step K (the oracle), and needs nothing from the render pipeline but its transformer.
  What it does NOT apply: the exact conversion at the switch into the 2B's units (at K = 10 of 50, t_K = 799: feed
  the 2B t' = 789 and a latent x 1.0057, then follow the 2B's own schedule and decode with 1/1.1526). So with the
  real checkpoints the 2B sees, from step K on, a latent whose SNR in VAE units is ~0.87x what it was trained to
  expect at that timestep (0.86-0.93x over all t), and the 5B's scheduler turns its v-predictions into latents; the
  paper reports this pairing works, but quality against an exact conversion is unmeasured here.
Parallel: none (xfuser's CogVideoX USP is not wired in); any degree > 1 is refused before weights load.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

from serve import denoise
from serve.families.base import Family, ModelCapabilities, check_same

MAX_SEQUENCE_LENGTH = 226  # CogVideoXPipeline's default, the transformer's `max_text_seq_length`


class CogVideoXSampler(denoise.Sampler):
    """CogVideoXPipeline's way with its scheduler (DDIM or DPM), the state it keeps outside it in `extra`."""

    def initial_latents(self, params, spec, device, scheduler, extra):
        generator = torch.Generator("cpu").manual_seed(params.seed)
        from diffusers.utils.torch_utils import randn_tensor  # at first use, as in serve/denoise.py

        latents = randn_tensor(spec.shape(params), generator=generator, device=torch.device(device),
                               dtype=torch.float32)
        if _is_dpm(scheduler):  # DPM draws fresh noise every step from the same generator
            extra["generator_state"] = generator.get_state()
        return latents * scheduler.init_noise_sigma

    def step(self, scheduler, extra, output, step_index, latents):
        t = scheduler.timesteps[step_index]
        if _is_dpm(scheduler):
            generator = torch.Generator("cpu")
            generator.set_state(extra["generator_state"])
            t_back = scheduler.timesteps[step_index - 1] if step_index > 0 else None
            latents, x0 = scheduler.step(output, extra.get("pred_original_sample"), t, t_back, latents, eta=0.0,
                                         generator=generator, return_dict=False)
            extra["generator_state"] = generator.get_state()
        else:
            latents, x0 = scheduler.step(output, t, latents, eta=0.0, return_dict=False)
        extra["pred_original_sample"] = x0  # DPM's history; for DDIM the preview's clean-latent estimate
        return latents


def _is_dpm(scheduler) -> bool:
    return type(scheduler).__name__ == "CogVideoXDPMScheduler"


class CogVideoXDenoiser(denoise.GuidedDenoiser):
    """Guided calls of a CogVideoX transformer on [B, F', C, H', W'] latents, each with its own positional inputs."""

    def tokens(self, latents: torch.Tensor) -> int:
        _, f, _, h, w = latents.shape
        config = self.transformer.config
        return f * (h // config.patch_size) * (w // config.patch_size) + config.max_text_seq_length

    def call(self, latents, timesteps, embeds):
        rotary = None
        if self.transformer.config.use_rotary_positional_embeddings:
            _, f, _, h, w = latents.shape
            rotary = _rotary(self.transformer, f, h, w, latents.device)
        return self.transformer(hidden_states=latents, encoder_hidden_states=embeds, timestep=timesteps,
                                image_rotary_emb=rotary, return_dict=False)[0]


def _rotary(transformer, frames: int, height: int, width: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """This transformer's 3D RoPE for a latent grid, by the pipeline's own method (given latent sizes and a scale
    factor of 1, it sees the same patch grid)."""
    from diffusers import CogVideoXPipeline

    holder = SimpleNamespace(transformer=transformer, vae_scale_factor_spatial=1)
    return CogVideoXPipeline._prepare_rotary_positional_embeddings(holder, height, width, frames, device)


class CogVideoXFamily(Family):
    name = "cogvideox"
    pipeline_class = "CogVideoXPipeline"
    transformer_class = "CogVideoXTransformer3DModel"
    capabilities = ModelCapabilities(
        family="cogvideox", transformer_classes=("CogVideoXTransformer3DModel",), ulysses=False, ring=False,
        max_cfg_degree=1, xfuser_wrapper=None,
    )
    sampler = CogVideoXSampler()

    def check_request(self, params) -> None:
        """CogVideoX 1.0's VAE keeps the first latent frame apart and doubles the rest twice in time, so F' latent
        frames decode to 4(F'-1)+1 frames only for odd F' (49 frames: F' = 13); an even F' would give 4F'."""
        from serve.request import InvalidRequest

        super().check_request(params)
        if ((params.num_frames - 1) // 4 + 1) % 2 == 0:
            raise InvalidRequest("num_frames", f"`num_frames` must be of the form 8n+1 for CogVideoX (9, 17, ..., 49) "
                                               f"but is {params.num_frames}")

    def check_compatible(self, pair) -> None:
        from serve.models import ModelError, _locate, is_pipeline, read_config

        sketch_src, render_src = _locate(pair.sketch, "sketch"), _locate(pair.render, "render")
        sketch = self.transformer_config(sketch_src, "sketch")
        render = self.transformer_config(render_src, "render", pair.render_subfolder)
        for role, config, source in (("sketch", sketch, pair.sketch), ("render", render, pair.render)):
            if config.get("_class_name") != self.transformer_class:
                raise ModelError(f"{role} model {source!r} has a {config.get('_class_name')}, not a "
                                 f"{self.transformer_class}")
            if config.get("patch_size_t") is not None:
                raise ModelError(f"{role} model {source!r} is CogVideoX 1.5 (`patch_size_t` "
                                 f"{config['patch_size_t']}): only CogVideoX 1.0 pairs are supported")
        check_same(("in_channels", "out_channels", "patch_size", "text_embed_dim", "max_text_seq_length",
                    "temporal_compression_ratio"), sketch, render, pair.sketch, pair.render)
        if is_pipeline(render_src) and Path(render_src).is_dir():
            # Shared text encoder and VAE, checked from the configs. The VAE scaling factor and the scheduler's
            # snr_shift_scale may differ (5B vs 2B): the sketch pipeline owns the trajectory (module docstring).
            vae_s = read_config(sketch_src, "vae", "the sketch VAE config")
            vae_r = read_config(render_src, "vae", "the render VAE config")
            ignore = {"scaling_factor", "_diffusers_version", "_name_or_path"}
            for key in sorted((set(vae_s) | set(vae_r)) - ignore):
                if vae_s.get(key) != vae_r.get(key):
                    raise ModelError(f"render model {pair.render!r} uses a different VAE than sketch model "
                                     f"{pair.sketch!r} ({key} differs): the latent cannot be handed over")
            text_s = read_config(sketch_src, "text_encoder", "the sketch text encoder config")
            text_r = read_config(render_src, "text_encoder", "the render text encoder config")
            for key in ("model_type", "d_model", "num_layers", "num_heads", "vocab_size", "d_ff"):
                if text_s.get(key) != text_r.get(key):
                    raise ModelError(f"render model {pair.render!r} uses a different text encoder than sketch "
                                     f"model {pair.sketch!r} ({key} differs): the prompt cannot be encoded once")
            sched_s = read_config(sketch_src, "scheduler", "the sketch scheduler config", "scheduler_config.json")
            sched_r = read_config(render_src, "scheduler", "the render scheduler config", "scheduler_config.json")
            if sched_s.get("prediction_type") != sched_r.get("prediction_type"):
                raise ModelError(f"render model {pair.render!r} predicts {sched_r.get('prediction_type')!r} but "
                                 f"sketch model {pair.sketch!r} predicts {sched_s.get('prediction_type')!r}")

    def latent_spec(self, source: str) -> denoise.LatentSpec:
        from serve.models import _locate, read_config

        source = _locate(source, "sketch")
        vae = read_config(source, "vae", "the VAE config")
        transformer = self.transformer_config(source, "sketch")
        p = transformer["patch_size"]
        return denoise.LatentSpec(
            channels=transformer["in_channels"], temporal=vae.get("temporal_compression_ratio") or 4,
            spatial=2 ** (len(vae["block_out_channels"]) - 1), patch=(1, p, p), layout="FC",
        )

    def denoiser(self, transformer, max_tokens_per_forward: int) -> denoise.GuidedDenoiser:
        return CogVideoXDenoiser(transformer, max_tokens_per_forward)

    def max_sequence_length(self, pipe) -> int:
        return min(MAX_SEQUENCE_LENGTH, int(pipe.tokenizer.model_max_length))

    def decode(self, pipe, latents: torch.Tensor) -> np.ndarray:
        vae = pipe.vae
        with torch.inference_mode():
            z = latents.to(vae.device, vae.dtype) / vae.config.scaling_factor  # [B, C, F', H', W'], canonical
            video = vae.decode(z).sample
            frames = pipe.video_processor.postprocess_video(video=video, output_type="np")
        return (np.asarray(frames) * 255).round().clip(0, 255).astype(np.uint8)

    def preview(self, pipe, handoff) -> np.ndarray:
        return self.decode(pipe, handoff.preview_latents[:, :1].permute(0, 2, 1, 3, 4))[0, 0]  # FC -> CF


FAMILY = CogVideoXFamily()


# ------------------------------------------------------------------------------------------------------------------
# The tiny-cogvideox preset: a 5B-shaped sketch pipeline (RoPE, VAE scale 0.7, DDIM snr_shift_scale 1.0) and a
# 2B-shaped render pipeline (sin-cos positions, no RoPE, VAE scale 1.15258426, snr_shift_scale 3.0), random weights.

TINY_TEXT_LENGTH = 16


def build_tiny_pipelines():
    from diffusers import (AutoencoderKLCogVideoX, CogVideoXDDIMScheduler, CogVideoXPipeline,
                           CogVideoXTransformer3DModel)
    from transformers import T5Config, T5EncoderModel

    from serve.tiny import _byte_tokenizer

    tokenizer = _byte_tokenizer(TINY_TEXT_LENGTH)
    torch.manual_seed(10)
    text_encoder = T5EncoderModel(T5Config(
        vocab_size=len(tokenizer), d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
        relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
    ))

    def vae(scaling_factor: float):
        torch.manual_seed(11)
        return AutoencoderKLCogVideoX(
            down_block_types=("CogVideoXDownBlock3D",) * 4, up_block_types=("CogVideoXUpBlock3D",) * 4,
            block_out_channels=(8, 8, 8, 8), latent_channels=4, layers_per_block=1, norm_num_groups=2,
            temporal_compression_ratio=4, scaling_factor=scaling_factor,
        )

    def transformer(heads: int, layers: int, rope: bool, seed: int):
        torch.manual_seed(seed)
        return CogVideoXTransformer3DModel(
            num_attention_heads=heads, attention_head_dim=16, in_channels=4, out_channels=4, time_embed_dim=8,
            text_embed_dim=32, num_layers=layers, sample_width=4, sample_height=4, sample_frames=9, patch_size=2,
            temporal_compression_ratio=4, max_text_seq_length=TINY_TEXT_LENGTH,
            use_rotary_positional_embeddings=rope,
        )

    def scheduler(snr_shift_scale: float):
        return CogVideoXDDIMScheduler(
            beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
            prediction_type="v_prediction", rescale_betas_zero_snr=True, set_alpha_to_one=True,
            timestep_spacing="trailing", snr_shift_scale=snr_shift_scale,
        )

    common = {"tokenizer": tokenizer, "text_encoder": text_encoder}
    sketch = CogVideoXPipeline(**common, vae=vae(0.7), scheduler=scheduler(1.0),
                               transformer=transformer(4, 2, True, 12))
    render = CogVideoXPipeline(**common, vae=vae(1.15258426), scheduler=scheduler(3.0),
                               transformer=transformer(2, 1, False, 13))
    return sketch, render


@lru_cache(maxsize=None)
def _tiny_root(cache: str) -> Path:
    from serve.tiny import ensure_built

    def build(staging: Path) -> None:
        sketch, render = build_tiny_pipelines()
        sketch.save_pretrained(staging / "sketch")
        render.save_pretrained(staging / "render")

    return ensure_built("tiny-cogvideox", build)


def ensure_tiny_models():
    """The tiny-cogvideox preset's ModelPair (two full pipeline directories), built once under SRD_CACHE."""
    from serve.models import ModelPair
    from serve.tiny import cache_dir

    root = _tiny_root(str(cache_dir("tiny-cogvideox")))
    return ModelPair(sketch=str(root / "sketch"), render=str(root / "render"))
