"""Speed profiles (serve/speed.py): one word for a stack of levers, in the engine config, the Serve config, the
request defaults and `srd generate --speed`; and the compile cache directory the levers compile into."""

from __future__ import annotations

import asyncio
import os

import pytest
import torch
import yaml

from serve.cli import main
from serve.config import EngineConfig
from serve.request import VideoRequest
from serve.speed import PROFILES
from srd_kernels.config import KernelConfig


def test_the_default_is_by_device_exact_on_the_cpu_fast_on_cuda():
    cpu = EngineConfig(preset="tiny")
    assert cpu.speed_name == "exact" and cpu.torch_dtype == torch.float32
    assert cpu.stage_kernels("sketch") == cpu.stage_kernels("render") == KernelConfig()
    assert cpu.defaults.render_cache == 0.0
    for device in ("cuda", "cuda:1"):
        gpu = EngineConfig(preset="tiny", device=device)
        assert gpu.speed_name == "fast" and gpu.torch_dtype == torch.bfloat16
        levers = gpu.stage_kernels("sketch")
        assert (levers.attention, levers.fp8_linear, levers.compile) == ("cudnn-fp8", True, True)
        # warmed up at the preset's default shape, so that the compile happens at load, not on a request
        d = gpu.defaults
        assert (levers.warmup_frames, levers.warmup_height, levers.warmup_width) == (d.num_frames, d.height, d.width)


def test_given_dtype_and_kernels_win_over_the_profile():
    config = EngineConfig(preset="tiny", device="cuda", dtype="float32", render_kernels={"attention": "sdpa"})
    assert config.speed_name == "fast" and config.torch_dtype == torch.float32
    assert config.stage_kernels("render") == KernelConfig(attention="sdpa")  # replaces the profile's, whole
    assert config.stage_kernels("sketch").fp8_linear  # the other stage keeps the profile's
    exact_on_gpu = EngineConfig(preset="tiny", device="cuda", speed="exact")
    assert exact_on_gpu.torch_dtype == torch.float32 and not exact_on_gpu.stage_kernels("render").any


def test_fastest_caches_render_steps_unless_the_request_says_otherwise():
    config = EngineConfig(preset="tiny", speed="fastest")
    threshold = PROFILES["fastest"].render_cache
    assert threshold > 0 and config.defaults.render_cache == threshold
    assert VideoRequest(prompt="a cat").resolve(config.defaults).render_cache == threshold
    assert VideoRequest(prompt="a cat", render_cache=0).resolve(config.defaults).render_cache == 0.0
    assert VideoRequest(prompt="a cat").resolve(EngineConfig(preset="tiny").defaults).render_cache == 0.0


def test_the_serve_config_carries_the_profile_to_the_replicas_and_the_ingress(tiny_models, tmp_path):
    from deployments.config import AppConfig
    from deployments.ingress import VideoService
    from deployments.local import local_config

    engine = EngineConfig(preset="tiny", device="cuda", speed="fastest")
    # srd generate --via-serve: the engine config goes through a dump; the profile and its levers survive it
    served = local_config(engine).engine
    assert served.speed_name == "fastest" and served.dtype is None
    assert served.stage_kernels("render") == engine.stage_kernels("render")

    app = AppConfig.model_validate({"engine": {"preset": "tiny", "speed": "fastest"},
                                    "jobs": {"data_dir": str(tmp_path)}})
    video = asyncio.run(VideoService(app).submit({"prompt": "a cat"}))
    assert video.request["render_cache"] == PROFILES["fastest"].render_cache


def test_a_family_without_levers_drops_the_profiles_and_refuses_given_ones():
    config = EngineConfig(preset="tiny-cogvideox", device="cuda")
    levers, why = config.kernels_for("render", config.family())
    assert levers == KernelConfig() and "speed fast" in why and "wan family only" in why
    given = EngineConfig(preset="tiny-cogvideox", device="cuda", render_kernels={"compile": True})
    with pytest.raises(ValueError, match="`render_kernels` sets speed levers"):
        given.kernels_for("render", given.family())


def test_unknown_speed_names_the_field():
    from pydantic import ValidationError

    with pytest.raises(ValidationError) as caught:
        EngineConfig(speed="ludicrous")
    assert caught.value.errors()[0]["loc"] == ("speed",)


