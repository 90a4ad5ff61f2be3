"""xfuser imported the one way that works on this process: as shipped with a GPU, patched for gloo on a CPU.

The patch is here because nothing upstream offers it: xfuser 0.7.0 decides at import time, from the CUDA device,
what it can run (see `_needs_cpu_patch`); the tests run the real multi-rank path on CPU through it.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys

import torch


def _needs_cpu_patch() -> bool:
    """Whether xfuser must be patched before import: exactly when torch has no usable CUDA device.

    xfuser 0.7.0 decides at import time, from the CUDA device, whether long-context attention (yunchang's Ulysses and
    ring groups) is available and whether its USP module binds yunchang's process groups; and from the torch build
    which device version and distributed backend to report (raising on a CPU-only build). Without a CUDA device it
    would therefore not import (CPU build) or silently run USP without its groups. With a device, nothing is patched:
    GPUs run xfuser exactly as shipped.
    """
    return not torch.cuda.is_available()


def _patch_xfuser_for_cpu() -> None:
    """Import xfuser on a CPU-only torch, ready for gloo (the way xfuser's own tests run its distributed code on CPU).

    1. `envs.get_device_version` / `get_torch_distributed_backend` raise without an accelerator; they are read while
       xfuser/__init__ runs. They return None (as xfuser does on MPS) and "gloo".
    2. `has_long_ctx_attn` is forced True (yunchang imports fine on CPU), so that initialize_model_parallel builds
       yunchang's Ulysses/ring groups and the sequence-parallel group reports the real Ulysses/ring sizes.
    3. USP's modules bind `PROCESS_GROUP = None` unless CUDA is available; they are rebound to yunchang's singleton.
    4. xfuser's SDPA_FLASH entry calls `aten._scaled_dot_product_flash_attention`, which has no CPU kernel; torch's
       CPU flash kernel (`_scaled_dot_product_flash_attention_for_cpu`, what F.scaled_dot_product_attention runs on
       CPU) has the same (out, logsumexp) contract, so SDPA_FLASH, and with it ring attention, runs on CPU too.

    xfuser/__init__ imports the whole package, so the package module is created without running it, xfuser.envs is
    imported and patched, and then xfuser/__init__ runs.
    """
    spec = importlib.util.find_spec("xfuser")
    if spec is None:
        raise ImportError("sequence parallelism needs xfuser: pip install 'srdiffusion-serve[parallel]'")
    package = importlib.util.module_from_spec(spec)
    sys.modules["xfuser"] = package
    try:
        import xfuser.envs as envs

        envs.get_device_version = lambda: None
        envs.get_torch_distributed_backend = lambda: "gloo"
        envs.PACKAGES_CHECKER.packages_info["has_long_ctx_attn"] = True
        spec.loader.exec_module(package)
    except BaseException:
        for name in [m for m in sys.modules if m == "xfuser" or m.startswith("xfuser.")]:
            del sys.modules[name]
        raise

    from yunchang.globals import PROCESS_GROUP

    for name in (
        "xfuser.model_executor.layers.usp",
        "xfuser.model_executor.layers.usp_legacy",
        "xfuser.core.sparge_attention.head_balance",
        "xfuser.core.distributed.fp8_comms",
    ):
        module = importlib.import_module(name)
        if getattr(module, "PROCESS_GROUP", None) is None:
            module.PROCESS_GROUP = PROCESS_GROUP

    from xfuser.core.distributed.attention_backend import ATTENTION_FUNCTION_REGISTRY, AttentionBackendType

    def _cpu_flash_attention(query, key, value, dropout_p, is_causal, attention_kwargs=None):
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            query, key, value, dropout_p=dropout_p, is_causal=is_causal
        )[:2]
        return out, lse

    ATTENTION_FUNCTION_REGISTRY[AttentionBackendType.SDPA_FLASH] = _cpu_flash_attention


def import_xfuser():
    """xfuser, imported the one way that works on this machine (see `_needs_cpu_patch`). Idempotent."""
    if "xfuser" not in sys.modules and _needs_cpu_patch():
        _patch_xfuser_for_cpu()
    import xfuser

    return xfuser

