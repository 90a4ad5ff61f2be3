"""GPU benchmarks of the sketch/render engine (issue 5): one invocation per device call, parts chosen by --parts.

    python -m bench.run --parts vae,models,forward,anchors,e2e,handoff,forward720 \\
        --steps 25 --ks 5,4 --commit $(git rev-parse --short HEAD) --out $OUT/results.json
    python -m bench.run --smoke --out /tmp/bench.json        # CPU, tiny models, seconds: tests every code path

Parts (run in the order given; each guarded by a deadline and its own try/except, see measure.Guard):
  vae         VAE decode alone on the device: untiled fp32/bf16, peak against latent frame count, the ops with the
              largest transient memory, diffusers' spatial tiling at several tile sizes (time, peak, difference)
  vae720      the same at 720p/81 frames (untiled and tiled; no diagnostics)
  models      load the stage models (14B, 1.3B, umT5-XXL, VAE) and keep them resident for the parts below
  forward     per-forward time of each transformer at 480p: B=1 and B=2 (CFG batched) against two B=1 calls
  anchors     encode and decode stage times (serve.stages.encode/decode) with every model resident
  e2e         encode + K sketch + N-K render + decode through serve.stages, for K = N (all-14B) and each --ks,
              next to the ideal K*C_sketch + (N-K)*C_render + encode + decode from this run's anchors (per-step
              costs from the forward part, else from the e2e runs' own stage times). With --kernels SPEC, after the
              eager rows: the levers applied to both resident transformers in place by srd_kernels.apply_kernels
              (the stages' path; compile warmed at the request's shape, its time reported apart), then the first
              SR plan again with them, and with render step caching at each --render-cache threshold; each lever
              row's final latents are compared with the eager SR row's (cosine, relative error)
  handoff     pickling the 480p Handoff that the first SR run's sketch produced: size and seconds
  forward720  per-forward B=1 of both transformers at 720p/81 frames

Every model is random-init with the real architecture (bench/wan.py): cost equals the real weights', and every
result carries that label. The denoising loop is the engine's own (serve.stages.sketch/render with GuidedDenoiser);
nothing here re-implements it.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import pickle
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict

import torch

from bench import measure, wan
from bench.measure import GIB, Guard, Peak, free_memory, repeat, timed
from serve import stages
from serve.engine import VaeTiling
from serve.models import ModelPair
from serve.plan import make_plan, run_plan
from serve.models import WAN21_T2V
from serve.request import VideoRequest

PROMPT = "A red fox runs through fresh snow at dawn, cinematic, shallow depth of field."
NEGATIVE = "blurry, low quality, distorted"

# diffusers' AutoencoderKLWan.enable_tiling geometry, in pixels: (tile height, tile width, stride height, stride
# width); overlap = tile - stride is blended. Names: rows x columns of tiles over the frame.
TILINGS = {
    "480p": {
        "diffusers-default": (256, 256, 192, 192),
        "1x2": (480, 480, 480, 416),
        "1x3": (480, 320, 480, 288),
        "1x4": (480, 256, 480, 208),
        "2x2": (288, 448, 240, 416),
        "2x2-lean": (256, 432, 240, 416),
        "720p-1x2-geometry": (720, 704, 720, 640),
    },
    "720p": {
        "1x2": (720, 704, 720, 640),
        "1x3": (720, 480, 720, 432),
        "2x2": (416, 704, 368, 640),
    },
    "smoke": {"2x2": (24, 32, 16, 24)},
}
# DESIGN.md's H100 figures (diffusers 0.42.1, torch 2.11, real weights), for the side-by-side column.
DESIGN = {
    ("wan2.1-t2v-14b", 480, 1): 3.34, ("wan2.1-t2v-14b", 480, 2): 6.81,
    ("wan2.1-t2v-1.3b", 480, 1): 0.64, ("wan2.1-t2v-1.3b", 480, 2): 1.26,
    ("wan2.1-t2v-14b", 720, 1): 12.33, ("wan2.1-t2v-1.3b", 720, 1): 2.46,
}


class Context:
    """What the parts share inside one invocation: arguments, sizes, resident models, anchors."""

    def __init__(self, args):
        self.args = args
        self.device = args.device
        self.dtype = {"bfloat16": torch.bfloat16, "float32": torch.float32}[args.dtype]
        self.sizes = wan.SMOKE if args.smoke else wan.REAL_480P
        self.sizes720 = wan.SMOKE if args.smoke else wan.REAL_720P
        self.models: dict = {}
        self.first_handoff = None

    def reps(self, warmup: int, runs: int) -> tuple[int, int]:
        """(warmup, runs) for timing; one run and no warm-up on a smoke run, which only tests the code path."""
        return (0, 1) if self.args.smoke else (warmup, runs)

    def params(self, steps: int, k: int, render_cache: float = 0.0):
        s = self.sizes
        return VideoRequest(
            prompt=PROMPT, negative_prompt=NEGATIVE, height=s.height, width=s.width, num_frames=s.num_frames,
            num_inference_steps=steps, switch=f"step:{k}", seed=0, render_cache=render_cache,
        ).resolve(WAN21_T2V.defaults)

    def save(self) -> None:
        """Write what is measured so far (a long part saves after each run: a killed call keeps it)."""
        _write(self.args.out, self.meta, self.results)


def latent(sizes: wan.Sizes, batch: int = 1) -> torch.Tensor:
    generator = torch.Generator("cpu").manual_seed(0)
    return torch.randn((batch, *sizes.latent_shape[1:]), generator=generator)


def _tiling(h: int, w: int, sh: int, sw: int) -> dict:
    """enable_tiling kwargs, validated by the engine's own config (serve.engine.VaeTiling)."""
    return VaeTiling(tile_sample_min_height=h, tile_sample_min_width=w, tile_sample_stride_height=sh,
                     tile_sample_stride_width=sw).model_dump()


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float(), b.float()
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


