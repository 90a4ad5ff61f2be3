"""CPU smoke test of bench/families.py (tiny stand-ins of CogVideoX 5B/2B and a Wan expert): every part runs, the
forward rows carry the reported fields, the SR run really swaps to the 2B after K steps (without its RoPE), and the
compatibility facts of the real configs are what the docstring cites."""

import json

from bench.families import LABEL, TRANSFORMERS, main

ROW_FIELDS = {"label", "family", "model", "params", "height", "width", "frames", "batch", "video_tokens",
              "text_tokens", "seq_len", "median_s", "times_s", "peak_gib", "peak_above_weights_gib", "tflops"}


def test_families_smoke(tmp_path):
    out = tmp_path / "families.json"
    result = main(["--smoke", "--out", str(out)])
    assert json.loads(out.read_text())["meta"]["label"] == LABEL == "random-init weights, real architecture"
    parts = result["parts"]
    for name, record in parts.items():
        assert "error" not in record, (name, record.get("traceback"))
        assert "skipped" not in record, (name, record["skipped"])

    rows = parts["cog"]["rows"] + parts["wan480"]["rows"] + parts["wan720"]["rows"]
    assert len(rows) == 6
    for row in rows:
        assert ROW_FIELDS <= set(row), ROW_FIELDS - set(row)
        assert row["label"] == LABEL and row["median_s"] > 0 and row["params"] > 0 and row["seq_len"] > 0
    assert {r["batch"] for r in parts["cog"]["rows"]} == {1, 2}
    assert parts["cog"]["rope_applied_by_2b_rel_diff"] > 1e-3  # diffusers applies a RoPE handed to the 2B

    e2e = parts["cog_e2e"]
    run = e2e["runs"][0]
    n, k = run["sr"]["N"], run["sr"]["K"]
    assert run["all_5b"]["calls"] == {"5b": n, "2b": 0}
    assert run["sr"]["calls"] == {"5b": k, "2b": n - k}
    assert len(run["sr"]["step_s"]) == n and run["speedup_measured"] > 0
    assert e2e["model"]["projected_speedup"]["N50_K10"]["with_encode_decode"] > 0

    compat = parts["compat"]
    assert compat["transformer_config_diff"] == {"num_attention_heads": [48, 30], "num_layers": [42, 30],
                                                 "use_rotary_positional_embeddings": [True, False]}
    assert compat["vae_config_diff"] == {"scaling_factor": [0.7, 1.15258426]}
    assert compat["scheduler_config_diff"] == {"snr_shift_scale": [1.0, 3.0]}
    handoff = {(h["N"], h["K"]): h for h in compat["handoff"]}[(50, 10)]
    assert handoff["t_K"] == 799 and 0 < handoff["t_equiv_2b"] < 999


def test_real_configs_match_published_shapes():
    five, two, wan = TRANSFORMERS["cogvideox-5b"], TRANSFORMERS["cogvideox-2b"], TRANSFORMERS["wan2.2-t2v-a14b-expert"]
    assert (five["num_layers"], five["num_attention_heads"], five["attention_head_dim"]) == (42, 48, 64)
    assert (two["num_layers"], two["num_attention_heads"], two["attention_head_dim"]) == (30, 30, 64)
    assert (wan["num_layers"], wan["num_attention_heads"], wan["attention_head_dim"], wan["ffn_dim"]) == \
        (40, 40, 128, 13824)
