"""The toy pair's architectures, untrained: a word-level tokenizer, a frozen umT5, a tiny Wan VAE, two Wan DiTs.

Sizes are set by the 20 MB that may be committed (weights stored in float16): the "large" DiT has 5.9M parameters
(256 wide, 5 blocks), the "small" one 2.7M (256 wide, 2 blocks). At this size a step is bound by kernel launches,
not FLOPs, so depth sets its cost: a small step costs 0.46-0.52 of a large one (bench/RESULTS.md, toy runs 7-8).
Narrower small DiTs (128 and 192 wide: toy runs 4-6) drew the wrong shape too often on their own, and since the
shape is settled late, no early switch saved them. The VAE compresses 64x64x17 clips 4x in space and time into 8
channels (16x16x5 latents, 320 tokens with Wan's 1x2x2 patches): a finer grid than the real Wan VAE's 8x, so that a
7-pixel shape spans several latent cells.

The text encoder is a randomly initialised umT5 that is never trained (the DiTs learn to read it). Its tokenizer
is word-level over the prompt grammar, so each word is one token: a byte-level tokenizer would make the DiTs learn
to spell as well.
"""

from __future__ import annotations

import torch

from toy.data import BACKGROUNDS, COLOURS, DIRECTIONS, SHAPES, SIZES, SPEEDS

TEXT_DIM = 64
LATENT_CHANNELS = 8
MAX_SEQUENCE_LENGTH = 512  # what the engine pads prompts to (serve/families/wan.py encode), as WanPipeline does
GRAMMAR_WORDS = ("a", "moving", "on", "background", *SIZES, *COLOURS, *SHAPES, *DIRECTIONS, *SPEEDS, *BACKGROUNDS)
DIT_SIZES = {"large": {"heads": 4, "layers": 5}, "small": {"heads": 4, "layers": 2}}


def word_tokenizer():
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "</s>", "<unk>"]
    vocab = {tok: i for i, tok in enumerate(specials + sorted(set(GRAMMAR_WORDS)))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
        model_max_length=MAX_SEQUENCE_LENGTH,
    )


def text_encoder(vocab_size: int, seed: int):
    """Frozen and random; rounded to float16 at once, so the embeddings the DiTs train on are those it ships with."""
    from transformers import UMT5Config, UMT5EncoderModel

    torch.manual_seed(seed)
    model = UMT5EncoderModel(
        UMT5Config(
            vocab_size=vocab_size, d_model=TEXT_DIM, d_kv=16, d_ff=128, num_layers=2, num_heads=4,
            relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
        )
    )
    return model.half().float().eval().requires_grad_(False)


def vae(seed: int):
    from diffusers import AutoencoderKLWan

    torch.manual_seed(seed)
    return AutoencoderKLWan(
        base_dim=16, z_dim=LATENT_CHANNELS, dim_mult=[1, 2, 2], num_res_blocks=2, temperal_downsample=[True, True],
        scale_factor_spatial=4, scale_factor_temporal=4,
        latents_mean=[0.0] * LATENT_CHANNELS, latents_std=[1.0] * LATENT_CHANNELS,  # set from data after training
    )


def transformer(size: str, seed: int):
    from diffusers import WanTransformer3DModel

    heads, layers = DIT_SIZES[size]["heads"], DIT_SIZES[size]["layers"]
    torch.manual_seed(seed)
    return WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=heads, attention_head_dim=64, in_channels=LATENT_CHANNELS,
        out_channels=LATENT_CHANNELS, text_dim=TEXT_DIM, freq_dim=256, ffn_dim=4 * 64 * heads, num_layers=layers,
        cross_attn_norm=True, qk_norm="rms_norm_across_heads",
    )


def scheduler(flow_shift: float):
    from diffusers import UniPCMultistepScheduler

    return UniPCMultistepScheduler(
        prediction_type="flow_prediction", use_flow_sigmas=True, num_train_timesteps=1000, flow_shift=flow_shift
    )
