"""What every stage deployment does around its engine call, written once.

- Batching by shape: one `@serve.batch` queue per latent shape (created on first use), so a batch only ever holds
  requests of one shape; requests of another shape wait in their own queue instead of splitting a batch.
- One batch on the device at a time: a replica holds one copy of the model, so batches of different shapes take
  turns (FIFO) rather than time-slicing the device.
- The engine call runs in a worker thread, keeping the replica's event loop free for new requests.
- One call per job at a time: if an orchestrator that took a job over asks again for a stage this replica is already
  running for it, the second call waits for the first one's result instead of computing it twice.
- Progress and cancel off the critical path: a denoising step only writes its count into this replica's memory and
  reads the job's cancel flag from it; `ProgressReporter`'s own thread writes the counts to the job store and reads
  the cancel flags back every `progress_interval_s`. A step never waits on the store.

Stages take and give checkpoints through the results location (serve/results.py), so a call carries only a job id
and its parameters, and returns a small `StageDone` record.

- Measured, not assumed: every batch records its size and time, every step its time (deployments/metrics.py), and
  the replica reports its queued work in seconds (jobs' remaining steps times the measured seconds per step) to
  the autoscaling policy (deployments/autoscaling.py) through `autoscaling_stats`.
- One job's bad input fails only that job: a compute may give an exception as one job's output (`load_each` does so
  for a job whose input checkpoint cannot be read), and only that job's call raises it; the batch's other jobs are
  computed as usual and do not lose an attempt.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Any

import ray
from ray import serve

from deployments.config import Batching, JobsConfig
from deployments.metrics import GpuMetrics, StageMetrics
from serve import jobs
from serve.job_store import JobStore
from serve.stages import Cancelled, StepCallback

logger = logging.getLogger("ray.serve")

# (job ids of one batch, the payloads of those jobs, their step callback) -> one result per job
Compute = Callable[[list[str], list[Any], StepCallback], list[Any]]


@dataclass(frozen=True)
class StageDone:
    """A stage stored its output for one job."""

    start: float
    end: float
    batch_id: str
    batch_size: int
    switch_step: int | None = None  # sketch only: the K it took


class MissingCheckpoint(FileNotFoundError):
    """A stage's input checkpoint is not in the results location (deleted, or never written)."""


def read_checkpoint(results, job_id: str, name: str) -> bytes:
    """The bytes of a job's checkpoint `name`; MissingCheckpoint (one line naming the job and the file) if absent,
    rather than a TypeError from decoding None."""
    data = results.get(job_id, name)
    if data is None:
        raise MissingCheckpoint(f"video job {job_id} has no {name} checkpoint in {results.url}")
    return data


def load_each(job_ids: list[str], load: Callable[[str], Any]) -> tuple[list[int], list[Any], list[Any]]:
    """Each job's input via `load(job_id)`. Returns (indices of the jobs loaded, their inputs, one output slot per
    job: the exception for a job that could not be loaded, else None). The stage then computes only the loaded jobs:
    a job with a missing or broken checkpoint fails alone instead of failing its whole batch."""
    indices, inputs, outputs = [], [], [None] * len(job_ids)
    for i, job_id in enumerate(job_ids):
        try:
            inputs.append(load(job_id))
            indices.append(i)
        except Exception as error:  # noqa: BLE001 - this job's failure, raised by its own call
            outputs[i] = error
    return indices, inputs, outputs


def sub_steps(on_step: StepCallback | None, indices: list[int]) -> StepCallback | None:
    """`on_step` for an engine call over a subset of a batch: the subset's index i is the batch's indices[i]."""
    if on_step is None:
        return None
    return lambda index, steps_done, num_steps: on_step(indices[index], steps_done, num_steps)


