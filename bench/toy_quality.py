"""Prompt adherence of the trained toy pair against its schedule (which model denoises which steps) and its cost:
the paper's claim measured here, the schedules a user picks from, the calibration that `switch: quality:T` reads,
and each numerics-changing speed lever at the default switch.

    python -m bench.toy_quality --device cuda --videos 600 --seed 5151 --calibrate serve/presets/toy/calibration.json
    python -m bench.toy_quality --device cuda --videos 600 --seed 3031 --quality 0.98,0.99 --plot $OUT/q.png
    python -m bench.toy_quality --device cpu --videos 4 --ks 2 --out /tmp/toy_quality.json  # CPU smoke

Every setting generates the same `--videos` videos: prompts from the held-out split of the grammar (attribute
combinations no training clip had, toy/data.py) with seeds from --seed, through the engine's own stages (encode, the
plan's denoising segments, decode; requests batched as a deployment batches them: Engine.generate_batch). A pixel
detector (toy/detector.py) reads colour, shape and motion direction back from each video; adherence is the share it
reads as the prompt says. Calibration and evaluation runs take different --seed values: same split, other scenes,
other noise.

Settings (N = the preset's steps): all-large (step:N), all-small (boundary:1.0, so the render model runs every
step), SR at each K of --ks (step:K), each three-segment schedule of --schedules (step:A:B: large for steps < A,
small for A..B-1, large from B), each adaptive spec of --adaptive (with the distribution of the K it chose), and each
quality target of --quality (`quality:T`, the schedule the calibration picks: its predicted cost and adherence
beside the measured ones). Reference rows: the detector on the ground-truth clips of the same scenes, and on their
VAE reconstructions (what this VAE loses of a real clip).

Cost of a video, in large-model step equivalents: its large steps + c x its small steps (less those render step
caching skipped), c = C_small / C_large, with C the median time of one guided step (cond and uncond rows) of one
request, measured here for each model on --device; a lever's own step time counts (C over the plain engine's
C_large). The table also gives the same schedules at the real pair's c (Wan2.1 1.3B over 14B, from the planner's
cost table serve/placement_costs.json), and each setting's measured wall time per video at --batch.

Paired comparisons (same prompts, same noise): every row against all-large, and against the best fixed K of equal
cost (step equivalents within --equal-cost of its own), as the difference in points with its 95% interval (normal
approximation of the per-video differences).

--calibrate FILE writes the calibration of the pair (serve/calibration.py): every fixed and three-segment schedule
measured, as switch specs that scale with N, with its cost per step and its adherence relative to all-large's.

Lever settings (--levers), each at the preset's default switch (--lever-switch) with the same prompts and
seeds: `default` (the plain engine, the reference row), `cache:T` (render step caching at threshold T, the request's
`render_cache`), and stacks joined by `+` of `bf16` (the engine's dtype; float32 otherwise), `attn:B` (attention
backend B on both stages), `fp8_linear` and `compile` (KernelConfig levers on both stages). Each lever row is held
against the row of its dtype without levers (`default` or `bf16`). Each row names the attention backend each stage
actually runs and why (the stage's kernel report): a lever that cannot run here (e.g. FP8 on the CPU, or FP8
attention in float32) falls back and says so. A setting that raises is recorded with its error, not scored.
"""

from __future__ import annotations

import argparse
import collections
import gc
import json
import math
import os
import time
from dataclasses import dataclass

import numpy as np
import torch

from bench.harness import Bench, markdown, repeat
from serve.calibration import Calibration, ScheduleQuality
from serve.config import EngineConfig
from serve.engine import Engine
from serve.placement import COSTS_FILE
from serve.request import VideoRequest
from serve.switch import parse_switch
from srd_kernels.config import KernelConfig
from toy import data
from toy.detector import adherence, detect

