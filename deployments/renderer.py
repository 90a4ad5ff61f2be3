"""Renderer deployment: the small model finishes each hand-off (steps K..N-1) and stores the final latents."""

from __future__ import annotations

from deployments.batching import StageDone, StageRunner, load_each, read_checkpoint, sub_steps
from deployments.config import JobsConfig, RendererConfig
from deployments.worker_group import build_denoising_stage, check_stage_health, shutdown_stage
from serve.checkpoint import handoff_from_bytes, latents_to_bytes
from serve.engine import EngineConfig, RenderStage
from serve.request import GenerationParams
from serve.results import HANDOFF, LATENTS, ResultStore
from serve.stages import Cancelled


class Renderer:
    def __init__(self, engine: EngineConfig, config: RendererConfig, jobs: JobsConfig):
        self._stage = build_denoising_stage(RenderStage, "render", engine, config.parallel)
        self._results = ResultStore(jobs.results)
        self._runner = StageRunner("render", config.batching, jobs, self._render)

    def check_health(self) -> None:
        check_stage_health(self._stage)

    def __del__(self):  # Serve calls it when the replica shuts down: every rank tears its process groups down
        if hasattr(self, "_stage"):
            shutdown_stage(self._stage)

    async def render(self, job_id: str, params: GenerationParams) -> StageDone | Cancelled:
        return await self._runner.run(job_id, params, params.shape_key)

    def _render(self, job_ids: list[str], requests: list[GenerationParams], on_step) -> list:
        indices, handoffs, outputs = load_each(
            job_ids, lambda job_id: handoff_from_bytes(read_checkpoint(self._results, job_id, HANDOFF)))
        if not indices:
            return outputs
        for i, latents in zip(indices, self._stage(handoffs, on_step=sub_steps(on_step, indices))):
            if not isinstance(latents, Cancelled):
                self._results.put(job_ids[i], LATENTS, latents_to_bytes(latents))
            outputs[i] = latents if isinstance(latents, Cancelled) else {}
        return outputs

    async def stats(self) -> dict:
        return self._runner.stats()