def test_the_compile_cache_dir_reaches_both_stages_and_a_stages_own_wins(tmp_path):
    config = EngineConfig(preset="tiny", device="cuda", compile_cache_dir=str(tmp_path / "cache"),
                          render_kernels={"compile": True, "compile_cache_dir": str(tmp_path / "own")})
    assert config.stage_kernels("sketch").compile_cache_dir == str(tmp_path / "cache")
    assert config.stage_kernels("render").compile_cache_dir == str(tmp_path / "own")


def test_generate_fast_says_once_per_stage_why_a_lever_cannot_run(tmp_path, capsys, monkeypatch):
    """On the CPU the FP8 levers fall back, and each denoising stage says why in one line (the compile itself is
    stubbed: a CPU compile takes minutes and is tested in test_kernels)."""
    monkeypatch.setattr("srd_kernels.compile.compile_blocks", lambda transformer: None)
    monkeypatch.setattr("srd_kernels.compile.warm_up", lambda transformer, shape: None)
    out = tmp_path / "fast.mp4"
    code = main(["generate", "--preset", "tiny", "--prompt", "a red ball", "--height", "32", "--width", "32",
                 "--frames", "5", "--steps", "2", "--seed", "1", "--speed", "fast", "--out", str(out)])
    stdout = capsys.readouterr().out
    assert code == 0 and out.is_file()
    for role in ("sketch", "render"):
        lines = [line for line in stdout.splitlines() if line.startswith(f"{role} kernels (speed fast):")]
        assert len(lines) == 1, stdout
        assert "attention=sdpa (fallback: cudnn-fp8 needs a CUDA device" in lines[0]
        assert "fp8_linear=0 layers (fallback to torch.bfloat16:" in lines[0]


def test_generate_exact_prints_no_kernel_lines(tmp_path, capsys):
    code = main(["generate", "--preset", "tiny", "--prompt", "a red ball", "--height", "32", "--width", "32",
                 "--frames", "5", "--steps", "2", "--seed", "1", "--out", str(tmp_path / "exact.mp4")])
    assert code == 0 and "kernels" not in capsys.readouterr().out


@pytest.mark.parametrize(("extra", "message"), [
    (["--render-cache", "2"], "invalid render_cache:"),
])
def test_bad_speed_flags_are_one_line(tmp_path, capsys, extra, message):
    code = main(["generate", "--prompt", "a cat", "--out", str(tmp_path / "never.mp4"), *extra])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("srd generate: error:") and message in err[0], err


def test_unknown_speed_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as caught:
        main(["generate", "--prompt", "a cat", "--out", "x.mp4", "--speed", "ludicrous"])
    assert caught.value.code == 2
    assert "--speed: invalid choice: 'ludicrous'" in capsys.readouterr().err


def test_set_cache_dir_points_inductor_and_triton_there(tmp_path, monkeypatch):
    from srd_kernels.compile import set_cache_dir

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", "/elsewhere")
    monkeypatch.delenv("TRITON_CACHE_DIR", raising=False)
    set_cache_dir(str(tmp_path / "cache"))
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "cache")
    assert os.environ["TRITON_CACHE_DIR"] == str(tmp_path / "cache" / "triton")


# -- srd warm: the plumbing (a real compile takes minutes on a CPU: test_kernels has one, in the slow tier) -----------

@pytest.fixture
def stub_compile(monkeypatch):
    """Record each compile (with the cache directory Inductor would use then) and warm-up forward instead of running
    them; restore the cache variables afterwards."""
    calls = []
    monkeypatch.setattr("srd_kernels.compile.compile_blocks",
                        lambda transformer: calls.append(("compile", os.environ["TORCHINDUCTOR_CACHE_DIR"])))
    monkeypatch.setattr("srd_kernels.compile.warm_up", lambda transformer, shape: calls.append(tuple(shape)))
    for name in ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR"):
        monkeypatch.setenv(name, "unset-by-the-test")
    return calls