ATTRIBUTES = ("colour", "shape", "direction", "all")
ATTRIBUTE_COLUMNS = ("colour", "shape", "direction", "all three")
PROXY = "toy.detector: the share of videos whose colour, shape and direction all read as the prompt says"


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


def role_steps(run) -> tuple[int, int]:
    """(large-model steps, small-model steps) a generation took, over all its segments."""
    steps = {"sketch": 0, "render": 0}
    for segment, (_, start, stop) in zip(run.plan.segments, run.segments):
        steps[segment.role] += stop - start
    return steps["sketch"], steps["render"]


def generate(engine: Engine, scenes: list[data.Scene], switch: str, guidance: float, seed0: int, batch: int,
             render_cache: float = 0.0):
    """Frames, the switch step, the (large, small) steps and the render steps skipped by step caching of each
    scene's video, `batch` requests per stage call."""
    frames, ks, steps, skipped = [], [], [], []
    for i in range(0, len(scenes), batch):
        chunk = scenes[i : i + batch]
        params = [
            VideoRequest(prompt=s.prompt, seed=seed0 + i + j, switch=switch, guidance_scale=guidance,
                         render_cache=render_cache).resolve(engine.config.defaults) for j, s in enumerate(chunk)
        ]
        runs = engine.generate_batch(params)
        frames.extend(run.frames for run in runs)
        ks.extend(run.switch_step for run in runs)
        steps.extend(role_steps(run) for run in runs)
        skipped.extend(run.cached_steps for run in runs)
    return frames, ks, steps, skipped


def paired_difference(mine: list[bool], theirs: list[bool]) -> dict:
    """Points by which `mine` beats `theirs` over the same videos, with the 95% interval of that mean difference
    (normal approximation of the per-video differences, each -1, 0 or 1)."""
    d = np.asarray(mine, dtype=float) - np.asarray(theirs, dtype=float)
    half = 1.96 * d.std(ddof=1) / math.sqrt(len(d)) if len(d) > 1 else math.inf
    return {"points": 100 * d.mean(), "ci95": [100 * (d.mean() - half), 100 * (d.mean() + half)]}


def wan_step_cost_ratio() -> float:
    """c of the real pair: a Wan2.1 1.3B forward over a 14B one at 480p, from the planner's cost table."""
    card = json.loads(COSTS_FILE.read_text())["cards"]["h100"]["forward_s"]
    return card["render"]["480p"] / card["sketch"]["480p"]


def relative_spec(switch: str, n: int) -> str:
    """A fixed schedule of N steps as a switch spec that scales with N (what a calibration stores)."""
    policy = parse_switch(switch)
    if policy.kind == "step":
        return f"ratio:{policy.value / n:g}" + (f":{policy.back / n:g}" if policy.back is not None else "")
    return str(policy)


