"""The preview stage: the sketch's estimate of the first frame, decoded from its hand-off while the render model
works (Wan's causal VAE decodes the first latent frame alone, at a fraction of a full decode)."""

from __future__ import annotations

import numpy as np

from serve.handoff import Handoff
from serve.pipeline.artifacts import HANDOFF, PREVIEW
from serve.pipeline.decode import VaeStage
from serve.pipeline.stage import Output, Task


class PreviewStage(VaeStage):
    name = "preview"
    deployment = "Decoder"
    reads = (HANDOFF,)
    writes = (PREVIEW,)

    def __call__(self, handoff: Handoff) -> np.ndarray:
        """One image [H, W, 3]."""
        return self.family.preview(self.pipe, handoff)

    def run(self, tasks: list[Task], on_step=None) -> list[Output]:
        return [Output({PREVIEW: self(task.inputs[HANDOFF])}) for task in tasks]
