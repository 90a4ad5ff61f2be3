"""Prompt adherence of the trained toy pair against the switch step: the paper's claim, measured here;
and of each numerics-changing speed lever at the default switch.

    python -m bench.toy_quality --device cuda --videos 200 --out $OUT/toy_quality.json    # one H100, ~2 min
    python -m bench.toy_quality --device cpu --videos 4 --ks 2 --out /tmp/toy_quality.json  # CPU smoke

Every setting generates the same `--videos` videos: prompts from the held-out split of the grammar (attribute
combinations no training clip had, toy/data.py) with fresh seeds, through the engine's own stages (encode, sketch,
render, decode; requests batched as a deployment batches them: Engine.generate_batch). A pixel detector
(toy/detector.py) reads colour, shape and motion direction back from each video; adherence is the share it reads as
the prompt says.

Settings (N = the preset's steps): all-large (step:N), all-small (boundary:1.0, so the render model runs every
step), SR at each K of --ks (step:K), and each adaptive spec of --adaptive (with the distribution of the K it chose).
Reference rows: the detector on the ground-truth clips of the same scenes, and on their VAE reconstructions (what
this VAE loses of a real clip; a generator may draw clearer shapes than the clips it learnt from, and the shipped
pair's all-large row reads higher).

Lever settings (--levers), each at the preset's default switch (--lever-switch) with the same prompts and
seeds: `default` (the plain engine, the reference row), `cache:T` (render step caching at threshold T, the request's
`render_cache`), and stacks joined by `+` of `bf16` (the engine's dtype; float32 otherwise), `attn:B` (attention
backend B on both stages), `fp8_linear` and `compile` (KernelConfig levers on both stages). Each lever row is held
against the row of its dtype without levers (`default` or `bf16`): the table gives the adherence difference and the
paired flips (videos whose all-three verdict the lever turned wrong / right). Each row names the attention backend
each stage actually runs and why (the stage's kernel report): a lever that cannot run here (e.g. FP8 on the CPU, or
FP8 attention in float32) falls back and says so. A setting that raises is recorded with its error, not scored.

Cost ratio of a setting = (K C_large + (N - K - S) C_small) / (N C_large_ref), with C the median time of one guided
step (cond and uncond rows) of one request, measured here for each model on --device, S the render steps that step
caching skipped (0 without it), and C_large_ref the plain engine's large step (so a lever's own step cost counts).
"""

from __future__ import annotations

import argparse
import collections
import gc
import math
import os
import time
from dataclasses import dataclass

import numpy as np
import torch

from bench.harness import Bench, markdown, repeat
from serve.config import EngineConfig
from serve.engine import Engine
from serve.request import VideoRequest
from srd_kernels.config import KernelConfig
from toy import data
from toy.detector import adherence, detect

ATTRIBUTES = ("colour", "shape", "direction", "all")
ATTRIBUTE_COLUMNS = ("colour", "shape", "direction", "all three")


def pair_dirs(models: str | None) -> dict:
    """EngineConfig's `sketch` and `render` for a directory holding both, or the toy preset's own for None."""
    if not models:
        return {"sketch": None, "render": None}
    return {"sketch": os.path.join(models, "sketch"), "render": os.path.join(models, "render")}


def score(frames: list[np.ndarray], scenes: list[data.Scene], per_video: list | None = None) -> dict:
    """Per-attribute adherence (%) of videos [F, H, W, 3] uint8 to their scenes' prompts; `per_video`, if given,
    receives each video's all-three verdict."""
    hits = collections.Counter()
    for video, scene in zip(frames, scenes):
        verdict = adherence(detect(video), scene.attributes)
        for attribute, ok in verdict.items():
            hits[attribute] += bool(ok)
        if per_video is not None:
            per_video.append(bool(verdict["all"]))
    return {a: 100.0 * hits[a] / len(scenes) for a in ATTRIBUTES}


def generate(engine: Engine, scenes: list[data.Scene], switch: str, guidance: float, seed0: int, batch: int,
             render_cache: float = 0.0):
    """Frames, the switch step and the render steps skipped by step caching of each scene's video, `batch` requests
    per stage call."""
    frames, ks, skipped = [], [], []
    for i in range(0, len(scenes), batch):
        chunk = scenes[i : i + batch]
        params = [
            VideoRequest(prompt=s.prompt, seed=seed0 + i + j, switch=switch, guidance_scale=guidance,
                         render_cache=render_cache).resolve(engine.config.defaults) for j, s in enumerate(chunk)
        ]
        runs = engine.generate_batch(params)
        frames.extend(run.frames for run in runs)
        ks.extend(run.switch_step for run in runs)
        skipped.extend(run.cached_steps for run in runs)
    return frames, ks, skipped


