"""Orchestrator deployment: drives jobs through the stages, holding no state of its own.

Every replica loops: claim unfinished jobs from the job store (a lease in the record, renewed while the replica
drives the job), then run the remaining stages of the job's plan (serve/plan.py: the same plan the in-process Engine
runs) in order, starting after its last checkpoint, each on the deployment that holds that stage's model:

    encode -> Encoder.encode, sketch -> Sketcher.denoise, render -> Renderer.denoise, decode -> Decoder.decode
    (Decoder.preview beside rendering, once the sketch's hand-off is stored)

A stage reads its input checkpoint from the results location and writes its output there, so a call carries only
the job id and its parameters. When a stage call fails (its replica died, or the stage raised), the attempt is
recorded and the same stage runs again from the same checkpoint, up to `jobs.max_attempts`; then the job fails
with one line naming the stage and the cause. When this replica dies, its leases expire and another replica (or
its own replacement) takes the jobs over from their checkpoints: nothing is lost, and a finished sketch is never
re-run.

Why not Ray Serve's asynchronous inference (`@task_consumer`, Celery): it needs a broker server (Redis or
RabbitMQ), which the embedded default must not, and its retries re-run a whole task, where a job here must resume
mid-way from its hand-off checkpoint. The job store already is the durable queue.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
import uuid

from deployments.batching import StageDone
from deployments.config import JobsConfig, OrchestratorConfig
from deployments.metrics import JobMetrics
from serve import jobs
from serve.engine import EngineConfig
from serve.job_store import JobStore
from serve.plan import Plan, make_plan
from serve.request import GenerationParams
from serve.stages import Cancelled

logger = logging.getLogger("ray.serve")


def error_message(error: BaseException) -> str:
    """One line naming the failure: the stage's own exception, not Ray's wrapper and traceback."""
    cause = getattr(error, "cause", None) or error
    text = str(cause).strip().splitlines()
    return f"{type(cause).__name__}: {text[0]}" if text else type(cause).__name__


class Orchestrator:
    def __init__(self, encoder, sketcher, renderer, decoder, engine: EngineConfig, config: OrchestratorConfig,
                 jobs_config: JobsConfig):
        self._calls = {
            "encode": encoder.encode, "sketch": sketcher.denoise, "render": renderer.denoise, "decode": decoder.decode,
        }
        self._models = engine.models()
        self._family = engine.family().name
        self._decoder = decoder
        self._config = config
        self._jobs = jobs_config
        self._store = JobStore(jobs_config.store, jobs_config.store_table)
        self.worker = f"orchestrator-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self._metrics = JobMetrics()
        self._driving: dict[str, asyncio.Task] = {}  # strong references: the event loop keeps only weak ones
        self._loop = asyncio.get_running_loop().create_task(self._claim_loop())

    async def _update(self, job_id: str, change) -> jobs.JobRecord | None:
        """Apply a state-machine step to the stored record; a step that no longer applies (the job was cancelled
        or finished meanwhile) leaves the record as it is."""
        def guarded(job: jobs.JobRecord) -> jobs.JobRecord | None:
            if job.terminal:
                return None
            try:
                return change(job)
            except jobs.InvalidTransition:
                return None

        updated = await asyncio.to_thread(self._store.update, job_id, guarded)
        if updated is not None and updated.terminal:  # this step ended the job
            self._metrics.finished(updated)
        return updated

    # -- claiming ---------------------------------------------------------------------------------------------

    async def _claim_loop(self) -> None:
        renew_every = self._jobs.lease_s / 3
        last_renewal = 0.0
        while True:
            try:
                room = self._config.max_running_jobs - len(self._driving)
                if room > 0:
                    claimed = await asyncio.to_thread(self._store.claim, self.worker, self._jobs.lease_s, room)
                    for job in claimed:
                        if job.id not in self._driving:
                            task = asyncio.create_task(self._drive(job.id))
                            self._driving[job.id] = task
                            task.add_done_callback(lambda _, job_id=job.id: self._driving.pop(job_id, None))
                if time.monotonic() - last_renewal >= renew_every:
                    last_renewal = time.monotonic()
                    await self._renew_leases()
            except RuntimeError as error:
                if "after shutdown" in str(error):  # the replica is shutting down: its jobs' leases will expire
                    return
                logger.exception("orchestrator: claim loop")
            except Exception:  # the store is unreachable for a moment: jobs keep running, leases renew later
                logger.exception("orchestrator: claim loop")
            await asyncio.sleep(self._jobs.poll_interval_s)

    async def _renew_leases(self) -> None:
        for job_id, task in list(self._driving.items()):
            if not await asyncio.to_thread(self._store.renew, job_id, self.worker, self._jobs.lease_s):
                task.cancel()  # finished, deleted, or taken over by another replica: stop driving it

    # -- driving one job --------------------------------------------------------------------------------------

    def plan(self, params: GenerationParams) -> Plan:
        """The job's stages. Its switch step may stay open here (boundary and adaptive policies): the sketch stage
        decides it, and only the order of the stages matters to the orchestrator."""
        plan = make_plan(self._family, params, self._models)
        missing = [stage for stage in plan.stages if stage not in self._calls]
        if missing:
            raise ValueError(f"this app has no deployment for the plan's stage(s) {', '.join(missing)}")
        return plan

    async def _drive(self, job_id: str) -> None:
        preview: asyncio.Task | None = None
        try:
            while True:
                job = await asyncio.to_thread(self._store.get, job_id)
                if job is None or job.terminal:
                    return
                if job.cancel_requested:
                    await self._update(job_id, lambda j: jobs.cancelled(j, j.steps_done))
                    return
                params = GenerationParams.from_dict(job.request)
                stage = job.next_stage(self.plan(params).stages)
                if stage is None:
                    if preview is not None:
                        await asyncio.wait([preview])
                    await self._update(job_id, jobs.complete)
                    return
                if await self._update(job_id, lambda j: jobs.start_stage(j, stage, time.time())) is None:
                    continue
                try:
                    outcome = await self._calls[stage].remote(job_id, params)
                except Exception as error:  # a dead replica or the stage's own failure: this attempt failed
                    message = error_message(error)
                    logger.warning("video job %s: %s attempt failed: %s", job_id, stage, message)
                    failed = await self._update(
                        job_id, lambda j: jobs.fail_attempt(j, stage, message, self._jobs.max_attempts))
                    if failed is not None and not failed.terminal:
                        await asyncio.sleep(min(2.0 ** failed.stages[stage].attempts / 4, 5.0))
                    continue
                if isinstance(outcome, Cancelled):
                    await self._update(job_id, lambda j: jobs.cancelled(j, outcome.step_index))
                    return
                await self._record_done(job_id, stage, outcome)
                if stage == "sketch":
                    preview = asyncio.create_task(self._preview(job_id))
        except asyncio.CancelledError:
            raise
        except Exception as error:  # a bug here must not leave the job in progress for ever
            logger.exception("video job %s: orchestration failed", job_id)
            await self._update(job_id, lambda j: jobs.fail(j, "internal_error", error_message(error)))

    async def _record_done(self, job_id: str, stage: jobs.StageName, done: StageDone) -> None:
        await self._update(job_id, lambda j: jobs.finish_stage(
            j, stage, done.end, batch_id=done.batch_id, batch_size=done.batch_size, switch_step=done.switch_step))

    async def _preview(self, job_id: str) -> None:
        """The sketch's preview image, beside rendering; a failure here only leaves the job without a preview."""
        try:
            if await self._decoder.preview.remote(job_id):
                await self._update(job_id, lambda j: j.model_copy(update={"preview_ready": True}))
        except Exception as error:
            logger.warning("video job %s: no preview: %s", job_id, error_message(error))

    def __del__(self):  # Serve calls it when the replica shuts down
        if hasattr(self, "_loop"):
            self._loop.cancel()

    async def running(self) -> list[str]:
        """Jobs this replica drives now (tests, stats)."""
        return sorted(self._driving)
