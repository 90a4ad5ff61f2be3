"""CPU smoke tests of the GPU bench script (bench/run.py) on tiny random-init models: every part runs, records no
error, the e2e part goes through the engine's stages (K = N and K < N), and --write-costs writes the placement
planner's entry of the card it ran on."""

import json

import pytest
import torch

from bench.run import main


def _no_errors(parts: dict) -> None:
    for name, record in parts.items():
        assert "error" not in record, (name, record.get("traceback"))
        assert "skipped" not in record, (name, record["skipped"])


def test_bench_smoke_stages_e2e_handoff(tmp_path):
    out = tmp_path / "results.json"
    result = main(["--smoke", "--parts", "models,forward,anchors,e2e,handoff", "--out", str(out)])
    parts = result["parts"]
    _no_errors(parts)
    assert json.loads(out.read_text())["meta"]["label"] == "random-init weights, real architecture"
    runs = parts["e2e"]["runs"]
    full, sr = runs["4"], runs["2"]
    assert full["K"] == full["N"] == 4 and full["switch_step"] == 4 and full["speedup_measured"] == 1.0
    assert sr["switch_step"] == 2 and sr["latents_finite"]
    assert set(sr["stage_s"]) == {"encode", "sketch", "render", "decode"} and sr["ideal_s"] > 0
    assert parts["handoff"]["bytes_mb"] > 0 and parts["handoff"]["roundtrip_exact"]  # the stores' safetensors codec
    # the levers' rows (--smoke's spec): on the CPU every lever falls back, visibly, and the numerics stay eager's
    levers = parts["e2e"]["levers"]
    assert levers["render"]["attention"] == "sdpa" and "fallback" in levers["render"]["attention_reason"]
    stacked = runs["2+levers"]
    assert stacked["levers_on"] == ["sketch", "render"] and stacked["render_steps_computed"] == 2
    assert stacked["cosine_vs_sr_eager"] == pytest.approx(1.0) and stacked["rel_error_vs_sr_eager"] <= 1e-6
    assert {"2+levers+cache0.05", "2+levers+cache0.1"} <= set(runs)


def test_bench_smoke_writes_the_cost_entry_of_its_card(tmp_path):
    costs = tmp_path / "costs.json"
    other = {"measured": "elsewhere", "encode_s": 1.0}
    shapes = {"480p": [32, 48, 5], "720p": [48, 64, 5]}  # the smoke sizes: a table of the real shapes is refused
    costs.write_text(json.dumps({"about": "-", "shapes": shapes, "cards": {"other": other}}))
    doc = main(["--smoke", "--parts", "models,forward,forward720,anchors", "--write-costs", str(costs),
                "--out", str(tmp_path / "run.json")])
    _no_errors(doc["parts"])
    table = json.loads(costs.read_text())
    assert table["shapes"] == shapes and table["cards"]["other"] == other
    entry = table["cards"]["cpu"]
    assert entry["measured"].startswith("cpu, ") and "--write-costs" in entry["measured"]
    forward = doc["parts"]["forward720"]["smoke-render"]["B1"]["median_s"]
    assert entry["forward_s"]["render"]["720p"] == forward > 0 and entry["decode_480p_s"] > 0
    assert entry["weights_gib"]["sketch"] > entry["weights_gib"]["render"] > 0
    assert entry["memory_gib"] is None and entry["forward_peak_gib"]["sketch"]["480p"] is None  # no GPU, no peaks
    with pytest.raises(SystemExit):  # the figures need all four parts
        main(["--smoke", "--parts", "models,forward", "--write-costs", str(costs), "--out", str(tmp_path / "x")])


def test_bench_smoke_vae(tmp_path):
    parts = main(["--smoke", "--parts", "vae", "--out", str(tmp_path / "vae.json")])["parts"]
    _no_errors(parts)
    vae = parts["vae"]
    assert vae["untiled_float32"]["median_s"] > 0
    tiled = vae["tiled_float32_2x2"]
    assert "error" not in tiled and tiled["rel_l2_diff_vs_untiled"] >= 0


# Moved here from tests/test_parallel.py and tests/test_random_init.py: product tests do not import bench/.
TOL = 1e-5


def layout(model: torch.nn.Module) -> dict[str, tuple]:
    """Name -> (shape, dtype, device type) of every parameter and buffer."""
    tensors = [*model.named_parameters(), *(("buffer " + n, b) for n, b in model.named_buffers())]
    return {name: (tuple(t.shape), t.dtype, t.device.type) for name, t in tensors}


