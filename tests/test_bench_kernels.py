"""bench/kernels.py's smoke run on the CPU: every lever row it can run here has a time and matches eager."""

from __future__ import annotations

import json

from bench import kernels


def test_kernels_bench_smoke(tmp_path):
    out = tmp_path / "kernels.json"  # the fused norm+RoPE row runs its kernel in Triton's interpreter (conftest.py)
    kernels.main(["--smoke", "--backends", "sdpa,cudnn-fp8", "--only", "norm_rope,compile,fp8_linear",
                  "--out", str(out)])
    doc = json.loads(out.read_text())
    result = doc["parts"]["smoke-sketch"]
    assert result["attention"]["selected"] == "sdpa" and set(result["attention"]["backends"]) == {"sdpa"}
    assert list(result["rows"]) == ["eager", "norm_rope", "compile", "fp8_linear"]
    for label in ("norm_rope", "compile", "fp8_linear"):
        row = result["rows"][label]
        assert row["median_s"] > 0 and row["cosine"] > 0.9999, (label, row)
    assert "fused_norm_rope=True (Triton interpreter)" in result["rows"]["norm_rope"]["report"]
    assert "fallback" in result["rows"]["fp8_linear"]["report"]  # no torchao FP8 on a CPU: reported, not hidden
    assert "needs the eager rows of both real models" in doc["parts"]["e2e_estimate"]["skipped"]
