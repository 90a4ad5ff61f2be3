"""Checkpoints (serve/checkpoint.py) are exact and safe: a hand-off read back from bytes renders the same latents, in
this process or a fresh one without Ray; any diffusers scheduler's mid-trajectory state survives; a blob can never
name code to run, and state the format cannot hold fails when it is written."""

from __future__ import annotations

import dataclasses
import inspect
import json
import re
import subprocess
import sys
from pathlib import Path

import diffusers
import numpy as np
import pytest
import torch
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

import serve.checkpoint
from serve.checkpoint import (
    METADATA_KEY,
    embeds_from_bytes,
    embeds_to_bytes,
    handoff_from_bytes,
    handoff_to_bytes,
    latents_from_bytes,
    latents_to_bytes,
    params_from_dict,
    params_to_dict,
    scheduler_from_bytes,
    scheduler_to_bytes,
)
from serve.handoff import PromptEmbeds
from serve.request import GenerationParams
from serve.switch import SwitchPolicy, parse_switch

SPECS = ["step:1", "step:7", "ratio:0.25", "ratio:1", "ratio:0.1234567", "boundary:0.875", "boundary:0.87512345",
         "adaptive:0.01", "adaptive:0.0123456789", "adaptive:0.05:2:7", "adaptive:1e-07:1:1"]


def assert_same(actual, expected, where="value"):
    """Equal values of the same type; tensors bit-exact with the same dtype (NaNs equal), recursively."""
    assert type(actual) is type(expected), (where, type(actual), type(expected))
    if isinstance(expected, torch.Tensor):
        assert actual.dtype == expected.dtype and actual.shape == expected.shape, where
        assert torch.equal(actual, expected) or torch.equal(actual.isnan(), expected.isnan()) and torch.equal(
            actual.nan_to_num(), expected.nan_to_num()), where
    elif isinstance(expected, np.ndarray | np.generic):
        assert actual.dtype == expected.dtype and np.array_equal(actual, expected), where
    elif isinstance(expected, list | tuple):
        assert len(actual) == len(expected), where
        for i, (a, e) in enumerate(zip(actual, expected)):
            assert_same(a, e, f"{where}[{i}]")
    elif isinstance(expected, float) and expected != expected:
        assert actual != actual, where
    else:
        assert actual == expected, where


def assert_same_scheduler(actual, expected):
    assert type(actual) is type(expected)
    bookkeeping = {"_use_default_values"}  # diffusers' record of defaulted keys, dropped by its own JSON export
    assert {k: v for k, v in actual.config.items() if k not in bookkeeping} == {
        k: v for k, v in expected.config.items() if k not in bookkeeping}
    state = {k: v for k, v in vars(expected).items() if k != "_internal_dict"}
    assert vars(actual).keys() - {"_internal_dict"} == state.keys()
    for name, value in state.items():
        assert_same(getattr(actual, name), value, name)


def assert_same_handoff(actual, expected):
    assert actual.params == expected.params
    assert actual.step_index == expected.step_index
    assert_same(actual.rates, expected.rates, "rates")
    assert_same(list(actual.timings.items()), list(expected.timings.items()), "timings")
    assert_same(actual.latents, expected.latents, "latents")
    assert_same(actual.embeds.prompt, expected.embeds.prompt, "embeds.prompt")
    assert_same(actual.embeds.negative, expected.embeds.negative, "embeds.negative")
    assert_same_scheduler(actual.scheduler, expected.scheduler)
    assert sorted(actual.sampler_extra) == sorted(expected.sampler_extra)
    for name in expected.sampler_extra:
        assert_same(actual.sampler_extra[name], expected.sampler_extra[name], f"sampler_extra.{name}")


@pytest.mark.parametrize("spec", SPECS)
def test_switch_spec_round_trips(spec):
    policy = parse_switch(spec)
    assert parse_switch(str(policy)) == policy


@pytest.mark.parametrize("value", [1 / 3, 0.1 + 0.2, 1e-9, 0.5])
def test_switch_policies_built_directly_round_trip(value):
    policies = (SwitchPolicy("ratio", value), SwitchPolicy("boundary", value), SwitchPolicy("adaptive", value, 3, 9))
    for policy in policies:
        assert parse_switch(str(policy)) == policy


