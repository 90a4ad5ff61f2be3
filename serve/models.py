"""Model sources, presets and the compatibility check between a sketch pipeline and a render model.

A model source is a hub id ("Wan-AI/Wan2.1-T2V-14B-Diffusers") or a local directory in diffusers' layout. The
sketch source is a full pipeline (text encoder, tokenizer, VAE, scheduler, transformer); the render source is a full
pipeline or a bare transformer directory. Everything loads through diffusers' `from_pretrained`, on the tiny preset
as on the real checkpoints; each stage loads only the components it uses.

With `weights="random-init"` (benchmarks on machines that reach no checkpoint) the same sources need only their
configs and tokenizer files: `random_init` builds each model from its config, with random weights, directly on the
target device and in the target dtype. Its cost equals the real weights'; its outputs are noise.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from serve.request import GenerationDefaults, RequestLimits

# diffusers is imported inside the loaders: importing it takes seconds, and the CLI checks a request against the
# preset defaults defined here before that, so that a bad flag fails at once.
Weights = Literal["pretrained", "random-init"]


class ModelError(ValueError):
    """A model source that cannot be found, loaded or paired; the message says which and why."""


@dataclass(frozen=True)
class ModelPair:
    """Where the sketch pipeline and the render transformer come from. `render_subfolder` names the render
    transformer inside a render pipeline (default "transformer"; Wan2.2-A14B's low-noise expert is "transformer_2")."""

    sketch: str
    render: str
    render_subfolder: str | None = None

    def transformer(self, role: str) -> tuple[str, str | None]:
        """(source, subfolder) of a role's transformer: the sketch pipeline's own, or the render model's."""
        if role == "sketch":
            return self.sketch, None
        if role == "render":
            return self.render, self.render_subfolder
        raise ValueError(f"a model role is sketch or render, not {role!r}")


class ModelCache:
    """Models loaded once per process and shared by the stages that use them (the decode and preview stages hold
    the same VAE). One cache per Engine or stage replica, passed to each stage's `load`."""

    def __init__(self):
        self._models: dict[tuple, object] = {}

    def get(self, key: tuple, load):
        if key not in self._models:
            self._models[key] = load()
        return self._models[key]


@dataclass(frozen=True)
class Preset:
    """A model pair and its request defaults and limits: data, one entry per preset in `PRESETS`."""

    name: str
    models: ModelPair | None  # None: built on first use by `builder`
    defaults: GenerationDefaults
    limits: RequestLimits  # what a served request may cost (the app config may override them)
    builder: str | None = None  # "module:function" returning the ModelPair, built offline and cached (tiny presets)
    summary: str = ""  # one line for `--help`
    # The render transformer's subfolder in a render pipeline (None: "transformer"), also when the user gives the
    # render pipeline's directory (EngineConfig.models)
    render_subfolder: str | None = None
    calibration: str | None = None  # the pair's calibration file (serve/calibration.py), for `switch: quality:T`
    # "module:function" returning the one prompt grammar a pair was trained on ({"template", "example",
    # "vocabulary": {slot: [words]}}), for clients that compose prompts (GET /v1/models); None: free text
    prompt_grammar: str | None = None


WAN21_T2V = Preset(
    "wan2.1-t2v",
    ModelPair("Wan-AI/Wan2.1-T2V-14B-Diffusers", "Wan-AI/Wan2.1-T2V-1.3B-Diffusers"),
    GenerationDefaults(
        width=832, height=480, num_frames=81, num_inference_steps=50, guidance_scale=5.0, flow_shift=3.0,
        switch="ratio:0.2",
    ),
    # 720p/81 frames (75,600 tokens) is the largest size Wan2.1 was trained at
    RequestLimits(max_tokens_per_video=75_600, max_steps=100),
    summary="Wan2.1 14B sketches, 1.3B renders; downloads, needs a GPU",
)
# Wan2.2-T2V-A14B: one pipeline, two 14B experts. The high-noise `transformer` sketches, the low-noise
# `transformer_2` renders, switching where diffusers' WanPipeline does (boundary_ratio 0.875). Defaults are the model
# card's (720p, 81 frames, 40 steps, guidance 4.0 high-noise / 3.0 low-noise) and Wan2.2's own t2v-A14B config's
# sample_shift 12.0.
WAN22_T2V_A14B = Preset(
    "wan2.2-t2v-a14b",
    ModelPair("Wan-AI/Wan2.2-T2V-A14B-Diffusers", "Wan-AI/Wan2.2-T2V-A14B-Diffusers"),
    GenerationDefaults(
        width=1280, height=720, num_frames=81, num_inference_steps=40, guidance_scale=4.0, flow_shift=12.0,
        switch="boundary:0.875", guidance_scale_2=3.0,
    ),
    RequestLimits(max_tokens_per_video=75_600, max_steps=100),  # 720p/81 frames
    summary="Wan2.2-A14B's high-noise expert sketches, its low-noise expert renders; downloads, needs a GPU",
    render_subfolder="transformer_2",
)
TINY_WAN22 = Preset(
    "tiny-wan2.2",
    None,
    GenerationDefaults(
        width=64, height=64, num_frames=17, num_inference_steps=10, guidance_scale=4.0, flow_shift=3.0,
        switch="boundary:0.875", guidance_scale_2=3.0,
    ),
    RequestLimits(max_tokens_per_video=4096, max_steps=100),
    builder="serve.tiny:ensure_tiny_wan22_models",
    summary="random weights in the Wan2.2 layout, built offline",
    render_subfolder="transformer_2",
)
# CogVideoX-5B sketches, CogVideoX-2B renders (serve/families/cogvideox.py: the 5B pipeline owns the trajectory).
# Defaults as CogVideoXPipeline's: 49 frames at 720x480, 50 steps, guidance 6, 8 fps; K = 10 of 50 projects 2.0x
# over all-5B on an H200 (bench/RESULTS.md). flow_shift does not apply (a DDIM sampler). Limit: the trained size,
# 13 x 30 x 45 = 17,550 tokens.
COGVIDEOX = Preset(
    "cogvideox",
    ModelPair("THUDM/CogVideoX-5b", "THUDM/CogVideoX-2b"),
    GenerationDefaults(
        width=720, height=480, num_frames=49, num_inference_steps=50, guidance_scale=6.0, flow_shift=1.0,
        switch="ratio:0.2", fps=8,
    ),
    RequestLimits(max_tokens_per_video=17_550, max_steps=100),
    summary="CogVideoX-5B sketches, 2B renders; downloads, needs a GPU",
)
TINY_COGVIDEOX = Preset(
    "tiny-cogvideox",
    None,
    GenerationDefaults(
        width=64, height=64, num_frames=9, num_inference_steps=10, guidance_scale=6.0, flow_shift=1.0,
        switch="ratio:0.2", fps=8,
    ),
    RequestLimits(max_tokens_per_video=4096, max_steps=100),
    builder="serve.families.cogvideox:ensure_tiny_models",
    summary="random weights in the CogVideoX layout, built offline",
)
TINY = Preset(
    "tiny",
    None,
    GenerationDefaults(
        width=64, height=64, num_frames=17, num_inference_steps=10, guidance_scale=5.0, flow_shift=3.0,
        switch="ratio:0.3",
    ),
    RequestLimits(max_tokens_per_video=4096, max_steps=100),  # e.g. 256x256 at 49 frames: seconds on a CPU
    builder="serve.tiny:ensure_tiny_models",
    summary="random weights in the Wan2.1 layout, built offline",
)
# Trained by this project on procedural clips (toy/train.py, training.json beside the weights): a "large" and a
# "small" Wan DiT. The default switch is the paper's, after 5 of 20 steps; its prompt adherence against all-large
# and all-small is measured in bench/RESULTS.md ("Toy pair").
TOY_DIR = Path(__file__).resolve().parent / "presets" / "toy"
TOY = Preset(
    "toy",
    ModelPair(str(TOY_DIR / "sketch"), str(TOY_DIR / "render")),
    GenerationDefaults(
        width=64, height=64, num_frames=17, num_inference_steps=20, guidance_scale=5.0, flow_shift=1.0,
        switch="ratio:0.25", fps=8,
    ),
    RequestLimits(max_tokens_per_video=4096, max_steps=100),
    summary="a small trained Wan pair, shipped",
    calibration=str(TOY_DIR / "calibration.json"),
    prompt_grammar="toy.data:grammar",
)
PRESETS = {p.name: p for p in (WAN21_T2V, WAN22_T2V_A14B, COGVIDEOX, TOY, TINY, TINY_WAN22, TINY_COGVIDEOX)}


def preset_models(preset: Preset) -> ModelPair:
    """The preset's model pair (a tiny preset's is built offline on first use), with its render subfolder."""
    pair = preset.models
    if pair is None:
        module, _, function = preset.builder.partition(":")
        pair = getattr(importlib.import_module(module), function)()
    return dataclasses.replace(pair, render_subfolder=preset.render_subfolder)


def preset_grammar(preset: Preset) -> dict | None:
    """The prompt grammar the preset's pair was trained on (`Preset.prompt_grammar`), or None for free text."""
    if preset.prompt_grammar is None:
        return None
    module, _, function = preset.prompt_grammar.partition(":")
    return getattr(importlib.import_module(module), function)()


def _looks_like_path(source: str) -> bool:
    return source.startswith((".", "/", "~")) or source.count("/") != 1 or os.sep in source.replace("/", "")


def _locate(source: str, role: str) -> str:
    """A local directory as an absolute path, or the hub id unchanged; a clear error for a missing directory."""
    path = Path(source).expanduser()
    if path.is_dir():
        return str(path.resolve())
    if path.exists() or _looks_like_path(source):
        raise ModelError(f"{role} model directory {source!r} does not exist (or is not a directory)")
    return source  # a hub id: from_pretrained resolves (and may download) it


def _load(what: str, source: str, loader, **kwargs):
    try:
        return loader(source, **kwargs)
    except (OSError, ValueError, EnvironmentError) as e:
        hint = ""
        if "no file named" in str(e):
            hint = " (a directory with configs but no weight files loads only with weights='random-init')"
        raise ModelError(f"cannot load {what} from {source!r}: {e}{hint}") from e


def is_pipeline(source: str) -> bool:
    path = Path(source)
    if path.is_dir():
        return (path / "model_index.json").is_file()
    return True  # hub ids used here name pipelines


def read_config(source: str, subfolder: str | None, what: str, file_name: str = "config.json") -> dict:
    """A component's JSON config (`file_name` in `subfolder` of a pipeline, or of a model directory) as a dict.

    Configs are read before any weights load (the pair checks, the planner, the ingress), often by processes that
    never load a model; diffusers' `load_config` would import diffusers, seconds on a small machine, to read a
    file. So a local directory's file is read directly, and a hub id's fetched with huggingface_hub (cached as
    `from_pretrained` caches it)."""
    name = f"{subfolder}/{file_name}" if subfolder else file_name
    try:
        if Path(source).is_dir():
            return json.loads((Path(source) / name).read_text())
        from huggingface_hub import hf_hub_download

        return json.loads(Path(hf_hub_download(source, name)).read_text())
    except (OSError, ValueError) as e:  # a missing file or an unreachable hub (OSError), broken JSON (ValueError)
        raise ModelError(f"cannot load {what} from {source!r}: {type(e).__name__}: {e}") from e


def _transformer_config(source: str, role: str, subfolder: str | None = None) -> dict:
    """A transformer's config.json as a dict (a pipeline's `subfolder`, default "transformer", or a bare transformer
    directory)."""
    return read_config(source, (subfolder or "transformer") if is_pipeline(source) else None,
                       f"the {role} transformer config")


def check_compatible(models: ModelPair) -> None:
    """Fail before loading weights if the render model cannot continue the sketch model's latent (the sketch
    pipeline's family decides what must match)."""
    from serve.families.base import family_of

    family_of(models.sketch).check_compatible(models)


def check_device(device: str) -> None:
    """Fail with one clear line, before any weights load, when `device` is a GPU this torch cannot use."""
    if torch.device(device).type == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            f"`device` is {device!r} but torch {torch.__version__} sees no CUDA GPU "
            f"({'a CPU-only build' if torch.version.cuda is None else 'no driver or no visible GPU'})"
        )


