"""One-GPU serving benchmark: the Serve app itself, with random-init weights of the
real architectures, its four stage replicas sharing one GPU as the placement planner lays them out.

    python -m bench.serve_throughput --out $OUT/serve_throughput.json     # one H100, ~4.5 min at the defaults
    python -m bench.serve_throughput --smoke --out /tmp/serve.json         # CPU, tiny configs, well under 2 min

What runs: local Ray (one GPU), the app built by `deployments.app.build_app` from an AppConfig whose encoder,
sketcher, renderer and decoder replicas each reserve the share of the one GPU that `serve.placement.plan` gives them
at the run's size, steps and switch (a quarter each; the planner's predicted videos/hour is reported beside the
measured); the engine loads config-only model directories (bench/wan.py `write_config_only`) with
`weights="random-init"`.
Sketch and render batches hold one request (`max_batch_size` 1): at 480p/81 frames a batch of two is no faster
than two calls (bench/RESULTS.md "Run 1" (a)), so batching buys nothing there. Requests go through the app's
deployment handle (`generate`: submit, run, return the result), timed on the client.

Parts, in this order, each guarded by the `--budget-s` deadline (a part that would not finish in time is skipped
with a note, one that fails is recorded with its traceback, and the run goes on):
  warmup   one request at the run's size, N=2 with step:1, so that every stage has run once (not reported)
  single   (d) one SR request alone: latency against the stages' own recorded compute times; the rest is hand-off
           (between stages: object store, scheduling) and orchestration (admission, returning the result)
  sr       (c) M concurrent SR requests (`--sr-switch`, default step:1 of N=6, K/N ~ 0.17): makespan, videos/hour;
           (d) per request, with the waits for a stage busy with another job (queueing) told apart
  all14b   (c) M more requests like those, with step:N (all-14B: the renderer runs no steps), on the same app
  metrics  after the jobs, Ray's Prometheus endpoint: which srd series it carries, and NVML's GPU gauges
  mp4      how long the decode stage's mp4 encoding takes for noise frames of the run's size (random-init outputs
           are noise, which costs an encoder far more than real video does; where PyAV is missing, as on the GPU
           image, serve.video encodes MPEG-4 through OpenCV: meta.mp4_encoder says which)
Every request has its own prompt and seed, so the encoder's embedding cache never answers.

Sketch and render replicas time-slice the one GPU: a render running beside a sketch slows both, which shows in the
stage times of the concurrent runs (compared with the single request's), not as overhead. GPU memory and utilisation
come from the app's own telemetry (StageRunner.stats, nvidia-ml-py), sampled every second (not during the lone
request, so that no stats call can delay it).
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict

from bench import wan
from bench.harness import Bench, card_name, fmt, gpu_name, markdown
from serve.speed import PROFILES

APP = "srd-bench"
STAGES = ("encode", "sketch", "render", "decode")
# The stretches of a request's latency outside the stages' compute, in order: gap i ends where STAGES[i] starts.
GAPS = ("admission", "encode->sketch", "sketch->render", "render->decode", "completion")
HANDOFF_GAPS = ("encode->sketch", "sketch->render", "render->decode")
PROMPT = "A red fox runs through fresh snow at dawn, cinematic, shallow depth of field"
NEGATIVE = "blurry, low quality, distorted"
QUIET = {"log_level": "WARNING", "enable_access_log": False}


# --------------------------------------------------------------------------------------------------- the app
def one_gpu_placement(args):
    """The placement planner's layout of one GPU (serve.placement.plan) at the run's size, steps and switch, on the
    card this run finds (the H100 figures for a card the cost table lacks): the GPU shares the app gets, and the
    videos/hour the planner's cost model predicts for them, which the measured runs are held against."""
    from serve.placement import CARDS, plan

    card = CARDS.get(card_name(gpu_name()), CARDS["h100"])
    return plan(1, card, args.height, args.width, args.frames, args.steps, _switch_k(args.sr_switch, args.steps))


