"""Per-forward time of each speed lever of kernels/ against diffusers' eager forward, side by side in one run, with
the output's cosine similarity and relative error against that eager bf16 output on the same weights and inputs
for Wan2.1-T2V 1.3B and 14B at 480x832/81 frames (32,760 tokens).

    python -m bench.kernels --device cuda --commit $(git rev-parse --short HEAD) --out $OUT/kernels.json
    (from a checkout that is not pip-installed, e.g. on the device: PYTHONPATH=kernels, where srd_kernels lies)
    python -m bench.kernels --smoke --out /tmp/kernels.json     # CPU, tiny stand-ins: the code paths only

Per model, in this order (the JSON is rewritten after every row; a row that raises is recorded and the run goes on):
  attention   every runnable self-attention backend on random q, k, v at the model's shape (B=1, 32,760 tokens):
              median ms per call and cosine vs torch SDPA; `select_backend` picks one (what attention="auto" does)
  eager       diffusers' forward, bf16, torch SDPA: the reference output and time
  levers      each lever alone (attention backends, norm_rope, fp8_linear, compile), then stacked ones, each applied by
              srd_kernels.apply.apply_kernels (the stage's own path) to a copy of the same weights; compile rows report
              their first (compiling) call apart
Then an end-to-end estimate (labelled so, not measured): 50 steps with CFG (2 forwards a step), switch at K=10,
K*2*C14B + (N-K)*2*C1.3B with the stacked levers, against 50*2*C14B eager; encode/decode/overhead excluded.

All numbers are "random-init weights, real architecture" (bench.wan.LABEL). Random weights make activations
unlike a trained model's: the accuracy of FP8 here is indicative, the toy pair is where quality is judged.
"""

from __future__ import annotations

import argparse
import copy
import json

import torch

from bench import harness, wan
from bench.harness import Bench
from serve.denoise import WAN_LATENTS
from srd_kernels import attention
from srd_kernels.apply import apply_kernels
from srd_kernels.config import KernelConfig

SIZE = (480, 832, 81)  # height, width, frames
SMOKE_SIZE = (32, 48, 5)


def inputs(transformer, height: int, width: int, frames: int, device, dtype):
    generator = torch.Generator(device).manual_seed(0)
    shape = (1, transformer.config.in_channels, *WAN_LATENTS.grid(frames, height, width))
    latents = torch.randn(shape, generator=generator, device=device, dtype=dtype)
    text = torch.randn((1, 512, transformer.config.text_dim), generator=generator, device=device, dtype=dtype)
    return dict(hidden_states=latents, timestep=torch.tensor([500], device=device), encoder_hidden_states=text,
                return_dict=False)


def compare(out: torch.Tensor, ref: torch.Tensor) -> dict:
    return {"cosine": harness.cosine(out, ref), "rel_error": harness.rel_err(out, ref),
            "finite": bool(torch.isfinite(out).all())}


def levers(selected: str, available: list[str]) -> dict[str, KernelConfig]:
    rows = {f"attn:{name}": KernelConfig(attention=name) for name in available if name != "sdpa"}
    rows["norm_rope"] = KernelConfig(fused_norm_rope=True)  # the fused Triton kernel, eager
    if selected != "sdpa":
        rows[f"attn:{selected}+norm_rope"] = KernelConfig(attention=selected, fused_norm_rope=True)
    rows["compile"] = KernelConfig(compile=True)
    rows["fp8_linear+compile"] = KernelConfig(fp8_linear=True, compile=True)
    if selected != "sdpa":
        rows[f"attn:{selected}+compile"] = KernelConfig(attention=selected, compile=True)
        rows[f"stacked:attn:{selected}+fp8_linear+compile"] = KernelConfig(attention=selected, fp8_linear=True,
                                                                           compile=True)
        # the kernel as an opaque op in the compiled block, against Inductor's own fusion of the same ops
        rows[f"stacked:attn:{selected}+norm_rope+fp8_linear+compile"] = KernelConfig(
            attention=selected, fused_norm_rope=True, fp8_linear=True, compile=True)
    for name in available:  # the other 8-bit backend stacked too, so the table shows both
        if name in attention.EIGHT_BIT_BACKENDS and name != selected:
            rows[f"stacked:attn:{name}+fp8_linear+compile"] = KernelConfig(attention=name, fp8_linear=True,
                                                                           compile=True)
    rows["fp8_linear"] = KernelConfig(fp8_linear=True)  # alone, uncompiled: last, the least informative
    return rows