@dataclass(frozen=True)
class Lever:
    """One lever setting of --levers: the engine it needs (dtype, per-stage kernels) and the request's cache."""

    name: str
    dtype: str = "float32"
    kernels: KernelConfig = KernelConfig()
    render_cache: float = 0.0

    @property
    def engine_key(self) -> tuple:
        return (self.dtype, self.kernels)

    @property
    def reference(self) -> str:
        """The row this one is held against: the same dtype, no levers."""
        return "default" if self.dtype == "float32" else "bf16"


def parse_lever(spec: str) -> Lever:
    """`default`, or `+`-joined parts of bf16 | cache:THRESHOLD | the kernel levers of `KernelConfig.from_label`
    (attn:BACKEND, fp8_linear, norm_rope, compile)."""
    dtype, kernel_parts, cache = "float32", [], 0.0
    for part in spec.split("+"):
        if part == "default":
            continue
        if part == "bf16":
            dtype = "bfloat16"
        elif part.startswith("cache:"):
            cache = float(part.removeprefix("cache:"))
        else:
            kernel_parts.append(part)
    try:
        kernels = KernelConfig.from_label("+".join(kernel_parts))
    except ValueError as e:
        raise ValueError(f"--levers: {e} (other parts: default, bf16, cache:THRESHOLD)") from None
    return Lever(spec, dtype, kernels, cache)


def kernel_summary(engine: Engine) -> dict:
    """What each stage's transformer actually runs (the stages' kernel reports, fallbacks and their reasons)."""
    out = {}
    for role in ("sketch", "render"):
        r = engine.stages[role].kernels
        out[role] = {"attention": r.attention, "attention_reason": r.attention_reason,
                     "fp8_linear_layers": r.fp8_linear_layers, "fp8_reason": r.fp8_reason, "compiled": r.compiled,
                     "line": r.line()}
    return out


def step_cost(engine: Engine, role: str, params, runs: int) -> float:
    """Median seconds of one guided step of one request by the `role` model."""
    device, stage = engine.config.device, engine.stages[role]
    (embeds,) = engine.stages["encode"]([params])
    embeds, denoiser = embeds.to(device), stage.denoiser
    x = torch.randn(stage.spec.shape(params), device=device)
    t = torch.tensor([500.0], device=device)
    with torch.inference_mode():
        return repeat(lambda: denoiser(x, t, [embeds], [params.guidance_scale]), device, warmup=3,
                      runs=runs)["median_s"]


# On a GPU: the plain rows of each dtype, render caching at three thresholds (0.05 skipped no step in a CPU smoke
# run), each kernel lever alone and stacked. `compile` is left out (add `bf16+compile`; on the CPU it would compile
# C++ for every block). On the CPU every kernel lever falls back, so one row of each kind covers the code cheaply.
DEFAULT_LEVERS = ("default,cache:0.1,cache:0.2,cache:0.3,bf16,bf16+norm_rope,bf16+attn:cudnn-fp8,bf16+fp8_linear,"
                  "bf16+attn:cudnn-fp8+fp8_linear,bf16+attn:sage,bf16+attn:cudnn-fp8+fp8_linear+cache:0.1")
