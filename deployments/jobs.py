"""Job records and results, kept in their own deployment so that an ingress (or pipeline) restart loses nothing.

`JobStore` is the one place a job's state changes: the pipeline creates and finishes jobs, the stages report when a
batch starts and ends and each denoising step (and learn from the reply whether the job was cancelled), the ingress
reads records and results. `JobReporter` is a stage's side of that conversation.

Progress is integer percent and never goes down: encoding ends at ENCODED, the denoising steps (sketch and render
count together, as the engine reports them) fill up to DENOISED, decoding ends at 100.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
import uuid
from collections import OrderedDict
from typing import Literal

from pydantic import BaseModel, Field

from serve.request import GenerationParams

JobStatus = Literal["queued", "in_progress", "completed", "failed", "cancelled"]
StageName = Literal["encode", "sketch", "render", "decode"]
TERMINAL: frozenset[str] = frozenset({"completed", "failed", "cancelled"})
ENCODED, DENOISED = 5, 95


class StageSpan(BaseModel):
    """When one stage worked on the job (wall-clock seconds since the epoch, taken in the stage replica)."""

    start: float = Field(description="The batch holding this job started computing.")
    end: float | None = Field(None, description="The batch finished (None while running).")
    batch_id: str = Field(description="Jobs with the same batch_id shared one engine call.")
    batch_size: int = Field(description="Requests in that batch.")


class VideoJob(BaseModel):
    """A video job as clients see it (GET /v1/videos/{id})."""

    id: str
    object: Literal["video"] = "video"
    status: JobStatus = "queued"
    progress: int = Field(0, ge=0, le=100, description="Percent done; never decreases.")
    created_at: int = Field(description="Unix seconds.")
    completed_at: int | None = Field(None, description="Unix seconds at completion, failure or cancellation.")
    stage: StageName | None = Field(None, description="The stage working on the job now (None when queued or done).")
    steps_done: int = Field(0, description="Denoising steps done so far, sketch and render together.")
    switch_step: int | None = Field(None, description="K: denoising steps the sketch model took (once known).")
    request: dict = Field(description="The resolved request: every field filled in, the seed included.")
    timings: dict[str, float] = Field(default_factory=dict, description="Seconds per finished stage.")
    stages: dict[str, StageSpan] = Field(default_factory=dict, description="Per-stage start/end and batch.")
    preview_ready: bool = Field(False, description="GET /v1/videos/{id}/preview has an image.")
    preview_at: float | None = Field(None, description="When the preview was stored (epoch seconds).")
    cancel_requested: bool = False
    cancelled_at_step: int | None = Field(None, description="Denoising steps done when a stage honoured the cancel.")
    error: str | None = None
    version: int = Field(0, description="Increases with every change (server-sent events use it).")

    @property
    def terminal(self) -> bool:
        return self.status in TERMINAL


@dataclasses.dataclass
class VideoResult:
    """What a finished job produced; `generate` over a deployment handle returns it."""

    job: VideoJob
    video: bytes | None  # mp4, None unless completed
    latents: object | None  # torch float32 [1, C, F', H', W'], before VAE decode
    preview: bytes | None  # PNG of the sketch's estimate of the first frame


def describe_params(params: GenerationParams) -> dict:
    return {**dataclasses.asdict(params), "switch": str(params.switch)}


class JobStore:
    """All job records and results of the app, in one replica's memory, oldest finished jobs evicted first."""

    def __init__(self, max_finished_jobs: int):
        self._jobs: OrderedDict[str, VideoJob] = OrderedDict()
        self._results: dict[str, dict[str, object]] = {}
        self._changed: dict[str, asyncio.Event] = {}
        self._max_finished = max_finished_jobs

    # -- pipeline ---------------------------------------------------------------------------------------------

    async def create(self, params: GenerationParams) -> VideoJob:
        job = VideoJob(id=f"video_{uuid.uuid4().hex}", created_at=int(time.time()), request=describe_params(params))
        self._jobs[job.id] = job
        self._results[job.id] = {}
        self._changed[job.id] = asyncio.Event()
        return job

    async def put_result(self, job_id: str, **results) -> None:
        """Store result blobs (video, latents, preview); a preview also marks the record."""
        if job_id not in self._jobs:
            return
        self._results[job_id].update(results)
        if results.get("preview") is not None:
            self._update(job_id, preview_ready=True, preview_at=time.time())

    async def finish(self, job_id: str, status: JobStatus, error: str | None = None) -> VideoJob | None:
        job = self._jobs.get(job_id)
        if job is None or job.terminal:
            return job
        fields = {"status": status, "completed_at": int(time.time()), "stage": None, "error": error}
        if status == "completed":
            fields["progress"] = 100
        job = self._update(job_id, **fields)
        self._evict()
        return job

    # -- stages -----------------------------------------------------------------------------------------------

    async def begin(self, job_ids: list[str], stage: StageName, start: float, batch_id: str) -> list[bool]:
        """A batch of `stage` starts on these jobs; returns, per job, whether to go on (False: cancelled)."""
        go_on = []
        for job_id in job_ids:
            job = self._jobs.get(job_id)
            live = job is not None and not job.cancel_requested and not job.terminal
            go_on.append(live)
            if live:
                span = StageSpan(start=start, batch_id=batch_id, batch_size=len(job_ids))
                self._update(job_id, status="in_progress", stage=stage, stages={**job.stages, stage: span})
        return go_on

    async def step(self, job_id: str, steps_done: int, num_steps: int) -> bool:
        """One denoising step of a job is done; returns False once the job should stop (cancelled)."""
        job = self._jobs.get(job_id)
        if job is None or job.cancel_requested:
            return False
        self._update(job_id, steps_done=steps_done,
                     progress=ENCODED + (DENOISED - ENCODED) * steps_done // num_steps)
        return True

    async def end(self, job_id: str, stage: StageName, end: float, cancelled_at_step: int | None = None,
                  switch_step: int | None = None) -> None:
        job = self._jobs.get(job_id)
        if job is None or stage not in job.stages:
            return
        span = job.stages[stage].model_copy(update={"end": end})
        fields = {"stages": {**job.stages, stage: span}, "timings": {**job.timings, stage: end - span.start}}
        if stage == "encode":
            fields["progress"] = ENCODED
        if switch_step is not None:
            fields["switch_step"] = switch_step
        if cancelled_at_step is not None:
            fields["cancelled_at_step"] = cancelled_at_step
        self._update(job_id, **fields)

    # -- readers ----------------------------------------------------------------------------------------------

    async def get(self, job_id: str) -> VideoJob | None:
        return self._jobs.get(job_id)

    async def result(self, job_id: str, name: Literal["video", "latents", "preview"]):
        return self._results.get(job_id, {}).get(name)

    async def full_result(self, job_id: str) -> VideoResult | None:
        job = self._jobs.get(job_id)
        if job is None:
            return None
        results = self._results[job_id]
        return VideoResult(job, results.get("video"), results.get("latents"), results.get("preview"))

    async def wait(self, job_id: str, after_version: int, timeout_s: float) -> VideoJob | None:
        """The record once its version exceeds `after_version` (or as it is after `timeout_s`): long polling."""
        job = self._jobs.get(job_id)
        if job is None or job.version > after_version:
            return job
        try:
            await asyncio.wait_for(self._changed[job_id].wait(), timeout_s)
        except (asyncio.TimeoutError, KeyError):
            pass
        return self._jobs.get(job_id)

    async def cancel(self, job_id: str) -> VideoJob | None:
        """Ask the job to stop: stages see the flag at their next step boundary (or before they start it)."""
        job = self._jobs.get(job_id)
        if job is None or job.terminal:
            return job
        return self._update(job_id, cancel_requested=True)

    # -- internals --------------------------------------------------------------------------------------------

    def _update(self, job_id: str, **fields) -> VideoJob:
        job = self._jobs[job_id]
        if "progress" in fields:
            fields["progress"] = max(job.progress, fields["progress"])
        job = job.model_copy(update={**fields, "version": job.version + 1})
        self._jobs[job_id] = job
        self._changed.pop(job_id).set()  # wake the waiters, then give later waiters a fresh event
        self._changed[job_id] = asyncio.Event()
        return job

    def _evict(self) -> None:
        finished = [job_id for job_id, job in self._jobs.items() if job.terminal]
        for job_id in finished[: max(0, len(finished) - self._max_finished)]:
            del self._jobs[job_id]
            self._results.pop(job_id, None)
            self._changed.pop(job_id, None)


class JobReporter:
    """A stage replica's line to the job store: batch start and end, step progress, the cancel flag."""

    def __init__(self, store, stage: StageName):
        self._store = store
        self._stage = stage

    async def begin(self, job_ids: list[str], batch_id: str) -> list[bool]:
        return await self._store.begin.remote(job_ids, self._stage, time.time(), batch_id)

    async def end(self, job_id: str, end: float, **fields) -> None:
        await self._store.end.remote(job_id, self._stage, end, **fields)

    def step_callback(self, job_ids: list[str], loop: asyncio.AbstractEventLoop):
        """The engine's on_step for a batch computing in a worker thread: each call waits for the store's answer
        (on the replica's event loop), so a cancel takes effect at the very next step boundary."""

        async def report(job_id: str, steps_done: int, num_steps: int) -> bool:
            return await self._store.step.remote(job_id, steps_done, num_steps)

        def on_step(index: int, steps_done: int, num_steps: int) -> bool:
            future = asyncio.run_coroutine_threadsafe(report(job_ids[index], steps_done, num_steps), loop)
            return future.result()

        return on_step
