"""The tiny preset: a random-init Wan pipeline small enough for CPU tests and the README's first command.

Built offline (no hub), deterministic from a fixed seed, saved once in diffusers' layout and then loaded through the
same `from_pretrained` code as the real checkpoints. Its weights are random, so its videos look like noise.
The tokenizer is a byte-level BPE with no merges, built with `tokenizers`, so nothing is downloaded.
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


def cache_dir() -> Path:
    root = os.environ.get("SRD_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "srd")
    return Path(root) / f"tiny-{TINY_VERSION}"


def _byte_tokenizer():
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
        model_max_length=MAX_SEQUENCE_LENGTH,
    )


def tiny_transformer(num_heads: int, num_layers: int, seed: int):
    from diffusers import WanTransformer3DModel

    torch.manual_seed(seed)
    return WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=num_heads, attention_head_dim=16, in_channels=16, out_channels=16,
        text_dim=TEXT_DIM, freq_dim=64, ffn_dim=4 * 16 * num_heads, num_layers=num_layers, cross_attn_norm=True,
        qk_norm="rms_norm_across_heads", rope_max_seq_len=64,
    )


def build_tiny_pipeline():
    """The tiny pipeline (sketch transformer inside) and the smaller render transformer, in float32."""
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
    pipe = WanPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, scheduler=scheduler,
                       transformer=tiny_transformer(num_heads=4, num_layers=2, seed=2))
    return pipe, tiny_transformer(num_heads=2, num_layers=1, seed=3)


def ensure_tiny_models() -> ModelPair:
    """Build and save the tiny preset once (atomically, so concurrent callers never see half a directory)."""
    root = cache_dir()
    pair = ModelPair(sketch=str(root / "sketch"), render=str(root / "render"))
    if (root / "complete").is_file():
        return pair
    root.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=root.name + ".", dir=root.parent))
    pipe, render = build_tiny_pipeline()
    pipe.save_pretrained(staging / "sketch")
    render.save_pretrained(staging / "render")
    (staging / "complete").write_text(TINY_VERSION)
    try:
        staging.rename(root)
    except OSError:  # another process finished first
        shutil.rmtree(staging, ignore_errors=True)
    return pair