def test_params_round_trip_through_json(make_params):
    for spec in SPECS[:4] + SPECS[5:]:
        params = make_params(switch=spec, num_inference_steps=8, guidance_scale=1.0, negative_prompt="blur", seed=2**62)
        data = json.loads(json.dumps(params_to_dict(params)))
        assert data["switch"] == str(params.switch)
        assert params_from_dict(data) == params == GenerationParams.from_dict(params.to_dict())
    with pytest.raises(ValueError, match="missing keys \\['seed'\\].*unknown keys \\['extra'\\]"):
        params_from_dict({**{k: v for k, v in data.items() if k != "seed"}, "extra": 1})


@pytest.fixture(scope="module")
def sketched(engine, make_params):
    """sketched(switch, steps=4) -> (hand-off, its latents rendered in-process), cached per case."""
    cache = {}

    def make(switch, steps=4, guidance=5.0):
        key = (switch, steps, guidance)
        if key not in cache:
            params = make_params(num_inference_steps=steps, switch=switch, seed=21, guidance_scale=guidance)
            (embeds,) = engine.stages["encode"]([params])
            (handoff,) = engine.stages["sketch"]([(params, embeds)])
            (latents,) = engine.stages["render"]([handoff])
            cache[key] = handoff, latents
        return cache[key]

    return make


# boundary:1 sketches no step (t_0 = 999 < 1000): K = 0; step:4 of 4 leaves nothing to render: K = N.
@pytest.mark.parametrize(
    "switch, steps, guidance, k",
    [("boundary:1", 4, 5.0, 0), ("step:1", 4, 5.0, 1), ("step:2", 4, 1.0, 2), ("step:3", 4, 5.0, 3),
     ("step:4", 4, 5.0, 4), ("adaptive:0.5:2:5", 6, 5.0, None)],
)
def test_handoff_round_trip_is_exact_and_renders_the_same(engine, sketched, switch, steps, guidance, k):
    handoff, rendered = sketched(switch, steps, guidance)
    if k is not None:
        assert handoff.step_index == k
    else:
        assert handoff.rates and 2 <= handoff.step_index <= 5
    if k == 0:
        assert handoff.scheduler.model_outputs == [None, None] and handoff.scheduler.last_sample is None
    assert (handoff.embeds.negative is None) == (guidance <= 1.0)
    restored = handoff_from_bytes(handoff_to_bytes(handoff))
    assert_same_handoff(restored, handoff)
    (again,) = engine.stages["render"]([restored])
    assert_same(again, rendered, "rendered latents")


def test_sampler_extra_round_trips_and_is_checked(sketched):
    """A family's sampler state outside the scheduler (CogVideoX DPM: x0 history, generator state) travels exactly;
    a hand-off written before the field existed reads back with none; a bad entry fails at save, naming it."""
    handoff, _ = sketched("step:2")
    extra = {"pred_original_sample": torch.randn(1, 2, 4, 4, 4), "generator_state": torch.Generator().get_state()}
    with_extra = dataclasses.replace(handoff, sampler_extra=extra)
    assert_same_handoff(handoff_from_bytes(handoff_to_bytes(with_extra)), with_extra)
    assert handoff_from_bytes(handoff_to_bytes(handoff)).sampler_extra == {}
    with pytest.raises(TypeError, match="sampler_extra.*'bad name'"):
        handoff_to_bytes(dataclasses.replace(handoff, sampler_extra={"bad name": torch.zeros(1)}))


def test_dtypes_are_kept(sketched):
    handoff, _ = sketched("step:2")
    assert handoff.scheduler.timesteps.dtype == torch.int64
    bf16 = dataclasses.replace(
        handoff, latents=handoff.latents.bfloat16(), embeds=handoff.embeds.to("cpu", torch.bfloat16),
        rates=[0.5, float("nan")], timings={"sketch": float("inf")},
    )
    restored = handoff_from_bytes(handoff_to_bytes(bf16))
    assert restored.latents.dtype == torch.bfloat16 and restored.scheduler.timesteps.dtype == torch.int64
    assert_same_handoff(restored, bf16)
    for latents in (handoff.latents, handoff.latents.bfloat16(), handoff.latents[:, :, :, ::2]):  # a strided view too
        assert_same(latents_from_bytes(latents_to_bytes(latents)), latents.contiguous(), "latents")
    for embeds in (handoff.embeds, PromptEmbeds(handoff.embeds.prompt, None)):
        back = embeds_from_bytes(embeds_to_bytes(embeds))
        assert_same(back.prompt, embeds.prompt, "prompt")
        assert_same(back.negative, embeds.negative, "negative")


