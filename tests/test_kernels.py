"""kernels/: the attention backends' reference path and selection, the levers' fallbacks and load report, and render
step caching (threshold 0 is exact; a threshold skips steps and says how many). On the CPU only the references run;
bench/kernels.py measures the GPU backends against them on the H200."""

from __future__ import annotations

import copy

import pytest
import torch

from srd_kernels import attention
from srd_kernels.apply import apply_kernels
from srd_kernels.attention import Measurement, select_backend
from srd_kernels.config import KernelConfig
from srd_kernels.step_cache import StepCache


def smoke_transformer():
    from diffusers import WanTransformer3DModel

    torch.manual_seed(0)
    return WanTransformer3DModel(  # Wan2.1's block structure (RMSNorm across heads, RoPE), tiny widths
        patch_size=(1, 2, 2), attention_head_dim=16, num_attention_heads=4, num_layers=2, ffn_dim=256,
        in_channels=16, out_channels=16, text_dim=32, freq_dim=64, cross_attn_norm=True,
        qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=64,
    ).eval()


def forward(transformer, seed: int = 1):
    generator = torch.Generator().manual_seed(seed)
    latents = torch.randn((1, 16, 3, 8, 12), generator=generator)
    text = torch.randn((1, 7, transformer.config.text_dim), generator=generator)
    with torch.inference_mode():
        return transformer(hidden_states=latents, timestep=torch.tensor([700]), encoder_hidden_states=text,
                           return_dict=False)[0]


@pytest.mark.parametrize("shape", [(1, 37, 3, 16), (2, 5, 4, 8)])
def test_sdpa_reference_is_diffusers_native_attention(shape):
    from diffusers.models.attention_dispatch import dispatch_attention_fn

    q, k, v = (torch.randn(shape, dtype=torch.float64) for _ in range(3))
    expected = dispatch_attention_fn(q, k, v, backend="native")
    torch.testing.assert_close(attention.attention(q, k, v, "sdpa"), expected, rtol=1e-12, atol=1e-12)
    # and the maths itself, written out
    scores = torch.einsum("bshd,bthd->bhst", q, k) / shape[-1] ** 0.5
    torch.testing.assert_close(expected, torch.einsum("bhst,bthd->bshd", scores.softmax(-1), v))


def test_the_processor_leaves_the_transformer_output_unchanged_on_sdpa():
    """KernelAttnProcessor re-expresses diffusers' self-attention path (projections, RMSNorm, RoPE): with the
    reference backend the whole forward equals diffusers' own processors."""
    transformer = smoke_transformer()
    expected = forward(transformer)
    kernelised = copy.deepcopy(transformer)
    assert attention.set_self_attention(kernelised, "sdpa") == len(transformer.blocks)
    assert all(isinstance(b.attn1.processor, attention.KernelAttnProcessor) for b in kernelised.blocks)
    assert not any(isinstance(b.attn2.processor, attention.KernelAttnProcessor) for b in kernelised.blocks)
    torch.testing.assert_close(forward(kernelised), expected, rtol=1e-5, atol=1e-6)


def test_gpu_backends_say_why_they_cannot_run_on_the_cpu():
    for name in ("cudnn", "flash", "sage", "cudnn-fp8"):
        reason = attention.unavailable(name, "cpu", 128, torch.bfloat16)
        assert reason is not None and "CUDA" in reason, (name, reason)
    assert attention.unavailable("sdpa", "cpu", 128, torch.float32) is None
    assert "unknown attention backend" in attention.unavailable("flash-9", "cpu", 128, torch.bfloat16)


def test_selection_takes_the_fastest_backend_within_its_accuracy_bound():
    measured = {
        "sdpa": Measurement(1.00, 1.0),
        "cudnn": Measurement(0.90, 0.99995),
        "sage": Measurement(0.70, 0.9950),  # 8-bit: bound 0.99, met
        "cudnn-fp8": Measurement(0.50, 0.9800),  # 8-bit: below 0.99, refused
    }
    name, reason = select_backend(measured)
    assert name == "sage" and "refused for accuracy: cudnn-fp8" in reason
    name, _ = select_backend({**measured, "flash": Measurement(0.40, 0.9985)})  # bf16 backend under 0.999
    assert name == "sage"
    assert select_backend({"cudnn-fp8": Measurement(0.1, 0.5)})[0] == "sdpa"
    assert select_backend({})[0] == "sdpa"


def test_levers_that_cannot_run_here_fall_back_and_the_stage_reports_it():
    transformer = smoke_transformer()
    expected = forward(transformer)
    report = apply_kernels(transformer, KernelConfig(attention="cudnn-fp8", fp8_linear=True), "render")
    assert report.attention == "sdpa" and report.attention_reason.startswith("fallback:")
    assert report.fp8_linear_layers == 0 and "fallback" in report.fp8_reason
    assert "render kernels: attention=sdpa" in report.line()
    torch.testing.assert_close(forward(transformer), expected, rtol=0, atol=0)


def test_auto_measures_the_runnable_backends_and_keeps_sdpa_on_the_cpu():
    report = apply_kernels(smoke_transformer(), KernelConfig(attention="auto", warmup_frames=5, warmup_height=32,
                                                             warmup_width=48), "sketch")
    assert report.attention == "sdpa" and "sdpa" in report.attention_reason