def test_xfuser_overhead_bench_smoke(tmp_path):
    """bench/xfuser_overhead.py on CPU: both paths run on the same weights and agree; a backend with no kernel here
    is reported, not fatal. (On the GPU it measures the 14B architecture at 480p.)"""
    import json

    from bench import xfuser_overhead

    out = tmp_path / "xfuser_overhead.json"
    assert xfuser_overhead.main(["--smoke", "--warmup", "0", "--runs", "1", "--backends", "sdpa,cudnn",
                                 "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["parts"]
    assert set(rows) == {"diffusers (first)", "xfuser/sdpa", "xfuser/cudnn", "diffusers (last)"}
    assert rows["xfuser/sdpa"]["attention_backend"] == "SDPA" and rows["xfuser/sdpa"]["rel_err_vs_diffusers"] <= TOL
    assert "vs_diffusers" in rows["xfuser/sdpa"] and "unavailable" in rows["xfuser/cudnn"]


def test_config_only_writer_gives_the_bench_architectures(tmp_path):
    from bench import wan
    from serve import models

    pair = wan.write_config_only(wan.SMOKE, tmp_path)
    assert sum(f.stat().st_size for f in tmp_path.rglob("*") if f.is_file()) < 100_000  # configs only
    sketch = models.load_transformer(pair.sketch, "sketch", "cpu", torch.bfloat16, "random-init")
    render = models.load_transformer(pair.render, "render", "cpu", torch.bfloat16, "random-init")
    assert layout(sketch) == layout(wan.transformer(wan.SMOKE.sketch, "cpu", torch.bfloat16))
    assert layout(render) == layout(wan.transformer(wan.SMOKE.render, "cpu", torch.bfloat16))
    pipe = models.load_pipeline(pair.sketch, ("text_encoder", "tokenizer", "vae"), "cpu", torch.float32,
                                "random-init")
    assert layout(pipe.text_encoder) == layout(wan.text_encoder(wan.SMOKE.text_encoder, "cpu", torch.float32))
    assert layout(pipe.vae) == layout(wan.vae(wan.SMOKE.vae, "cpu", torch.float32))
    models.check_compatible(pair)


# Moved here from tests/test_toy_preset.py and tests/test_toy_train.py.
def test_the_large_model_is_the_better_denoiser_at_every_noise_level():
    from bench import toy_sigma_error

    rows = {r["sigma"]: r for r in toy_sigma_error.main(["--clips", "8"])["rows"]}
    assert list(rows) == list(toy_sigma_error.SIGMAS)
    # 96 clips: the small model's x_0 error is 1.17-1.32x the large one's at every sigma (bench/RESULTS.md)
    assert all(r["large"] < r["small"] for r in rows.values()), rows


def test_toy_quality_scores_every_setting(tmp_path):
    """bench/toy_quality.py on the shipped toy pair (the default --models), 2 videos per setting: fixed K, a
    three-segment schedule, a calibration written and read back by a quality target, the plot."""
    from bench import toy_quality
    from serve.calibration import load_calibration

    result = toy_quality.main(["--device", "cpu", "--videos", "2", "--batch", "2", "--ks", "5",
                               "--schedules", "step:4:19", "--adaptive", "adaptive:0.05:2:12", "--quality", "0.5",
                               "--levers", "", "--cost-runs", "1", "--calibrate", str(tmp_path / "cal.json"),
                               "--plot", str(tmp_path / "q.png"), "--out", str(tmp_path / "q.json")])
    rows = result["parts"]
    assert rows["ground truth"]["adherence"]["all"] == 100.0
    assert rows["all-large"]["k"] == {20: 2} and rows["all-large"]["lse"] == pytest.approx(20.0)
    assert rows["all-small"]["k"] == {0: 2} and rows["SR K=5"]["k"] == {5: 2}
    assert (rows["step:4:19"]["large_steps"], rows["step:4:19"]["small_steps"]) == (5, 15)
    c = result["meta"]["step_cost_ratio"]  # a wall-clock ratio on a shared machine: only its use is checked
    assert rows["step:4:19"]["lse"] == pytest.approx(rows["SR K=5"]["lse"]) == pytest.approx(5 + 15 * c)
    assert rows["step:4:19"]["vs_fixed_k"]["row"] == "SR K=5"  # equal cost: 5 large steps each
    assert rows["all-small"]["lse_wan"] == pytest.approx(20 * result["meta"]["wan_step_cost_ratio"])

    calibration = load_calibration(str(tmp_path / "cal.json"))
    assert {s.switch for s in calibration.schedules} == {"ratio:1", "boundary:1", "ratio:0.25", "ratio:0.2:0.95"}
    assert calibration.step_cost_ratio == c
    assert rows["quality:0.5"]["predicted"]["switch"] == calibration.schedule_for(0.5).switch
    assert (tmp_path / "q.png").stat().st_size > 10_000
    assert all(0 <= row["adherence"][a] <= 100 for row in rows.values() for a in toy_quality.ATTRIBUTES)
    assert json.loads((tmp_path / "q.json").read_text())["parts"].keys() == rows.keys()