RENDER_FROM_CHECKPOINT = """
import sys
sys.modules["ray"] = None  # importing ray now fails: resuming a checkpoint must not need it
from pathlib import Path
from serve.checkpoint import handoff_from_bytes, latents_to_bytes
from serve.engine import EngineConfig
from serve.pipeline.segment import RenderStage

handoff = handoff_from_bytes(Path(sys.argv[1]).read_bytes())
(latents,) = RenderStage.load(EngineConfig(preset="tiny"))([handoff])
Path(sys.argv[2]).write_bytes(latents_to_bytes(latents))
"""


def test_checkpoint_renders_identically_in_a_fresh_process(sketched, tmp_path):
    """The hand-off is self-contained and small: its tensors (embeddings [1, 512, D] twice dominate) plus a few
    kilobytes of scheduler config and request, no model weights, no stray copies."""
    handoff, rendered = sketched("step:2")
    data = handoff_to_bytes(handoff)
    tensors = [handoff.latents, handoff.embeds.prompt, handoff.embeds.negative,
               *(t for t in handoff.scheduler.model_outputs if t is not None)]
    assert len(data) < sum(t.nbytes for t in tensors) + 32 * 1024
    (tmp_path / "handoff.safetensors").write_bytes(data)
    done = subprocess.run(
        [sys.executable, "-c", RENDER_FROM_CHECKPOINT, str(tmp_path / "handoff.safetensors"), str(tmp_path / "out")],
        capture_output=True, text=True, timeout=180,
    )
    assert done.returncode == 0, done.stderr
    assert_same(latents_from_bytes((tmp_path / "out").read_bytes()), rendered, "latents")


def _step(scheduler, i, output, sample, old, generator):
    """One sampler step as the scheduler's pipeline calls it; returns (sample, CogVideoX-DPM's x0 estimate)."""
    if isinstance(scheduler, diffusers.CogVideoXDPMScheduler):  # a two-step sampler: its pipeline carries x0
        back = scheduler.timesteps[i - 1] if i > 0 else None
        return scheduler.step(output, old, scheduler.timesteps[i], back, sample, generator=generator, return_dict=False)
    noise = {"generator": generator} if "generator" in inspect.signature(scheduler.step).parameters else {}
    return scheduler.step(output, scheduler.timesteps[i], sample, return_dict=False, **noise)[0], None


@pytest.mark.parametrize(
    "name", ["UniPCMultistepScheduler", "FlowMatchEulerDiscreteScheduler", "CogVideoXDPMScheduler",
             "CogVideoXDDIMScheduler", "DPMSolverMultistepScheduler"],
)
def test_other_schedulers_resume_exactly(name):
    scheduler = getattr(diffusers, name)()
    scheduler.set_timesteps(10)
    generator = torch.Generator().manual_seed(3)
    sample, old = torch.randn(1, 4, 2, 4, 4, generator=generator), None
    for i in range(3):
        sample, old = _step(scheduler, i, torch.randn(sample.shape, generator=generator), sample, old, generator)
    restored = scheduler_from_bytes(scheduler_to_bytes(scheduler))
    assert_same_scheduler(restored, scheduler)
    output = torch.randn(sample.shape, generator=generator)
    expected = _step(scheduler, 3, output, sample, old, torch.Generator().manual_seed(4))
    actual = _step(restored, 3, output, sample, old, torch.Generator().manual_seed(4))
    assert_same(actual[0], expected[0], f"{name} step 3")


def _rewritten(blob: bytes, edit) -> bytes:
    """`blob` with its JSON document changed by `edit(doc)`: what someone with write access to storage could do."""
    header = json.loads(blob[8 : 8 + int.from_bytes(blob[:8], "little")])
    doc = json.loads(header["__metadata__"][METADATA_KEY])
    edit(doc)
    return save_tensors(load_tensors(blob), metadata={METADATA_KEY: json.dumps(doc)})


