"""CPU smoke tests of the GPU bench script (bench/run.py) on tiny random-init models: every part runs, records no
error, and the e2e part goes through the engine's stage functions (K = N and K < N)."""

import json

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
    assert parts["handoff"]["bytes_mb"] > 0 and parts["handoff"]["roundtrip_equal"]


def test_bench_smoke_vae(tmp_path):
    parts = main(["--smoke", "--parts", "vae", "--out", str(tmp_path / "vae.json")])["parts"]
    _no_errors(parts)
    vae = parts["vae"]
    assert vae["untiled_float32"]["median_s"] > 0
    tiled = vae["tiled_float32_2x2"]
    assert "error" not in tiled and tiled["rel_l2_diff_vs_untiled"] >= 0
