"""Random-init models of the real Wan2.1 architectures, for benchmarks on machines with no model hub.

Every model here has the layer shapes of the published checkpoint, so its cost (FLOPs, bytes, kernels, memory)
equals the real weights'; its outputs are meaningless. Every number measured with them is labelled
"random-init weights, real architecture" (`LABEL`).

Weights are drawn by each module's own initialiser directly on the target device and in the run's dtype, with the
modules that `from_pretrained(dtype=...)` keeps in float32 in float32 (`serve.models.random_init`, the engine's
`weights="random-init"`). `write_config_only` writes the same architectures as config-only model directories in
diffusers' layout (a few KB), so that the engine and the Serve app load them with `weights="random-init"`.
The "smoke" sizes are tiny stand-ins so that the bench scripts can be tested on a CPU in seconds.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from serve.denoise import WAN_LATENTS
from serve.models import ModelPair, random_init

LABEL = "random-init weights, real architecture"

# diffusers' WanTransformer3DModel configs of Wan-AI/Wan2.1-T2V-{14B,1.3B}-Diffusers.
_WAN_COMMON = dict(
    patch_size=(1, 2, 2), attention_head_dim=128, in_channels=16, out_channels=16, text_dim=4096, freq_dim=256,
    cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6,
)
TRANSFORMERS = {
    "wan2.1-t2v-14b": dict(_WAN_COMMON, num_attention_heads=40, num_layers=40, ffn_dim=13824),
    "wan2.1-t2v-1.3b": dict(_WAN_COMMON, num_attention_heads=12, num_layers=30, ffn_dim=8960),
    "smoke-sketch": dict(_WAN_COMMON, attention_head_dim=16, text_dim=32, freq_dim=64, num_attention_heads=4,
                         num_layers=2, ffn_dim=256, rope_max_seq_len=64),
    "smoke-render": dict(_WAN_COMMON, attention_head_dim=16, text_dim=32, freq_dim=64, num_attention_heads=2,
                         num_layers=1, ffn_dim=128, rope_max_seq_len=64),
}
# google/umt5-xxl encoder as Wan uses it (Wan's own t5.py: dim 4096, dim_attn 4096 = 64 heads x 64, ffn 10240,
# 24 layers, 32 relative buckets, vocab 256384).
TEXT_ENCODERS = {
    "umt5-xxl": dict(vocab_size=256384, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
                     relative_attention_num_buckets=32, relative_attention_max_distance=128,
                     feed_forward_proj="gated-gelu", tie_word_embeddings=False),
    "smoke": dict(vocab_size=512, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                  relative_attention_num_buckets=8, feed_forward_proj="gated-gelu", tie_word_embeddings=False),
}
# AutoencoderKLWan's defaults are the Wan2.1 VAE (base_dim 96, z_dim 16, dim_mult 1,2,4,4, 2 res blocks).
VAES = {
    "wan2.1": {},
    "smoke": dict(base_dim=8, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1),
}


@dataclass(frozen=True)
class Sizes:
    """Which models and which video size a bench run uses."""

    sketch: str
    render: str
    text_encoder: str
    vae: str
    height: int
    width: int
    num_frames: int

    @property
    def latent_shape(self) -> tuple[int, int, int, int, int]:
        return (1, WAN_LATENTS.channels, *WAN_LATENTS.grid(self.num_frames, self.height, self.width))

    @property
    def tokens(self) -> int:
        return WAN_LATENTS.tokens(self.num_frames, self.height, self.width)


REAL_480P = Sizes("wan2.1-t2v-14b", "wan2.1-t2v-1.3b", "umt5-xxl", "wan2.1", 480, 832, 81)
REAL_720P = Sizes("wan2.1-t2v-14b", "wan2.1-t2v-1.3b", "umt5-xxl", "wan2.1", 720, 1280, 81)
SMOKE = Sizes("smoke-sketch", "smoke-render", "smoke", "smoke", 32, 48, 5)
SMOKE_720P = Sizes("smoke-sketch", "smoke-render", "smoke", "smoke", 48, 64, 5)  # a second, larger smoke shape


def transformer(name: str, device, dtype: torch.dtype):
    from diffusers import WanTransformer3DModel

    return random_init(WanTransformer3DModel, TRANSFORMERS[name], device, dtype)


def _umt5_config(name: str):
    from transformers import UMT5Config

    return UMT5Config(**TEXT_ENCODERS[name], pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)


def text_encoder(name: str, device, dtype: torch.dtype):
    from transformers import UMT5EncoderModel

    return random_init(UMT5EncoderModel, _umt5_config(name), device, dtype)


def vae(name: str, device, dtype: torch.dtype):
    from diffusers import AutoencoderKLWan

    return random_init(AutoencoderKLWan, VAES[name], device, dtype)


def scheduler(flow_shift: float = 3.0):
    """Wan2.1-T2V's sampler: UniPC with flow prediction."""
    from diffusers import UniPCMultistepScheduler

    return UniPCMultistepScheduler(
        prediction_type="flow_prediction", use_flow_sigmas=True, num_train_timesteps=1000, flow_shift=flow_shift
    )


