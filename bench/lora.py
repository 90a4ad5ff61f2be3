"""LoRA adapters on a stage's transformer: the time to switch adapters between batches and the per-forward cost
with an adapter active, with and without the speed levers, for Wan2.1-T2V 1.3B and 14B at 480x832/81 frames.

    python -m bench.lora --device cuda --commit $(git rev-parse --short HEAD) --out $OUT/lora.json
    (from a checkout that is not pip-installed, e.g. on the device: PYTHONPATH=kernels, where srd_kernels lies)
    python -m bench.lora --smoke --out /tmp/lora.json     # CPU, tiny stand-ins, float32: the code paths only

Per model, two random rank-`--rank` adapters on the attention projections (serve/lora.py `save_random_adapter`,
saved as diffusers saves a trained LoRA) are applied through the stage's own path, `LoadedAdapters.applied`
(diffusers' loader, `set_adapters`, `disable_lora`), to a copy of the model with each lever row applied by
srd_kernels.apply.apply_kernels. Per row, in this order:
  base          forwards with no adapter ever loaded: median s
  load          the first batch of adapter `first`: its load (from disk into the model) and its first forward apart
                (under compile the first forward recompiles the blocks: the PEFT layers change their modules)
  with_adapter  forwards with `first` active (unfused): median s, and its overhead over base
  switch        the first batch of `second` (a load), then first <-> second between batches, both loaded: the
                time from the set's change through the first forward, less a forward with the set unchanged (median)
  off           a batch without adapters after them (`disable_lora`): its first forward and the median

All numbers are "random-init weights, real architecture" (bench.wan.LABEL): the cost of the real shapes.
"""

from __future__ import annotations

import argparse
import copy
import tempfile
from pathlib import Path

import torch

from bench import harness, wan
from bench.harness import Bench
from bench.kernels import inputs
from serve.lora import LoadedAdapters, LoraSpec, save_random_adapter
from srd_kernels.apply import apply_kernels
from srd_kernels.config import KernelConfig

SIZE = (480, 832, 81)  # height, width, frames
SMOKE_SIZE = (32, 48, 5)
LEVERS = ("eager", "compile", "fp8_linear+compile")  # "eager": no lever; the others KernelConfig.from_label's


def timed_batch(loaded: LoadedAdapters, choices, forward, device) -> tuple[float, float]:
    """(seconds to apply `choices`, seconds of the first forward under them), both device-synchronised."""
    applied = loaded.applied(choices)
    _, apply_s = harness.timed(applied.__enter__, device)
    try:
        _, first_s = harness.timed(forward, device)
    finally:
        applied.__exit__(None, None, None)
    return apply_s, first_s