def fp8_split(shape, device, dtype, repeats: int) -> dict:
    """Where cudnn-fp8's time goes at `shape`: cuDNN's FP8 SDPA alone on already-quantised inputs, against the
    whole backend (K smoothing, amax, E4M3 casts, output dequantisation) eager and compiled (the quantisation
    fused by Inductor, as it is inside a compiled block)."""
    generator = torch.Generator(device).manual_seed(0)
    q, k, v = (torch.randn(shape, device=device, dtype=dtype, generator=generator) for _ in range(3))
    quantised = [t for x in (q, k, v) for t in attention._to_e4m3(x)]
    q8, dq, k8, dk, v8, dv = quantised
    op = lambda: attention._cudnn_fp8_sdpa(q8, k8, v8, dq, dk, dv)  # noqa: E731
    compiled = torch.compile(lambda: attention.attention(q, k, v, "cudnn-fp8"), fullgraph=True)
    ms = {"op_only_ms": op, "eager_ms": lambda: attention.attention(q, k, v, "cudnn-fp8"), "compiled_ms": compiled}
    result = {}
    for name, call in ms.items():
        call()  # warm-up, and the compile
        result[name] = attention._median_seconds(call, repeats) * 1e3
    flops = 4 * shape[0] * shape[1] ** 2 * shape[2] * shape[3]
    result["op_only_tflops"] = flops / result["op_only_ms"] / 1e9
    print(f"cudnn-fp8 at {shape}: op alone {result['op_only_ms']:.2f} ms ({result['op_only_tflops']:.0f} TFLOP/s), "
          f"eager {result['eager_ms']:.2f} ms, compiled {result['compiled_ms']:.2f} ms", flush=True)
    return result


def run_model(result: dict, bench: Bench, name: str, size: tuple[int, int, int], device, dtype, runs: int,
              backends=attention.BACKENDS, only: list[str] | None = None) -> None:
    """Fill `result` with the model's attention backends and lever rows (saved after each)."""
    height, width, frames = size
    result.update({"model": name, "height": height, "width": width, "num_frames": frames, "rows": {}})
    save = bench.save
    base = wan.transformer(name, device, dtype).eval()
    kwargs = inputs(base, height, width, frames, device, dtype)
    cfg = base.config
    tokens = WAN_LATENTS.tokens(frames, height, width)
    result["tokens"] = tokens

    shape = (1, tokens, cfg.num_attention_heads, cfg.attention_head_dim)
    measured = attention.measure_backends(shape, device, dtype, backends, repeats=max(runs, 5))
    selected, reason = attention.select_backend(measured)
    result["attention"] = {"shape": shape, "selected": selected, "reason": reason,
                           "backends": {n: {"ms": m.seconds * 1e3, "cosine": m.cosine} for n, m in measured.items()}}
    if "cudnn-fp8" in measured:
        result["attention"]["cudnn-fp8 split"] = fp8_split(shape, device, dtype, max(runs, 5))
    save()

    with torch.inference_mode():
        ref, first = harness.timed(lambda: base(**kwargs)[0], device)
        timing = harness.repeat(lambda: base(**kwargs)[0], device, warmup=0, runs=runs)
    result["rows"]["eager"] = {"median_s": timing["median_s"], "times_s": timing["times_s"], "cosine": 1.0,
                               "rel_error": 0.0, "first_call_s": first}
    eager_s = timing["median_s"]
    save()

    rows = levers(selected, list(measured))
    if only:
        rows = {label: rows[label] for label in only if label in rows}
    for label, config in rows.items():
        if bench.left() <= 0:
            result["rows"][label] = {"skipped": "out of time"}
            continue
        model = None
        try:
            torch._dynamo.reset()
            model = copy.deepcopy(base)
            report = apply_kernels(model, config, label)
            with torch.inference_mode():
                out, first = harness.timed(lambda: model(**kwargs)[0], device)
                timing = harness.repeat(lambda: model(**kwargs)[0], device, warmup=0, runs=runs)
            row = {"median_s": timing["median_s"], "times_s": timing["times_s"], "first_call_s": first,
                   "speedup": eager_s / timing["median_s"], **compare(out, ref), "report": report.line(),
                   "numerics": "8-bit" if (config.fp8_linear or config.attention in attention.EIGHT_BIT_BACKENDS)
                   else "bf16"}
            row["bound"] = attention.MIN_COSINE_8BIT if row["numerics"] == "8-bit" else attention.MIN_COSINE_BF16
            row["meets_bound"] = row["cosine"] >= row["bound"]
            result["rows"][label] = row
            print(f"{name} {label}: {row['median_s']:.3f} s ({row['speedup']:.2f}x) cos {row['cosine']:.5f} "
                  f"rel {row['rel_error']:.4f} first {first:.1f} s", flush=True)
        except Exception as e:  # one failing lever is a row with its error, not a lost run
            result["rows"][label] = {"error": f"{type(e).__name__}: {e}"[:2000]}
            print(f"{name} {label}: ERROR {type(e).__name__}: {e}"[:500], flush=True)
        del model
        harness.free_memory(device)
        save()
    del base
    harness.free_memory(device)


