"""Orchestrator deployment: a shim over the drive loop (serve/jobs/drive.py), which claims jobs from the store and
runs their steps in order. Its one Serve-specific part is the step call: the handle of the deployment that hosts
the step's stage. It holds no state: when a replica dies, its leases expire and another replica (or its own
replacement) takes the jobs over from their checkpoints.
"""

from __future__ import annotations

import asyncio
import os
import uuid

from deployments.config import OrchestratorConfig
from deployments.metrics import JobMetrics
from serve.config import EngineConfig
from serve.jobs.config import JobsConfig
from serve.jobs.drive import Driver, sketch_backlog
from serve.jobs.store import JobStore
from serve.pipeline.registry import PIPELINE
from serve.pipeline.stage import Pipeline, Planner, Step
from serve.request import GenerationParams


class Orchestrator:
    def __init__(self, deployments: dict, engine: EngineConfig, config: OrchestratorConfig, jobs: JobsConfig,
                 pipeline: Pipeline = PIPELINE):
        missing = sorted({stage.deployment for stage in pipeline.stages} - set(deployments))
        if missing:
            raise ValueError(f"the pipeline's stages need deployment(s) {', '.join(missing)}, which the app lacks")
        hosts = {stage.name: deployments[stage.deployment] for stage in pipeline.stages}

        async def call(step: Step, job_id: str, params: GenerationParams):
            return await hosts[step.stage].run.remote(step, job_id, params)

        store = JobStore(jobs.store, jobs.store_table)
        planner = Planner(engine, pipeline, backlog=lambda: sketch_backlog(store),
                          backlog_per_shift=jobs.classes.backlog_per_shift)
        self.driver = Driver(store, planner.steps, call, jobs,
                             worker=f"orchestrator-{os.getpid()}-{uuid.uuid4().hex[:8]}",
                             max_running_jobs=config.max_running_jobs, on_finished=JobMetrics().finished,
                             fix_switch=planner.fix)
        self._loop = asyncio.get_running_loop().create_task(self.driver.run())

    def __del__(self):  # Serve calls it when the replica shuts down
        if hasattr(self, "_loop"):
            self._loop.cancel()

    async def running(self) -> list[str]:
        """Jobs this replica drives now (tests, stats)."""
        return self.driver.running()
