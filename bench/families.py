"""Per-step cost of the other model families (CogVideoX 5B/2B, a Wan2.2-T2V-A14B expert) and the measured
end-to-end SR speed-up of CogVideoX 5B -> 2B, on random-init weights of the real architectures.

    python -m bench.families --device cuda --commit $(git rev-parse --short HEAD) --out $OUT/families.json
    python -m bench.families --smoke --out /tmp/families.json      # CPU, tiny stand-ins, seconds

Parts (in this order, each under a deadline, see bench.harness.Bench; the JSON is rewritten after every part):
  compat     CPU only: what differs between the CogVideoX-5B and -2B pipelines (transformer, VAE, scheduler configs)
             and, for a hand-off at step K, the 2B timestep and latent rescale that keep the state the same video
  cog        one forward of each CogVideoX transformer at 49 frames 720x480: B=1 and B=2 (diffusers'
             CogVideoXPipeline batches cond+uncond into one B=2 forward); seconds, peak memory, parameters
  cog_e2e    diffusers' CogVideoXPipeline itself (random-init T5-XXL encoder, CogVideoX VAE, 5B scheduler), N steps
             with guidance 6: all-5B, and SR with the transformer swapped to the 2B after step K by
             `callback_on_step_end`, side by side; per-step times, encode, decode, and the cost model
             K*C5B + (N-K)*C2B + encode + decode, projected to N=50/K=10
  wan480     one forward (B=1) of a Wan2.2-T2V-A14B expert at 480x832/81 frames (WanPipeline's default size)
  wan720     the same at 1280x720/81 frames (Wan2.2's 720p)

Every number is "random-init weights, real architecture" (`LABEL`): the layer shapes of the published checkpoints,
random weights drawn on the device by each module's own initialiser (`serve.models.random_init`), so cost (FLOPs,
bytes, kernels, memory) equals the real weights' and outputs are meaningless. No hub is reached.

Where each architecture comes from (diffusers' own class, built from these configs with `from_config`):
  CogVideoX-5B transformer: THUDM/CogVideoX-5b transformer/config.json, as mirrored with its `_name_or_path`
    (models--THUDM--CogVideoX-5b snapshot 8fc5b28) at
    https://huggingface.co/thu-ml/CogVideoX-RIFLEx-diffusers/blob/refs%2Fpr%2F1/transformer/config.json: 42 layers,
    48 heads x 64, use_rotary_positional_embeddings=true, use_learned_positional_embeddings=false, patch 2, sample
    60x90x49, text 226 x 4096, time_embed_dim 512. diffusers' scripts/convert_cogvideox_to_diffusers.py agrees
    ("For 5B, it is 42 / 48 / RoPE True").
  CogVideoX-2B transformer: https://huggingface.co/THUDM/CogVideoX-2b/blame/ad5ce86/transformer/config.json:
    30 layers, 30 heads x 64, no rotary (so the patch embedding adds a fixed 3D sin-cos position embedding, a
    non-persistent buffer, not learned), everything else as the 5B.
  VAE (AutoencoderKLCogVideoX, the same architecture for both): scaling_factor 0.7 for 5B, 1.15258426 for 2B
    (convert_cogvideox_to_diffusers.py: "For CogVideoX-2B, scaling_factor is 1.15258426. For 5B, it is 0.7").
  Scheduler (CogVideoXDDIMScheduler, v-prediction, zero-terminal-SNR, trailing spacing): snr_shift_scale 1.0 for 5B
    and 3.0 for 2B (same script; https://huggingface.co/THUDM/CogVideoX-2b/blob/refs%2Fpr%2F2/scheduler/
    scheduler_config.json for the 2B file).
  Text encoder: T5-v1.1-XXL encoder, https://huggingface.co/THUDM/CogVideoX-2b/blame/main/text_encoder/config.json
    (d_model 4096, d_ff 10240, 64 heads x 64, 24 layers, gated-gelu, vocab 32128).
  Wan2.2-T2V-A14B expert: https://huggingface.co/Wan-AI/Wan2.2-T2V-A14B-Diffusers/blob/refs%2Fpr%2F2/
    transformer_2/config.json, identical to Wan2.1-T2V-14B (bench/wan.py): 40 layers, 40 heads x 128, ffn 13824,
    in/out 16, text_dim 4096. Wan-Video/Wan2.2 wan/configs/wan_t2v_A14B.py: 40 steps, boundary 0.875, shift 12.
    WanPipeline's defaults are 480x832, 81 frames; Wan2.2 A14B is published for 480P and 720P (1280x720).
"""

