"""What every benchmark script shares: timing and peak memory, named parts run against a deadline, the result file
and where it came from, tables, the relative error, and a batch through the engine's stages (`run_stages`). A
script only says what it measures.

    bench = Bench("bench.families", argv, out, budget_s, label=LABEL)     # meta: date, GPU, commit, command, versions
    bench.run("cog", estimate_s, part_cog, ctx)        # part_cog(record, ctx) fills bench.parts["cog"]
    print(markdown(["model", "s"], rows)); print("\n".join(bench.problems()))

`Bench.run` skips a part that would not finish by the deadline and records one that raises (with its traceback);
the run goes on either way, and the file is rewritten after every part, so a killed device call keeps what it
measured. Every result file is JSON: {"meta": {...}, "parts": {...}}, plus whatever a script adds at the top.

Device work is asynchronous: every timed region synchronises the device before reading the clock on both sides.
Peak memory is `torch.cuda.max_memory_allocated` (what PyTorch's allocator handed out, cuDNN/cuBLAS workspaces
included), reset at the start of each scope; on a CPU run the memory fields are None.
"""

from __future__ import annotations

import datetime
import importlib.metadata
import json
import math
import os
import platform
import re
import shlex
import statistics
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Sequence

import torch

GIB = 2**30
REPOSITORY = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ------------------------------------------------------------------------------------------------ measuring
def is_cuda(device) -> bool:
    return torch.device(device).type == "cuda"


def sync(device) -> None:
    if is_cuda(device):
        torch.cuda.synchronize(device)


def timed(fn, device):
    """(result, seconds) of `fn()`, device-synchronised on both sides."""
    sync(device)
    start = time.perf_counter()
    out = fn()
    sync(device)
    return out, time.perf_counter() - start


def repeat(fn, device, warmup: int, runs: int) -> dict:
    """Median of `runs` synchronised calls after `warmup` untimed ones (the last result is dropped each time)."""
    for _ in range(warmup):
        timed(fn, device)
    times = [timed(fn, device)[1] for _ in range(runs)]
    return {"median_s": statistics.median(times), "times_s": times}


class Peak:
    """Peak allocated device memory over a `with` block, absolute and above the allocation at its start."""

    def __init__(self, device):
        self.device = device
        self.start_gib = self.peak_gib = self.above_start_gib = None

    def __enter__(self):
        if is_cuda(self.device):
            sync(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.start_gib = torch.cuda.memory_allocated(self.device) / GIB
        return self

    def __exit__(self, *exc):
        if is_cuda(self.device):
            sync(self.device)
            self.peak_gib = torch.cuda.max_memory_allocated(self.device) / GIB
            self.above_start_gib = self.peak_gib - self.start_gib
        return False

    def as_dict(self) -> dict:
        return {"start_gib": self.start_gib, "peak_gib": self.peak_gib, "peak_above_start_gib": self.above_start_gib}


def free_memory(device) -> None:
    import gc

    gc.collect()
    if is_cuda(device):
        torch.cuda.empty_cache()


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """|a - b| / |b| (L2, in float64): how far `a` is from the reference `b`."""
    a, b = a.detach().double().flatten(), b.detach().double().flatten()
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double().flatten(), b.detach().double().flatten()
    return float(torch.nn.functional.cosine_similarity(a, b, dim=0))


def op_transients(fn, device, top: int = 8) -> list[dict]:
    """The `top` aten ops of `fn()` with the largest transient device memory: peak during the op minus what was
    allocated before it (output plus workspace). CUDA only: shows whether a peak comes from tensors or workspaces."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_flatten

    if not is_cuda(device):
        return []
    rows: list[dict] = []

    class Probe(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            torch.cuda.reset_peak_memory_stats(device)
            before = torch.cuda.memory_allocated(device)
            out = func(*args, **(kwargs or {}))
            transient = torch.cuda.max_memory_allocated(device) - before
            outs = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
            out_bytes = sum(t.untyped_storage().nbytes() for t in outs)
            shapes = [list(a.shape) for a in tree_flatten(args)[0] if isinstance(a, torch.Tensor)][:2]
            rows.append({"op": str(func), "transient_gib": transient / GIB, "output_gib": out_bytes / GIB,
                         "input_shapes": shapes, "dtype": str(outs[0].dtype) if outs else None})
            return out

    with Probe():
        fn()
    rows.sort(key=lambda r: r["transient_gib"], reverse=True)
    return rows[:top]


# ---------------------------------------------------------------------------------------------- provenance
def git_commit() -> str:
    """The commit measured: $BENCH_COMMIT (a copy without git metadata says it so), else git's short HEAD."""
    if os.environ.get("BENCH_COMMIT"):
        return os.environ["BENCH_COMMIT"]
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5,
                              cwd=REPOSITORY).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def gpu_name() -> str:
    """The first GPU's name, from NVML (no CUDA context in this process: the stage replicas may need the memory),
    else torch's; "cpu" without a GPU."""
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            name = pynvml.nvmlDeviceGetName(pynvml.nvmlDeviceGetHandleByIndex(0))
            return name.decode() if isinstance(name, bytes) else name
        finally:
            pynvml.nvmlShutdown()
    except Exception:  # noqa: BLE001 - no NVML here: ask torch
        return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"


