"""The decode stage's tile geometry (serve.config.VaeTiling, chosen from bench/RESULTS.md): defaults, validation,
and that DecodeStage hands it to diffusers' AutoencoderKLWan tiling (tiny preset, CPU)."""

import re

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from serve.config import EngineConfig, VaeTiling
from serve.pipeline.decode import DecodeStage


def test_default_geometry_is_the_measured_one():
    assert VaeTiling().model_dump() == {
        "tile_sample_min_height": 720, "tile_sample_min_width": 704,
        "tile_sample_stride_height": 720, "tile_sample_stride_width": 640,
    }
    assert EngineConfig().vae_tiling is False  # 480p bf16 decodes untiled at 4.4 GiB peak


@pytest.mark.parametrize("field, value, message", [
    ("tile_sample_stride_width", 720, "must be <= `tile_sample_min_width` (704)"),
    ("tile_sample_min_height", 100, "multiples of 8"),
])
def test_bad_geometry_names_the_field(field, value, message):
    with pytest.raises(ValidationError, match=re.escape(message)) as err:
        VaeTiling(**{field: value})
    assert field.rsplit("_", 1)[-1] in str(err.value)


def test_decode_stage_applies_the_geometry(tiny_models):
    tile = VaeTiling(tile_sample_min_height=24, tile_sample_min_width=32, tile_sample_stride_height=16,
                     tile_sample_stride_width=24)
    tiled = DecodeStage.load(EngineConfig(preset="tiny", vae_tiling=True, vae_tile=tile))
    vae = tiled.pipe.vae
    assert vae.use_tiling
    assert (vae.tile_sample_min_height, vae.tile_sample_min_width, vae.tile_sample_stride_height,
            vae.tile_sample_stride_width) == (24, 32, 16, 24)
    assert not DecodeStage.load(EngineConfig(preset="tiny")).pipe.vae.use_tiling
    latents = torch.randn(1, 16, 2, 6, 8, generator=torch.Generator().manual_seed(0))  # 48 x 64 px: 2 x 3 tiles
    frames = tiled(latents)
    assert frames.shape == (1, 5, 48, 64, 3) and frames.dtype == np.uint8