from __future__ import annotations

import argparse
import math
import statistics
import time

import torch

from bench import harness, wan
from bench.harness import GIB, Bench, Peak, free_memory, repeat, sync, timed
from serve.denoise import WAN_LATENTS
from serve.models import random_init

LABEL = wan.LABEL

_COG_COMMON = dict(
    attention_head_dim=64, in_channels=16, out_channels=16, flip_sin_to_cos=True, freq_shift=0, time_embed_dim=512,
    text_embed_dim=4096, dropout=0.0, attention_bias=True, sample_width=90, sample_height=60, sample_frames=49,
    patch_size=2, temporal_compression_ratio=4, max_text_seq_length=226, activation_fn="gelu-approximate",
    timestep_activation_fn="silu", norm_elementwise_affine=True, norm_eps=1e-5, spatial_interpolation_scale=1.875,
    temporal_interpolation_scale=1.0, use_learned_positional_embeddings=False,
)
_COG_SMOKE = dict(_COG_COMMON, attention_head_dim=16, time_embed_dim=16, text_embed_dim=32, sample_width=6,
                  sample_height=4, sample_frames=9, max_text_seq_length=8)
TRANSFORMERS = {
    "cogvideox-5b": dict(_COG_COMMON, num_layers=42, num_attention_heads=48, use_rotary_positional_embeddings=True),
    "cogvideox-2b": dict(_COG_COMMON, num_layers=30, num_attention_heads=30, use_rotary_positional_embeddings=False),
    "wan2.2-t2v-a14b-expert": dict(wan.TRANSFORMERS["wan2.1-t2v-14b"]),
    "smoke-cogvideox-5b": dict(_COG_SMOKE, num_layers=2, num_attention_heads=4, use_rotary_positional_embeddings=True),
    "smoke-cogvideox-2b": dict(_COG_SMOKE, num_layers=1, num_attention_heads=2,
                               use_rotary_positional_embeddings=False),
    "smoke-wan": dict(wan.TRANSFORMERS["smoke-sketch"]),
}
_VAE_COMMON = dict(in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(128, 256, 256, 512),
                   layers_per_block=3, norm_num_groups=32, norm_eps=1e-6, temporal_compression_ratio=4,
                   sample_height=480, sample_width=720, force_upcast=True, use_quant_conv=False,
                   use_post_quant_conv=False)
VAES = {
    "cogvideox-5b": dict(_VAE_COMMON, scaling_factor=0.7),
    "cogvideox-2b": dict(_VAE_COMMON, scaling_factor=1.15258426),
    "smoke": dict(_VAE_COMMON, block_out_channels=(8, 8, 8, 8), layers_per_block=1, norm_num_groups=4,
                  sample_height=32, sample_width=48, scaling_factor=0.7),
}
_SCHED_COMMON = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                     clip_sample=False, set_alpha_to_one=True, steps_offset=0, prediction_type="v_prediction",
                     timestep_spacing="trailing", rescale_betas_zero_snr=True)
SCHEDULERS = {"cogvideox-5b": dict(_SCHED_COMMON, snr_shift_scale=1.0),
              "cogvideox-2b": dict(_SCHED_COMMON, snr_shift_scale=3.0)}
TEXT_ENCODERS = {
    "t5-v1_1-xxl": dict(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
                        relative_attention_num_buckets=32, relative_attention_max_distance=128,
                        feed_forward_proj="gated-gelu", tie_word_embeddings=False),
    "smoke": dict(vocab_size=128, d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=4,
                  relative_attention_num_buckets=8, feed_forward_proj="gated-gelu", tie_word_embeddings=False),
}

# Video sizes: (height, width, frames). CogVideoX's default is its sample size, 480x720x49 (H x W).
REAL = {"cog": (480, 720, 49), "wan480": (480, 832, 81), "wan720": (720, 1280, 81)}
SMOKE = {"cog": (32, 48, 9), "wan480": (32, 48, 5), "wan720": (48, 64, 5)}


# --------------------------------------------------------------------------------------------------- models
def transformer(name: str, device, dtype: torch.dtype):
    from diffusers import CogVideoXTransformer3DModel, WanTransformer3DModel

    cls = WanTransformer3DModel if "wan" in name else CogVideoXTransformer3DModel
    return random_init(cls, TRANSFORMERS[name], device, dtype)


