"""`srd generate | serve`: the command line. Errors a user can cause print one line and exit 2."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


def _generate_parser(sub) -> None:
    from serve.models import PRESETS

    p = sub.add_parser("generate", help="Generate one video in this process (all four stages).")
    p.add_argument("--prompt", required=True)
    p.add_argument("--negative-prompt")
    p.add_argument("--preset", choices=sorted(PRESETS), default="toy")
    p.add_argument("--sketch", help="Sketch pipeline: hub id or diffusers directory (with --render).")
    p.add_argument("--render", help="Render pipeline or transformer: hub id or diffusers directory.")
    p.add_argument("--height", type=int)
    p.add_argument("--width", type=int)
    p.add_argument("--frames", type=int, dest="num_frames")
    p.add_argument("--steps", type=int, dest="num_inference_steps")
    p.add_argument("--guidance", type=float, dest="guidance_scale")
    p.add_argument("--shift", type=float, dest="flow_shift")
    p.add_argument("--seed", type=int)
    p.add_argument("--switch", help="step:K | ratio:R | adaptive:THR[:MIN:MAX] | boundary:R")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    p.add_argument("--vae-tiling", action="store_true", help="Decode in tiles (lower peak memory).")
    p.add_argument("--out", required=True, help="Output mp4 path.")
    p.add_argument("--save-latents", help="Also save the final latents (float32 [1, C, F', H', W']) here.")
    p.add_argument("--via-serve", action="store_true",
                   help="Run the job through the disaggregated Ray Serve app (one deployment per stage) on a local "
                        "Ray started and stopped by this command, instead of all four stages in this process.")


def _serve_parser(sub) -> None:
    from serve.models import PRESETS

    p = sub.add_parser("serve", help="Start local Ray and the disaggregated Serve app.")
    p.add_argument("--config", help="Serve config YAML (as for `serve deploy`).")
    p.add_argument("--preset", choices=sorted(PRESETS), default="toy")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="srd", description="Sketch/render video diffusion (SRDiffusion).")
    sub = parser.add_subparsers(dest="command", required=True)
    _generate_parser(sub)
    _serve_parser(sub)
    return parser


def _request_fields(args) -> dict:
    names = ("prompt", "negative_prompt", "height", "width", "num_frames", "num_inference_steps", "guidance_scale",
             "flow_shift", "seed", "switch")
    return {n: getattr(args, n) for n in names if getattr(args, n) is not None}


def generate(args) -> None:
    from serve.models import PRESETS
    from serve.request import VideoRequest

    if bool(args.sketch) != bool(args.render):
        raise ValueError("--sketch and --render must be given together")
    request = VideoRequest(**_request_fields(args))
    # Every check on the request runs before diffusers is even imported, let alone any weights loaded.
    params = request.resolve(PRESETS[args.preset].defaults)
    for flag, path in (("--out", args.out), ("--save-latents", args.save_latents)):
        if path and not Path(path).expanduser().absolute().parent.is_dir():
            raise ValueError(f"{flag} {path!r}: its directory does not exist")

    import torch
    from diffusers.utils import logging as diffusers_logging
    from tqdm import tqdm

    from serve.engine import Engine, EngineConfig
    from serve.video import encode_mp4

    diffusers_logging.disable_progress_bar()  # our own bars are per stage
    config = EngineConfig(preset=args.preset, sketch=args.sketch, render=args.render, device=args.device,
                          dtype=args.dtype, vae_tiling=args.vae_tiling)
    if args.via_serve:
        _generate_via_serve(args, request.model_copy(update={"seed": params.seed}), config)
        return
    engine = Engine(config)

    bars = {}

    def on_step(stage: str, step: int, total: int) -> bool:
        if stage not in bars:
            for bar in bars.values():
                bar.close()
            bars[stage] = tqdm(total=total, initial=step - 1, desc=stage, unit="step", file=sys.stderr)
        bars[stage].update(1)
        if step == total:
            bars[stage].close()
        return True

    result = engine.generate(params, on_step=on_step)
    for bar in bars.values():
        bar.close()
    Path(args.out).write_bytes(encode_mp4(result.frames, params.fps))
    if args.save_latents:
        torch.save(result.latents, args.save_latents)
    timing = " ".join(f"{k}={v:.2f}s" for k, v in result.timings.items())
    print(f"wrote {args.out}: {params.num_frames} frames {params.width}x{params.height}, seed {params.seed}, "
          f"switch {params.switch} -> sketched {result.switch_step}/{params.num_inference_steps} steps; {timing}")


def _generate_via_serve(args, request, config) -> None:
    """The same job through the Serve app (deployments/app.py), over its deployment handle; one progress bar."""
    import torch
    from tqdm import tqdm

    from deployments.app import generate_local

    bar = tqdm(total=100, desc="queued", unit="%", file=sys.stderr)

    def on_update(job) -> None:
        bar.set_description(job.stage or job.status)
        bar.update(job.progress - bar.n)

    result = generate_local(request, config, on_update=on_update)
    bar.close()
    job = result.job
    if job.status != "completed":
        print(f"srd generate: error: video job {job.id} {job.status}: {job.error}", file=sys.stderr)
        raise SystemExit(1)
    Path(args.out).write_bytes(result.video)
    if args.save_latents:
        torch.save(result.latents, args.save_latents)
    timing = " ".join(f"{k}={v:.2f}s" for k, v in job.timings.items())
    r = job.request
    print(f"wrote {args.out}: {r['num_frames']} frames {r['width']}x{r['height']}, seed {r['seed']}, "
          f"switch {r['switch']} -> sketched {job.switch_step}/{r['num_inference_steps']} steps "
          f"(Serve app, job {job.id}); {timing}")


def serve_command(args) -> None:
    from deployments.app import run_local

    run_local(config_path=args.config, preset=args.preset, host=args.host, port=args.port)


def _one_line(error: Exception) -> str:
    from pydantic import ValidationError

    if isinstance(error, ValidationError):
        first = error.errors()[0]
        field = ".".join(str(x) for x in first["loc"]) or "request"
        return f"invalid {field}: {first['msg'].removeprefix('Value error, ')}"
    return str(error).splitlines()[0] if str(error) else type(error).__name__


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # our own bars are per stage
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    from pydantic import ValidationError

    from serve.models import ModelError

    try:
        if args.command == "generate":
            generate(args)
        else:
            serve_command(args)
    except (ValueError, ValidationError, ModelError, OSError) as e:
        print(f"srd {args.command}: error: {_one_line(e)}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
