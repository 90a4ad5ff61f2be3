"""The hand-off is self-contained: render can resume it in another process (with Ray unavailable) to the same latents,
it pickles small, and the engine package never needs Ray."""

from __future__ import annotations

import pickle
import re
import subprocess
import sys
from pathlib import Path

import torch

import serve

RENDER_IN_FRESH_PROCESS = """
import pickle, sys
sys.modules["ray"] = None  # importing ray now fails: the render stage must not need it
import torch
from serve.engine import EngineConfig
from serve.pipeline.segment import RenderStage

handoff = pickle.loads(open(sys.argv[1], "rb").read())
(latents,) = RenderStage.load(EngineConfig(preset="tiny"))([handoff])
torch.save(latents, sys.argv[2])
"""


def tensors_in(value, seen=None):
    """Every tensor reachable from `value` through dataclass fields, object attributes, lists and dicts."""
    seen = set() if seen is None else seen
    if id(value) in seen:
        return
    seen.add(id(value))
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from tensors_in(item, seen)
    elif isinstance(value, dict):
        for item in value.values():
            yield from tensors_in(item, seen)
    elif hasattr(value, "__dict__"):
        yield from tensors_in(vars(value), seen)


def test_handoff_renders_identically_in_a_fresh_process(engine, make_params, tmp_path):
    params = make_params(num_inference_steps=5, switch="step:2", seed=11)
    (embeds,) = engine.stages["encode"]([params])
    (handoff,) = engine.stages["sketch"]([(params, embeds)])
    assert handoff.step_index == 2
    assert [o is not None for o in handoff.scheduler.model_outputs] == [True, True]  # UniPC's history travels too
    (in_process,) = engine.stages["render"]([handoff])

    blob = pickle.dumps(handoff)
    tensors = list(tensors_in(handoff))
    assert all(t.device.type == "cpu" for t in tensors)
    tensor_bytes = sum(t.untyped_storage().nbytes() for t in {t.untyped_storage().data_ptr(): t for t in tensors}.values())
    # Embeddings [1, 512, D] twice dominate; no model weights, no stray copies: the pickle is the tensors plus a
    # few kilobytes of scheduler config and request.
    assert tensor_bytes > 0 and len(blob) < tensor_bytes + 32 * 1024, (len(blob), tensor_bytes)

    (tmp_path / "handoff.pkl").write_bytes(blob)
    done = subprocess.run(
        [sys.executable, "-c", RENDER_IN_FRESH_PROCESS, str(tmp_path / "handoff.pkl"), str(tmp_path / "out.pt")],
        capture_output=True, text=True, timeout=180,
    )
    assert done.returncode == 0, done.stderr
    assert torch.equal(torch.load(tmp_path / "out.pt"), in_process)


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
