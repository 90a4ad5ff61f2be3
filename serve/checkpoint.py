"""What passes between stages, as bytes that are safe to read back from storage a client can reach.

A hand-off checkpoint outlives the process that wrote it (a job resumes from it after a replica dies), and it lives
under a results location that other parties may be able to write to. Unpickling such a file runs whatever code it
names, so nothing here uses pickle or `torch.load`: each value is ONE safetensors blob, tensors as safetensors entries
(exact dtypes: bf16 latents, float32 embeddings, int64 timesteps) and everything else as one JSON document under the
metadata key `srd`. Reading a blob can only create tensors, JSON data and a diffusers scheduler whose class is checked
against diffusers' own exports.

The sampler is saved generically, so that any diffusers scheduler a model family uses travels without per-class code:
its class name, its `config` (diffusers' own JSON) and every instance attribute of `vars(scheduler)`, which is where
a multistep sampler keeps its mid-trajectory state (UniPC's `model_outputs`, `timestep_list`, `last_sample`...).
Attributes of a kind not listed in `_encode_attribute` make saving fail with a TypeError naming them, so a scheduler
with unexpected state fails when the checkpoint is written, not later when it is resumed.
"""

from __future__ import annotations

import json
import math
import re

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load as _load_tensors
from safetensors.torch import save as _save_tensors

from serve.handoff import Handoff, PromptEmbeds
from serve.request import GenerationParams

__all__ = [
    "embeds_from_bytes",
    "embeds_to_bytes",
    "handoff_from_bytes",
    "handoff_to_bytes",
    "latents_from_bytes",
    "latents_to_bytes",
    "params_from_dict",
    "params_to_dict",
    "scheduler_from_bytes",
    "scheduler_to_bytes",
]

METADATA_KEY = "srd"  # the safetensors metadata key that holds the JSON document
VERSION = 1
_CONFIG_ATTRIBUTE = "_internal_dict"  # where diffusers' ConfigMixin keeps what `scheduler.config` returns
_ATTRIBUTE_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_FLOAT_TAG = "$float"  # strict JSON has no NaN/inf: such floats are written as {"$float": "nan" | "inf" | "-inf"}


# ---------------------------------------------------------------------------------------------------------------
# Request parameters


def params_to_dict(params: GenerationParams) -> dict:
    """JSON-able data for a resolved request (the switch policy as its spec string)."""
    return params.to_dict()


def params_from_dict(data: dict) -> GenerationParams:
    return GenerationParams.from_dict(data)


# ---------------------------------------------------------------------------------------------------------------
# Public (de)serialisers


def embeds_to_bytes(embeds: PromptEmbeds) -> bytes:
    tensors = {"prompt": embeds.prompt}
    if embeds.negative is not None:
        tensors["negative"] = embeds.negative
    return _pack("embeds", {"negative": embeds.negative is not None}, tensors)


def embeds_from_bytes(data: bytes, device="cpu") -> PromptEmbeds:
    doc, tensors = _unpack(data, "embeds")
    negative = _tensor(tensors, "negative", "embeds").to(device) if doc.get("negative") else None
    return PromptEmbeds(_tensor(tensors, "prompt", "embeds").to(device), negative)


def latents_to_bytes(latents: torch.Tensor) -> bytes:
    """Final denoised latents (float32 [1, C, F', H', W'] from the render stage; any dtype is kept as it is)."""
    return _pack("latents", {}, {"latents": latents})


def latents_from_bytes(data: bytes, device="cpu") -> torch.Tensor:
    _, tensors = _unpack(data, "latents")
    return _tensor(tensors, "latents", "latents").to(device)


def scheduler_to_bytes(scheduler) -> bytes:
    """One diffusers scheduler with its mid-trajectory state (see the module docstring for what is kept)."""
    doc, tensors = _scheduler_state(scheduler, prefix="scheduler.")
    return _pack("scheduler", {"scheduler": doc}, tensors)


def scheduler_from_bytes(data: bytes, device="cpu"):
    doc, tensors = _unpack(data, "scheduler")
    return _restore_scheduler(doc.get("scheduler"), tensors, device)


def handoff_to_bytes(handoff: Handoff) -> bytes:
    """All the next segment needs to resume: latents, step index, segment, sampler (and the family's
    `sampler_extra` tensors), embeddings, request, rates, timings."""
    scheduler_doc, tensors = _scheduler_state(handoff.scheduler, prefix="scheduler.")
    tensors["latents"] = handoff.latents
    tensors["embeds.prompt"] = handoff.embeds.prompt
    if handoff.embeds.negative is not None:
        tensors["embeds.negative"] = handoff.embeds.negative
    for name, value in handoff.sampler_extra.items():  # a family's sampler state outside the scheduler
        if not (isinstance(name, str) and _ATTRIBUTE_NAME.fullmatch(name) and isinstance(value, torch.Tensor)):
            raise TypeError(f"hand-off `sampler_extra` entry {name!r} must be a tensor under a plain name")
        tensors[f"sampler_extra.{name}"] = value
    doc = {
        "params": params_to_dict(handoff.params),
        "step_index": int(handoff.step_index),
        "segment": int(handoff.segment),
        "rates": [float(r) for r in handoff.rates],
        "timings": {str(k): float(v) for k, v in handoff.timings.items()},
        "negative": handoff.embeds.negative is not None,
        "scheduler": scheduler_doc,
        "sampler_extra": sorted(handoff.sampler_extra),
    }
    return _pack("handoff", doc, tensors)


