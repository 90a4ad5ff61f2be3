"""LoRA adapters per stage and per request, through diffusers' PEFT integration.

An adapter belongs to one model: a LoRA of the large model shapes the sketch (layout, motion, identity), one of the
small model the rendering (texture). The engine config's registry (`EngineConfig.loras`) names each adapter with its
file and the stage whose model it fits; a request names the ones it wants per stage (`sketch_loras`,
`render_loras`: names and scales), checked at admission (`resolve_loras`).

- Before anything loads, `check_adapter` holds an adapter's LoRA matrices against the stage model's config (the
  model built on the meta device: its module shapes, no weights): an adapter of the other stage's model, or of
  another model, is refused with the module that does not fit.
- A denoising stage keeps the adapters it loaded in its transformer (`LoadedAdapters`, an LRU of `capacity`
  adapters per replica) and applies one batch's set around the batch's forwards: diffusers' `set_adapters` with the
  request's scales, or `disable_lora` for a batch without adapters, whose forwards then run the base layers alone
  (PEFT's disabled LoRA layer returns its base layer's output), so nothing of one request's adapters reaches
  another's. Batches group requests with the same set (the denoising stages' `batch_key`).

The adapters load with diffusers' own loader (the family pipeline's `lora_state_dict`, which also converts the
original Wan and musubi key layouts, then `load_lora_into_transformer`); nothing here re-implements LoRA. What is
written here is what diffusers has no notion of: a per-process registry with stages, the shape check before
loading, and the LRU with its counts.
"""

from __future__ import annotations

import re
import threading
from collections import Counter, OrderedDict
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from serve.request import GenerationDefaults, InvalidRequest

Role = Literal["sketch", "render"]
Choices = tuple[tuple[str, float], ...]  # a request's adapters of one stage: (name, scale), in the request's order
ADAPTER_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")  # PEFT keys its layers by the name: no dots


