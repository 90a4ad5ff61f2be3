"""GPU benchmarks of the sketch/render engine: one invocation per device call, parts chosen by --parts.

    python -m bench.run --parts vae,models,forward,anchors,e2e,handoff,forward720 \\
        --steps 25 --ks 5,4 --commit $(git rev-parse --short HEAD) --out $OUT/results.json
    python -m bench.run --parts models,forward,forward720,anchors --write-costs serve/placement_costs.json \\
        --out $OUT/costs.json                                # the placement planner's figures of this card
    python -m bench.run --smoke --out /tmp/bench.json        # CPU, tiny models, seconds: tests every code path

Parts (run in the order given; each guarded by a deadline and its own try/except, see bench.harness.Bench):
  vae         VAE decode alone on the device: untiled fp32/bf16, peak against latent frame count, the ops with the
              largest transient memory, diffusers' spatial tiling at several tile sizes (time, peak, difference)
  vae720      the same at 720p/81 frames (untiled and tiled; no diagnostics)
  models      the engine (serve.engine.Engine) on config-only model directories of the real architectures with
              random-init weights (bench/wan.py): 14B, 1.3B, umT5-XXL, VAE, resident for the parts below
  forward     per-forward time of each transformer at 480p: B=1 and B=2 (CFG batched) against two B=1 calls
  anchors     encode and decode stage times (the engine's encode and decode stages) with every model resident
  e2e         encode + K sketch + N-K render + decode through the engine's stages, for K = N (all-14B) and each
              --ks, next to the ideal K*C_sketch + (N-K)*C_render + encode + decode from this run's anchors
              (per-step costs from the forward part, else from the e2e runs' own stage times). With --kernels SPEC,
              after the eager rows: the levers applied to both resident transformers in place by
              srd_kernels.apply_kernels (the stages' path; compile warmed at the request's shape, its time reported
              apart), then the first SR plan again with them, and with render step caching at each --render-cache
              threshold; each lever row's final latents are compared with the eager SR row's (cosine, rel. error)
  handoff     the hand-off that the first SR run's sketch produced, through the codec the stage deployments store it
              with (serve/pipeline/artifacts.py HANDOFF: safetensors bytes): size, encode and decode seconds, and
              whether the round trip is exact
  forward720  per-forward B=1 of both transformers at 720p/81 frames

--write-costs PATH: after the parts (models, forward, forward720 and anchors must be among them), the figures the
placement planner reads (serve/placement_costs.json's format: forwards and their peaks at 480p and 720p, encode,
decode, weights, the card's memory) replace the entry of the card this run ran on, in PATH; other cards are kept.

Every model is random-init with the real architecture (bench/wan.py): cost equals the real weights', and every
result carries that label. The stages and their denoising loop are the engine's own; nothing here re-implements
them.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict

import torch

from bench import harness, wan
from bench.harness import GIB, Bench, Peak, fmt, free_memory, repeat, timed
from serve.config import EngineConfig, VaeTiling
from serve.engine import Engine
from serve.families.wan import FAMILY
from serve.models import WAN21_T2V
from serve.pipeline.artifacts import HANDOFF
from serve.pipeline.decode import DecodeStage
from serve.request import VideoRequest

PROMPT = "A red fox runs through fresh snow at dawn, cinematic, shallow depth of field."
NEGATIVE = "blurry, low quality, distorted"
COST_PARTS = ("models", "forward", "forward720", "anchors")  # what --write-costs needs

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


class Context:
    """What the parts share inside one invocation: arguments, sizes, the resident engine, the first hand-off."""

    def __init__(self, args, bench: Bench):
        self.args = args
        self.bench = bench
        self.results = bench.parts
        self.device = args.device
        self.dtype = {"bfloat16": torch.bfloat16, "float32": torch.float32}[args.dtype]
        self.sizes = wan.SMOKE if args.smoke else wan.REAL_480P
        self.sizes720 = wan.SMOKE_720P if args.smoke else wan.REAL_720P
        self.engine = None
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

    def stages(self) -> dict:
        """The resident engine's stages by name."""
        if self.engine is None:
            raise RuntimeError("no resident models: run the models part first")
        return self.engine.stages

    def transformer(self, role: str):
        return self.stages()[role].denoiser.transformer