# ----------------------------------------------------------------------------------------------------------- VAE
def _attempt(rec: dict, key: str, fn) -> None:
    """rec[key] = fn(), or the error: one failing measurement must not hide the ones after it."""
    try:
        rec[key] = fn()
    except Exception as e:  # noqa: BLE001
        rec[key] = {"error": f"{type(e).__name__}: {e}"}


def _vae_study(rec: dict, ctx: Context, sizes: wan.Sizes, tilings: dict, diagnostics: bool) -> None:
    """Untiled decode in float32 (WanPipeline's VAE dtype) and in each --vae-dtypes; for the latter also diffusers'
    spatial tiling at each geometry in `tilings` (time, peak, difference from untiled) and, with `diagnostics`,
    the peak against latent frame count and the ops with the largest transient memory."""
    dev, z, (warmup, runs) = ctx.device, latent(sizes), ctx.reps(1, 2)
    if ctx.args.vae_tilings:
        tilings = {k: v for k, v in tilings.items() if k in ctx.args.vae_tilings.split(",")}
    full = [getattr(torch, d) for d in ctx.args.vae_dtypes]
    for dtype in ([torch.float32] if torch.float32 not in full else []) + full:
        name = str(dtype).removeprefix("torch.")
        vae = wan.vae(sizes.vae, dev, dtype)
        zz = z.to(dev, dtype)

        def decode(lat=zz, vae=vae):
            with torch.inference_mode():
                return vae.decode(lat, return_dict=False)[0]

        def measure_decode(lat=zz, warmup=warmup, runs=runs):
            free_memory(dev)
            with Peak(dev) as peak:
                stats = repeat(lambda: decode(lat), dev, warmup=warmup, runs=runs)
            return {**stats, **peak.as_dict()}

        rec[f"untiled_{name}"] = measure_decode()
        if dtype not in full:
            del vae, zz, decode
            free_memory(dev)
            continue
        reference = decode()
        untiled_s = rec[f"untiled_{name}"]["median_s"]
        if diagnostics:
            _attempt(rec, f"untiled_{name}_by_latent_frames",
                     lambda: {str(f): measure_decode(zz[:, :, :f], 0, 1) for f in (1, 2, 6)})
            _attempt(rec, f"largest_transients_{name}_2_latent_frames",
                     lambda: measure.op_transients(lambda: decode(zz[:, :, :2]), dev))
        for label, (h, w, sh, sw) in tilings.items():
            def tiled(h=h, w=w, sh=sh, sw=sw):
                vae.enable_tiling(**_tiling(h, w, sh, sw))
                try:
                    stats = measure_decode(zz, warmup, 1)
                    return {"tile": [h, w, sh, sw], **stats, "slowdown_vs_untiled": stats["median_s"] / untiled_s - 1,
                            "rel_l2_diff_vs_untiled": rel_diff(decode(), reference)}
                finally:
                    vae.disable_tiling()

            _attempt(rec, f"tiled_{name}_{label}", tiled)
        if diagnostics:  # the whole decode stage as the engine runs it (VAE, then uint8 frames on the CPU)
            pipe = wan.pipeline(None, vae)
            _attempt(rec, f"stage_decode_untiled_{name}_s", lambda: timed(lambda: stages.decode(pipe, z), dev)[1])
            del pipe
        del vae, zz, decode, reference
        free_memory(dev)


def part_vae(rec: dict, ctx: Context) -> None:
    tilings = TILINGS["smoke" if ctx.args.smoke else "480p"]
    _vae_study(rec, ctx, ctx.sizes, tilings, ctx.args.vae_diagnostics)


def part_vae720(rec: dict, ctx: Context) -> None:
    tilings = TILINGS["smoke" if ctx.args.smoke else "720p"]
    _vae_study(rec, ctx, ctx.sizes720, tilings, diagnostics=False)