def app_config(args, models, placement):
    """The app on one GPU: the four stages share it as the planner places them and the machine's CPUs (a quarter
    each, as deployments.app.local_config does); sketch and render take one request per batch."""
    from deployments.config import AppConfig

    cpus = len(os.sched_getaffinity(0)) / 4
    one = {"max_batch_size": 1, "batch_wait_timeout_s": 0.0}

    def resources(role: str) -> dict:
        return {"num_cpus": cpus, "num_gpus": placement.gpu_share[role]}

    return AppConfig.model_validate({
        "engine": {"preset": "wan2.1-t2v", "sketch": models.sketch, "render": models.render, "device": args.device,
                   "speed": args.speed, "dtype": args.dtype, "weights": "random-init"},
        "encoder": {"resources": resources("encoder"), "batching": {"max_batch_size": 4, "batch_wait_timeout_s": 0.0}},
        "sketcher": {"resources": resources("sketcher"), "batching": one},
        "renderer": {"resources": resources("renderer"), "batching": one},
        "decoder": {"resources": resources("decoder"), "batching": one},
    })


def start_app(rec: dict, args, models, placement, timeout_s: float):
    """Local Ray with one GPU and exactly the CPUs the stages reserve, then the app; a TimeoutError (naming each
    deployment's state) if it is not running within `timeout_s`, rather than waiting for ever."""
    import ray
    from ray import serve

    from deployments.app import build_app

    config = app_config(args, models, placement)
    rec["app_config"] = config.model_dump(mode="json")
    t0 = time.monotonic()
    ray.init(num_cpus=len(os.sched_getaffinity(0)), num_gpus=1, include_dashboard=False,
             object_store_memory=int(args.object_store_gib * 2**30), logging_level=logging.WARNING)
    rec["ray_start_s"] = time.monotonic() - t0
    serve.start(proxy_location="Disabled", logging_config=QUIET)
    box: dict = {}

    def deploy() -> None:
        try:
            box["handle"] = serve.run(build_app(config), name=APP, route_prefix=None, logging_config=QUIET)
        except BaseException as e:  # noqa: BLE001 - raised again below, in the main thread
            box["error"] = e

    thread = threading.Thread(target=deploy, daemon=True, name="deploy")
    thread.start()
    thread.join(timeout=max(timeout_s - (time.monotonic() - t0), 1.0))
    if thread.is_alive():
        try:
            deployments = serve.status().applications[APP].deployments
            states = "; ".join(f"{n}: {d.status} {d.message}".strip() for n, d in deployments.items())
        except Exception as e:  # noqa: BLE001
            states = f"status unavailable ({type(e).__name__}: {e})"
        raise TimeoutError(f"the app was not running {timeout_s:.0f} s after Ray started: {states}")
    if "error" in box:
        raise box["error"]
    rec["app_start_s"] = time.monotonic() - t0  # Ray, Serve and every replica's random-init models
    return box["handle"]


@functools.cache
def stage_handle(stage: str):
    from ray import serve

    return serve.get_deployment_handle(stage, APP)


def stage_stats(stage: str) -> dict:
    return stage_handle(stage).stats.remote().result(timeout_s=30)


def replica_report() -> dict:
    """Per stage replica: its GPU ids (all four share one), NVML's view of that GPU now, and how many batches ran."""
    report = {}
    for stage in ("Encoder", "Sketcher", "Renderer", "Decoder"):
        try:
            stats = stage_stats(stage)
            report[stage] = {"pid": stats["pid"], "gpu_ids": stats["gpu_ids"], "gpus": stats["gpus"],
                             "batches": len(stats["batches"])}
        except Exception as e:  # noqa: BLE001 - a report, not a measurement
            report[stage] = {"error": f"{type(e).__name__}: {e}"}
    return report


