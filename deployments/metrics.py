"""Every metric the app exports, in one place: names, descriptions, buckets and tags.

The metrics go through Ray Serve's metrics API (`ray.serve.metrics`, which adds the deployment, replica and
application tags) to Ray's Prometheus endpoint (each node's metrics export port); Prometheus shows them with Ray's
`ray_` prefix, e.g. `ray_srd_stage_step_seconds_bucket{stage="sketch",...}`. The Grafana dashboard
(deployments/grafana_dashboard.json) is built for exactly these names; `test_metrics.py` keeps the two in step.
The app's API port serves them too, at `GET /metrics` (`app_exposition`), so that no one needs Ray's port.

A deployment records through one of the recorders below, a line per call site; a recorder is made inside the
replica (Ray's metric objects belong to the process that records them). Ray drops a gauge's series once it has not
been set for two export intervals, so the gauges here are set again every `GAUGE_REFRESH_S` by a daemon thread: an
idle stage keeps reporting its queue depth of 0.
"""

from __future__ import annotations

import threading
import time

from ray.serve import metrics

PROMETHEUS_PREFIX = "ray_"  # what Ray's exporter puts before every application metric
GAUGE_REFRESH_S = 5.0  # below Ray's default export interval (10 s)

# Denoising steps: a few ms (tiny, CPU) to ~12 s (Wan 14B at 720p); a stage call holds up to 50 such steps.
STEP_BUCKETS = [0.005, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0]
STAGE_BUCKETS = [0.05, 0.25, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0]
JOB_BUCKETS = [0.1, 1.0, 5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0]
BATCH_BUCKETS = [1, 2, 3, 4, 6, 8, 12, 16]
SWITCH_BUCKETS = [1, 2, 3, 5, 8, 10, 12, 15, 20, 25, 30, 40, 50]
BYTES_BUCKETS = [2.0**p for p in range(10, 33, 2)]  # 1 KiB .. 4 GiB
SHIFT_BUCKETS = [0.5, 1.5, 2.5, 3.5, 4.5, 6.5, 8.5, 12.5, 16.5]  # whole rungs or times (boundaries must be > 0)

# name -> (kind, description); the dashboard and the tests read this table. Ray exports a counter as NAME_total.
METRICS: dict[str, tuple[str, str]] = {
    "srd_stage_queue_depth": ("gauge", "Jobs at a stage replica, queued or computing."),
    "srd_stage_batch_size": ("histogram", "Jobs per batched engine call of a stage."),
    "srd_stage_step_seconds": ("histogram", "Seconds per denoising step (per call for encode and decode)."),
    "srd_stage_seconds": ("histogram", "Seconds of one batched engine call of a stage."),
    "srd_switch_step": ("histogram", "The step K at which a job's sketch handed over to the render model."),
    "srd_handoff_bytes": ("histogram", "Bytes of a sketch-to-render hand-off checkpoint."),
    "srd_handoff_seconds": ("histogram", "Seconds to write (sketch) or read (render) a hand-off checkpoint."),
    "srd_jobs": ("counter", "Jobs that reached a final status, by status."),
    "srd_job_queue_wait_seconds": ("histogram", "Seconds from a job's creation until an orchestrator started it."),
    "srd_job_compute_seconds": ("histogram", "Seconds a job spent in its stage calls (each from its call to its "
                                          "batch's end)."),
    "srd_job_seconds": ("histogram", "Seconds from a job's creation to its final status."),
    "srd_stage_queue_wait_seconds": ("histogram", "Seconds a job's call waited at a stage replica before its batch "
                                                  "took the device, by latency class."),
    "srd_job_preemptions": ("histogram", "Times a completed job yielded a stage mid-segment to a higher class, by "
                                         "its class."),
    "srd_switch_shift": ("histogram", "Rungs a completed job's schedule was moved below its idle choice by the load "
                                      "(load-elastic switches; 0 for a fixed switch), by class."),
    "srd_lora_loads": ("counter", "LoRA adapters loaded into a stage replica's transformer (its LRU missed), by "
                                  "stage and adapter."),
    "srd_lora_hits": ("counter", "Batches that found their LoRA adapter loaded already, by stage and adapter."),
    "srd_lora_evictions": ("counter", "LoRA adapters a stage replica unloaded to make room (least recently used "
                                      "first), by stage and adapter."),
    "srd_gpu_utilization_percent": ("gauge", "NVML utilisation of a replica's GPU."),
    "srd_gpu_memory_used_bytes": ("gauge", "NVML memory in use on a replica's GPU."),
    "srd_gpu_memory_total_bytes": ("gauge", "NVML memory of a replica's GPU."),
}


def _histogram(name: str, boundaries: list[float], tag_keys: tuple[str, ...]) -> metrics.Histogram:
    return metrics.Histogram(name, description=METRICS[name][1], boundaries=boundaries, tag_keys=tag_keys)