class ProgressReporter:
    """Step counts out to the job store and cancel flags back, on a thread of its own (see the module docstring)."""

    def __init__(self, store: JobStore, interval_s: float):
        self._store = store
        self._interval_s = interval_s
        self._lock = threading.Lock()
        self._pending: dict[str, int] = {}  # job id -> steps done, not yet written
        self._watched: set[str] = set()  # jobs in a running batch
        self._cancelled: set[str] = set()
        self._wake = threading.Event()
        threading.Thread(target=self._run, name="progress-reporter", daemon=True).start()

    def watch(self, job_ids: list[str]) -> set[str]:
        """Jobs of a batch about to start; returns those already cancelled (one store read, before computing)."""
        with self._lock:
            self._watched.update(job_ids)
        self._refresh_cancel_flags(job_ids)
        with self._lock:
            return self._cancelled & set(job_ids)

    def step(self, job_id: str, steps_done: int) -> bool:
        """Called by the denoising loop at every step boundary: records the count, answers "go on?" from memory."""
        with self._lock:
            self._pending[job_id] = steps_done
            return job_id not in self._cancelled

    def done(self, job_ids: list[str]) -> None:
        """The batch ended: write its last counts now (so `steps_done` agrees with a cancel's step) and forget it."""
        self._flush(job_ids)
        with self._lock:
            self._watched.difference_update(job_ids)
            self._cancelled.difference_update(job_ids)

    def _run(self) -> None:
        while True:
            self._wake.wait(self._interval_s)
            try:
                self._flush()
                with self._lock:
                    watched = list(self._watched)
                self._refresh_cancel_flags(watched)
            except Exception:  # the store is unreachable for a moment: steps go on, counts are written later
                logger.exception("progress reporter: job store not reachable")

    def _flush(self, job_ids: list[str] | None = None) -> None:
        with self._lock:
            ids = list(self._pending) if job_ids is None else [i for i in job_ids if i in self._pending]
            counts = {i: self._pending.pop(i) for i in ids}
        for job_id, steps_done in counts.items():
            self._store.update(job_id, lambda job, n=steps_done: None if job.terminal else jobs.with_progress(job, n))

    def _refresh_cancel_flags(self, job_ids: list[str]) -> None:
        if not job_ids:
            return
        records = self._store.get_many(job_ids)
        stop = {i for i in job_ids if i not in records or records[i].cancel_requested or records[i].terminal}
        with self._lock:
            self._cancelled.update(stop)