def load_pipeline(source: str, components: tuple[str, ...], device: str, dtype: torch.dtype,
                  weights: Weights = "pretrained"):
    """The sketch pipeline (of its family's class) with only `components` loaded (others None): e.g.
    ("text_encoder", "tokenizer")."""
    from serve.families.base import family_of

    return family_of(source).load_pipeline(source, components, device, dtype, weights)


def load_pipeline_of(pipeline_class: str, source: str, components: tuple[str, ...], device: str, dtype: torch.dtype,
                     weights: Weights = "pretrained", skippable: tuple[str, ...] = ()):
    """diffusers' `pipeline_class.from_pretrained(source)` with the `skippable` components not in `components` left
    out (None), and with weights="random-init" the models built from their configs."""
    import diffusers

    cls = getattr(diffusers, pipeline_class)
    check_device(device)
    source = _locate(source, "sketch")
    index = _load("the pipeline index", source, cls.load_config)
    skip = {c: None for c in skippable if c not in components and c in index}
    built = {}
    if weights == "random-init":  # the models from their configs; tokenizer and scheduler load from their files
        for name in components:
            library, class_name = index.get(name) or (None, None)
            if library in ("diffusers", "transformers") and name != "tokenizer":
                model_cls = getattr(importlib.import_module(library), class_name)
                built[name] = random_init(model_cls, _model_config(model_cls, source, name, f"the {name}"), device,
                                          dtype)
    pipe = _load("the pipeline", source, cls.from_pretrained, dtype=dtype, **skip, **built)
    return pipe.to(device)


