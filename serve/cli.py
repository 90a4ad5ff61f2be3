"""`srd generate | serve | warm | plan | simulate`: the command line. Errors a user can cause print one line and
exit 2."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Every flag's help ends with its default (or "required"), unless it says it already; the epilog keeps its line
    breaks."""

    def _get_help_string(self, action):
        help_text = action.help or ""
        if "(default:" in help_text or "(required)" in help_text or action.default is argparse.SUPPRESS:
            return help_text
        if action.required:
            return f"{help_text} (required)"
        if isinstance(action, argparse._StoreTrueAction):
            return f"{help_text} (default: off)"
        return f"{help_text} (default: %(default)s)"


def _preset_defaults(field: str) -> str:
    from serve.models import PRESETS

    return "the preset's: " + ", ".join(f"{name} {getattr(p.defaults, field)}" for name, p in sorted(PRESETS.items()))


def _preset_summaries() -> str:
    from serve.models import PRESETS

    return "; ".join(f"{name} ({p.summary})" for name, p in PRESETS.items())


def _toy_grammar() -> str:
    from toy import data

    return f'prompts like "{data.EXAMPLE_PROMPT}" ({data.vocabulary()})'


def _generate_parser(sub) -> None:
    from serve.models import PRESETS
    from serve.speed import PROFILES
    from serve.switch import SWITCH_SYNTAX
    from toy import data

    epilog = (f"The toy preset (the default) was trained on one grammar only:\n  \"{data.PROMPT_TEMPLATE}\"\nwith\n  "
              + data.vocabulary().replace("; ", "\n  ")
              + f'\ne.g. "{data.EXAMPLE_PROMPT}". Other prompts run, but the toy pair cannot draw them.')
    p = sub.add_parser("generate", help="Generate one video (in this process, or through the Serve app).",
                       formatter_class=_HelpFormatter, epilog=epilog)
    p.add_argument("--prompt", required=True, help="What the video shows (for the toy preset: see below).")
    p.add_argument("--negative-prompt", help="What classifier-free guidance steers away from (default: none).")
    p.add_argument("--preset", choices=sorted(PRESETS), default="toy",
                   help="Models and request defaults: " + _preset_summaries() + ".")
    p.add_argument("--sketch", help="Sketch pipeline: hub id or diffusers directory (with --render; replaces the "
                                    "preset's models, not its defaults) (default: the preset's).")
    p.add_argument("--render", help="Render pipeline or transformer: hub id or diffusers directory (with --sketch) "
                                    "(default: the preset's).")
    p.add_argument("--height", type=int, help=f"Frame height in pixels, a multiple of 16 (default: "
                                              f"{_preset_defaults('height')}).")
    p.add_argument("--width", type=int, help=f"Frame width in pixels, a multiple of 16 (default: "
                                             f"{_preset_defaults('width')}).")
    p.add_argument("--frames", type=int, dest="num_frames",
                   help=f"Frame count, 4n+1 (default: {_preset_defaults('num_frames')}).")
    p.add_argument("--steps", type=int, dest="num_inference_steps",
                   help=f"Denoising steps N, sketch and render together (default: "
                        f"{_preset_defaults('num_inference_steps')}).")
    p.add_argument("--guidance", type=float, dest="guidance_scale",
                   help=f"Classifier-free guidance scale; <= 1 turns guidance off (default: "
                        f"{_preset_defaults('guidance_scale')}).")
    p.add_argument("--guidance-2", type=float, dest="guidance_scale_2",
                   help="Guidance scale of the render steps (Wan2.2's low-noise expert) (default: --guidance's, "
                        "except " + ", ".join(f"{name} {preset.defaults.guidance_scale_2}"
                                              for name, preset in sorted(PRESETS.items())
                                              if preset.defaults.guidance_scale_2 is not None) + ").")
    p.add_argument("--shift", type=float, dest="flow_shift",
                   help=f"Flow shift of the UniPC sampler (default: {_preset_defaults('flow_shift')}).")
    p.add_argument("--seed", type=int, help="Seed of the initial noise, drawn as diffusers does (default: random, "
                                            "and printed).")
    p.add_argument("--switch", help=f"Which model denoises which steps: {SWITCH_SYNTAX}; step:A:B and ratio:RA:RB "
                                    "sketch steps < A, render A..B-1 and sketch again from B; quality:T the "
                                    "cheapest schedule the pair's calibration measured at >= T of all-large's "
                                    "quality; range:LO:HI and floor:T are load-elastic (a served job's switch "
                                    "moves from its idle choice, K=HI or the best calibrated quality, towards its "
                                    "floor, K=LO or quality:T's schedule, as the sketchers fall behind; here, "
                                    "alone, the idle choice) (default: "
                                    f"{_preset_defaults('switch')}).")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="Where the models run.")
    p.add_argument("--speed", choices=sorted(PROFILES), help="Speed profile (README, \"Speed levers\"): exact is "
                   "float32 without levers (diffusers' output); fast is bfloat16 with FP8 attention and linear "
                   "layers and regional compile on both denoising stages; fastest adds render step caching "
                   "(default: fast on cuda, exact on cpu).")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], help="Weights and compute dtype; wins over the "
                   "speed profile's (default: the profile's, float32 for exact, bfloat16 otherwise).")
    p.add_argument("--render-cache", type=float, dest="render_cache", metavar="THRESHOLD",
                   help="Render step caching threshold, 0 to 1 (0: off); wins over the speed profile's (default: "
                        "the profile's, off except with fastest).")
    for role, model in (("sketch", "large"), ("render", "small")):
        p.add_argument(f"--{role}-lora", action="append", default=[], metavar="PATH[:SCALE]",
                       help=f"A LoRA adapter of the {role} ({model}) model: a .safetensors file or a directory "
                            "holding one, optionally with its scale (default 1); repeat for several (README, "
                            "\"LoRA adapters\").")
    p.add_argument("--vae-tiling", action="store_true", help="Decode in tiles (lower peak memory).")
    p.add_argument("--out", required=True, help="Output mp4 path.")
    p.add_argument("--save-latents", help="Also save the final latents (float32 [1, C, F', H', W']) here "
                                          "(default: not saved).")
    p.add_argument("--via-serve", action="store_true",
                   help="Run the job through the disaggregated Ray Serve app (one deployment per stage) on a local "
                        "Ray started and stopped by this command, instead of all four stages in this process.")


