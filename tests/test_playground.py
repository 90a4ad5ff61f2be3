"""The playground (deployments/playground/) in a real headless browser against the Serve app on the toy preset, with
auth on: Debian's Chromium driven by Playwright (its Python package carries its own driver; the browser is the
system's, nothing is downloaded at run time).

One test walks the page as a user would: a wrong token shows the API's 401; the right one loads the model's defaults
and prompt grammar; a bad field shows the API's 422 naming it; a prompt composed from the grammar's words gives a job
whose sketch preview, playing video, thumbnail and stage timeline appear; a long job is cancelled from the list; the
list pages (one job a page) and keeps the token across a reload (session storage); a job is deleted from it. Every
request the browser made went to the server's own origin.

The screenshot of the finished job is the README's picture: `SRD_PLAYGROUND_SCREENSHOT=docs/playground.png python -m
pytest -q tests/test_playground.py` writes it there (elsewhere a temporary file). Without Chromium the test skips,
unless `SRD_REQUIRE_BROWSER` is set (CI sets it, after installing the browser): then it fails.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest

import httpx
from ray import serve

APP = "srd-playground"
TOKEN = "tok-playground"
CHROMIUM = "/usr/bin/chromium"  # Debian's package (apt-get install chromium)
# No network beyond the page's server, no first-run or background traffic of the browser's own.
BROWSER_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                "--disable-component-update", "--disable-sync"]
PROMPT = "a large red square moving up slowly on a black background"  # in the toy grammar, composed in the page
WAIT_MS = 120_000


@pytest.fixture(scope="module")
def sync_playwright():
    """Playwright's sync API, once it and the system Chromium are there; else a skip, or a failure under
    SRD_REQUIRE_BROWSER (before the app is deployed, so that a skip costs nothing)."""
    missing = None
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        missing = "the playwright package is not installed (pip install -e \".[test]\")"
    if missing is None and not shutil.which(CHROMIUM):
        missing = f"no Chromium at {CHROMIUM} (apt-get install chromium)"
    if missing:
        if os.environ.get("SRD_REQUIRE_BROWSER"):
            pytest.fail(f"SRD_REQUIRE_BROWSER is set but {missing}")
        pytest.skip(missing)
    return sync_playwright


@pytest.fixture(scope="module")
def app(serve_http, tmp_path_factory):
    """The app on the toy preset over HTTP, auth on; deleted after the module."""
    from deployments.app import build_app
    from deployments.config import AppConfig

    config = AppConfig.model_validate({
        "engine": {"preset": "toy"},
        "jobs": {"data_dir": str(tmp_path_factory.mktemp("srd-playground")), "poll_interval_s": 0.05,
                 "progress_interval_s": 0.05},
        "auth": {"tokens": [TOKEN], "tokens_env": None},
    })
    serve.run(build_app(config), name=APP, route_prefix="/")
    try:
        with httpx.Client(base_url=serve_http, timeout=60, headers={"Authorization": f"Bearer {TOKEN}"}) as http:
            yield SimpleNamespace(url=serve_http, http=http)
    finally:
        serve.delete(APP)


@pytest.fixture(scope="module")
def toy_api(tmp_path_factory):
    """The ingress's routes on the toy preset with auth on, in this process (no Ray, no drive loop)."""
    from fastapi.testclient import TestClient

    from deployments.config import AppConfig
    from deployments.ingress import VideoService, make_api

    config = AppConfig.model_validate({"engine": {"preset": "toy"},
                                       "jobs": {"data_dir": str(tmp_path_factory.mktemp("srd-playground-api"))},
                                       "auth": {"tokens": [TOKEN], "tokens_env": None}})
    with TestClient(make_api(VideoService(config))) as http:
        yield http