@pytest.mark.parametrize("name", ["os.system", "Popen", "subprocess.Popen", "EvilScheduler", "SchedulerMixin",
                                  "WanPipeline", "KarrasDiffusionSchedulers", "__import__('os').Scheduler", None])
def test_only_diffusers_schedulers_are_loaded(name):
    blob = scheduler_to_bytes(diffusers.UniPCMultistepScheduler())
    forged = _rewritten(blob, lambda doc: doc["scheduler"].update({"class": name}))
    with pytest.raises(ValueError, match="scheduler class"):
        scheduler_from_bytes(forged)


def test_handoff_with_a_forged_class_is_refused(sketched):
    handoff, _ = sketched("step:1")
    forged = _rewritten(handoff_to_bytes(handoff), lambda doc: doc["scheduler"].update({"class": "Popen"}))
    with pytest.raises(ValueError, match="'Popen'"):
        handoff_from_bytes(forged)


@pytest.mark.parametrize("attr", ["__class__", "_internal_dict", "config", "a.b"])
def test_forged_attribute_names_are_refused(attr):
    blob = scheduler_to_bytes(diffusers.UniPCMultistepScheduler())
    forged = _rewritten(blob, lambda doc: doc["scheduler"]["attributes"].update({attr: {"kind": "json", "value": 1}}))
    with pytest.raises(ValueError, match="attribute"):
        scheduler_from_bytes(forged)


def test_unserialisable_attribute_fails_at_save_naming_it():
    scheduler = diffusers.UniPCMultistepScheduler()
    scheduler.solver_hook = lambda x: x
    with pytest.raises(TypeError, match="`solver_hook` is a function"):
        scheduler_to_bytes(scheduler)
    scheduler = diffusers.UniPCMultistepScheduler()
    scheduler.model_outputs = [torch.zeros(2), {"a": 1}]
    with pytest.raises(TypeError, match=re.escape("`model_outputs[1]` is a dict")):
        scheduler_to_bytes(scheduler)
    scheduler = diffusers.UniPCMultistepScheduler()
    scheduler.cache = {"sigma": 1.0}
    with pytest.raises(TypeError, match="`cache`"):
        scheduler_to_bytes(scheduler)

    class LocalScheduler(diffusers.UniPCMultistepScheduler):
        pass

    with pytest.raises(TypeError, match="LocalScheduler"):
        scheduler_to_bytes(LocalScheduler())


def test_numpy_tuples_and_non_finite_floats_survive_in_strict_json():
    scheduler = diffusers.DPMSolverMultistepScheduler()
    scheduler.set_timesteps(5)
    extra = {"np_sigmas": np.linspace(0, 1, 4), "np_scalar": np.float32(0.5), "shape": (1, 2),
             "t": (None, torch.ones(1)),
             "nan": float("nan"), "limits": [float("-inf"), 1.0, float("inf")]}
    for attr, value in extra.items():
        setattr(scheduler, attr, value)
    blob = scheduler_to_bytes(scheduler)
    header = json.loads(blob[8 : 8 + int.from_bytes(blob[:8], "little")])

    def refuse(token):
        raise AssertionError(f"non-strict JSON token {token}")

    json.loads(header["__metadata__"][METADATA_KEY], parse_constant=refuse)
    assert_same_scheduler(scheduler_from_bytes(blob), scheduler)


def test_blobs_of_another_kind_or_garbage_are_refused(sketched):
    handoff, _ = sketched("step:1")
    with pytest.raises(ValueError, match="holds 'latents', expected 'handoff'"):
        handoff_from_bytes(latents_to_bytes(handoff.latents))
    with pytest.raises(ValueError, match="not a safetensors checkpoint"):
        handoff_from_bytes(b"\x80\x04not safetensors at all")
    with pytest.raises(ValueError, match="no `srd` metadata"):
        latents_from_bytes(save_tensors({"latents": handoff.latents}))
    with pytest.raises(ValueError, match="version"):
        latents_from_bytes(_rewritten(latents_to_bytes(handoff.latents), lambda doc: doc.update({"version": 99})))


def test_no_pickle_anywhere():
    source = Path(serve.checkpoint.__file__).read_text()
    assert not re.search(r"^\s*(import pickle|from pickle)|pickle\.loads?\(|torch\.load\(", source, re.M)
