"""The job API: OpenAI's Video API over HTTP (FastAPI) and the same operations for deployment handles.

    POST   /v1/videos                      create a job (JSON, or multipart/form-data as the openai SDK sends it);
                                           the job is in the store before this answers
    GET    /v1/videos                      list jobs, newest first (`limit`, `after`, `order`)
    GET    /v1/videos/{id}                 status, progress, stage, segments, per-step attempts and timings, error
    GET    /v1/videos/{id}/content         the mp4 (`variant=video`) or its first frame (`variant=thumbnail`, PNG)
    GET    /v1/videos/{id}/preview         PNG of the sketch's estimate of the first frame, once sketching is done
    GET    /v1/videos/{id}/latents         final latents as .npy (float32 [1, C, F', H', W']), once completed
    GET    /v1/videos/{id}/events          server-sent events: the job at every change, until it is finished
    POST   /v1/videos/{id}/cancel          cancel: stages stop the job at their next step boundary
    DELETE /v1/videos/{id}                 delete a finished job and its files (a running one: cancel it first)
    GET    /v1/models                      the served model, its request defaults, limits, prompt grammar, LoRAs
    GET    /                               the playground: a page that uses only this API (deployments/playground/)
    GET    /healthz                        200 only when the store answers and every deployment is running
    GET    /metrics                        Prometheus text: the app's srd_* series (GPU gauges included) from Ray

A request flows: validation (the shared VideoRequest schema, then `resolve` against the preset's defaults, then the
app's limits and the model family's own checks) -> admission (a bound on unfinished jobs: 429 beyond it) -> a
queued record in the job store. The drive loop (serve/jobs/drive.py) claims it from there. Nothing here holds
state: records come from the store, files stream from the results location.

`VideoService` is a plain class (tested with FastAPI's TestClient, no Ray) and `make_api` its HTTP routes; the app
builder makes `Ingress`, which adds only the app's deployment health, a Serve ingress.
"""

# No `from __future__ import annotations`: Serve rebuilds the route signatures, and FastAPI must see the real
# `Request` class there, not a string.
import asyncio
import hashlib
import hmac
import io
import json
import os
import time
from collections.abc import Callable
from typing import Literal

import numpy as np
from fastapi import FastAPI, Path, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException
from starlette.routing import Match, Route

from deployments import playground
from deployments.api import ErrorResponse, Health, ModelList, Video, VideoDeleted, VideoList, VideoResult, error_body
from deployments.config import AppConfig
from serve.jobs import state
from serve.jobs.results import ResultStore
from serve.jobs.store import JobStore
from serve.pipeline.artifacts import LATENTS, PREVIEW, THUMBNAIL, VIDEO
from serve.request import InvalidRequest, VideoRequest

SSE_POLL_S = 0.25
SSE_KEEPALIVE_S = 15.0
EXPOSITION_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"  # Prometheus' text format, for GET /metrics