def _seconds(text: str) -> float:
    """A number of seconds > 0, for argparse (which prints the error as one line and exits 2)."""
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a number of seconds > 0, not {text!r}")
    return value


def _serve_parser(sub) -> None:
    from serve.models import PRESETS

    p = sub.add_parser("serve", help="Start local Ray and the disaggregated Serve app; SIGINT/SIGTERM stop both.",
                       formatter_class=_HelpFormatter)
    p.add_argument("--config", help="Serve config YAML (as for `serve deploy`); replaces --preset (default: none, "
                                    "the app on --preset).")
    p.add_argument("--preset", choices=sorted(PRESETS), default="toy",
                   help="Models and request defaults of the app: " + _preset_summaries() + ".")
    p.add_argument("--host", help="HTTP address to bind (loopback: Ray runs without token auth unless RAY_AUTH_MODE "
                                  "says otherwise) (default: the config's `http_options.host`, else 127.0.0.1).")
    p.add_argument("--port", type=int, help="HTTP port (default: the config's `http_options.port`, else 8000).")
    p.add_argument("--start-timeout-s", type=_seconds, metavar="SECONDS",
                   help="How long a replica may wait for Ray to place it; then `srd serve` fails with one line naming "
                        "the deployment and the resources it asks for. Loading a placed replica's model is not "
                        "bounded (default: $SRD_START_TIMEOUT_S, else 60).")


