"""Sketch-stage scaling over GPUs: one guided denoising step of Wan2.1-T2V-14B through the engine's parallel
denoiser at 1 GPU and at 2 (Ulysses, CFG-parallel, optionally ring), with efficiency against 1 GPU.

    python -m bench.sketch_scaling --out $OUT/sketch_scaling.json          # GPU host, 2 GPUs, bf16, 480p/81 frames
    python -m bench.sketch_scaling --configs ulysses2,cfg2,ring2 --sizes 480p,720p --budget-s 560 --out ...
    python -m bench.sketch_scaling --smoke --out /tmp/sketch_scaling.json  # CPU, gloo, 2 ranks, tiny model, float32

A step is what the denoising loop (serve/denoise.py) asks of its denoiser once per step: the cond and uncond
predictions of one request (guidance 5) combined. What runs:

  1 GPU     the sketch stage's denoiser (serve/pipeline/segment.py SketchStage.load: a GuidedDenoiser) in this process
            on cuda:0, what a degree-1 sketch replica runs (two B=1 forwards, the engine default); then freed. Its
            first output is the reference for the checks.
  N GPUs    serve.parallel.RemoteDenoiser over a ProcessWorkerGroup of N spawned ranks (rank r on cuda:r, NCCL), each
            a ParallelWorker running ParallelDenoiser (xfuser USP inside a CFG group; CFG-parallel over groups):
            the rank code of a Serve sketch replica's worker group. The driver sends a batch's prompt embeddings to
            every rank once, then each step's latents and timesteps (SPMD, as the engine does), and gets rank 0's
            answer.

Weights: random-init with the real architecture (label "random-init weights, real architecture"): the model sources
are config-only directories (`bench.wan.write_config_only`) loaded with the engine's `weights="random-init"`, each
model built on its own device. The ranks run `TimedWorker`, a ParallelWorker (ProcessWorkerGroup's `worker_cls`)
that seeds the build, so that every rank and the 1-GPU model draw the same weights (each reports a float64 checksum
of its parameters, compared in the results), and that times `denoise` on the rank; the rest is the engine's.

Per (config, size): one warm-up step, whose output is checked against the 1-GPU output (relative L2 error), then
the median of --runs timed steps, each synchronised. Also per row: the ranks' own time inside `denoise` (inputs on
device, forward, synchronised), so that step - rank time is the per-step transport (driver -> ranks inputs and
rank 0 -> driver output, pickled through pipes); and `receive`, a step's inputs alone (latents and timesteps; the
embeddings crossed once, before the first step) reaching every rank's device.
Efficiency = t_1 / (n x t_n). The check passes when the error is within max(--tol, 3 x floor), where floor is the
1-GPU output's own change when its input latents are perturbed by half a unit in the last place of the dtype
(bf16 rounding-level noise), so that a bf16 reordering is not mistaken for a bug; a real bug (wrong shard, missing
gather) gives errors of order 1.

Budget: --budget-s (default 270) skips any (config, size) whose estimate no longer fits, with a note; a watchdog
ends the run at --hard-limit-s (default budget + 30 s), killing the ranks. The JSON is rewritten after every row,
so a killed run leaves what it measured. The markdown table is printed last.
"""

from __future__ import annotations

import time

_STARTED = time.monotonic()  # before the heavy imports: a script run's budget counts them

import argparse
import gc
import importlib
import os
import platform
import re
import statistics
import sys
import tempfile
import threading
import traceback
from pathlib import Path
from types import SimpleNamespace

if __package__ in (None, ""):  # `python bench/sketch_scaling.py` from the repository root
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from bench import wan
from bench.harness import GIB, fmt, markdown, meta, rel_err, sync, timed, write_json
from serve.handoff import PromptEmbeds
from serve.parallel import ParallelConfig, ParallelWorker

# Kept in the environment of this process and so of every spawned rank: the lent multi-GPU hosts have no NVLink
# SHARP multicast, so NCCL must not try it.
NCCL_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
SEED = 0  # weights: the same draw on every rank and for the 1-GPU model
GUIDANCE = 5.0
TEXT_TOKENS = 512