def params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _cog_pipe(model, vae=None, scheduler=None):
    """A CogVideoXPipeline holding `model` (tokenizer and text encoder left out: prompt embeddings are passed in)."""
    from diffusers import CogVideoXPipeline

    return CogVideoXPipeline(tokenizer=None, text_encoder=None, vae=vae, transformer=model, scheduler=scheduler)


def cog_flops(config: dict, video_tokens: int, batch: int) -> float:
    """Matmul FLOPs of one CogVideoXTransformer3DModel forward: joint self-attention over text + video tokens
    (q, k, v, o; QK^T and PV) and the 4x GELU FFN, per layer; norms, embeddings and the adaLN linears ignored."""
    d = config["num_attention_heads"] * config["attention_head_dim"]
    t = video_tokens + config["max_text_seq_length"]
    per_layer = 8 * t * d * d + 4 * t * t * d + 16 * t * d * d
    return float(batch * config["num_layers"] * per_layer)


# ------------------------------------------------------------------------------------------------- forwards
def _forward_row(name: str, model, family: str, size: tuple[int, int, int], batch: int, ctx) -> dict:
    """Median of synchronised forwards of `model` at `size` and batch `batch`, with peak memory and TFLOP/s."""
    device, dtype = ctx.device, ctx.dtype
    config = TRANSFORMERS[name]
    height, width, frames = size
    f, h, w = WAN_LATENTS.grid(frames, height, width)  # CogVideoX's VAE compresses as Wan's, its patch is Wan's
    video_tokens = WAN_LATENTS.tokens(frames, height, width)
    gen = torch.Generator("cpu").manual_seed(0)
    timestep = torch.full((batch,), 500, device=device, dtype=torch.long)
    if family == "cog":
        latents = torch.randn((batch, f, 16, h, w), generator=gen).to(device, dtype)
        text = torch.randn((batch, config["max_text_seq_length"], config["text_embed_dim"]), generator=gen)
        rotary = (_cog_pipe(model)._prepare_rotary_positional_embeddings(height, width, f, device)
                  if config["use_rotary_positional_embeddings"] else None)
        kwargs = dict(hidden_states=latents, encoder_hidden_states=text.to(device, dtype), timestep=timestep,
                      image_rotary_emb=rotary, return_dict=False)
        text_tokens = config["max_text_seq_length"]
        flops = cog_flops(config, video_tokens, batch)
    else:
        latents = torch.randn((batch, 16, f, h, w), generator=gen).to(device, dtype)
        text_tokens = 512
        text = torch.randn((batch, text_tokens, config["text_dim"]), generator=gen)
        kwargs = dict(hidden_states=latents, encoder_hidden_states=text.to(device, dtype), timestep=timestep,
                      return_dict=False)
        flops = wan.transformer_flops(config, video_tokens, text_tokens, batch)

    def call():
        with torch.inference_mode():
            return model(**kwargs)[0]

    warmup, runs = ctx.reps(2 if batch == 1 else 1, ctx.args.runs)
    free_memory(device)
    with Peak(device) as peak:
        stats = repeat(call, device, warmup, runs)
    out = call()
    row = {
        "label": LABEL, "family": family, "model": name, "params": params(model), "height": height, "width": width,
        "frames": frames, "latent_fhw": [f, h, w], "batch": batch, "video_tokens": video_tokens,
        "text_tokens": text_tokens,
        "seq_len": video_tokens + text_tokens if family == "cog" else video_tokens,
        "median_s": stats["median_s"], "times_s": stats["times_s"], "runs": runs, "warmup": warmup,
        "peak_gib": peak.peak_gib, "peak_above_weights_gib": peak.above_start_gib,
        "tflops": flops / stats["median_s"] / 1e12, "output_finite": bool(torch.isfinite(out.float()).all()),
    }
    del out, kwargs, latents, text
    return row


