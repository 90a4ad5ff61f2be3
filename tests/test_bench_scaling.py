"""CPU smoke test of the sketch-scaling bench (bench/sketch_scaling.py): the same code path as the GPU run, on gloo
with 2 spawned ranks and the tiny smoke transformer in float32. Every config and size yields a timed row, the
parallel outputs equal the 1-GPU output, and every rank built the same weights."""

from __future__ import annotations

import importlib.util
import json

import pytest

from bench.sketch_scaling import NCCL_ENV, main

pytestmark = pytest.mark.skipif(importlib.util.find_spec("xfuser") is None, reason="needs the `parallel` extra")

CONFIGS = ("ulysses2", "cfg2", "ring2")
SIZES = ("480p", "720p")


@pytest.fixture
def nccl_env(monkeypatch):
    """main() sets these for its ranks; through monkeypatch they are restored after the test."""
    for key, value in NCCL_ENV.items():
        monkeypatch.setenv(key, value)


def test_smoke_rows_match_the_one_gpu_output(tmp_path, nccl_env):
    out = tmp_path / "sketch_scaling.json"
    report = main(["--smoke", "--configs", ",".join(CONFIGS), "--sizes", ",".join(SIZES), "--out", str(out)])
    assert json.loads(out.read_text())["rows"] == json.loads(json.dumps(report["rows"], default=str))
    meta = report["meta"]
    assert meta["label"] == "random-init weights, real architecture" and not meta.get("aborted")
    assert meta["env"] == {**NCCL_ENV, "CUDA_VISIBLE_DEVICES": meta["env"]["CUDA_VISIBLE_DEVICES"]}
    rows = {(r["config"], r["size"]): r for r in report["rows"]}
    assert set(rows) == {(c, s) for c in ("1gpu", *CONFIGS) for s in SIZES}
    for (config, size), row in rows.items():
        assert "error" not in row and "skipped" not in row, (config, size, row.get("error"), row.get("traceback"))
        assert row["step_s"] > 0 and len(row["times_s"]) == 3 and row["finite"]
        if config == "1gpu":
            assert row["gpus"] == 1 and row["noise_floor_rel_err"] is not None
            continue
        assert row["gpus"] == 2 and row["matched"] and row["rel_err_vs_1gpu"] <= 1e-4, (config, size)
        assert row["efficiency"] == pytest.approx(rows["1gpu", size]["step_s"] / (2 * row["step_s"]))
        assert row["input_transfer_s"] > 0 and row["rank_denoise_s"] > 0 and row["input_bytes"] > 0
        assert row["weights_same_on_ranks"] and row["weights_same_as_1gpu"]
        ranks = row["ranks"]
        assert [(r["rank"], r["backend"]) for r in ranks] == [(0, "gloo"), (1, "gloo")]
        assert all(r["env"][k] == v for r in ranks for k, v in NCCL_ENV.items())  # inherited by the spawned ranks
    assert [r["cfg_rank"] for r in rows["cfg2", "480p"]["ranks"]] == [0, 1]
    assert [r["sp_rank"] for r in rows["ulysses2", "480p"]["ranks"]] == [0, 1]
    assert rows["ring2", "480p"]["attention_backend"] == "sdpa_flash"
    assert rows["1gpu", "720p"]["tokens"] > rows["1gpu", "480p"]["tokens"]


def test_budget_guard_skips_with_a_note(tmp_path, nccl_env):
    report = main(["--smoke", "--budget-s", "0", "--out", str(tmp_path / "s.json")])
    assert [(r["config"], r["skipped"].split(":")[0]) for r in report["rows"]] == [
        ("1gpu", "budget"), ("ulysses2", "budget"), ("cfg2", "budget")]


def test_bad_config_is_refused():
    with pytest.raises(SystemExit):
        main(["--smoke", "--configs", "ulysses2+ulysses2"])
