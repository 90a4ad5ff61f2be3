"""Prompt adherence of the trained toy pair against the switch step (issue 6): the paper's claim, measured here.

    python -m bench.toy_quality --device cuda --videos 200 --out $OUT/toy_quality.json    # one H100, ~2 min
    python -m bench.toy_quality --device cpu --videos 4 --ks 2 --out /tmp/toy_quality.json  # CPU smoke

Every setting generates the same `--videos` videos: prompts from the held-out split of the grammar (attribute
combinations no training clip had, toy/data.py) with fresh seeds, through the engine's own stage objects (encode,
sketch, render, decode; requests batched as a deployment batches them). A pixel detector (toy/detector.py) reads
colour, shape and motion direction back from each video; adherence is the share it reads as the prompt says.

Settings (N = the preset's steps): all-large (step:N), all-small (boundary:1.0, so the render model runs every
step), SR at each K of --ks (step:K), and each adaptive spec of --adaptive (with the distribution of the K it chose).
Reference rows: the detector on the ground-truth clips of the same scenes, and on their VAE reconstructions (what
this VAE loses of a real clip; a generator may draw clearer shapes than the clips it learnt from, and the shipped
pair's all-large row reads higher).

Cost ratio of a setting = (K C_large + (N - K) C_small) / (N C_large), with C the median time of one guided step
(cond and uncond rows) of one request, measured here for each model on --device.
"""

from __future__ import annotations

import argparse
import collections
import datetime
import json
import os
import subprocess
import time

import numpy as np
import torch

from bench.measure import repeat
from serve.engine import Engine, EngineConfig
from serve.plan import run_plan
from serve.request import VideoRequest
from toy import data
from toy.detector import adherence, detect

ATTRIBUTES = ("colour", "shape", "direction", "all")


def pair_dirs(models: str | None) -> dict:
    """EngineConfig's `sketch` and `render` for a directory holding both, or the toy preset's own for None."""
    if not models:
        return {"sketch": None, "render": None}
    return {"sketch": os.path.join(models, "sketch"), "render": os.path.join(models, "render")}


def score(frames: list[np.ndarray], scenes: list[data.Scene]) -> dict:
    """Per-attribute adherence (%) of videos [F, H, W, 3] uint8 to their scenes' prompts."""
    hits = collections.Counter()
    for video, scene in zip(frames, scenes):
        for attribute, ok in adherence(detect(video), scene.attributes).items():
            hits[attribute] += bool(ok)
    return {a: 100.0 * hits[a] / len(scenes) for a in ATTRIBUTES}


def generate(engine: Engine, scenes: list[data.Scene], switch: str, guidance: float, seed0: int, batch: int):
    """Frames and the switch step of each scene's video, `batch` requests per stage call."""
    frames, ks = [], []
    for i in range(0, len(scenes), batch):
        chunk = scenes[i : i + batch]
        params = [
            VideoRequest(prompt=s.prompt, seed=seed0 + i + j, switch=switch, guidance_scale=guidance)
            .resolve(engine.config.defaults) for j, s in enumerate(chunk)
        ]
        run = run_plan(engine.plan(params[0]), params, engine.encoder,
                       {"sketch": engine.sketcher, "render": engine.renderer}, engine.decoder)
        frames.extend(run.frames)
        ks.extend(h.step_index for h in run.outputs["sketch"])
    return frames, ks