def _gauge(name: str, tag_keys: tuple[str, ...]) -> metrics.Gauge:
    return metrics.Gauge(name, description=METRICS[name][1], tag_keys=tag_keys)


class StageMetrics:
    """What a stage replica (encode, sketch, render, decode) records."""

    def __init__(self, stage: str):
        self._tags = {"stage": stage}
        keys = ("stage",)
        self._queue_depth = _gauge("srd_stage_queue_depth", keys)
        self._batch_size = _histogram("srd_stage_batch_size", BATCH_BUCKETS, keys)
        self._step_seconds = _histogram("srd_stage_step_seconds", STEP_BUCKETS, keys)
        self._stage_seconds = _histogram("srd_stage_seconds", STAGE_BUCKETS, keys)
        self._queue_wait = _histogram("srd_stage_queue_wait_seconds", JOB_BUCKETS, ("stage", "priority"))
        self._jobs = 0
        threading.Thread(target=self._refresh, name="stage-metrics", daemon=True).start()

    def _refresh(self) -> None:
        while True:
            self._queue_depth.set(self._jobs, tags=self._tags)
            time.sleep(GAUGE_REFRESH_S)

    def queue_depth(self, jobs: int) -> None:
        self._jobs = jobs
        self._queue_depth.set(jobs, tags=self._tags)

    def batch(self, size: int, seconds: float) -> None:
        self._batch_size.observe(size, tags=self._tags)
        self._stage_seconds.observe(seconds, tags=self._tags)

    def step(self, seconds: float) -> None:
        self._step_seconds.observe(seconds, tags=self._tags)

    def queue_wait(self, jobs, now: float) -> None:
        """A batch took the device: each job's wait since its call arrived (serve.priority.Waiting, monotonic)."""
        for job in jobs:
            self._queue_wait.observe(max(0.0, now - job.since), tags={**self._tags, "priority": job.priority})


class HandoffMetrics:
    """The sketch-to-render hand-off: K, and the checkpoint's size and transfer time (written by the sketcher,
    read by the renderer)."""

    def __init__(self):
        self._switch_step = _histogram("srd_switch_step", SWITCH_BUCKETS, ())
        self._bytes = _histogram("srd_handoff_bytes", BYTES_BUCKETS, ("direction",))
        self._seconds = _histogram("srd_handoff_seconds", STEP_BUCKETS, ("direction",))

    def switched(self, step: int) -> None:
        self._switch_step.observe(step)

    def moved(self, direction: str, size: int, seconds: float) -> None:
        self._bytes.observe(size, tags={"direction": direction})
        self._seconds.observe(seconds, tags={"direction": direction})


class JobMetrics:
    """Jobs by final status, and their latency with the queue wait apart from the compute."""

    def __init__(self):
        self._jobs = metrics.Counter("srd_jobs", description=METRICS["srd_jobs"][1],
                                     tag_keys=("status",))
        self._queue_wait = _histogram("srd_job_queue_wait_seconds", JOB_BUCKETS, ("priority",))
        self._compute = _histogram("srd_job_compute_seconds", JOB_BUCKETS, ())
        self._total = _histogram("srd_job_seconds", JOB_BUCKETS, ("priority",))
        self._shift = _histogram("srd_switch_shift", SHIFT_BUCKETS, ("priority",))
        # histograms over every completed job, not counters of events: each series exists from the first job on
        self._preemptions = _histogram("srd_job_preemptions", SHIFT_BUCKETS, ("priority",))

    def finished(self, job) -> None:
        """A job record (serve.jobs.JobRecord) that reached its final status."""
        self._jobs.inc(tags={"status": job.status})
        if job.status != "completed":
            return
        tags = {"priority": job.priority}
        if job.started_at is not None:
            self._queue_wait.observe(max(0.0, job.started_at - job.created_at), tags=tags)
        self._compute.observe(sum(s.end - s.start for s in job.stages.values()
                                  if s.start is not None and s.end is not None))
        if job.completed_at is not None:
            self._total.observe(max(0.0, job.completed_at - job.created_at), tags=tags)
        self._shift.observe(job.switch_shift or 0, tags=tags)
        self._preemptions.observe(job.preemptions, tags=tags)


class LoraMetrics:
    """A denoising stage's LoRA LRU: loads, hits and evictions per adapter. The stage counts them itself (the
    engine knows no Ray: `LoadedAdapters.stats`); `record` adds what its counts grew by since the last batch."""

    def __init__(self, stage: str):
        self._stage = stage
        self._counters = {kind: metrics.Counter(f"srd_lora_{kind}", description=METRICS[f"srd_lora_{kind}"][1],
                                                tag_keys=("stage", "adapter"))
                          for kind in ("loads", "hits", "evictions")}
        self._seen: dict[tuple[str, str], int] = {}

    def record(self, counts: dict) -> None:
        for kind, counter in self._counters.items():
            for adapter, total in counts.get(kind, {}).items():
                grown = total - self._seen.get((kind, adapter), 0)
                if grown > 0:
                    counter.inc(grown, tags={"stage": self._stage, "adapter": adapter})
                    self._seen[(kind, adapter)] = total


