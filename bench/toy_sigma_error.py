"""Where the toy pair's small DiT falls behind its large one: the x0 error of each at fixed noise levels.

    python -m bench.toy_sigma_error --out bench/results/2026-11-26-toy-run7-sigma-error.json    # CPU, ~2 min

On held-out clips (encoded and scaled as the training bank is), for each sigma: x_t = (1 - sigma) x_0 + sigma e,
each model's velocity v at timestep 1000 sigma with the prompt's embedding (no guidance), and the MSE of its x_0
estimate x_t - sigma v. Sketch-then-render only keeps all-large quality from a switch at sigma_K if the small
model's error is close to the large one's below sigma_K: this measures how close.
"""

from __future__ import annotations

import argparse

import torch

from bench.harness import meta, write_json
from bench.toy_quality import pair_dirs
from serve.config import EngineConfig
from serve.engine import Engine
from serve.request import VideoRequest
from toy import data, train

SIGMAS = (0.05, 0.15, 0.3, 0.5, 0.65, 0.75, 0.85, 0.95)


@torch.no_grad()
def x0_errors(models: str | None, clips: int, seed: int) -> list[dict]:
    engine = Engine(EngineConfig(preset="toy", **pair_dirs(models)))
    scenes = data.sample_scenes(clips, seed=seed, split="eval")
    params = [VideoRequest(prompt=s.prompt, seed=0, guidance_scale=1.0).resolve(engine.config.defaults) for s in scenes]
    embeds = torch.cat([e.prompt for e in engine.stages["encode"](params)])
    vae = engine.stages["decode"].pipe.vae
    x0 = train.scaled_latents(vae, scenes, torch.device("cpu"))
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(seed))
    rows = []
    for sigma in SIGMAS:
        xt, timestep, _ = train.flow_matching_example(x0, noise, torch.full((clips,), sigma))
        row = {"sigma": sigma}
        for name, role in (("large", "sketch"), ("small", "render")):
            transformer = engine.stages[role].denoiser.transformer
            v = transformer(hidden_states=xt, timestep=timestep, encoder_hidden_states=embeds, return_dict=False)[0]
            row[name] = ((xt - sigma * v - x0) ** 2).mean().item()
        row["small/large"] = row["small"] / row["large"]
        print("  ".join(f"{k} {v:.4g}" for k, v in row.items()), flush=True)
        rows.append(row)
    return rows


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default=None, help="a directory with sketch/ and render/ (default: the toy preset)")
    ap.add_argument("--clips", type=int, default=96)
    ap.add_argument("--seed", type=int, default=123)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    result = {"meta": meta("bench.toy_sigma_error", argv, models=args.models or "toy preset", clips=args.clips,
                           seed=args.seed),
              "rows": x0_errors(args.models, args.clips, args.seed)}
    write_json(args.out, result)
    return result


if __name__ == "__main__":
    main()
