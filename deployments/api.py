"""The job API's objects, shaped as OpenAI's Video API shapes them (so that the official `openai` SDK works
unchanged), with this server's extras beside OpenAI's fields.

Status: OpenAI knows queued, in_progress, completed and failed. A cancelled job is reported as `failed` with
`error.code == "cancelled"` and `cancelled: true` (the job store keeps `cancelled` as a state of its own).
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Literal

from pydantic import BaseModel, Field

from serve.jobs.state import JobError, JobRecord, StageRecord

if TYPE_CHECKING:
    from deployments.config import AppConfig


class Segment(BaseModel):
    """Denoising steps one model took: a segment of the job's plan."""

    stage: str = Field(description="The step: sketch, render, sketch.2 ...")
    start: int = Field(description="Its first denoising step.")
    stop: int = Field(description="One past its last.")


class Video(BaseModel):
    """A video job (OpenAI's Video object, plus this server's extras)."""

    id: str
    object: Literal["video"] = "video"
    model: str = Field(description="The served model that makes the video.")
    status: Literal["queued", "in_progress", "completed", "failed"]
    progress: int = Field(ge=0, le=100, description="Percent done; never decreases.")
    created_at: int = Field(description="Unix seconds.")
    completed_at: int | None = Field(None, description="Unix seconds at completion, failure or cancellation.")
    expires_at: int | None = Field(None, description="Always null: files are kept until the video is deleted.")
    size: str = Field(description="WIDTHxHEIGHT in pixels.")
    seconds: str = Field(description="Duration, (num_frames - 1) / fps.")
    prompt: str
    error: JobError | None = None
    # -- extras ------------------------------------------------------------------------------------------------
    cancelled: bool = Field(False, description="The job was cancelled (status failed, error.code cancelled).")
    stage: str | None = Field(None, description="The step working on the job now: encode, sketch, render, decode "
                                                "(sketch.2: a plan's second sketch segment).")
    steps_done: int = Field(0, description="Denoising steps done, all segments together.")
    switch_step: int | None = Field(None, description="K: steps the sketch model took (once sketching ended).")
    priority: str = Field("standard", description="Latency class: interactive, standard or batch.")
    switch_fixed: str | None = Field(None, description="A load-elastic request's schedule (`range:LO:HI`, "
                                                       "`floor:T`), fixed from the load as its sketch started.")
    switch_shift: int | None = Field(None, description="Rungs that schedule lies below the request's idle choice.")
    preemptions: int = Field(0, description="Times a stage paused the job mid-segment for a higher class (it "
                                            "resumed exactly where it stopped).")
    segments: list[Segment] = Field(default_factory=list, description="The denoising segments done so far.")
    num_frames: int
    fps: int
    request: dict = Field(description="The resolved request: every field filled in, the seed included.")
    timings: dict[str, float] = Field(default_factory=dict, description="Seconds of each finished stage.")
    stages: dict[str, StageRecord] = Field(default_factory=dict,
                                           description="Per stage: attempts, start/end, batch, last error.")
    failed_stage: str | None = None
    preview_ready: bool = Field(False, description="GET /v1/videos/{id}/preview has an image.")
    cancel_requested: bool = False
    cancelled_at_step: int | None = Field(None, description="Denoising steps done when a stage honoured the cancel.")
    version: int = Field(0, description="Increases with every change (server-sent events use it).")

    @property
    def terminal(self) -> bool:
        return self.status in ("completed", "failed")

    @classmethod
    def of(cls, job: JobRecord) -> Video:
        request = job.request
        status = "failed" if job.status == "cancelled" else job.status
        return cls(
            id=job.id, model=job.model, status=status, progress=job.progress, created_at=int(job.created_at),
            completed_at=None if job.completed_at is None else int(job.completed_at),
            size=f"{request['width']}x{request['height']}",
            seconds=f"{(request['num_frames'] - 1) / request['fps']:g}", prompt=request["prompt"],
            error=job.error, cancelled=job.status == "cancelled", stage=job.stage, steps_done=job.steps_done,
            switch_step=job.switch_step, priority=job.priority, switch_fixed=job.switch_fixed,
            switch_shift=job.switch_shift, preemptions=job.preemptions,
            segments=[Segment(stage=name, start=s.denoised[0], stop=s.denoised[1])
                      for name, s in job.stages.items() if s.denoised is not None],
            num_frames=request["num_frames"], fps=request["fps"], request=request,
            timings={name: s.end - s.start for name, s in job.stages.items() if s.end is not None and s.start},
            stages=job.stages, failed_stage=job.failed_stage, preview_ready=job.finished("preview"),
            cancel_requested=job.cancel_requested, cancelled_at_step=job.cancelled_at_step, version=job.version,
        )


class VideoList(BaseModel):
    object: Literal["list"] = "list"
    data: list[Video]
    first_id: str | None = None
    last_id: str | None = None
    has_more: bool = False


class VideoDeleted(BaseModel):
    id: str
    object: Literal["video.deleted"] = "video.deleted"
    deleted: bool = True


@dataclasses.dataclass
class VideoResult:
    """What a finished job produced; `generate` and `result` over a deployment handle return it."""

    job: Video
    video: bytes | None  # mp4, None unless completed
    latents: object | None  # torch float32 [1, C, F', H', W'], before VAE decode
    preview: bytes | None  # PNG of the sketch's estimate of the first frame
    thumbnail: bytes | None  # PNG of the video's first frame


