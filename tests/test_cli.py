"""`srd generate`: the tiny preset from a clean cache to a decodable mp4 and exact latents; bad input gives one line
and exit code 2, never a traceback."""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import torch

from serve.cli import main
from serve.tiny import TINY_VERSION
from serve.video import read_mp4

SRD = os.path.join(sysconfig.get_path("scripts"), "srd")  # the console script `pip install` made


def srd(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([SRD, *args], capture_output=True, text=True, timeout=300, env=env)


def test_generate_tiny_from_a_clean_cache(tmp_path, engine, make_params, rel_err):
    cache = tmp_path / "fresh-cache"
    out, latents_path = tmp_path / "demo.mp4", tmp_path / "final_latents.pt"
    done = srd(
        "generate", "--preset", "tiny", "--prompt", "a red ball bouncing", "--height", "32", "--width", "48",
        "--frames", "9", "--steps", "3", "--seed", "7", "--out", str(out), "--save-latents", str(latents_path),
        env={**os.environ, "SRD_CACHE": str(cache)},
    )
    assert done.returncode == 0, done.stderr
    assert (cache / f"tiny-{TINY_VERSION}" / "complete").is_file()  # built from nothing, offline
    assert "wrote" in done.stdout and "sketched 1/3 steps" in done.stdout  # tiny's default ratio:0.3 of 3 steps

    frames = read_mp4(out.read_bytes())
    assert frames.shape == (9, 32, 48, 3)

    latents = torch.load(latents_path)
    assert latents.dtype == torch.float32 and latents.shape == (1, 16, 3, 4, 6)
    params = make_params(height=32, width=48, num_frames=9, num_inference_steps=3, seed=7)
    expected = engine.generate(params, decode=False).latents  # same seed, models built in another cache
    assert rel_err(latents, expected) <= 1e-5


BAD_INPUT = [
    (["--height", "40"], "height", "must be a positive multiple of 16 but is 40"),
    (["--width", "100"], "width", "must be a positive multiple of 16 but is 100"),
    (["--frames", "8"], "num_frames", "must be of the form 4n+1"),
    (["--steps", "0"], "num_inference_steps", "must be >= 1 but is 0"),
    (["--steps", "4", "--switch", "step:5"], "switch", "step:5 must lie in 1..num_inference_steps=4"),
    (["--switch", "step:0"], "switch", "K must be one integer >= 1"),
    (["--switch", "adaptive:0.01:5"], "switch", "give THR or THR:MIN:MAX"),
    (["--switch", "sometimes"], "switch", "unknown policy 'sometimes'"),
    (["--prompt", ""], "prompt", "must not be empty"),
    (["--out", "no-such-dir/x.mp4"], "--out", "its directory does not exist"),
    (["--save-latents", "no-such-dir/x.pt"], "--save-latents", "its directory does not exist"),
]


@pytest.mark.parametrize(("extra", "field", "message"), BAD_INPUT, ids=[c[0][0] + c[0][-1] for c in BAD_INPUT])
def test_bad_request_is_one_line_naming_the_field(tmp_path, capsys, extra, field, message):
    out = tmp_path / "never.mp4"
    code = main(["generate", "--prompt", "a cat", "--out", str(out), *extra])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and err[0].startswith("srd generate: error:") and field in err[0] and message in err[0]
    assert not out.exists()


def model_cases(tiny_models, incompatible_renders, tmp_path):
    missing = str(tmp_path / "no-such-model")
    return {
        "missing-sketch": (["--sketch", missing, "--render", tiny_models.render], "sketch model directory"),
        "missing-render": (["--sketch", tiny_models.sketch, "--render", missing], "render model directory"),
        "text_dim": (["--sketch", tiny_models.sketch, "--render", incompatible_renders["text_dim"]], "text_dim is 48"),
        "in_channels": (["--sketch", tiny_models.sketch, "--render", incompatible_renders["in_channels"]],
                        "in_channels is 8"),
        "vae": (["--sketch", tiny_models.sketch, "--render", incompatible_renders["vae_pipeline"]], "different VAE"),
        "sketch-alone": (["--sketch", tiny_models.sketch], "--sketch and --render must be given together"),
    }


@pytest.mark.parametrize("case", ["missing-sketch", "missing-render", "text_dim", "in_channels", "vae", "sketch-alone"])
def test_bad_models_are_one_line(tiny_models, incompatible_renders, tmp_path, capsys, case):
    extra, message = model_cases(tiny_models, incompatible_renders, tmp_path)[case]
    code = main(["generate", "--prompt", "a cat", "--out", str(tmp_path / "never.mp4"), *extra])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and err[0].startswith("srd generate: error:") and message in err[0]


def test_console_script_prints_one_line_not_a_traceback(tmp_path):
    """The installed `srd` itself (the tests above call its `main` in-process): exit 2, one line on stderr."""
    done = srd("generate", "--prompt", "a cat", "--frames", "10", "--out", str(tmp_path / "never.mp4"))
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    lines = done.stderr.strip().splitlines()
    assert lines == ["srd generate: error: invalid num_frames: `num_frames` must be of the form 4n+1 (1, 5, 9, ..., 81) "
                     "but is 10"], done.stderr
    assert not (tmp_path / "never.mp4").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a usable CUDA GPU")
def test_cuda_without_a_gpu_is_one_line(tmp_path, capsys):
    code = main(["generate", "--prompt", "a cat", "--device", "cuda", "--out", str(tmp_path / "never.mp4")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and "`device` is 'cuda' but torch" in err[0] and "sees no CUDA GPU" in err[0]


def test_unknown_flag_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as caught:
        main(["generate", "--prompt", "a cat", "--out", "x.mp4", "--seeed", "3"])
    assert caught.value.code == 2
    assert "unrecognized arguments: --seeed 3" in capsys.readouterr().err


def test_module_entry_point_matches_console_script():
    done = subprocess.run([sys.executable, "-m", "serve.cli", "generate", "--help"], capture_output=True, text=True)
    assert done.returncode == 0 and "--save-latents" in done.stdout and "--switch" in done.stdout


def test_readme_set_up_commands_are_what_ci_runs():
    """The README's two set-up commands: the first runs `srd generate --preset toy --via-serve` into demo.mp4, the
    second installs the test extras and runs pytest. CI (.ci/run) reads both from the README itself and runs them."""
    root = Path(__file__).resolve().parent.parent
    readme = (root / "README.md").read_text()
    block = readme.split("## Set up", 1)[1].split("```bash\n", 1)[1].split("```", 1)[0]
    install_and_demo, install_and_test = block.strip().splitlines()
    assert install_and_demo.startswith("pip install torch==") and "srd generate --preset toy --via-serve" in \
        install_and_demo and install_and_demo.endswith("--out demo.mp4")
    install, test = install_and_test.split(" && ")
    assert install.startswith("pip install torch==") and "[test,parallel]" in install and test == "python -m pytest -q"

    # .ci/run's own extraction gives exactly these lines
    ci = (root / ".ci" / "run").read_text()
    function = ci[ci.index("readme_command() {"):].split("\n}\n", 1)[0] + "\n}\n"
    for n, expected in ((1, install_and_demo), (2, install_and_test)):
        done = subprocess.run(["bash", "-c", f"{function}readme_command {n}"], cwd=root, capture_output=True,
                              text=True, check=True)
        assert done.stdout.strip() == expected
    assert 'eval "$demo_command"' in ci and 'eval "$install"' in ci and 'eval "$run_tests" || status=$?' in ci
