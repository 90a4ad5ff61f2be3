"""The drive loop: claim unfinished jobs from the store and run their steps in order, holding no state of its own.

Plain asyncio with the stage call injected, so that it runs the same under the orchestrator deployment (whose
call is a Serve handle to the step's stage deployment, deployments/orchestrator.py) and in a test (a call into an
in-process stage, or one that fails on purpose):

    claim: jobs whose lease is free or expired become this driver's (a lease in the record, renewed while it drives
           them; a driver that stops renewing loses them to another, which resumes them from their checkpoints)
    drive: the job's next step after its checkpoint (serve/jobs/state.py), one at a time; side steps (the preview)
           beside the others as soon as their input exists; completion once every step, side steps too, is done

A stage reads a step's inputs from the results location and writes its outputs there, so a call carries only the
step, the job id and its parameters. A call that fails (its replica died, or the stage raised) is one attempt: the
same step runs again from the same checkpoint, until `max_attempts`; then the job fails with one line naming the
step and the cause. A cancel is honoured before each step and, by the stages, at every denoising step boundary.

Why not Ray Serve's asynchronous inference (`@task_consumer`, Celery): it needs a broker server (Redis or
RabbitMQ), which the embedded default must not, and its retries re-run a whole task, where a job here resumes
mid-way from its last hand-off. The job store already is the durable queue.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from serve.denoise import Cancelled, Preempted
from serve.jobs import state
from serve.jobs.config import JobsConfig
from serve.jobs.store import JobStore
from serve.pipeline.stage import Step
from serve.request import GenerationParams
from serve.switch import parse_switch

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class StepDone:
    """A stage stored a step's outputs for one job."""

    start: float
    end: float
    batch_id: str
    batch_size: int
    steps_done: int | None = None  # denoising steps: the segment's stop


StepCall = Callable[[Step, str, GenerationParams], Awaitable[StepDone | Cancelled | Preempted]]
# A load-elastic request -> the same with its switch fixed from the load now, and the rungs it moved (Planner.fix)
FixSwitch = Callable[[GenerationParams], tuple[GenerationParams, int]]


def sketch_backlog(store: JobStore) -> int:
    """The load signal of load-elastic switching (serve/priority.py), asked by a job about to start its sketch: the
    other unfinished jobs whose sketch is still to be done (all of them but the asking one), read from the store, so
    that every orchestrator replica sees every replica's jobs."""
    return max(0, sum(1 for job in store.unfinished() if not job.finished("sketch")) - 1)


def error_message(error: BaseException) -> str:
    """One line naming the failure: the stage's own exception, not a wrapper's (Ray's `cause`) and traceback."""
    cause = getattr(error, "cause", None) or error
    text = str(cause).strip().splitlines()
    return f"{type(cause).__name__}: {text[0]}" if text else type(cause).__name__


def retry_delay_s(attempts: int) -> float:
    """The wait before a step's next attempt after `attempts` failed ones (a plain function so that the cluster
    simulator, deployments/simulate, retries as the drive loop does)."""
    return min(2.0 ** attempts / 4, 5.0)