def test_engine_and_serve_configs_take_levers_per_stage():
    from deployments.config import AppConfig
    from serve.engine import EngineConfig

    config = EngineConfig(preset="tiny", render_kernels={"attention": "cudnn-fp8", "compile": True})
    assert config.stage_kernels("render").attention == "cudnn-fp8" and config.stage_kernels("sketch") == KernelConfig()
    app = AppConfig(engine={"preset": "tiny", "render_kernels": {"fp8_linear": True}})
    assert app.engine.stage_kernels("render").fp8_linear and not app.engine.stage_kernels("sketch").any
    with pytest.raises(ValueError, match="attention"):
        EngineConfig(render_kernels={"attention": "fp4"})


def test_step_cache_rule():
    cache = StepCache(threshold=0.1)
    x = torch.ones(4)
    assert cache.reuse(x) is None  # nothing held yet
    cache.store(x, torch.full((4,), 7.0))
    assert torch.equal(cache.reuse(x * 1.04), torch.full((4,), 7.0))  # 4% change: reused
    assert cache.reuse(x * 1.04 * 1.07) is None  # 4% + 7% accumulated >= 10%: compute
    assert (cache.skipped, cache.computed) == (1, 1)
    off = StepCache(threshold=0.0)
    off.store(x, x)
    assert off.reuse(x) is None  # never reuses, even for an unchanged input


def test_render_caching_at_threshold_zero_is_exact_and_a_threshold_skips_steps(engine, make_params):
    params = make_params(switch="step:2", num_inference_steps=10, seed=3)
    (embeds,) = engine.stages["encode"]([params])
    (handoff,) = engine.stages["sketch"]([(params, embeds)])
    (plain,) = engine.stages["render"]([handoff])

    report: dict[int, int] = {}
    zero = make_params(switch="step:2", num_inference_steps=10, seed=3, render_cache=0.0)
    (exact,) = engine.stages["render"]([_with_params(handoff, zero)], report=report)
    assert torch.equal(exact, plain) and report == {0: 0}

    cached = make_params(switch="step:2", num_inference_steps=10, seed=3, render_cache=0.5)
    (approx,) = engine.stages["render"]([_with_params(handoff, cached)], report=report)
    assert 0 < report[0] < 8  # some of the 8 render steps reused an output, never all (the first always runs)
    assert torch.isfinite(approx).all() and not torch.equal(approx, plain)


def _with_params(handoff, params):
    import dataclasses

    return dataclasses.replace(handoff, params=params)


RESTART = """
import json, sys
sys.path.insert(0, {tests!r})
from torch._dynamo.utils import counters
from test_kernels import smoke_transformer
from srd_kernels.apply import apply_kernels
from srd_kernels.config import KernelConfig

config = KernelConfig(compile=True, compile_cache_dir={cache!r}, warmup_frames=5, warmup_height=32, warmup_width=48)
report = apply_kernels(smoke_transformer(), config, "render")
print(json.dumps({{"compiled": report.compiled, **counters["inductor"]}}))
"""


def test_a_restarted_stage_loads_its_compiled_blocks_from_the_cache(tmp_path):
    """`compile_cache_dir`: the first process compiles the block (an Inductor FX graph cache miss) and stores it; a
    second process, as a restarted replica, loads it (a hit, no miss) instead of compiling again."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    script = RESTART.format(tests=str(Path(__file__).parent), cache=str(tmp_path / "cache"))
    env = {k: v for k, v in os.environ.items() if k not in ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR")}
    first, restarted = (json.loads(subprocess.run([sys.executable, "-c", script], env=env, check=True,
                                                  capture_output=True, text=True).stdout.splitlines()[-1])
                        for _ in range(2))
    assert first["compiled"] and first.get("fxgraph_cache_miss", 0) >= 1 and not first.get("fxgraph_cache_hit")
    assert restarted.get("fxgraph_cache_hit", 0) >= 1 and not restarted.get("fxgraph_cache_miss")
    assert (tmp_path / "cache" / "fxgraph").is_dir()


def test_fp8_attention_quantises_outside_the_library_call():
    """cudnn-fp8's K smoothing, amax and E4M3 casts are torch ops in the traced graph, around one opaque cuDNN op,
    so that a compiled block fuses them into the ops beside them (the op itself needs a GPU: traced with its fake)."""

    class SelfAttention(torch.nn.Module):
        def forward(self, q, k, v):
            return attention.attention(q, k, v, "cudnn-fp8")

    q, k, v = (torch.randn((1, 64, 2, 16), dtype=torch.bfloat16) for _ in range(3))
    graph = torch.export.export(SelfAttention(), (q, k, v)).graph
    ops = [str(node.target) for node in graph.nodes if node.op == "call_function"]
    library = [i for i, op in enumerate(ops) if op.startswith("srd_kernels.")]
    assert [ops[i] for i in library] == ["srd_kernels.cudnn_fp8_sdpa.default"]
    before = ops[:library[0]]
    assert before.count("aten.amax.default") == 3 and "aten.mean.dim" in before
    assert "aten.mul.Tensor" in ops[library[0]:]  # the dequantisation, after the call


def test_e4m3_scaling_maps_the_largest_value_to_the_top_of_the_range():
    x = torch.randn((2, 50, 3, 16), generator=torch.Generator().manual_seed(0)) * 7
    x8, descale = attention._to_e4m3(x)
    assert x8.dtype == torch.float8_e4m3fn and x8.float().abs().max() == attention.E4M3_MAX
    torch.testing.assert_close(x8.float() * descale, x, rtol=2 ** -3, atol=descale.item() * 2 ** -6)
