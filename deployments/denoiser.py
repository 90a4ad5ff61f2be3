"""Denoiser deployment: one denoising segment of a request's plan, configured once per role.

    role "sketch"   the large model from pure noise until the switch policy hands over: reads the prompt
                    embeddings (EMBEDS), stores the hand-off (HANDOFF: latents, step, sampler state)
    role "render"   the small model from the hand-off to the last step: reads HANDOFF, stores the final LATENTS

The app deploys this one class twice ("Sketcher" and "Renderer"), each with its own resources, batching, replicas
and parallel degrees. The replica's GPUs come from its placement group (one bundle per rank, see DenoiserConfig);
`worker_group.build_denoising_stage` is the one place that decides how the model is held, so a multi-rank worker
group plugs in there.
"""

from __future__ import annotations

import time
from typing import Literal

from deployments.batching import StageDone, StageRunner, load_each, read_checkpoint, sub_steps
from deployments.config import DenoiserConfig, JobsConfig
from deployments.metrics import HandoffMetrics
from deployments.worker_group import build_denoising_stage, check_stage_health, shutdown_stage
from serve.checkpoint import embeds_from_bytes, handoff_from_bytes, handoff_to_bytes, latents_to_bytes
from serve.engine import EngineConfig, RenderStage, SketchStage
from serve.plan import switch_step
from serve.request import GenerationParams
from serve.results import EMBEDS, HANDOFF, LATENTS, ResultStore
from serve.stages import Cancelled

Role = Literal["sketch", "render"]


class Denoiser:
    def __init__(self, role: Role, engine: EngineConfig, config: DenoiserConfig, jobs: JobsConfig):
        self.role = role
        stage_cls = SketchStage if role == "sketch" else RenderStage
        self._stage = build_denoising_stage(stage_cls, role, engine, config.parallel)
        self._results = ResultStore(jobs.results)
        self._runner = StageRunner(role, config.batching, jobs, self._denoise_jobs, span_of=self._span)
        self._handoff_metrics = HandoffMetrics()

    def check_health(self) -> None:
        check_stage_health(self._stage)

    def __del__(self):  # Serve calls it when the replica shuts down: every rank tears its process groups down
        if hasattr(self, "_stage"):
            shutdown_stage(self._stage)

    async def denoise(self, job_id: str, params: GenerationParams) -> StageDone | Cancelled:
        return await self._runner.run(job_id, params, params.shape_key)

    def _span(self, params: GenerationParams) -> tuple[int, int]:
        """The steps this role takes for a request: its K decides the sketch's share. A switch decided while
        sketching (adaptive, boundary) counts as half the steps until the sketch tells."""
        n = params.num_inference_steps
        k = switch_step(params)
        k = n // 2 if k is None else k
        return (0, k) if self.role == "sketch" else (k, n)

    def _load(self, job_id: str):
        if self.role == "sketch":
            return embeds_from_bytes(read_checkpoint(self._results, job_id, EMBEDS))
        start = time.perf_counter()
        data = read_checkpoint(self._results, job_id, HANDOFF)
        self._handoff_metrics.moved("read", len(data), time.perf_counter() - start)
        return handoff_from_bytes(data)

    def _denoise_jobs(self, job_ids: list[str], requests: list[GenerationParams], on_step) -> list:
        indices, inputs, outputs = load_each(job_ids, self._load)
        if not indices:
            return outputs
        if self.role == "sketch":
            inputs = [(requests[i], embeds) for i, embeds in zip(indices, inputs)]
        for i, result in zip(indices, self._stage(inputs, on_step=sub_steps(on_step, indices))):
            if isinstance(result, Cancelled):
                outputs[i] = result
            elif self.role == "sketch":
                start, data = time.perf_counter(), handoff_to_bytes(result)
                self._results.put(job_ids[i], HANDOFF, data)
                self._handoff_metrics.moved("write", len(data), time.perf_counter() - start)
                self._handoff_metrics.switched(result.step_index)
                outputs[i] = {"switch_step": result.step_index}
            else:
                self._results.put(job_ids[i], LATENTS, latents_to_bytes(result))
                outputs[i] = {}
        return outputs

    async def stats(self) -> dict:
        return self._runner.stats()

    async def record_autoscaling_stats(self) -> dict[str, float]:  # Ray Serve's hook for custom autoscaling metrics
        return self._runner.autoscaling_stats()