class Driver:
    """Drives jobs of `store` through the steps `steps_of(params)` gives them, calling `call(step, job_id, params)`
    for each; at most `max_running_jobs` at once. `on_finished(job)` sees every job this driver ended.

    Latency classes (serve/priority.py): jobs are claimed by class, then age; a step its stage preempted
    (`Preempted`) is recorded as the job's mid-step checkpoint and called again, reading that checkpoint. A
    load-elastic request's switch is fixed by `fix_switch` (the Planner's, with its load signal) just before its
    first denoising step; without `fix_switch` it runs its idle choice."""

    def __init__(self, store: JobStore, steps_of: Callable[[GenerationParams], tuple[Step, ...]], call: StepCall,
                 jobs: JobsConfig, worker: str, max_running_jobs: int = 256,
                 on_finished: Callable[[state.JobRecord], None] | None = None, fix_switch: FixSwitch | None = None):
        self.store = store
        self._fix_switch = fix_switch
        self.worker = worker
        self._steps_of = steps_of
        self._call = call
        self._jobs = jobs
        self._max_running = max_running_jobs
        self._on_finished = on_finished
        self._driving: dict[str, asyncio.Task] = {}  # strong references: the event loop keeps only weak ones

    def running(self) -> list[str]:
        """Jobs this driver drives now."""
        return sorted(self._driving)

    # -- claiming ---------------------------------------------------------------------------------------------

    async def run(self) -> None:
        """Claim and drive jobs until cancelled, renewing the leases of those driven."""
        renew_every = self._jobs.lease_s / 3
        last_renewal = 0.0
        while True:
            try:
                await self.claim()
                if time.monotonic() - last_renewal >= renew_every:
                    last_renewal = time.monotonic()
                    await self.renew_leases()
            except RuntimeError as error:
                if "after shutdown" in str(error):  # the process is shutting down: its jobs' leases will expire
                    return
                logger.exception("drive loop: claim")
            except Exception:  # the store is unreachable for a moment: jobs keep running, leases renew later
                logger.exception("drive loop: claim")
            await asyncio.sleep(self._jobs.poll_interval_s)

    async def claim(self) -> list[str]:
        """One round: claim what there is room for and start driving it; returns the ids claimed."""
        room = self._max_running - len(self._driving)
        if room <= 0:
            return []
        claimed = await asyncio.to_thread(self.store.claim, self.worker, self._jobs.lease_s, room,
                                          aging_s=self._jobs.classes.aging_s)
        for job in claimed:
            if job.id not in self._driving:
                task = asyncio.create_task(self.drive(job.id))
                self._driving[job.id] = task
                task.add_done_callback(lambda _, job_id=job.id: self._driving.pop(job_id, None))
        return [job.id for job in claimed]

    async def renew_leases(self) -> None:
        for job_id, task in list(self._driving.items()):
            if not await asyncio.to_thread(self.store.renew, job_id, self.worker, self._jobs.lease_s):
                task.cancel()  # finished, deleted, or taken over by another driver: stop driving it

    # -- driving one job --------------------------------------------------------------------------------------

    async def _update(self, job_id: str, change) -> state.JobRecord | None:
        """Apply a state-machine step to the stored record; a step that no longer applies (the job was cancelled
        or finished meanwhile) leaves the record as it is."""
        def guarded(job: state.JobRecord) -> state.JobRecord | None:
            if job.terminal:
                return None
            try:
                return change(job)
            except state.InvalidTransition:
                return None

        updated = await asyncio.to_thread(self.store.update, job_id, guarded)
        if updated is not None and updated.terminal and self._on_finished is not None:  # this change ended it
            self._on_finished(updated)
        return updated

    async def drive(self, job_id: str) -> None:
        """Run the job's remaining steps; returns once it is completed, failed or cancelled (or gone)."""
        side: dict[str, asyncio.Task] = {}
        try:
            while True:
                job = await asyncio.to_thread(self.store.get, job_id)
                if job is None or job.terminal:
                    return
                if job.cancel_requested:
                    await self._update(job_id, lambda j: state.cancelled(j, j.steps_done))
                    return
                params = GenerationParams.from_dict(job.request)
                if job.switch_fixed is not None:
                    params = dataclasses.replace(params, switch=parse_switch(job.switch_fixed))
                steps = self._steps_of(params)
                self._start_side_steps(job, steps, params, side)
                step = job.next_step(steps)
                if step is None:
                    if side:
                        await asyncio.wait(side.values())
                    await self._update(job_id, state.complete)
                    return
                if step.phase == "denoise" and params.switch.elastic and self._fix_switch is not None:
                    fixed, shift = await asyncio.to_thread(self._fix_switch, params)
                    await self._update(job_id, lambda j: state.fix_switch(j, str(fixed.switch), shift))
                    continue  # planned again with the fixed schedule
                if await self._update(job_id, lambda j: state.start_step(j, step, time.time())) is None:
                    continue
                record = job.stages.get(step.name)
                call = step.resumed() if record is not None and record.resume_at is not None else step
                outcome = await self._attempt(job_id, call, params)
                if isinstance(outcome, Cancelled):
                    await self._update(job_id, lambda j: state.cancelled(j, outcome.step_index))
                    return
                if isinstance(outcome, Preempted):
                    await self._update(job_id, lambda j: state.preempted(j, step, outcome.step_index))
                    continue  # back to its stage's queue, to resume from the checkpoint just stored
                if outcome is not None:
                    await self._update(job_id, lambda j: state.finish_step(
                        j, step, outcome.end, outcome.batch_id, outcome.batch_size, outcome.steps_done))
        except asyncio.CancelledError:
            raise
        except Exception as error:  # a bug here must not leave the job in progress for ever
            logger.exception("video job %s: driving failed", job_id)
            await self._update(job_id, lambda j: state.fail(j, "internal_error", error_message(error)))
        finally:
            for task in side.values():
                task.cancel()

    async def _attempt(self, job_id: str, step: Step, params: GenerationParams
                       ) -> StepDone | Cancelled | Preempted | None:
        """One attempt of `step`: its outcome, or None after recording the failure (and waiting a little before the
        next attempt, which the caller makes if the job is still running)."""
        try:
            return await self._call(step, job_id, params)
        except Exception as error:  # a dead replica or the stage's own failure: this attempt failed
            message = error_message(error)
            logger.warning("video job %s: %s attempt failed: %s", job_id, step.name, message)
            failed = await self._update(
                job_id, lambda j: state.fail_attempt(j, step, message, self._jobs.max_attempts))
            if failed is not None and not failed.terminal and step.phase != "side":
                await asyncio.sleep(retry_delay_s(failed.stages[step.name].attempts))
            return None

    def _start_side_steps(self, job: state.JobRecord, steps: tuple[Step, ...], params: GenerationParams,
                          side: dict[str, asyncio.Task]) -> None:
        """Start each side step whose input exists (the main step before it is done) and that has not run, once
        per drive; a failure only leaves the job without that step's outputs."""
        producer = None
        for step in steps:
            if step.phase != "side":
                producer = step
                continue
            record = job.stages.get(step.name)
            if (step.name in side or producer is None or not job.finished(producer.name) or job.finished(step.name)
                    or (record is not None and record.attempts >= self._jobs.max_attempts)):
                continue
            side[step.name] = asyncio.create_task(self._side_step(job.id, step, params))

    async def _side_step(self, job_id: str, step: Step, params: GenerationParams) -> None:
        if await self._update(job_id, lambda j: state.start_step(j, step, time.time())) is None:
            return
        outcome = await self._attempt(job_id, step, params)
        if isinstance(outcome, StepDone):
            await self._update(job_id, lambda j: state.finish_step(j, step, outcome.end, outcome.batch_id,
                                                                   outcome.batch_size))