def load_transformer(source: str, role: str, device: str, dtype: torch.dtype,
                     weights: Weights = "pretrained", subfolder: str | None = None):
    """A transformer of the class its config names (a pipeline's `subfolder`, default "transformer", or a bare
    transformer directory)."""
    import diffusers

    check_device(device)
    source = _locate(source, role)
    config = _transformer_config(source, role, subfolder)
    cls = getattr(diffusers, str(config.get("_class_name")), None)
    if not (isinstance(cls, type) and issubclass(cls, diffusers.ModelMixin)):
        raise ModelError(f"the {role} transformer config names class {config.get('_class_name')!r}, which is not a "
                         "diffusers model")
    if weights == "random-init":
        return random_init(cls, config, device, dtype)
    kwargs = {"subfolder": subfolder or "transformer"} if is_pipeline(source) else {}
    model = _load(f"the {role} transformer", source, cls.from_pretrained, dtype=dtype, **kwargs)
    return model.to(device).eval().requires_grad_(False)


def _is_diffusers(cls) -> bool:
    from diffusers import ModelMixin

    return issubclass(cls, ModelMixin)


def _model_config(cls, source: str, subfolder: str, what: str):
    """A component's config as its class reads it: a dict (diffusers) or a PretrainedConfig (transformers)."""
    if _is_diffusers(cls):
        return _load(f"{what} config", source, cls.load_config, subfolder=subfolder)
    return _load(f"{what} config", source, cls.config_class.from_pretrained, subfolder=subfolder)


