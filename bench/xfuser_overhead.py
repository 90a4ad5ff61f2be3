"""What the degree-1 xfuser path costs against plain diffusers, per transformer forward.

    python bench/xfuser_overhead.py --out $OUT/xfuser_overhead.json      # GPU: Wan 14B, 480p/81 frames, bf16
    python bench/xfuser_overhead.py --smoke --out /tmp/xfuser_overhead.json   # CPU, tiny model, seconds

One random-init model of the real Wan2.1-T2V-14B architecture (bench/wan.py) is built once. Both paths run on its
weights (xfuser's wrapper adopts them without a copy, serve.parallel.to_sequence_parallel):

  diffusers   serve.denoise.GuidedDenoiser(WanTransformer3DModel).forward_rows, what the one-rank engine runs
  xfuser/B    serve.parallel.ParallelDenoiser.forward_rows at world size 1 (init_rank, USP attention) with attention
              backend B, for each B of --backends ("auto": whatever xfuser picks itself)

Blocks (the result file's parts) run in the order diffusers, each backend, diffusers again; each block's figure is
the median of --runs synchronised forwards after --warmup; a block that would start after --budget-s is skipped.
Overhead = backend median / mean of the two diffusers medians - 1 (the two diffusers blocks also show the drift
over the run). The bar: <= 2% for the configured default backend.
A backend that cannot run here (not installed, no kernel on this device) is reported as unavailable.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

if __package__ in (None, ""):  # `python bench/xfuser_overhead.py` from the repository root
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from bench import wan
from bench.harness import Bench, markdown, rel_err, repeat, sync, timed

GPU_SIZE = {"model": "wan2.1-t2v-14b", "latents": (1, 16, 21, 60, 104), "text": (1, 512, 4096)}  # 480p, 81 frames
SMOKE_SIZE = {"model": "smoke-sketch", "latents": (1, 16, 3, 8, 8), "text": (1, 512, 32)}


def top_kernels(forward, count: int = 8) -> list[dict]:
    """The GPU kernels that took the most time over one forward: where a slower path spends its extra time."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        forward()
        torch.cuda.synchronize()
    events = sorted(prof.key_averages(), key=lambda e: e.device_time_total, reverse=True)[:count]
    return [{"name": e.key, "ms": e.device_time_total / 1e3, "calls": e.count} for e in events]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny model, float32: tests the script.")
    parser.add_argument("--backends", default="sdpa,sdpa_flash,cudnn,auto",
                        help="serve.parallel attention backends to measure, comma-separated.")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--runs", type=int, default=4)
    parser.add_argument("--budget-s", type=float, default=420.0, help="Skip blocks that would start after this.")
    parser.add_argument("--profile", action="store_true",
                        help="Also record each path's top GPU kernels over one forward (torch.profiler).")
    parser.add_argument("--out", default=str(Path(os.environ.get("OUT", ".")) / "xfuser_overhead.json"))
    args = parser.parse_args(argv)

    from serve.denoise import GuidedDenoiser
    from serve.parallel import (
        ATTENTION_BACKENDS, ParallelConfig, ParallelDenoiser, free_port, import_xfuser, init_rank, latent_tokens,
        teardown, to_sequence_parallel,
    )

    size = SMOKE_SIZE if args.smoke else GPU_SIZE
    device = "cpu" if args.smoke else "cuda"
    dtype = torch.float32 if args.smoke else torch.bfloat16
    backends = [b for b in args.backends.split(",") if b]
    unknown = [b for b in backends if b not in ATTENTION_BACKENDS]
    if unknown:
        parser.error(f"--backends {unknown} unknown; choose from {', '.join(ATTENTION_BACKENDS)}")
    if not args.smoke and not torch.cuda.is_available():
        parser.error("no CUDA device: run with --smoke on a CPU")

    bench = Bench("bench.xfuser_overhead", argv, args.out, args.budget_s, ("xfuser",),
                  what="per-forward cost of the degree-1 xfuser path (serve.parallel) against plain diffusers",
                  label=wan.LABEL, smoke=args.smoke, model=size["model"], config=dict(wan.TRANSFORMERS[size["model"]]),
                  latents=list(size["latents"]), dtype=str(dtype), warmup=args.warmup, runs=args.runs,
                  cudnn=torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
                  default_backend=ParallelConfig().attention_backend)
    import_xfuser()  # before any timing: its import takes seconds
    model, bench.meta["build_s"] = timed(lambda: wan.transformer(size["model"], device, dtype), device)
    generator = torch.Generator("cpu").manual_seed(0)
    latents = torch.randn(size["latents"], generator=generator).to(device, dtype)
    embeds = torch.randn(size["text"], generator=generator).to(device, dtype)
    timestep = torch.tensor([999.0], device=device)
    bench.meta["tokens"] = latent_tokens(latents.shape, model.config.patch_size)
    reference = {}

    def measure(record: dict, denoiser, **fields) -> None:
        forward = lambda: denoiser.forward_rows(latents, timestep, embeds)  # noqa: E731
        with torch.inference_mode():
            out = forward()
            sync(device)
            reference.setdefault("diffusers", out)
            record.update(fields, rel_err_vs_diffusers=rel_err(out, reference["diffusers"]))
            record.update(repeat(forward, device, args.warmup, args.runs))
            if args.profile:
                record["top_kernels"] = top_kernels(forward)

    def diffusers_block(record: dict) -> None:
        measure(record, GuidedDenoiser(model, max_tokens_per_forward=10**9), path="diffusers",
                attention_backend="diffusers native (torch SDPA)")

    def xfuser_block(record: dict, name: str) -> None:
        ctx = None
        try:
            ctx = init_rank(0, 1, "127.0.0.1", free_port(), ParallelConfig(attention_backend=name), device)
            wrapped = to_sequence_parallel(model, ctx)  # the same weight tensors, xfuser's processors
            measure(record, ParallelDenoiser(wrapped, ctx, max_tokens_per_forward=10**9), path=f"xfuser/{name}",
                    attention_backend=wrapped.attention_backend)
        except Exception as e:  # e.g. a backend with no kernel on this device: reported, not an error of the run
            record["unavailable"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
        finally:
            if ctx is not None:
                teardown(ctx)

    bench.run("diffusers (first)", 0, diffusers_block)
    for name in backends:
        bench.run(f"xfuser/{name}", 0, xfuser_block, name)
    bench.run("diffusers (last)", 0, diffusers_block)
    base = [r["median_s"] for r in bench.parts.values() if r.get("path") == "diffusers" and "median_s" in r]
    for record in bench.parts.values():
        if "median_s" in record:
            record["vs_diffusers"] = record["median_s"] / (sum(base) / len(base)) - 1.0
    bench.meta["diffusers_drift"] = (max(base) / min(base) - 1.0) if len(base) > 1 else None
    bench.save()
    print(table(bench))
    for name, record in bench.parts.items():
        for k in record.get("top_kernels") or []:
            print(f"{name:<20} {k['ms']:9.1f} ms {k['calls']:5d}x  {k['name'][:110]}")
    print(f"wrote {args.out}")
    return 0


def table(bench: Bench) -> str:
    m = bench.meta
    rows = []
    for name, r in bench.parts.items():
        if "median_s" in r:
            rows.append([name, r["attention_backend"], f"{r['median_s']:.4f}", f"{r['vs_diffusers']:+.2%}",
                         f"{r['rel_err_vs_diffusers']:.2e}"])
        else:
            rows.append([name, r.get("unavailable") or r.get("skipped") or r.get("error"), "", "", ""])
    lines = [f"{m['model']} ({m['label']}), latents {m['latents']} = {m['tokens']} tokens, {m['dtype']}, {m['gpu']}; "
             f"median of {m['runs']} after {m['warmup']} warm-up",
             markdown(["path", "attention kernel", "median s/forward", "vs diffusers", "rel. err vs diffusers"], rows)]
    if m["diffusers_drift"] is not None:
        lines.append(f"diffusers drift between first and last block: {m['diffusers_drift']:+.2%}; "
                     f"default backend: {m['default_backend']}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