def calibration(result: dict, fixed: list[str], c: float, measured: str) -> Calibration:
    """The pair's calibration from the fixed (`step:`) and all-small rows of `result` named in `fixed`."""
    rows, n = result["parts"], result["meta"]["N"]
    top = rows["all-large"]["adherence"]["all"]
    schedules = [ScheduleQuality(switch=relative_spec(rows[name]["switch"], n), cost=rows[name]["lse"] / n,
                                 score=rows[name]["adherence"]["all"], quality=rows[name]["adherence"]["all"] / top)
                 for name in fixed if "adherence" in rows.get(name, {})]
    return Calibration(pair="toy (serve/presets/toy)", measured=measured, steps=n, step_cost_ratio=c,
                       proxy=PROXY, schedules=sorted(schedules, key=lambda s: s.cost))


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
    ap.add_argument("--schedules", default="", help="three-segment schedules, comma-separated step:A:B")
    ap.add_argument("--adaptive", default="adaptive:0.01:2:12,adaptive:0.05:2:12")
    ap.add_argument("--quality", default="", help="quality targets T (rows `quality:T`), comma-separated")
    ap.add_argument("--calibration", default=None, help="the calibration `quality:T` reads (default: the preset's)")
    ap.add_argument("--calibrate", default=None, metavar="FILE",
                    help="write the pair's calibration (every fixed and three-segment row) to FILE")
    ap.add_argument("--equal-cost", type=float, default=0.25,
                    help="step equivalents within which a fixed K counts as of equal cost (paired comparison)")
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
    ap.add_argument("--plot", default=None, help="PNG of adherence against cost (needs the `bench` extra)")
    ap.add_argument("--from-results", default=None, metavar="A.json,B.json",
                    help="with --calibrate: no generation, the calibration of these runs' rows (same pair, same "
                         "--seed: e.g. the fixed K and the three-segment schedules measured in two device calls)")
    args = ap.parse_args(argv)
    if args.from_results:
        if not args.calibrate:
            raise SystemExit("--from-results needs --calibrate FILE")
        return calibrate_from([json.loads(open(path).read()) for path in args.from_results.split(",")],
                              args.calibrate)
    if args.levers is None:
        args.levers = DEFAULT_LEVERS if torch.device(args.device).type == "cuda" else CPU_LEVERS
    levers = [parse_lever(spec) for spec in args.levers.split(",") if spec]
    schedules = [spec for spec in args.schedules.split(",") if spec]
    for spec in schedules:
        if parse_switch(spec).back is None:
            raise SystemExit(f"--schedules: {spec} is not a three-segment step:A:B")
    if args.calibrate and not args.anchors:
        raise SystemExit("--calibrate needs the all-large and all-small rows (drop --no-anchors)")

    config = EngineConfig(preset="toy", **pair_dirs(args.models), device=args.device, speed="exact", dtype="float32",
                          max_tokens_per_forward=2 * args.batch * 320, calibration=args.calibration)
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
    bench.meta["step_cost_ratio"] = cost["small_s"] / cost["large_s"]
    c_wan = bench.meta["wan_step_cost_ratio"] = wan_step_cost_ratio()

    def setting(row: dict, name, e: Engine, switch: str, step: dict, render_cache: float = 0.0) -> None:
        start = time.perf_counter()
        frames, ks, steps, skipped = generate(e, scenes, switch, guidance, seed0=args.seed * 1000, batch=args.batch,
                                              render_cache=render_cache)
        wall_s = time.perf_counter() - start
        large, small = np.asarray(steps, dtype=float).T
        lse = (large * step["large_s"] + (small - np.asarray(skipped)) * step["small_s"]) / cost["large_s"]
        verdicts[name] = []
        row.update({"switch": switch, "adherence": score(frames, scenes, verdicts[name]),
                    "lse": float(lse.mean()), "cost_ratio": float(lse.mean()) / n,
                    "lse_wan": float((large + c_wan * small).mean()),
                    "large_steps": float(large.mean()), "small_steps": float(small.mean()),
                    "k": dict(sorted(collections.Counter(ks).items())), "wall_s": wall_s,
                    "video_s": wall_s / len(scenes)})
        if render_cache:
            row["render_cache"] = render_cache
            row["render_steps"] = float(small.mean())
            row["render_skipped"] = float(np.mean(skipped))
            row["render_skipped_hist"] = dict(sorted(collections.Counter(skipped).items()))
        if parse_switch(switch).kind == "quality":
            chosen = e.stages["sketch"].calibration.schedule_for(parse_switch(switch).value)
            row["predicted"] = {"switch": chosen.switch, "lse": chosen.cost * n, "all": chosen.score}
        row["all_per_video"] = verdicts[name]

    fixed = [("all-large", f"step:{n}"), ("all-small", "boundary:1.0")] if args.anchors else []
    fixed += [(f"SR K={k}", f"step:{k}") for k in (int(k) for k in args.ks.split(",") if k) if k < n]
    fixed += [(spec, spec) for spec in schedules]
    adaptive = [(spec, spec) for spec in args.adaptive.split(",") if spec]
    targets = [(f"quality:{t}", f"quality:{t}") for t in args.quality.split(",") if t]

    def run_settings(e: Engine, settings: list[tuple[str, str]]) -> None:
        for name, switch in settings:
            row = bench.run(name, 0, setting, name, e, switch, cost)
            print(f"{name:24s} " + (f"{row['adherence']}  {row['lse']:.2f} step equivalents  K {row['k']}"
                                    if "adherence" in row else str(row)), flush=True)

    run_settings(engine, fixed + adaptive)
    if args.calibrate:
        calibrate_from([bench.doc], args.calibrate)
    if targets:  # the same models, reading the calibration just written if there is one
        run_settings(Engine(config.model_copy(update={"calibration": args.calibrate})) if args.calibrate else engine,
                     targets)
    compare(rows, verdicts, args.equal_cost)

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
    bench.save()
    print(table(bench.doc))
    if levers:
        print(lever_table(bench.doc))
    if args.plot:
        plot(bench.doc, args.plot)
    print("\n".join(bench.problems()))
    return bench.doc


