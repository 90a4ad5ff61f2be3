"""weights="random-init": a config-only model directory (configs and tokenizer files, no weights) loads into the
architectures its configs describe, with the parameter and buffer shapes and dtypes that from_pretrained gives the
same architecture with real weights; with weights="pretrained" the same directory fails with a clear ModelError."""

from __future__ import annotations

import shutil

import pytest
import torch

from serve import models
from serve.engine import Engine, EngineConfig

WEIGHT_FILES = ("*.safetensors", "*.bin")


@pytest.fixture(scope="module")
def config_only(tiny_models, tmp_path_factory) -> models.ModelPair:
    """The tiny preset's directories without their weight files."""
    root = tmp_path_factory.mktemp("config-only")
    shutil.copytree(tiny_models.sketch, root / "sketch", ignore=shutil.ignore_patterns(*WEIGHT_FILES))
    shutil.copytree(tiny_models.render, root / "render", ignore=shutil.ignore_patterns(*WEIGHT_FILES))
    assert not [p for pattern in WEIGHT_FILES for p in root.rglob(pattern)]
    return models.ModelPair(sketch=str(root / "sketch"), render=str(root / "render"))


def layout(model: torch.nn.Module) -> dict[str, tuple]:
    """Name -> (shape, dtype, device type) of every parameter and buffer."""
    tensors = [*model.named_parameters(), *(("buffer " + n, b) for n, b in model.named_buffers())]
    return {name: (tuple(t.shape), t.dtype, t.device.type) for name, t in tensors}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_random_init_matches_the_pretrained_layout(tiny_models, config_only, dtype):
    components = ("text_encoder", "tokenizer", "vae")
    real = models.load_pipeline(tiny_models.sketch, components, "cpu", dtype)
    fake = models.load_pipeline(config_only.sketch, components, "cpu", dtype, "random-init")
    for name in ("text_encoder", "vae"):
        assert layout(getattr(fake, name)) == layout(getattr(real, name)), name
        assert not getattr(fake, name).training
    assert fake.tokenizer("a red fox").input_ids == real.tokenizer("a red fox").input_ids

    pairs = ((tiny_models.sketch, config_only.sketch), (tiny_models.render, config_only.render))
    for real_source, fake_source in pairs:
        real_t = models.load_transformer(real_source, "sketch", "cpu", dtype)
        fake_t = models.load_transformer(fake_source, "sketch", "cpu", dtype, "random-init")
        assert layout(fake_t) == layout(real_t)
        assert all(torch.isfinite(p).all() for p in fake_t.parameters())
        assert not any(p.requires_grad for p in fake_t.parameters())
        if dtype == torch.bfloat16:  # diffusers' _keep_in_fp32_modules stay float32, the rest is bfloat16
            dtypes = {n: p.dtype for n, p in fake_t.named_parameters()}
            assert dtypes["scale_shift_table"] == torch.float32
            assert dtypes["blocks.0.attn1.to_q.weight"] == torch.bfloat16
    assert torch.get_default_dtype() == torch.float32  # the build's default dtype does not leak


def test_pretrained_on_a_config_only_directory_is_a_clear_error(config_only):
    with pytest.raises(models.ModelError, match=r"cannot load the render transformer from .*no file named.*"
                                                r"weights='random-init'"):
        models.load_transformer(config_only.render, "render", "cpu", torch.float32)
    with pytest.raises(models.ModelError, match=r"cannot load the pipeline from .*weights='random-init'"):
        models.load_pipeline(config_only.sketch, ("vae",), "cpu", torch.float32)


def test_engine_runs_on_random_init_weights(config_only, make_params):
    engine = Engine(EngineConfig(sketch=config_only.sketch, render=config_only.render, weights="random-init"))
    result = engine.generate(make_params(switch="step:2"))
    assert result.switch_step == 2 and result.latents.shape == (1, 16, 2, 4, 4)
    assert torch.isfinite(result.latents).all() and result.frames.shape == (5, 32, 32, 3)