def best_stacked(rows: dict) -> tuple[str, float] | None:
    stacked = {k: v for k, v in rows.items() if k.startswith("stacked") and "median_s" in v and v.get("meets_bound")}
    if not stacked:
        return None
    label = min(stacked, key=lambda k: stacked[k]["median_s"])
    return label, stacked[label]["median_s"]


def e2e_estimate(estimate: dict, results: dict, steps: int = 50, k: int = 10) -> None:
    """Transformer time of one request from this run's per-forward costs (CFG: 2 forwards a step). An estimate,
    not a measurement: encode, decode and orchestration are left out, and no render caching is counted."""
    big, small = results.get("wan2.1-t2v-14b", {}), results.get("wan2.1-t2v-1.3b", {})
    if "eager" not in big.get("rows", {}) or "eager" not in small.get("rows", {}):
        estimate["skipped"] = "needs the eager rows of both real models (wan2.1-t2v-14b, wan2.1-t2v-1.3b)"
        return
    eager14, eager13 = big["rows"]["eager"]["median_s"], small["rows"]["eager"]["median_s"]
    stacked14, stacked13 = best_stacked(big["rows"]), best_stacked(small["rows"])
    estimate.update({"label": "ESTIMATE from per-forward times, transformer time only", "steps": steps, "k": k,
                     "all_14b_eager_s": steps * 2 * eager14, "sr_eager_s": (k * eager14 + (steps - k) * eager13) * 2})
    estimate["sr_eager_speedup"] = estimate["all_14b_eager_s"] / estimate["sr_eager_s"]
    if stacked14 and stacked13:
        estimate["stacked_rows"] = [stacked14[0], stacked13[0]]
        estimate["sr_stacked_s"] = (k * stacked14[1] + (steps - k) * stacked13[1]) * 2
        estimate["sr_stacked_speedup"] = estimate["all_14b_eager_s"] / estimate["sr_stacked_s"]


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--models", default="wan2.1-t2v-1.3b,wan2.1-t2v-14b")
    parser.add_argument("--runs", type=int, default=3, help="Timed forwards per row (median).")
    parser.add_argument("--budget-s", type=float, default=540, help="Rows not started by then are skipped.")
    parser.add_argument("--backends", default=",".join(attention.BACKENDS),
                        help="Attention backends to time (and so to offer as levers).")
    parser.add_argument("--only", default="", help="Comma-separated lever rows to run, in this order (default all).")
    parser.add_argument("--commit", default=None, help="The commit measured (default: $BENCH_COMMIT, else git's).")
    parser.add_argument("--out", required=True)
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny stand-ins, float32: the code paths only.")
    args = parser.parse_args(argv)
    if args.smoke:
        args.device, args.models, args.runs = "cpu", "smoke-sketch", 1
    dtype = torch.float32 if args.smoke else torch.bfloat16
    size = SMOKE_SIZE if args.smoke else SIZE
    bench = Bench("bench.kernels", argv, args.out, args.budget_s, ("torchao", "nvidia-cudnn-frontend", "sageattention"),
                  args.commit, label=wan.LABEL, device=args.device, dtype=str(dtype))
    for name in args.models.split(","):
        bench.run(name, 0, run_model, bench, name, size, args.device, dtype, args.runs,
                  tuple(args.backends.split(",")), [x for x in args.only.split(",") if x])
    bench.run("e2e_estimate", 0, e2e_estimate, bench.parts)
    for name, result in bench.parts.items():
        if "attention" not in result:  # the estimate, or a model that failed before its first row
            continue
        print(f"\n{name} {result['height']}x{result['width']}/{result['num_frames']} ({result['tokens']} tokens); "
              f"attention selected: {result['attention']['selected']}")
        for backend, m in result["attention"]["backends"].items():
            print(f"  attention {backend:10s} {m['ms']:8.2f} ms  cos {m['cosine']:.5f}")
        for label, row in result["rows"].items():
            if "median_s" in row:
                print(f"  {label:45s} {row['median_s']:7.3f} s  x{row.get('speedup', 1.0):.2f}  cos "
                      f"{row['cosine']:.5f}  rel {row['rel_error']:.4f}")
            else:
                print(f"  {label:45s} {row}")
    print("\ne2e", json.dumps(bench.parts["e2e_estimate"], indent=1))
    print("\n".join(bench.problems()))
    return bench.doc


if __name__ == "__main__":
    main()
