"""Sketcher deployment: the large model's first K denoising steps; stores the hand-off checkpoint.

The replica's GPUs come from its placement group (one bundle per rank, see DenoiserConfig); `worker_group.build_denoising_stage`
is the one place that decides how the model is held, so a multi-rank worker group plugs in there.
"""

from __future__ import annotations

from deployments.batching import StageDone, StageRunner, load_each, read_checkpoint, sub_steps
from deployments.config import JobsConfig, SketcherConfig
from deployments.worker_group import build_denoising_stage, check_stage_health, shutdown_stage
from serve.checkpoint import embeds_from_bytes, handoff_to_bytes
from serve.engine import EngineConfig, SketchStage
from serve.request import GenerationParams
from serve.results import EMBEDS, HANDOFF, ResultStore
from serve.stages import Cancelled


class Sketcher:
    def __init__(self, engine: EngineConfig, config: SketcherConfig, jobs: JobsConfig):
        self._stage = build_denoising_stage(SketchStage, "sketch", engine, config.parallel)
        self._results = ResultStore(jobs.results)
        self._runner = StageRunner("sketch", config.batching, jobs, self._sketch)

    def check_health(self) -> None:
        check_stage_health(self._stage)

    def __del__(self):  # Serve calls it when the replica shuts down: every rank tears its process groups down
        if hasattr(self, "_stage"):
            shutdown_stage(self._stage)

    async def sketch(self, job_id: str, params: GenerationParams) -> StageDone | Cancelled:
        return await self._runner.run(job_id, params, params.shape_key)

    def _sketch(self, job_ids: list[str], requests: list[GenerationParams], on_step) -> list:
        indices, embeds, outputs = load_each(
            job_ids, lambda job_id: embeds_from_bytes(read_checkpoint(self._results, job_id, EMBEDS)))
        if not indices:
            return outputs
        handoffs = self._stage([(requests[i], e) for i, e in zip(indices, embeds)], on_step=sub_steps(on_step, indices))
        for i, handoff in zip(indices, handoffs):
            if isinstance(handoff, Cancelled):
                outputs[i] = handoff
                continue
            self._results.put(job_ids[i], HANDOFF, handoff_to_bytes(handoff))
            outputs[i] = {"switch_step": handoff.step_index}
        return outputs

    async def stats(self) -> dict:
        return self._runner.stats()