class Telemetry:
    """Samples the GPU through a stage replica's stats (NVML: the whole device, so every replica's memory) every
    `period_s` in a thread; `part(name)` attributes the samples that follow to that part. It asks the encoder, idle
    most of the time, so that the sketcher's event loop (which answers its denoising steps' callbacks) is left alone;
    `part(name, sample=False)` pauses it (the lone request of (d), which a stats call on the encoder could delay).
    """

    def __init__(self, period_s: float = 1.0):
        self.period_s = period_s
        self.samples: dict[str, list[dict]] = {}
        self.error: str | None = None
        self._part = "idle"
        self._sampling = True
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> Telemetry:
        self._thread.start()
        return self

    def part(self, name: str, sample: bool = True) -> None:
        self._part, self._sampling = name, sample

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=10)

    def _run(self) -> None:
        while not self._stop.wait(self.period_s):
            if not self._sampling:
                continue
            try:
                gpus = stage_stats("Encoder")["gpus"]
            except Exception as e:  # noqa: BLE001 - telemetry is optional; the benchmark goes on without it
                self.error = f"{type(e).__name__}: {e}"
                return
            if not gpus:
                self.error = "no GPU telemetry (no NVML device: a CPU run)"
                return
            self.samples.setdefault(self._part, []).append({"t": time.time(), **gpus[0]})

    def summary(self, part: str) -> dict:
        samples = self.samples.get(part, [])
        if not samples:
            return {"samples": 0, "note": self.error or "not sampled"}
        util = [s["utilization_pct"] for s in samples]
        return {"samples": len(samples), "peak_memory_used_gib": max(s["memory_used_mib"] for s in samples) / 1024,
                "memory_total_gib": samples[0]["memory_total_mib"] / 1024,
                "utilization_mean_pct": statistics.mean(util),
                "utilization_max_pct": max(util)}


# ------------------------------------------------------------------------------------------------ requests
def request(args, index: int, steps: int, switch: str, frames: int | None = None) -> dict:
    """A distinct prompt per request (so the encoder's embedding cache never answers) and its own seed."""
    return {"prompt": f"{PROMPT}, take {index}", "negative_prompt": NEGATIVE, "height": args.height,
            "width": args.width, "num_frames": frames or args.frames, "num_inference_steps": steps,
            "switch": switch, "seed": index}


def run_requests(handle, requests: list[dict], timeout_s: float) -> list[dict]:
    """All requests at once, one client thread each (`generate`: the call returns when the job is done); per
    request the client's submit and done times and the final job record."""

    def one(body: dict) -> dict:
        t_submit = time.time()
        result = handle.generate.remote(body).result(timeout_s=timeout_s)
        t_done = time.time()
        job = result.job.model_dump(mode="json")
        if job["status"] != "completed":
            raise RuntimeError(f"job {job['id']} {job['status']}: {job['error']}")
        return {"t_submit": t_submit, "t_done": t_done, "job": job,
                "mp4_mb": len(result.video) / 1e6 if result.video else None}

    with ThreadPoolExecutor(max_workers=len(requests)) as pool:
        return list(pool.map(one, requests))


def _covered(interval: tuple[float, float], spans: list[tuple[float, float]]) -> float:
    """Seconds of `interval` covered by the union of `spans`."""
    a, b = interval
    total, cursor = 0.0, a
    for s, e in sorted(spans):
        s, e = max(s, cursor), min(e, b)
        if e > s:
            total += e - s
            cursor = e
    return total


def breakdown(done: dict, others: list[dict]) -> dict:
    """(d) for one request: latency = stage compute + the gaps between them. A gap's part during which the next
    stage was computing another job of the same run is queueing (waiting for a busy stage: throughput-bound, not
    overhead); the rest of the gaps is hand-off and orchestration overhead."""
    spans = done["job"]["stages"]
    bounds = [done["t_submit"]] + [t for s in STAGES for t in (spans[s]["start"], spans[s]["end"])] + [done["t_done"]]
    stage_s = {s: spans[s]["end"] - spans[s]["start"] for s in STAGES}
    gaps, queued = {}, {}
    for i, name in enumerate(GAPS):
        a, b = bounds[2 * i], bounds[2 * i + 1]
        gaps[name] = b - a
        busy = [] if i == len(STAGES) else [
            (o["job"]["stages"][STAGES[i]]["start"], o["job"]["stages"][STAGES[i]]["end"]) for o in others]
        queued[name] = _covered((a, b), busy)
    latency = done["t_done"] - done["t_submit"]
    compute = sum(stage_s.values())
    queueing = sum(queued.values())
    overhead = latency - compute - queueing
    handoff = sum(gaps[g] - queued[g] for g in HANDOFF_GAPS)
    return {
        "job": done["job"]["id"], "latency_s": latency, "stage_s": stage_s, "stage_sum_s": compute,
        "gaps_s": gaps, "queued_s": queued, "queueing_s": queueing, "overhead_s": overhead,
        "overhead_pct": 100 * overhead / latency, "handoff_s": handoff, "handoff_pct": 100 * handoff / latency,
        "queueing_pct": 100 * queueing / latency, "overhead_plus_queueing_pct": 100 * (overhead + queueing) / latency,
        "switch_step": done["job"]["switch_step"], "mp4_mb": done["mp4_mb"],
        "batch_sizes": {s: spans[s]["batch_size"] for s in STAGES},
    }


