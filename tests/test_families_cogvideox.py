"""CogVideoX-5B sketching, CogVideoX-2B rendering, through the engine, against diffusers' CogVideoXPipeline.

Oracle: `CogVideoXPipeline` with the sketch pipeline's components, its transformer swapped for the render
transformer after step K in `callback_on_step_end`, and the render transformer given its own positional inputs (a
forward pre-hook drops the sketch model's rotary embedding, which the pipeline computes once from the first
transformer's config and passes every step). With K = N it is the plain pipeline. tiny-cogvideox preset (5B-shaped
sketch with RoPE, 2B-shaped render with sin-cos positions, different VAE scales and snr_shift_scale), float32,
relative error <= 1e-5, guidance on.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from diffusers import CogVideoXPipeline, CogVideoXTransformer3DModel

from serve.checkpoint import handoff_from_bytes, handoff_to_bytes
from serve.engine import Engine, EngineConfig
from serve.families.base import family_of
from serve.models import PRESETS, ModelError, ModelPair, check_compatible
from serve.request import VideoRequest

TOLERANCE = 1e-5
SMALL = {"height": 32, "width": 48, "num_frames": 9, "num_inference_steps": 4}


@pytest.fixture(scope="module")
def cog_models(srd_cache):
    from serve.families.cogvideox import ensure_tiny_models

    return ensure_tiny_models()


@pytest.fixture(scope="module")
def cog(cog_models):
    return Engine(EngineConfig(preset="tiny-cogvideox"))


@pytest.fixture(scope="module")
def dpm_models(cog_models, tmp_path_factory):
    """The tiny sketch pipeline with CogVideoXDPMScheduler (CogVideoX-5B's model-card sampler) in place of DDIM."""
    root = tmp_path_factory.mktemp("cog-dpm") / "sketch"
    shutil.copytree(cog_models.sketch, root)
    config_path = root / "scheduler" / "scheduler_config.json"
    config = json.loads(config_path.read_text())
    config["_class_name"] = "CogVideoXDPMScheduler"
    config_path.write_text(json.dumps(config))
    index_path = root / "model_index.json"
    index = json.loads(index_path.read_text())
    index["scheduler"] = ["diffusers", "CogVideoXDPMScheduler"]
    index_path.write_text(json.dumps(index))
    return ModelPair(sketch=str(root), render=cog_models.render)


@pytest.fixture(scope="module")
def params_cog():
    def make(**fields):
        return VideoRequest(**{"prompt": "a red ball bouncing", "seed": 0, **SMALL, **fields}).resolve(
            PRESETS["tiny-cogvideox"].defaults)

    return make


@pytest.fixture(scope="module")
def oracle(cog_models):
    """oracle(params, k, sketch_dir=None, leak=False) -> CogVideoXPipeline's latents, transformer swapped after K,
    as [B, C, F', H', W'] (the pipeline's own [B, F', C, H', W'] permuted: the engine outputs the canonical layout)."""
    render = CogVideoXTransformer3DModel.from_pretrained(cog_models.render, subfolder="transformer")
    assert not render.config.use_rotary_positional_embeddings
    leaking = []  # non-empty: let the sketch model's RoPE through (the naive swap)

    def own_positions(module, args, kwargs):
        return (args, kwargs) if leaking else (args, {**kwargs, "image_rotary_emb": None})

    render.register_forward_pre_hook(own_positions, with_kwargs=True)
    pipes = {}

    def run(params, k: int, sketch_dir: str | None = None, leak: bool = False):
        source = sketch_dir or cog_models.sketch
        if source not in pipes:
            pipes[source] = CogVideoXPipeline.from_pretrained(source)
            pipes[source].set_progress_bar_config(disable=True)
        pipe = pipes[source]
        sketch = pipe.transformer
        assert sketch.config.use_rotary_positional_embeddings

        def swap(pipe_, i, t, tensors):
            if i == k - 1:
                pipe_.transformer = render
            return {}

        leaking[:] = [True] if leak else []
        try:
            return pipe(
                prompt=params.prompt, negative_prompt=params.negative_prompt, height=params.height,
                width=params.width, num_frames=params.num_frames, num_inference_steps=params.num_inference_steps,
                guidance_scale=params.guidance_scale, generator=torch.Generator("cpu").manual_seed(params.seed),
                output_type="latent", max_sequence_length=16, callback_on_step_end=swap,
            ).frames.permute(0, 2, 1, 3, 4)
        finally:
            pipe.transformer = sketch
            leaking.clear()

    return run


@pytest.mark.parametrize(("steps", "k", "seed"), [(4, 1, 0), (4, 3, 1), (6, 2, 2)], ids=["N4-K1", "N4-K3", "N6-K2"])
def test_sketch_render_equals_cogvideox_pipeline_with_swap(cog, oracle, params_cog, rel_err, steps, k, seed):
    params = params_cog(num_inference_steps=steps, switch=f"step:{k}", seed=seed)
    assert params.do_cfg and params.guidance_scale == 6.0
    result = cog.generate(params, decode=False)
    expected = oracle(params, k)
    assert result.switch_step == k
    assert result.latents.shape == expected.shape == (1, 4, 3, 4, 6)  # [B, C, F', H', W']
    assert rel_err(result.latents, expected) <= TOLERANCE


def test_no_switch_equals_plain_pipeline(cog, oracle, params_cog, rel_err):
    params = params_cog(switch="step:4", seed=3)
    result = cog.generate(params, decode=False)
    assert result.switch_step == 4
    assert rel_err(result.latents, oracle(params, k=99)) <= TOLERANCE


def test_render_gets_its_own_positions_and_matters(cog, oracle, params_cog, rel_err):
    """Guards: the naive swap (the sketch model's RoPE leaking into the 2B) gives another result, and so does
    sketching everything: the render model and its positional inputs both count."""
    params = params_cog(switch="step:2", seed=4)
    engine = cog.generate(params, decode=False).latents
    assert rel_err(engine, oracle(params, 2)) <= TOLERANCE
    assert rel_err(engine, oracle(params, 2, leak=True)) > 1e-4
    assert rel_err(engine, cog.generate(params_cog(switch="step:4", seed=4), decode=False).latents) > 1e-3


def test_dpm_scheduler_equals_pipeline_and_its_handoff_survives_checkpoint_bytes(dpm_models, oracle, params_cog,
                                                                                  rel_err):
    """CogVideoXDPMScheduler keeps its x0 history in the pipeline and draws noise from the pipeline's generator:
    both travel in the hand-off's sampler_extra, through serve.checkpoint's bytes."""
    engine = Engine(EngineConfig(sketch=dpm_models.sketch, render=dpm_models.render))
    params = params_cog(num_inference_steps=5, switch="step:2", seed=5)
    (embeds,) = engine.stages["encode"]([params])
    (handoff,) = engine.stages["sketch"]([(params, embeds)])
    assert type(handoff.scheduler).__name__ == "CogVideoXDPMScheduler"
    assert set(handoff.sampler_extra) == {"pred_original_sample", "generator_state"}
    restored = handoff_from_bytes(handoff_to_bytes(handoff))
    assert all(torch.equal(restored.sampler_extra[n], handoff.sampler_extra[n]) for n in handoff.sampler_extra)
    (direct,) = engine.stages["render"]([handoff])
    (again,) = engine.stages["render"]([restored])
    assert torch.equal(direct, again)
    assert rel_err(direct, oracle(params, 2, sketch_dir=dpm_models.sketch)) <= TOLERANCE


def test_ddim_handoff_through_checkpoint_bytes_renders_identically(cog, params_cog):
    params = params_cog(switch="step:2", seed=6)
    (embeds,) = cog.stages["encode"]([params])
    (handoff,) = cog.stages["sketch"]([(params, embeds)])
    (direct,) = cog.stages["render"]([handoff])
    (again,) = cog.stages["render"]([handoff_from_bytes(handoff_to_bytes(handoff))])
    assert torch.equal(direct, again)


def test_decode_and_preview_use_the_sketch_pipelines_vae(cog, params_cog):
    params = params_cog(switch="step:2", seed=7)
    assert cog.stages["decode"].pipe.vae.config.scaling_factor == 0.7  # the sketch pipeline owns the latent space
    (embeds,) = cog.stages["encode"]([params])
    (handoff,) = cog.stages["sketch"]([(params, embeds)])
    image = cog.stages["preview"](handoff)
    assert image.dtype.name == "uint8" and image.shape == (32, 48, 3)
    (latents,) = cog.stages["render"]([handoff])
    assert latents.shape[1] == 4  # [1, C, F', H', W'], the canonical layout the decoder takes
    frames = cog.stages["decode"](latents)
    assert frames.dtype.name == "uint8" and frames.shape == (1, params.num_frames, 32, 48, 3)
    pipe = cog.stages["decode"].pipe  # diffusers' own decode takes the pipeline's [B, F', C, H', W']
    with torch.no_grad():
        expected = pipe.video_processor.postprocess_video(pipe.decode_latents(latents.permute(0, 2, 1, 3, 4)), "np")
    expected = (np.asarray(expected) * 255).round().clip(0, 255).astype(np.int16)
    assert np.abs(frames.astype(np.int16) - expected).max() <= 1  # float rounding at .5 may flip a level


def test_family_comes_from_model_index(cog_models, tiny_models, tmp_path):
    assert family_of(cog_models.sketch).name == "cogvideox"
    assert family_of(tiny_models.sketch).name == "wan"
    other = tmp_path / "flux"
    other.mkdir()
    (other / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline"}))
    with pytest.raises(ModelError, match=r"unknown model family: pipeline class 'FluxPipeline'.*supported: "
                                         r"CogVideoXPipeline, WanPipeline"):
        EngineConfig(sketch=str(other), render=str(other)).family()


def test_shared_components_are_checked_from_the_configs(cog_models, tmp_path):
    """A render pipeline whose VAE differs in architecture is refused; the scaling factor alone may differ."""
    check_compatible(cog_models)  # 0.7 vs 1.15258426, snr_shift_scale 1 vs 3: accepted, sketch owns the trajectory
    bad = tmp_path / "render"
    shutil.copytree(cog_models.render, bad)
    vae_config = bad / "vae" / "config.json"
    config = json.loads(vae_config.read_text())
    config["latent_channels"] = 8
    vae_config.write_text(json.dumps(config))
    with pytest.raises(ModelError, match=r"different VAE.*latent_channels differs"):
        check_compatible(ModelPair(cog_models.sketch, str(bad)))


@pytest.mark.parametrize("degrees", [{"ulysses_degree": 2}, {"cfg_degree": 2}, {"ring_degree": 2,
                                                                               "attention_backend": "flash"}])
def test_parallel_degrees_are_refused_before_loading(cog_models, degrees):
    from serve.parallel import ParallelConfig, check_parallel, load_transformer_config

    config = load_transformer_config(EngineConfig(preset="tiny-cogvideox"), "sketch")  # a config file, no weights
    with pytest.raises(ValueError, match="cogvideox family runs on one rank only"):
        check_parallel(ParallelConfig(**degrees), config)
    assert check_parallel(ParallelConfig(), config).family == "cogvideox"


def test_preset_defaults_are_the_pipelines():
    preset = PRESETS["cogvideox"]
    assert preset.models == ModelPair("THUDM/CogVideoX-5b", "THUDM/CogVideoX-2b")
    d = preset.defaults
    assert (d.width, d.height, d.num_frames, d.num_inference_steps, d.guidance_scale, d.fps, d.switch) == (
        720, 480, 49, 50, 6.0, 8, "ratio:0.2")
    assert preset.limits.max_tokens_per_video == 13 * 30 * 45


def test_plan_is_the_familys(cog, params_cog):
    plan = cog.plan(params_cog(num_inference_steps=10, switch=None))
    assert cog.config.family().name == "cogvideox" and plan.switch_step == 2  # the preset's ratio:0.2 of 10
    assert [(s.role, s.start, s.stop) for s in plan.segments] == [("sketch", 0, 2), ("render", 2, 10)]


@pytest.mark.parametrize("num_frames", [5, 13, 45])
def test_frame_counts_the_vae_cannot_decode_are_refused(cog, params_cog, num_frames, tmp_path, capsys):
    """An even latent frame count would decode to 4F' frames, not num_frames: refused by the family's check, from
    the engine and from `srd generate` as one line naming the field."""
    from serve.cli import main
    from serve.request import InvalidRequest

    with pytest.raises(InvalidRequest, match=f"`num_frames` must be of the form 8n\\+1.*but is {num_frames}"):
        cog.generate(params_cog(num_frames=num_frames))
    assert main(["generate", "--preset", "tiny-cogvideox", "--prompt", "a cat", "--frames", str(num_frames),
                 "--out", str(tmp_path / "x.mp4")]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "num_frames" in line and not (tmp_path / "x.mp4").exists()