# Latent shapes [1, C, F', H', W'] (81 frames -> 21 latent frames; 8x spatial VAE) and the transformer per profile.
PROFILES = {
    "gpu": {"model": "wan2.1-t2v-14b", "dtype": torch.bfloat16, "tol": 1e-2,
            "sizes": {"480p": (1, 16, 21, 60, 104), "720p": (1, 16, 21, 90, 160)},
            # seconds per guided step on one H100 (bench/RESULTS.md: 2 x 3.41 s, 2 x 12.63 s) and to start a group
            "step_estimate_s": {"480p": 6.9, "720p": 25.5}, "start_estimate_s": 45.0, "build_estimate_s": 25.0},
    "smoke": {"model": "smoke-sketch", "dtype": torch.float32, "tol": 1e-4,
              "sizes": {"480p": (1, 16, 3, 8, 8), "720p": (1, 16, 3, 8, 12)},
              "step_estimate_s": {"480p": 0.2, "720p": 0.3}, "start_estimate_s": 30.0, "build_estimate_s": 1.0},
}
_TERM = re.compile(r"^(ulysses|ring|cfg)(\d+)$")


def parse_config(name: str) -> ParallelConfig:
    """`ulysses2`, `cfg2`, `ring2`, or terms joined by `+` (`cfg2+ulysses2`). Ring uses torch's flash kernel (it
    needs the log-sum-exp); everything else the engine's default attention backend."""
    degrees = {}
    for term in name.split("+"):
        m = _TERM.match(term)
        if not m or m.group(1) in degrees:
            raise ValueError(f"config {name!r}: terms are ulysses<N>, ring<N>, cfg<N>, each once, joined by '+'")
        degrees[m.group(1)] = int(m.group(2))
    kwargs = {f"{k}_degree": v for k, v in degrees.items()}
    if degrees.get("ring", 1) > 1:
        kwargs["attention_backend"] = "sdpa_flash"
    return ParallelConfig(**kwargs)


# --------------------------------------------------------------------------------------------------------------------
# Weights: random-init, the same on every rank
# --------------------------------------------------------------------------------------------------------------------


@torch.no_grad()
def weights_checksum(model) -> float:
    return float(sum(p.detach().double().sum() for p in model.parameters()).item())


def device_info(device: torch.device) -> dict:
    if device.type != "cuda":
        return {"device_name": "cpu"}
    props = torch.cuda.get_device_properties(device)
    return {"device_name": props.name, "device_uuid": str(getattr(props, "uuid", "")),
            "pci_bus_id": getattr(props, "pci_bus_id", None),
            "memory_gib": round(props.total_memory / GIB, 1)}


class TimedWorker(ParallelWorker):
    """A ParallelWorker (serve/parallel/worker.py) that seeds its random-init build and times itself. Loading (the
    engine's `weights="random-init"`), process groups, xfuser's wrapper, ParallelDenoiser and `denoise` are the
    engine's."""

    def __init__(self, **kwargs):
        self.denoise_s: list[float] = []
        super().__init__(**kwargs)

    def load_transformer(self, source: str, role: str, dtype: torch.dtype):
        torch.manual_seed(SEED)  # the CPU's and every CUDA device's generator: the same draw on every rank
        start = time.perf_counter()
        model = super().load_transformer(source, role, dtype)
        sync(self.ctx.device)
        self.build_s = time.perf_counter() - start
        self.checksum = weights_checksum(model)  # xfuser's wrapper holds the diffusers model's tensors
        if self.ctx.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.ctx.device)  # `stats`' peak: weights plus the steps
        return model

    def ready(self) -> dict:
        env = {k: os.environ.get(k) for k in (*NCCL_ENV, "CUDA_VISIBLE_DEVICES")}
        return {**super().ready(), **device_info(self.ctx.device), "build_s": self.build_s,
                "weights_checksum": self.checksum, "env": env}

    @torch.inference_mode()
    def denoise(self, *args):
        sync(self.ctx.device)
        start = time.perf_counter()
        out = super().denoise(*args)
        sync(self.ctx.device)
        self.denoise_s.append(time.perf_counter() - start)
        return out

    def receive(self, latents, timesteps) -> None:
        """Only a step's inputs reaching this rank's device (the driver times the call: the input transfer)."""
        device = self.ctx.device
        latents.to(device), timesteps.to(device)
        sync(device)

    def stats(self) -> dict:
        """This rank's `denoise` times since the last call (then cleared) and its peak device memory."""
        times, self.denoise_s = self.denoise_s, []
        peak = torch.cuda.max_memory_allocated(self.ctx.device) / GIB if self.ctx.device.type == "cuda" else None
        return {"denoise_s": times, "peak_gib": peak}