class GpuMetrics:
    """Utilisation and memory of this replica's GPUs from NVML (deployments/telemetry.py), sampled on a daemon
    thread every `interval_s`; nothing at all on a replica without a GPU (or with CPU tests' fake GPUs)."""

    def __init__(self, interval_s: float = GAUGE_REFRESH_S):
        from deployments.telemetry import gpu_telemetry

        self._read = gpu_telemetry
        if not self._read():
            return
        keys = ("gpu_id",)
        self._util = _gauge("srd_gpu_utilization_percent", keys)
        self._used = _gauge("srd_gpu_memory_used_bytes", keys)
        self._total = _gauge("srd_gpu_memory_total_bytes", keys)
        self._interval_s = interval_s
        threading.Thread(target=self._run, name="gpu-metrics", daemon=True).start()

    def _run(self) -> None:
        while True:
            for gpu in self._read():
                tags = {"gpu_id": str(gpu["gpu_id"])}
                self._util.set(gpu["utilization_pct"], tags=tags)
                self._used.set(gpu["memory_used_mib"] * 2**20, tags=tags)
                self._total.set(gpu["memory_total_mib"] * 2**20, tags=tags)
            time.sleep(self._interval_s)


# -- GET /metrics on the API port (app_exposition) ---------------------------------------------------------------
APP_FAMILY_PREFIX = PROMETHEUS_PREFIX + "srd_"
NO_GPU_NOTE = ("# srd_gpu_* absent: no replica reports a GPU (NVML through nvidia-ml-py sees none: a CPU app, or "
               "the fake GPUs of tests)\n")


def _family(name: str, families: dict) -> str | None:
    """The family a sample line's metric name belongs to (a histogram's _bucket/_sum/_count, a counter's _total)."""
    candidates = [name] + [name.removesuffix(s) for s in ("_bucket", "_sum", "_count", "_total", "_created")
                           if name.endswith(s)]
    return next((base for base in candidates if base in families), None)


def merge_app_families(bodies: list[str]) -> str:
    """The app's families (`ray_srd_*`) of several Prometheus text expositions as one: each family's HELP and TYPE
    once, then its samples from every body (Ray labels each sample with its node and replica, so none collide)."""
    families: dict[str, dict] = {}
    for body in bodies:
        for line in body.splitlines():
            if line.startswith(("# HELP ", "# TYPE ")):
                _, kind, name, *_ = line.split(" ", 3)
                if name.startswith(APP_FAMILY_PREFIX):
                    families.setdefault(name, {"HELP": None, "TYPE": None, "samples": []})
                    families[name][kind] = families[name][kind] or line
            elif line and not line.startswith("#"):
                family = _family(line.split("{", 1)[0].split(" ", 1)[0], families)
                if family is not None:
                    families[family]["samples"].append(line)
    lines = [line for f in families.values() for line in (f["HELP"], f["TYPE"], *f["samples"]) if line]
    text = "".join(f"{line}\n" for line in lines)
    if not any(name.startswith(APP_FAMILY_PREFIX + "gpu_") for name in families):
        text += NO_GPU_NOTE
    return text


def app_exposition(timeout_s: float = 5.0) -> str:
    """`GET /metrics`: the app's series from every alive Ray node's metrics export port, merged (blocking: call it
    off the event loop). A node that does not answer is named in a comment line instead of failing the scrape.

    Why read Ray's export rather than keep a prometheus_client registry in the ingress: the series are recorded in
    the replicas' processes (the stages, the orchestrator) and leave them only through each node's Ray metrics
    agent, so a registry in the ingress would see the ingress's process alone. The nodes' export addresses are the
    ones Ray's own Prometheus service discovery lists (ray._private.metrics_agent). Ray exports every few seconds:
    a series appears on the export after its first record."""
    import urllib.request

    import ray

    bodies, notes = [], []
    for node in ray.nodes():
        if not node.get("Alive", node.get("alive")):
            continue
        address = f"{node['NodeManagerAddress']}:{node['MetricsExportPort']}"
        try:
            with urllib.request.urlopen(f"http://{address}/metrics", timeout=timeout_s) as response:
                bodies.append(response.read().decode())
        except OSError as e:
            notes.append(f"# srd: Ray's metrics export at {address} did not answer: {type(e).__name__}: {e}\n")
    return merge_app_families(bodies) + "".join(notes)