def summarise(runs: list[dict], makespan: float) -> dict:
    rows = [breakdown(r, [o for o in runs if o is not r]) for r in runs]
    med = {key: statistics.median(row[key] for row in rows)
           for key in ("latency_s", "stage_sum_s", "queueing_s", "overhead_s", "overhead_pct", "handoff_s",
                       "handoff_pct", "queueing_pct", "overhead_plus_queueing_pct")}
    stage_mean = {s: statistics.mean(row["stage_s"][s] for row in rows) for s in STAGES}
    gpu_spans = [(r["job"]["stages"][s]["start"], r["job"]["stages"][s]["end"]) for r in runs for s in STAGES]
    start = min(r["t_submit"] for r in runs)
    return {
        "requests": rows, "median": med, "stage_mean_s": stage_mean, "makespan_s": makespan,
        "videos_per_hour": len(runs) / makespan * 3600,
        # share of the makespan during which at least one stage was computing (all stages use the one GPU)
        "stage_busy_fraction": _covered((start, start + makespan), gpu_spans) / makespan,
    }


# ----------------------------------------------------------------------------------------------------- parts
class Context:
    def __init__(self, args, telemetry: Telemetry, bench: Bench):
        self.args, self.telemetry, self.bench = args, telemetry, bench
        self.results = bench.parts
        self.handle = None  # the app's ingress handle, once it runs
        self.models_dir = tempfile.TemporaryDirectory(prefix="srd-bench-models-")
        self.next_index = 0
        self.per_step: dict[str, float] = {}  # stage seconds (per step for sketch, render) of a lone request

    def requests(self, count: int, steps: int, switch: str, frames: int | None = None) -> list[dict]:
        first, self.next_index = self.next_index, self.next_index + count
        return [request(self.args, i, steps, switch, frames) for i in range(first, first + count)]

    def timeout_s(self) -> float:
        return max(self.bench.left(), 0) + 60

    def learn(self, row: dict, n: int) -> None:
        """Per-step and per-request stage costs from one request that ran alone (its breakdown row)."""
        k, st = row["switch_step"], row["stage_s"]
        self.per_step = {"encode": st["encode"], "decode": st["decode"], "sketch": st["sketch"] / max(k, 1),
                         "render": st["render"] / (n - k) if n > k else self.per_step.get("render", 0.0)}

    def estimate(self, k: int, n: int) -> float:
        """Seconds for one request alone with K sketch and N-K render steps, from the last lone request's stages."""
        p = self.per_step
        return p["encode"] + k * p["sketch"] + (n - k) * p["render"] + p["decode"] if p else 0.0


def _switch_k(switch: str, n: int) -> int:
    kind, _, value = switch.partition(":")
    if kind == "step":
        return min(int(value), n)
    if kind == "ratio":
        return round(float(value) * n)
    return n  # adaptive/boundary: unknown in advance, estimate as all-sketch


def part_warmup(rec: dict, ctx: Context) -> None:
    ctx.telemetry.part("warmup")
    (done,) = run_requests(ctx.handle, ctx.requests(1, 2, "step:1"), ctx.timeout_s())
    row = breakdown(done, [])
    ctx.learn(row, 2)
    rec.update({"latency_s": row["latency_s"], "stage_s": row["stage_s"],
                "note": "N=2, step:1, at the run's size; first-run costs, not reported"})


