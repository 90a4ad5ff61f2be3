"""Shared fixtures: the tiny preset, built once per session into a private model cache, and small request helpers.

Every test runs on the CPU with the tiny preset (random weights, diffusers' layout) at tiny sizes and few steps.
"""

from __future__ import annotations

import os

import pytest
import torch

# Small enough that a denoising step takes milliseconds, large enough to have several tokens and latent frames.
SMALL = {"height": 32, "width": 32, "num_frames": 5, "num_inference_steps": 4}
PROMPT = "a red ball bouncing"


@pytest.fixture(scope="session", autouse=True)
def srd_cache(tmp_path_factory):
    """A fresh model cache for the whole session (never the user's ~/.cache/srd). Subprocesses and Ray workers
    started by tests inherit it through the environment."""
    path = tmp_path_factory.mktemp("srd-cache")
    saved = {k: os.environ.get(k) for k in ("SRD_CACHE", "TOKENIZERS_PARALLELISM")}
    os.environ["SRD_CACHE"] = str(path)
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    yield path
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture(scope="session")
def tiny_models(srd_cache):
    """The tiny preset's ModelPair: a full sketch pipeline directory and a render transformer directory."""
    from serve.tiny import ensure_tiny_models

    return ensure_tiny_models()


@pytest.fixture(scope="session")
def tiny_config(tiny_models):
    from serve.engine import EngineConfig

    return EngineConfig(preset="tiny")


@pytest.fixture(scope="session")
def engine(tiny_config):
    """One in-process engine on the tiny preset, shared by the tests that only read from it."""
    from serve.engine import Engine

    return Engine(tiny_config)


@pytest.fixture(scope="session")
def make_params():
    """make_params(**fields) -> GenerationParams: a validated tiny request, SMALL sizes unless overridden."""
    from serve.models import PRESETS
    from serve.request import VideoRequest

    def make(**fields):
        fields = {"prompt": PROMPT, "seed": 0, **SMALL, **fields}
        return VideoRequest(**fields).resolve(PRESETS["tiny"].defaults)

    return make


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual.double() - expected.double()).norm() / expected.double().norm())


@pytest.fixture(scope="session")
def rel_err():
    """rel_err(actual, expected) = |actual - expected| / |expected| (Frobenius norms, in float64)."""
    return relative_error


@pytest.fixture(scope="session")
def incompatible_renders(tiny_models, tmp_path_factory) -> dict[str, str]:
    """Render models the tiny sketch pipeline cannot hand over to, keyed by what differs: transformers with another
    text_dim or in_channels (built here, random weights) and a full pipeline whose VAE normalises latents differently."""
    import json
    import shutil

    from diffusers import WanTransformer3DModel

    root = tmp_path_factory.mktemp("incompatible")
    common = dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, freq_dim=64, ffn_dim=64,
                  num_layers=1, cross_attn_norm=True, qk_norm="rms_norm_across_heads", rope_max_seq_len=64)
    WanTransformer3DModel(in_channels=16, out_channels=16, text_dim=48, **common).save_pretrained(root / "text_dim")
    WanTransformer3DModel(in_channels=8, out_channels=8, text_dim=32, **common).save_pretrained(root / "in_channels")

    shutil.copytree(tiny_models.sketch, root / "vae_pipeline")
    vae_config = root / "vae_pipeline" / "vae" / "config.json"
    config = json.loads(vae_config.read_text())
    config["latents_mean"] = [m + 1.0 for m in config["latents_mean"]]
    vae_config.write_text(json.dumps(config))
    return {name: str(root / name) for name in ("text_dim", "in_channels", "vae_pipeline")}
