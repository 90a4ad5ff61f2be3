"""The video job state machine: states, transitions, progress and attempts. No Ray, no storage: pure functions over
`JobRecord`, so the orchestrator, the stages, the ingress and the tests all apply the same rules.

    queued --claim--> in_progress --stage by stage--> completed
       \\                 |  \\-- a stage fails its last attempt --> failed
        \\-- cancel ------+------ cancel honoured --------------> cancelled

A job runs four stages in order (encode, sketch, render, decode). Each stage's output is a checkpoint in the results
location; `JobRecord.checkpoint` names the last stage whose output is stored, so a job taken over after a fault
resumes at the next stage (a renderer fault never re-runs the sketch). Each stage has at most `max_attempts`
attempts; the record keeps the count and the last error of each.

Progress is integer percent and never decreases: encoding ends at ENCODED, the denoising steps (sketch and render
together) fill up to DENOISED, decoding ends at 100.
"""

from __future__ import annotations

import time
import uuid
from typing import Literal

from pydantic import BaseModel, Field

JobStatus = Literal["queued", "in_progress", "completed", "failed", "cancelled"]
StageName = Literal["encode", "sketch", "render", "decode"]
STAGES: tuple[StageName, ...] = ("encode", "sketch", "render", "decode")
TERMINAL: frozenset[str] = frozenset({"completed", "failed", "cancelled"})
TRANSITIONS: dict[str, frozenset[str]] = {
    "queued": frozenset({"in_progress", "cancelled", "failed"}),
    "in_progress": frozenset({"completed", "failed", "cancelled"}),
    "completed": frozenset(), "failed": frozenset(), "cancelled": frozenset(),
}
ENCODED, DENOISED = 5, 95


class InvalidTransition(ValueError):
    """A status change the state machine does not allow (for example, completing a cancelled job)."""


class StageRecord(BaseModel):
    """One stage of one job: its attempts, when its last attempt ran, in which batch, and its last error."""

    attempts: int = Field(0, description="Attempts started so far (a retried stage counts each).")
    start: float | None = Field(None, description="Start of the last attempt (epoch seconds).")
    end: float | None = Field(None, description="End of the successful attempt (epoch seconds).")
    batch_id: str | None = Field(None, description="Jobs with the same batch_id shared one engine call.")
    batch_size: int | None = Field(None, description="Requests in that batch.")
    error: str | None = Field(None, description="The last attempt's failure, one line.")


class JobError(BaseModel):
    """Why a job did not complete, as OpenAI's Video API reports it."""

    code: str = Field(description="stage_failed, cancelled or internal_error.")
    message: str = Field(description="One line; for a failed stage it names the stage and the cause.")


class JobRecord(BaseModel):
    """Everything the store keeps of a job. Clients see it through the API's `Video` object."""

    id: str
    owner: str | None = Field(None, description="Hash of the bearer token that created the job (None: auth off).")
    model: str = Field(description="The served model name the job ran on.")
    status: JobStatus = "queued"
    stage: StageName | None = Field(None, description="The stage working on the job now.")
    progress: int = Field(0, ge=0, le=100)
    steps_done: int = Field(0, description="Denoising steps done, sketch and render together.")
    switch_step: int | None = Field(None, description="K: steps the sketch model took (once sketching ended).")
    request: dict = Field(description="The resolved request (GenerationParams as data), seed included.")
    created_at: float
    started_at: float | None = None
    completed_at: float | None = Field(None, description="When it completed, failed or was cancelled.")
    stages: dict[StageName, StageRecord] = Field(default_factory=dict)
    checkpoint: StageName | None = Field(None, description="Last stage whose output is stored (resume point).")
    preview_ready: bool = False
    failed_stage: StageName | None = None
    error: JobError | None = None
    cancel_requested: bool = False
    cancelled_at_step: int | None = None
    lease_owner: str | None = Field(None, description="The orchestrator replica driving the job.")
    lease_expires_at: float | None = Field(None, description="After this, any orchestrator may take the job over.")
    version: int = Field(0, description="Increases with every change.")

    @property
    def terminal(self) -> bool:
        return self.status in TERMINAL

    @property
    def num_steps(self) -> int:
        return int(self.request["num_inference_steps"])

    def next_stage(self, stages: tuple[str, ...] = STAGES) -> StageName | None:
        """The stage to run next in `stages` (the job's plan): the one after the last checkpoint (None once
        decoded)."""
        done = -1 if self.checkpoint is None else stages.index(self.checkpoint)
        return stages[done + 1] if done + 1 < len(stages) else None

    def attempts(self) -> dict[str, int]:
        return {name: stage.attempts for name, stage in self.stages.items()}


