"""What every stage deployment does around its engine call, written once.

- Batching by stage, key and class: one `@serve.batch` queue per (stage, batch key, latency class) (the stage's
  `batch_key`: the latent shape, or nothing for the encoder), created on first use, so a batch only ever holds
  requests one engine call can take, all of one class; requests of another shape or class wait in their own queue
  instead of splitting a batch.
- One batch on the device at a time: a replica holds one copy of its models, so batches take turns rather than
  time-slicing the device. The turn goes to the waiting batch of the lowest level, then the longest waiting
  (`DeviceTurns`, the rule of serve/priority.py: a job's level is its class's, raised by its wait at this stage).
- Preemption at a step boundary (`jobs.classes.preemption`): while a batch of a higher level waits, the running
  denoising batch yields after its current step; each of its jobs' trajectory is stored as the step's `resume`
  checkpoint and the call answers `Preempted`, which sends the step back to its queue (serve/jobs/drive.py) to
  resume from exactly there.
- The engine call runs in a worker thread, keeping the replica's event loop free for new requests.
- One call per job and step at a time: if an orchestrator that took a job over asks again for a step this replica
  is already running for it, the second call waits for the first one's result instead of computing it twice.
- Progress and cancel off the critical path: a denoising step only writes its count into this replica's memory and
  reads the job's cancel flag from it; `ProgressReporter`'s own thread writes the counts to the job store and reads
  the cancel flags back every `progress_interval_s`. A step never waits on the store.
- Measured, not assumed: every batch records its size and time, every step its time (deployments/metrics.py), and
  the replica reports its queued work in seconds (jobs' remaining steps times the measured seconds per step) to
  the autoscaling policy (deployments/autoscaling.py) through `autoscaling_stats`.
- One job's bad input fails only that job: a compute may give an exception as one job's output (a job whose input
  artifact cannot be read, say), and only that job's call raises it; the batch's other jobs are computed as usual
  and do not lose an attempt.
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
from typing import Any

import ray
from ray import serve

from deployments.config import Batching
from deployments.metrics import GpuMetrics, StageMetrics
from serve.denoise import PREEMPT, Cancelled, Preempted, StepCallback
from serve.jobs import state
from serve.jobs.config import JobsConfig
from serve.jobs.drive import StepDone
from serve.jobs.store import JobStore
from serve.priority import DEFAULT_PRIORITY, Waiting, batch_level, should_yield

logger = logging.getLogger("ray.serve")

# (stage name, job ids of one batch, the payloads of those jobs, their step callback) -> one result per job: a dict
# of StepDone's fields (steps_done), Cancelled, or an exception for that job alone
Compute = Callable[[str, list[str], list[Any], StepCallback], list[Any]]


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
            self._store.update(job_id, lambda job, n=steps_done: None if job.terminal else state.with_progress(job, n))

    def _refresh_cancel_flags(self, job_ids: list[str]) -> None:
        if not job_ids:
            return
        records = self._store.get_many(job_ids)
        stop = {i for i in job_ids if i not in records or records[i].cancel_requested or records[i].terminal}
        with self._lock:
            self._cancelled.update(stop)


class DeviceTurns:
    """The replica's device, taken by one batch at a time: a lock whose next holder is the waiting batch that
    serve/priority.py orders first (by level, then wait), not the first to ask. asyncio's Lock is FIFO and has no
    notion of who waits; this keeps the waiters' jobs so that the running batch can ask whether to yield
    (`outranked`, from its compute thread)."""

    def __init__(self, aging_s: float):
        self._aging_s = aging_s
        self._busy = False
        self._waiting: list[tuple[list[Waiting], asyncio.Future]] = []
        self._lock = threading.Lock()  # `outranked` reads the waiters from the compute thread

    def _key(self, jobs: list[Waiting], now: float) -> tuple[int, float]:
        """A waiting batch's place in line: its level (its most urgent job's), then its longest wait."""
        return batch_level(jobs, now, self._aging_s), min(job.since for job in jobs)

    async def acquire(self, jobs: list[Waiting]) -> None:
        if not self._busy and not self._waiting:
            self._busy = True
            return
        turn = asyncio.get_running_loop().create_future()
        with self._lock:
            self._waiting.append((jobs, turn))
        try:
            await turn
        except asyncio.CancelledError:
            with self._lock:
                self._waiting = [w for w in self._waiting if w[1] is not turn]
            if turn.done() and not turn.cancelled():  # the turn was given just as it was cancelled: pass it on
                self.release()
            raise

    def release(self) -> None:
        with self._lock:
            if not self._waiting:
                self._busy = False
                return
            now = time.monotonic()
            best = min(self._waiting, key=lambda w: self._key(w[0], now))
            self._waiting.remove(best)
        best[1].set_result(None)

    def outranked(self, running: list[Waiting]) -> bool:
        """Whether a waiting batch has a strictly lower level than `running` (serve/priority.py `should_yield`)."""
        with self._lock:
            waiting = [job for jobs, _ in self._waiting for job in jobs]
        return should_yield(running, waiting, time.monotonic(), self._aging_s)


class StageRunner:
    """Batches, progress, cancel and measurements of one replica's stages; `compute` runs one batch."""

    def __init__(self, batching: Batching, jobs_config: JobsConfig, compute: Compute,
                 device: DeviceTurns | None = None):
        # (job id, stage) -> (first step, one past the last) of its call here, and the steps it still has to take
        self._spans: dict[tuple[str, str], tuple[int, int]] = {}
        self._steps_left: dict[tuple[str, str], int] = {}
        self._step_s: float | None = None  # measured seconds per job-step (a batch's step time over its jobs)
        self.metrics: dict[str, StageMetrics] = {}
        self._gpu_metrics = GpuMetrics()
        self._batching = batching
        self._compute = compute
        self._reporter = ProgressReporter(JobStore(jobs_config.store, jobs_config.store_table),
                                          jobs_config.progress_interval_s)
        self._queues: dict[Hashable, Callable] = {}
        self._running: dict[tuple[str, str], asyncio.Future] = {}  # (job id, stage) -> the call computing it
        self._classes = jobs_config.classes
        # the replica's own device; stages of one process that share one device (the benchmarks) share one
        self._device = device or DeviceTurns(self._classes.aging_s)
        self._waiting_since: dict[tuple[str, str], Waiting] = {}  # (job id, stage) -> its class and arrival here
        self._batch_ids = itertools.count()
        self.batches: deque[dict] = deque(maxlen=1000)  # recent batches: id, stage, size, jobs (stats, tests)

    def _metrics(self, stage: str) -> StageMetrics:
        if stage not in self.metrics:
            self.metrics[stage] = StageMetrics(stage)
        return self.metrics[stage]

    async def run(self, stage: str, job_id: str, payload: Any, key: Hashable = (),
                  span: tuple[int, int] = (0, 1), priority: str = DEFAULT_PRIORITY) -> StepDone | Cancelled | Preempted:
        """Queue one job's call of `stage` with others of the same `key` and `priority` (its latency class); returns
        once its outputs are stored (or it was cancelled, or preempted mid-way). `span`: (first step, one past the
        last) it takes here, as far as is known before it runs ((0, 1) for a call whose "step" is the whole call);
        with the measured seconds per step it gives the replica's queued work."""
        running = self._running.get((job_id, stage))
        if running is None:
            queue = self._queues.get((stage, key, priority))
            if queue is None:
                queue = self._queues[(stage, key, priority)] = self._make_queue(stage)
            self._waiting_since[(job_id, stage)] = Waiting(priority, time.monotonic())
            self._spans[(job_id, stage)] = span
            self._steps_left[(job_id, stage)] = span[1] - span[0]
            running = self._running[(job_id, stage)] = asyncio.ensure_future(queue((job_id, payload)))
            running.add_done_callback(lambda _: self._left(job_id, stage))
            self._metrics(stage).queue_depth(len(self._running))
        result = await asyncio.shield(running)
        if isinstance(result, BaseException):  # this job alone failed
            raise result
        return result

    def _left(self, job_id: str, stage: str) -> None:
        for calls in (self._running, self._steps_left, self._spans, self._waiting_since):
            calls.pop((job_id, stage), None)
        self._metrics(stage).queue_depth(len(self._running))

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

    def _make_queue(self, stage: str) -> Callable:
        async def run_batch(items: list[tuple[str, Any]]) -> list[Any]:
            return await self._run_batch(stage, items)

        return serve.batch(
            max_batch_size=self._batching.max_batch_size, batch_wait_timeout_s=self._batching.batch_wait_timeout_s
        )(run_batch)

    async def _run_batch(self, stage: str, items: list[tuple[str, Any]]
                         ) -> list[StepDone | Cancelled | Preempted | BaseException]:
        job_ids = [job_id for job_id, _ in items]
        metrics = self._metrics(stage)
        jobs = [self._waiting_since.get((job_id, stage), Waiting(DEFAULT_PRIORITY, time.monotonic()))
                for job_id in job_ids]
        await self._device.acquire(jobs)
        try:
            metrics.queue_wait(jobs, time.monotonic())
            already = await asyncio.to_thread(self._reporter.watch, job_ids)
            todo = [i for i, job_id in enumerate(job_ids) if job_id not in already]
            results: list[StepDone | Cancelled | Preempted | BaseException] = [Cancelled(0)] * len(items)
            batch_id = f"{stage}-{os.getpid()}-{next(self._batch_ids)}"
            start = time.time()
            try:
                if todo:
                    todo_ids = [job_ids[i] for i in todo]
                    self.batches.append({"id": batch_id, "stage": stage, "size": len(todo), "jobs": todo_ids})
                    last_step = dict.fromkeys(todo_ids, time.monotonic())  # each job's last step boundary
                    stepped = [False]

                    def on_step(index: int, steps_done: int, num_steps: int) -> object:
                        job_id, now = todo_ids[index], time.monotonic()
                        stepping = sum(1 for j in todo_ids if self._steps_left.get((j, stage), 0) > 0) or 1
                        if (job_id, stage) in self._steps_left:
                            first, stop = self._spans[(job_id, stage)]
                            self._steps_left[(job_id, stage)] = max(0, stop - max(first, steps_done))
                        metrics.step(now - last_step[job_id])
                        self._measured((now - last_step[job_id]) / stepping)
                        last_step[job_id], stepped[0] = now, True
                        go_on = self._reporter.step(job_id, steps_done)
                        if go_on and self._classes.preemption and self._device.outranked(jobs):
                            return PREEMPT
                        return go_on

                    outputs = await asyncio.to_thread(self._compute, stage, todo_ids, [items[i][1] for i in todo],
                                                      on_step)
                    end = time.time()
                    metrics.batch(len(todo), end - start)
                    if not stepped[0]:  # encode and decode: the call is the step
                        metrics.step(end - start)
                        self._measured((end - start) / len(todo))
                    for i, output in zip(todo, outputs):
                        done = isinstance(output, Cancelled | Preempted | BaseException)
                        results[i] = output if done else StepDone(start=start, end=end, batch_id=batch_id,
                                                                  batch_size=len(todo), **(output or {}))
            finally:
                await asyncio.to_thread(self._reporter.done, job_ids)
        finally:
            self._device.release()
        return results

    def stats(self) -> dict:
        from deployments.telemetry import gpu_telemetry

        return {"pid": os.getpid(), "batches": list(self.batches), "running": sorted(j for j, _ in self._running),
                "gpu_ids": [str(g) for g in ray.get_gpu_ids()], "gpus": gpu_telemetry()}