def _warm_parser(sub) -> None:
    from serve.models import PRESETS
    from serve.speed import PROFILES

    p = sub.add_parser("warm", help="Fill the compile cache of each denoising stage (its levers, one forward at its "
                                    "warm-up shape) ahead of a deployment, so that replicas start warm.",
                       formatter_class=_HelpFormatter)
    source = p.add_mutually_exclusive_group()
    source.add_argument("--config", help="Serve config YAML (as for `srd serve`): warm each application's engine "
                                         "(default: none, the engine of --preset and the flags below).")
    source.add_argument("--preset", choices=sorted(PRESETS), default="toy", help="Models of the engine to warm.")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cuda", help="With --preset: where the models run.")
    p.add_argument("--speed", choices=sorted(PROFILES), help="With --preset: the speed profile (default: by "
                                                             "--device, fast on cuda, exact on cpu).")
    p.add_argument("--compile-cache-dir", metavar="DIR", help="The persistent compile cache to fill; wins over the "
                   "config's `engine.compile_cache_dir` (default: the config's, else torch's per-user directory).")


def _plan_parser(sub) -> None:
    from serve.placement import CARDS, RESOLUTIONS

    p = sub.add_parser("plan", help="Place the stages on GPUs from the measured cost model: sketch:render replicas, "
                                    "where the text encoder and VAE go, videos/hour; optionally a Serve config.",
                       formatter_class=_HelpFormatter)
    p.add_argument("--gpus", type=int, required=True, help="GPUs for one copy of the app.")
    p.add_argument("--card", choices=sorted(CARDS), default="h200", help="GPU model whose measured costs apply.")
    p.add_argument("--resolution", choices=sorted(RESOLUTIONS), default="480p", help="Video size (HxW: 480x832 "
                                                                                     "or 720x1280).")
    p.add_argument("--frames", type=int, default=81, help="Frames per video.")
    p.add_argument("--steps", type=int, default=50, help="Denoising steps N.")
    p.add_argument("--switch", default="step:10", help="step:K, step:A:B, ratio:R or ratio:RA:RB (the adaptive and "
                                                       "boundary policies decide K while running: give the K you "
                                                       "expect).")
    p.add_argument("--no-guidance", action="store_true", help="One forward per step instead of two (no CFG).")
    p.add_argument("--write-config", metavar="PATH", help="Write a Serve config YAML for this placement.")


def _simulate_parser(sub) -> None:
    p = sub.add_parser("simulate", help="Simulate the app on N GPUs (discrete events, the measured costs, the app's "
                                        "own planner and autoscaling policy): videos/hour, latency, replicas.",
                       formatter_class=_HelpFormatter)
    p.add_argument("--config", required=True, help="The run's YAML (deployments/simulate/config.py SimConfig; "
                                                    "examples in bench/scenarios/).")
    p.add_argument("--trace", help="JSON-lines arrivals (t, request, class, priority) instead of the config's "
                                   "generator.")
    p.add_argument("--out", help="Folder for the run's JSON and its plot over time (PNG: the `bench` extra).")


def simulate_command(args) -> None:
    from deployments.simulate.run import simulate_command as run  # imports Ray's policy module, never starts Ray

    run(args.config, args.trace, args.out)


