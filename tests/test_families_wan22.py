"""Wan2.2-A14B through the engine: the high-noise expert (`transformer`) sketches, the low-noise expert
(`transformer_2`) renders, and the result equals diffusers' own two-expert pipeline.

Oracle: `WanPipeline(transformer, transformer_2, boundary_ratio)(guidance_scale, guidance_scale_2)` on the
tiny-wan2.2 preset (one pipeline directory, random weights), float32, relative error <= 1e-5.
"""

from __future__ import annotations

import pytest
import torch
from diffusers import UniPCMultistepScheduler, WanPipeline

from serve.checkpoint import handoff_from_bytes, handoff_to_bytes
from serve.engine import Engine, EngineConfig
from serve.models import PRESETS
from serve.request import InvalidRequest, VideoRequest

TOLERANCE = 1e-5
SMALL = {"height": 32, "width": 32, "num_frames": 5, "num_inference_steps": 4}


@pytest.fixture(scope="module")
def wan22():
    return Engine(EngineConfig(preset="tiny-wan2.2"))


@pytest.fixture(scope="module")
def params22():
    def make(**fields):
        return VideoRequest(**{"prompt": "a red ball bouncing", "seed": 0, **SMALL, **fields}).resolve(
            PRESETS["tiny-wan2.2"].defaults)

    return make


@pytest.fixture(scope="module")
def oracle22(wan22):
    base = WanPipeline.from_pretrained(wan22.config.models().sketch)
    assert base.config.boundary_ratio == 0.875 and base.transformer_2 is not None

    def run(params, boundary_ratio=0.875):
        pipe = WanPipeline(
            tokenizer=base.tokenizer, text_encoder=base.text_encoder, vae=base.vae,
            scheduler=UniPCMultistepScheduler.from_config(base.scheduler.config, flow_shift=params.flow_shift),
            transformer=base.transformer, transformer_2=base.transformer_2, boundary_ratio=boundary_ratio,
        )
        pipe.set_progress_bar_config(disable=True)
        return pipe(
            prompt=params.prompt, negative_prompt=params.negative_prompt, height=params.height, width=params.width,
            num_frames=params.num_frames, num_inference_steps=params.num_inference_steps,
            guidance_scale=params.guidance_scale, guidance_scale_2=params.guidance_scale_2,
            generator=torch.Generator("cpu").manual_seed(params.seed), output_type="latent",
        ).frames

    return run


def test_preset_defaults_are_the_model_cards():
    preset = PRESETS["wan2.2-t2v-a14b"]
    assert preset.render_subfolder == "transformer_2"
    assert preset.models.sketch == preset.models.render == "Wan-AI/Wan2.2-T2V-A14B-Diffusers"
    d = preset.defaults
    assert (d.switch, d.guidance_scale, d.guidance_scale_2, d.num_inference_steps) == ("boundary:0.875", 4.0, 3.0, 40)


def test_each_stage_loads_its_expert(wan22, oracle22):
    base = WanPipeline.from_pretrained(wan22.config.models().sketch)
    for stage, expert in ((wan22.stages["sketch"], base.transformer), (wan22.stages["render"], base.transformer_2)):
        mine, theirs = stage.denoiser.transformer.state_dict(), expert.state_dict()
        assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)
    assert wan22.stages["encode"].pipe.transformer is None and wan22.stages["encode"].pipe.transformer_2 is None


@pytest.mark.parametrize(
    ("steps", "seed", "guidance", "guidance_2", "k"),
    [(4, 0, 4.0, 3.0, 2), (6, 1, 5.0, 2.0, None), (4, 2, 3.0, None, 2)],
    ids=["defaults-N4", "N6-other-scales", "guidance_2-unset"],
)
def test_boundary_and_both_guidance_scales_equal_wanpipeline(wan22, oracle22, params22, rel_err, steps, seed,
                                                             guidance, guidance_2, k):
    fields = {"num_inference_steps": steps, "seed": seed, "guidance_scale": guidance}
    if guidance_2 is not None:
        fields["guidance_scale_2"] = guidance_2
    params = params22(**fields)
    # unset: the preset's default 3.0, which diffusers is given explicitly
    assert params.render_guidance == (3.0 if guidance_2 is None else guidance_2)
    result = wan22.generate(params, decode=False)
    if k is not None:
        assert result.switch_step == k  # N=4: t = [999, 900, 750, 500]; t >= 875 is sketched
    assert rel_err(result.latents, oracle22(params)) <= TOLERANCE


def test_other_boundaries_equal_wanpipeline(wan22, oracle22, params22, rel_err):
    params = params22(switch="boundary:0.6", seed=3)
    result = wan22.generate(params, decode=False)
    assert result.switch_step == 3
    assert rel_err(result.latents, oracle22(params, boundary_ratio=0.6)) <= TOLERANCE


def test_guidance_scale_2_matters(wan22, params22, rel_err):
    """Guards the parity test against a render stage that ignores guidance_scale_2."""
    a = wan22.generate(params22(guidance_scale_2=3.0, seed=4), decode=False).latents
    b = wan22.generate(params22(guidance_scale_2=6.0, seed=4), decode=False).latents
    assert rel_err(a, b) > 1e-3