# -------------------------------------------------------------------------------------------------------- models
def part_models(rec: dict, ctx: Context) -> None:
    dev, dt, s = ctx.device, ctx.dtype, ctx.sizes
    for role, build, name in (
        ("sketch", wan.transformer, s.sketch), ("render", wan.transformer, s.render),
        ("text_encoder", wan.text_encoder, s.text_encoder), ("vae", wan.vae, s.vae),
    ):
        model, seconds = timed(lambda b=build, n=name: b(n, dev, dt), dev)
        ctx.models[role] = model
        params = sum(p.numel() for p in model.parameters())
        rec[role] = {"arch": name, "params_b": params / 1e9, "build_s": seconds,
                     "weights_gib": sum(p.numel() * p.element_size() for p in model.parameters()) / GIB}
    ctx.models["pipe"] = wan.pipeline(ctx.models["text_encoder"], ctx.models["vae"])
    ctx.models["scheduler_config"] = wan.scheduler_config()
    if ctx.args.vae_tile:
        h, w, sh, sw = ctx.args.vae_tile
        ctx.models["vae"].enable_tiling(**_tiling(h, w, sh, sw))
    rec["vae_tiling"] = ctx.args.vae_tile or "off"
    if measure.is_cuda(dev):
        rec["resident_gib"] = torch.cuda.memory_allocated(dev) / GIB


