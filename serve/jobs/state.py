"""The video job state machine: states, transitions, progress and attempts. No Ray, no storage: pure functions over
`JobRecord`, so the drive loop, the stages, the ingress and the tests all apply the same rules.

    queued --claim--> in_progress --step by step--> completed
       \\                 |  \\-- a step fails its last attempt --> failed
        \\-- cancel ------+------ cancel honoured --------------> cancelled

A job runs the steps of its plan (serve/pipeline/stage.py: encode, the denoising segments, decode) in order. Each
step's outputs are artifacts in the results location; `JobRecord.checkpoint` names the last step whose outputs are
stored, so a job taken over after a fault resumes at the next step (a fault while rendering never re-runs the
sketch). Each step has at most `max_attempts` attempts; the record keeps the count and the last error of each. Side
steps (the preview) are recorded too, but never move the checkpoint and never fail the job.

Progress is integer percent and never decreases: the prepare steps end at ENCODED, the denoising steps (all
segments together) fill up to DENOISED, completion is 100.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Sequence
from typing import TYPE_CHECKING, Literal

from pydantic import BaseModel, Field

from serve.priority import DEFAULT_PRIORITY

if TYPE_CHECKING:
    from serve.pipeline.stage import Step

JobStatus = Literal["queued", "in_progress", "completed", "failed", "cancelled"]
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
    """One step of one job: its attempts, when its last attempt ran, in which batch, and its last error."""

    attempts: int = Field(0, description="Attempts started so far (a retried step counts each).")
    start: float | None = Field(None, description="Start of the last attempt (epoch seconds).")
    end: float | None = Field(None, description="End of the successful attempt (epoch seconds).")
    batch_id: str | None = Field(None, description="Jobs with the same batch_id shared one engine call.")
    batch_size: int | None = Field(None, description="Requests in that batch.")
    error: str | None = Field(None, description="The last attempt's failure, one line.")
    denoised: tuple[int, int] | None = Field(
        None, description="A denoising step's steps: the first and one past the last it took.")
    preemptions: int = Field(0, description="Times the step yielded its stage to more urgent work mid-segment.")
    resume_at: int | None = Field(
        None, description="A preempted denoising step's checkpoint: the denoising steps its `resume` artifact holds; "
        "the step's next call continues from there (cleared once the step finishes).")


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
    stage: str | None = Field(None, description="The step working on the job now: encode, sketch, render, decode "
                                                "(sketch.2 for a plan's second sketch segment).")
    progress: int = Field(0, ge=0, le=100)
    steps_done: int = Field(0, description="Denoising steps done, all segments together.")
    switch_step: int | None = Field(None, description="K: steps the sketch model took (once sketching ended).")
    switch_fixed: str | None = Field(
        None, description="A load-elastic request's schedule (`range:LO:HI`, `floor:T`), fixed from the load when its "
        "sketch was about to start; every later step runs it.")
    switch_shift: int | None = Field(
        None, description="Rungs that schedule lies below the request's idle choice (0: none; its floor is the last).")
    request: dict = Field(description="The resolved request (GenerationParams as data), seed included.")
    created_at: float
    started_at: float | None = None
    completed_at: float | None = Field(None, description="When it completed, failed or was cancelled.")
    stages: dict[str, StageRecord] = Field(default_factory=dict, description="Per step, by its name.")
    checkpoint: str | None = Field(None, description="Last step whose outputs are stored (resume point).")
    failed_stage: str | None = None
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

    @property
    def priority(self) -> str:
        """The job's latency class (serve/priority.py), as its request resolved it."""
        return self.request.get("priority", DEFAULT_PRIORITY)

    @property
    def preemptions(self) -> int:
        return sum(record.preemptions for record in self.stages.values())

    def finished(self, step: str) -> bool:
        """Whether step `step` stored its outputs."""
        record = self.stages.get(step)
        return record is not None and record.end is not None

    def next_step(self, steps: Sequence[Step]) -> Step | None:
        """The main (not side) step to run next: the one after the checkpoint (None once all are done)."""
        main = [step for step in steps if step.phase != "side"]
        names = [step.name for step in main]
        done = -1 if self.checkpoint is None else names.index(self.checkpoint)
        return main[done + 1] if done + 1 < len(main) else None

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
    """A stage reports denoising steps done; progress never goes down (a retried step recounts its steps)."""
    progress = max(job.progress, progress_after_steps(steps_done, job.num_steps))
    return job.model_copy(update={"steps_done": steps_done, "progress": progress})