def test_the_page_and_what_it_reads_from_the_api(toy_api):
    """Served without a token, under a policy that lets the browser reach this origin alone, every file it names
    relative (so it works under any route prefix); the model's defaults, grammar and schedules behind auth."""
    from serve.calibration import load_calibration
    from serve.config import EngineConfig
    from serve.models import PRESETS
    from toy import data

    page = toy_api.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    policy = dict(part.strip().split(" ", 1) for part in page.headers["content-security-policy"].split(";"))
    assert policy["default-src"] == "'none'" and policy["connect-src"] == "'self'"
    assert policy["script-src"] == policy["style-src"] == "'self'"
    linked = re.findall(r'(?:src|href)="([^"]*)"', page.text)
    assert sorted(linked) == ["data:,", "playground/app.js", "playground/style.css"]
    for path, media in (("app.js", "javascript"), ("style.css", "text/css")):
        asset = toy_api.get(f"/playground/{path}")
        assert asset.status_code == 200 and media in asset.headers["content-type"], path

    assert toy_api.get("/v1/models").status_code == 401
    models = toy_api.get("/v1/models", headers={"Authorization": f"Bearer {TOKEN}"})
    assert models.status_code == 200, models.text
    model = models.json()["data"][0]
    assert model["id"] == "toy" and model["object"] == "model" and model["speed"] == "exact"
    defaults = EngineConfig(preset="toy").defaults
    assert model["defaults"] == {name: getattr(defaults, name) for name in model["defaults"]}
    assert model["limits"]["max_steps"] == PRESETS["toy"].limits.max_steps
    grammar = model["prompt_grammar"]
    assert grammar["template"] == data.PROMPT_TEMPLATE and grammar["example"] == data.EXAMPLE_PROMPT
    assert list(grammar["vocabulary"]) == ["size", "colour", "shape", "direction", "speed", "background"]
    assert grammar["vocabulary"]["colour"] == list(data.COLOURS)
    calibration = load_calibration(PRESETS["toy"].calibration)
    assert [s["switch"] for s in model["schedules"]] == [s.switch for s in calibration.schedules]


def visible(page, selector: str) -> None:
    page.wait_for_selector(f"{selector}:not([hidden])", timeout=WAIT_MS)


def loaded(page, selector: str) -> None:
    """Wait until the image has decoded. (Predicates are functions: the page's policy forbids eval, which
    Playwright would use for a bare expression.)"""
    page.wait_for_function("selector => document.querySelector(selector)?.naturalWidth > 0", arg=selector)


def row(job_id: str) -> str:
    return f'#job-rows tr[data-id="{job_id}"]'


