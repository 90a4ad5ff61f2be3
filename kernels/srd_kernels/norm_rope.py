"""RMSNorm across heads fused with RoPE, for Wan's self-attention queries and keys: one Triton kernel, with its torch
reference (`reference`, the maths of diffusers' `WanAttnProcessor`) beside it.

Why it is written here: Wan normalises q and k over all heads at once (`torch.nn.RMSNorm(heads * head_dim)`), then
rotates interleaved pairs of each head. Eagerly that is about ten passes over a [tokens, heads * head_dim] tensor per
projection (the fp32 upcast, square, mean, scale, weight, cast, then RoPE's unbind, four products, stack, cast); no
library has the pair as one operation (FlashInfer's and Liger's RoPE kernels rotate half-split pairs of one head and
normalise per head, not across heads). Here one program reads a token's row once, normalises it in fp32, rotates
each pair and writes it once, rounded once. Under regional torch.compile, Inductor generates a fusion of the same
ops itself, so the lever matters for stages that run eagerly; bench/kernels.py measures both.

The kernel is built on first use (so that `TRITON_INTERPRET=1`, Triton's CPU interpreter, can be set before it is:
the CPU tests run it that way) and is registered as a torch custom op, so a compiled block keeps one graph around it.
"""

from __future__ import annotations

import functools
import importlib.util
import os

import torch
import torch.nn.functional as F


def rotary(x: torch.Tensor, freqs_cos: torch.Tensor, freqs_sin: torch.Tensor) -> torch.Tensor:
    """Wan's RoPE on interleaved pairs of the last axis (the maths of diffusers' WanAttnProcessor): pair i turns by
    the angle whose cosine is freqs_cos[..., 2i] and whose sine is freqs_sin[..., 2i + 1]."""
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    cos, sin = freqs_cos[..., 0::2], freqs_sin[..., 1::2]
    return torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).flatten(-2).type_as(x)


def reference(x: torch.Tensor, weight: torch.Tensor, eps: float, heads: int, freqs_cos: torch.Tensor,
              freqs_sin: torch.Tensor) -> torch.Tensor:
    """RMSNorm of x ([batch, tokens, heads * head_dim]) over its last axis with `weight`, split into heads, RoPE on
    interleaved pairs with freqs ([1, tokens, 1, head_dim], each pair's angle repeated): [batch, tokens, heads,
    head_dim], as diffusers' WanAttnProcessor computes it (two roundings to x's dtype: after the norm, after RoPE)."""
    return rotary(F.rms_norm(x, (x.shape[-1],), weight, eps).unflatten(2, (heads, -1)), freqs_cos, freqs_sin)


def interpreted() -> bool:
    """Whether Triton runs in its CPU interpreter (`TRITON_INTERPRET=1`): the kernel then takes CPU tensors."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def unavailable(device: torch.device | str) -> str | None:
    """Why the fused kernel cannot run on `device` (None: it can)."""
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed"
    device = torch.device(device)
    if device.type == "cuda" and torch.cuda.is_available():
        return None
    if device.type == "cpu" and interpreted():
        return None
    return (f"the fused norm+RoPE kernel needs a CUDA device (or TRITON_INTERPRET=1 on the CPU), "
            f"this stage runs on {device}")


@functools.cache
def _kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def norm_rope(x_ptr, weight_ptr, cos_ptr, sin_ptr, out_ptr, x_row_stride, tokens, freqs_row_stride, eps,
                  WIDTH: tl.constexpr, HEAD_DIM: tl.constexpr, PAIRS: tl.constexpr):
        row = tl.program_id(0)  # one (batch, token) row of WIDTH = heads * head_dim values
        token = row % tokens
        pair = tl.arange(0, PAIRS)  # PAIRS: WIDTH / 2 rounded up to a power of two
        valid = pair < WIDTH // 2
        even = 2 * pair
        x = x_ptr + row.to(tl.int64) * x_row_stride
        x1 = tl.load(x + even, mask=valid, other=0.0).to(tl.float32)
        x2 = tl.load(x + even + 1, mask=valid, other=0.0).to(tl.float32)
        inv_rms = 1.0 / tl.sqrt((tl.sum(x1 * x1, axis=0) + tl.sum(x2 * x2, axis=0)) / WIDTH + eps)
        x1 = x1 * inv_rms * tl.load(weight_ptr + even, mask=valid, other=0.0).to(tl.float32)
        x2 = x2 * inv_rms * tl.load(weight_ptr + even + 1, mask=valid, other=0.0).to(tl.float32)
        within_head = even % HEAD_DIM
        freqs = token.to(tl.int64) * freqs_row_stride + within_head
        cos = tl.load(cos_ptr + freqs, mask=valid, other=0.0).to(tl.float32)
        sin = tl.load(sin_ptr + freqs + 1, mask=valid, other=0.0).to(tl.float32)
        out = out_ptr + row.to(tl.int64) * WIDTH
        tl.store(out + even, (x1 * cos - x2 * sin).to(out_ptr.dtype.element_ty), mask=valid)
        tl.store(out + even + 1, (x1 * sin + x2 * cos).to(out_ptr.dtype.element_ty), mask=valid)

    return triton, norm_rope


@torch.library.custom_op("srd_kernels::norm_rope", mutates_args=())
def _norm_rope(x: torch.Tensor, weight: torch.Tensor, eps: float, heads: int, freqs_cos: torch.Tensor,
               freqs_sin: torch.Tensor) -> torch.Tensor:
    triton, kernel = _kernel()
    batch, tokens, width = x.shape
    head_dim = width // heads
    rows = x.reshape(batch * tokens, width) if x.stride(0) == tokens * x.stride(1) else x.contiguous().view(-1, width)
    cos = freqs_cos.reshape(tokens, head_dim)
    sin = freqs_sin.reshape(tokens, head_dim)
    if cos.stride(-1) != 1 or sin.stride(-1) != 1 or cos.stride(0) != sin.stride(0):
        cos, sin = cos.contiguous(), sin.contiguous()
    out = torch.empty((batch, tokens, heads, head_dim), device=x.device, dtype=x.dtype)
    pairs = triton.next_power_of_2(width // 2)
    kernel[(batch * tokens,)](rows, weight, cos, sin, out, rows.stride(0), tokens, cos.stride(0), eps,
                              WIDTH=width, HEAD_DIM=head_dim, PAIRS=pairs, num_warps=min(16, max(1, pairs // 256)))
    return out


@_norm_rope.register_fake
def _(x, weight, eps, heads, freqs_cos, freqs_sin):
    return x.new_empty((x.shape[0], x.shape[1], heads, x.shape[2] // heads))


def norm_rope(x: torch.Tensor, weight: torch.Tensor, eps: float, heads: int, freqs_cos: torch.Tensor,
              freqs_sin: torch.Tensor) -> torch.Tensor:
    """`reference`'s result through the fused kernel (rounded once, to x's dtype). x: [batch, tokens, width] with a
    unit last stride (a chunk of a fused qkv projection is fine); freqs: [1, tokens, 1, head_dim]."""
    if x.stride(-1) != 1:
        x = x.contiguous()
    return _norm_rope(x, weight, eps, heads, freqs_cos, freqs_sin)


def fusable(norm: torch.nn.Module) -> bool:
    """A norm the kernel computes: torch.nn.RMSNorm over one axis with a weight (Wan's `norm_q`/`norm_k`)."""
    return (isinstance(norm, torch.nn.RMSNorm) and norm.weight is not None and len(norm.normalized_shape) == 1
            and norm.eps is not None)
