"""What every stage deployment does around its engine call, written once.

- Batching by shape: one `@serve.batch` queue per latent shape (created on first use), so a batch only ever holds
  requests of one shape; requests of another shape wait in their own queue instead of splitting a batch. (The
  engine would also accept a mixed list and group it internally, but then one shape's requests would wait for the
  other's forwards and the batch size would say nothing.)
- One batch on the device at a time: a replica holds one copy of the model, so batches of different shapes take
  turns (FIFO) rather than time-slicing the device.
- The engine call runs in a worker thread, keeping the replica's event loop free for new requests and for the job
  store round-trips of the step callback.
- Job bookkeeping: a batch reports its start (jobs cancelled by then are skipped), its steps and its end.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import time
from collections import deque
from collections.abc import Callable, Hashable
from typing import Any

import ray
from ray import serve

from deployments.config import Batching
from deployments.jobs import JobReporter, StageName
from serve.stages import Cancelled, StepCallback

# (payloads of the live requests of one batch, their step callback or None) -> one result per payload
Compute = Callable[[list[Any], StepCallback | None], list[Any]]


class StageRunner:
    def __init__(self, stage: StageName, batching: Batching, store, compute: Compute,
                 describe: Callable[[Any], dict] | None = None):
        self.stage = stage
        self._batching = batching
        self._reporter = JobReporter(store, stage)
        self._compute = compute
        self._describe = describe or (lambda result: {})
        self._queues: dict[Hashable, Callable] = {}
        self._device: asyncio.Lock | None = None
        self._batch_ids = itertools.count()
        self._replica = f"{os.getpid()}"
        self.batches: deque[dict] = deque(maxlen=1000)  # recent batches: id, size, shape, jobs (stats, tests)
        self.in_flight: set[str] = set()  # jobs whose batch is computing now

    @property
    def device(self) -> asyncio.Lock:
        if self._device is None:  # created on the replica's event loop, on first use
            self._device = asyncio.Lock()
        return self._device

    async def run(self, job_id: str, payload: Any, shape: Hashable = ()) -> Any:
        """Queue one request with others of the same `shape`; returns its result or `Cancelled`."""
        queue = self._queues.get(shape)
        if queue is None:
            queue = self._queues[shape] = self._make_queue(shape)
        return await queue((job_id, payload))

    def _make_queue(self, shape: Hashable) -> Callable:
        async def run_batch(items: list[tuple[str, Any]]) -> list[Any]:
            return await self._run_batch(shape, items)

        return serve.batch(
            max_batch_size=self._batching.max_batch_size, batch_wait_timeout_s=self._batching.batch_wait_timeout_s
        )(run_batch)

    async def _run_batch(self, shape: Hashable, items: list[tuple[str, Any]]) -> list[Any]:
        job_ids = [job_id for job_id, _ in items]
        async with self.device:
            batch_id = f"{self.stage}-{self._replica}-{next(self._batch_ids)}"
            live = await self._reporter.begin(job_ids, batch_id)
            results: list[Any] = [Cancelled(0)] * len(items)  # for jobs cancelled before this stage began
            todo = [i for i, go_on in enumerate(live) if go_on]
            if todo:
                self.batches.append({"id": batch_id, "size": len(items), "shape": list(shape), "jobs": job_ids})
                todo_ids = [job_ids[i] for i in todo]
                self.in_flight.update(todo_ids)
                on_step = self._reporter.step_callback(todo_ids, asyncio.get_running_loop())
                try:
                    outputs = await asyncio.to_thread(self._compute, [items[i][1] for i in todo], on_step)
                finally:
                    self.in_flight.difference_update(todo_ids)
                finished = time.time()
                for i, output in zip(todo, outputs):
                    results[i] = output
        for i in todo:
            result = results[i]
            if isinstance(result, Cancelled):
                fields = {"cancelled_at_step": result.step_index}
            else:
                fields = self._describe(result)
            await self._reporter.end(job_ids[i], finished, **fields)
        return results

    def stats(self) -> dict:
        return {
            "stage": self.stage,
            "pid": os.getpid(),
            "gpu_ids": [str(g) for g in ray.get_gpu_ids()],
            "batches": list(self.batches),
            "in_flight": sorted(self.in_flight),
            "gpus": gpu_telemetry(),
        }


def gpu_telemetry() -> list[dict]:
    """Memory and utilisation of this replica's GPUs through NVML (nvidia-ml-py); empty without a GPU."""
    gpu_ids = ray.get_gpu_ids()  # physical indices, which NVML uses too (it ignores CUDA_VISIBLE_DEVICES)
    if not gpu_ids:
        return []
    import pynvml

    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:  # fake GPU resources (CPU tests): no driver to ask
        return []
    try:
        report = []
        for gpu_id in gpu_ids:
            handle = pynvml.nvmlDeviceGetHandleByIndex(int(gpu_id))
            memory = pynvml.nvmlDeviceGetMemoryInfo(handle)
            report.append({"gpu_id": int(gpu_id), "memory_used_mib": memory.used // 2**20,
                           "memory_total_mib": memory.total // 2**20,
                           "utilization_pct": pynvml.nvmlDeviceGetUtilizationRates(handle).gpu})
        return report
    finally:
        pynvml.nvmlShutdown()