def test_warm_compiles_each_stage_into_the_cache_dir_at_the_presets_shape(tmp_path, capsys, stub_compile):
    cache = tmp_path / "inductor"
    code = main(["warm", "--preset", "tiny", "--device", "cpu", "--speed", "fast", "--compile-cache-dir", str(cache)])
    out = capsys.readouterr().out.splitlines()
    assert code == 0, out
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(cache) and cache.is_dir()
    assert os.environ["TRITON_CACHE_DIR"] == str(cache / "triton")
    d = EngineConfig(preset="tiny").defaults  # the tiny transformers: 16 latent channels, VAE 4x time, 8x space
    shape = (1, 16, (d.num_frames - 1) // 4 + 1, d.height // 8, d.width // 8)
    assert stub_compile == [("compile", str(cache)), shape] * 2  # the cache is set before each compile
    for role in ("sketch", "render"):
        line = next(line for line in out if line.startswith(f"srd warm: tiny: {role} kernels (speed fast):"))
        assert "compiled=True" in line and f"into {cache}" in line


def serve_yaml(tmp_path, engine: dict) -> str:
    path = tmp_path / "app.yaml"
    path.write_text(yaml.safe_dump({"applications": [{"name": "srd", "route_prefix": "/",
                                                      "import_path": "deployments.app:app_builder",
                                                      "args": {"engine": engine}}]}))
    return str(path)


def test_warm_reads_each_applications_engine_from_a_serve_config(tmp_path, capsys, stub_compile):
    cache = tmp_path / "from-config"
    config = serve_yaml(tmp_path, {"preset": "tiny", "compile_cache_dir": str(cache),
                                   "render_kernels": {"compile": True}})  # compiled without a warm-up shape
    code = main(["warm", "--config", config])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "srd warm: srd: sketch: nothing to compile (speed exact, sketch_kernels.compile is off)" in out
    assert "srd warm: srd: render kernels" in out and os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(cache)
    assert stub_compile[0] == ("compile", str(cache)) and len(stub_compile) == 2  # warmed at the preset's shape


@pytest.mark.parametrize(("args", "message"), [
    (["--config", "no-such.yaml"], "--config 'no-such.yaml' is not a file"),
    (["--config", "{yaml}", "--speed", "fast"], "--speed: give the engine's settings in --config's `engine:`"),
    (["--config", "{yaml}"], "application 'srd' in"),
])
def test_warm_errors_are_one_line(tmp_path, capsys, args, message):
    config = serve_yaml(tmp_path, {"preset": "tiny", "speed": "ludicrous"})
    code = main(["warm", *[a.replace("{yaml}", config) for a in args]])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("srd warm: error:") and message in err[0], err
    if "application" in message:
        assert "invalid engine.speed" in err[0]


def test_a_replica_logs_its_stages_levers_once_a_warning_when_one_fell_back(tiny_models, tmp_path, loop, monkeypatch):
    import logging

    import deployments.stage
    from deployments.config import StageConfig
    from deployments.stage import StageDeployment
    from serve.jobs.config import JobsConfig

    logged = []
    monkeypatch.setattr(deployments.stage.logger, "log", lambda level, message: logged.append((level, message)))
    engine = EngineConfig(preset="tiny", render_kernels={"attention": "cudnn-fp8"})  # the sketch: exact, no levers
    jobs = JobsConfig(data_dir=str(tmp_path))

    async def build():
        return StageDeployment("Renderer", engine, StageConfig(), jobs), StageDeployment("Sketcher", engine,
                                                                                          StageConfig(), jobs)

    loop.run(build())
    assert len(logged) == 1, logged
    level, message = logged[0]
    assert level == logging.WARNING and message.startswith("render kernels: attention=sdpa (fallback: cudnn-fp8 needs")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a usable CUDA GPU")
def test_warm_on_a_machine_without_the_gpu_is_one_line(capsys):
    code = main(["warm", "--preset", "tiny"])  # --device cuda is warm's default: it warms for the GPU that serves
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "`device` is 'cuda' but torch" in err[0], err


def test_a_parallel_stage_says_its_ranks_run_without_levers(tiny_models):
    from serve.pipeline.segment import SketchStage

    stage = SketchStage.load(EngineConfig(preset="tiny", sketch_kernels={"compile": True}), denoiser=object())
    assert stage.kernels.fell_back and "levers not applied: a parallel stage's ranks" in stage.kernels.line()