CPU_LEVERS = "default,cache:0.2,attn:cudnn-fp8+fp8_linear"  # float32: no slow CPU bfloat16


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default=None, help="a directory with sketch/ and render/ (default: the toy preset)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--videos", type=int, default=200, help="videos per setting")
    ap.add_argument("--batch", type=int, default=200, help="requests per stage call")
    ap.add_argument("--anchors", action=argparse.BooleanOptionalAction, default=True,
                    help="the all-large and all-small rows (--no-anchors: lever rows only, each held against its "
                         "own reference row)")
    ap.add_argument("--ks", default="1,2,3,4,5,6,8,10,14", help="SR switch steps K of N")
    ap.add_argument("--adaptive", default="adaptive:0.01:2:12,adaptive:0.05:2:12")
    ap.add_argument("--levers", default=None, help="lever settings at --lever-switch, comma-separated ('' for "
                    f"none; default on a GPU: {DEFAULT_LEVERS}; on the CPU: {CPU_LEVERS})")
    ap.add_argument("--lever-switch", default=None, help="switch of the lever settings (default: the preset's)")
    ap.add_argument("--guidance", type=float, default=None, help="guidance scale (default: the preset's)")
    ap.add_argument("--seed", type=int, default=2026, help="scenes and noise seeds (training used 0..10)")
    ap.add_argument("--cost-runs", type=int, default=20)
    ap.add_argument("--budget-s", type=float, default=None,
                    help="start no further setting once this many seconds have passed (recorded as skipped)")
    default_out = os.path.join(os.environ["OUT"], "toy_quality.json") if os.environ.get("OUT") else None
    ap.add_argument("--out", default=default_out)
    args = ap.parse_args(argv)
    if args.levers is None:
        args.levers = DEFAULT_LEVERS if torch.device(args.device).type == "cuda" else CPU_LEVERS
    levers = [parse_lever(spec) for spec in args.levers.split(",") if spec]

    config = EngineConfig(preset="toy", **pair_dirs(args.models), device=args.device, dtype="float32",
                          max_tokens_per_forward=2 * args.batch * 320)
    defaults = config.defaults
    n = defaults.num_inference_steps
    guidance = defaults.guidance_scale if args.guidance is None else args.guidance
    lever_switch = args.lever_switch or defaults.switch
    bench = Bench("bench.toy_quality", argv, args.out, math.inf if args.budget_s is None else args.budget_s,
                  device=args.device, N=n, guidance=guidance, flow_shift=defaults.flow_shift, videos=args.videos,
                  seed=args.seed, lever_switch=lever_switch, split="eval (held-out combinations)",
                  size=f"{defaults.height}x{defaults.width}x{defaults.num_frames}", models=config.models().__dict__)
    rows, verdicts = bench.parts, {}
    engine = Engine(config)
    scenes = data.sample_scenes(args.videos, seed=args.seed, split="eval", height=defaults.height, width=defaults.width)
    clips = data.render_clips(scenes, frames=defaults.num_frames, height=defaults.height, width=defaults.width)
    rows["ground truth"] = {"adherence": score([data.frames_uint8(c) for c in clips], scenes)}
    with torch.inference_mode():
        pipe = engine.stages["decode"].pipe
        z = torch.cat([pipe.vae.encode(c[None].to(pipe.vae.device)).latent_dist.mode() for c in clips])
        recon = pipe.video_processor.postprocess_video(pipe.vae.decode(z).sample, output_type="np")
    rows["VAE reconstruction"] = {"adherence": score(list((np.asarray(recon) * 255).round().astype(np.uint8)), scenes)}

    probe = VideoRequest(prompt=scenes[0].prompt, seed=0, guidance_scale=guidance).resolve(defaults)

    def costs(e: Engine) -> dict:
        return {"large_s": step_cost(e, "sketch", probe, args.cost_runs),
                "small_s": step_cost(e, "render", probe, args.cost_runs)}

    cost = bench.meta["step_cost"] = costs(engine)

    def setting(row: dict, name, e: Engine, switch: str, step: dict, render_cache: float = 0.0) -> None:
        start = time.perf_counter()
        frames, ks, skipped = generate(e, scenes, switch, guidance, seed0=args.seed * 1000, batch=args.batch,
                                       render_cache=render_cache)
        ratio = [(k * step["large_s"] + (n - k - s) * step["small_s"]) / (n * cost["large_s"])
                 for k, s in zip(ks, skipped)]
        verdicts[name] = []
        row.update({"switch": switch, "adherence": score(frames, scenes, verdicts[name]),
                    "cost_ratio": float(np.mean(ratio)),
                    "k": dict(sorted(collections.Counter(ks).items())), "wall_s": time.perf_counter() - start})
        if render_cache:
            row["render_cache"] = render_cache
            row["render_steps"] = float(np.mean([n - k for k in ks]))
            row["render_skipped"] = float(np.mean(skipped))
            row["render_skipped_hist"] = dict(sorted(collections.Counter(skipped).items()))
        row["all_per_video"] = verdicts[name]

    settings = [("all-large", f"step:{n}"), ("all-small", "boundary:1.0")] if args.anchors else []
    settings += [(f"SR K={k}", f"step:{k}") for k in (int(k) for k in args.ks.split(",") if k) if k < n]
    settings += [(spec, spec) for spec in args.adaptive.split(",") if spec]
    for name, switch in settings:
        row = bench.run(name, 0, setting, name, engine, switch, cost)
        print(f"{name:24s} " + (f"{row['adherence']}  cost {row['cost_ratio']:.3f}  K {row['k']}"
                                if "adherence" in row else str(row)), flush=True)

    engines = {Lever("default").engine_key: (engine, cost)}

    def lever_setting(row: dict, lever: Lever) -> None:
        if lever.engine_key not in engines:
            for key in [k for k in engines if k != Lever("default").engine_key]:  # one lever engine at a time
                del engines[key]
            gc.collect()
            if torch.device(args.device).type == "cuda":
                torch.cuda.empty_cache()
            t0 = time.perf_counter()
            e = Engine(config.model_copy(update={"dtype": lever.dtype, "sketch_kernels": lever.kernels,
                                                 "render_kernels": lever.kernels}))
            load_s = time.perf_counter() - t0
            engines[lever.engine_key] = (e, costs(e))
            engines[lever.engine_key][1]["load_s"] = load_s
        e, step = engines[lever.engine_key]
        setting(row, lever.name, e, lever_switch, step, lever.render_cache)
        row.update(lever=lever.name, dtype=lever.dtype, kernels=kernel_summary(e), step_cost=step,
                   reference=lever.reference)
        ref = verdicts.get(lever.reference)
        if ref is not None and lever.name != lever.reference:
            mine = verdicts[lever.name]
            row["vs_reference"] = {
                "all_points": row["adherence"]["all"] - rows[lever.reference]["adherence"]["all"],
                "turned_wrong": sum(r and not m for r, m in zip(ref, mine)),
                "turned_right": sum(m and not r for r, m in zip(ref, mine)),
            }

    for lever in levers:  # a lever that cannot run this shape here is recorded with its error, never scored
        row = bench.run(lever.name, 0, lever_setting, lever)
        print(f"{lever.name:24s} " + (
            f"{row['adherence']}  cost {row['cost_ratio']:.3f}  attention "
            f"{row['kernels']['sketch']['attention']}/{row['kernels']['render']['attention']}"
            + (f"  skipped {row['render_skipped']:.2f}" if lever.render_cache else "")
            if "lever" in row else str(row)), flush=True)
    print(table(bench.doc))
    if levers:
        print(lever_table(bench.doc))
    print("\n".join(bench.problems()))
    return bench.doc