def run_row(row: dict, base, adapters: dict[str, str], label: str, kwargs: dict, device, runs: int) -> None:
    torch._dynamo.reset()
    model = copy.deepcopy(base)
    if label != "eager":
        row["report"] = apply_kernels(model, KernelConfig.from_label(label), label).line()
    registry = {name: LoraSpec(path=path, stage="sketch") for name, path in adapters.items()}
    loaded = LoadedAdapters(model, registry, "WanPipeline", capacity=2)

    def forward():
        return model(**kwargs)[0]

    def median_under(choices) -> float:
        with loaded.applied(choices):
            return harness.repeat(forward, device, warmup=0, runs=runs)["median_s"]

    with torch.inference_mode():
        _, first = harness.timed(forward, device)  # a compiled row compiles here
        row["base"] = {"first_call_s": first, "median_s": harness.repeat(forward, device, 0, runs)["median_s"]}
        apply_s, first_s = timed_batch(loaded, (("first", 1.0),), forward, device)
        row["load"] = {"apply_s": apply_s, "first_forward_s": first_s}
        with_adapter = median_under((("first", 1.0),))
        row["with_adapter"] = {"median_s": with_adapter, "overhead": with_adapter / row["base"]["median_s"] - 1}
        apply_s, first_s = timed_batch(loaded, (("second", 1.0),), forward, device)
        switches = [sum(timed_batch(loaded, ((name, 1.0),), forward, device)) - with_adapter
                    for _ in range(runs) for name in ("first", "second")]
        row["switch"] = {"first_load_apply_s": apply_s, "first_load_forward_s": first_s,
                         "loaded_switch_s": sorted(switches)[len(switches) // 2], "switches_s": switches}
        apply_s, first_s = timed_batch(loaded, (), forward, device)
        row["off"] = {"apply_s": apply_s, "first_forward_s": first_s, "median_s": median_under(())}
    row["counts"] = loaded.stats()


def run_model(result: dict, bench: Bench, name: str, size, device, dtype, runs: int, levers: list[str],
              rank: int) -> None:
    height, width, frames = size
    base = wan.transformer(name, device, dtype).eval()
    result.update({"model": name, "height": height, "width": width, "num_frames": frames, "rank": rank, "rows": {}})
    kwargs = inputs(base, height, width, frames, device, dtype)
    with tempfile.TemporaryDirectory() as tmp:
        adapters = {key: save_random_adapter(base, Path(tmp) / key, rank=rank, seed=seed)
                    for key, seed in (("first", 1), ("second", 2))}
        for label in levers:
            row = result["rows"].setdefault(label, {})
            if bench.left() <= 0:
                row["skipped"] = "out of time"
                continue
            try:
                run_row(row, base, adapters, label, kwargs, device, runs)
                print(f"{name} {label}: base {row['base']['median_s']:.3f} s, with adapter "
                      f"{row['with_adapter']['median_s']:.3f} s, load {row['load']['apply_s']:.3f} s + first "
                      f"{row['load']['first_forward_s']:.3f} s, switch {row['switch']['loaded_switch_s']:.4f} s",
                      flush=True)
            except Exception as e:  # one failing lever row is recorded, the run goes on
                row["error"] = f"{type(e).__name__}: {e}"[:2000]
                print(f"{name} {label}: ERROR {row['error'][:300]}", flush=True)
            harness.free_memory(device)  # the row's model copy is gone with run_row's frame
            bench.save()
    del base
    harness.free_memory(device)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--models", default="wan2.1-t2v-1.3b,wan2.1-t2v-14b")
    parser.add_argument("--levers", default=",".join(LEVERS), help="Lever rows: eager, or KernelConfig labels.")
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--runs", type=int, default=3, help="Timed forwards per median.")
    parser.add_argument("--budget-s", type=float, default=540, help="Rows not started by then are skipped.")
    parser.add_argument("--commit", default=None, help="The commit measured (default: $BENCH_COMMIT, else git's).")
    parser.add_argument("--out", required=True)
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny stand-ins, float32: the code paths only.")
    args = parser.parse_args(argv)
    if args.smoke:
        args.device, args.models, args.runs, args.levers = "cpu", "smoke-sketch", 1, "eager"
    dtype = torch.float32 if args.smoke else torch.bfloat16
    bench = Bench("bench.lora", argv, args.out, args.budget_s, ("peft", "diffusers", "torchao"), args.commit,
                  label=wan.LABEL, device=args.device, dtype=str(dtype))
    for name in args.models.split(","):
        bench.run(name, 0, run_model, bench, name, SMOKE_SIZE if args.smoke else SIZE, args.device, dtype, args.runs,
                  args.levers.split(","), args.rank)
    rows = [(name, label, harness.fmt(r.get("base", {}).get("median_s")),
             harness.fmt(r.get("with_adapter", {}).get("median_s")),
             harness.fmt(r.get("with_adapter", {}).get("overhead"), "{:+.1%}"),
             harness.fmt(r.get("load", {}).get("apply_s")), harness.fmt(r.get("load", {}).get("first_forward_s")),
             harness.fmt(r.get("switch", {}).get("loaded_switch_s"), "{:.4f}"))
            for name, part in bench.parts.items() for label, r in part.get("rows", {}).items()]
    print(harness.markdown(["model", "levers", "base s/forward", "with adapter", "overhead", "load s",
                            "first forward s", "switch s (loaded)"], rows))
    print("\n".join(bench.problems()))
    return bench.doc


if __name__ == "__main__":
    main()
