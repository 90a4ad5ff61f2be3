"""bench/kernels.py's smoke run on the CPU: every lever row it can run here has a time and matches eager."""

from __future__ import annotations

import json

from bench import kernels


def test_kernels_bench_smoke(tmp_path):
    out = tmp_path / "kernels.json"
    kernels.main(["--smoke", "--backends", "sdpa,cudnn-fp8", "--only", "compile,fp8_linear", "--out", str(out)])
    doc = json.loads(out.read_text())
    result = doc["results"]["smoke-sketch"]
    assert result["attention"]["selected"] == "sdpa" and set(result["attention"]["backends"]) == {"sdpa"}
    assert list(result["rows"]) == ["eager", "compile", "fp8_linear"]
    for label in ("compile", "fp8_linear"):
        row = result["rows"][label]
        assert row["median_s"] > 0 and row["cosine"] > 0.9999, (label, row)
    assert "fallback" in result["rows"]["fp8_linear"]["report"]  # no torchao FP8 on a CPU: reported, not hidden
    assert doc["e2e_estimate"] is None  # needs both real models
