"""The placement planner (serve/placement.py) and `srd plan`: the cost model against the measured figures it comes
from, the split it derives, the Serve config it writes (which Serve's schema and the app's config accept), and the
checked-in GPU config being its output."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from ray.serve.schema import ServeDeploySchema

from deployments.config import AppConfig
from serve.cli import main
from serve.placement import CARDS, RESOLUTIONS, plan, serve_config, video_cost

H100, H200 = CARDS["h100"], CARDS["h200"]
GPU_YAML = Path(__file__).parent.parent / "deployments" / "configs" / "gpu.yaml"
H480, W480 = RESOLUTIONS["480p"]


@pytest.mark.parametrize("card, steps, k, measured_s", [
    (H100, 25, 5, 60.38),   # bench/RESULTS.md "Run 1" (b): sketch 34.25 + render 26.13
    (H100, 25, 4, 54.72),   # the same run's K=4: sketch 27.34 + render 27.38
    (H100, 25, 25, 171.97),  # and all-14B: sketch 171.96 + render 0.01
])
def test_cost_model_reproduces_the_measured_transformer_time(card, steps, k, measured_s):
    cost = video_cost(card, H480, W480, 81, steps, k)
    assert cost.sketch_s + cost.render_s == pytest.approx(measured_s, rel=0.02)


def test_720p_on_the_h100_is_the_measured_forward():
    h, w = RESOLUTIONS["720p"]
    assert video_cost(H100, h, w, 81, 1, 1, guidance=False).sketch_s == pytest.approx(12.633)


def test_k_decides_the_sketch_render_ratio():
    sketch_heavy = plan(8, H200, H480, W480, 81, 50, 40)
    render_heavy = plan(8, H200, H480, W480, 81, 50, 5)
    assert sketch_heavy.sketchers > sketch_heavy.renderers
    assert render_heavy.sketchers < render_heavy.renderers
    assert sketch_heavy.sketchers + sketch_heavy.renderers == 8


def test_the_split_is_the_best_integer_split():
    p = plan(16, H200, H480, W480, 81, 50, 10)
    c = p.cost
    rate = min(p.sketchers / c.sketch_s, p.renderers / (c.render_s + c.encode_s + c.decode_s))
    for s in range(1, 16):
        assert min(s / c.sketch_s, (16 - s) / (c.render_s + c.encode_s + c.decode_s)) <= rate + 1e-12
    assert p.videos_per_hour == pytest.approx(3600 * rate)


def test_encoder_and_decoder_go_beside_the_renderers_when_they_fit():
    p = plan(3, H200, H480, W480, 81, 50, 10)
    assert p.side == "renderers"
    assert p.gpu_share["renderer"] + p.gpu_share["encoder"] + p.gpu_share["decoder"] <= 1
    assert p.cost.render_gib + p.cost.side_gib < 0.9 * H200.memory_gib
    # today's layout (encoder and VAE on a GPU of their own) gives 3 GPUs one sketcher and one renderer
    today = 3600 * min(1 / p.cost.sketch_s, 1 / p.cost.render_s)
    assert p.videos_per_hour > today


def test_one_gpu_holds_everything_and_bad_input_names_the_argument():
    p = plan(1, H200, H480, W480, 81, 50, 10)
    assert p.side == "one GPU" and sum(p.gpu_share.values()) == 1
    with pytest.raises(ValueError, match="`gpus`"):
        plan(0, H200, H480, W480, 81, 50, 10)
    with pytest.raises(ValueError, match="switch step K"):
        plan(2, H200, H480, W480, 81, 50, 51)


def test_serve_config_is_accepted_by_serve_and_the_app():
    config = serve_config(plan(8, H200, H480, W480, 81, 50, 10))
    (application,) = ServeDeploySchema.model_validate(config).applications
    app = AppConfig.model_validate(application.args)
    assert app.sketcher.autoscaling.max_replicas == 4 and app.renderer.autoscaling.max_replicas == 4
    assert application.autoscaling_policy["policy_function"] == "deployments.autoscaling:CostAwarePolicy"
    assert application.autoscaling_policy["policy_kwargs"]["max_total_replicas"] == 8


def test_srd_plan_prints_and_writes_the_config(tmp_path, capsys):
    out = tmp_path / "plan.yaml"
    assert main(["plan", "--gpus", "8", "--resolution", "720p", "--switch", "ratio:0.2",
                 "--write-config", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "K=10" in printed and "4 sketch + 4 render" in printed and "videos/hour" in printed
    h, w = RESOLUTIONS["720p"]
    assert yaml.safe_load(out.read_text()) == serve_config(plan(8, H200, h, w, 81, 50, 10))
    assert main(["plan", "--gpus", "2", "--switch", "adaptive:0.01"]) == 2
    assert "give step:K or ratio:R" in capsys.readouterr().err


def test_checked_in_gpu_config_is_the_planners_output():
    assert yaml.safe_load(GPU_YAML.read_text()) == serve_config(plan(3, H200, H480, W480, 81, 50, 10))
    assert GPU_YAML.read_text().startswith("# srd plan --gpus 3 ")