class StageRunner:
    """`span_of(payload)`: (first step, one past the last) a job takes at this stage, as far as is known before it
    runs ((0, 1) for encode and decode, whose "step" is the whole call); with the measured seconds per step it gives
    the replica's queued work."""

    def __init__(self, stage: jobs.StageName, batching: Batching, jobs_config: JobsConfig, compute: Compute,
                 span_of: Callable[[Any], tuple[int, int]] = lambda payload: (0, 1)):
        self.stage = stage
        self._span_of = span_of
        self._spans: dict[str, tuple[int, int]] = {}
        self._steps_left: dict[str, int] = {}  # job id -> steps still to take here, queued or computing
        self._step_s: float | None = None  # measured seconds per job-step (a batch's step time over its jobs)
        self.metrics = StageMetrics(stage)
        self._gpu_metrics = GpuMetrics()
        self._batching = batching
        self._compute = compute
        self._reporter = ProgressReporter(JobStore(jobs_config.store, jobs_config.store_table),
                                          jobs_config.progress_interval_s)
        self._queues: dict[Hashable, Callable] = {}
        self._running: dict[str, asyncio.Future] = {}  # job id -> the call computing it on this replica
        self._device: asyncio.Lock | None = None
        self._batch_ids = itertools.count()
        self.batches: deque[dict] = deque(maxlen=1000)  # recent batches: id, size, shape, jobs (stats, tests)

    @property
    def device(self) -> asyncio.Lock:
        if self._device is None:  # created on the replica's event loop, on first use
            self._device = asyncio.Lock()
        return self._device

    async def run(self, job_id: str, payload: Any, shape: Hashable = ()) -> StageDone | Cancelled:
        """Queue one job with others of the same `shape`; returns when its output is stored (or it was cancelled)."""
        running = self._running.get(job_id)
        if running is None:
            queue = self._queues.get(shape)
            if queue is None:
                queue = self._queues[shape] = self._make_queue()
            start, stop = self._spans[job_id] = self._span_of(payload)
            self._steps_left[job_id] = stop - start
            running = self._running[job_id] = asyncio.ensure_future(queue((job_id, payload)))
            running.add_done_callback(lambda _: self._left(job_id))
            self.metrics.queue_depth(len(self._running))
        result = await asyncio.shield(running)
        if isinstance(result, BaseException):  # this job alone failed (see load_each)
            raise result
        return result

    def _left(self, job_id: str) -> None:
        self._running.pop(job_id, None)
        self._steps_left.pop(job_id, None)
        self._spans.pop(job_id, None)
        self.metrics.queue_depth(len(self._running))

    def _measured(self, seconds_per_job_step: float) -> None:
        """Seconds per job-step, smoothed over recent batches (a step's cost drifts with shapes and batch sizes)."""
        self._step_s = seconds_per_job_step if self._step_s is None else 0.7 * self._step_s + 0.3 * seconds_per_job_step

    def autoscaling_stats(self) -> dict[str, float]:
        """Queued work of this replica for the autoscaling policy: `queued_steps` (jobs' remaining steps here),
        `step_s` (measured seconds per job-step; 0 until the first step) and their product `queued_work_s`."""
        steps = float(sum(self._steps_left.values()))
        step_s = self._step_s or 0.0
        return {"queued_steps": steps, "step_s": step_s, "queued_work_s": steps * step_s,
                "jobs": float(len(self._steps_left))}

    def _make_queue(self) -> Callable:
        async def run_batch(items: list[tuple[str, Any]]) -> list[Any]:
            return await self._run_batch(items)

        return serve.batch(
            max_batch_size=self._batching.max_batch_size, batch_wait_timeout_s=self._batching.batch_wait_timeout_s
        )(run_batch)

    async def _run_batch(self, items: list[tuple[str, Any]]) -> list[StageDone | Cancelled | BaseException]:
        job_ids = [job_id for job_id, _ in items]
        async with self.device:
            already = await asyncio.to_thread(self._reporter.watch, job_ids)
            todo = [i for i, job_id in enumerate(job_ids) if job_id not in already]
            results: list[StageDone | Cancelled | BaseException] = [Cancelled(0)] * len(items)
            batch_id = f"{self.stage}-{os.getpid()}-{next(self._batch_ids)}"
            start = time.time()
            try:
                if todo:
                    self.batches.append({"id": batch_id, "size": len(todo), "jobs": [job_ids[i] for i in todo]})
                    todo_ids = [job_ids[i] for i in todo]
                    last_step = dict.fromkeys(todo_ids, time.monotonic())  # each job's last step boundary
                    stepped = [False]

                    def on_step(index: int, steps_done: int, num_steps: int) -> bool:
                        job_id, now = todo_ids[index], time.monotonic()
                        stepping = sum(1 for j in todo_ids if self._steps_left.get(j, 0) > 0) or 1
                        if job_id in self._steps_left:
                            start, stop = self._spans[job_id]
                            self._steps_left[job_id] = max(0, stop - max(start, steps_done))
                        self.metrics.step(now - last_step[job_id])
                        self._measured((now - last_step[job_id]) / stepping)
                        last_step[job_id], stepped[0] = now, True
                        return self._reporter.step(job_id, steps_done)

                    outputs = await asyncio.to_thread(self._compute, todo_ids, [items[i][1] for i in todo], on_step)
                    end = time.time()
                    self.metrics.batch(len(todo), end - start)
                    if not stepped[0]:  # encode and decode: the call is the step
                        self.metrics.step(end - start)
                        self._measured((end - start) / len(todo))
                    for i, output in zip(todo, outputs):
                        results[i] = output if isinstance(output, Cancelled | BaseException) else StageDone(
                            start=start, end=end, batch_id=batch_id, batch_size=len(todo), **(output or {}))
            finally:
                await asyncio.to_thread(self._reporter.done, job_ids)
        return results

    def stats(self) -> dict:
        from deployments.telemetry import gpu_telemetry

        return {"stage": self.stage, "pid": os.getpid(), "batches": list(self.batches),
                "running": sorted(self._running), "gpu_ids": [str(g) for g in ray.get_gpu_ids()],
                "gpus": gpu_telemetry()}