def new_job(request: dict, model: str, owner: str | None = None, now: float | None = None) -> JobRecord:
    return JobRecord(id=f"video_{uuid.uuid4().hex}", owner=owner, model=model, request=request,
                     created_at=time.time() if now is None else now)


def _to(job: JobRecord, status: JobStatus, **fields) -> JobRecord:
    if status != job.status and status not in TRANSITIONS[job.status]:
        raise InvalidTransition(f"video job {job.id} cannot go from {job.status} to {status}")
    return job.model_copy(update={"status": status, **fields})


def progress_after_steps(steps_done: int, num_steps: int) -> int:
    return ENCODED + (DENOISED - ENCODED) * min(steps_done, num_steps) // max(num_steps, 1)


def with_progress(job: JobRecord, steps_done: int) -> JobRecord:
    """A stage reports denoising steps done; progress never goes down (a retried stage recounts its steps)."""
    progress = max(job.progress, progress_after_steps(steps_done, job.num_steps))
    return job.model_copy(update={"steps_done": steps_done, "progress": progress})


def start_stage(job: JobRecord, stage: StageName, now: float) -> JobRecord:
    """An attempt of `stage` begins: the job is in progress and the stage's attempt count goes up."""
    record = job.stages.get(stage, StageRecord())
    record = record.model_copy(update={"attempts": record.attempts + 1, "start": now, "end": None})
    return _to(job, "in_progress", stage=stage, started_at=job.started_at or now,
               stages={**job.stages, stage: record})


def finish_stage(job: JobRecord, stage: StageName, end: float, batch_id: str | None = None,
                 batch_size: int | None = None, switch_step: int | None = None) -> JobRecord:
    """`stage` stored its output: it becomes the job's checkpoint."""
    record = job.stages.get(stage, StageRecord()).model_copy(
        update={"end": end, "batch_id": batch_id, "batch_size": batch_size})
    fields: dict = {"stages": {**job.stages, stage: record}, "checkpoint": stage}
    if stage == "encode":
        fields["progress"] = max(job.progress, ENCODED)
    if stage == "sketch" and switch_step is not None:
        fields["switch_step"] = switch_step
        fields.update(with_progress(job, switch_step).model_dump(include={"steps_done", "progress"}))
    if stage == "render":
        fields.update(with_progress(job, job.num_steps).model_dump(include={"steps_done", "progress"}))
    return job.model_copy(update=fields)


def fail_attempt(job: JobRecord, stage: StageName, message: str, max_attempts: int) -> JobRecord:
    """An attempt of `stage` failed. The job fails once the stage has used all `max_attempts`; else it stays in
    progress and the same stage runs again from the same checkpoint."""
    record = job.stages.get(stage, StageRecord()).model_copy(update={"error": message})
    job = job.model_copy(update={"stages": {**job.stages, stage: record}})
    if record.attempts < max_attempts:
        return job
    return _to(job, "failed", stage=None, failed_stage=stage, completed_at=time.time(),
               error=JobError(code="stage_failed",
                              message=f"{stage} failed after {record.attempts} attempt(s): {message}"))


def complete(job: JobRecord) -> JobRecord:
    return _to(job, "completed", stage=None, progress=100, completed_at=time.time())


def request_cancel(job: JobRecord) -> JobRecord:
    """Ask the job to stop. A queued job stops at once; a running one at its stages' next step boundary."""
    if job.terminal:
        return job
    if job.status == "queued":
        return cancelled(job, job.steps_done)
    return job.model_copy(update={"cancel_requested": True})


def cancelled(job: JobRecord, at_step: int) -> JobRecord:
    """A stage honoured the cancel after `at_step` denoising steps (sketch and render together)."""
    return _to(job, "cancelled", stage=None, cancel_requested=True, cancelled_at_step=at_step, steps_done=at_step,
               completed_at=time.time(),
               error=JobError(code="cancelled", message=f"cancelled by the client after {at_step} denoising steps"))


def fail(job: JobRecord, code: str, message: str) -> JobRecord:
    return _to(job, "failed", stage=None, completed_at=time.time(), error=JobError(code=code, message=message))