def part_single(rec: dict, ctx: Context) -> None:
    ctx.telemetry.part("single", sample=False)
    n = ctx.args.steps
    (done,) = run_requests(ctx.handle, ctx.requests(1, n, ctx.args.sr_switch), ctx.timeout_s())
    row = breakdown(done, [])
    ctx.learn(row, n)  # warm costs: the estimates of the parts below
    rec.update(row)
    rec.update({"N": n, "switch": ctx.args.sr_switch, "gpu": ctx.telemetry.summary("single")})


def _concurrent(rec: dict, ctx: Context, name: str, switch: str) -> None:
    ctx.telemetry.part(name)
    n, m = ctx.args.steps, ctx.args.requests
    runs = run_requests(ctx.handle, ctx.requests(m, n, switch), ctx.timeout_s())
    makespan = max(r["t_done"] for r in runs) - min(r["t_submit"] for r in runs)
    rec.update({"M": m, "N": n, "switch": switch, **summarise(runs, makespan), "gpu": ctx.telemetry.summary(name)})
    one = ctx.estimate(_switch_k(switch, n), n)
    # the same requests one after another, each at the lone request's stage times: what concurrency is up against
    rec["serial_estimate_s"] = m * one
    rec["serial_estimate_videos_per_hour"] = 3600 / one if one else None
    single = ctx.results.get("single", {}).get("stage_s")
    if single and switch == ctx.results["single"]["switch"]:
        # stage times beside other jobs over those of the lone request: the GPU's time-slicing shows here
        rec["stage_slowdown_vs_single"] = {s: rec["stage_mean_s"][s] / single[s] if single[s] else None
                                           for s in STAGES}


def part_sr(rec: dict, ctx: Context) -> None:
    _concurrent(rec, ctx, "sr", ctx.args.sr_switch)


def part_all14b(rec: dict, ctx: Context) -> None:
    _concurrent(rec, ctx, "all14b", f"step:{ctx.args.steps}")


def part_mp4(rec: dict, ctx: Context) -> None:
    """The decode stage encodes each video to mp4 on the CPU; random-init outputs are noise, the worst case for an
    encoder. This times `serve.video.encode_mp4` on uniform noise frames of the run's size in this process (the
    replicas use the same host CPUs and the same encoder)."""
    import numpy as np

    from serve.video import encode_mp4, mp4_encoder

    frames = np.random.default_rng(0).integers(0, 256, (ctx.args.frames, ctx.args.height, ctx.args.width, 3),
                                               dtype=np.uint8)
    t0 = time.perf_counter()
    data = encode_mp4(frames, 16)
    rec.update({"encoder": mp4_encoder(), "noise_encode_s": time.perf_counter() - t0, "noise_mp4_mb": len(data) / 1e6})


def part_metrics(rec: dict, ctx: Context) -> None:
    """After the jobs: Ray's Prometheus endpoint (this node's metrics export port), as an operator's Prometheus
    scrapes it. Records which of deployments/metrics.py's series are there, and the NVML gauges' samples (absent on
    a CPU run). Ray's exporter publishes every few seconds, so it scrapes until every series it expects is there
    (bounded)."""
    import urllib.request

    import ray

    from deployments.metrics import METRICS, PROMETHEUS_PREFIX

    expected = {name for name in METRICS if ctx.args.device == "cuda" or not name.startswith("srd_gpu_")}
    port = ray.nodes()[0]["MetricsExportPort"]
    deadline, found, body = time.monotonic() + 30, set(), ""
    while time.monotonic() < deadline:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
            body = response.read().decode()
        found = {name for name in METRICS if f"\n{PROMETHEUS_PREFIX}{name}" in body}
        if found >= expected:
            break
        time.sleep(2.0)
    rec.update({"series_found": sorted(found), "series_missing": sorted(set(METRICS) - found),
                "gpu_samples": [line for line in body.splitlines() if line.startswith(PROMETHEUS_PREFIX + "srd_gpu_")]})


