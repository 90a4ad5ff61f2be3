"""FP8 linear layers through torchao: dynamic FP8 (E4M3) activations and weights with rowwise scales, applied to
the linear layers of a transformer's repeated blocks (attention projections and FFN). torchao's
`Float8DynamicActivationFloat8WeightConfig(granularity=PerRow())` does the quantization and the scaled matmul
(torch._scaled_mm); nothing of it is written here. It is meant to run under torch.compile, which fuses the
activation quantization into the preceding ops (bench/RESULTS.md, "Kernels", measures it that way)."""

from __future__ import annotations

import importlib.util

import torch


def unavailable(device: torch.device | str) -> str | None:
    """Why FP8 linear layers cannot run here (None: they can)."""
    device = torch.device(device)
    if importlib.util.find_spec("torchao") is None:
        return "torchao is not installed"
    if device.type != "cuda" or not torch.cuda.is_available():
        return f"FP8 matmuls need a CUDA device, this stage runs on {device}"
    if torch.cuda.get_device_capability(device) < (8, 9):
        return "FP8 matmuls need compute capability >= 8.9"
    return None


def fp8_eligible(module: torch.nn.Module, _name: str = "") -> bool:
    """A linear layer whose shapes FP8 GEMMs take (both dimensions multiples of 16)."""
    return isinstance(module, torch.nn.Linear) and module.in_features % 16 == 0 and module.out_features % 16 == 0


def quantize_blocks_fp8(transformer: torch.nn.Module) -> int:
    """Swap the eligible linear layers of `transformer.blocks` for torchao FP8 rowwise ones; returns how many."""
    from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow, quantize_

    count = sum(fp8_eligible(m) for m in transformer.blocks.modules())
    quantize_(transformer.blocks, Float8DynamicActivationFloat8WeightConfig(granularity=PerRow()),
              filter_fn=fp8_eligible)
    return count