def handoff_from_bytes(data: bytes, device="cpu") -> Handoff:
    doc, tensors = _unpack(data, "handoff")
    negative = _tensor(tensors, "embeds.negative", "handoff").to(device) if doc.get("negative") else None
    try:
        params = params_from_dict(doc["params"])
        step_index, rates, timings = int(doc["step_index"]), list(doc["rates"]), dict(doc["timings"])
        segment = int(doc.get("segment", 1))  # hand-offs written before plans had more than two segments
        extra_names = list(doc.get("sampler_extra", []))
    except (KeyError, TypeError) as e:
        raise ValueError(f"hand-off checkpoint is malformed: {e!r}") from e
    for name in extra_names:
        if not (isinstance(name, str) and _ATTRIBUTE_NAME.fullmatch(name)):
            raise ValueError(f"hand-off checkpoint names sampler state {name!r}, which is not a plain name")
    return Handoff(
        params=params,
        embeds=PromptEmbeds(_tensor(tensors, "embeds.prompt", "handoff").to(device), negative),
        latents=_tensor(tensors, "latents", "handoff").to(device),
        step_index=step_index,
        scheduler=_restore_scheduler(doc.get("scheduler"), tensors, device),
        segment=segment,
        rates=rates,
        timings=timings,
        sampler_extra={n: _tensor(tensors, f"sampler_extra.{n}", "handoff").to(device) for n in extra_names},
    )


# ---------------------------------------------------------------------------------------------------------------
# The container: one safetensors blob, one JSON document in its metadata


def _pack(kind: str, doc: dict, tensors: dict[str, torch.Tensor]) -> bytes:
    # safetensors wants contiguous CPU tensors that share no storage (UniPC's timestep_list holds views of the
    # timesteps tensor), so every tensor is copied on its own; hand-offs are megabytes, the copy is cheap.
    plain = {k: v.detach().to("cpu").clone(memory_format=torch.contiguous_format) for k, v in tensors.items()}
    text = json.dumps(_tag_floats({"kind": kind, "version": VERSION, **doc}), allow_nan=False)
    return _save_tensors(plain, metadata={"format": "pt", METADATA_KEY: text})


def _unpack(data: bytes, kind: str) -> tuple[dict, dict[str, torch.Tensor]]:
    """The JSON document and the tensors of a blob written by `_pack(kind, ...)`; ValueError for anything else."""
    data = bytes(data)
    try:
        tensors = _load_tensors(data)
    except SafetensorError as e:
        raise ValueError(f"not a safetensors checkpoint: {e}") from e
    # safetensors.torch.load returns no metadata: read it from the header (8-byte little-endian length, then JSON).
    header_len = int.from_bytes(data[:8], "little")
    metadata = json.loads(data[8 : 8 + header_len]).get("__metadata__") or {}
    if METADATA_KEY not in metadata:
        raise ValueError(f"safetensors blob has no `{METADATA_KEY}` metadata: not written by serve.checkpoint")
    try:
        doc = json.loads(metadata[METADATA_KEY], object_hook=_untag_float)
    except json.JSONDecodeError as e:
        raise ValueError(f"checkpoint metadata is not valid JSON: {e}") from e
    if not isinstance(doc, dict) or doc.get("kind") != kind:
        found = doc.get("kind") if isinstance(doc, dict) else type(doc).__name__
        raise ValueError(f"checkpoint holds {found!r}, expected {kind!r}")
    if doc.get("version") != VERSION:
        raise ValueError(f"checkpoint format version {doc.get('version')!r} is not supported (this reads {VERSION})")
    return doc, tensors


def _tensor(tensors: dict[str, torch.Tensor], key: str, what: str) -> torch.Tensor:
    if key not in tensors:
        raise ValueError(f"{what} checkpoint lacks the tensor {key!r}")
    return tensors[key]