def card_name(gpu: str) -> str:
    """The GPU model in a device name, lower case ("NVIDIA H100 80GB HBM3" -> "h100"); the name itself otherwise."""
    found = re.search(r"\b([A-Z]\d{2,4})\b", gpu)
    return found.group(1).lower() if found else gpu.lower()


def versions(*packages: str) -> dict:
    """Python, CUDA and the versions of torch, diffusers, transformers and `packages` (None: not installed)."""
    out = {"python": platform.python_version(), "cuda": torch.version.cuda}
    for package in ("torch", "diffusers", "transformers", *packages):
        try:
            out[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            out[package] = None
    return out


def meta(script: str, argv: Sequence[str] | None, packages: Sequence[str] = (), commit: str | None = None,
         **fields) -> dict:
    """Where a result came from: the date (UTC), the exact command line (`script` run with `argv`; None: this
    process's own), the commit (`commit`, else `git_commit()`), the GPU and the library versions, then the
    script's `fields`."""
    command = shlex.join(sys.orig_argv) if argv is None else f"python -m {script} {shlex.join(argv)}".strip()
    return {"date_utc": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"), "command": command,
            "commit": commit or git_commit(), "gpu": gpu_name(), "versions": versions(*packages), **fields}


def write_json(path: str | None, doc: dict) -> None:
    """Write `doc` to `path` whole or not at all (a temporary file, then a rename); nothing for None."""
    if not path:
        return
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump(doc, f, indent=1, default=str)
    os.replace(path + ".tmp", path)


# ------------------------------------------------------------------------------------------------- the runner
class Bench:
    """One invocation of a benchmark script: its result document, named parts run against a deadline, the file
    rewritten after every part."""

    def __init__(self, script: str, argv: Sequence[str] | None, out: str | None, budget_s: float = math.inf,
                 packages: Sequence[str] = (), commit: str | None = None, **fields):
        self.started = time.monotonic()
        self.deadline = self.started + budget_s
        self.out = out
        self.meta = meta(script, argv, packages, commit, **fields)
        self.parts: dict[str, dict] = {}
        self.doc = {"meta": self.meta, "parts": self.parts}

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def run(self, name: str, estimate_s: float, fn: Callable, *args) -> dict:
        """`fn(record, *args)` fills `record` (this part's result dict) unless fewer than `estimate_s` seconds are
        left; an exception is recorded with its traceback instead of ending the run."""
        record = self.parts.setdefault(name, {})
        if self.left() < estimate_s:
            record["skipped"] = f"time guard: {self.left():.0f} s left, part needs ~{estimate_s:.0f} s"
        else:
            start = time.monotonic()
            try:
                fn(record, *args)
            except Exception as e:  # noqa: BLE001 - recorded, and the next part runs
                record["error"] = f"{type(e).__name__}: {e}"[:2000]
                record["traceback"] = traceback.format_exc(limit=8)
            finally:
                record["part_wall_s"] = time.monotonic() - start
        self.save()
        return record

    def save(self) -> None:
        self.meta["wall_s"] = time.monotonic() - self.started
        write_json(self.out, self.doc)

    def problems(self) -> list[str]:
        """One line per part that failed or was skipped, with why."""
        return [f"{key.upper()} {name}: {record[key]}" for name, record in self.parts.items()
                for key in ("error", "skipped") if isinstance(record, dict) and key in record]


# ------------------------------------------------------------------------------------------------ reporting
def fmt(value, spec: str = "{:.3f}") -> str:
    """`value` formatted, "-" for None."""
    return "-" if value is None else spec.format(value)


def markdown(header: Sequence[str], rows: Sequence[Sequence]) -> str:
    """A markdown table (as bench/RESULTS.md quotes them)."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)
