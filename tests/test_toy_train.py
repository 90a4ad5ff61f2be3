"""The toy pair's training command and its benchmark, on the CPU with a few steps: the VAE gate stops an
untrained VAE before the DiTs, a second run reuses that VAE, one DiT can train alone, the saved pair stays under
the 20 MB that may be committed and loads through the engine like any checkpoint (bench.toy_quality's smoke test,
in tests/test_bench.py, scores the shipped pair)."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from serve.denoise import GuidedDenoiser, LatentSpec
from serve.engine import Engine, EngineConfig
from serve.families.wan import FAMILY as WAN
from serve.handoff import PromptEmbeds
from serve.models import PRESETS
from serve.request import VideoRequest
from serve.pipeline.segment import RenderStage, SketchStage
from toy import pair, train

FEW = ["--device", "cpu", "--vae-batch", "2", "--dit-batch", "2", "--bank", "4", "--check-clips", "4"]
MAX_BYTES = 20 * 10**6  # all the toy pair's committed weights together: a small clone


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("toy")
    with pytest.raises(SystemExit, match="min-vae-adherence 80"):
        train.main(["--out", str(out / "gated"), "--vae-steps", "1", "--dit-steps", "1", *FEW])
    gated = json.loads((out / "gated" / "training.json").read_text())
    pair = out / "pair"
    report = train.main(["--out", str(pair), "--vae-from", str(out / "gated" / "sketch"), "--min-vae-adherence", "0",
                         "--dit-steps", "2", *FEW])
    return gated, report, pair


def test_the_vae_gate_stops_before_the_dits_and_keeps_the_vae(trained):
    gated, _, _ = trained
    assert gated["vae"]["steps"] == 1 and gated["vae"]["check"]["adherence"] < 80
    assert "dit" not in gated
    assert gated["vae"]["latents_std"] != [1.0] * len(gated["vae"]["latents_std"])  # measured, not the placeholder


def test_reused_vae_and_two_dit_steps_give_a_pair_under_the_size_cap(trained):
    gated, report, pair = trained
    assert report["vae"]["from"].endswith("gated/sketch")
    # the same VAE, read back from disk (stored in float16, so equal up to that rounding)
    assert report["vae"]["check"]["mse"] == pytest.approx(gated["vae"]["check"]["mse"], rel=1e-3)
    assert report["dit"]["steps"] == 2 and {"large", "small"} <= report["dit"]["log"][-1].keys()
    assert report["parameters"]["large"] > 2 * report["parameters"]["small"]
    assert 0 < report["save"]["bytes_total"] <= MAX_BYTES
    assert max(report["save"]["files"].values()) < 5 * 10**6  # sharded: the repository keeps no large files
    assert (pair / "sketch" / "model_index.json").is_file() and (pair / "render" / "config.json").is_file()


def test_one_dit_trains_alone_and_saves_only_its_part(trained, tmp_path, capsys):
    _, _, pair = trained
    args = ["--vae-from", str(pair / "sketch"), "--min-vae-adherence", "0", "--dit-steps", "1", *FEW]
    report = train.main(["--out", str(tmp_path / "small"), "--dits", "small", *args])
    assert report["parameters"].keys() == {"text_encoder", "vae", "small"}
    assert report["dit"]["log"][0].keys() >= {"small"} and "large" not in report["dit"]["log"][0]
    assert (tmp_path / "small" / "render" / "config.json").is_file()
    assert (tmp_path / "small" / "sketch" / "vae" / "config.json").is_file()
    assert not (tmp_path / "small" / "sketch" / "transformer").exists()
    with pytest.raises(SystemExit) as stop:
        train.main(["--out", str(tmp_path / "bad"), "--dits", "medium", *args])
    assert stop.value.code == 2 and "--dits: expected 'large', 'small' or both, got medium" in capsys.readouterr().err


def test_the_pair_loads_and_generates_through_the_engine(trained):
    _, _, pair = trained
    config = EngineConfig(preset="toy", sketch=str(pair / "sketch"), render=str(pair / "render"))
    engine = Engine(config)
    params = VideoRequest(prompt="a large red circle moving left slowly on a black background", seed=1,
                          num_inference_steps=3, switch="step:1").resolve(config.defaults)
    result = engine.generate(params)
    assert result.frames.shape == (17, 64, 64, 3) and result.switch_step == 1
    assert engine.stages["sketch"].spec.spatial == 4 and result.latents.shape == (1, 8, 5, 16, 16)


class PerfectVelocity(torch.nn.Module):
    """A stand-in for a perfectly trained toy DiT: it knows the clean latent x0, so from x_t and the timestep it can
    answer the exact velocity toy.train teaches (noise - x0, with x_t = (1 - s) x0 + s noise and timestep 1000 s)."""

    dtype = torch.float32

    def __init__(self, x0: torch.Tensor):
        super().__init__()
        self.x0 = x0
        self.config = SimpleNamespace(patch_size=(1, 2, 2))

    def forward(self, hidden_states, timestep, encoder_hidden_states, return_dict=False):
        sigma = timestep.float().view(-1, 1, 1, 1, 1) / 1000
        noise = (hidden_states - (1 - sigma) * self.x0) / sigma
        return (noise - self.x0,)


def test_the_training_target_is_what_the_engines_sampler_reads():
    """If the training convention (toy.train.flow_matching_example) and the sampler's (UniPC, flow sigmas) disagreed
    in sign, scale or timestep units, a perfect model would still not land on x0."""
    x0 = torch.randn(1, 8, 5, 16, 16, generator=torch.Generator().manual_seed(0))
    model = PerfectVelocity(x0)
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(1))
    sigma = torch.tensor([0.7])
    xt, timestep, target = train.flow_matching_example(x0, noise, sigma)
    torch.testing.assert_close(model(xt, timestep, None)[0], target, rtol=1e-4, atol=1e-4)

    defaults = PRESETS["toy"].defaults
    params = VideoRequest(prompt="a large red circle moving left slowly on a black background", seed=3,
                          switch="step:5").resolve(defaults)
    embeds = PromptEmbeds(torch.zeros(1, 4, pair.TEXT_DIM), torch.zeros(1, 4, pair.TEXT_DIM))
    spec = LatentSpec(channels=8, temporal=4, spatial=4)
    denoiser = GuidedDenoiser(model)
    scheduler = pair.scheduler(defaults.flow_shift)
    config = {**scheduler.config, "_class_name": type(scheduler).__name__}  # as load_scheduler_config reads it
    (handoff,) = SketchStage(WAN, denoiser, config, spec)([(params, embeds)])
    assert handoff.step_index == 5
    (latents,) = RenderStage(WAN, denoiser, config, spec)([handoff])
    assert (latents - x0).norm() / x0.norm() < 0.005  # 0.0014 measured; 0.03 with timesteps off by 30%


def test_step_plan_fits_the_time_budget_and_decays_to_its_floor():
    import time

    plan = train.StepPlan(max_steps=1000, seconds=1.0, warmup=5)
    step = 0
    while plan.keep_going(step):
        time.sleep(0.02)
        step += 1
    assert step <= plan.total < 1000  # the measured 20 ms steps fit ~50 in a second, not 1000
    fixed = train.StepPlan(max_steps=100, seconds=1e9, warmup=10)
    lrs = [fixed.lr(s, 1.0) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)  # linear warm-up
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:]))  # then it only decays
    assert lrs[-1] == pytest.approx(0.05, abs=1e-3)  # to 5% of the base


def test_foreground_is_the_shape_and_never_the_background():
    from toy import data

    scenes = data.sample_scenes(6, seed=3)
    clips = data.render_clips(scenes)
    mask = train.foreground(clips)[:, 0]
    background = torch.tensor([data.BACKGROUND_RGB[s.background] for s in scenes]).view(-1, 3, 1, 1, 1) * 2 - 1
    off_background = (clips - background).abs().amax(dim=1) > 0.05
    assert torch.equal(mask, off_background)
    assert 0.01 < mask.float().mean() < 0.2  # a shape covers 2-14% of a frame