class ApiError(Exception):
    """An HTTP error in OpenAI's shape, naming the request field (`param`) where there is one."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str = "invalid_request_error",
                 headers: dict | None = None, location: str = "body"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers
        self.location = location  # where `param` is: body, query or path

    def __reduce__(self):  # handle callers receive it through Ray, which pickles it
        return ApiError, (self.status, self.message, self.param, self.code, self.headers, self.location)


def validation_error(error: ValidationError) -> ApiError:
    first = error.errors()[0]
    param = ".".join(str(x) for x in first["loc"]) or None
    message = first["msg"].removeprefix("Value error, ")
    return ApiError(422, f"invalid {param or 'request'}: {message}", param)


def _token_owner(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()[:32]


class VideoService:
    """The job operations: validation, admission, auth, the job store and the results location. Its `submit`,
    `generate`, `status`, `result` and `cancel` are the handle API (no auth); `make_api` serves it over HTTP.

    `problems()` names what keeps the app from serving besides the store (the Serve ingress: deployments that are
    not running); `metrics()` is the Prometheus text of `GET /metrics` (the Serve ingress: the app's series from
    Ray's metrics export, deployments/metrics.py)."""

    def __init__(self, config: AppConfig, problems: Callable[[], list[str]] = list,
                 metrics: Callable[[], str] = lambda: "# no metrics: this API runs outside Ray Serve\n"):
        self._config = config
        self._defaults = config.engine.defaults
        family = config.engine.family()
        self._family = family  # its check_request refuses what the stages could not run
        self._spec = family.latent_spec(config.engine.models().sketch)
        self._limits = config.request_limits
        self._problems = problems
        self._metrics = metrics
        self._store = JobStore(config.jobs.store, config.jobs.store_table)
        self._results = ResultStore(config.jobs.results)
        tokens = [t.get_secret_value() for t in config.auth.tokens]
        if config.auth.tokens_env and os.environ.get(config.auth.tokens_env):
            tokens += [t.strip() for t in os.environ[config.auth.tokens_env].split(",") if t.strip()]
        self._tokens = [t.encode() for t in tokens]
        # a token's default latency class, by its owner id (what `authorize` gives `submit`)
        self._priorities = {_token_owner(p.token.get_secret_value()): p.priority for p in config.auth.token_priorities}

    # -- Python API (deployment handle): the same operations as HTTP, without auth ------------------------------

    async def submit(self, request: VideoRequest | dict, owner: str | None = None) -> Video:
        """Validate, admit and store a job; returns it queued. Raises ApiError for a bad or refused request."""
        try:
            if not isinstance(request, VideoRequest):
                request = VideoRequest.model_validate(request)
            params = request.resolve(self._defaults, self._priorities.get(owner, self._config.jobs.classes.default),
                                     self._config.engine.loras, self._config.engine.max_loaded_loras)
            self._limits.check(params, self._spec, request.model_fields_set)
            self._family.check_request(params)
            self._config.engine.check_switch(params)
        except ValidationError as e:
            raise validation_error(e) from None
        except InvalidRequest as e:
            raise ApiError(422, f"invalid {e.field}: {e}", e.field) from None
        if request.model is not None and request.model != self._config.served_model:
            raise ApiError(422, f"invalid model: {request.model!r} is not served here; this server serves "
                                f"{self._config.served_model!r}", "model", "model_not_found")
        if await asyncio.to_thread(self._store.count_unfinished) >= self._config.jobs.max_unfinished_jobs:
            retry = self._config.jobs.retry_after_s
            raise ApiError(429, f"{self._config.jobs.max_unfinished_jobs} jobs are queued or running; retry in "
                                f"{retry} s", None, "rate_limit_exceeded", headers={"Retry-After": str(retry)})
        job = state.new_job(params.to_dict(), self._config.served_model, owner)
        await asyncio.to_thread(self._store.create, job)
        return Video.of(job)

    async def generate(self, request: VideoRequest | dict, poll_s: float = 0.1) -> VideoResult:
        """Run one job to the end: its record, mp4, final latents, preview and thumbnail."""
        video = await self.submit(request)
        while not video.terminal:
            await asyncio.sleep(poll_s)
            video = await self.status(video.id)
        return await self.result(video.id)

    async def status(self, job_id: str) -> Video | None:
        job = await asyncio.to_thread(self._store.get, job_id)
        return None if job is None else Video.of(job)

    async def result(self, job_id: str) -> VideoResult | None:
        video = await self.status(job_id)
        if video is None:
            return None
        files = {artifact: await asyncio.to_thread(self._results.get, job_id, artifact.file)
                 for artifact in (VIDEO, LATENTS, PREVIEW, THUMBNAIL)}
        completed = video.status == "completed"
        latents = LATENTS.decode(files[LATENTS]) if completed and files[LATENTS] is not None else None
        return VideoResult(video, files[VIDEO] if completed else None, latents, files[PREVIEW], files[THUMBNAIL])

    async def cancel(self, job_id: str) -> Video | None:
        job = await asyncio.to_thread(self._store.update, job_id, state.request_cancel)
        return None if job is None else Video.of(job)

    # -- what the HTTP routes add -------------------------------------------------------------------------------

    def authorize(self, request: Request) -> str | None:
        """The caller's owner id (a hash of its token) when auth is on; 401 without a valid bearer token."""
        if not self._tokens:
            return None
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        given = token.strip().encode()
        valid = False
        for accepted in self._tokens:  # compare with every token, in constant time each
            valid |= hmac.compare_digest(given, accepted)
        if scheme.lower() != "bearer" or not valid:
            raise ApiError(401, "a valid bearer token is required (Authorization: Bearer <token>)", None,
                           "invalid_api_key", headers={"WWW-Authenticate": "Bearer"}, location="header")
        return _token_owner(token.strip())

    def _visible(self, job: state.JobRecord, owner: str | None) -> bool:
        return not self._tokens or job.owner == owner

    async def job(self, job_id: str, request: Request) -> state.JobRecord:
        owner = self.authorize(request)
        job = await asyncio.to_thread(self._store.get, job_id)
        if job is None or not self._visible(job, owner):  # another token's job is as good as absent
            raise ApiError(404, f"no video job with id {job_id!r}", "job_id", "not_found", location="path")
        return job

    async def completed(self, job_id: str, request: Request, what: str) -> state.JobRecord:
        job = await self.job(job_id, request)
        if job.status != "completed":
            raise ApiError(409, f"video job {job_id!r} is {Video.of(job).status} (progress {job.progress}%): its "
                                f"{what} is available once it is completed", None, "not_ready", location="path")
        return job

    async def list_jobs(self, request: Request, limit: int, after: str | None, order: str) -> VideoList:
        owner = self.authorize(request)
        if after is not None:
            anchor = await asyncio.to_thread(self._store.get, after)
            if anchor is None or not self._visible(anchor, owner):
                raise ApiError(404, f"invalid after: no video job with id {after!r}", "after", "not_found",
                               location="query")
        owner_filter = owner if self._tokens else None
        records, has_more = await asyncio.to_thread(self._store.list, owner_filter, limit, after, order)
        data = [Video.of(r) for r in records]
        return VideoList(data=data, first_id=data[0].id if data else None, last_id=data[-1].id if data else None,
                         has_more=has_more)

    async def delete(self, job_id: str, request: Request) -> VideoDeleted:
        job = await self.job(job_id, request)
        if not job.terminal:
            raise ApiError(409, f"video job {job_id!r} is {job.status}: cancel it first "
                                f"(POST /v1/videos/{job_id}/cancel), then delete it", None, "not_finished",
                           location="path")
        await asyncio.to_thread(self._results.delete, job_id)
        await asyncio.to_thread(self._store.delete, job_id)
        return VideoDeleted(id=job_id)

    async def stream(self, job_id: str, file: str, media_type: str) -> StreamingResponse:
        size = await asyncio.to_thread(self._results.size, job_id, file)
        if size is None:
            raise ApiError(404, f"video job {job_id!r} has no {file}", "job_id", "not_found", location="path")
        return StreamingResponse(self._results.iter_chunks(job_id, file), media_type=media_type,
                                 headers={"Content-Length": str(size)})

    async def latents_npy(self, job_id: str) -> bytes:
        data = await asyncio.to_thread(self._results.get, job_id, LATENTS.file)
        buffer = io.BytesIO()
        np.save(buffer, LATENTS.decode(data).numpy())
        return buffer.getvalue()

    async def health(self) -> list[str]:
        problems = []
        try:
            await asyncio.to_thread(self._store.count_unfinished)
        except Exception as e:
            problems.append(f"job store: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
        return problems + await asyncio.to_thread(self._problems)

    async def metrics(self) -> str:
        return await asyncio.to_thread(self._metrics)

    def models(self) -> ModelList:
        return ModelList.of(self._config)

    async def read_request(self, request: Request) -> dict:
        """The create body as a dict: JSON, or form fields (the openai SDK posts multipart/form-data)."""
        limit = self._limits.max_body_bytes
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise ApiError(413, f"invalid body: {declared} bytes; at most {limit} are accepted", "body")
        body = b""
        async for chunk in request.stream():
            body += chunk
            if len(body) > limit:
                raise ApiError(413, f"invalid body: more than {limit} bytes; at most {limit} are accepted", "body")
        content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if content_type in ("multipart/form-data", "application/x-www-form-urlencoded"):
            request._body = body  # Starlette's form parser reads the body we already hold
            try:
                form = await request.form()
            except Exception as e:
                raise ApiError(400, f"invalid body: not a readable form ({e})", "body") from None
            data = {}
            for key, value in form.multi_items():
                if isinstance(value, str):
                    data[key] = value
                elif key == "input_reference":  # an uploaded file: VideoRequest refuses it, naming the field
                    data[key] = "<file>"
                else:
                    raise ApiError(422, f"invalid {key}: a file was uploaded where a value is expected", key)
            return data
        if content_type and content_type != "application/json" and not content_type.endswith("+json"):
            raise ApiError(415, f"invalid body: content type {content_type!r} is not accepted; send "
                                "application/json or multipart/form-data", "body", "unsupported_media_type")
        try:
            data = json.loads(body)
        except (ValueError, RecursionError) as e:  # RecursionError: nested too deep; UnicodeDecodeError is a ValueError
            raise ApiError(400, f"invalid body: not JSON ({type(e).__name__}: {str(e)[:200]})", "body") from None
        if not isinstance(data, dict):
            raise ApiError(400, f"invalid body: a JSON object is required, not {type(data).__name__}", "body")
        for key in data:  # a lone surrogate ("\ud800") in a field name: pydantic would name no field
            try:
                key.encode("utf-8")
            except UnicodeEncodeError:
                raise ApiError(422, f"invalid {key}: not a valid field name (not valid Unicode)", key) from None
        return data

    async def events(self, job_id: str):
        version, last_sent = -1, time.monotonic()
        while True:
            job = await asyncio.to_thread(self._store.get, job_id)
            if job is None:  # deleted while watched
                return
            if job.version > version:
                version, last_sent = job.version, time.monotonic()
                yield f"id: {version}\ndata: {Video.of(job).model_dump_json()}\n\n"
            elif time.monotonic() - last_sent > SSE_KEEPALIVE_S:
                last_sent = time.monotonic()
                yield ": keep-alive\n\n"
            if job.terminal:
                return
            await asyncio.sleep(SSE_POLL_S)


# Every error status a route can answer, as OpenAPI declares it: the ErrorResponse body, and the headers it carries.
ERRORS = {
    400: "The body is not a JSON object or a readable form",
    401: "Auth is on and the request has no valid bearer token",
    404: "No video job with this id (another token's job is as good as absent)",
    409: "The job's state does not allow this",
    413: "The body is larger than `limits.max_body_bytes`",
    415: "The body is neither JSON nor a form",
    422: "A field is invalid: `error.param` names it, `detail[0].loc` says where it is",
    429: "Too many unfinished jobs: retry after Retry-After seconds",
}
ERROR_HEADERS = {
    401: {"WWW-Authenticate": {"description": "Bearer", "schema": {"type": "string"}}},
    429: {"Retry-After": {"description": "Seconds to wait.", "schema": {"type": "string"}}},
}


def error_responses(*statuses: int, **descriptions: str) -> dict:
    """OpenAPI `responses` for these error statuses; `descriptions` (keyed `e409`...) word a route's own case."""
    return {status: {"model": ErrorResponse, "description": descriptions.get(f"e{status}", ERRORS[status]),
                     **({"headers": ERROR_HEADERS[status]} if status in ERROR_HEADERS else {})}
            for status in statuses}


def _allowed_methods(api: FastAPI, request: Request) -> list[str]:
    """Every method some route serves at the request's path (Starlette's 405 names only the first route's)."""
    return sorted({method for route in api.routes if isinstance(route, Route)
                   and route.matches(request.scope)[0] is not Match.NONE for method in route.methods or ()})


def make_api(service: VideoService) -> FastAPI:
    """The HTTP routes over `service`. Each route declares every status it answers, so that a client generated from
    /openapi.json (or a fuzzer checking it) meets no undocumented response."""
    api = FastAPI(
        title="srd: sketch/render video diffusion",
        description="Asynchronous video jobs in the shape of OpenAI's /v1/videos API: a large model sketches the "
        "first denoising steps, a small model renders the rest. A cancelled job reads `status: failed` with "
        "`error.code: cancelled`.",
        # Behind Serve, its proxy answers before any route does when it sheds load: declared on every route.
        responses={503: {"description": "Serve's proxy sheds the request: more than `ingress.max_queued_requests` "
                                        "wait for the ingress, or it is not running (Serve's plain text, not this "
                                        "API's error shape)",
                         "content": {"text/plain": {"schema": {"type": "string"}}}}},
    )
    job_path = Path(description="The video job's id, as its create answered.")

    @api.exception_handler(ApiError)
    async def _api_error(request: Request, error: ApiError) -> JSONResponse:
        return JSONResponse(status_code=error.status,
                            content=error_body(error.message, error.param, error.code, error.location),
                            headers=error.headers)

    @api.exception_handler(RequestValidationError)
    async def _query_error(request: Request, error: RequestValidationError) -> JSONResponse:
        first = error.errors()[0]
        param = str(first["loc"][-1]) if first.get("loc") else None
        location = str(first["loc"][0]) if len(first.get("loc") or ()) > 1 else "body"
        return JSONResponse(status_code=422, content=error_body(f"invalid {param}: {first['msg']}", param,
                                                                location=location))

    @api.exception_handler(HTTPException)
    async def _routing_error(request: Request, error: HTTPException) -> JSONResponse:
        """An unknown path (404) or method (405), in the API's error shape."""
        headers = dict(error.headers or {})
        if error.status_code == 405:
            headers["Allow"] = ", ".join(_allowed_methods(api, request))
            message = f"{request.method} is not served at {request.url.path}; {headers['Allow']} are"
        else:
            message = f"{request.url.path}: {error.detail}"
        code = {404: "not_found", 405: "method_not_allowed"}.get(error.status_code, "invalid_request_error")
        return JSONResponse(status_code=error.status_code, content=error_body(message, None, code, "path"),
                            headers=headers)

    @api.post("/v1/videos", response_model=Video, summary="Create a video job", openapi_extra={
        "requestBody": {"required": True, "content": {
            "application/json": {"schema": VideoRequest.model_json_schema()},
            "multipart/form-data": {"schema": VideoRequest.model_json_schema()},
        }},
    }, responses=error_responses(400, 401, 413, 415, 422, 429))
    async def create_video(request: Request) -> Video:
        owner = service.authorize(request)
        return await service.submit(await service.read_request(request), owner)

    @api.get("/v1/videos", response_model=VideoList, summary="List video jobs",
             responses=error_responses(401, 404, 422, e404="`after` names no video job"))
    async def list_videos(request: Request, limit: int = Query(20, ge=1, le=100),
                          after: str | None = Query(None, min_length=1,
                                                    description="The last id of the previous page."),
                          order: Literal["asc", "desc"] = Query("desc", description="By creation time.")
                          ) -> VideoList:
        return await service.list_jobs(request, limit, after, order)

    @api.get("/v1/videos/{job_id}", response_model=Video, summary="A job's status",
             responses=error_responses(401, 404, 422))
    async def get_video(request: Request, job_id: str = job_path) -> Video:
        return Video.of(await service.job(job_id, request))

    @api.get("/v1/videos/{job_id}/content", response_class=Response, summary="The mp4, or its first frame",
             responses={200: {"content": {"video/mp4": {}, "image/png": {}}},
                        **error_responses(400, 401, 404, 409, 422, e400="`variant` spritesheet is not produced here",
                                          e409="The job is not completed")})
    async def get_content(request: Request, job_id: str = job_path,
                          variant: Literal["video", "thumbnail", "spritesheet"] = "video") -> StreamingResponse:
        job = await service.completed(job_id, request, "content")
        if variant == "spritesheet":
            raise ApiError(400, "invalid variant: spritesheet is not produced here; use video or thumbnail",
                           "variant", location="query")
        artifact, media = (VIDEO, "video/mp4") if variant == "video" else (THUMBNAIL, "image/png")
        return await service.stream(job.id, artifact.file, media)

    @api.get("/v1/videos/{job_id}/preview", response_class=Response, summary="Preview image after sketching",
             responses={200: {"content": {"image/png": {}}},
                        **error_responses(401, 404, 409, 422, e409="Sketching is not done")})
    async def get_preview(request: Request, job_id: str = job_path) -> StreamingResponse:
        job = await service.job(job_id, request)
        if not job.finished("preview"):
            raise ApiError(409, f"video job {job_id!r} has no preview yet (status {job.status}, stage {job.stage}): "
                                "a preview exists once sketching has finished", None, "not_ready", location="path")
        return await service.stream(job.id, PREVIEW.file, "image/png")

    @api.get("/v1/videos/{job_id}/latents", response_class=Response, summary="Final latents (.npy)",
             responses={200: {"content": {"application/octet-stream": {}}},
                        **error_responses(401, 404, 409, 422, e409="The job is not completed")})
    async def get_latents(request: Request, job_id: str = job_path) -> Response:
        job = await service.completed(job_id, request, "latents")
        return Response(await service.latents_npy(job.id), media_type="application/octet-stream")

    @api.get("/v1/videos/{job_id}/events", summary="Server-sent events until the job is finished",
             responses={200: {"content": {"text/event-stream": {}}}, **error_responses(401, 404, 422)})
    async def get_events(request: Request, job_id: str = job_path) -> StreamingResponse:
        await service.job(job_id, request)
        return StreamingResponse(service.events(job_id), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})

    @api.post("/v1/videos/{job_id}/cancel", response_model=Video, summary="Cancel a job",
              responses=error_responses(401, 404, 409, 422, e409="The job is already finished"))
    async def cancel_video(request: Request, job_id: str = job_path) -> Video:
        job = await service.job(job_id, request)
        if job.terminal:
            raise ApiError(409, f"video job {job_id!r} is already {job.status}", None, "already_finished",
                           location="path")
        return await service.cancel(job_id)

    @api.delete("/v1/videos/{job_id}", response_model=VideoDeleted, summary="Delete a finished job and its files",
                responses=error_responses(401, 404, 409, 422, e409="The job is not finished: cancel it first"))
    async def delete_video(request: Request, job_id: str = job_path) -> VideoDeleted:
        return await service.delete(job_id, request)

    @api.get("/v1/models", response_model=ModelList, summary="The served model, its request defaults, limits and "
             "prompt grammar", responses=error_responses(401))
    async def list_models(request: Request) -> ModelList:
        service.authorize(request)
        return service.models()

    @api.get("/healthz", response_model=Health, summary="200 when the job store answers and every deployment of "
             "the app is running", responses={503: {"model": Health, "description": "What keeps the app from "
                                                                                    "serving"}})
    async def healthz() -> JSONResponse:
        problems = await service.health()
        if problems:
            return JSONResponse(status_code=503, content={"status": "unavailable", "problems": problems})
        return JSONResponse({"status": "ok"})

    # Open like /healthz, as vLLM, SGLang and TGI serve theirs: Prometheus scrapes it, and it holds counts and
    # timings, no job's content.
    @api.get("/metrics", response_class=PlainTextResponse, summary="Prometheus metrics: the app's srd_* series",
             responses={200: {"content": {EXPOSITION_CONTENT_TYPE: {"schema": {"type": "string"}}}}})
    async def metrics() -> PlainTextResponse:
        return PlainTextResponse(await service.metrics(), media_type=EXPOSITION_CONTENT_TYPE)

    playground.mount(api)  # the page at `/`, a client of the routes above
    return api


def _unhealthy_deployments() -> list[str]:
    """Deployments of this Serve app that are not running, each with the reason Serve gives (one line)."""
    from ray import serve

    try:
        app_name = serve.get_replica_context().app_name
        status = serve.status().applications[app_name]
    except Exception as e:  # the controller does not answer
        return [f"serve: {type(e).__name__}: {e}"]
    problems = []
    for name, deployment in status.deployments.items():
        if str(deployment.status.value) not in ("HEALTHY", "UPSCALING", "DOWNSCALING"):
            message = (deployment.message or "").strip().splitlines()
            problems.append(f"{name}: {deployment.status.value}" + (f": {message[-1]}" if message else ""))
    return problems


class Ingress(VideoService):
    """The Serve ingress (the builder wraps it in `serve.ingress()`): the service with the app's health, its
    FastAPI app built on the replica. The orchestrator is bound so that the app deploys it; jobs reach it through
    the store."""

    def __init__(self, orchestrator, config: AppConfig):
        from deployments.metrics import app_exposition

        super().__init__(config, problems=_unhealthy_deployments, metrics=app_exposition)
        self._orchestrator = orchestrator

    def __serve_build_asgi_app__(self) -> FastAPI:
        return make_api(self)
