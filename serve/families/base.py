"""What a model family adapter declares and does, and the registry that picks one from a pipeline's model_index.json.

A family (Wan, CogVideoX) is one module beside this one holding one `Family` instance: how its components load
(a hub id or a diffusers directory, through diffusers' own classes), its latent spec, how a prompt is encoded, one
guided transformer call (its denoiser), how its pipeline drives the scheduler (`denoise.Sampler`) and so what the
hand-off carries, decode and preview, and what it supports (switch policies, parallel degrees), checked before any
weights load. The stages (serve/pipeline/) run the one denoising loop (serve/denoise.py); the family supplies the
parts that differ.

The family of a model pair is the sketch pipeline's: `model_index.json`'s `_class_name` (WanPipeline, CogVideoXPipeline)
looked up in `PIPELINE_FAMILIES`. Adding a family is one new module plus its entries here and its presets in
serve/models.py.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np
    import torch

    from serve.handoff import Handoff, PromptEmbeds
    from serve.models import ModelPair, Weights
    from serve.request import GenerationParams
    from serve.denoise import GuidedDenoiser, LatentSpec, Sampler

# model_index.json `_class_name` -> "module:attribute" of the family adapter (imported on first use)
PIPELINE_FAMILIES: dict[str, str] = {
    "WanPipeline": "serve.families.wan:FAMILY",
    "CogVideoXPipeline": "serve.families.cogvideox:FAMILY",
}


@dataclass(frozen=True)
class ModelCapabilities:
    """What a model family supports in parallel, declared once and checked before any weights load
    (after xDiT's `runner_models/base_model.py`)."""

    family: str
    transformer_classes: tuple[str, ...]  # diffusers `_class_name`s of the family's transformers
    ulysses: bool
    ring: bool
    max_cfg_degree: int
    xfuser_wrapper: str | None  # "module:Class", imported only on the ranks; None: no sequence parallelism


class Family:
    """The adapter interface with the parts most diffusers video pipelines share; a family module subclasses it."""

    name: str
    pipeline_class: str  # diffusers class named by model_index.json's `_class_name`
    transformer_class: str
    capabilities: ModelCapabilities
    switch_kinds: tuple[str, ...] = ("step", "ratio", "adaptive", "boundary", "quality", "range", "floor")
    sampler: Sampler
    # model_index.json entries that are transformers: skipped by the stages that do not denoise
    transformer_components: tuple[str, ...] = ("transformer",)

    # -- loading (configs only: nothing here loads weights) ------------------------------------------------------

    def transformer_config(self, source: str, role: str, subfolder: str | None = None) -> dict:
        from serve import models

        return models._transformer_config(models._locate(source, role), role, subfolder)

    def scheduler_config(self, source: str) -> dict:
        from serve import models

        return models.load_scheduler_config(source)

    def check_compatible(self, pair: ModelPair) -> None:
        """Fail before loading weights if the render model cannot continue the sketch model's latent."""
        raise NotImplementedError

    def latent_spec(self, source: str) -> LatentSpec:
        raise NotImplementedError

    def check_request(self, params: GenerationParams) -> None:
        """Raise InvalidRequest naming the field for a request this family cannot run: the ingress calls it before
        admitting a job (a 4xx), the sketch stage before denoising."""
        from serve.request import InvalidRequest

        if params.switch.kind not in self.switch_kinds:
            raise InvalidRequest("switch", f"`switch` {str(params.switch)!r}: the {self.name} family supports "
                                           f"{', '.join(k + ':' for k in self.switch_kinds)} policies only")

    # -- loading weights ---------------------------------------------------------------------------------------

    def load_pipeline(self, source: str, components: tuple[str, ...], device: str, dtype: torch.dtype,
                      weights: Weights = "pretrained"):
        """The sketch pipeline with only `components` loaded (the others None): e.g. ("text_encoder", "tokenizer")."""
        from serve import models

        return models.load_pipeline_of(self.pipeline_class, source, components, device, dtype, weights,
                                       skippable=("text_encoder", "tokenizer", "vae", *self.transformer_components))

    def load_transformer(self, source: str, role: str, device: str, dtype: torch.dtype,
                         weights: Weights = "pretrained", subfolder: str | None = None):
        from serve import models

        return models.load_transformer(source, role, device, dtype, weights, subfolder=subfolder)

    def denoiser(self, transformer, max_tokens_per_forward: int) -> GuidedDenoiser:
        from serve.denoise import GuidedDenoiser

        return GuidedDenoiser(transformer, max_tokens_per_forward)

    # -- the phases -------------------------------------------------------------------------------------------

    def max_sequence_length(self, pipe) -> int:
        """Tokens a prompt is padded to, as the family's pipeline does by default."""
        raise NotImplementedError

    def encode(self, pipe, requests: list[GenerationParams], device) -> list[PromptEmbeds]:
        """Prompt embeddings through the pipeline's own `encode_prompt`; the negative only where guidance is on."""
        import torch

        from serve.handoff import PromptEmbeds

        with torch.inference_mode():
            prompt, negative = pipe.encode_prompt(
                prompt=[r.prompt for r in requests], negative_prompt=[r.negative_prompt for r in requests],
                do_classifier_free_guidance=True, max_sequence_length=self.max_sequence_length(pipe), device=device,
            )
        return [
            PromptEmbeds(prompt[i : i + 1].cpu(), negative[i : i + 1].cpu() if r.do_cfg else None)
            for i, r in enumerate(requests)
        ]

    def decode(self, pipe, latents: torch.Tensor) -> np.ndarray:
        """Latents (the family's layout) -> uint8 frames [B, F, H, W, 3]."""
        raise NotImplementedError

    def preview(self, pipe, handoff: Handoff) -> np.ndarray:
        """One image [H, W, 3] from the sketch's clean-latent estimate."""
        raise NotImplementedError


def read_model_index(source: str) -> dict:
    """A pipeline's model_index.json."""
    from serve.models import ModelError, _locate, read_config

    located = _locate(source, "sketch")
    if Path(located).is_dir() and not (Path(located) / "model_index.json").is_file():
        raise ModelError(f"sketch model {source!r} must be a full pipeline directory (model_index.json)")
    return read_config(located, None, "the pipeline index", "model_index.json")


def family_named(pipeline_class: str | None, source: str = "") -> Family:
    from serve.models import ModelError

    if pipeline_class not in PIPELINE_FAMILIES:
        where = f" (model_index.json of {source!r})" if source else ""
        raise ModelError(
            f"unknown model family: pipeline class {pipeline_class!r}{where}; supported: "
            f"{', '.join(sorted(PIPELINE_FAMILIES))}"
        )
    module, _, attr = PIPELINE_FAMILIES[pipeline_class].partition(":")
    return getattr(importlib.import_module(module), attr)


def family_of(source: str) -> Family:
    """The family of a sketch pipeline source, from its model_index.json `_class_name`."""
    return family_named(read_model_index(source).get("_class_name"), source)


def families() -> list[Family]:
    return [family_named(name) for name in PIPELINE_FAMILIES]


def check_same(keys, sketch: dict, render: dict, sketch_source: str, render_source: str) -> None:
    """Raise ModelError naming the first of `keys` on which the two transformers' configs differ: the render model
    could not continue the sketch model's latent."""
    from serve.models import ModelError

    for key in keys:
        if sketch.get(key) != render.get(key):
            raise ModelError(
                f"render model {render_source!r} is incompatible with sketch model {sketch_source!r}: "
                f"{key} is {render.get(key)} but the sketch model has {sketch.get(key)}"
            )
