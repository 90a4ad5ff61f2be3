"""Bad input through the Python API: a ValidationError / InvalidRequest / ModelError that names the field or model."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

from serve.engine import Engine, EngineConfig
from serve.models import PRESETS, ModelError, ModelPair, check_compatible
from serve.request import InvalidRequest, VideoRequest

TINY = PRESETS["tiny"].defaults


@pytest.mark.parametrize(
    ("fields", "field", "message"),
    [
        ({"height": 40}, "height", "`height` must be a positive multiple of 16 but is 40"),
        ({"width": 8}, "width", "`width` must be a positive multiple of 16 but is 8"),
        ({"num_frames": 8}, "num_frames", "`num_frames` must be of the form 4n+1"),
        ({"num_frames": 0}, "num_frames", "`num_frames` must be of the form 4n+1"),
        ({"num_inference_steps": 0}, "num_inference_steps", "`num_inference_steps` must be >= 1 but is 0"),
        ({"guidance_scale": -1.0}, "guidance_scale", "`guidance_scale` must be >= 0"),
        ({"seed": -3}, "seed", "`seed` must be in [0, 2**63)"),
        ({"switch": "step:0"}, "switch", "K must be one integer >= 1"),
        ({"switch": "ratio:2"}, "switch", "R must be one number in (0, 1]"),
        ({"switch": "adaptive:0.01:9:3"}, "switch", "1 <= MIN <= MAX"),
        ({"switch": "halfway"}, "switch", "unknown policy 'halfway'"),
        ({"prompt": "   "}, "prompt", "`prompt` must not be empty"),
        ({"steps": 4}, "steps", "Extra inputs are not permitted"),
    ],
)
def test_invalid_field_is_named(fields, field, message):
    with pytest.raises(ValidationError) as caught:
        VideoRequest(**{"prompt": "a cat", **fields})
    (error,) = caught.value.errors()
    assert error["loc"] == (field,)
    assert message in error["msg"]


def test_missing_prompt_is_named():
    with pytest.raises(ValidationError) as caught:
        VideoRequest()
    assert caught.value.errors()[0]["loc"] == ("prompt",)


@pytest.mark.parametrize(("switch", "steps"), [("step:5", 4), ("step:51", None)])
def test_switch_step_beyond_n_is_invalid(switch, steps):
    request = VideoRequest(prompt="a cat", switch=switch, num_inference_steps=steps)
    with pytest.raises(InvalidRequest, match=r"must lie in 1\.\.num_inference_steps=") as caught:
        request.resolve(TINY if steps else PRESETS["wan2.1-t2v"].defaults)
    assert caught.value.field == "switch"


def test_k_equal_to_n_is_valid_and_defaults_fill_the_rest():
    params = VideoRequest(prompt="a cat", switch="step:4", num_inference_steps=4).resolve(TINY)
    assert params.switch.kind == "step" and params.switch.value == 4
    assert (params.width, params.height, params.num_frames) == (TINY.width, TINY.height, TINY.num_frames)
    assert params.guidance_scale == TINY.guidance_scale and params.negative_prompt == ""
    assert 0 <= params.seed < 2**63  # drawn when unset


def test_guidance_zero_is_kept_not_replaced_by_the_default():
    assert VideoRequest(prompt="a cat", guidance_scale=0.0).resolve(TINY).guidance_scale == 0.0


@pytest.mark.parametrize(
    ("which", "message"),
    [
        ("text_dim", "text_dim is 48 but the sketch model has 32"),
        ("in_channels", "in_channels is 8 but the sketch model has 16"),
        ("vae_pipeline", "uses a different VAE"),
    ],
)
def test_incompatible_render_model_is_rejected_before_loading(tiny_models, incompatible_renders, which, message):
    pair = ModelPair(sketch=tiny_models.sketch, render=incompatible_renders[which])
    with pytest.raises(ModelError, match=message):
        check_compatible(pair)
    with pytest.raises(ModelError, match=message):
        Engine(EngineConfig(sketch=pair.sketch, render=pair.render))


def test_compatible_render_sources_pass(tiny_models):
    check_compatible(tiny_models)  # a bare transformer directory
    check_compatible(ModelPair(tiny_models.sketch, tiny_models.sketch))  # a full pipeline directory


@pytest.mark.parametrize("role", ["sketch", "render"])
def test_missing_model_directory_is_named(tiny_models, tmp_path, role):
    missing = str(tmp_path / "no-such-model")
    sources = {"sketch": tiny_models.sketch, "render": tiny_models.render, role: missing}
    with pytest.raises(ModelError, match=rf"{role} model directory '.*no-such-model' does not exist"):
        Engine(EngineConfig(**sources))


def test_render_directory_without_a_model_is_rejected(tiny_models, tmp_path):
    with pytest.raises(ModelError, match="cannot load the render transformer config"):
        check_compatible(ModelPair(tiny_models.sketch, str(tmp_path)))


def test_unknown_device_is_named():
    with pytest.raises(ValidationError) as caught:
        EngineConfig(device="gpu")
    assert caught.value.errors()[0]["loc"] == ("device",)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a usable CUDA GPU")
def test_cuda_without_a_gpu_fails_before_loading(tiny_models):
    config = EngineConfig(device="cuda")  # a config may name a GPU that only the replicas' machines have
    with pytest.raises(ValueError, match="`device` is 'cuda' but torch .* sees no CUDA GPU"):
        Engine(config)