def calibrate_from(results: list[dict], path: str) -> dict:
    """Write the calibration of runs' rows (this run's, or saved ones): every run's scored fixed schedules, the
    first run's N and step-cost ratio."""
    seeds = {r["meta"]["seed"] for r in results}
    if len(seeds) != 1:
        raise SystemExit(f"--from-results: the runs used different seeds {sorted(seeds)}: their rows do not compare")
    merged = {"meta": results[0]["meta"], "parts": {k: v for r in results for k, v in r["parts"].items()}}
    names = [name for name, row in merged["parts"].items() if "lever" not in row and "adherence" in row
             and (is_fixed_k(name) or name.startswith("step:"))]
    cal = calibration(merged, names, results[0]["meta"]["step_cost_ratio"],
                      "; ".join(f"{r['meta']['gpu'] or r['meta']['device']}, {r['meta']['date_utc']}, commit "
                                f"{r['meta']['commit']}: {r['meta']['command']}" for r in results))
    with open(path, "w") as f:
        f.write(cal.model_dump_json(indent=1) + "\n")
    print(f"calibration of {len(cal.schedules)} schedules written to {path}")
    return merged


def is_fixed_k(name: str) -> bool:
    return name in ("all-large", "all-small") or name.startswith("SR K=")


def compare(rows: dict, verdicts: dict, equal_cost: float) -> None:
    """Each scored schedule row against all-large and against the best fixed K of equal cost (paired)."""
    fixed = [name for name in verdicts if is_fixed_k(name) and "lever" not in rows[name]]
    for name, row in rows.items():
        if name not in verdicts or "lever" in row:
            continue
        if "all-large" in verdicts and name != "all-large":
            row["vs_all_large"] = paired_difference(verdicts[name], verdicts["all-large"])
        peers = [k for k in fixed if k != name and abs(rows[k]["lse"] - row["lse"]) <= equal_cost]
        if peers and not is_fixed_k(name):
            best = max(peers, key=lambda k: rows[k]["adherence"]["all"])
            row["vs_fixed_k"] = {"row": best, **paired_difference(verdicts[name], verdicts[best])}


def _ci(vs: dict | None) -> str:
    return "" if not vs else f"{vs['points']:+.1f} [{vs['ci95'][0]:+.1f}, {vs['ci95'][1]:+.1f}]"


def _adherence(name: str, row: dict) -> list[str]:
    a = row["adherence"]
    return [name, f"{a['colour']:.1f}", f"{a['shape']:.1f}", f"{a['direction']:.1f}", f"**{a['all']:.1f}**"]