def _tag_floats(value):
    if isinstance(value, float) and not math.isfinite(value):
        return {_FLOAT_TAG: repr(value)}  # 'nan', 'inf', '-inf'
    if isinstance(value, dict):
        return {k: _tag_floats(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_tag_floats(v) for v in value]
    return value


def _untag_float(obj: dict):
    if obj.keys() == {_FLOAT_TAG} and obj[_FLOAT_TAG] in ("nan", "inf", "-inf"):
        return float(obj[_FLOAT_TAG])
    return obj


# ---------------------------------------------------------------------------------------------------------------
# Schedulers, generically


def _scheduler_class(name) -> type:
    """The diffusers scheduler class called `name`; ValueError for anything else, so that a name read from storage
    can never import or call arbitrary code ("os.system", "subprocess.Popen")."""
    import diffusers

    if not (isinstance(name, str) and name.isidentifier() and name.endswith("Scheduler")):
        raise ValueError(f"checkpoint names scheduler class {name!r}: only classes exported by diffusers ending in "
                         "'Scheduler' are allowed")
    try:
        cls = getattr(diffusers, name, None)
    except (ImportError, RuntimeError) as e:  # exported but its optional dependency is missing
        raise ValueError(f"scheduler class {name!r} cannot be loaded: {e}") from e
    if not (isinstance(cls, type) and issubclass(cls, diffusers.SchedulerMixin)):
        raise ValueError(f"checkpoint names scheduler class {name!r}, which is not a scheduler exported by diffusers")
    return cls


def _scheduler_state(scheduler, prefix: str) -> tuple[dict, dict[str, torch.Tensor]]:
    name = type(scheduler).__name__
    try:
        known = _scheduler_class(name)
    except ValueError as e:
        raise TypeError(f"cannot checkpoint a {name}: {e}") from e
    if known is not type(scheduler):
        raise TypeError(f"cannot checkpoint {type(scheduler)!r}: it is not diffusers.{name}")
    tensors: dict[str, torch.Tensor] = {}
    attributes = {
        attr: _encode_attribute(attr, value, f"{prefix}{attr}", tensors)
        for attr, value in vars(scheduler).items()
        if attr != _CONFIG_ATTRIBUTE
    }
    doc = {"class": name, "config": json.loads(scheduler.to_json_string()), "attributes": attributes}
    return doc, tensors


def _is_json_scalar(value) -> bool:
    # Exact types: a numpy scalar (a float subclass) or an enum would otherwise come back as something else.
    return value is None or type(value) in (bool, int, float, str)


def _encode_attribute(attr: str, value, key: str, tensors: dict) -> dict:
    """A JSON descriptor of one scheduler attribute; its tensors go into `tensors` under `key` (plus `.i` for items)."""
    if type(value) in (list, tuple):
        as_tuple = type(value) is tuple
        if all(_is_json_scalar(v) for v in value):
            return {"kind": "json", "value": list(value), "tuple": as_tuple}
        items = [_encode_value(f"{attr}[{i}]", v, f"{key}.{i}", tensors) for i, v in enumerate(value)]
        return {"kind": "sequence", "items": items, "tuple": as_tuple}
    return _encode_value(attr, value, key, tensors)


def _encode_value(attr: str, value, key: str, tensors: dict) -> dict:
    if isinstance(value, torch.Tensor):
        tensors[key] = value
        return {"kind": "tensor", "key": key}
    if isinstance(value, (np.ndarray, np.generic)):
        try:
            tensors[key] = torch.from_numpy(np.array(value))  # a copy; a numpy scalar becomes a 0-d tensor
        except TypeError as e:
            raise TypeError(f"scheduler attribute `{attr}` is numpy {value.dtype}, which torch cannot hold") from e
        return {"kind": "numpy", "key": key, "scalar": isinstance(value, np.generic)}
    if _is_json_scalar(value):
        return {"kind": "json", "value": value, "tuple": False}
    raise TypeError(
        f"scheduler attribute `{attr}` is a {type(value).__name__}; a checkpoint holds tensors, numpy arrays, "
        "int/float/bool/str/None and lists or tuples of these"
    )


def _decode_value(attr: str, desc, tensors: dict, device):
    kind = desc.get("kind") if isinstance(desc, dict) else None
    if kind == "json":
        return tuple(desc["value"]) if desc.get("tuple") else desc["value"]
    if kind == "tensor":
        return _tensor(tensors, desc["key"], "scheduler").to(device)
    if kind == "numpy":
        array = _tensor(tensors, desc["key"], "scheduler").numpy()
        return array[()] if desc.get("scalar") else array
    if kind == "sequence":
        items = [_decode_value(f"{attr}[{i}]", d, tensors, device) for i, d in enumerate(desc["items"])]
        return tuple(items) if desc.get("tuple") else items
    raise ValueError(f"scheduler attribute `{attr}` has an unknown descriptor {desc!r}")


def _restore_scheduler(doc: dict, tensors: dict, device):
    """A fresh scheduler from its class and config, then its saved state set back attribute by attribute."""
    if not (isinstance(doc, dict) and isinstance(doc.get("config"), dict) and isinstance(doc.get("attributes"), dict)):
        raise ValueError("checkpoint's scheduler entry is malformed: expected class, config and attributes")
    cls = _scheduler_class(doc.get("class"))
    scheduler = cls.from_config(doc["config"])
    for attr, desc in doc["attributes"].items():
        if not _ATTRIBUTE_NAME.fullmatch(attr) or attr.startswith("__") or attr == _CONFIG_ATTRIBUTE:
            raise ValueError(f"checkpoint sets scheduler attribute {attr!r}, which is not a plain attribute name")
        try:
            setattr(scheduler, attr, _decode_value(attr, desc, tensors, device))
        except AttributeError as e:  # a read-only property of the class
            raise ValueError(f"checkpoint sets scheduler attribute {attr!r}, which {cls.__name__} refuses: {e}") from e
    return scheduler
