"""Renderer deployment: the small model finishes each hand-off (steps K..N-1) and returns the final latents."""

from __future__ import annotations

import torch

from deployments.batching import StageRunner
from deployments.config import RendererConfig
from deployments.worker_group import build_denoising_stage, check_stage_health, shutdown_stage
from serve.engine import EngineConfig, RenderStage
from serve.handoff import Handoff
from serve.stages import Cancelled


class Renderer:
    def __init__(self, engine: EngineConfig, config: RendererConfig, store):
        self._stage = build_denoising_stage(RenderStage, "render", engine, config.parallel)
        self._runner = StageRunner("render", config.batching, store, self._stage)

    def check_health(self) -> None:
        check_stage_health(self._stage)

    def __del__(self):  # Serve calls it when the replica shuts down: every rank tears its process groups down
        if hasattr(self, "_stage"):
            shutdown_stage(self._stage)

    async def render(self, job_id: str, handoff: Handoff | Cancelled) -> torch.Tensor | Cancelled:
        if isinstance(handoff, Cancelled):  # cancelled upstream: pass it on
            return handoff
        return await self._runner.run(job_id, handoff, handoff.params.shape_key)

    async def stats(self) -> dict:
        return self._runner.stats()