def table(result: dict) -> str:
    m = result["meta"]
    rows = []
    for name, row in result["parts"].items():
        if "adherence" not in row or "lever" in row:
            continue
        scheduled = "lse" in row
        predicted = row.get("predicted")
        rows.append(_adherence(name, row) + ([
            f"{row['lse']:.2f}", f"{row['lse_wan']:.2f}", f"{row['video_s'] * 1e3:.1f}", _ci(row.get("vs_all_large")),
            (f"{row['vs_fixed_k']['row']}: {_ci(row['vs_fixed_k'])}" if "vs_fixed_k" in row else ""),
            ", ".join(f"{k}: {c}" for k, c in row["k"].items()) if name.startswith("adaptive") else
            (f"{predicted['switch']}: {predicted['all']:.1f}% at {predicted['lse']:.2f}" if predicted else ""),
        ] if scheduled else [""] * 6))
    cost = m["step_cost"]
    return (f"toy pair, {m['videos']} videos per setting (seed {m['seed']}), N={m['N']}, guidance {m['guidance']}, "
            f"{m['device']}, step cost large {cost['large_s'] * 1e3:.2f} ms, small {cost['small_s'] * 1e3:.2f} ms "
            f"(c = {m['step_cost_ratio']:.3f}; Wan's c = {m['wan_step_cost_ratio']:.3f})\n"
            + markdown(["setting", *ATTRIBUTE_COLUMNS, "large-step equivalents", "at Wan's c", "ms per video",
                        "vs all-large (points, 95% CI)", "vs best fixed K of equal cost", "K chosen / predicted"],
                       rows))


def plot(result: dict, path: str) -> None:
    """Adherence against cost (large-step equivalents) with 95% intervals: fixed K as a line, the other schedules
    as points, quality targets labelled with their target."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, m = result["parts"], result["meta"]
    scored = {name: row for name, row in rows.items() if "lse" in row and "lever" not in row}
    n_videos = m["videos"]

    def interval(row: dict) -> float:
        p = row["adherence"]["all"] / 100
        return 100 * 1.96 * math.sqrt(max(p * (1 - p), 1e-12) / n_videos)

    fig, ax = plt.subplots(figsize=(8, 5.5))
    fixed = sorted((row["lse"], row["adherence"]["all"], interval(row), name) for name, row in scored.items()
                   if is_fixed_k(name))
    ax.errorbar([f[0] for f in fixed], [f[1] for f in fixed], yerr=[f[2] for f in fixed], fmt="o-", color="0.35",
                capsize=3, label="large for the first K steps, then small (fixed K)")
    for lse, score_, _, name in fixed:
        ax.annotate(name.removeprefix("SR "), (lse, score_), textcoords="offset points", xytext=(4, -12),
                    fontsize=7, color="0.35")
    groups = {"three segments: large, small, large (step:A:B)": ("step:", "tab:blue", "s"),
              "adaptive (the paper's rule)": ("adaptive:", "tab:orange", "^"),
              "quality target (quality:T, from the calibration)": ("quality:", "tab:green", "*")}
    for label, (prefix, colour, marker) in groups.items():
        points = [(row["lse"], row["adherence"]["all"], interval(row), name) for name, row in scored.items()
                  if name.startswith(prefix)]
        if not points:
            continue
        ax.errorbar([p[0] for p in points], [p[1] for p in points], yerr=[p[2] for p in points], fmt=marker,
                    color=colour, capsize=3, markersize=9 if marker == "*" else 6, label=label)
        for lse, score_, _, name in points:
            ax.annotate(name, (lse, score_), textcoords="offset points", xytext=(4, 4), fontsize=7, color=colour)
    ax.set_xlabel(f"cost per video: large-model step equivalents (large + {m['step_cost_ratio']:.2f} x small steps, "
                  f"N = {m['N']})")
    ax.set_ylabel("prompt adherence: colour, shape and direction all right (%)")
    ax.set_title(f"Toy pair: adherence against cost, {n_videos} held-out videos per setting (95% intervals)",
                 fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    print(f"plot written to {path}")


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