def part_cog(rec: dict, ctx) -> None:
    """B=1 and B=2 forwards of both CogVideoX transformers; they stay resident for cog_e2e."""
    size = ctx.sizes["cog"]
    rows = []
    for key in ("5b", "2b"):
        name = ctx.cog_name(key)
        model, build_s = timed(lambda: transformer(name, ctx.device, ctx.dtype), ctx.device)
        ctx.models[key] = model
        for batch in (1, 2):
            row = _forward_row(name, model, "cog", size, batch, ctx)
            row["build_s"] = build_s
            rows.append(row)
            print(_row_line(row), flush=True)
    rec["rows"] = rows
    b1 = {r["model"]: r["median_s"] for r in rows if r["batch"] == 1}
    b2 = {r["model"]: r["median_s"] for r in rows if r["batch"] == 2}
    n5, n2 = ctx.cog_name("5b"), ctx.cog_name("2b")
    rec["step_s"] = {  # one CFG step = cond + uncond
        n5: {"one_B2_forward": b2[n5], "two_B1_forwards": 2 * b1[n5]},
        n2: {"one_B2_forward": b2[n2], "two_B1_forwards": 2 * b1[n2]},
    }
    rec["ratio_2b_over_5b"] = {"B1": b1[n2] / b1[n5], "B2": b2[n2] / b2[n5]}
    rec["rope_applied_by_2b_rel_diff"] = _rope_leak(ctx, ctx.models["2b"], ctx.models["5b"], size)


def _rope_leak(ctx, small, big, size) -> float:
    """How much the 2B's output changes when it is handed the 5B's rotary embedding, as CogVideoXPipeline does after
    a plain transformer swap: diffusers' attention processor applies any `image_rotary_emb` it is given, whatever
    the model's config says. 0 would mean the swap is harmless; anything else, the 2B must be called without it."""
    device, dtype = ctx.device, ctx.dtype
    height, width, frames = size
    f, h, w = WAN_LATENTS.grid(frames, height, width)
    config = TRANSFORMERS[ctx.cog_name("2b")]
    gen = torch.Generator("cpu").manual_seed(1)
    kwargs = dict(hidden_states=torch.randn((1, f, 16, h, w), generator=gen).to(device, dtype),
                  encoder_hidden_states=torch.randn((1, config["max_text_seq_length"], config["text_embed_dim"]),
                                                    generator=gen).to(device, dtype),
                  timestep=torch.full((1,), 500, device=device, dtype=torch.long), return_dict=False)
    rotary = _cog_pipe(big)._prepare_rotary_positional_embeddings(height, width, f, device)
    with torch.inference_mode():
        plain = small(**kwargs)[0]
        leaked = small(**kwargs, image_rotary_emb=rotary)[0]
    return harness.rel_err(leaked, plain)


def part_wan(rec: dict, ctx, size_key: str) -> None:
    name = ctx.wan_name()
    if "wan" not in ctx.models:
        ctx.models["wan"], ctx.wan_build_s = timed(lambda: transformer(name, ctx.device, ctx.dtype), ctx.device)
    row = _forward_row(name, ctx.models["wan"], "wan", ctx.sizes[size_key], 1, ctx)
    row["build_s"] = ctx.wan_build_s
    row["step_s_two_B1_forwards"] = 2 * row["median_s"]
    rec["rows"] = [row]
    print(_row_line(row), flush=True)


