"""Ingress deployment: the HTTP job API (FastAPI through Serve) and the same operations for deployment handles.

    POST   /v1/videos                 create a job; returns at once with its queued record
    GET    /v1/videos/{id}            status, progress, stage, switch_step, per-stage timings, error
    GET    /v1/videos/{id}/content    the mp4, once completed (409 before)
    GET    /v1/videos/{id}/preview    PNG of the sketch's estimate of the first frame, once sketching is done
    GET    /v1/videos/{id}/latents    final latents as .npy (float32 [1, C, F', H', W']), once completed
    GET    /v1/videos/{id}/events     server-sent events: the record at every change, until it is terminal
    DELETE /v1/videos/{id}            cancel: stages stop the job at their next step boundary
    GET    /healthz

Requests are validated here (the shared VideoRequest schema, then `resolve` against the preset's defaults), so
stages only ever see runnable requests. The ingress holds no state: records and results live in the JobStore.
"""

from __future__ import annotations

import io

import numpy as np
from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from ray import serve

from deployments.jobs import VideoJob, VideoResult
from serve.request import GenerationDefaults, GenerationParams, InvalidRequest, VideoRequest

SSE_KEEPALIVE_S = 15.0

api = FastAPI(
    title="srd: sketch/render video diffusion",
    description="Asynchronous video jobs (modeled on OpenAI's /v1/videos): a large model sketches the first "
    "denoising steps, a small model renders the rest.",
)


@api.exception_handler(InvalidRequest)
async def _invalid_request(request: Request, error: InvalidRequest) -> JSONResponse:
    """Checks that need the preset's defaults (resolve) answer like field validation: 422 naming the field."""
    return JSONResponse(
        status_code=422, content={"detail": [{"loc": ["body", error.field], "msg": str(error), "type": "value_error"}]}
    )


def _not_found(job_id: str) -> HTTPException:
    return HTTPException(status_code=404, detail=f"no video job with id {job_id!r}")


@serve.ingress(api)
class Ingress:
    def __init__(self, pipeline, store, defaults: GenerationDefaults):
        self._pipeline = pipeline
        self._store = store
        self._defaults = defaults

    # -- Python API (deployment handle): the same operations as HTTP ------------------------------------------

    def resolve(self, request: VideoRequest | dict) -> GenerationParams:
        """Validate a request and fill it from the preset's defaults; raises ValidationError/InvalidRequest."""
        if not isinstance(request, VideoRequest):
            request = VideoRequest.model_validate(request)
        return request.resolve(self._defaults)

    async def submit(self, request: VideoRequest | dict) -> VideoJob:
        return await self._pipeline.submit.remote(self.resolve(request))

    async def generate(self, request: VideoRequest | dict) -> VideoResult:
        """Run one job to the end: its record, mp4 bytes, final latents and preview."""
        return await self._pipeline.generate.remote(self.resolve(request))

    async def status(self, job_id: str) -> VideoJob | None:
        return await self._store.get.remote(job_id)

    async def result(self, job_id: str) -> VideoResult | None:
        return await self._store.full_result.remote(job_id)

    async def cancel(self, job_id: str) -> VideoJob | None:
        return await self._store.cancel.remote(job_id)

    # -- HTTP -------------------------------------------------------------------------------------------------

    @api.post("/v1/videos", response_model=VideoJob, summary="Create a video job")
    async def create_video(self, request: VideoRequest) -> VideoJob:
        return await self.submit(request)

    @api.get("/v1/videos/{job_id}", response_model=VideoJob, summary="A job's status")
    async def get_video(self, job_id: str) -> VideoJob:
        return await self._job(job_id)

    @api.get("/v1/videos/{job_id}/content", response_class=Response, summary="The mp4 of a completed job",
             responses={200: {"content": {"video/mp4": {}}}, 409: {"description": "Not completed"}})
    async def get_content(self, job_id: str) -> Response:
        await self._completed(job_id, "content")
        return Response(await self._store.result.remote(job_id, "video"), media_type="video/mp4")

    @api.get("/v1/videos/{job_id}/latents", response_class=Response, summary="Final latents (.npy)",
             responses={200: {"content": {"application/octet-stream": {}}}, 409: {"description": "Not completed"}})
    async def get_latents(self, job_id: str) -> Response:
        await self._completed(job_id, "latents")
        buffer = io.BytesIO()
        np.save(buffer, (await self._store.result.remote(job_id, "latents")).numpy())
        return Response(buffer.getvalue(), media_type="application/octet-stream")

    @api.get("/v1/videos/{job_id}/preview", response_class=Response, summary="Preview image after sketching",
             responses={200: {"content": {"image/png": {}}}, 409: {"description": "Sketching not done"}})
    async def get_preview(self, job_id: str) -> Response:
        job = await self._job(job_id)
        if not job.preview_ready:
            raise HTTPException(
                status_code=409,
                detail=f"video job {job_id!r} has no preview yet (status {job.status}, stage {job.stage}): "
                "a preview exists once sketching has finished",
            )
        return Response(await self._store.result.remote(job_id, "preview"), media_type="image/png")

    @api.get("/v1/videos/{job_id}/events", summary="Server-sent events until the job is terminal",
             responses={200: {"content": {"text/event-stream": {}}}})
    async def get_events(self, job_id: str) -> StreamingResponse:
        await self._job(job_id)
        return StreamingResponse(self._events(job_id), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})

    @api.delete("/v1/videos/{job_id}", response_model=VideoJob, summary="Cancel a job")
    async def delete_video(self, job_id: str) -> VideoJob:
        job = await self._job(job_id)
        if job.status in ("completed", "failed"):
            raise HTTPException(status_code=409, detail=f"video job {job_id!r} is already {job.status}")
        return await self.cancel(job_id)

    @api.get("/healthz", summary="Liveness of the ingress and the job store")
    async def healthz(self) -> dict:
        await self._store.get.remote("")  # the store answers: records are reachable
        return {"status": "ok"}

    # -- helpers ----------------------------------------------------------------------------------------------

    async def _job(self, job_id: str) -> VideoJob:
        job = await self.status(job_id)
        if job is None:
            raise _not_found(job_id)
        return job

    async def _completed(self, job_id: str, what: str) -> VideoJob:
        job = await self._job(job_id)
        if job.status != "completed":
            raise HTTPException(
                status_code=409,
                detail=f"video job {job_id!r} is {job.status} (progress {job.progress}%): "
                f"its {what} is available once it is completed",
            )
        return job

    async def _events(self, job_id: str):
        version = -1
        while True:
            job = await self._store.wait.remote(job_id, version, SSE_KEEPALIVE_S)
            if job is None:  # evicted while watched
                return
            if job.version > version:
                version = job.version
                yield f"id: {version}\ndata: {job.model_dump_json()}\n\n"
            else:
                yield ": keep-alive\n\n"
            if job.terminal:
                return
