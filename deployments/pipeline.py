"""Pipeline deployment: runs each job through the stages, one asyncio task per job.

    encoder.encode -> sketcher.sketch -> renderer.render -> decoder.decode
                                      \\-> decoder.preview

Each call gets the previous call's DeploymentResponse as its argument, so the prompt embeddings and the hand-off go
from stage to stage through Ray's object store: this replica never holds them. It only receives what it stores as
the job's results (preview PNG, final latents, mp4). It lives apart from the ingress, so that an ingress restart
cuts no job short.
"""

from __future__ import annotations

import asyncio

from deployments.jobs import VideoJob, VideoResult
from serve.request import GenerationParams
from serve.stages import Cancelled


def error_message(error: BaseException) -> str:
    """One line naming the failure: the stage's own exception, not Ray's wrapper and traceback."""
    cause = getattr(error, "cause", None) or error
    text = str(cause).strip().splitlines()
    return f"{type(cause).__name__}: {text[0]}" if text else type(cause).__name__


class Pipeline:
    def __init__(self, encoder, sketcher, renderer, decoder, store):
        self._encoder, self._sketcher, self._renderer, self._decoder = encoder, sketcher, renderer, decoder
        self._store = store
        self._tasks: dict[str, asyncio.Task] = {}  # strong references: the event loop keeps only weak ones

    async def submit(self, params: GenerationParams) -> VideoJob:
        """Create the job and start it in the background; returns at once with the queued record."""
        job, _ = await self._start(params)
        return job

    async def generate(self, params: GenerationParams) -> VideoResult:
        """Run one job to the end and return its results."""
        job, task = await self._start(params)
        await asyncio.shield(task)  # a caller that goes away does not cancel the job
        return await self._store.full_result.remote(job.id)

    async def _start(self, params: GenerationParams) -> tuple[VideoJob, asyncio.Task]:
        job = await self._store.create.remote(params)
        task = asyncio.create_task(self._run(job.id, params))
        self._tasks[job.id] = task
        task.add_done_callback(lambda _: self._tasks.pop(job.id, None))
        return job, task

    async def _run(self, job_id: str, params: GenerationParams) -> None:
        store = self._store
        try:
            embeds = self._encoder.encode.remote(job_id, params)
            handoff = self._sketcher.sketch.remote(job_id, params, embeds)
            preview = self._decoder.preview.remote(handoff)
            latents_response = self._renderer.render.remote(job_id, handoff)
            png = await preview
            if png is not None:  # stored before decoding starts: a preview always precedes completion
                await store.put_result.remote(job_id, preview=png)
            latents = await latents_response
            if isinstance(latents, Cancelled):
                await store.finish.remote(job_id, "cancelled")
                return
            video = await self._decoder.decode.remote(job_id, params, latents_response)
            if isinstance(video, Cancelled):
                await store.finish.remote(job_id, "cancelled")
                return
            await store.put_result.remote(job_id, video=video, latents=latents)
            await store.finish.remote(job_id, "completed")
        except Exception as e:  # any stage's failure fails this job only; the message is kept in its record
            await store.finish.remote(job_id, "failed", error=error_message(e))