# ---------------------------------------------------------------------------------------------- end to end
def _text_encoder(ctx):
    from transformers import T5Config, T5EncoderModel

    name = "smoke" if ctx.args.smoke else "t5-v1_1-xxl"
    config = T5Config(**TEXT_ENCODERS[name], pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
    return random_init(T5EncoderModel, config, ctx.device, ctx.dtype)


def part_cog_e2e(rec: dict, ctx) -> None:
    """diffusers' CogVideoXPipeline, all-5B and SR (5B for K steps, then the 2B), guidance 6, batched CFG."""
    from diffusers import AutoencoderKLCogVideoX, CogVideoXDDIMScheduler

    device, dtype, args = ctx.device, ctx.dtype, ctx.args
    big, small = ctx.models["5b"], ctx.models["2b"]
    height, width, frames = ctx.sizes["cog"]
    vae = random_init(AutoencoderKLCogVideoX, VAES["smoke" if args.smoke else "cogvideox-5b"], device, dtype)
    encoder = _text_encoder(ctx)
    pipe = _cog_pipe(big, vae, CogVideoXDDIMScheduler(**SCHEDULERS["cogvideox-5b"]))
    pipe.set_progress_bar_config(disable=True)
    text_len = TRANSFORMERS[ctx.cog_name("5b")]["max_text_seq_length"]
    rec["resident_gib"] = torch.cuda.memory_allocated(device) / GIB if harness.is_cuda(device) else None
    rec["params"] = {"text_encoder": params(encoder), "vae": params(vae)}

    # The 2B has no rotary embedding, but the pipeline computes one from the 5B's config before the loop and passes
    # it on every step: unless dropped, the 2B would apply RoPE on top of its sin-cos embedding (a wrong model).
    drop_rope = small.register_forward_pre_hook(
        lambda m, a, kw: (a, {**kw, "image_rotary_emb": None}), with_kwargs=True)
    calls = {"5b": 0, "2b": 0}
    hooks = [big.register_forward_pre_hook(lambda m, a: calls.__setitem__("5b", calls["5b"] + 1)),
             small.register_forward_pre_hook(lambda m, a: calls.__setitem__("2b", calls["2b"] + 1))]

    def encode():
        ids = torch.randint(1, TEXT_ENCODERS["smoke" if args.smoke else "t5-v1_1-xxl"]["vocab_size"],
                            (2, text_len), generator=torch.Generator("cpu").manual_seed(0)).to(device)
        with torch.inference_mode():  # prompt and negative prompt, one encoder call each as the pipeline does
            return encoder(ids[:1])[0], encoder(ids[1:])[0]

    def run(steps: int, k: int) -> dict:
        marks: list[float] = []
        calls.update({"5b": 0, "2b": 0})

        def on_step_end(p, i, t, kwargs):
            sync(device)
            marks.append(time.perf_counter())
            if i == k - 1 and k < steps:
                p.transformer = small  # from step k on (0-based) the 2B denoises
            return kwargs

        (prompt, negative), encode_s = timed(encode, device)
        sync(device)
        start = time.perf_counter()
        latents = pipe(prompt_embeds=prompt, negative_prompt_embeds=negative, height=height, width=width,
                       num_frames=frames, num_inference_steps=steps, guidance_scale=6.0,
                       generator=torch.Generator("cpu").manual_seed(0), output_type="latent", return_dict=False,
                       callback_on_step_end=on_step_end)[0]
        sync(device)
        denoise_s = time.perf_counter() - start
        pipe.transformer = big
        with torch.inference_mode():
            frames_out, decode_s = timed(lambda: pipe.decode_latents(latents), device)
        step_s = [b - a for a, b in zip([start, *marks[:-1]], marks)]
        result = {
            "N": steps, "K": k, "calls": dict(calls), "encode_s": encode_s, "denoise_s": denoise_s,
            "decode_s": decode_s, "total_s": encode_s + denoise_s + decode_s, "step_s": step_s,
            "sketch_step_median_s": statistics.median(step_s[:k]),
            "render_step_median_s": statistics.median(step_s[k:]) if k < steps else None,
            "latent_shape": list(latents.shape), "video_shape": list(frames_out.shape),
        }
        del latents, frames_out
        return result

    try:
        steps, k = args.e2e_steps, args.e2e_k
        rec["warmup"] = run(2, 1)
        runs = []
        for _ in range(args.e2e_reps):
            runs.append({"all_5b": run(steps, steps), "sr": run(steps, k)})
        rec["runs"] = runs
    finally:
        drop_rope.remove()
        for hook in hooks:
            hook.remove()
        pipe.transformer = big
    last = runs[-1]
    for r in runs:
        r["speedup_measured"] = r["all_5b"]["total_s"] / r["sr"]["total_s"]
        r["speedup_denoise_only"] = r["all_5b"]["denoise_s"] / r["sr"]["denoise_s"]
        print(f"e2e N={steps}: all-5B {r['all_5b']['total_s']:.2f} s, SR K={k} {r['sr']['total_s']:.2f} s, "
              f"{r['speedup_measured']:.3f}x (denoise only {r['speedup_denoise_only']:.3f}x)", flush=True)
    # The cost model from this run's own numbers: per-step medians from the e2e runs (pipeline overhead included)
    # and, beside it, from the standalone B=2 forwards of part `cog`.
    c5 = statistics.median(s for r in runs for s in r["all_5b"]["step_s"])
    c2 = statistics.median(s for r in runs for s in r["sr"]["step_s"][k:])
    enc = statistics.median(x for r in runs for x in (r["all_5b"]["encode_s"], r["sr"]["encode_s"]))
    dec = statistics.median(x for r in runs for x in (r["all_5b"]["decode_s"], r["sr"]["decode_s"]))
    fwd = ctx.results["cog"].get("step_s", {})
    c5_fwd = fwd.get(ctx.cog_name("5b"), {}).get("one_B2_forward")
    c2_fwd = fwd.get(ctx.cog_name("2b"), {}).get("one_B2_forward")
    rec["model"] = model = {"C5B_step_s": c5, "C2B_step_s": c2, "encode_s": enc, "decode_s": dec,
                            "C5B_B2_forward_s": c5_fwd, "C2B_B2_forward_s": c2_fwd,
                            "step_ratio_2b_over_5b": c2 / c5}

    def ideal(n, kk, a, b):
        return enc + kk * a + (n - kk) * b + dec

    model["ideal_all_5b_s"] = ideal(steps, steps, c5, c2)
    model["ideal_sr_s"] = ideal(steps, k, c5, c2)
    model["measured_all_5b_s"] = last["all_5b"]["total_s"]
    model["measured_sr_s"] = last["sr"]["total_s"]
    model["ideal_speedup"] = model["ideal_all_5b_s"] / model["ideal_sr_s"]
    proj = {}
    for n, kk in ((50, 10), (50, 5), (50, 15), (50, 20)):
        entry = {"with_encode_decode": ideal(n, n, c5, c2) / ideal(n, kk, c5, c2),
                 "transformer_only": n * c5 / (kk * c5 + (n - kk) * c2)}
        if c5_fwd and c2_fwd:
            entry["from_B2_forwards"] = ideal(n, n, c5_fwd, c2_fwd) / ideal(n, kk, c5_fwd, c2_fwd)
        proj[f"N{n}_K{kk}"] = entry
    model["projected_speedup"] = proj
    rec["all_5b_N50_s"] = ideal(50, 50, c5, c2)
    rec["sr_N50_K10_s"] = ideal(50, 10, c5, c2)
    print(f"projected N=50 K=10: {proj['N50_K10']['with_encode_decode']:.3f}x "
          f"(transformer only {proj['N50_K10']['transformer_only']:.3f}x)", flush=True)
    del pipe, vae, encoder
    free_memory(device)


# ------------------------------------------------------------------------------------------------- compat
def part_compat(rec: dict, ctx) -> None:
    """What differs between the CogVideoX-5B and -2B pipelines, and what a 5B -> 2B hand-off must convert.

    With the same VAE (same architecture; the configs differ only in scaling_factor), x0 = scaling_factor * z, so
    a 5B state x = sqrt(a5) 0.7 z + sqrt(1 - a5) eps is, in the 2B's units, the state of 2B timestep t' whose
    signal-to-noise ratio in z units matches, SNR_z = a/(1-a) * scaling_factor^2, multiplied by
    s = sqrt(1 - a2(t')) / sqrt(1 - a5(t)). Both schedulers are DDIM with v-prediction on 1000 training steps."""
    import numpy as np
    from diffusers import CogVideoXDDIMScheduler

    t5, t2 = TRANSFORMERS["cogvideox-5b"], TRANSFORMERS["cogvideox-2b"]
    rec["transformer_config_diff"] = {k: [t5.get(k), t2.get(k)] for k in sorted(set(t5) | set(t2))
                                      if t5.get(k) != t2.get(k)}
    rec["transformer_config_same"] = sorted(k for k in t5 if t5.get(k) == t2.get(k))
    v5, v2 = VAES["cogvideox-5b"], VAES["cogvideox-2b"]
    rec["vae_config_diff"] = {k: [v5[k], v2[k]] for k in v5 if v5[k] != v2[k]}
    s5, s2 = SCHEDULERS["cogvideox-5b"], SCHEDULERS["cogvideox-2b"]
    rec["scheduler_config_diff"] = {k: [s5[k], s2[k]] for k in s5 if s5[k] != s2[k]}
    sched5, sched2 = CogVideoXDDIMScheduler(**s5), CogVideoXDDIMScheduler(**s2)
    a5, a2 = sched5.alphas_cumprod.double().numpy(), sched2.alphas_cumprod.double().numpy()
    f5, f2 = v5["scaling_factor"], v2["scaling_factor"]
    last = len(a2) - 1  # the last training step has SNR 0 (zero terminal SNR): left out of the log
    snr5, snr2 = a5[:last] / (1 - a5[:last]) * f5 ** 2, a2[:last] / (1 - a2[:last]) * f2 ** 2  # SNR in z units
    steps = np.arange(last)
    handoffs = []
    for n, k in ((ctx.args.e2e_steps, ctx.args.e2e_k), (50, 10)):
        sched5.set_timesteps(n)
        t = int(sched5.timesteps[k])  # the timestep the first render step denoises at
        # log SNR falls as t grows: interpolate the 2B timestep t' of equal SNR on the reversed (rising) curve
        tp = float(np.interp(-math.log(snr5[t]), -np.log(snr2), steps))
        a2p = float(np.interp(tp, steps, a2[:last]))
        handoffs.append({
            "N": n, "K": k, "t_K": t, "alpha_bar_5b": float(a5[t]), "t_equiv_2b": tp, "alpha_bar_2b_at_t_equiv": a2p,
            "latent_rescale": math.sqrt(1 - a2p) / math.sqrt(1 - float(a5[t])),
            "naive_snr_z_ratio_2b_over_5b_at_t_K": float(snr2[t] / snr5[t]),
            "x0_scale_ratio_2b_over_5b": f2 / f5,
        })
    rec["handoff"] = handoffs
    ratio = snr2 / snr5
    rec["snr_z_ratio_2b_over_5b_range"] = [float(ratio.min()), float(ratio.max())]


# ---------------------------------------------------------------------------------------------------- CLI
class Context:
    def __init__(self, args, results: dict):
        self.args = args
        self.results = results
        self.device = args.device
        self.dtype = {"bfloat16": torch.bfloat16, "float32": torch.float32}[args.dtype]
        self.sizes = SMOKE if args.smoke else REAL
        self.models: dict = {}
        self.wan_build_s = None

    def reps(self, warmup: int, runs: int) -> tuple[int, int]:
        return (0, 1) if self.args.smoke else (warmup, runs)

    def cog_name(self, key: str) -> str:
        return f"smoke-cogvideox-{key}" if self.args.smoke else f"cogvideox-{key}"

    def wan_name(self) -> str:
        return "smoke-wan" if self.args.smoke else "wan2.2-t2v-a14b-expert"


def _row_line(r: dict) -> str:
    peak = f"{r['peak_gib']:.2f}" if r["peak_gib"] is not None else "-"
    return (f"{r['model']:24s} {r['height']}x{r['width']}x{r['frames']} B={r['batch']} tokens={r['seq_len']:6d} "
            f"{r['median_s']:.4f} s  {r['tflops']:.0f} TFLOP/s  peak {peak} GiB  params {r['params'] / 1e9:.3f}B")


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--smoke", action="store_true", help="tiny stand-ins on the CPU in float32 (tests)")
    parser.add_argument("--parts", default="compat,cog,cog_e2e,wan480,wan720")
    parser.add_argument("--runs", type=int, default=5, help="timed forwards per row (after warm-up)")
    parser.add_argument("--e2e-steps", type=int, default=10)
    parser.add_argument("--e2e-k", type=int, default=2)
    parser.add_argument("--e2e-reps", type=int, default=1, help="all-5B / SR pairs, alternating")
    parser.add_argument("--budget-s", type=float, default=540.0, help="skip parts that would not finish by then")
    parser.add_argument("--commit", default=None, help="the commit measured (default: $BENCH_COMMIT, else git's)")
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    if args.smoke:
        args.device, args.dtype = "cpu", "float32"
        args.e2e_steps, args.e2e_k = min(args.e2e_steps, 4), min(args.e2e_k, 1)
    torch.manual_seed(0)
    bench = Bench("bench.families", argv, args.out, args.budget_s, commit=args.commit, label=LABEL,
                  dtype=args.dtype, device=args.device)
    ctx = Context(args, bench.parts)
    estimates = {"compat": 1, "cog": 60, "cog_e2e": 120, "wan480": 60, "wan720": 100}
    for part in args.parts.split(","):
        fn = {"compat": part_compat, "cog": part_cog, "cog_e2e": part_cog_e2e,
              "wan480": lambda rec, c: part_wan(rec, c, "wan480"),
              "wan720": lambda rec, c: part_wan(rec, c, "wan720")}[part]
        if part.startswith("wan"):  # the CogVideoX models are done with: give their memory to the 14B
            for key in ("5b", "2b"):
                ctx.models.pop(key, None)
            free_memory(args.device)
        bench.run(part, 0 if args.smoke else estimates[part], fn, ctx)
    print("\n".join(bench.problems()))
    return bench.doc


if __name__ == "__main__":
    main()
