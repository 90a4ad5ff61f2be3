"""Timing, peak-memory and time-guard helpers shared by the bench parts.

Device work is asynchronous: every timed region synchronises the device before reading the clock on both sides.
Peak memory is `torch.cuda.max_memory_allocated` (what PyTorch's allocator handed out, cuDNN/cuBLAS workspaces
included), reset at the start of each scope; on a CPU run the memory fields are None.
"""

from __future__ import annotations

import statistics
import time
import traceback

import torch

GIB = 2**30


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


class Guard:
    """Runs bench parts against a deadline: a part that would not finish in time is skipped, one that raises is
    recorded with its traceback, and the run goes on either way (one mistake never costs the whole device call)."""

    def __init__(self, budget_s: float, results: dict):
        self.deadline = time.monotonic() + budget_s
        self.results = results

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def run(self, name: str, estimate_s: float, fn, *args) -> dict:
        """`fn(record, *args)` fills `record` (this part's result dict) unless fewer than `estimate_s` seconds are
        left; an exception is recorded with its traceback instead of ending the run."""
        record = self.results.setdefault(name, {})
        if self.left() < estimate_s:
            record["skipped"] = f"time guard: {self.left():.0f} s left, part needs ~{estimate_s:.0f} s"
            return record
        start = time.monotonic()
        try:
            fn(record, *args)
        except Exception as e:  # noqa: BLE001 - recorded, and the next part runs
            record["error"] = f"{type(e).__name__}: {e}"
            record["traceback"] = traceback.format_exc(limit=8)
        finally:
            record["part_wall_s"] = time.monotonic() - start
        return record


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
