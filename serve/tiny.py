"""The tiny presets: random-init pipelines small enough for CPU tests and the README's first command.

`tiny` is a Wan2.1-shaped pair (a sketch pipeline and a smaller render transformer), `tiny-wan2.2` one Wan2.2-A14B
shaped pipeline (two experts, boundary_ratio 0.875), `tiny-cogvideox` (serve/families/cogvideox.py) a CogVideoX
5B/2B-shaped pair. Each is built offline (no hub), deterministic from fixed seeds, saved once in diffusers' layout
under SRD_CACHE and then loaded through the same `from_pretrained` code as the real checkpoints. Their weights are
random, so their videos look like noise. The tokenizer is a byte-level BPE with no merges, built with `tokenizers`,
so nothing is downloaded.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import torch

from serve.models import ModelPair

TINY_VERSION = "v1"
TEXT_DIM = 32
MAX_SEQUENCE_LENGTH = 512


def cache_dir(name: str = "tiny") -> Path:
    root = os.environ.get("SRD_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "srd")
    return Path(root) / f"{name}-{TINY_VERSION}"


def _byte_tokenizer(max_length: int = MAX_SEQUENCE_LENGTH):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "</s>", "<unk>"]
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {tok: i for i, tok in enumerate(specials + alphabet)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
        model_max_length=max_length,
    )


def tiny_transformer(num_heads: int, num_layers: int, seed: int):
    from diffusers import WanTransformer3DModel

    torch.manual_seed(seed)
    return WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=num_heads, attention_head_dim=16, in_channels=16, out_channels=16,
        text_dim=TEXT_DIM, freq_dim=64, ffn_dim=4 * 16 * num_heads, num_layers=num_layers, cross_attn_norm=True,
        qk_norm="rms_norm_across_heads", rope_max_seq_len=64,
    )


def build_tiny_pipeline(wan22: bool = False):
    """The tiny pipeline (sketch transformer inside) and the smaller render transformer, in float32; with `wan22`
    one Wan2.2-A14B-shaped pipeline instead (two experts of one size, boundary_ratio 0.875) and None."""
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanPipeline
    from transformers import UMT5Config, UMT5EncoderModel

    tokenizer = _byte_tokenizer()
    torch.manual_seed(0)
    text_encoder = UMT5EncoderModel(
        UMT5Config(
            vocab_size=len(tokenizer), d_model=TEXT_DIM, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
            relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
        )
    )
    torch.manual_seed(1)
    vae = AutoencoderKLWan(base_dim=8, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                           temperal_downsample=[False, True, True])
    scheduler = UniPCMultistepScheduler(
        prediction_type="flow_prediction", use_flow_sigmas=True, num_train_timesteps=1000, flow_shift=3.0
    )
    if wan22:
        pipe = WanPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, scheduler=scheduler,
                           transformer=tiny_transformer(num_heads=4, num_layers=2, seed=4),
                           transformer_2=tiny_transformer(num_heads=4, num_layers=2, seed=5), boundary_ratio=0.875)
        return pipe, None
    pipe = WanPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, scheduler=scheduler,
                       transformer=tiny_transformer(num_heads=4, num_layers=2, seed=2))
    return pipe, tiny_transformer(num_heads=2, num_layers=1, seed=3)


def ensure_tiny_models() -> ModelPair:
    """Build and save the tiny preset once (atomically, so concurrent callers never see half a directory)."""
    def build(staging: Path) -> None:
        pipe, render = build_tiny_pipeline()
        pipe.save_pretrained(staging / "sketch")
        render.save_pretrained(staging / "render")

    root = ensure_built("tiny", build)
    return ModelPair(sketch=str(root / "sketch"), render=str(root / "render"))


def ensure_tiny_wan22_models() -> ModelPair:
    """The tiny-wan2.2 preset: one pipeline directory; its `transformer` sketches, its `transformer_2` renders."""
    root = ensure_built("tiny-wan2.2", lambda staging: build_tiny_pipeline(wan22=True)[0].save_pretrained(
        staging / "pipeline"))
    return ModelPair(sketch=str(root / "pipeline"), render=str(root / "pipeline"))


def ensure_built(name: str, build) -> Path:
    """`build(staging_dir)` once into SRD_CACHE/name-version, atomically (concurrent callers never see half a
    directory); the directory."""
    root = cache_dir(name)
    if (root / "complete").is_file():
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=root.name + ".", dir=root.parent))
    build(staging)
    (staging / "complete").write_text(TINY_VERSION)
    try:
        staging.rename(root)
    except OSError:  # another process finished first
        shutil.rmtree(staging, ignore_errors=True)
    return root
