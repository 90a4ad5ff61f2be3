"""A hand-off is not consumed by the segment that continues it, and the engine package never needs Ray. (Its bytes,
resumed in a fresh process with Ray unavailable: tests/test_checkpoint.py.)"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import torch

import serve

def test_rendering_a_handoff_twice_gives_the_same_latents(engine, make_params):
    """Render copies the sampler: the hand-off itself is not consumed (a retried render starts from the same state)."""
    params = make_params(switch="step:1", seed=12)
    (embeds,) = engine.stages["encode"]([params])
    (handoff,) = engine.stages["sketch"]([(params, embeds)])
    first, second = engine.stages["render"]([handoff]) + engine.stages["render"]([handoff])
    assert handoff.scheduler.step_index == 1
    assert torch.equal(first, second)


IMPORT_ALL_WITHOUT_RAY = """
import importlib, pkgutil, sys
sys.modules["ray"] = None  # any `import ray` now raises ImportError
import serve
for module in pkgutil.walk_packages(serve.__path__, "serve."):
    importlib.import_module(module.name)
print("imported", sorted(m for m in sys.modules if m.startswith("serve.")))
"""


def test_engine_imports_without_ray():
    done = subprocess.run([sys.executable, "-c", IMPORT_ALL_WITHOUT_RAY], capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr
    for module in ("serve.engine", "serve.pipeline.registry", "serve.jobs.drive", "serve.parallel.worker"):
        assert f"'{module}'" in done.stdout
    # Nor lazily, inside a function.
    for path in Path(serve.__path__[0]).rglob("*.py"):
        assert not re.search(r"^\s*(import ray|from ray\b)", path.read_text(), re.M), path.name