def latent(sizes: wan.Sizes, batch: int = 1) -> torch.Tensor:
    generator = torch.Generator("cpu").manual_seed(0)
    return torch.randn((batch, *sizes.latent_shape[1:]), generator=generator)


def _tiling(h: int, w: int, sh: int, sw: int) -> VaeTiling:
    """diffusers' tile geometry, validated by the engine's own config."""
    return VaeTiling(tile_sample_min_height=h, tile_sample_min_width=w, tile_sample_stride_height=sh,
                     tile_sample_stride_width=sw)


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
                     lambda: harness.op_transients(lambda: decode(zz[:, :, :2]), dev))
        for label, (h, w, sh, sw) in tilings.items():
            def tiled(h=h, w=w, sh=sh, sw=sw):
                vae.enable_tiling(**_tiling(h, w, sh, sw).model_dump())
                try:
                    stats = measure_decode(zz, warmup, 1)
                    return {"tile": [h, w, sh, sw], **stats, "slowdown_vs_untiled": stats["median_s"] / untiled_s - 1,
                            "rel_l2_diff_vs_untiled": harness.rel_err(decode(), reference)}
                finally:
                    vae.disable_tiling()

            _attempt(rec, f"tiled_{name}_{label}", tiled)
        if diagnostics:  # the whole decode stage as the engine runs it (VAE, then uint8 frames on the CPU)
            stage = DecodeStage(FAMILY, wan.vae_pipeline(vae))
            _attempt(rec, f"stage_decode_untiled_{name}_s", lambda: timed(lambda: stage(z), dev)[1])
            del stage
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
    dev, s = ctx.device, ctx.sizes
    ctx.models_dir = tempfile.TemporaryDirectory(prefix="srd-bench-models-")
    pair = wan.write_config_only(s, ctx.models_dir.name)
    # At 480p one row fills a forward (B=1: cond, then uncond); the smoke sizes would batch both rows (B=2), so cap
    # them at one row too: the compiled blocks then see the shapes of the real run, as warmed up.
    cap = EngineConfig().max_tokens_per_forward if not ctx.args.smoke else s.tokens
    tile = ctx.args.vae_tile
    # speed exact: the eager rows first; --kernels applies the levers in place afterwards (_e2e_levers)
    config = EngineConfig(preset="wan2.1-t2v", sketch=pair.sketch, render=pair.render, device=dev,
                          speed="exact", dtype=ctx.args.dtype, weights="random-init", max_tokens_per_forward=cap,
                          vae_tiling=tile is not None, vae_tile=_tiling(*tile) if tile else VaeTiling())
    ctx.engine, rec["load_s"] = timed(lambda: Engine(config), dev)
    stages = ctx.engine.stages
    models = {"sketch": (s.sketch, ctx.transformer("sketch")), "render": (s.render, ctx.transformer("render")),
              "text_encoder": (s.text_encoder, stages["encode"].pipe.text_encoder),
              "vae": (s.vae, stages["decode"].pipe.vae)}
    for role, (name, model) in models.items():
        rec[role] = {"arch": name, "params_b": sum(p.numel() for p in model.parameters()) / 1e9,
                     "weights_gib": sum(p.numel() * p.element_size() for p in model.parameters()) / GIB}
    rec["vae_tiling"] = tile or "off"
    if harness.is_cuda(dev):
        rec["resident_gib"] = torch.cuda.memory_allocated(dev) / GIB
        rec["card_memory_gib"] = torch.cuda.get_device_properties(dev).total_memory / GIB


def _forward_costs(rec: dict, ctx: Context, sizes: wan.Sizes, batches: tuple[int, ...], runs: dict) -> None:
    dev, dt = ctx.device, ctx.dtype
    for role in ("sketch", "render"):
        model = ctx.transformer(role)
        arch = sizes.sketch if role == "sketch" else sizes.render
        text_dim = model.config.text_dim
        row = rec.setdefault(arch, {"tokens": sizes.tokens})
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
            flops = wan.transformer_flops(wan.TRANSFORMERS[arch], sizes.tokens, batch=batch)
            row[f"B{batch}"] = {**stats, **peak.as_dict(), "tflops_per_s": flops / stats["median_s"] / 1e12}
            del x, t, e
        if "B1" in row and "B2" in row:
            row["B2_over_two_B1"] = row["B2"]["median_s"] / (2 * row["B1"]["median_s"])