PARTS = {"warmup": part_warmup, "single": part_single, "sr": part_sr, "all14b": part_all14b, "metrics": part_metrics,
         "mp4": part_mp4}


def estimate_s(name: str, ctx: Context) -> float:
    n, m = ctx.args.steps, ctx.args.requests
    k = _switch_k(ctx.args.sr_switch, n)
    return {"warmup": 0.0, "single": ctx.estimate(k, n), "sr": m * ctx.estimate(k, n),
            "all14b": m * ctx.estimate(n, n), "mp4": 2 * ctx.per_step.get("decode", 0.0), "metrics": 30.0}[name]


# ---------------------------------------------------------------------------------------------------- report
def table(results: dict) -> str:
    lines = []
    sr, full, single = results.get("sr", {}), results.get("all14b", {}), results.get("single", {})
    if "makespan_s" in sr or "makespan_s" in full:
        ratio = (sr["videos_per_hour"] / full["videos_per_hour"]
                 if "videos_per_hour" in sr and "videos_per_hour" in full else None)
        rows = [[label, r["M"], r["N"], r["switch"], f"{r['makespan_s']:.1f} s", f"{r['videos_per_hour']:.1f}",
                 fmt(ratio, "{:.2f}x") if label == "SR" else "1",
                 fmt(r.get("serial_estimate_videos_per_hour"), "{:.1f}/h"), f"{r['stage_busy_fraction'] * 100:.0f}%",
                 fmt(r.get("gpu", {}).get("peak_memory_used_gib"), "{:.1f} GiB"),
                 fmt(r.get("gpu", {}).get("utilization_mean_pct"), "{:.0f}%")]
                for label, r in (("SR", sr), ("all-14B", full)) if "makespan_s" in r]
        lines += ["(c) one GPU, all four stages on it; M requests submitted at once",
                  markdown(["run", "M", "N", "switch", "makespan", "videos/hour", "SR / all-14B", "serial estimate",
                            "stage busy", "GPU peak mem", "GPU util mean"], rows)]
        slow = sr.get("stage_slowdown_vs_single")
        if slow:
            lines.append("SR stage times beside other jobs / alone (GPU time-slicing): " + ", ".join(
                f"{k} {fmt(v, '{:.2f}x')}" for k, v in slow.items()))
        lines.append("")
    requests = [("single (alone)", single)] if "stage_s" in single else []
    for label, r in (("SR", sr), ("all-14B", full)):
        requests += [(f"{label} #{i + 1} of {r['M']}", row) for i, row in enumerate(r.get("requests", []))]
    if requests:
        rows = [[label, f"{row['latency_s']:.2f} s", *(f"{row['stage_s'][s]:.2f}" for s in STAGES),
                 *_overheads(row)] for label, row in requests]
        rows += [[f"{label} median", f"{r['median']['latency_s']:.2f} s", "", "", "", "", *_overheads(r["median"])]
                 for label, r in (("SR", sr), ("all-14B", full)) if "median" in r]
        lines += ["(d) per request: latency = stage compute + queueing (waiting for a stage busy with another job) + "
                  "overhead (hand-off between stages, admission, returning the result)",
                  markdown(["request", "latency", *STAGES, "stages", "queueing", "hand-off", "overhead (all)",
                            "overhead %", "+ queueing %"], rows)]
    if "overhead_pct" in single:
        gaps = ", ".join(f"{k} {v * 1e3:.0f} ms" for k, v in single["gaps_s"].items())
        verdict = "met" if single["overhead_pct"] <= 1.0 else "NOT met"
        lines.append(f"target hand-off + queueing <= 1% of latency (single request): {single['overhead_pct']:.2f}% "
                     f"({verdict}); hand-off alone {single['handoff_pct']:.2f}%; gaps: {gaps}")
    placement = results.get("setup", {}).get("placement")
    if placement and "videos_per_hour" in sr:
        predicted = placement["predicted_videos_per_hour"]
        lines += ["", "placement: " + "; ".join(placement["lines"][:2]),
                  f"SR videos/hour: measured {sr['videos_per_hour']:.1f}, the planner's cost model "
                  f"{predicted:.1f} (measured / predicted {sr['videos_per_hour'] / predicted:.2f})"]
    metrics = results.get("metrics", {})
    if "series_found" in metrics:
        lines.append(f"metrics endpoint: {len(metrics['series_found'])} of "
                     f"{len(metrics['series_found']) + len(metrics['series_missing'])} srd series"
                     + (f", missing {', '.join(metrics['series_missing'])}" if metrics["series_missing"] else "")
                     + f"; NVML gauge samples: {len(metrics['gpu_samples'])}")
        lines += metrics["gpu_samples"][:6]
    mp4 = results.get("mp4", {})
    if "noise_encode_s" in mp4:
        lines.append(f"mp4 ({mp4['encoder']}) of noise frames in the decode stage: {mp4['noise_encode_s']:.2f} s, "
                     f"{mp4['noise_mp4_mb']:.1f} MB")
    return "\n".join(lines)