class LoraSpec(BaseModel):
    """One adapter of the registry: where it is, which stage's model it fits, and the request defaults it brings."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    path: str = Field(description="A .safetensors file, a directory holding one (diffusers' `save_lora_weights` "
                                  "layout), or a hub id (downloaded and cached as `from_pretrained` does).")
    stage: Role = Field(description="The stage whose model the adapter was trained on: sketch (the large model) "
                                    "or render (the small one).")
    weight_name: str | None = Field(None, description="The weights file in a directory or hub repo; None: the "
                                                      "only .safetensors file there.")
    num_inference_steps: int | None = Field(
        None, ge=1, description="Steps a request naming this adapter takes unless it sets `num_inference_steps` "
        "(a step-distilled adapter's).")
    guidance_scale: float | None = Field(
        None, ge=0, description="Guidance of this adapter's stage unless the request sets it: the sketch's "
        "`guidance_scale` or the render's `guidance_scale_2` (a guidance-distilled adapter's, 1.0: no CFG).")

    def source(self) -> tuple[str, str | None]:
        """(what diffusers' loader takes: a directory or hub id, the weights file in it or None)."""
        path = Path(self.path).expanduser()
        if path.is_file():
            return str(path.parent), path.name
        if path.is_dir() and self.weight_name is None:
            files = sorted(p.name for p in path.glob("*.safetensors"))
            if len(files) != 1:
                raise ValueError(f"LoRA directory {self.path!r} holds {len(files)} .safetensors files "
                                 f"({', '.join(files) or 'none'}); name one in `weight_name`")
            return str(path), files[0]
        if path.is_dir():
            return str(path), self.weight_name
        from serve.models import _looks_like_path

        if _looks_like_path(self.path) or self.path.endswith(".safetensors"):
            raise ValueError(f"LoRA file {self.path!r} does not exist")
        return self.path, self.weight_name  # a hub id: diffusers downloads and caches it as from_pretrained does


def check_registry_names(loras: Mapping[str, LoraSpec]) -> None:
    for name in loras:
        if not ADAPTER_NAME.match(name):
            raise ValueError(f"`loras` name {name!r} must be 1 to 64 letters, digits, '_' or '-'")


def resolve_loras(defaults: GenerationDefaults, registry: Mapping[str, LoraSpec], requested: dict[str, list],
                  given: dict[str, object], max_per_stage: int | None) -> tuple[dict[str, Choices], dict[str, object]]:
    """A request's adapter choices per stage field, checked against the registry, and the request defaults its
    adapters bring.

    Args:
        requested: `{"sketch_loras": [LoraChoice, ...], "render_loras": [...]}` as the request gave them.
        given: the request's own num_inference_steps, guidance_scale, guidance_scale_2 (None where unset).
        max_per_stage: most adapters one stage applies at once (its replica's LRU must hold them all); None: any.
    Returns:
        ({field: ((name, scale), ...)}, {GenerationParams field: value}) where an adapter's default applies.
    Raises InvalidRequest naming the field: an unknown adapter, one of the other stage's model, one named twice,
    more than `max_per_stage`, adapters whose step defaults disagree."""
    chosen: dict[str, Choices] = {}
    steps: dict[int, str] = {}
    guidance: dict[str, float] = {}
    for field, role in (("sketch_loras", "sketch"), ("render_loras", "render")):
        choices = requested.get(field) or []
        if max_per_stage is not None and len(choices) > max_per_stage:
            raise InvalidRequest(field, f"`{field}` names {len(choices)} adapters; a stage applies at most "
                                        f"{max_per_stage} at once")
        seen: set[str] = set()
        for i, choice in enumerate(choices):
            where = f"{field}.{i}.name"
            spec = registry.get(choice.name)
            if spec is None:
                known = ", ".join(sorted(n for n, s in registry.items() if s.stage == role)) or "none"
                raise InvalidRequest(where, f"`{where}`: no adapter {choice.name!r} is served; the {role} stage's "
                                            f"adapters are: {known} (GET /v1/models lists them)")
            if spec.stage != role:
                raise InvalidRequest(where, f"`{where}`: adapter {choice.name!r} fits the {spec.stage} model, not "
                                            f"the {role} model; name it in `{spec.stage}_loras`")
            if choice.name in seen:
                raise InvalidRequest(where, f"`{where}`: adapter {choice.name!r} is named twice")
            seen.add(choice.name)
            if spec.num_inference_steps is not None:
                steps.setdefault(spec.num_inference_steps, choice.name)
            if spec.guidance_scale is not None:
                guidance.setdefault(role, spec.guidance_scale)
        chosen[field] = tuple((c.name, float(c.scale)) for c in choices)
    filled: dict[str, object] = {}
    if given.get("num_inference_steps") is None and steps:
        if len(steps) > 1:
            names = ", ".join(f"{n} ({s})" for s, n in steps.items())
            raise InvalidRequest("num_inference_steps", f"the adapters' step counts disagree: {names}; set "
                                                        "`num_inference_steps`")
        filled["num_inference_steps"] = next(iter(steps))
    if given.get("guidance_scale") is None and "sketch" in guidance:
        filled["guidance_scale"] = guidance["sketch"]
    if given.get("guidance_scale_2") is None:
        if "render" in guidance:
            filled["guidance_scale_2"] = guidance["render"]
        elif "guidance_scale" in filled:  # a sketch adapter's guidance shapes the sketch alone: the render keeps
            filled["guidance_scale_2"] = (  # the preset's
                defaults.guidance_scale if defaults.guidance_scale_2 is None else defaults.guidance_scale_2)
    return chosen, filled


# -- the check against the model's config (no weights) -------------------------------------------------------------

def adapter_state_dict(pipeline_class: str, spec: LoraSpec) -> tuple[dict, dict | None]:
    """The adapter's LoRA tensors in diffusers' layout (the family pipeline's `lora_state_dict` converts other
    layouts) and its saved LoRA config (None if the file has none)."""
    import diffusers

    directory, weight_name = spec.source()
    return getattr(diffusers, pipeline_class).lora_state_dict(directory, weight_name=weight_name,
                                                               return_lora_metadata=True)


def meta_model(config: dict):
    """The model a diffusers config describes, built on the meta device: its module tree and shapes, no memory."""
    import diffusers
    import torch

    with torch.device("meta"):
        return getattr(diffusers, config["_class_name"]).from_config(config)


def lora_shapes(state_dict: Mapping, prefix: str = "transformer.") -> dict[str, dict[str, tuple[int, ...]]]:
    """{module path: {"A": lora_A's shape, "B": lora_B's shape}} of a diffusers-layout LoRA state dict."""
    shapes: dict[str, dict[str, tuple[int, ...]]] = {}
    for key, tensor in state_dict.items():
        match = re.match(r"^(.*)\.lora_([AB])(?:\.[^.]+)?\.weight$", key.removeprefix(prefix))
        if match:
            shapes.setdefault(match[1], {})[match[2]] = tuple(tensor.shape)
    return shapes


def check_adapter(name: str, state_dict: Mapping, model) -> None:
    """Raise ValueError naming the adapter and the first module its LoRA matrices do not fit in `model` (a meta
    model from the stage's config, or the loaded transformer): a module the model lacks, or one whose in/out
    features differ from lora_A's columns / lora_B's rows."""
    shapes = lora_shapes(state_dict)
    if not shapes:
        raise ValueError(f"adapter {name!r} holds no LoRA matrices (lora_A/lora_B weights) for a transformer")
    modules = dict(model.named_modules())
    for path, ab in sorted(shapes.items()):
        module = modules.get(path)
        if module is None:
            raise ValueError(f"adapter {name!r} adapts module {path!r}, which this model does not have")
        module = getattr(module, "base_layer", module)  # a module that already holds a PEFT layer
        expected_in, expected_out = getattr(module, "in_features", None), getattr(module, "out_features", None)
        if expected_in is None or "A" not in ab or "B" not in ab:
            raise ValueError(f"adapter {name!r}: module {path!r} is not a linear layer with lora_A and lora_B")
        if ab["A"][1] != expected_in or ab["B"][0] != expected_out:
            raise ValueError(f"adapter {name!r} does not fit module {path!r}: its LoRA maps {ab['A'][1]} -> "
                             f"{ab['B'][0]} features, the model's layer {expected_in} -> {expected_out}")


# -- a replica's loaded adapters -----------------------------------------------------------------------------------

class LoadedAdapters:
    """The adapters loaded into one stage's transformer: an LRU of at most `capacity`, with load, hit and eviction
    counts per adapter (the deployment exports them), and the one place that sets a batch's active set.

    A lock is held from setting a set until the batch's forwards end (`applied`), so that two batches of one
    stage never interleave their sets, whoever calls the stage."""

    def __init__(self, transformer, registry: Mapping[str, LoraSpec], pipeline_class: str, capacity: int):
        if capacity < 1:
            raise ValueError(f"the LoRA cache holds at least 1 adapter, not {capacity}")
        self.transformer = transformer
        self.registry = dict(registry)
        self.pipeline_class = pipeline_class
        self.capacity = capacity
        self.loaded: OrderedDict[str, None] = OrderedDict()  # least recently used first
        self.loads, self.hits, self.evictions = Counter(), Counter(), Counter()
        self._lock = threading.Lock()

    @contextmanager
    def applied(self, choices: Choices) -> Iterator[None]:
        """Run the body with exactly `choices` active (none: every LoRA layer disabled)."""
        with self._lock:
            names = [name for name, _ in choices]
            if len(names) > self.capacity:
                raise ValueError(f"{len(names)} adapters at once; this stage keeps at most {self.capacity} loaded")
            for name in names:
                self._ensure(name, keep=set(names))
            if names:
                self.transformer.enable_lora()
                self.transformer.set_adapters(names, weights=[scale for _, scale in choices])
            elif self.loaded:
                self.transformer.disable_lora()
            yield

    def _ensure(self, name: str, keep: set[str]) -> None:
        if name in self.loaded:
            self.loaded.move_to_end(name)
            self.hits[name] += 1
            return
        spec = self.registry.get(name)
        if spec is None:
            raise ValueError(f"no adapter {name!r} in this stage's registry")
        while len(self.loaded) >= self.capacity:
            victim = next(n for n in self.loaded if n not in keep)
            self.transformer.delete_adapters(victim)
            del self.loaded[victim]
            self.evictions[victim] += 1
        import diffusers

        state_dict, metadata = adapter_state_dict(self.pipeline_class, spec)
        check_adapter(name, state_dict, self.transformer)
        getattr(diffusers, self.pipeline_class).load_lora_into_transformer(
            state_dict, transformer=self.transformer, adapter_name=name, metadata=metadata)
        self.loaded[name] = None
        self.loads[name] += 1

    def stats(self) -> dict:
        """Loaded adapters (least recently used first) and the counts since the replica started."""
        return {"loaded": list(self.loaded), "capacity": self.capacity, "loads": dict(self.loads),
                "hits": dict(self.hits), "evictions": dict(self.evictions)}


# -- adapters for tests and benchmarks -------------------------------------------------------------------------------

DEFAULT_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")  # the attention projections, as most Wan LoRAs train


def save_random_adapter(transformer, directory: str | Path, rank: int = 4, seed: int = 0, std: float = 0.05,
                        target_modules: tuple[str, ...] = DEFAULT_TARGETS, pipeline_class: str = "WanPipeline") -> str:
    """A LoRA with random A and B on `transformer`'s `target_modules` (PEFT's LoraConfig, alpha = rank), saved as
    diffusers saves a trained one (`save_lora_weights`, with its config as metadata); the directory. For tests and
    benchmarks: real adapters come trained. `transformer` only shapes the adapter: its PEFT layers are removed
    afterwards (diffusers' `unload_lora`), so pass a model that holds no other adapter."""
    import diffusers
    import torch
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    name = f"random_{seed}"
    config = LoraConfig(r=rank, lora_alpha=rank, target_modules=list(target_modules), init_lora_weights=False)
    transformer.add_adapter(config, adapter_name=name)
    try:
        generator = torch.Generator("cpu").manual_seed(seed)
        state = get_peft_model_state_dict(transformer, adapter_name=name)
        tensors = {key: (torch.randn(value.shape, generator=generator) * std).to(value.dtype)
                   for key, value in state.items()}
        getattr(diffusers, pipeline_class).save_lora_weights(
            directory, transformer_lora_layers=tensors, transformer_lora_adapter_metadata=config.to_dict())
    finally:
        transformer.unload_lora()
    return str(directory)