class _WithTimeout:
    """The worker group as RemoteDenoiser sees it, each call bounded: a hung collective fails its row, not the run."""

    def __init__(self, group, timeout_s: float):
        self.group, self.timeout_s = group, timeout_s
        self.config, self.transformer_config = group.config, group.transformer_config

    def execute(self, method: str, *args, **kwargs):
        return self.group.execute(method, *args, timeout_s=self.timeout_s, **kwargs)


# --------------------------------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------------------------------


def make_inputs(shape, text_dim: int, dtype: torch.dtype) -> dict:
    """One request's step inputs as the sketch loop passes them: float32 latents, the first timestep of Wan's
    sampler, umT5-shaped embeddings in the model dtype (encode's output dtype), guidance 5."""
    from serve.denoise import make_scheduler

    generator = torch.Generator("cpu").manual_seed(1)
    latents = torch.randn(shape, generator=generator)
    embeds = PromptEmbeds(torch.randn(1, TEXT_TOKENS, text_dim, generator=generator).to(dtype),
                          torch.randn(1, TEXT_TOKENS, text_dim, generator=generator).to(dtype))
    scheduler = make_scheduler(wan.scheduler_config(), SimpleNamespace(flow_shift=3.0, num_inference_steps=50), "cpu")
    # Half a unit in the last place of the model dtype, relative: the noise floor's input perturbation.
    ulp = torch.finfo(dtype).eps / 2
    perturbed = latents * (1 + ulp * torch.randn(shape, generator=generator))
    return {"latents": latents, "timesteps": scheduler.timesteps[:1].clone(), "embeds": [embeds],
            "guidance": [GUIDANCE], "perturbed": perturbed}