def _overheads(row: dict) -> list[str]:
    """The (d) columns after the stages: their sum, queueing, hand-off, all overhead, its share of the latency."""
    return [f"{row['stage_sum_s']:.2f} s", f"{row['queueing_s']:.2f} s", f"{row['handoff_s'] * 1e3:.0f} ms",
            f"{row['overhead_s'] * 1e3:.0f} ms", f"{row['overhead_pct']:.2f}%",
            f"{row['overhead_plus_queueing_pct']:.2f}%"]


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="CPU, tiny configs, float32, a fake GPU: the same code path")
    ap.add_argument("--requests", type=int, default=3, help="M, concurrent requests of the throughput runs")
    ap.add_argument("--steps", type=int, default=None, help="N denoising steps (6; 4 with --smoke)")
    ap.add_argument("--sr-switch", default="step:1", help="switch of the SR requests (all-14B uses step:N)")
    ap.add_argument("--height", type=int, default=None, help="480 (32 with --smoke)")
    ap.add_argument("--width", type=int, default=None, help="832 (48 with --smoke)")
    ap.add_argument("--frames", type=int, default=None, help="81 (5 with --smoke)")
    ap.add_argument("--object-store-gib", type=float, default=None, help="Ray object store (4 GiB; 0.2 with --smoke)")
    ap.add_argument("--speed", choices=sorted(PROFILES), default="exact",
                    help="the app's speed profile (serve/speed.py); exact: eager, the rows measured before profiles")
    ap.add_argument("--parts", default="warmup,single,sr,all14b,metrics,mp4")
    ap.add_argument("--budget-s", type=float, default=300.0, help="deadline for everything (time guard)")
    ap.add_argument("--start-timeout-s", type=float, default=240.0, help="most seconds for Ray and the app to start")
    ap.add_argument("--commit", default=None, help="the commit measured (default: $BENCH_COMMIT, else git's)")
    default_out = os.path.join(os.environ["OUT"], "serve_throughput.json") if os.environ.get("OUT") else None
    ap.add_argument("--out", default=default_out, help="JSON results ($OUT/serve_throughput.json if OUT is set)")
    args = ap.parse_args(argv)
    sizes = wan.SMOKE if args.smoke else wan.REAL_480P
    args.steps = args.steps or (4 if args.smoke else 6)
    args.height, args.width = args.height or sizes.height, args.width or sizes.width
    args.frames = args.frames or sizes.num_frames
    args.object_store_gib = args.object_store_gib or (0.2 if args.smoke else 4.0)
    args.device, args.dtype = ("cpu", "float32") if args.smoke else ("cuda", "bfloat16")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # local Ray asks for an auth token otherwise

    bench = Bench("bench.serve_throughput", argv, args.out, args.budget_s, ("ray",), args.commit, label=wan.LABEL,
                  device=args.device, sizes=asdict(sizes), dtype=args.dtype, speed=args.speed,
                  size=f"{args.height}x{args.width}x{args.frames}",
                  # Ray puts its object store (the hand-offs) in /dev/shm if it is large enough, else in /tmp
                  dev_shm_gib=shutil.disk_usage("/dev/shm").total / 2**30 if os.path.isdir("/dev/shm") else None)
    print(f"# serve_throughput | {wan.LABEL} | {bench.meta['gpu']} | {bench.meta['size']} N={args.steps} "
          f"M={args.requests} SR {args.sr_switch} | budget {args.budget_s:.0f} s", flush=True)
    ctx = Context(args, Telemetry(), bench)
    try:
        setup = bench.run("setup", 0, part_setup, ctx, sizes)
        print(f"setup: {json.dumps({k: v for k, v in setup.items() if k != 'app_config'}, default=str)}", flush=True)
        if "traceback" in setup:
            print(setup["traceback"], flush=True)
        if ctx.handle is not None:
            ctx.telemetry.start()
            for name in [p for p in args.parts.split(",") if p]:
                estimate = estimate_s(name, ctx)
                print(f"{name}: starting, estimate {estimate:.0f} s, {bench.left():.0f} s left", flush=True)
                record = bench.run(name, estimate * 1.05, PARTS[name], ctx)
                record.setdefault("estimate_s", estimate)
                print(f"{name}: {record.get('part_wall_s', 0):.1f} s (estimate {estimate:.1f} s)"
                      + (f" ERROR {record['error']}" if "error" in record else "")
                      + (f" SKIPPED {record['skipped']}" if "skipped" in record else ""), flush=True)
                if name == "warmup" and "error" in record:
                    print(record.get("traceback", ""), flush=True)
                    break  # the app cannot serve a request: nothing else would run either
            bench.parts["stages"] = replica_report()
            bench.parts["gpu_telemetry"] = {"by_part": {part: ctx.telemetry.summary(part)
                                                        for part in ctx.telemetry.samples},
                                            "note": ctx.telemetry.error}
    finally:
        ctx.telemetry.stop()
        _shutdown()
        ctx.models_dir.cleanup()
        bench.save()
    m = bench.meta
    print(f"\n# {wan.LABEL} | {m['gpu']} | commit {m['commit']} | {m['date_utc']} | mp4 {m.get('mp4_encoder')}")
    print("\n".join([table(bench.parts), *bench.problems()]), flush=True)
    return bench.doc


