"""The stage deployment: one class for every deployment of the pipeline (Encoder, Sketcher, Renderer, Decoder).

A replica hosts the stages whose `deployment` is its name (serve/pipeline/registry.py; the Decoder hosts decode
and the preview) and loads them once, sharing their models. A call names one step of one job: the replica reads the
step's input artifacts from the results location, runs the step's stage over a batch of such calls
(deployments/batching.py), writes the step's output artifacts and returns a small `StepDone`. Which artifact a
step reads or writes is the step's declaration, not a convention of this class.

A denoising stage whose deployment config asks for more than one rank gets its worker group on the replica's
placement group (deployments/worker_group.py); a dead or stuck rank fails the health check, and Serve replaces
the replica, ranks and all.
"""

from __future__ import annotations

import logging
import time

from deployments.batching import DeviceTurns, StageRunner
from deployments.config import StageConfig
from deployments.metrics import HandoffMetrics, LoraMetrics
from deployments.worker_group import parallel_denoiser
from serve.config import EngineConfig
from serve.denoise import Cancelled, Preempted
from serve.jobs.config import JobsConfig
from serve.jobs.drive import StepDone
from serve.jobs.results import ResultStore
from serve.models import ModelCache
from serve.pipeline.artifacts import Artifact
from serve.pipeline.registry import PIPELINE
from serve.pipeline.stage import Pipeline, Stage, Step, Task
from serve.request import GenerationParams


logger = logging.getLogger("ray.serve")  # Serve's logger: the line lands in the replica's log, with its tags


class MissingArtifact(FileNotFoundError):
    """A step's input is not in the results location (deleted, or never written)."""


class StageDeployment:
    def __init__(self, deployment: str, engine: EngineConfig, config: StageConfig, jobs: JobsConfig,
                 pipeline: Pipeline = PIPELINE, device: DeviceTurns | None = None):
        models = ModelCache()
        self.stages: dict[str, Stage] = {
            stage.name: stage.load(engine, models, **self._options(stage, engine, config))
            for stage in pipeline.deployments()[deployment]
        }
        for stage in self.stages.values():  # a denoising stage's levers, and why one fell back: once per replica
            if stage.role is not None and engine.stage_kernels(stage.role).any:
                logger.log(logging.WARNING if stage.kernels.fell_back else logging.INFO, stage.kernels.line())
        self._results = ResultStore(jobs.results)
        self._runner = StageRunner(config.batching, jobs, self._compute, device)
        self._handoff_metrics = HandoffMetrics()
        self._lora_metrics = {name: LoraMetrics(name) for name, stage in self.stages.items()
                              if getattr(stage, "adapters", None) is not None}

    @staticmethod
    def _options(stage: type[Stage], engine: EngineConfig, config: StageConfig) -> dict:
        """What the stage's `load` takes from its deployment: the config's stage options, and a denoising stage's
        worker group when it has more than one rank."""
        options = config.stage_options()
        parallel = getattr(config, "parallel", None)
        if stage.role is not None and parallel is not None and parallel.world_size > 1:
            options["denoiser"] = parallel_denoiser(engine, parallel, stage.role)
        return options

    async def run(self, step: Step, job_id: str, params: GenerationParams) -> StepDone | Cancelled | Preempted:
        """Run `step` of job `job_id` (batched with other jobs' calls of the same stage, batch key and latency class);
        `Preempted` once it yielded to a higher class mid-segment, its trajectory stored as the step's `resume`."""
        stage = self.stages.get(step.stage)
        if stage is None:
            raise ValueError(f"step {step.name!r} needs stage {step.stage!r}, which this deployment does not host "
                             f"({', '.join(self.stages)})")
        return await self._runner.run(step.stage, job_id, (step, params), stage.batch_key(params), step.span,
                                      params.priority)

    def _compute(self, stage_name: str, job_ids: list[str], payloads: list, on_step) -> list:
        """One batch: each job's inputs read (a job whose inputs cannot be read fails alone), one `run`, each job's
        outputs written."""
        outputs: list = [None] * len(job_ids)
        tasks, indices = [], []
        for i, (job_id, (step, params)) in enumerate(zip(job_ids, payloads)):
            try:
                tasks.append(Task(params, step, {artifact: self._read(job_id, artifact) for artifact in step.reads}))
                indices.append(i)
            except Exception as error:  # noqa: BLE001 - this job's failure, raised by its own call
                outputs[i] = error
        if not tasks:
            return outputs
        try:
            results = self.stages[stage_name].run(tasks, lambda index, done, n: on_step(indices[index], done, n))
        finally:
            if stage_name in self._lora_metrics:
                self._lora_metrics[stage_name].record(self.stages[stage_name].adapters.stats())
        for i, task, result in zip(indices, tasks, results):
            if isinstance(result, Cancelled):
                outputs[i] = result
                continue
            for artifact, value in result.values.items():
                self._write(job_ids[i], artifact, value)
            if result.preempted:  # its checkpoint is stored: the step goes back to its queue
                outputs[i] = Preempted(result.steps_done)
                continue
            if task.step.segment == 0:
                self._handoff_metrics.switched(result.steps_done)
            outputs[i] = {"steps_done": result.steps_done}
        return outputs

    def _read(self, job_id: str, artifact: Artifact):
        start = time.perf_counter()
        data = self._results.get(job_id, artifact.file)
        if data is None:
            raise MissingArtifact(f"video job {job_id} has no {artifact.file} in {self._results.url}")
        if artifact.kind == "handoff":
            self._handoff_metrics.moved("read", len(data), time.perf_counter() - start)
        return artifact.decode(data)

    def _write(self, job_id: str, artifact: Artifact, value) -> None:
        start = time.perf_counter()
        data = artifact.encode(value)
        self._results.put(job_id, artifact.file, data)
        if artifact.kind == "handoff":
            self._handoff_metrics.moved("write", len(data), time.perf_counter() - start)

    def _groups(self) -> list:
        return [s.denoiser.group for s in self.stages.values() if hasattr(getattr(s, "denoiser", None), "group")]

    def check_health(self) -> None:
        """Serve's health check: raises if a worker group has a dead or stuck rank (Serve then replaces the
        replica)."""
        for group in self._groups():
            group.check_health()

    def __del__(self):  # Serve calls it when the replica shuts down: every rank tears its process groups down
        if hasattr(self, "stages"):
            for group in self._groups():
                group.shutdown()

    async def stats(self) -> dict:
        stages = {name: stage.stats() for name, stage in self.stages.items()}
        return {**self._runner.stats(), "stages": sorted(self.stages),
                **{key: value for stats in stages.values() for key, value in stats.items()}}

    async def record_autoscaling_stats(self) -> dict[str, float]:  # Ray Serve's hook for custom autoscaling metrics
        return self._runner.autoscaling_stats()
