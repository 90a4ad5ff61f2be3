"""Decoder deployment: the Wan VAE. Final latents -> frames -> the mp4 and its thumbnail; a hand-off -> a preview."""

from __future__ import annotations

import asyncio

import torch

from deployments.batching import StageDone, StageRunner, load_each, read_checkpoint
from deployments.config import DecoderConfig, JobsConfig
from serve.checkpoint import handoff_from_bytes, latents_from_bytes
from serve.engine import DecodeStage, EngineConfig
from serve.request import GenerationParams
from serve.results import HANDOFF, LATENTS, PREVIEW, THUMBNAIL, VIDEO, ResultStore
from serve.stages import Cancelled
from serve.video import encode_mp4, encode_png


class Decoder:
    def __init__(self, engine: EngineConfig, config: DecoderConfig, jobs: JobsConfig):
        self._stage = DecodeStage(engine)
        self._results = ResultStore(jobs.results)
        self._runner = StageRunner("decode", config.batching, jobs, self._decode)

    async def decode(self, job_id: str, params: GenerationParams) -> StageDone | Cancelled:
        return await self._runner.run(job_id, params, params.shape_key)

    def _decode(self, job_ids: list[str], requests: list[GenerationParams], on_step=None) -> list:
        indices, latents, outputs = load_each(
            job_ids, lambda job_id: latents_from_bytes(read_checkpoint(self._results, job_id, LATENTS)))
        if not indices:
            return outputs
        for i, video in zip(indices, self._stage(torch.cat(latents))):
            self._results.put(job_ids[i], THUMBNAIL, encode_png(video[0]))
            self._results.put(job_ids[i], VIDEO, encode_mp4(video, requests[i].fps))  # last: it marks the job decoded
            outputs[i] = {}
        return outputs

    async def preview(self, job_id: str) -> bool:
        """Store a PNG of the first frame of the sketch's clean-latent estimate; False if there is no hand-off."""
        data = await asyncio.to_thread(self._results.get, job_id, HANDOFF)
        if data is None:
            return False
        async with self._runner.device:  # shares the device with decode batches
            image = await asyncio.to_thread(self._stage.preview, handoff_from_bytes(data))
        await asyncio.to_thread(self._results.put, job_id, PREVIEW, encode_png(image))
        return True

    async def stats(self) -> dict:
        return self._runner.stats()

    async def record_autoscaling_stats(self) -> dict[str, float]:  # Ray Serve's hook for custom autoscaling metrics
        return self._runner.autoscaling_stats()