def scheduler_config(flow_shift: float = 3.0) -> dict:
    """Wan2.1-T2V's sampler as the dict `serve.denoise.make_scheduler` takes."""
    sampler = scheduler(flow_shift)
    return {"_class_name": type(sampler).__name__, **dict(sampler.config)}


def write_config_only(sizes: Sizes, root, flow_shift: float = 3.0) -> ModelPair:
    """Config-only model directories in diffusers' layout for `sizes`' architectures: a sketch pipeline
    (model_index.json, transformer/, text_encoder/, vae/, scheduler/ configs and the byte tokenizer of serve/tiny.py)
    and a render transformer directory. No weight files: load them with `EngineConfig(weights="random-init")`.

    The configs are written by the libraries themselves, from models built on the meta device (no memory)."""
    from pathlib import Path

    from diffusers import AutoencoderKLWan, WanPipeline, WanTransformer3DModel
    from transformers import UMT5EncoderModel

    from serve.tiny import _byte_tokenizer

    root = Path(root)
    sketch_dir, render_dir = root / "sketch", root / "render"
    with torch.device("meta"):
        sketch = WanTransformer3DModel(**TRANSFORMERS[sizes.sketch])
        render = WanTransformer3DModel(**TRANSFORMERS[sizes.render])
        encoder = UMT5EncoderModel(_umt5_config(sizes.text_encoder))
        autoencoder = AutoencoderKLWan(**VAES[sizes.vae])
    sampler, tokenizer = scheduler(flow_shift), _byte_tokenizer()
    pipe = WanPipeline(tokenizer=tokenizer, text_encoder=encoder, vae=autoencoder, scheduler=sampler,
                       transformer=sketch)
    pipe.save_config(sketch_dir)  # model_index.json
    sketch.save_config(sketch_dir / "transformer")
    encoder.config.save_pretrained(sketch_dir / "text_encoder")
    autoencoder.save_config(sketch_dir / "vae")
    sampler.save_config(sketch_dir / "scheduler")
    tokenizer.save_pretrained(sketch_dir / "tokenizer")
    render.save_config(render_dir)
    return ModelPair(sketch=str(sketch_dir), render=str(render_dir))


def vae_pipeline(vae_model):
    """A WanPipeline holding only `vae_model` (what the Wan family's decode reads), built in memory."""
    from diffusers import WanPipeline

    return WanPipeline(tokenizer=None, text_encoder=None, vae=vae_model, scheduler=None, transformer=None)


def transformer_flops(config: dict, tokens: int, text_tokens: int = 512, batch: int = 1) -> float:
    """Matmul FLOPs of one WanTransformer3DModel forward (self-attention, cross-attention, FFN; norms ignored)."""
    d = config["num_attention_heads"] * config["attention_head_dim"]
    f, n = config["ffn_dim"], config["num_layers"]
    per_layer = (
        8 * tokens * d * d  # self-attention q, k, v, o
        + 4 * tokens * tokens * d  # QK^T and PV
        + 4 * tokens * d * d + 4 * text_tokens * d * d  # cross-attention q, o and k, v
        + 4 * tokens * text_tokens * d  # cross-attention scores and values
        + 4 * tokens * d * f  # FFN up and down
    )
    return float(batch * n * per_layer)