def part_forward(rec: dict, ctx: Context) -> None:
    runs = {("sketch", 1): 3, ("sketch", 2): 2, ("render", 1): 5, ("render", 2): 3}
    _forward_costs(rec, ctx, ctx.sizes, (1, 2) if ctx.args.batched else (1,), runs)


def part_forward720(rec: dict, ctx: Context) -> None:
    _forward_costs(rec, ctx, ctx.sizes720, (1,), {("sketch", 1): 2, ("render", 1): 3})


# ------------------------------------------------------------------------------------------------ stages, e2e
def part_anchors(rec: dict, ctx: Context) -> None:
    dev, params, stages = ctx.device, ctx.params(2, 1), ctx.stages()
    with Peak(dev) as peak:
        stats = repeat(lambda: stages["encode"]([params]), dev, *ctx.reps(1, 5))
    rec["encode"] = {**stats, **peak.as_dict()}
    z = latent(ctx.sizes)
    free_memory(dev)
    with Peak(dev) as peak:
        stats = repeat(lambda: stages["decode"](z), dev, *ctx.reps(1, 2))
    rec["decode"] = {**stats, **peak.as_dict(), "vae_tiling": ctx.args.vae_tile or "off"}


def _step_cost(ctx: Context, role: str) -> float | None:
    """Seconds of transformer work per denoising step with CFG, as the engine's denoiser runs it at this size, from
    the forward part (None when it did not run: the e2e part then takes them from its own runs)."""
    arch = ctx.sizes.sketch if role == "sketch" else ctx.sizes.render
    row = ctx.results.get("forward", {}).get(arch)
    if not isinstance(row, dict) or "B1" not in row:
        return None
    rows_per_forward = max(1, ctx.engine.config.max_tokens_per_forward // row["tokens"])
    if rows_per_forward == 1 or "B2" not in row:
        return 2 * row["B1"]["median_s"]
    return row["B2"]["median_s"]


def _e2e_run(ctx: Context, n: int, k: int, render_cache: float = 0.0) -> tuple[dict, object]:
    """One request through the engine's stages (encode, K sketch steps, N-K render steps, decode), each stage timed;
    returns (record, (handoff, final latents))."""
    dev, params = ctx.device, ctx.params(n, k, render_cache)
    row, peaks = {}, {}

    def measured_stage(stage: str, call):
        with Peak(dev) as p:
            result, row[stage] = timed(call, dev)
        peaks[stage] = p.as_dict()
        return result

    free_memory(dev)
    wall = time.perf_counter()
    (run,) = ctx.engine.generate_batch([params], around=measured_stage)
    measured = time.perf_counter() - wall
    handoff, latents = run.artifacts[HANDOFF], run.latents
    record = {
        "K": k, "N": n, "K_over_N": k / n, "switch_step": handoff.step_index, "stage_s": row,
        "measured_s": measured, "peak_gib": peaks, "latents_finite": bool(torch.isfinite(latents).all()),
    }
    if k < n:
        record["render_cache"] = render_cache
        record["render_steps_skipped"] = run.cached_steps
        record["render_steps_computed"] = n - k - record["render_steps_skipped"]
    return record, (handoff, latents.detach().float().cpu())


def part_e2e(rec: dict, ctx: Context) -> None:
    n = ctx.args.steps
    anchors = ctx.results.get("anchors", {})
    c_sketch, c_render = _step_cost(ctx, "sketch"), _step_cost(ctx, "render")
    fixed = (anchors["encode"]["median_s"] + anchors["decode"]["median_s"]) if "encode" in anchors else None
    runs = rec.setdefault("runs", {})
    sr_latents = None
    for k in [n] + [k for k in ctx.args.ks if k != n]:
        if None not in (c_sketch, c_render, fixed):
            estimate = k * c_sketch + (n - k) * c_render + fixed
            if ctx.bench.left() < estimate * 1.1 + 5:
                runs[str(k)] = {"skipped": f"time guard: {ctx.bench.left():.0f} s left, run needs ~{estimate:.0f} s"}
                continue
        runs[str(k)], (handoff, latents) = _e2e_run(ctx, n, k)
        if k < n and ctx.first_handoff is None:
            ctx.first_handoff, sr_latents = handoff, (k, latents)
        del handoff, latents
        ctx.bench.save()
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
    ctx.bench.save()
    if ctx.args.kernels and sr_latents is not None and "measured_s" in base:
        _e2e_levers(rec, ctx, sr_latents, (c_sketch, c_render, fixed))


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

    model = ctx.transformer(role)
    start = time.perf_counter()
    report = apply_kernels(model, config, role)
    harness.sync(ctx.device)
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
    if harness.is_cuda(ctx.device):
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


def _e2e_levers(rec: dict, ctx: Context, sr_latents, costs) -> None:
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
                    proc.wait(timeout=max(1.0, ctx.bench.left() - 60))
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
        ctx.bench.save()
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
        if ctx.bench.left() < estimate * 1.1 + 5:
            runs[key] = {"skipped": f"time guard: {ctx.bench.left():.0f} s left, run needs ~{estimate:.0f} s"}
            continue
        try:
            row, (_, latents) = _e2e_run(ctx, n, k, render_cache=cache)
        except Exception as e:  # noqa: BLE001
            runs[key] = {"error": f"{type(e).__name__}: {e}"[:2000]}
            continue
        row.update({"levers_on": applied, "cosine_vs_sr_eager": harness.cosine(latents, reference),
                    "rel_error_vs_sr_eager": harness.rel_err(latents, reference),
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
        ctx.bench.save()
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
        ctx.bench.save()


def part_handoff(rec: dict, ctx: Context) -> None:
    """The sketch's hand-off as a stage deployment stores it between the sketch and the render stage."""
    handoff = ctx.first_handoff
    if handoff is None:
        raise RuntimeError("no SR hand-off: the e2e part ran no K < N")
    data = HANDOFF.encode(handoff)
    encode = repeat(lambda: HANDOFF.encode(handoff), "cpu", warmup=1, runs=3)
    decode = repeat(lambda: HANDOFF.decode(data), "cpu", warmup=1, runs=3)
    (tensors, metadata), (tensors_back, metadata_back) = _stored(data), _stored(HANDOFF.encode(HANDOFF.decode(data)))
    rec.update({
        "codec": f"{HANDOFF.file} (serve.checkpoint.handoff_to_bytes / handoff_from_bytes)",
        "bytes_mb": len(data) / 1e6, "encode_s": encode["median_s"], "decode_s": decode["median_s"],
        "latents_shape": list(handoff.latents.shape), "step_index": handoff.step_index,
        # exact: the decoded hand-off stores the same tensors bit for bit (latents, embeddings, sampler state) and the
        # same metadata (request, step, scheduler config)
        "roundtrip_exact": metadata == metadata_back and tensors.keys() == tensors_back.keys()
        and all(torch.equal(tensors[k], tensors_back[k]) for k in tensors),
        "cpu_threads": torch.get_num_threads(),
    })


def _stored(data: bytes) -> tuple[dict, dict]:
    """The tensors and the metadata in safetensors bytes (where each tensor lies in them may differ between two
    encodings of one value)."""
    from safetensors.torch import load

    header = json.loads(data[8 : 8 + int.from_bytes(data[:8], "little")])
    return load(data), header.get("__metadata__")


PARTS = {
    "vae": (part_vae, 60), "vae720": (part_vae720, 60),
    "models": (part_models, 40), "forward": (part_forward, 60), "anchors": (part_anchors, 15),
    "e2e": (part_e2e, 60), "handoff": (part_handoff, 5), "forward720": (part_forward720, 60),
}


# ------------------------------------------------------------------------------------------ the planner's costs
def costs_entry(bench: Bench, sizes: tuple[wan.Sizes, wan.Sizes]) -> dict:
    """This run's figures in the placement planner's format (serve/placement_costs.json, one card's entry)."""
    parts, m = bench.parts, bench.meta
    missing = [part for part in COST_PARTS if set(bench.parts.get(part, {})) & {"error", "skipped"}]
    if missing:
        raise RuntimeError(f"--write-costs: part(s) {', '.join(missing)} did not run; nothing written")

    def per_shape(field: str) -> dict:
        return {role: {shape: parts[part][getattr(size, role)]["B1"][field]
                       for shape, part, size in (("480p", "forward", sizes[0]), ("720p", "forward720", sizes[1]))}
                for role in ("sketch", "render")}

    models, (encode, decode) = parts["models"], (parts["anchors"]["encode"], parts["anchors"]["decode"])
    return {
        "measured": f"{m['gpu']}, {m['date_utc']}, commit {m['commit']}, {m['dtype']}: `{m['command']}`",
        "memory_gib": models.get("card_memory_gib"),
        "forward_s": per_shape("median_s"), "forward_peak_gib": per_shape("peak_above_start_gib"),
        "weights_gib": {"sketch": models["sketch"]["weights_gib"], "render": models["render"]["weights_gib"],
                        "encoder": models["text_encoder"]["weights_gib"], "vae": models["vae"]["weights_gib"]},
        "encode_s": encode["median_s"], "encode_peak_gib": encode["peak_above_start_gib"],
        "decode_480p_s": decode["median_s"], "decode_480p_peak_gib": decode["peak_above_start_gib"],
    }


def write_costs(path: str, card: str, entry: dict, sizes: tuple[wan.Sizes, wan.Sizes]) -> None:
    """Replace card `card`'s entry of the cost table at `path` (a new table if there is none); the other cards
    stay. Refused where the table's shapes are not the ones this run measured."""
    shapes = {name: [s.height, s.width, s.num_frames] for name, s in zip(("480p", "720p"), sizes)}
    if os.path.exists(path):
        with open(path) as f:
            doc = json.load(f)
    else:
        from serve.placement import COSTS_FILE

        doc = {"about": json.loads(COSTS_FILE.read_text())["about"], "shapes": shapes, "cards": {}}
    if doc["shapes"] != shapes:
        raise ValueError(f"--write-costs: {path} holds figures at {doc['shapes']}, this run measured {shapes}")
    doc["cards"][card] = entry
    harness.write_json(path, doc)


# ---------------------------------------------------------------------------------------------------- report
def table(results: dict) -> str:
    lines = []
    for part in ("forward", "forward720"):
        for arch, row in results.get(part, {}).items():
            if not isinstance(row, dict) or "B1" not in row:
                continue
            b1, b2 = row["B1"], row.get("B2", {})
            lines.append(
                f"{part:10s} {arch:16s} tokens={row['tokens']:6d} B1={fmt(b1['median_s'])}s "
                f"B2={fmt(b2.get('median_s'))}s 2xB1={fmt(2 * b1['median_s'])}s "
                f"B2/2B1={fmt(row.get('B2_over_two_B1'))} {fmt(b1['tflops_per_s'], '{:.0f}')} TFLOP/s "
                f"peak+{fmt(b1['peak_above_start_gib'], '{:.1f}')}GiB"
            )
    for part in ("vae", "vae720"):
        for key, v in results.get(part, {}).items():
            if isinstance(v, dict) and ("median_s" in v or "error" in v):
                lines.append(
                    f"{part:10s} {key:32s} {fmt(v.get('median_s'))}s "
                    f"peak+{fmt(v.get('peak_above_start_gib'), '{:.2f}')}GiB "
                    f"slowdown={fmt(v.get('slowdown_vs_untiled'), '{:+.3f}')} "
                    f"diff={fmt(v.get('rel_l2_diff_vs_untiled'), '{:.1e}')}"
                    + (f" ERROR {v['error']}" if "error" in v else "")
                )
    anchors = results.get("anchors", {})
    if "encode" in anchors:
        enc, dec = anchors["encode"], anchors["decode"]
        lines.append(f"anchors    encode {fmt(enc['median_s'])}s decode {fmt(dec['median_s'])}s "
                     f"(decode peak+{fmt(dec['peak_above_start_gib'], '{:.2f}')}GiB)")
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
            f"ideal={fmt(r.get('ideal_s'), '{:.2f}')}s tax={fmt(r.get('tax', 0) * 100, '{:+.2f}')}% "
            f"speedup={fmt(r.get('speedup_measured'), '{:.3f}')}x (ideal {fmt(r.get('speedup_ideal'), '{:.3f}')}x, "
            f"ideal@50 {fmt(r.get('speedup_ideal_at_50_steps'), '{:.3f}')}x) "
            f"enc/sk/rd/dec={st['encode']:.2f}/{st['sketch']:.2f}/{st['render']:.2f}/{st['decode']:.2f}s" + extra
        )
    levers = e2e.get("levers", {})
    for role in ("render_helper", "sketch", "render"):
        if role in levers:
            v = levers[role]
            lines.append(f"levers     {role:13s} " + (
                f"apply {v['apply_s']:.1f}s (warm-up {fmt(v.get('warmup_s'), '{:.1f}')}s) {v['report']}"
                if "apply_s" in v else f"ERROR {v.get('error')}"))
    proj = e2e.get("ideal_at_50_steps_k10")
    if proj:
        lines.append("ideal@50/K=10 " + " ".join(f"{k.removesuffix('_speedup')}={v:.2f}x" for k, v in proj.items()
                                               if k.endswith("_speedup")))
    h = results.get("handoff", {})
    if "bytes_mb" in h:
        lines.append(f"handoff    {h['bytes_mb']:.1f} MB safetensors (HANDOFF codec) encode={h['encode_s'] * 1e3:.1f}ms"
                     f" decode={h['decode_s'] * 1e3:.1f}ms exact={h['roundtrip_exact']}")
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
    ap.add_argument("--write-costs", metavar="PATH", default=None,
                    help=f"write this card's entry of the placement planner's cost table (needs parts "
                    f"{','.join(COST_PARTS)}; e.g. serve/placement_costs.json)")
    ap.add_argument("--budget-s", type=float, default=560.0, help="deadline for all parts (time guard)")
    ap.add_argument("--commit", default=None, help="the commit measured (default: $BENCH_COMMIT, else git's HEAD)")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    args.device = args.device or ("cpu" if args.smoke or not torch.cuda.is_available() else "cuda")
    args.dtype = args.dtype or ("float32" if args.smoke else "bfloat16")
    args.vae_dtypes = ["float32"] if args.smoke else [d for d in args.vae_dtypes.split(",") if d]
    args.ks = [int(k) for k in args.ks.split(",") if k]
    args.vae_tile = tuple(int(v) for v in args.vae_tile.split(",")) if args.vae_tile else None
    args.render_cache = [float(c) for c in args.render_cache.split(",") if c]
    parts = [p for p in args.parts.split(",") if p]
    unknown = [p for p in parts if p not in PARTS]
    if unknown:
        ap.error(f"--parts: unknown {', '.join(unknown)}; choose from {', '.join(PARTS)}")
    if args.write_costs and (set(COST_PARTS) - set(parts) or args.vae_tile):
        ap.error(f"--write-costs needs --parts to hold {','.join(COST_PARTS)} and an untiled decode (no --vae-tile)")
    if args.compile_only:
        return compile_only(args)
    if args.smoke:
        args.steps, args.ks = min(args.steps, 4), [k for k in args.ks if k < 4] or [2]
        # the lever rows with the CPU's fallbacks (sdpa, no FP8); compile, a minute on the CPU, is smoke-tested by
        # bench.kernels --smoke (tests/test_bench_kernels.py)
        args.kernels = args.kernels or "attn:cudnn-fp8+fp8_linear"

    sizes = (wan.SMOKE, wan.SMOKE_720P) if args.smoke else (wan.REAL_480P, wan.REAL_720P)
    bench = Bench("bench.run", argv, args.out, args.budget_s, ("torchao", "nvidia-cudnn-frontend"), args.commit,
                  label=wan.LABEL, device=args.device, sizes=asdict(sizes[0]), dtype=args.dtype,
                  kernels=args.kernels, cudnn=torch.backends.cudnn.version() if harness.is_cuda(args.device) else None)
    ctx = Context(args, bench)
    for name in parts:
        fn, estimate = PARTS[name]
        bench.run(name, estimate if not args.smoke else 0, fn, ctx)
    if args.write_costs:
        write_costs(args.write_costs, harness.card_name(bench.meta["gpu"] if harness.is_cuda(args.device) else "cpu"),
                    costs_entry(bench, sizes), sizes)
        print(f"wrote this card's costs into {args.write_costs}")
    print(f"# {wan.LABEL} | {bench.meta['gpu']} | commit {bench.meta['commit']} | {bench.meta['date_utc']}")
    print("\n".join([table(bench.parts), *bench.problems()]))
    return bench.doc


if __name__ == "__main__":
    main()
