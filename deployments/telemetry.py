"""GPU telemetry of a replica through NVML (nvidia-ml-py): what its GPUs hold and how busy they are."""

from __future__ import annotations

import ray


def gpu_telemetry() -> list[dict]:
    """Memory and utilisation of this replica's GPUs; empty without a GPU (or with the fake GPUs of CPU tests)."""
    if not ray.is_initialized():  # a stage runner in a test's own process
        return []
    gpu_ids = ray.get_gpu_ids()  # physical indices, which NVML uses too (it ignores CUDA_VISIBLE_DEVICES)
    if not gpu_ids:
        return []
    import pynvml

    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:  # fake GPU resources (CPU tests): no driver to ask
        return []
    try:
        report = []
        for gpu_id in gpu_ids:
            handle = pynvml.nvmlDeviceGetHandleByIndex(int(gpu_id))
            memory = pynvml.nvmlDeviceGetMemoryInfo(handle)
            report.append({"gpu_id": int(gpu_id), "memory_used_mib": memory.used // 2**20,
                           "memory_total_mib": memory.total // 2**20,
                           "utilization_pct": pynvml.nvmlDeviceGetUtilizationRates(handle).gpu})
        return report
    finally:
        pynvml.nvmlShutdown()