class Run:
    def __init__(self, args, started: float):
        self.args = args
        self.started = started
        self.profile = PROFILES["smoke" if args.smoke else "gpu"]
        self.dtype = self.profile["dtype"]
        self.device = torch.device("cpu" if args.smoke else "cuda:0")
        self.gpus = torch.cuda.device_count() if not args.smoke else 0
        self.rows: list[dict] = []
        self.notes: list[str] = []
        self.references: dict[str, torch.Tensor] = {}
        self.floors: dict[str, float] = {}
        self.baseline: dict[str, float] = {}
        self.group = None
        self.lock = threading.Lock()
        self.meta = meta(
            "bench.sketch_scaling", args.argv, ("xfuser", "yunchang"), args.commit,
            what="per guided denoising step (cond + uncond, guidance 5) of the sketch transformer through the "
                 "engine's parallel denoiser, against 1 GPU",
            label=wan.LABEL, smoke=args.smoke, model=self.profile["model"],
            transformer_config=dict(wan.TRANSFORMERS[self.profile["model"]]), dtype=str(self.dtype),
            guidance=GUIDANCE, text_tokens=TEXT_TOKENS, warmup=1, runs=args.runs, host=platform.node(),
            gpus_visible=self.gpus, env={k: os.environ.get(k) for k in (*NCCL_ENV, "CUDA_VISIBLE_DEVICES")},
            nccl=".".join(map(str, torch.cuda.nccl.version())) if torch.cuda.is_available() else None)
        self.report = {"meta": self.meta, "rows": self.rows, "notes": self.notes}

    def left(self) -> float:
        return self.args.budget_s - (time.monotonic() - self.started)

    def write(self) -> None:
        self.meta["wall_s"] = time.monotonic() - self.started
        write_json(self.args.out, self.report)

    def add(self, row: dict) -> None:
        with self.lock:
            self.rows.append(row)
            self.write()

    def step_estimate(self, size: str, gpus: int) -> float:
        """Seconds per step: measured at 1 GPU if available (ideal split, +30%), else the profile's figure."""
        one = self.baseline.get(size, self.profile["step_estimate_s"][size])
        return one if gpus == 1 else 1.3 * one / gpus

    # ---- 1 GPU: GuidedDenoiser in this process ----------------------------------------------------------------

    def one_gpu(self, engine, sizes: list[str], inputs: dict) -> None:
        from serve.pipeline.segment import SketchStage

        runs = self.args.runs
        need = self.profile["build_estimate_s"] + (2 + runs) * self.step_estimate(sizes[0], 1)
        if self.left() < need:
            for size in sizes:
                self.add({"config": "1gpu", "gpus": 1, "size": size, "skipped": f"budget: {self.left():.0f} s left"})
            return
        torch.manual_seed(SEED)  # the same draw as every rank's
        start = time.perf_counter()
        # What a degree-1 sketch replica loads (deployments/stage.py): GuidedDenoiser over the stage transformer, the
        # engine's default max_tokens_per_forward (cond and uncond as two B=1 forwards at 480p).
        denoiser = SketchStage.load(engine.model_copy(update={"device": str(self.device)})).denoiser
        sync(self.device)
        build_s = time.perf_counter() - start
        self.meta["one_gpu_weights_checksum"] = weights_checksum(denoiser.transformer)
        try:
            for size in sizes:
                row = {"config": "1gpu", "path": "SketchStage's GuidedDenoiser (in process)", "gpus": 1,
                       "size": size, "tokens": tokens(inputs[size]["latents"].shape), "cfg_degree": 1,
                       "ulysses_degree": 1, "ring_degree": 1, "device": str(self.device), "build_s": build_s}
                need = (2 + runs) * self.step_estimate(size, 1)
                if self.left() < need:
                    row["skipped"] = f"budget: {self.left():.0f} s left, needs ~{need:.0f} s"
                    self.add(row)
                    continue
                try:
                    self._one_gpu_size(denoiser, inputs[size], size, row)
                except Exception as e:  # noqa: BLE001 - recorded; the parallel configs still run
                    row.update(error=f"{type(e).__name__}: {e}", traceback=traceback.format_exc(limit=8))
                self.add(row)
        finally:
            del denoiser
            gc.collect()
            if self.device.type == "cuda":
                torch.cuda.empty_cache()  # rank 0 builds its own copy on this GPU next
                self.meta["driver_cuda0_allocated_after_free_gib"] = torch.cuda.memory_allocated(self.device) / GIB

    def _one_gpu_size(self, denoiser, inp: dict, size: str, row: dict) -> None:
        dev = self.device
        latents = inp["latents"].to(dev)
        timesteps = inp["timesteps"].to(dev)
        embeds = [e.to(dev) for e in inp["embeds"]]
        step = lambda x=latents: denoiser(x, timesteps, embeds, inp["guidance"])  # noqa: E731
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dev)
        with torch.inference_mode():
            out, first = timed(step, dev)
            self.references[size] = out.float().cpu()
            times = [timed(step, dev)[1] for _ in range(self.args.runs)]
            if self.args.floor:
                perturbed, _ = timed(lambda: step(inp["perturbed"].to(dev)), dev)
                self.floors[size] = rel_err(perturbed.float().cpu(), self.references[size])
        median = statistics.median(times)
        self.baseline[size] = median
        row.update(first_step_s=first, times_s=times, step_s=median, rank_denoise_s=median, transport_s=0.0,
                   speedup=1.0, efficiency=1.0, noise_floor_rel_err=self.floors.get(size),
                   peak_gib=torch.cuda.max_memory_allocated(dev) / GIB if dev.type == "cuda" else None,
                   finite=bool(torch.isfinite(self.references[size]).all()))

    # ---- N GPUs: RemoteDenoiser over a ProcessWorkerGroup of TimedWorker ranks ---------------------------------

    def parallel(self, name: str, engine, sizes: list[str], inputs: dict) -> None:
        from serve.parallel import ProcessWorkerGroup

        pconfig = parse_config(name)
        n = pconfig.world_size
        base = {"config": name, "gpus": n, "cfg_degree": pconfig.cfg_degree, "ulysses_degree": pconfig.ulysses_degree,
                "ring_degree": pconfig.ring_degree, "attention_backend": pconfig.attention_backend}
        rows = {size: {**base, "path": "parallel.RemoteDenoiser -> ProcessWorkerGroup -> ParallelDenoiser",
                       "size": size, "tokens": tokens(inputs[size]["latents"].shape)} for size in sizes}

        def skip_all(reason: str) -> None:
            for row in rows.values():
                self.add({**row, "skipped": reason})

        if not self.args.smoke and self.gpus < n:
            return skip_all(f"needs {n} GPUs, {self.gpus} visible (CUDA_VISIBLE_DEVICES="
                            f"{os.environ.get('CUDA_VISIBLE_DEVICES')})")
        start_need = self.meta.get("group_start_s_max", self.profile["start_estimate_s"])
        need = start_need + (2 + self.args.runs) * self.step_estimate(sizes[0], n)
        if self.left() < need:
            return skip_all(f"budget: {self.left():.0f} s left, needs ~{need:.0f} s")
        worker_cls = importlib.import_module("bench.sketch_scaling").TimedWorker  # by this name for the ranks
        start = time.perf_counter()
        try:
            group = ProcessWorkerGroup(
                engine, pconfig, role="sketch", num_threads=1 if self.args.smoke else None, worker_cls=worker_cls,
                start_timeout_s=max(30.0, min(240.0, self.left())), error_grace_s=10.0,
            )
        except Exception as e:  # noqa: BLE001 - e.g. NCCL init: recorded, the next config runs
            err = {"error": f"group start: {type(e).__name__}: {e}"[:2000], "traceback": traceback.format_exc(limit=8)}
            for row in rows.values():
                self.add({**row, **err})
            return
        self.group = group
        try:
            start_s = time.perf_counter() - start
            self.meta["group_start_s_max"] = max(self.meta.get("group_start_s_max", 0.0), start_s)
            ranks = [{k: i.get(k) for k in ("rank", "pid", "device", "device_name", "device_uuid", "pci_bus_id",
                                            "backend", "cfg_rank", "sp_rank", "attention_backend", "build_s",
                                            "weights_checksum", "env")} for i in group.info]
            checksums = [r["weights_checksum"] for r in ranks]
            uuids = [r["device_uuid"] for r in ranks]
            same_weights = all(c == checksums[0] for c in checksums)
            one = self.meta.get("one_gpu_weights_checksum")
            for size in sizes:
                row = rows[size]
                row.update(group_start_s=start_s, ranks=ranks, weights_same_on_ranks=same_weights,
                           ranks_on_distinct_gpus=len(set(uuids)) == n if all(uuids) else None,
                           weights_same_as_1gpu=None if one is None else all(c == one for c in checksums))
                need = (3 + self.args.runs) * self.step_estimate(size, n)
                if self.left() < need:
                    row["skipped"] = f"budget: {self.left():.0f} s left, needs ~{need:.0f} s"
                else:
                    try:
                        self._parallel_size(group, inputs[size], size, n, row)
                    except Exception as e:  # noqa: BLE001 - recorded; a broken group is shut down by the group
                        row.update(error=f"{type(e).__name__}: {e}"[:2000], traceback=traceback.format_exc(limit=8))
                self.add(row)
        finally:
            self.group = None
            group.shutdown()

    def _parallel_size(self, group, inp: dict, size: str, n: int, row: dict) -> None:
        from serve.parallel import RemoteDenoiser

        timeout = max(60.0, 5 * self.step_estimate(size, n))
        bounded = _WithTimeout(group, timeout)
        remote = RemoteDenoiser(bounded, self.dtype)
        latents, timesteps, embeds, guidance = inp["latents"], inp["timesteps"], inp["embeds"], inp["guidance"]
        step = lambda: remote(latents, timesteps, embeds, guidance)  # noqa: E731  (driver on the CPU: no sync needed)
        with torch.inference_mode():
            out, first = timed(step, "cpu")
            bounded.execute("stats")  # drop the warm-up's rank time
            times = [timed(step, "cpu")[1] for _ in range(self.args.runs)]
        stats = bounded.execute("stats")
        # A step's inputs alone, exactly what RemoteDenoiser sends per step (latents in the model dtype), to every
        # rank's device.
        receive = [timed(lambda: bounded.execute("receive", latents.to(self.dtype), timesteps), "cpu")[1]
                   for _ in range(3)]
        median = statistics.median(times)
        rank_s = statistics.median(stats["denoise_s"])
        out = out.float()
        row.update(first_step_s=first, times_s=times, step_s=median, rank0_denoise_times_s=stats["denoise_s"],
                   rank_denoise_s=rank_s, transport_s=median - rank_s, input_transfer_s=statistics.median(receive),
                   input_transfer_times_s=receive, input_bytes=payload_bytes(latents.to(self.dtype), timesteps),
                   prompt_bytes_once=payload_bytes(embeds),
                   output_bytes=out.to(self.dtype).numel() * out.to(self.dtype).element_size(),
                   rank0_peak_gib=stats["peak_gib"], finite=bool(torch.isfinite(out).all()))
        if size in self.baseline:
            t1 = self.baseline[size]
            row.update(speedup=t1 / median, efficiency=t1 / (n * median),
                       efficiency_rank_side=t1 / (n * rank_s))
        if size in self.references:
            err = rel_err(out, self.references[size])
            floor = self.floors.get(size)
            tol = max(self.args.tol, 3 * floor) if floor is not None else self.args.tol
            row.update(rel_err_vs_1gpu=err, noise_floor_rel_err=floor, tol=tol, matched=err <= tol)

    # ---- watchdog ----------------------------------------------------------------------------------------------

    def watchdog(self) -> threading.Timer:
        def expire():
            with self.lock:
                self.meta["aborted"] = f"hard limit {self.args.hard_limit_s:.0f} s reached; ranks killed"
            group = self.group
            if group is not None:
                try:
                    group.shutdown(timeout_s=5.0)
                except Exception:  # noqa: BLE001 - exiting anyway
                    pass
            with self.lock:
                self.write()
            print(table(self.report), flush=True)
            os._exit(3)

        timer = threading.Timer(max(1.0, self.args.hard_limit_s - (time.monotonic() - self.started)), expire)
        timer.daemon = True
        timer.start()
        return timer