def part_setup(rec: dict, ctx: Context, sizes: wan.Sizes) -> None:
    """Config-only models, the planner's one-GPU layout, local Ray and the app (ctx.handle once it runs)."""
    from serve.video import mp4_encoder

    args = ctx.args
    ctx.bench.meta["mp4_encoder"] = mp4_encoder()  # fails here, at once, if the decode stage could not encode
    models = wan.write_config_only(sizes, ctx.models_dir.name)
    rec["models"] = {"sketch": sizes.sketch, "render": sizes.render, "text_encoder": sizes.text_encoder,
                     "vae": sizes.vae, "weights": "random-init", "dir": ctx.models_dir.name}
    placement = one_gpu_placement(args)
    rec["placement"] = {"lines": placement.lines(), "gpu_share": placement.gpu_share,
                        "predicted_videos_per_hour": placement.videos_per_hour,
                        "predicted_video_s": placement.cost.total_s}
    ctx.handle = start_app(rec, args, models, placement, timeout_s=min(args.start_timeout_s, ctx.bench.left()))
    rec["stage_gpu_ids"] = {stage: r.get("gpu_ids") for stage, r in replica_report().items()}


def _shutdown() -> None:
    """Serve, then Ray: whatever of them this process started."""
    stage_handle.cache_clear()
    try:
        import ray
        from ray import serve

        if ray.is_initialized():
            try:
                serve.shutdown()
            finally:
                ray.shutdown()
    except Exception as e:  # noqa: BLE001 - shutting down must not hide the results
        print(f"shutdown: {type(e).__name__}: {e}", flush=True)


if __name__ == "__main__":
    parts = main()["parts"]
    sys.exit(1 if any("error" in record for record in parts.values() if isinstance(record, dict)) else 0)
