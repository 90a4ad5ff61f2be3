"""The decode stage: final latents -> frames with the sketch pipeline's VAE (it owns the latent space) -> the video
and its first frame."""

from __future__ import annotations

import numpy as np
import torch

from serve.models import ModelCache
from serve.pipeline.artifacts import LATENTS, THUMBNAIL, VIDEO
from serve.pipeline.stage import Output, Stage, Task
from serve.video import Clip


def load_vae_pipeline(config, models):
    """The sketch pipeline with only its VAE, tiled if the config says so; one per process (decode and preview
    share it)."""
    family = config.family()
    source = config.models().sketch

    def load():
        pipe = family.load_pipeline(source, ("vae",), config.device, config.torch_dtype, config.weights)
        if config.vae_tiling:
            pipe.vae.enable_tiling(**config.vae_tile.model_dump())
        return pipe

    return family, (models or ModelCache()).get(("pipeline", source, ("vae",)), load)


class VaeStage(Stage):
    """A stage that holds the sketch pipeline's VAE (decode and preview share one per process)."""

    def __init__(self, family, pipe):
        self.family = family
        self.pipe = pipe

    @classmethod
    def load(cls, config, models=None) -> VaeStage:
        return cls(*load_vae_pipeline(config, models))


class DecodeStage(VaeStage):
    name = "decode"
    deployment = "Decoder"
    reads = (LATENTS,)
    writes = (THUMBNAIL, VIDEO)  # the video last: a reader that sees it sees the thumbnail too

    def __call__(self, latents: torch.Tensor) -> np.ndarray:
        """Latents [B, C, F', H', W'] -> uint8 frames [B, F, H, W, 3]."""
        return self.family.decode(self.pipe, latents)

    def run(self, tasks: list[Task], on_step=None) -> list[Output]:
        frames = self(torch.cat([task.inputs[LATENTS] for task in tasks]))
        return [Output({THUMBNAIL: video[0], VIDEO: Clip(video, task.params.fps)})
                for task, video in zip(tasks, frames)]