def plan_command(args) -> None:
    from serve.models import PRESETS
    from serve.placement import CARDS, RESOLUTIONS, plan, serve_config
    from serve.request import VideoRequest
    from serve.switch import make_plan

    if args.switch.split(":")[0] not in ("step", "ratio"):
        raise ValueError(f"`--switch` {args.switch!r}: give step:K or ratio:R (K is only known while running)")
    params = VideoRequest(prompt="-", num_inference_steps=args.steps, switch=args.switch).resolve(
        PRESETS["wan2.1-t2v"].defaults)
    k = sum(s.stop - s.start for s in make_plan(params).segments if s.role == "sketch")  # large-model steps
    height, width = RESOLUTIONS[args.resolution]
    placement = plan(args.gpus, CARDS[args.card], height, width, args.frames, args.steps, k, not args.no_guidance)
    print(f"{args.resolution} ({height}x{width}), {args.frames} frames, N={args.steps}, K={k}")
    print("\n".join(placement.lines()))
    if args.write_config:
        import yaml

        command = (f"srd plan --gpus {args.gpus} --card {args.card} --resolution {args.resolution} --frames "
                   f"{args.frames} --steps {args.steps} --switch {args.switch}"
                   + (" --no-guidance" if args.no_guidance else "") + f" --write-config {args.write_config}")
        header = "".join(f"# {line}\n" for line in [command, *placement.lines()])
        Path(args.write_config).write_text(header + yaml.safe_dump(serve_config(placement), sort_keys=False))
        print(f"wrote {args.write_config}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="srd", description="Sketch/render video diffusion (SRDiffusion).")
    sub = parser.add_subparsers(dest="command", required=True)
    _generate_parser(sub)
    _serve_parser(sub)
    _warm_parser(sub)
    _plan_parser(sub)
    _simulate_parser(sub)
    return parser


def warn_outside_toy_grammar(prompt: str, command: str = "generate") -> None:
    """One line on stderr when a prompt for the toy preset is outside the grammar it was trained on."""
    from toy import data

    try:
        data.parse_prompt(prompt)
    except ValueError:
        print(f"srd {command}: warning: the toy preset only knows {_toy_grammar()}; {prompt!r} is outside it",
              file=sys.stderr, flush=True)


def _lora_flags(args) -> tuple[dict, dict]:
    """`--sketch-lora`/`--render-lora PATH[:SCALE]` as a registry (each adapter named after its file) and the
    request's `sketch_loras`/`render_loras`."""
    import re

    registry, chosen = {}, {}
    for role in ("sketch", "render"):
        for flag in getattr(args, f"{role}_lora"):
            path, _, scale = flag.rpartition(":")
            try:
                scale = float(scale) if path else 1.0
            except ValueError:
                path, scale = flag, 1.0  # a colon of the path itself
            path = path or flag
            if not Path(path).expanduser().exists():
                raise ValueError(f"--{role}-lora {flag!r}: {path!r} does not exist")
            stem = re.sub(r"[^A-Za-z0-9_-]", "-", Path(path).stem)[:60] or "lora"
            name = next(n for n in (stem, *(f"{stem}-{i}" for i in range(2, 100))) if n not in registry)
            registry[name] = {"path": path, "stage": role}
            chosen.setdefault(f"{role}_loras", []).append({"name": name, "scale": scale})
    return registry, chosen


def generate(args) -> None:
    from serve.request import VideoRequest

    if bool(args.sketch) != bool(args.render):
        raise ValueError("--sketch and --render must be given together")
    loras, chosen = _lora_flags(args)
    request = VideoRequest(**{name: getattr(args, name) for name in VideoRequest.model_fields
                              if getattr(args, name, None) is not None}, **chosen)
    from serve.config import EngineConfig  # torch and pydantic, not diffusers

    config = EngineConfig(preset=args.preset, sketch=args.sketch, render=args.render, device=args.device,
                          speed=args.speed, dtype=args.dtype, vae_tiling=args.vae_tiling, loras=loras,
                          max_loaded_loras=max([4, *(len(c) for c in chosen.values())]))
    # Every check on the request runs before diffusers is even imported, let alone any weights loaded.
    params = request.resolve(config.defaults, loras=config.loras, max_loras=config.max_loaded_loras)
    for flag, path in (("--out", args.out), ("--save-latents", args.save_latents)):
        if path and not Path(path).expanduser().absolute().parent.is_dir():
            raise ValueError(f"{flag} {path!r}: its directory does not exist")

    import torch
    from diffusers.utils import logging as diffusers_logging
    from tqdm import tqdm

    from serve.engine import Engine
    from serve.video import Clip

    diffusers_logging.disable_progress_bar()  # our own bars are per stage
    config.family().check_request(params)  # the family's own limits (a config file read, no weights)
    config.check_switch(params)  # quality:T needs the pair's calibration
    toy_prompt_check = args.preset == "toy" and not args.sketch  # after every error a user can cause, once
    if args.via_serve:
        if toy_prompt_check:
            warn_outside_toy_grammar(request.prompt)
        _generate_via_serve(args, request.model_copy(update={"seed": params.seed}), params, config)
        return
    engine = Engine(config)
    for role in ("sketch", "render"):  # what a stage with levers runs, and why a lever fell back: once each
        if config.stage_kernels(role).any:
            print(engine.stages[role].kernels.line(), flush=True)
    if toy_prompt_check:
        warn_outside_toy_grammar(request.prompt)

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
    Path(args.out).write_bytes(Clip(result.frames, params.fps).mp4())
    if args.save_latents:
        torch.save(result.latents, args.save_latents)
    timing = " ".join(f"{k}={v:.2f}s" for k, v in result.timings.items())
    print(f"wrote {args.out}: {params.num_frames} frames {params.width}x{params.height}, seed {params.seed}, "
          f"switch {params.switch} -> {_segments(result.segments, params.num_inference_steps)}; {timing}")


def _segments(segments, num_steps: int) -> str:
    """"sketched K/N steps", or each segment's steps where the plan has more than two."""
    if len(segments) <= 2:
        return f"sketched {segments[0][2]}/{num_steps} steps"
    return ", ".join(f"{name} steps {start}-{stop - 1}" for name, start, stop in segments if stop > start)


def _generate_via_serve(args, request, params, config) -> None:
    """The same job through the Serve app (deployments/app.py), over its deployment handle; one progress bar."""
    import torch
    from tqdm import tqdm

    from deployments.local import generate_local

    bars = []  # made at the job's first update: nothing on the terminal but the error if the app fails to start

    def on_update(job) -> None:
        if not bars:
            bars.append(tqdm(total=100, desc="queued", unit="%", file=sys.stderr))
        bars[0].set_description(job.stage or job.status)
        bars[0].update(job.progress - bars[0].n)

    result = generate_local(request, config, on_update=on_update)
    for bar in bars:
        bar.close()
    job = result.job
    if job.status != "completed":
        error = getattr(job.error, "message", job.error)  # the API's error object, or a plain string
        print(f"srd generate: error: video job {job.id} {job.status}: {error}", file=sys.stderr)
        raise SystemExit(1)
    Path(args.out).write_bytes(result.video)
    if args.save_latents:
        torch.save(result.latents, args.save_latents)
    timing = " ".join(f"{k}={v:.2f}s" for k, v in job.timings.items())
    segments = [(s.stage, s.start, s.stop) for s in job.segments]
    print(f"wrote {args.out}: {params.num_frames} frames {params.width}x{params.height}, seed {params.seed}, "
          f"switch {params.switch} -> {_segments(segments, params.num_inference_steps)} "
          f"(Serve app, job {job.id}); {timing}")


def warm_command(args) -> None:
    from serve.config import EngineConfig
    from serve.warm import warm

    if args.config:
        given = [name for name, default in (("--device", "cuda"), ("--speed", None)) if
                 getattr(args, name.removeprefix("--")) != default]
        if given:
            raise ValueError(f"{', '.join(given)}: give the engine's settings in --config's `engine:` section")
        from deployments.local import engine_configs

        configs = engine_configs(args.config)
    else:
        configs = [(args.preset, EngineConfig(preset=args.preset, device=args.device, speed=args.speed))]
    if args.compile_cache_dir:
        configs = [(name, c.model_copy(update={"compile_cache_dir": args.compile_cache_dir})) for name, c in configs]
    for name, config in configs:
        print(f"srd warm: {name}: speed {config.speed_name} on {config.device}", flush=True)
        warm(config, lambda line: print(f"srd warm: {name}: {line}", flush=True))


def serve_command(args) -> None:
    from deployments.local import run_local

    run_local(config_path=args.config, preset=args.preset, host=args.host, port=args.port,
              start_timeout_s=args.start_timeout_s)


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
        elif args.command == "plan":
            plan_command(args)
        elif args.command == "simulate":
            simulate_command(args)
        elif args.command == "warm":
            warm_command(args)
        else:
            serve_command(args)
    except (ValueError, ValidationError, ModelError, OSError) as e:
        print(f"srd {args.command}: error: {_one_line(e)}", file=sys.stderr)
        return 2
    except Exception as e:
        from deployments.local import AppStartError  # imported only when it can be what was raised

        if not isinstance(e, AppStartError):
            raise
        print(f"srd {args.command}: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
