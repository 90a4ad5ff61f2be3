"""Sketcher deployment: the large model's first K denoising steps; returns the Handoff (through the object store).

The replica's GPUs come from its placement group (one bundle per rank, see DenoiserConfig); `worker_group.build_denoising_stage`
is the one place that decides how the model is held, so a multi-rank worker group plugs in there.
"""

from __future__ import annotations

from deployments.batching import StageRunner
from deployments.config import SketcherConfig
from deployments.worker_group import build_denoising_stage, check_stage_health, shutdown_stage
from serve.engine import EngineConfig, SketchStage
from serve.handoff import Handoff, PromptEmbeds
from serve.request import GenerationParams
from serve.stages import Cancelled


class Sketcher:
    def __init__(self, engine: EngineConfig, config: SketcherConfig, store):
        self._stage = build_denoising_stage(SketchStage, "sketch", engine, config.parallel)
        self._runner = StageRunner("sketch", config.batching, store, self._stage,
                                   describe=lambda handoff: {"switch_step": handoff.step_index})

    def check_health(self) -> None:
        check_stage_health(self._stage)

    def __del__(self):  # Serve calls it when the replica shuts down: every rank tears its process groups down
        if hasattr(self, "_stage"):
            shutdown_stage(self._stage)

    async def sketch(self, job_id: str, params: GenerationParams, embeds: PromptEmbeds | Cancelled
                     ) -> Handoff | Cancelled:
        if isinstance(embeds, Cancelled):  # cancelled upstream: pass it on
            return embeds
        return await self._runner.run(job_id, (params, embeds), params.shape_key)

    async def stats(self) -> dict:
        return self._runner.stats()
