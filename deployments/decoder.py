"""Decoder deployment: the Wan VAE. Final latents -> frames -> mp4 bytes; a hand-off -> a preview PNG."""

from __future__ import annotations

import asyncio

import torch

from deployments.batching import StageRunner
from deployments.config import DecoderConfig
from serve.engine import DecodeStage, EngineConfig
from serve.handoff import Handoff
from serve.request import GenerationParams
from serve.stages import Cancelled
from serve.video import encode_mp4, encode_png


class Decoder:
    def __init__(self, engine: EngineConfig, config: DecoderConfig, store):
        self._stage = DecodeStage(engine)
        self._runner = StageRunner("decode", config.batching, store, self._decode)

    async def decode(self, job_id: str, params: GenerationParams, latents: torch.Tensor | Cancelled
                     ) -> bytes | Cancelled:
        if isinstance(latents, Cancelled):  # cancelled upstream: pass it on
            return latents
        return await self._runner.run(job_id, (params, latents), params.shape_key)

    def _decode(self, items: list[tuple[GenerationParams, torch.Tensor]], on_step=None) -> list[bytes]:
        frames = self._stage(torch.cat([latents for _, latents in items]))
        return [encode_mp4(video, params.fps) for (params, _), video in zip(items, frames)]

    async def preview(self, handoff: Handoff | Cancelled) -> bytes | None:
        """PNG of the first frame of the sketch's clean-latent estimate (None for a cancelled job)."""
        if isinstance(handoff, Cancelled):
            return None
        async with self._runner.device:  # shares the device with decode batches
            image = await asyncio.to_thread(self._stage.preview, handoff)
        return encode_png(image)

    async def stats(self) -> dict:
        return self._runner.stats()
