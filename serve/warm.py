"""`srd warm`: fill the compile cache of a config's denoising stages ahead of a deployment, so that a replica starts
warm (it loads compiled kernels from `compile_cache_dir` instead of compiling for minutes: bench/RESULTS.md).

Each denoising stage is loaded as a replica loads it, with its levers (srd_kernels.apply), and runs one forward at its
warm-up shape, which compiles the repeated blocks into the cache. A stage whose levers compile nothing is named and
skipped. The compiled kernels are specific to the GPU model, torch and Triton: warm on the machine type that serves.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable

from serve.config import EngineConfig
from serve.pipeline.registry import PIPELINE


def warm_config(config: EngineConfig, role: str) -> EngineConfig:
    """`config` with the stage's compile warmed up at load: at the levers' warm-up shape, else the preset's default
    shape (a stage whose given levers compile without one would otherwise compile on its first request)."""
    levers = config.stage_kernels(role)
    if not levers.compile or levers.warmup_frames is not None:
        return config
    d = config.defaults
    return config.model_copy(update={f"{role}_kernels": levers.model_copy(update={
        "warmup_frames": d.num_frames, "warmup_height": d.height, "warmup_width": d.width})})


def inductor_cache_dir() -> str:
    """Where Inductor writes now: TORCHINDUCTOR_CACHE_DIR, else torch's per-user default."""
    from torch._inductor.runtime.cache_dir_utils import cache_dir

    return os.environ.get("TORCHINDUCTOR_CACHE_DIR") or cache_dir()


def warm(config: EngineConfig, say: Callable[[str], None] = print) -> int:
    """Load each denoising stage of `config` with its levers, compiling into the cache; returns the stages warmed."""
    family = config.family()
    family.check_compatible(config.models())  # a wrong pair fails before any weights load
    warmed = 0
    for stage in PIPELINE.denoise:
        role = stage.role
        config.kernels_for(role, family)  # levers given that the family cannot take: refused before loading
        levers = config.stage_kernels(role)
        if not levers.compile:
            say(f"{role}: nothing to compile (speed {config.speed_name}, {role}_kernels.compile is off)")
            continue
        start = time.perf_counter()
        loaded = stage.load(warm_config(config, role))
        say(f"{loaded.kernels.line()}; warmed in {time.perf_counter() - start:.1f} s into {inductor_cache_dir()}")
        del loaded
        warmed += 1
    return warmed
