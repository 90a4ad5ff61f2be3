"""The front door of `srd`: every flag has a help text with its default, `srd generate --help` shows the toy
preset's vocabulary (from toy/data.py, not re-typed), a prompt outside the toy grammar gets one warning line (in
process and through the Serve app), and local runs on loopback start Ray without token auth unless told otherwise."""

from __future__ import annotations

import argparse
import os
from types import SimpleNamespace

import pytest

from serve.cli import build_parser, main
from toy import data

FEW = ["--height", "32", "--width", "32", "--frames", "5", "--steps", "2", "--seed", "1"]


def subcommands() -> dict[str, argparse.ArgumentParser]:
    (sub,) = [a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(sub.choices)


@pytest.mark.parametrize("command", ["generate", "serve"])
def test_every_flag_has_help_and_shows_its_default(command):
    parser = subcommands()[command]
    formatter = parser._get_formatter()
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        assert action.help, f"srd {command} {action.option_strings}: no help text"
        shown = formatter._expand_help(action) if formatter._get_help_string(action) else ""
        assert "(default:" in shown or "(required)" in shown, (action.option_strings, shown)
        assert "(default: None)" not in shown, (action.option_strings, shown)


def test_generate_help_shows_the_toy_vocabulary(capsys):
    with pytest.raises(SystemExit) as caught:
        main(["generate", "--help"])
    assert caught.value.code == 0
    text = capsys.readouterr().out
    assert data.PROMPT_TEMPLATE in text and data.EXAMPLE_PROMPT in text
    for words in (data.SHAPES, data.COLOURS, data.SIZES, data.DIRECTIONS, data.SPEEDS, data.BACKGROUNDS):
        assert ", ".join(words) in text
    assert "(default: toy)" in text and "toy 20" in text  # --preset and the preset's own --steps


@pytest.mark.parametrize("command", ["generate", "serve"])
def test_preset_help_names_every_preset_with_its_summary(command):
    from serve.models import PRESETS

    help_text = " ".join(next(a.help for a in subcommands()[command]._actions if "--preset" in a.option_strings)
                         .split())
    for name, preset in PRESETS.items():
        assert preset.summary and f"{name} ({preset.summary})" in help_text, name


def test_the_example_prompt_is_in_the_grammar():
    data.parse_prompt(data.EXAMPLE_PROMPT)
    assert all(word in data.vocabulary() for word in data.parse_prompt(data.EXAMPLE_PROMPT).values())


def warnings_in(err: str) -> list[str]:
    return [line for line in err.splitlines() if "warning:" in line]


def test_prompt_outside_the_toy_grammar_warns_once_in_process(tmp_path, capsys):
    assert main(["generate", "--prompt", "a cat", *FEW, "--out", str(tmp_path / "cat.mp4")]) == 0
    (warning,) = warnings_in(capsys.readouterr().err)
    assert warning.startswith('srd generate: warning: the toy preset only knows prompts like '
                              f'"{data.EXAMPLE_PROMPT}" ({data.vocabulary()}); \'a cat\' is outside it')
    assert (tmp_path / "cat.mp4").is_file()  # a warning, not an error


def test_prompt_in_the_toy_grammar_does_not_warn_in_process(tmp_path, capsys):
    prompt = "a small blue square moving up quickly on a white background"
    assert main(["generate", "--prompt", prompt, *FEW, "--out", str(tmp_path / "square.mp4")]) == 0
    assert warnings_in(capsys.readouterr().err) == []


def test_other_presets_and_models_never_warn(tmp_path, tiny_models, capsys):
    assert main(["generate", "--preset", "tiny", "--prompt", "a cat", *FEW, "--out", str(tmp_path / "t.mp4")]) == 0
    assert warnings_in(capsys.readouterr().err) == []


@pytest.mark.parametrize(("prompt", "warns"), [("a dog on a skateboard", True),
                                               ("a large cyan triangle moving down slowly on a gray background", False)])
def test_toy_grammar_warning_through_the_serve_app(tmp_path, capsys, monkeypatch, prompt, warns):
    """--via-serve warns the same way, before Ray starts; the app itself is replaced by a stand-in here (the real
    one runs in CI's README check and in test_frontdoor_serve.py)."""
    import deployments.local

    calls = []

    def fake_generate_local(request, engine, on_update=None):
        calls.append((request, engine))
        job = SimpleNamespace(id="video_1", status="completed", stage=None, progress=100, error=None,
                              segments=[SimpleNamespace(stage="sketch", start=0, stop=1)], timings={"sketch": 0.1})
        if on_update is not None:
            on_update(job)
        return SimpleNamespace(job=job, video=b"mp4", latents=None)

    monkeypatch.setattr(deployments.local, "generate_local", fake_generate_local)
    out = tmp_path / "v.mp4"
    assert main(["generate", "--via-serve", "--prompt", prompt, *FEW, "--out", str(out)]) == 0
    captured = capsys.readouterr()
    assert len(warnings_in(captured.err)) == (1 if warns else 0), captured.err
    if warns:
        assert f"{prompt!r} is outside it" in warnings_in(captured.err)[0]
    assert len(calls) == 1 and calls[0][0].prompt == prompt and calls[0][1].preset == "toy"
    assert out.read_bytes() == b"mp4" and "(Serve app, job video_1)" in captured.out


@pytest.mark.parametrize(("host", "env", "expected"), [
    ("127.0.0.1", {}, "disabled"),
    ("localhost", {}, "disabled"),
    ("127.0.0.1", {"RAY_AUTH_MODE": "token"}, "token"),  # the user's choice stands
    ("127.0.0.1", {"RAY_ADDRESS": "10.0.0.1:6379"}, None),  # a cluster's auth is the cluster's
    ("0.0.0.0", {}, None),  # reachable from outside: Ray's own default and warning
])
def test_local_runs_on_loopback_start_ray_without_token_auth(monkeypatch, host, env, expected):
    from deployments.local import _local_auth_env

    for key in ("RAY_AUTH_MODE", "RAY_ADDRESS"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    _local_auth_env(host)
    assert os.environ.get("RAY_AUTH_MODE") == expected


def test_a_deployment_failure_is_worded_as_its_cause():
    from deployments.local import _cause

    message = (
        "The deployment failed to start 3 times in a row. This may be due to a problem with its constructor or "
        "initial health check failing. See controller logs for details. Error:\n"
        "\x1b[36mray::ServeReplica:srd:Sketcher.initialize_and_get_metadata()\x1b[39m (pid=1, ip=127.0.0.1)\n"
        "  File \"/x/replica.py\", line 1, in initialize_and_get_metadata\n"
        "    raise ModelError(...)\n"
        "serve.models.ModelError: cannot load the sketch transformer from '/m': no weights\n"
        "second line of the message\n"
    )
    assert _cause(message) == "ModelError: cannot load the sketch transformer from '/m': no weights"
    wrapped = "ray.exceptions.RayTaskError(OSError): ray::X() (pid=2)\n  File y\nOSError: disk full\n"
    assert _cause(wrapped) == "OSError: disk full"
    assert _cause("just words") == "just words"