def _adherence(name: str, row: dict) -> list[str]:
    a = row["adherence"]
    return [name, f"{a['colour']:.1f}", f"{a['shape']:.1f}", f"{a['direction']:.1f}", f"**{a['all']:.1f}**"]


def table(result: dict) -> str:
    m = result["meta"]
    rows = [_adherence(name, row) + [f"{row['cost_ratio']:.3f}" if "cost_ratio" in row else "",
                                     ", ".join(f"{k}: {c}" for k, c in row.get("k", {}).items())
                                     if name.startswith("adaptive") else ""]
            for name, row in result["parts"].items() if "adherence" in row and "lever" not in row]
    cost = m["step_cost"]
    return (f"toy pair, {m['videos']} videos per setting, N={m['N']}, guidance {m['guidance']}, {m['device']}, "
            f"step cost large {cost['large_s'] * 1e3:.2f} ms, small {cost['small_s'] * 1e3:.2f} ms\n"
            + markdown(["setting", *ATTRIBUTE_COLUMNS, "cost vs all-large", "K chosen"], rows))


def _attention(kernels: dict) -> str:
    parts = []
    for role in ("sketch", "render"):
        k = kernels[role]
        fell = k["attention_reason"].startswith("fallback")
        parts.append(f"{k['attention']}" + (f" (FALLBACK: {k['attention_reason'].removeprefix('fallback: ')})"
                                            if fell else ""))
    return " / ".join(parts) if parts[0] != parts[1] else parts[0]


def lever_table(result: dict) -> str:
    """The lever rows: adherence, its difference from the same-dtype plain row, what ran, cost (those
    that failed or were skipped are listed after the tables)."""
    m, rows = result["meta"], []
    for name, row in result["parts"].items():
        if "lever" not in row:
            continue
        k = row["kernels"]
        vs = row.get("vs_reference")
        vs = (f"{vs['all_points']:+.1f} vs {row['reference']} (-{vs['turned_wrong']} / +{vs['turned_right']})"
              if vs else "reference" if name == row["reference"] else f"no {row['reference']} row")
        fp8 = " / ".join(str(k[r]["fp8_linear_layers"]) for r in ("sketch", "render"))
        if any(k[r]["fp8_reason"].startswith("fallback") for r in ("sketch", "render")):
            fp8 += f" (FALLBACK: {k['sketch']['fp8_reason']})"
        skipped = (f"{row['render_skipped']:.2f} of {row['render_steps']:.0f} "
                   f"({100 * row['render_skipped'] / row['render_steps']:.0f}%)" if "render_skipped" in row else "")
        rows.append(_adherence(name + (" (compiled)" if k["sketch"]["compiled"] else ""), row) + [
            vs, _attention(k), fp8, skipped, f"{row['cost_ratio']:.3f}",
            f"{row['step_cost']['large_s'] * 1e3:.2f} / {row['step_cost']['small_s'] * 1e3:.2f}",
            f"{row['wall_s']:.1f}"])
    return (f"levers at switch {m['lever_switch']}, {m['videos']} videos per setting, {m['device']}\n"
            + markdown(["setting", *ATTRIBUTE_COLUMNS, "vs reference (points; flips -/+)",
                        "attention (sketch / render)", "FP8 linear layers (sketch / render)",
                        "render steps skipped by the cache", "cost vs all-large", "step ms (large / small)", "wall s"],
                       rows))


if __name__ == "__main__":
    main()
