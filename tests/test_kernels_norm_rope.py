"""The fused RMSNorm+RoPE kernel (srd_kernels/norm_rope.py) against its torch reference, run by Triton's CPU
interpreter (TRITON_INTERPRET=1, set in conftest.py); the reference against diffusers' own attention path; the
lever's selection and fallback at load."""

from __future__ import annotations

import copy

import pytest
import torch

from srd_kernels import attention, norm_rope
from srd_kernels.apply import apply_kernels
from srd_kernels.config import KernelConfig

from .test_kernels import forward, smoke_transformer


@pytest.fixture
def interpreter():
    """Triton's CPU interpreter, which tests/conftest.py turns on for the session before triton is imported."""
    assert norm_rope.interpreted() and norm_rope.unavailable("cpu") is None


def wan_freqs(tokens: int, head_dim: int, seed: int = 0):
    """RoPE tables in Wan's layout: [1, tokens, 1, head_dim], each pair's angle repeated, float32."""
    angles = torch.rand((tokens, head_dim // 2), generator=torch.Generator().manual_seed(seed)) * 6.3
    return tuple(f(angles).repeat_interleave(2, dim=-1).reshape(1, tokens, 1, head_dim) for f in (torch.cos, torch.sin))


@pytest.mark.parametrize("batch,tokens,heads,head_dim", [(1, 7, 4, 16), (2, 19, 5, 16), (3, 4, 3, 8)])
def test_the_kernel_equals_the_reference_in_float32(interpreter, batch, tokens, heads, head_dim):
    generator = torch.Generator().manual_seed(tokens)
    x = torch.randn((batch, tokens, heads * head_dim), generator=generator) * 3 + 0.5
    weight = torch.randn(heads * head_dim, generator=generator)
    # arbitrary tables, not Wan's repeated pairs: the kernel reads cos at even and sin at odd positions, as diffusers
    cos, sin = (torch.randn((1, tokens, 1, head_dim), generator=generator) for _ in range(2))
    expected = norm_rope.reference(x, weight, 1e-6, heads, cos, sin)
    out = norm_rope.norm_rope(x, weight, 1e-6, heads, cos, sin)
    assert out.shape == (batch, tokens, heads, head_dim) and out.dtype == x.dtype
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    # a chunk of a fused qkv projection (row stride 3 x width) reads the same
    qkv = torch.cat([torch.randn_like(x), x, torch.randn_like(x)], dim=-1)
    torch.testing.assert_close(norm_rope.norm_rope(qkv.chunk(3, dim=-1)[1], weight, 1e-6, heads, cos, sin), expected,
                               rtol=1e-5, atol=1e-5)


def test_in_bfloat16_the_kernel_stays_within_a_rounding_of_the_exact_result(interpreter):
    """The kernel rounds once, to x's dtype, from fp32 (the reference rounds twice). Triton's CPU interpreter casts
    fp32 to bfloat16 by truncation where the GPU rounds to nearest, so the bound checked here is one ulp of each
    value and an average error no worse than twice the reference's."""
    generator = torch.Generator().manual_seed(3)
    x = torch.randn((2, 33, 4 * 16), generator=generator) * 4
    weight = torch.randn(64, generator=generator)
    cos, sin = wan_freqs(33, 16)
    exact = norm_rope.reference(x.bfloat16().float(), weight.bfloat16().float(), 1e-6, 4, cos, sin)
    fused = norm_rope.norm_rope(x.bfloat16(), weight.bfloat16(), 1e-6, 4, cos, sin)
    eager = norm_rope.reference(x.bfloat16(), weight.bfloat16(), 1e-6, 4, cos, sin)
    assert fused.dtype == torch.bfloat16
    fused_error = (fused.float() - exact).abs()
    assert (fused_error <= exact.abs() * 2 ** -7 + 1e-6).all()
    assert fused_error.mean() <= 2 * (eager.float() - exact).abs().mean()


def test_the_reference_is_diffusers_wan_attention_path():
    """reference() = the q path of diffusers' WanAttnProcessor (norm_q, split into heads, apply_rotary_emb), taken
    from a real Wan block: the rotary tables come from the transformer's own WanRotaryPosEmbed."""
    transformer = smoke_transformer()
    latents = torch.randn((1, 16, 3, 8, 12), generator=torch.Generator().manual_seed(5))
    cos, sin = transformer.rope(latents)
    attn = transformer.blocks[0].attn1
    tokens = cos.shape[1]
    x = torch.randn((2, tokens, attn.inner_dim), generator=torch.Generator().manual_seed(6))
    # RoPE written independently: each interleaved pair as a complex number, turned by e^(i angle)
    pairs = torch.view_as_complex(attn.norm_q(x).unflatten(2, (attn.heads, -1)).unflatten(-1, (-1, 2)).contiguous())
    turn = torch.complex(cos[..., 0::2], sin[..., 1::2])
    expected = torch.view_as_real(pairs * turn).flatten(-2)
    torch.testing.assert_close(norm_rope.reference(x, attn.norm_q.weight, attn.norm_q.eps, attn.heads, cos, sin),
                               expected, rtol=1e-6, atol=1e-6)


def test_a_stage_with_the_fused_kernel_gives_diffusers_output(interpreter):
    transformer = smoke_transformer()
    expected = forward(transformer)
    fused = copy.deepcopy(transformer)
    report = apply_kernels(fused, KernelConfig(fused_norm_rope=True), "render")
    assert report.fused_norm_rope and report.norm_rope_reason == "Triton interpreter"
    assert report.attention == "sdpa" and "fused_norm_rope=True" in report.line()
    assert all(b.attn1.processor.fused_norm_rope for b in fused.blocks)
    torch.testing.assert_close(forward(fused), expected, rtol=1e-5, atol=1e-5)


def test_without_a_gpu_or_the_interpreter_the_stage_falls_back_and_says_why(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    transformer = smoke_transformer()
    expected = forward(transformer)
    report = apply_kernels(transformer, KernelConfig(fused_norm_rope=True), "render")
    assert not report.fused_norm_rope and "needs a CUDA device" in report.norm_rope_reason
    assert not any(isinstance(b.attn1.processor, attention.KernelAttnProcessor) for b in transformer.blocks)
    torch.testing.assert_close(forward(transformer), expected, rtol=0, atol=0)


def test_a_norm_the_kernel_does_not_compute_is_left_to_torch(interpreter):
    transformer = smoke_transformer()
    transformer.blocks[1].attn1.norm_k = torch.nn.LayerNorm(transformer.blocks[1].attn1.inner_dim)
    report = apply_kernels(transformer, KernelConfig(fused_norm_rope=True), "sketch")
    assert not report.fused_norm_rope and "not a torch.nn.RMSNorm" in report.norm_rope_reason


def test_lever_labels_name_configs():
    assert KernelConfig.from_label("attn:cudnn-fp8+fp8_linear+norm_rope+compile") == KernelConfig(
        attention="cudnn-fp8", fp8_linear=True, fused_norm_rope=True, compile=True)
    assert KernelConfig.from_label("", compile_cache_dir="/c") == KernelConfig(compile_cache_dir="/c")
    with pytest.raises(ValueError, match="unknown lever 'fp4'"):
        KernelConfig.from_label("attn:sdpa+fp4")
    with pytest.raises(ValueError, match="attention"):
        KernelConfig.from_label("attn:nope")