class RequestDefaults(BaseModel):
    """What a request gets for each field it leaves out: the preset's defaults, with the server's speed profile."""

    width: int
    height: int
    num_frames: int
    num_inference_steps: int
    guidance_scale: float
    guidance_scale_2: float | None = Field(None, description="The render stage's; null: the same as guidance_scale.")
    flow_shift: float
    switch: str
    render_cache: float
    fps: int = Field(description="Frames per second of the video (not a request field: `seconds` is read at it).")


class ModelLimits(BaseModel):
    """What one request may cost here; beyond it a 422 names the field (413 for the body)."""

    max_tokens_per_video: int = Field(description="((frames-1)//4+1)*(height/16)*(width/16) for Wan.")
    max_steps: int
    max_prompt_chars: int
    max_body_bytes: int


class PromptGrammar(BaseModel):
    """The one sentence pattern a model pair was trained on (the toy pair): other prompts run, but it cannot draw
    them."""

    template: str = Field(description="The pattern, each slot as <slot>.")
    example: str
    vocabulary: dict[str, list[str]] = Field(description="Each slot's words, slots in prompt order.")


class Schedule(BaseModel):
    """A schedule the pair's calibration measured: what `switch: quality:T` chooses from."""

    switch: str
    cost: float = Field(description="Large-model step equivalents per step.")
    quality: float = Field(description="Quality relative to all-large.")


class Adapter(BaseModel):
    """A LoRA adapter of the server's registry: a request names it in the field of its stage."""

    name: str
    stage: Literal["sketch", "render"] = Field(description="The model it fits: sketch (large) or render (small).")
    field: Literal["sketch_loras", "render_loras"] = Field(description="The request field that names it.")
    num_inference_steps: int | None = Field(None, description="Steps a request naming it takes unless it sets "
                                                              "them; null: the model's.")
    guidance_scale: float | None = Field(None, description="Guidance of its stage unless the request sets it "
                                                           "(render: `guidance_scale_2`); null: the model's.")


class Model(BaseModel):
    """A served model (OpenAI's Model object), with what a client needs to build a request for it."""

    id: str
    object: Literal["model"] = "model"
    created: int = 0
    owned_by: str = "srd"
    # -- extras ------------------------------------------------------------------------------------------------
    preset: str = Field(description="The model preset the server runs.")
    speed: str = Field(description="The server's speed profile: exact, fast or fastest.")
    defaults: RequestDefaults
    limits: ModelLimits
    prompt_grammar: PromptGrammar | None = Field(None, description="The pair's prompt grammar; null: free text.")
    schedules: list[Schedule] = Field(default_factory=list, description="Calibrated schedules, for quality:T.")
    loras: list[Adapter] = Field(default_factory=list, description="LoRA adapters requests may name per stage "
                                                                   "(`sketch_loras`, `render_loras`).")


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[Model]

    @classmethod
    def of(cls, config: AppConfig) -> ModelList:
        """The served model with what a client needs to build its requests: the defaults, the limits, the prompt
        grammar and the calibrated schedules of the preset's own pair (not of models put in its place)."""
        from serve.models import PRESETS, preset_grammar

        engine = config.engine
        calibration = engine.pair_calibration()
        grammar = None if engine.sketch or engine.render else preset_grammar(PRESETS[engine.preset])
        defaults = engine.defaults
        model = Model(
            id=config.served_model, preset=engine.preset, speed=engine.speed_name,
            defaults=RequestDefaults(**{name: getattr(defaults, name) for name in RequestDefaults.model_fields}),
            limits=ModelLimits(**dataclasses.asdict(config.request_limits)),
            prompt_grammar=None if grammar is None else PromptGrammar(**grammar),
            schedules=[Schedule(switch=s.switch, cost=s.cost, quality=s.quality)
                       for s in (calibration.schedules if calibration else [])],
            loras=[Adapter(name=name, stage=spec.stage, field=f"{spec.stage}_loras",
                           num_inference_steps=spec.num_inference_steps, guidance_scale=spec.guidance_scale)
                   for name, spec in sorted(engine.loras.items())])
        return cls(data=[model])


class ErrorObject(BaseModel):
    """OpenAI's error object: what its SDK reads."""

    message: str = Field(description="One line; for a bad field it names the field and says what is allowed.")
    type: Literal["invalid_request_error"] = "invalid_request_error"
    param: str | None = Field(None, description="The request field at fault, if one is.")
    code: str = Field(description="invalid_request_error, not_found, not_ready, rate_limit_exceeded ...")


class ErrorLocation(BaseModel):
    """FastAPI's shape of a request error, so that FastAPI clients read it too."""

    loc: list[str] = Field(description="Where: body, query, path or header, then the field.")
    msg: str
    type: str = Field(description="The same as `error.code`.")


class ErrorResponse(BaseModel):
    """The body of every error status the API answers (all 4xx; /healthz's 503 is `Health`)."""

    error: ErrorObject
    detail: list[ErrorLocation]


class Health(BaseModel):
    status: Literal["ok", "unavailable"]
    problems: list[str] = Field(default_factory=list, description="What keeps the app from serving (503 only).")


def _text(value: str | None) -> str | None:
    """Text that encodes as UTF-8: a lone surrogate from the request (a JSON "\\ud800" key) is escaped."""
    return None if value is None else value.encode("utf-8", "backslashreplace").decode("utf-8")


def error_body(message: str, param: str | None, code: str = "invalid_request_error", location: str = "body") -> dict:
    """OpenAI's error shape (what its SDK reads), with FastAPI's `detail` list beside it (ErrorResponse);
    `location` is where `param` is (body, query, path or header)."""
    message, param = _text(message), _text(param)
    return {
        "error": {"message": message, "type": "invalid_request_error", "param": param, "code": code},
        "detail": [{"loc": [location, param] if param else [location], "msg": message, "type": code}],
    }
