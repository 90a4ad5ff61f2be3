"""Self-attention backends behind one function, `attention(q, k, v, backend)`, and the processor that puts one into
a Wan transformer's self-attention layers.

Every backend takes and returns diffusers' layout [batch, sequence, heads, head_dim]. `sdpa` (torch's own dispatch)
is the reference and the fallback. The others come from libraries made for them: `cudnn` and `flash` pin torch's
SDPA to its cuDNN or FlashAttention-2 kernel (through the aten ops, so that torch.compile traces them);
`sage` is SageAttention (INT8 QK^T, its own K smoothing); `cudnn-fp8` is the cuDNN frontend's FP8 SDPA graph
(`pygraph.sdpa_fp8`), fed per-tensor scaled E4M3 inputs with K smoothed first (subtracting K's mean over the
sequence changes no softmax row, and narrows K's range). Library calls are registered as torch custom ops so that a
compiled block keeps one graph around them.

What is written here and why: diffusers' attention registry (`attention_dispatch`) is a closed enum with a
process-wide active backend and has no FP8 cuDNN entry, so the backend choice lives on each processor instead
(per model, per stage), and the processor re-expresses only the self-attention path of diffusers'
`WanAttnProcessor` (projections, RMSNorm across heads, RoPE, attention, output projection); cross-attention, I2V
image context and sequence-parallel configs stay with diffusers' own processor.
"""

from __future__ import annotations

import importlib.util
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from srd_kernels import norm_rope

BACKENDS = ("sdpa", "cudnn", "flash", "sage", "cudnn-fp8")
FP8_BACKENDS = frozenset({"cudnn-fp8"})
EIGHT_BIT_BACKENDS = frozenset({"sage", "cudnn-fp8"})  # numerics-changing: held to the 8-bit bound
# Output cosine similarity against the sdpa reference below which "auto" refuses a backend: bf16 kernels must match
# the reference to rounding, 8-bit ones within the bound the levers were accepted at (bench/RESULTS.md, "Kernels").
MIN_COSINE_BF16 = 0.999
MIN_COSINE_8BIT = 0.99
E4M3_MAX = 448.0


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """The reference: torch's scaled_dot_product_attention with its own kernel choice (diffusers' `native`)."""
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2)


def _cudnn(q, k, v):
    out = torch.ops.aten._scaled_dot_product_cudnn_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), None, False, 0.0, False, False
    )[0]
    return out.transpose(1, 2)


def _flash(q, k, v):
    out = torch.ops.aten._scaled_dot_product_flash_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))[0]
    return out.transpose(1, 2)


