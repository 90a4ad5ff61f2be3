"""What one stage call costs on its device: exclusive seconds (the device to itself), from the planner's own cost
model (serve.placement.video_cost over the cost table serve/placement_costs.json) or from explicit measured figures.
The engine turns exclusive seconds into wall seconds by how many batches share the device."""

from __future__ import annotations

from functools import lru_cache

from deployments.simulate.config import CostsConfig
from serve.denoise import WAN_LATENTS
from serve.placement import CARDS, Card, video_cost
from serve.request import GenerationParams


class CallCosts:
    """Exclusive device seconds of a stage call for one job, and of a batch of them."""

    def __init__(self, config: CostsConfig, card: str):
        if config.measured is None and card not in CARDS:
            raise ValueError(f"`cluster.card` {card!r} is not in the cost table; it has {', '.join(CARDS)}")
        self.config = config
        self.card: Card | None = CARDS[card] if config.measured is None else None

    def unit(self, stage: str, params: GenerationParams, steps: int) -> float:
        """One job's call of `stage` (encode, sketch, render, decode, preview) taking `steps` denoising steps."""
        measured = self.config.measured
        if measured is not None:
            per = {"encode": measured.encode_s, "decode": measured.decode_s + self.config.decode_extra_s,
                   "preview": measured.preview_s}
            if stage in ("sketch", "render"):
                step = measured.sketch_step_s if stage == "sketch" else measured.render_step_s
                return measured.call_s + steps * step
            return measured.call_s + per[stage]
        return _card_cost(self.card.name, stage, params.height, params.width, params.num_frames,
                          params.guidance_scale > 1, params.render_guidance > 1, steps, self.config.decode_extra_s)

    def batch(self, units: list[float]) -> float:
        """A batch of same-shape calls: the longest, plus `batch_scaling` of each other's cost."""
        longest = max(units)
        return longest + self.config.batch_scaling * (sum(units) - longest)


@lru_cache(maxsize=4096)
def _card_cost(card_name: str, stage: str, height: int, width: int, frames: int, sketch_cfg: bool, render_cfg: bool,
               steps: int, decode_extra_s: float) -> float:
    card = CARDS[card_name]
    if stage == "sketch":
        return video_cost(card, height, width, frames, steps, steps, sketch_cfg).sketch_s
    if stage == "render":
        return video_cost(card, height, width, frames, steps, 0, render_cfg).render_s
    cost = video_cost(card, height, width, frames, 1, 0)
    if stage == "encode":
        return cost.encode_s
    if stage == "decode":
        return cost.decode_s + decode_extra_s
    if stage == "preview":  # Wan's causal VAE decodes the first latent frame alone (serve/pipeline/preview.py)
        return cost.decode_s / ((frames - 1) // WAN_LATENTS.temporal + 1)
    raise ValueError(f"no cost for stage {stage!r}")