def test_handoff_through_checkpoint_bytes_renders_identically(wan22, params22):
    params = params22(seed=5)
    (embeds,) = wan22.stages["encode"]([params])
    (handoff,) = wan22.stages["sketch"]([(params, embeds)])
    restored = handoff_from_bytes(handoff_to_bytes(handoff))
    assert restored.params == params and restored.params.guidance_scale_2 == 3.0
    (direct,) = wan22.stages["render"]([handoff])
    (again,) = wan22.stages["render"]([restored])
    assert torch.equal(direct, again)


@pytest.mark.parametrize("value", [-1.0, float("nan"), "x"])
def test_guidance_scale_2_is_validated(value):
    with pytest.raises(ValueError, match="guidance_scale_2"):
        VideoRequest(prompt="p", guidance_scale_2=value)


def test_guidance_scale_2_defaults_to_guidance_scale_elsewhere(make_params):
    params = make_params(guidance_scale=7.0)
    assert params.guidance_scale_2 is None and params.render_guidance == 7.0
    only_render = make_params(guidance_scale=1.0, guidance_scale_2=4.0)
    assert only_render.do_cfg and only_render.render_guidance == 4.0  # the render stage needs negative embeddings
    assert not isinstance(only_render, InvalidRequest)


def test_plan_names_each_expert_its_steps_and_guidance(wan22, params22):
    """The request's plan (serve/switch.py): each segment's model role, steps and guidance; each role loads its
    expert (`ModelPair.transformer`), and the Engine runs exactly the plan."""
    params = params22(seed=6)
    plan = wan22.plan(params)
    sketch, render = plan.segments
    assert (sketch.role, sketch.start, sketch.stop, sketch.guidance) == ("sketch", 0, 2, 4.0)  # t = [999, 900, ...]
    assert (render.role, render.start, render.stop, render.guidance) == ("render", 2, 4, 3.0)
    source = wan22.config.models().sketch
    assert wan22.config.models().transformer("sketch") == (source, None)
    assert wan22.config.models().transformer("render") == (source, "transformer_2")
    result = wan22.generate(params, decode=False)
    assert result.plan == plan and result.switch_step == plan.switch_step == 2
    adaptive = wan22.plan(params22(switch="adaptive:0.01:1:3"))
    assert adaptive.switch_step is None and adaptive.segments[1].start is None  # decided while sketching


def test_the_on_disk_recipe_renders_with_the_low_noise_expert(wan22, oracle22, params22, rel_err, tmp_path):
    """`srd generate --preset wan2.2-t2v-a14b --sketch DIR --render DIR` with DIR a whole Wan2.2 pipeline (the
    README's recipe for checkpoints on disk): the render stage takes the preset's `transformer_2`, so the result
    equals WanPipeline with both experts. Here the saved tiny-wan2.2 pipeline stands for DIR."""
    from serve.cli import main

    saved = str(tmp_path / "Wan2.2-T2V-A14B-Diffusers")
    WanPipeline.from_pretrained(wan22.config.models().sketch).save_pretrained(saved)
    config = EngineConfig(preset="tiny-wan2.2", sketch=saved, render=saved)
    assert config.models().transformer("render") == (saved, "transformer_2")
    latents_path = tmp_path / "latents.pt"
    assert main(["generate", "--preset", "tiny-wan2.2", "--sketch", saved, "--render", saved, "--prompt",
                 "a red ball bouncing", "--height", "32", "--width", "32", "--frames", "5", "--steps", "4",
                 "--seed", "0", "--out", str(tmp_path / "v.mp4"), "--save-latents", str(latents_path)]) == 0
    assert rel_err(torch.load(latents_path), oracle22(params22())) <= TOLERANCE
    # a transformer directory as --render has no subfolder of its own
    assert EngineConfig(preset="tiny-wan2.2", sketch=saved, render=f"{saved}/transformer_2").models().transformer(
        "render") == (f"{saved}/transformer_2", None)


def test_ti2v_pipelines_are_refused_before_loading(wan22, tmp_path):
    import json
    import shutil

    from serve.models import ModelError, ModelPair, check_compatible

    ti2v = tmp_path / "ti2v"
    shutil.copytree(wan22.config.models().sketch, ti2v)
    index = json.loads((ti2v / "model_index.json").read_text())
    (ti2v / "model_index.json").write_text(json.dumps({**index, "expand_timesteps": True}))
    with pytest.raises(ModelError, match="expand_timesteps"):
        check_compatible(ModelPair(str(ti2v), str(ti2v), render_subfolder="transformer_2"))


def test_cli_guidance_2_sets_the_render_experts_guidance(wan22, params22, rel_err, tmp_path, capsys):
    """`srd generate --guidance-2` is the request's guidance_scale_2: the saved latents equal the engine's with
    that value, and a bad value is one line naming the field."""
    from serve.cli import main

    latents_path = tmp_path / "latents.pt"
    args = ["generate", "--preset", "tiny-wan2.2", "--prompt", "a red ball bouncing", "--height", "32", "--width",
            "32", "--frames", "5", "--steps", "4", "--seed", "0", "--out", str(tmp_path / "v.mp4")]
    assert main([*args, "--guidance-2", "1.5", "--save-latents", str(latents_path)]) == 0
    expected = wan22.generate(params22(guidance_scale_2=1.5), decode=False).latents
    assert rel_err(torch.load(latents_path), expected) <= TOLERANCE

    capsys.readouterr()
    assert main([*args, "--guidance-2", "-1"]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "guidance_scale_2" in line and "must be >= 0" in line