def tokens(shape) -> int:
    from serve.parallel import latent_tokens

    return latent_tokens(shape, wan.TRANSFORMERS["wan2.1-t2v-14b"]["patch_size"])


def payload_bytes(*values) -> int:
    total = 0
    for v in values:
        if isinstance(v, torch.Tensor):
            total += v.numel() * v.element_size()
        elif isinstance(v, PromptEmbeds):
            total += payload_bytes(v.prompt, v.negative)
        elif isinstance(v, (list, tuple)):
            total += payload_bytes(*v)
    return total


def table(report: dict) -> str:
    m = report["meta"]
    device = "cpu (smoke)" if m["smoke"] else m["gpu"]
    rows = []
    for r in report["rows"]:
        head = [r["config"], r["gpus"], r["size"], r.get("tokens", "")]
        if "step_s" not in r:
            why = r.get("skipped") or (r.get("error") or "")[:160]
            rows.append(head + [f"{'skipped' if 'skipped' in r else 'ERROR'}: {why}"] + [""] * 7)
            continue
        err = r.get("rel_err_vs_1gpu")
        floor = r.get("noise_floor_rel_err")
        err_s = (f"{err:.2e}" if err is not None else "ref") + (f" ({floor:.1e})" if floor is not None else "")
        ok = {True: "yes", False: "**NO**", None: ""}[r.get("matched", True if r["gpus"] == 1 else None)]
        rows.append(head + [f"{r['step_s']:.3f}", f"{r['rank_denoise_s']:.3f}", f"{r['transport_s']:.3f}",
                            fmt(r.get("input_transfer_s"), "{:.3f}"), fmt(r.get("speedup"), "{:.2f}x"),
                            fmt(r.get("efficiency"), "{:.1%}"), err_s, ok])
    lines = [
        f"{m['model']} ({m['label']}), {m['dtype']}, guidance {m['guidance']}, one guided step (cond + uncond); "
        f"median of {m['runs']} after {m['warmup']} warm-up; {device}",
        markdown(["config", "GPUs", "size", "tokens", "step s", "rank s", "transport s", "input xfer s", "speedup",
                  "efficiency", "rel err vs 1 GPU (floor)", "ok"], rows),
    ]
    lines += [f"note: {note}" for note in report["notes"]]
    if m.get("aborted"):
        lines.append(f"ABORTED: {m['aborted']}")
    return "\n".join(lines)