@torch.library.custom_op("srd_kernels::sage_attention", mutates_args=())
def _sage(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    from sageattention import sageattn

    return sageattn(q, k, v, tensor_layout="NHD", is_causal=False)


@_sage.register_fake
def _(q, k, v):
    return torch.empty_like(q)


@dataclass
class _Fp8Graph:
    graph: object
    tensors: tuple
    workspace: torch.Tensor


_FP8_GRAPHS: dict[tuple, _Fp8Graph] = {}  # one built cuDNN graph per (shape, device): building costs ~100 ms


def _fp8_graph(shape: tuple[int, int, int, int], device: torch.device) -> _Fp8Graph:
    key = (shape, device)
    if key in _FP8_GRAPHS:
        return _FP8_GRAPHS[key]
    import cudnn

    batch, seq, heads, dim = shape
    e4m3, fp32 = cudnn.data_type.FP8_E4M3, cudnn.data_type.FLOAT
    graph = cudnn.pygraph(io_data_type=e4m3, intermediate_data_type=fp32, compute_data_type=fp32)
    dims, strides = [batch, heads, seq, dim], [seq * heads * dim, dim, heads * dim, 1]  # BSHD memory, BHSD view
    q, k, v = (graph.tensor(name=n, dim=dims, stride=strides, data_type=e4m3) for n in ("q", "k", "v"))
    scalars = [graph.tensor(name=n, dim=[1, 1, 1, 1], stride=[1, 1, 1, 1], data_type=fp32)
               for n in ("descale_q", "descale_k", "descale_v", "descale_s", "scale_s", "scale_o")]
    o, _, amax_s, amax_o = graph.sdpa_fp8(q=q, k=k, v=v, descale_q=scalars[0], descale_k=scalars[1],
                                          descale_v=scalars[2], descale_s=scalars[3], scale_s=scalars[4],
                                          scale_o=scalars[5], is_inference=True, attn_scale=1.0 / math.sqrt(dim),
                                          use_causal_mask=False, name="sdpa_fp8")
    o.set_output(True).set_dim(dims).set_stride(strides).set_data_type(e4m3)  # Hopper writes O in FP8
    for amax in (amax_s, amax_o):
        amax.set_output(True).set_dim([1, 1, 1, 1]).set_stride([1, 1, 1, 1]).set_data_type(fp32)
    graph.validate()
    graph.build_operation_graph()
    graph.create_execution_plans([cudnn.heur_mode.A, cudnn.heur_mode.FALLBACK])
    graph.check_support()
    graph.build_plans()
    workspace = torch.empty(graph.get_workspace_size(), device=device, dtype=torch.uint8)
    built = _FP8_GRAPHS[key] = _Fp8Graph(graph, (q, k, v, *scalars, o, amax_s, amax_o), workspace)
    return built


def _to_e4m3(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-tensor scaled E4M3 copy of x and its descale (x ≈ fp8 * descale)."""
    descale = (x.abs().amax().float() / E4M3_MAX).clamp(min=1e-12)
    return (x.float() / descale).to(torch.float8_e4m3fn), descale.reshape(1, 1, 1, 1)


@torch.library.custom_op("srd_kernels::cudnn_fp8_sdpa", mutates_args=())
def _cudnn_fp8_sdpa(q8: torch.Tensor, k8: torch.Tensor, v8: torch.Tensor, descale_q: torch.Tensor,
                    descale_k: torch.Tensor, descale_v: torch.Tensor) -> torch.Tensor:
    """cuDNN's FP8 SDPA on E4M3 q, k, v and their descales: O in E4M3, scaled by 1 / descale_v."""
    built = _fp8_graph(tuple(q8.shape), q8.device)
    # P = softmax(...) lies in [0, 1]: scale it to E4M3's range. |O| <= max|v|: scale O by max|v| too.
    scale_s = torch.full((1, 1, 1, 1), E4M3_MAX, device=q8.device)
    descale_s = 1.0 / scale_s
    scale_o = 1.0 / descale_v
    out = torch.empty(q8.shape, device=q8.device, dtype=torch.float8_e4m3fn)
    amax_s = torch.empty((1, 1, 1, 1), device=q8.device)
    amax_o = torch.empty_like(amax_s)
    tq, tk, tv, tdq, tdk, tdv, tds, tss, tso, to, tas, tao = built.tensors
    pack = {tq: q8, tk: k8, tv: v8, tdq: descale_q, tdk: descale_k, tdv: descale_v, tds: descale_s, tss: scale_s,
            tso: scale_o, to: out, tas: amax_s, tao: amax_o}
    built.graph.execute(pack, built.workspace)
    return out


@_cudnn_fp8_sdpa.register_fake
def _(q8, k8, v8, descale_q, descale_k, descale_v):
    return torch.empty_like(q8)


def _cudnn_fp8(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """FP8 attention through cuDNN. The quantisation (K smoothing, per-tensor amax, E4M3 casts) and the output's
    dequantisation are plain torch ops outside the library call, so that in a compiled block Inductor fuses them
    into the ops that produce q, k, v (RMSNorm, RoPE, projection) and consume the output, instead of their running
    as separate passes inside an opaque op."""
    k = k - k.mean(dim=1, keepdim=True)  # softmax is invariant to a per-query constant: q.mean(k) is one
    (q8, dq), (k8, dk), (v8, dv) = _to_e4m3(q), _to_e4m3(k), _to_e4m3(v)
    return (_cudnn_fp8_sdpa(q8, k8, v8, dq, dk, dv).float() * dv).to(q.dtype)


_FUNCTIONS: dict[str, Callable] = {"sdpa": sdpa, "cudnn": _cudnn, "flash": _flash, "sage": _sage,
                                   "cudnn-fp8": _cudnn_fp8}


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: str = "sdpa") -> torch.Tensor:
    """Softmax(q k^T / sqrt(d)) v over [batch, sequence, heads, head_dim] tensors, through `backend`."""
    return _FUNCTIONS[backend](q, k, v)


def unavailable(backend: str, device: torch.device | str, head_dim: int, dtype: torch.dtype) -> str | None:
    """Why `backend` cannot run here (None: it can). Checked before a stage uses it, so that a stage reports the
    fallback instead of failing on its first request."""
    if backend not in _FUNCTIONS:
        return f"unknown attention backend {backend!r}; known: {', '.join(BACKENDS)}"
    if backend == "sdpa":
        return None
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return f"{backend} needs a CUDA device, this stage runs on {device}"
    if dtype not in (torch.float16, torch.bfloat16):
        return f"{backend} needs float16 or bfloat16 activations, this stage runs {dtype}"
    major, minor = torch.cuda.get_device_capability(device)
    if backend == "sage" and importlib.util.find_spec("sageattention") is None:
        return "sageattention is not installed"
    if backend == "cudnn-fp8":
        if importlib.util.find_spec("cudnn") is None:
            return "the cuDNN frontend (nvidia-cudnn-frontend) is not installed"
        if (major, minor) < (8, 9):
            return f"FP8 attention needs compute capability >= 8.9, this GPU has {major}.{minor}"
        if head_dim % 16:
            return f"cuDNN FP8 attention needs head_dim divisible by 16, the model has {head_dim}"
    if backend == "flash" and major < 8:
        return f"FlashAttention needs compute capability >= 8.0, this GPU has {major}.{minor}"
    return None


@dataclass(frozen=True)
class Measurement:
    """One backend at one shape: median seconds per call and output cosine similarity against sdpa."""

    seconds: float
    cosine: float


def min_cosine(backend: str) -> float:
    return MIN_COSINE_8BIT if backend in EIGHT_BIT_BACKENDS else MIN_COSINE_BF16


def select_backend(measured: dict[str, Measurement]) -> tuple[str, str]:
    """The fastest measured backend whose cosine meets its kind's bound (8-bit: 0.99, others: 0.999), else sdpa;
    with the reason, for the stage's load report."""
    accurate = {name: m for name, m in measured.items() if m.cosine >= min_cosine(name)}
    refused = sorted(set(measured) - set(accurate))
    if not accurate:
        return "sdpa", "no measured backend met its accuracy bound" + (f" ({', '.join(refused)})" if refused else "")
    best = min(accurate, key=lambda name: accurate[name].seconds)
    timings = ", ".join(f"{n} {m.seconds * 1e3:.2f} ms cos {m.cosine:.5f}" for n, m in sorted(measured.items()))
    return best, f"fastest accurate of: {timings}" + (f"; refused for accuracy: {', '.join(refused)}" if refused else "")


def measure_backends(shape: tuple[int, int, int, int], device, dtype: torch.dtype, backends=BACKENDS,
                     repeats: int = 5) -> dict[str, Measurement]:
    """Time each runnable backend on random q, k, v of `shape` ([B, S, H, D]) and compare it with sdpa."""
    generator = torch.Generator(device).manual_seed(0)
    q, k, v = (torch.randn(shape, device=device, dtype=dtype, generator=generator) for _ in range(3))
    reference = sdpa(q, k, v).float().flatten()
    results = {}
    for name in backends:
        if unavailable(name, device, shape[-1], dtype):
            continue
        try:
            out = attention(q, k, v, name)  # warm-up (builds graphs, compiles Triton kernels)
        except Exception as e:  # a library that imports but cannot run this shape is simply not a candidate
            print(f"attention backend {name} failed at {shape}: {type(e).__name__}: {e}")
            continue
        cosine = F.cosine_similarity(out.float().flatten(), reference, dim=0).item()
        results[name] = Measurement(_median_seconds(lambda: attention(q, k, v, name), repeats), cosine)
    return results


def _median_seconds(call, repeats: int) -> float:
    if not torch.cuda.is_available():
        import time

        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            call()
            times.append(time.perf_counter() - t0)
        return sorted(times)[len(times) // 2]
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        call()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return sorted(times)[len(times) // 2]


class KernelAttnProcessor:
    """A Wan attention layer's processor: self-attention through `attention(..., backend)`, its q/k RMSNorm and RoPE
    through the fused kernel if `fused_norm_rope`; anything else (cross-attention, I2V image context,
    sequence-parallel configs) through the diffusers processor it replaces."""

    def __init__(self, backend: str, fallback, fused_norm_rope: bool = False):
        self.backend = backend
        self.fallback = fallback
        self.fused_norm_rope = fused_norm_rope

    def __getattr__(self, name):  # diffusers reads _attention_backend/_parallel_config on processors
        if "fallback" not in self.__dict__:  # during copy/unpickle, before __init__'s attributes exist
            raise AttributeError(name)
        return getattr(self.__dict__["fallback"], name)

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        if (encoder_hidden_states is not None or attention_mask is not None or attn.add_k_proj is not None
                or getattr(self.fallback, "_parallel_config", None) is not None):
            return self.fallback(attn, hidden_states, encoder_hidden_states, attention_mask, rotary_emb)
        if attn.fused_projections:
            q, k, v = attn.to_qkv(hidden_states).chunk(3, dim=-1)
        else:
            q, k, v = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        if self.fused_norm_rope and rotary_emb is not None:
            q = norm_rope.norm_rope(q, attn.norm_q.weight, attn.norm_q.eps, attn.heads, *rotary_emb)
            k = norm_rope.norm_rope(k, attn.norm_k.weight, attn.norm_k.eps, attn.heads, *rotary_emb)
            v = v.unflatten(2, (attn.heads, -1))
        else:
            q, k = attn.norm_q(q), attn.norm_k(k)
            q, k, v = (x.unflatten(2, (attn.heads, -1)) for x in (q, k, v))
            if rotary_emb is not None:
                q, k = norm_rope.rotary(q, *rotary_emb), norm_rope.rotary(k, *rotary_emb)
        out = attention(q, k, v, self.backend).flatten(2, 3).type_as(q)
        return attn.to_out[1](attn.to_out[0](out))


def norm_rope_fusable(transformer: torch.nn.Module) -> bool:
    """Whether every self-attention layer normalises q and k in a way the fused kernel computes."""
    return all(norm_rope.fusable(block.attn1.norm_q) and norm_rope.fusable(block.attn1.norm_k)
               for block in transformer.blocks)


def set_self_attention(transformer: torch.nn.Module, backend: str, fused_norm_rope: bool = False) -> int:
    """Route every self-attention layer (`attn1` of each block) of a diffusers Wan transformer through `backend`
    (and its q/k norm and RoPE through the fused kernel); returns how many layers it changed."""
    changed = 0
    for block in transformer.blocks:
        processor = block.attn1.processor
        fallback = processor.fallback if isinstance(processor, KernelAttnProcessor) else processor
        block.attn1.set_processor(KernelAttnProcessor(backend, fallback, fused_norm_rope))
        changed += 1
    return changed