def _forward_costs(rec: dict, ctx: Context, sizes: wan.Sizes, batches: tuple[int, ...], runs: dict) -> None:
    dev, dt = ctx.device, ctx.dtype
    _, _, f, h, w = sizes.latent_shape
    tokens = f * (h // 2) * (w // 2)  # patch (1, 2, 2)
    for role in ("sketch", "render"):
        model = ctx.models[role]
        arch = sizes.sketch if role == "sketch" else sizes.render
        text_dim = model.config.text_dim
        row = rec.setdefault(arch, {"tokens": tokens})
        for batch in batches:
            x = latent(sizes, batch).to(dev, dt)
            t = torch.full((batch,), 500, device=dev, dtype=torch.int64)
            e = torch.randn((batch, 512, text_dim), generator=torch.Generator("cpu").manual_seed(1)).to(dev, dt)

            def forward(model=model, x=x, t=t, e=e):
                with torch.inference_mode():
                    return model(hidden_states=x, timestep=t, encoder_hidden_states=e, return_dict=False)[0]

            free_memory(dev)
            with Peak(dev) as peak:
                stats = repeat(forward, dev, *ctx.reps(1, runs[(role, batch)]))
            flops = wan.transformer_flops(wan.TRANSFORMERS[arch], tokens, batch=batch)
            row[f"B{batch}"] = {**stats, **peak.as_dict(), "tflops_per_s": flops / stats["median_s"] / 1e12,
                                "design_s": DESIGN.get((arch, sizes.height, batch))}
            del x, t, e
        if "B1" in row and "B2" in row:
            row["B2_over_two_B1"] = row["B2"]["median_s"] / (2 * row["B1"]["median_s"])


def part_forward(rec: dict, ctx: Context) -> None:
    runs = {("sketch", 1): 3, ("sketch", 2): 2, ("render", 1): 5, ("render", 2): 3}
    _forward_costs(rec, ctx, ctx.sizes, (1, 2) if ctx.args.batched else (1,), runs)


def part_forward720(rec: dict, ctx: Context) -> None:
    _forward_costs(rec, ctx, ctx.sizes720, (1,), {("sketch", 1): 2, ("render", 1): 3})


# ------------------------------------------------------------------------------------------------ stages, e2e
def _encode(ctx, params):
    return stages.encode(ctx.models["pipe"], [params], ctx.device)


def part_anchors(rec: dict, ctx: Context) -> None:
    dev, params = ctx.device, ctx.params(2, 1)
    with Peak(dev) as peak:
        stats = repeat(lambda: _encode(ctx, params), dev, *ctx.reps(1, 5))
    rec["encode"] = {**stats, **peak.as_dict()}
    z = latent(ctx.sizes)
    free_memory(dev)
    with Peak(dev) as peak:
        stats = repeat(lambda: stages.decode(ctx.models["pipe"], z), dev, *ctx.reps(1, 2))
    rec["decode"] = {**stats, **peak.as_dict(), "vae_tiling": ctx.args.vae_tile or "off"}


def _step_cost(ctx: Context, role: str) -> float | None:
    """Seconds of transformer work per denoising step with CFG, as GuidedDenoiser runs it at this size, from the
    forward part (None when it did not run: the e2e part then takes them from its own runs)."""
    arch = ctx.sizes.sketch if role == "sketch" else ctx.sizes.render
    row = ctx.results.get("forward", {}).get(arch)
    if not isinstance(row, dict) or "B1" not in row:
        return None
    tokens = row["tokens"]
    rows_per_forward = max(1, stages.DEFAULT_MAX_TOKENS_PER_FORWARD // tokens)
    if rows_per_forward == 1 or "B2" not in row:
        return 2 * row["B1"]["median_s"]
    return row["B2"]["median_s"]


def _e2e_run(ctx: Context, n: int, k: int, sketcher, renderer, render_cache: float = 0.0) -> tuple[dict, object]:
    """One request through the engine's plan (encode, K sketch steps, N-K render steps, decode), each stage timed;
    returns (record, (handoff, final latents))."""
    dev, spec, params = ctx.device, stages.LatentSpec(), ctx.params(n, k, render_cache)
    row, peaks, skipped = {}, {}, {}

    def measured_stage(stage: str, call):
        with Peak(dev) as p:
            result, row[stage] = timed(call, dev)
        peaks[stage] = p.as_dict()
        return result

    free_memory(dev)
    wall = time.perf_counter()
    run = run_plan(
        make_plan("wan", params, ModelPair(sketch=ctx.sizes.sketch, render=ctx.sizes.render)), [params],
        encode=lambda requests: stages.encode(ctx.models["pipe"], requests, dev),
        denoise={
            "sketch": lambda batch, on_step: stages.sketch(sketcher, batch, ctx.models["scheduler_config"],
                                                           spec, dev, on_step),
            "render": lambda batch, on_step: stages.render(renderer, batch, dev, on_step, report=skipped),
        },
        decode=lambda latents: stages.decode(ctx.models["pipe"], latents), around=measured_stage)
    measured = time.perf_counter() - wall
    (handoff,), (latents,) = run.outputs["sketch"], run.latents
    record = {
        "K": k, "N": n, "K_over_N": k / n, "switch_step": handoff.step_index, "stage_s": row,
        "measured_s": measured, "peak_gib": peaks, "latents_finite": bool(torch.isfinite(latents).all()),
    }
    if k < n:
        record["render_cache"] = render_cache
        record["render_steps_skipped"] = int(skipped.get(0, 0))
        record["render_steps_computed"] = n - k - record["render_steps_skipped"]
    return record, (handoff, latents.detach().float().cpu())


def part_e2e(rec: dict, ctx: Context) -> None:
    n = ctx.args.steps
    anchors = ctx.results.get("anchors", {})
    c_sketch, c_render = _step_cost(ctx, "sketch"), _step_cost(ctx, "render")
    fixed = (anchors["encode"]["median_s"] + anchors["decode"]["median_s"]) if "encode" in anchors else None
    # At 480p one row fills a forward (B=1: cond, then uncond); the smoke sizes would batch both rows (B=2), so
    # cap them at one row too: the compiled blocks then see the shapes of the real run, as warmed up.
    _, _, f, h, w = ctx.sizes.latent_shape
    cap = stages.DEFAULT_MAX_TOKENS_PER_FORWARD if not ctx.args.smoke else f * (h // 2) * (w // 2)
    sketcher = stages.GuidedDenoiser(ctx.models["sketch"], max_tokens_per_forward=cap)
    renderer = stages.GuidedDenoiser(ctx.models["render"], max_tokens_per_forward=cap)
    runs = rec.setdefault("runs", {})
    sr_latents = None
    for k in [n] + [k for k in ctx.args.ks if k != n]:
        if None not in (c_sketch, c_render, fixed):
            estimate = k * c_sketch + (n - k) * c_render + fixed
            if ctx.guard.left() < estimate * 1.1 + 5:
                runs[str(k)] = {"skipped": f"time guard: {ctx.guard.left():.0f} s left, run needs ~{estimate:.0f} s"}
                continue
        runs[str(k)], (handoff, latents) = _e2e_run(ctx, n, k, sketcher, renderer)
        if k < n and ctx.first_handoff is None:
            ctx.first_handoff, sr_latents = handoff, (k, latents)
        del handoff, latents
        ctx.save()
    # Per-step costs (CFG: two forwards a step) from this run's own stages where the forward part did not run.
    base = runs.get(str(n), {})
    sr = runs.get(str(sr_latents[0])) if sr_latents else None
    source = "forward part"
    if c_sketch is None and "stage_s" in base:
        c_sketch, source = base["stage_s"]["sketch"] / n, "e2e stage times"
    if c_render is None and sr is not None:
        c_render = sr["stage_s"]["render"] / (n - sr["K"])
    if fixed is None and "stage_s" in base:
        fixed = base["stage_s"]["encode"] + base["stage_s"]["decode"]
    rec["anchors_s"] = {"sketch_step": c_sketch, "render_step": c_render, "encode_plus_decode": fixed,
                        "source": source}
    if None in (c_sketch, c_render, fixed):
        return
    for r in runs.values():
        if "measured_s" in r:
            r["ideal_s"] = r["K"] * c_sketch + (r["N"] - r["K"]) * c_render + fixed
            r["tax"] = r["measured_s"] / r["ideal_s"] - 1
    for r in runs.values():
        if "measured_s" in r and "measured_s" in base:
            r["speedup_measured"] = base["measured_s"] / r["measured_s"]
            r["speedup_ideal"] = base["ideal_s"] / r["ideal_s"]
            k50 = round(r["K_over_N"] * 50)
            r["speedup_ideal_at_50_steps"] = (50 * c_sketch + fixed) / (k50 * c_sketch + (50 - k50) * c_render + fixed)
    ctx.save()
    if ctx.args.kernels and sr_latents is not None and "measured_s" in base:
        _e2e_levers(rec, ctx, sketcher, renderer, sr_latents, (c_sketch, c_render, fixed))


# ------------------------------------------------------------------------------------------- e2e with levers
def kernel_config(spec: str, sizes: wan.Sizes, cache_dir: str | None):
    """A stage KernelConfig from a lever label as bench/kernels.py writes them ("attn:cudnn-fp8+fp8_linear+compile"),
    with the compile warmed at the request's own shape (the engine's load-time warm-up)."""
    from srd_kernels.config import KernelConfig

    compiled = "compile" in spec.split("+")
    try:
        return KernelConfig.from_label(spec, compile_cache_dir=cache_dir,
                                       warmup_frames=sizes.num_frames if compiled else None,
                                       warmup_height=sizes.height, warmup_width=sizes.width)
    except ValueError as e:
        raise ValueError(f"--kernels: {e}") from None


def _static_shapes() -> None:
    """One process compiles the blocks of both transformers (same block class, other shapes): without this, the
    second model's shapes would make dynamo recompile the shared block code with dynamic shapes. A stage replica
    holds one model, so each compiles statically there; so here (and identically in the helper, for its cache)."""
    torch._dynamo.config.automatic_dynamic_shapes = False


def _apply(ctx: Context, role: str, config) -> dict:
    from srd_kernels.apply import apply_kernels

    model = ctx.models[role]
    start = time.perf_counter()
    report = apply_kernels(model, config, role)
    measure.sync(ctx.device)
    return {"apply_s": time.perf_counter() - start, "warmup_s": report.warmup_seconds, "report": report.line(),
            "attention": report.attention, "attention_reason": report.attention_reason,
            "fp8_linear_layers": report.fp8_linear_layers, "fp8_reason": report.fp8_reason,
            "compiled": report.compiled}


def _compile_helper(ctx: Context, role: str, cache_dir: str) -> tuple[subprocess.Popen, str] | None:
    """Start a process that builds the `role` transformer, applies the same levers and warms them up (compile) into
    the shared cache dir, while this process compiles the other one: the in-process apply then loads the compiled
    kernels (a replica restart with a warm cache) instead of compiling both in turn. It times nothing, and runs
    only while this process compiles (no timed run overlaps it)."""
    if ctx.args.no_compile_helper or "compile" not in ctx.args.kernels.split("+"):
        return None
    if measure.is_cuda(ctx.device):
        free, _ = torch.cuda.mem_get_info()
        if free < 24 * GIB:
            return None
    out = os.path.join(cache_dir, f"helper-{role}.json")
    cmd = [sys.executable, "-m", "bench.run", "--compile-only", role, "--kernels", ctx.args.kernels,
           "--compile-cache", cache_dir, "--device", ctx.device, "--dtype", ctx.args.dtype, "--out", out]
    if ctx.args.smoke:
        cmd.append("--smoke")
    return subprocess.Popen(cmd), out


def compile_only(args) -> dict:
    """--compile-only ROLE: the helper process of _compile_helper (build, apply with warm-up, report, exit)."""
    from srd_kernels.apply import apply_kernels

    sizes = wan.SMOKE if args.smoke else wan.REAL_480P
    _static_shapes()
    config = kernel_config(args.kernels, sizes, args.compile_cache)
    model = wan.transformer(sizes.sketch if args.compile_only == "sketch" else sizes.render, args.device,
                            {"bfloat16": torch.bfloat16, "float32": torch.float32}[args.dtype])
    start = time.perf_counter()
    report = apply_kernels(model, config, args.compile_only + " (helper, cold cache)")
    result = {"apply_s": time.perf_counter() - start, "warmup_s": report.warmup_seconds, "report": report.line()}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f)
    return result


def _compare(latents: torch.Tensor, reference: torch.Tensor) -> dict:
    a, b = latents.flatten().double(), reference.flatten().double()
    return {"cosine_vs_sr_eager": float(torch.nn.functional.cosine_similarity(a, b, dim=0)),
            "rel_error_vs_sr_eager": float((a - b).norm() / b.norm().clamp_min(1e-12))}


def _e2e_levers(rec: dict, ctx: Context, sketcher, renderer, sr_latents, costs) -> None:
    """Apply --kernels to both transformers (in place: the eager rows ran first), then the first SR plan again
    with them, and with render caching at each --render-cache threshold."""
    n, (k, reference) = ctx.args.steps, sr_latents
    c_sketch, c_render, fixed = costs
    runs, levers = rec["runs"], rec.setdefault("levers", {"spec": ctx.args.kernels})
    cache_dir = ctx.args.compile_cache or tempfile.mkdtemp(prefix="srd-compile-")
    levers["compile_cache_dir"] = cache_dir
    _static_shapes()
    configs = {role: kernel_config(ctx.args.kernels, ctx.sizes, cache_dir) for role in ("sketch", "render")}
    levers["config"] = configs["sketch"].model_dump()
    # The 14B (the longer compile) here, cold; the 1.3B cold in a helper process meanwhile, then here from its cache.
    helper = _compile_helper(ctx, "render", cache_dir)
    levers["helper"] = "render, cold cache, in a second process" if helper else "none (each compiled here in turn)"
    for role in ("sketch", "render"):
        try:
            if role == "render" and helper is not None:
                proc, out = helper
                try:
                    proc.wait(timeout=max(1.0, ctx.guard.left() - 60))
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
                levers["render_helper"] = (json.load(open(out)) if proc.returncode == 0 and os.path.exists(out)
                                           else {"error": f"helper exit code {proc.returncode}"})
            levers[role] = _apply(ctx, role, configs[role])
            print(f"levers {role}: {levers[role]['report']}; apply {levers[role]['apply_s']:.1f} s", flush=True)
        except Exception as e:  # noqa: BLE001 - a lever that fails is recorded; the other stage may still run
            import traceback

            levers[role] = {"error": f"{type(e).__name__}: {e}"[:2000], "traceback": traceback.format_exc(limit=8)}
        ctx.save()
    applied = [role for role in ("sketch", "render") if "apply_s" in levers.get(role, {})]
    if not applied:
        return
    label = "levers" if len(applied) == 2 else f"levers({applied[0]} only)"
    base = runs[str(n)]
    sr_eager = runs[str(k)]
    estimate = sr_eager["measured_s"]  # the eager SR time: levers make it shorter
    lever_costs = None
    for cache in [0.0] + ctx.args.render_cache:
        key = f"{k}+{label}" + (f"+cache{cache:g}" if cache else "")
        if ctx.guard.left() < estimate * 1.1 + 5:
            runs[key] = {"skipped": f"time guard: {ctx.guard.left():.0f} s left, run needs ~{estimate:.0f} s"}
            continue
        try:
            row, (_, latents) = _e2e_run(ctx, n, k, sketcher, renderer, render_cache=cache)
        except Exception as e:  # noqa: BLE001
            runs[key] = {"error": f"{type(e).__name__}: {e}"[:2000]}
            continue
        row.update({"levers_on": applied, **_compare(latents, reference),
                    "speedup_measured": base["measured_s"] / row["measured_s"],
                    "speedup_vs_sr_eager": sr_eager["measured_s"] / row["measured_s"]})
        if lever_costs is None and not cache:
            lever_costs = (row["stage_s"]["sketch"] / k, row["stage_s"]["render"] / (n - k))
        if lever_costs is not None:
            ls, lr = lever_costs
            row["ideal_s"] = k * ls + row["render_steps_computed"] * lr + fixed
            row["tax"] = row["measured_s"] / row["ideal_s"] - 1
            row["speedup_ideal"] = base["ideal_s"] / row["ideal_s"]
        runs[key] = row
        ctx.save()
    if lever_costs is not None:
        # The preset's 50 steps, K = 10, from this run's per-step costs (stage time / steps; CFG included).
        ls, lr = lever_costs
        all14 = 50 * c_sketch + fixed
        proj = {"all_14b_eager_s": all14, "sr_eager_s": 10 * c_sketch + 40 * c_render + fixed,
                "sr_levers_s": 10 * ls + 40 * lr + fixed,
                "per_step_s": {"sketch_eager": c_sketch, "render_eager": c_render, "sketch_levers": ls,
                               "render_levers": lr, "encode_plus_decode": fixed}}
        for key, r in runs.items():
            if "cache" in key and "render_steps_skipped" in r:
                fraction = r["render_steps_skipped"] / (n - k)
                proj[f"sr_levers_{key.rsplit('+', 1)[1]}_s"] = 10 * ls + 40 * (1 - fraction) * lr + fixed
        for key in [key for key, v in proj.items() if isinstance(v, float) and key != "all_14b_eager_s"]:
            proj[key.removesuffix("_s") + "_speedup"] = all14 / proj[key]
        proj["label"] = ("ideal from this run's per-step costs at 50 steps, K=10; cached rows assume the skip "
                         f"fraction measured at N={n}")
        rec["ideal_at_50_steps_k10"] = proj
        ctx.save()


def part_handoff(rec: dict, ctx: Context) -> None:
    handoff = ctx.first_handoff
    if handoff is None:
        raise RuntimeError("no SR hand-off to pickle: the e2e part ran no K < N")
    blob = pickle.dumps(handoff, protocol=pickle.HIGHEST_PROTOCOL)
    dumps = repeat(lambda: pickle.dumps(handoff, protocol=pickle.HIGHEST_PROTOCOL), "cpu", warmup=1, runs=3)
    loads = repeat(lambda: pickle.loads(blob), "cpu", warmup=1, runs=3)
    restored = pickle.loads(blob)
    rec.update({
        "bytes_mb": len(blob) / 1e6, "dumps_s": dumps["median_s"], "loads_s": loads["median_s"],
        "latents_shape": list(handoff.latents.shape), "step_index": handoff.step_index,
        "roundtrip_equal": bool(torch.equal(restored.latents, handoff.latents)),
        "cpu_threads": torch.get_num_threads(),
    })


PARTS = {
    "vae": (part_vae, 60), "vae720": (part_vae720, 60),
    "models": (part_models, 40), "forward": (part_forward, 60), "anchors": (part_anchors, 15),
    "e2e": (part_e2e, 60), "handoff": (part_handoff, 5), "forward720": (part_forward720, 60),
}


# ---------------------------------------------------------------------------------------------------- report
def _f(x, fmt="{:.3f}"):
    return "-" if x is None else fmt.format(x)


def table(results: dict) -> str:
    lines = []
    for part in ("forward", "forward720"):
        for arch, row in results.get(part, {}).items():
            if not isinstance(row, dict) or "B1" not in row:
                continue
            b1, b2 = row["B1"], row.get("B2", {})
            lines.append(
                f"{part:10s} {arch:16s} tokens={row['tokens']:6d} B1={_f(b1['median_s'])}s "
                f"(DESIGN {_f(b1['design_s'], '{:.2f}')}) B2={_f(b2.get('median_s'))}s 2xB1={_f(2 * b1['median_s'])}s "
                f"B2/2B1={_f(row.get('B2_over_two_B1'))} {_f(b1['tflops_per_s'], '{:.0f}')} TFLOP/s "
                f"peak+{_f(b1['peak_above_start_gib'], '{:.1f}')}GiB"
            )
    for part in ("vae", "vae720"):
        for key, v in results.get(part, {}).items():
            if isinstance(v, dict) and ("median_s" in v or "error" in v):
                lines.append(
                    f"{part:10s} {key:32s} {_f(v.get('median_s'))}s "
                    f"peak+{_f(v.get('peak_above_start_gib'), '{:.2f}')}GiB "
                    f"slowdown={_f(v.get('slowdown_vs_untiled'), '{:+.3f}')} "
                    f"diff={_f(v.get('rel_l2_diff_vs_untiled'), '{:.1e}')}"
                    + (f" ERROR {v['error']}" if "error" in v else "")
                )
    anchors = results.get("anchors", {})
    if "encode" in anchors:
        enc, dec = anchors["encode"], anchors["decode"]
        lines.append(f"anchors    encode {_f(enc['median_s'])}s decode {_f(dec['median_s'])}s "
                     f"(decode peak+{_f(dec['peak_above_start_gib'], '{:.2f}')}GiB)")
    e2e = results.get("e2e", {})
    for k, r in e2e.get("runs", {}).items():
        if "measured_s" not in r:
            lines.append(f"e2e        {k} {r}")
            continue
        st = r["stage_s"]
        extra = ""
        if "cosine_vs_sr_eager" in r:
            extra = (f" cos_vs_SR_eager={r['cosine_vs_sr_eager']:.5f} rel={r['rel_error_vs_sr_eager']:.4f}"
                     f" vs_SR_eager={r['speedup_vs_sr_eager']:.3f}x")
        if "render_steps_skipped" in r:
            extra += f" render_skipped={r['render_steps_skipped']}/{r['N'] - r['K']}"
        lines.append(
            f"e2e        {k:22s} K={r['K']:2d}/N={r['N']} measured={r['measured_s']:.2f}s "
            f"ideal={_f(r.get('ideal_s'), '{:.2f}')}s tax={_f(r.get('tax', 0) * 100, '{:+.2f}')}% "
            f"speedup={_f(r.get('speedup_measured'), '{:.3f}')}x (ideal {_f(r.get('speedup_ideal'), '{:.3f}')}x, "
            f"ideal@50 {_f(r.get('speedup_ideal_at_50_steps'), '{:.3f}')}x) "
            f"enc/sk/rd/dec={st['encode']:.2f}/{st['sketch']:.2f}/{st['render']:.2f}/{st['decode']:.2f}s" + extra
        )
    levers = e2e.get("levers", {})
    for role in ("render_helper", "sketch", "render"):
        if role in levers:
            v = levers[role]
            lines.append(f"levers     {role:13s} " + (f"apply {v['apply_s']:.1f}s (warm-up {_f(v.get('warmup_s'), '{:.1f}')}s)"
                                                      f" {v['report']}" if "apply_s" in v else f"ERROR {v.get('error')}"))
    proj = e2e.get("ideal_at_50_steps_k10")
    if proj:
        lines.append("ideal@50/K=10 " + " ".join(f"{k.removesuffix('_speedup')}={v:.2f}x" for k, v in proj.items()
                                               if k.endswith("_speedup")))
    h = results.get("handoff", {})
    if "bytes_mb" in h:
        lines.append(f"handoff    {h['bytes_mb']:.1f} MB pickle dumps={h['dumps_s'] * 1e3:.1f}ms "
                     f"loads={h['loads_s'] * 1e3:.1f}ms")
    for name, rec in results.items():
        for key in ("error", "skipped"):
            if isinstance(rec, dict) and key in rec:
                lines.append(f"{key.upper():10s} {name}: {rec[key]}")
    return "\n".join(lines)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--parts", default="vae,models,forward,anchors,e2e,handoff")
    ap.add_argument("--smoke", action="store_true", help="tiny models on the CPU: tests the code paths in seconds")
    ap.add_argument("--device", default=None)
    ap.add_argument("--dtype", default=None, choices=["bfloat16", "float32"], help="bfloat16 (float32 with --smoke)")
    ap.add_argument("--steps", type=int, default=25, help="N for the e2e part")
    ap.add_argument("--ks", default="5,4", help="sketch steps K of the SR runs (all-14B, K=N, always runs first)")
    ap.add_argument("--no-batched", dest="batched", action="store_false", help="forward: skip B=2")
    ap.add_argument("--vae-tile", default=None, help="H,W,SH,SW: diffusers tiling for the resident VAE")
    ap.add_argument("--vae-dtypes", default="bfloat16", help="vae parts: dtypes that get the tiling study")
    ap.add_argument("--vae-tilings", default=None, help="vae parts: names from TILINGS (default: all of the size)")
    ap.add_argument("--no-vae-diagnostics", dest="vae_diagnostics", action="store_false",
                    help="vae: skip the latent-frame scaling and the op transients")
    ap.add_argument("--kernels", default=None,
                    help="e2e: also run the first SR plan with these levers on both transformers, e.g. "
                    "attn:cudnn-fp8+fp8_linear+compile (bench/kernels.py's labels); --smoke: attn:cudnn-fp8+fp8_linear")
    ap.add_argument("--render-cache", default="0.05,0.1",
                    help="e2e with --kernels: render step caching thresholds of the extra lever runs ('' for none)")
    ap.add_argument("--compile-cache", default=None, help="Inductor/Triton cache dir (default: a fresh temp dir)")
    ap.add_argument("--no-compile-helper", action="store_true",
                    help="compile both transformers in this process, one after the other (no helper process)")
    ap.add_argument("--compile-only", choices=["sketch", "render"], default=None, help=argparse.SUPPRESS)
    ap.add_argument("--budget-s", type=float, default=560.0, help="deadline for all parts (time guard)")
    ap.add_argument("--commit", default=os.environ.get("BENCH_COMMIT", "unknown"))
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    args.device = args.device or ("cpu" if args.smoke or not torch.cuda.is_available() else "cuda")
    args.dtype = args.dtype or ("float32" if args.smoke else "bfloat16")
    args.vae_dtypes = ["float32"] if args.smoke else [d for d in args.vae_dtypes.split(",") if d]
    args.ks = [int(k) for k in args.ks.split(",") if k]
    args.vae_tile = tuple(int(v) for v in args.vae_tile.split(",")) if args.vae_tile else None
    args.render_cache = [float(c) for c in args.render_cache.split(",") if c]
    if args.compile_only:
        return compile_only(args)
    if args.smoke:
        args.steps, args.ks = min(args.steps, 4), [k for k in args.ks if k < 4] or [2]
        # the lever rows with the CPU's fallbacks (sdpa, no FP8); compile, a minute on the CPU, is smoke-tested by
        # bench.kernels --smoke (tests/test_bench_kernels.py)
        args.kernels = args.kernels or "attn:cudnn-fp8+fp8_linear"

    ctx = Context(args)
    results: dict = {}
    ctx.results = results
    ctx.guard = Guard(args.budget_s, results)
    ctx.meta = meta = {
        "label": wan.LABEL, "date_utc": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "commit": args.commit, "device": torch.cuda.get_device_name() if measure.is_cuda(args.device) else "cpu",
        "torch": torch.__version__, "argv": sys.argv[1:] if argv is None else argv, "sizes": asdict(ctx.sizes),
        "dtype": args.dtype, "kernels": args.kernels,
    }
    try:
        import diffusers

        meta["diffusers"] = diffusers.__version__
    except ImportError:
        pass
    if args.kernels:
        from importlib.metadata import PackageNotFoundError, version

        for package in ("torchao", "nvidia-cudnn-frontend"):
            try:
                meta[package] = version(package)
            except PackageNotFoundError:
                meta[package] = None
        if measure.is_cuda(args.device):
            meta["cudnn"] = torch.backends.cudnn.version()
    for name in [p for p in args.parts.split(",") if p]:
        fn, estimate = PARTS[name]
        ctx.guard.run(name, estimate if not args.smoke else 0, fn, ctx)
        _write(args.out, meta, results)  # after every part: a killed run still leaves what it measured
    report = table(results)
    print(f"# {wan.LABEL} | {meta['device']} | commit {meta['commit']} | {meta['date_utc']}")
    print(report)
    return {"meta": meta, "parts": results}


def _write(path: str, meta: dict, results: dict) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump({"meta": meta, "parts": results}, f, indent=1, default=str)
    os.replace(path + ".tmp", path)


if __name__ == "__main__":
    main()