def keep_in_fp32(model: torch.nn.Module, dtype: torch.dtype) -> tuple[str, ...]:
    """Module names that `from_pretrained(dtype=dtype)` keeps in float32. diffusers keeps `_keep_in_fp32_modules`
    for any reduced dtype; transformers keeps them for float16 only, and `_keep_in_fp32_modules_strict` for float16
    and bfloat16."""
    if dtype == torch.float32:
        return ()
    if _is_diffusers(type(model)):
        return tuple(model._keep_in_fp32_modules or ())
    keep = set(getattr(model, "_keep_in_fp32_modules_strict", None) or ())
    if dtype == torch.float16:
        keep |= set(getattr(model, "_keep_in_fp32_modules", None) or ())
    return tuple(sorted(keep))


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype):
    saved = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(saved)


def random_init(cls, config, device, dtype: torch.dtype) -> torch.nn.Module:
    """`cls` (a diffusers or transformers model class) built from `config` with its own random initialisers, for
    benchmarks with no reachable checkpoint: the layer shapes, dtypes and so the cost of the real weights.

    Built directly on `device` and in `dtype` (the 14B transformer never exists in float32 or on the CPU), then the
    modules that from_pretrained keeps in float32 (`keep_in_fp32`, matched like diffusers against the dotted name's
    components) are cast up, so every parameter and buffer has the dtype that from_pretrained would give it.
    """
    check_device(str(device))
    with torch.device(device), _default_dtype(dtype):
        if _is_diffusers(cls):
            model = cls.from_config(config)
        else:  # transformers: _from_config applies the dtype itself and records it in the config
            model = cls._from_config(config, dtype=dtype)
    keep = keep_in_fp32(model, dtype)
    if keep:
        with torch.no_grad():
            for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
                if tensor.is_floating_point() and any(k in name.split(".") for k in keep):
                    tensor.data = tensor.data.float()
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()
    return model.eval().requires_grad_(False)


def load_scheduler_config(source: str) -> dict:
    return read_config(_locate(source, "sketch"), "scheduler", "the scheduler config", "scheduler_config.json")


def latent_spec(source: str):
    """The latent geometry the sketch pipeline's VAE and transformer imply (read from configs, no weights)."""
    from serve.families.base import family_of

    return family_of(source).latent_spec(source)