def main(argv=None, started: float | None = None) -> dict:
    """Run the bench; the report (also written to --out). `started`: the monotonic time the budget counts from."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="CPU, gloo, 2 spawned ranks, tiny model, float32")
    ap.add_argument("--configs", default="ulysses2,cfg2",
                    help="parallel configs after the 1-GPU baseline: ulysses<N>, cfg2, ring<N>, or terms joined by "
                         "'+' (cfg2+ulysses2); e.g. ulysses2,cfg2,ring2")
    ap.add_argument("--sizes", default="480p", help="480p (832x480, 81 frames) and/or 720p (1280x720, 81 frames)")
    ap.add_argument("--runs", type=int, default=3, help="timed steps per row (after 1 warm-up)")
    ap.add_argument("--no-floor", dest="floor", action="store_false",
                    help="skip the 1-GPU perturbed-input step that measures the dtype's noise floor")
    ap.add_argument("--tol", type=float, default=None, help="rel. error bound (default 1e-2 bf16, 1e-4 smoke)")
    ap.add_argument("--budget-s", type=float, default=270.0, help="skip rows whose estimate no longer fits")
    ap.add_argument("--hard-limit-s", type=float, default=None,
                    help="watchdog: write, kill the ranks and exit (default budget + 30 s)")
    ap.add_argument("--commit", default=None, help="the commit measured (default: $BENCH_COMMIT, else git's)")
    ap.add_argument("--out", default=os.path.join(os.environ.get("OUT", "."), "sketch_scaling.json"))
    args = ap.parse_args(argv)
    args.argv = argv
    profile = PROFILES["smoke" if args.smoke else "gpu"]
    args.tol = profile["tol"] if args.tol is None else args.tol
    args.hard_limit_s = args.budget_s + 30.0 if args.hard_limit_s is None else args.hard_limit_s
    sizes = [s for s in args.sizes.split(",") if s]
    configs = [c for c in args.configs.split(",") if c]
    for s in sizes:
        if s not in profile["sizes"]:
            ap.error(f"--sizes: {s!r} unknown; choose from {', '.join(profile['sizes'])}")
    for c in configs:
        try:
            parse_config(c)
        except ValueError as e:
            ap.error(f"--configs: {e}")
    if not args.smoke and not torch.cuda.is_available():
        ap.error("no CUDA device: run with --smoke on a CPU")
    os.environ.update(NCCL_ENV)  # before any rank is spawned: they inherit this environment

    run = Run(args, time.monotonic() if started is None else started)
    timer = run.watchdog()
    try:
        text_dim = wan.TRANSFORMERS[profile["model"]]["text_dim"]
        inputs = {s: make_inputs(profile["sizes"][s], text_dim, run.dtype) for s in sizes}
        run.meta["sizes"] = {s: {"latents": list(profile["sizes"][s]), "tokens": tokens(profile["sizes"][s])}
                               for s in sizes}
        with tempfile.TemporaryDirectory(prefix="srd-scaling-") as tmp:
            from serve.config import EngineConfig

            pair = wan.write_config_only(wan.SMOKE if args.smoke else wan.REAL_480P, tmp)  # configs only, no weights
            engine = EngineConfig(sketch=pair.sketch, render=pair.render, device="cpu" if args.smoke else "cuda",
                                  speed="exact", dtype="float32" if args.smoke else "bfloat16",
                                  weights="random-init")  # eager: parallel ranks against one GPU
            run.one_gpu(engine, sizes, inputs)
            for name in configs:
                run.parallel(name, engine, sizes, inputs)
        if any(r.get("matched") is False for r in run.rows):
            run.notes.append("a parallel output differs from the 1-GPU output beyond the tolerance: its timing is "
                             "not from a correct run")
        if any(r.get("weights_same_as_1gpu") is False for r in run.rows):
            run.notes.append("rank weights differ from the 1-GPU model's (seeded init not reproduced across devices)")
    finally:
        timer.cancel()
        with run.lock:
            run.write()
    print(f"wrote {args.out}")
    print(table(run.report))
    return run.report


if __name__ == "__main__":
    main(started=_STARTED)