def test_playground_in_a_browser(sync_playwright, app, tmp_path):
    from playwright.sync_api import expect

    screenshot = Path(os.environ.get("SRD_PLAYGROUND_SCREENSHOT") or tmp_path / "playground.png")
    requested: list[str] = []
    with sync_playwright() as playwright:
        # launch() gives the browser a fresh, temporary user-data-dir of its own
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=BROWSER_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1100, "height": 900})
            page.on("request", lambda request: requested.append(request.url))
            page.set_default_timeout(WAIT_MS)
            page.goto(app.url + "/")
            visible(page, "#error")  # no token yet: the model is not readable

            # A wrong token: the API's own 401, as the API words it.
            refused = httpx.get(f"{app.url}/v1/models", headers={"Authorization": "Bearer wrong"}).json()["error"]
            with page.expect_response(lambda response: response.url.endswith("/v1/models")) as answer:
                page.fill("#token", "wrong")
                page.press("#token", "Tab")
            assert answer.value.status == 401 and answer.value.request.all_headers()["authorization"] == "Bearer wrong"
            expect(page.locator("#error")).to_have_text(f"401 {refused['code']}: {refused['message']}")

            # The right token: the model's defaults fill the fields, the grammar's words compose the prompt.
            page.fill("#token", TOKEN)
            page.press("#token", "Tab")
            page.wait_for_selector("#slots select")
            assert page.evaluate("sessionStorage.getItem('srd-token')") == TOKEN
            assert page.is_hidden("#error")
            model = app.http.get("/v1/models").json()["data"][0]
            for field in ("width", "height", "num_frames", "num_inference_steps", "switch", "guidance_scale"):
                assert page.input_value(f'#fields [name="{field}"]') == str(model["defaults"][field]).removesuffix(
                    ".0"), field
            assert page.input_value("#prompt") == model["prompt_grammar"]["example"]
            for slot, word in (("shape", "square"), ("direction", "up")):
                page.select_option(f'#slots select[name="{slot}"]', word)
            assert page.input_value("#prompt") == PROMPT

            # A bad field: the API's 422, the field it names marked.
            page.fill('[name="num_frames"]', "6")
            page.click("#submit")
            bad = app.http.post("/v1/videos", json={"prompt": PROMPT, "num_frames": 6}).json()["error"]
            assert bad["param"] == "num_frames"
            expect(page.locator("#error")).to_have_text(f"422 {bad['code']}: {bad['message']} (field num_frames)")
            expect(page.locator('[name="num_frames"]')).to_have_attribute("aria-invalid", "true")

            # A job: live progress, the sketch's preview, then a video that plays, its thumbnail and timeline.
            page.fill('[name="num_frames"]', str(model["defaults"]["num_frames"]))
            page.fill('[name="seed"]', "3")
            page.select_option('[name="priority"]', "interactive")
            page.click("#submit")
            visible(page, "#job")
            job_id = page.get_attribute("#job", "data-id")
            visible(page, "#preview-figure")
            # the preview is there while the small model still renders (decode alone takes seconds after it)
            assert page.get_attribute("#job", "data-status") == "in_progress" and page.is_hidden("#video-figure")
            loaded(page, "#preview")
            visible(page, "#video-figure")
            played = page.evaluate("""async () => {
                const video = document.querySelector('#video');
                await video.play();
                await new Promise((resolve) => setTimeout(resolve, 500));
                return {duration: video.duration, frames: video.getVideoPlaybackQuality().totalVideoFrames};
            }""")
            assert played["duration"] > 0 and played["frames"] > 0, played
            loaded(page, "#thumbnail")
            assert page.get_attribute("#download", "download") == f"{job_id}.mp4"
            assert page.get_attribute("#download", "href").startswith(f"blob:{app.url}/")
            job = app.http.get(f"/v1/videos/{job_id}").json()
            assert job["status"] == "completed" and job["prompt"] == PROMPT and job["request"]["seed"] == 3
            assert job["priority"] == "interactive"
            expect(page.locator("#job-status")).to_have_text("completed, 100%")
            expect(page.locator("#segments li")).to_have_text([
                f"{s['stage']}: steps {s['start']} to {s['stop'] - 1} ({s['stop'] - s['start']} of 20)"
                for s in job["segments"]])
            timeline = page.eval_on_selector_all("#timeline .stage", "rows => rows.map(r => r.dataset.stage)")
            assert set(timeline) == set(job["timings"]) == {"encode", "sketch", "preview", "render", "decode"}
            loaded(page, f"{row(job_id)} img")
            assert page.get_attribute(row(job_id), "data-status") == "completed"
            page.screenshot(path=str(screenshot), full_page=True)

            # A long job, cancelled from the list.
            page.fill('[name="num_inference_steps"]', "100")
            page.click("#submit")
            page.wait_for_function("id => document.querySelector('#job').dataset.id !== id", arg=job_id)
            long_id = page.get_attribute("#job", "data-id")
            page.click(f'{row(long_id)} button[data-action="cancel"]')
            page.wait_for_selector(f'{row(long_id)}[data-status="cancelled"]')
            page.wait_for_selector('#job[data-status="cancelled"]')
            assert app.http.get(f"/v1/videos/{long_id}").json()["cancelled"] is True

            # The list a job a page, newest first, after a reload that keeps the token; then a delete.
            page.goto(app.url + "/?limit=1")
            page.wait_for_selector(row(long_id))
            assert page.input_value("#token") == TOKEN
            page.click("#more")
            page.wait_for_selector(row(job_id))
            ids = page.eval_on_selector_all("#job-rows tr", "rows => rows.map(r => r.dataset.id)")
            assert ids == [long_id, job_id] == [v["id"] for v in app.http.get("/v1/videos").json()["data"]]
            page.click(f'{row(long_id)} button[data-action="delete"]')
            page.wait_for_selector(row(long_id), state="detached")
            assert app.http.get(f"/v1/videos/{long_id}").status_code == 404
        finally:
            browser.close()

    assert screenshot.stat().st_size > 10_000
    origin = re.escape(app.url)
    foreign = [url for url in requested if not re.match(rf"(blob:)?{origin}/", url) and url != "data:,"]
    assert requested and not foreign, foreign