def step_cost(engine: Engine, denoiser, params, runs: int) -> float:
    """Median seconds of one guided step of one request."""
    device = engine.config.device
    (embeds,) = engine.encoder([params])
    embeds = embeds.to(device)
    x = torch.randn(engine.sketcher.spec.shape(params), device=device)
    t = torch.tensor([500.0], device=device)
    with torch.inference_mode():
        return repeat(lambda: denoiser(x, t, [embeds], [params.guidance_scale]), device, warmup=3,
                      runs=runs)["median_s"]


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default=None, help="a directory with sketch/ and render/ (default: the toy preset)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--videos", type=int, default=200, help="videos per setting")
    ap.add_argument("--batch", type=int, default=200, help="requests per stage call")
    ap.add_argument("--ks", default="1,2,3,4,5,6,8,10,14", help="SR switch steps K of N")
    ap.add_argument("--adaptive", default="adaptive:0.01:2:12,adaptive:0.05:2:12")
    ap.add_argument("--guidance", type=float, default=None, help="guidance scale (default: the preset's)")
    ap.add_argument("--seed", type=int, default=2026, help="scenes and noise seeds (training used 0..10)")
    ap.add_argument("--cost-runs", type=int, default=20)
    default_out = os.path.join(os.environ["OUT"], "toy_quality.json") if os.environ.get("OUT") else None
    ap.add_argument("--out", default=default_out)
    args = ap.parse_args(argv)

    config = EngineConfig(preset="toy", **pair_dirs(args.models), device=args.device, dtype="float32",
                          max_tokens_per_forward=2 * args.batch * 320)
    defaults = config.defaults
    n = defaults.num_inference_steps
    guidance = defaults.guidance_scale if args.guidance is None else args.guidance
    engine = Engine(config)
    scenes = data.sample_scenes(args.videos, seed=args.seed, split="eval", height=defaults.height, width=defaults.width)
    meta = {
        "date_utc": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "commit": os.environ.get("BENCH_COMMIT") or _commit(), "device": _device_name(args.device),
        "N": n, "guidance": guidance, "flow_shift": defaults.flow_shift, "videos": args.videos,
        "size": f"{defaults.height}x{defaults.width}x{defaults.num_frames}", "split": "eval (held-out combinations)",
        "models": config.models().__dict__,
    }
    rows = {}

    clips = data.render_clips(scenes, frames=defaults.num_frames, height=defaults.height, width=defaults.width)
    rows["ground truth"] = {"adherence": score([data.frames_uint8(c) for c in clips], scenes)}
    with torch.inference_mode():
        vae = engine.decoder.pipe.vae
        z = torch.cat([vae.encode(c[None].to(vae.device)).latent_dist.mode() for c in clips])
        recon = engine.decoder.pipe.video_processor.postprocess_video(vae.decode(z).sample, output_type="np")
    rows["VAE reconstruction"] = {"adherence": score(list((np.asarray(recon) * 255).round().astype(np.uint8)), scenes)}

    probe = VideoRequest(prompt=scenes[0].prompt, seed=0, guidance_scale=guidance).resolve(defaults)
    cost = {"large_s": step_cost(engine, engine.sketcher.denoiser, probe, args.cost_runs),
            "small_s": step_cost(engine, engine.renderer.denoiser, probe, args.cost_runs)}
    meta["step_cost"] = cost

    settings = [("all-large", f"step:{n}"), ("all-small", "boundary:1.0")]
    settings += [(f"SR K={k}", f"step:{k}") for k in (int(k) for k in args.ks.split(",") if k) if k < n]
    settings += [(spec, spec) for spec in args.adaptive.split(",") if spec]
    for name, switch in settings:
        start = time.perf_counter()
        frames, ks = generate(engine, scenes, switch, guidance, seed0=args.seed * 1000, batch=args.batch)
        ratio = [(k * cost["large_s"] + (n - k) * cost["small_s"]) / (n * cost["large_s"]) for k in ks]
        rows[name] = {"switch": switch, "adherence": score(frames, scenes), "cost_ratio": float(np.mean(ratio)),
                      "k": dict(sorted(collections.Counter(ks).items())), "wall_s": time.perf_counter() - start}
        print(f"{name:24s} {rows[name]['adherence']}  cost {rows[name]['cost_ratio']:.3f}  K {rows[name]['k']}",
              flush=True)
    result = {"meta": meta, "rows": rows}
    print(table(result))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    return result


def table(result: dict) -> str:
    meta = result["meta"]
    lines = [f"toy pair, {meta['videos']} videos per setting, N={meta['N']}, guidance {meta['guidance']}, "
             f"{meta['device']}, step cost large {meta['step_cost']['large_s'] * 1e3:.2f} ms, "
             f"small {meta['step_cost']['small_s'] * 1e3:.2f} ms",
             "| setting | colour | shape | direction | all three | cost vs all-large | K chosen |",
             "|---|---|---|---|---|---|---|"]
    for name, row in result["rows"].items():
        a = row["adherence"]
        cost = f"{row['cost_ratio']:.3f}" if "cost_ratio" in row else ""
        ks = ", ".join(f"{k}: {c}" for k, c in row.get("k", {}).items()) if name.startswith("adaptive") else ""
        lines.append(f"| {name} | {a['colour']:.1f} | {a['shape']:.1f} | {a['direction']:.1f} | **{a['all']:.1f}** | "
                     f"{cost} | {ks} |")
    return "\n".join(lines)


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _device_name(device: str) -> str:
    return torch.cuda.get_device_name(device) if torch.device(device).type == "cuda" else "cpu"


if __name__ == "__main__":
    main()