def start_step(job: JobRecord, step: Step, now: float) -> JobRecord:
    """An attempt of `step` begins: the job is in progress (a main step also becomes its `stage`) and the step's
    attempt count goes up."""
    record = job.stages.get(step.name, StageRecord())
    record = record.model_copy(update={"attempts": record.attempts + 1, "start": now, "end": None})
    current = job.stage if step.phase == "side" else step.name
    return _to(job, "in_progress", stage=current, started_at=job.started_at or now,
               stages={**job.stages, step.name: record})


def finish_step(job: JobRecord, step: Step, end: float, batch_id: str | None = None,
                batch_size: int | None = None, steps_done: int | None = None) -> JobRecord:
    """`step` stored its outputs: a main step becomes the job's checkpoint; a denoising step's `steps_done` moves
    progress (and the first segment's is the switch step K)."""
    update: dict = {"end": end, "batch_id": batch_id, "batch_size": batch_size, "resume_at": None}
    if step.phase == "denoise" and steps_done is not None:
        first = max((r.denoised[1] for r in job.stages.values() if r.denoised), default=0)
        update["denoised"] = (first, steps_done)
    record = job.stages.get(step.name, StageRecord()).model_copy(update=update)
    fields: dict = {"stages": {**job.stages, step.name: record}}
    if step.phase == "side":
        return job.model_copy(update=fields)
    fields["checkpoint"] = step.name
    if step.phase == "prepare":
        fields["progress"] = max(job.progress, ENCODED)
    if step.phase == "denoise" and steps_done is not None:
        if step.segment == 0:
            fields["switch_step"] = steps_done
        fields.update(with_progress(job, steps_done).model_dump(include={"steps_done", "progress"}))
    return job.model_copy(update=fields)


def preempted(job: JobRecord, step: Step, at_step: int) -> JobRecord:
    """A denoising step yielded its stage after `at_step` denoising steps and stored its trajectory: it stays the
    next step, resumes from `at_step`, and the call does not count as an attempt (it did not fail)."""
    record = job.stages.get(step.name, StageRecord())
    record = record.model_copy(update={"attempts": max(0, record.attempts - 1), "start": None,
                                       "preemptions": record.preemptions + 1, "resume_at": at_step})
    job = with_progress(job, at_step)
    return job.model_copy(update={"stages": {**job.stages, step.name: record}})


def fix_switch(job: JobRecord, switch: str, shift: int) -> JobRecord:
    """A load-elastic request's schedule is fixed (before its sketch starts): `switch`, `shift` rungs below its
    idle choice."""
    return job.model_copy(update={"switch_fixed": switch, "switch_shift": shift})


def fail_attempt(job: JobRecord, step: Step, message: str, max_attempts: int) -> JobRecord:
    """An attempt of `step` failed. The job fails once a main step has used all `max_attempts`; else it stays in
    progress and the same step runs again from the same checkpoint. A side step's failure is only recorded."""
    record = job.stages.get(step.name, StageRecord()).model_copy(update={"error": message})
    job = job.model_copy(update={"stages": {**job.stages, step.name: record}})
    if step.phase == "side" or record.attempts < max_attempts:
        return job
    return _to(job, "failed", stage=None, failed_stage=step.name, completed_at=time.time(),
               error=JobError(code="stage_failed",
                              message=f"{step.name} failed after {record.attempts} attempt(s): {message}"))


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
    """A stage honoured the cancel after `at_step` denoising steps (all segments together)."""
    return _to(job, "cancelled", stage=None, cancel_requested=True, cancelled_at_step=at_step, steps_done=at_step,
               completed_at=time.time(),
               error=JobError(code="cancelled", message=f"cancelled by the client after {at_step} denoising steps"))


def fail(job: JobRecord, code: str, message: str) -> JobRecord:
    return _to(job, "failed", stage=None, completed_at=time.time(), error=JobError(code=code, message=message))
