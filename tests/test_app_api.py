"""The HTTP API's contract: malformed input, admission, auth, the official openai SDK and pagination.

The ingress's routes (deployments/ingress.py `make_api` over a `VideoService`) are served by FastAPI's TestClient in
this process, and jobs are driven by the drive loop over the stage deployments in this process too
(tests/conftest.py `InProcessApp`): no Ray. One app for the module (tiny preset, bearer tokens tok-a and tok-b).
The same routes behind Serve's HTTP proxy are tests/test_app.py.

Admission runs against a second service with no drive loop: its jobs stay queued, so the count it sees is exact and
the test needs no timing luck.
"""

from __future__ import annotations

import io
import json
import time
from types import SimpleNamespace

import pytest
from fastapi.testclient import TestClient

TOKEN_A, TOKEN_B = "tok-a", "tok-b"
# 32x32, 5 frames, 2 steps: a job takes well under a second of compute
SMALL = {"size": "32x32", "num_frames": 5, "num_inference_steps": 2, "switch": "step:1"}
P = "a red ball bouncing"


def app_config(data_dir, **overrides) -> dict:
    return {
        "engine": {"preset": "tiny"},
        "jobs": {"data_dir": str(data_dir), "poll_interval_s": 0.05, "progress_interval_s": 0.05},
        "auth": {"tokens": [TOKEN_A, TOKEN_B], "tokens_env": None},
        **overrides,
    }


def bearer(token: str) -> dict:
    return {"Authorization": f"Bearer {token}"}


@pytest.fixture(scope="module")
def app(tiny_models, tmp_path_factory, loop, in_process_app):
    from deployments.config import AppConfig
    from deployments.ingress import VideoService, make_api

    data_dir = tmp_path_factory.mktemp("srd-api-data")
    config = AppConfig.model_validate(app_config(data_dir))
    local = in_process_app(config.engine, config.jobs, loop)
    local.start()  # the orchestrator
    api = make_api(VideoService(config))
    try:
        with TestClient(api, headers=bearer(TOKEN_A)) as a, TestClient(api, headers=bearer(TOKEN_B)) as b, \
                TestClient(api) as anon:
            yield SimpleNamespace(a=a, b=b, anon=anon, api=api, data_dir=data_dir)
    finally:
        local.close()


@pytest.fixture(scope="module")
def admission(tmp_path_factory):
    """The service alone (no drive loop: its jobs stay queued), at most two unfinished jobs, no auth."""
    from deployments.config import AppConfig
    from deployments.ingress import VideoService, make_api

    config = AppConfig.model_validate({
        "engine": {"preset": "tiny"},
        "jobs": {"data_dir": str(tmp_path_factory.mktemp("srd-admission")), "max_unfinished_jobs": 2,
                 "retry_after_s": 7},
        "auth": {"tokens_env": None},
    })
    with TestClient(make_api(VideoService(config))) as http:
        yield http


def wait_for(http, job_id: str, until=lambda job: job["status"] in ("completed", "failed"),
             timeout_s: float = 180.0) -> dict:
    deadline = time.monotonic() + timeout_s
    while True:
        response = http.get(f"/v1/videos/{job_id}")
        assert response.status_code == 200, response.text
        if until(response.json()):
            return response.json()
        assert time.monotonic() < deadline, f"job {job_id} never got there: {response.json()}"
        time.sleep(0.05)


def create(http, **fields) -> dict:
    response = http.post("/v1/videos", json={"prompt": P, "seed": 1, **SMALL, **fields})
    assert response.status_code == 200, response.text
    return response.json()


# -- 1. malformed and oversized requests: a 4xx naming the field, never a 500 ------------------------------------


def J(**fields) -> dict:
    """A JSON body: the prompt and the given fields."""
    return {"json": {"prompt": P, **fields}}


def J_(body) -> dict:
    """Exactly this JSON value as the body."""
    return {"json": body}


def RAW(text: str | bytes, content_type: str | None = "application/json") -> dict:
    """Bytes as they are (JSON with NaN/Infinity tokens, broken JSON, other content types)."""
    return {"content": text.encode() if isinstance(text, str) else text,
            "headers": {} if content_type is None else {"content-type": content_type}}


def FORM(files: dict | None = None, **fields) -> dict:
    """multipart/form-data, as the openai SDK sends it: the prompt, the fields as text parts, and files."""
    parts = {k: (None, str(v)) for k, v in {"prompt": P, **fields}.items()}
    return {"files": {**parts, **(files or {})}}


PNG_1x1 = bytes.fromhex("89504e470d0a1a0a0000000d4948445200000001000000010806000000"
                        "1f15c4890000000d4944415478da63f8cfc0f01f0005000201e2213a7d0000000049454e44ae426082")
MB = 1024 * 1024

# (id, request, status, param)
MALFORMED = [
    # too big: frame size, frames, steps, prompt, body
    ("size-100000x100000", J(size="100000x100000"), 422, "size"),
    ("width-height-100000", J(width=100000, height=100000), 422, "width"),
    ("height-100000", J(height=100000), 422, "height"),
    ("width-huge-int", J(width=16 * 10**30), 422, "width"),
    ("frames-10001", J(num_frames=10001, size="32x32"), 422, "num_frames"),
    ("seconds-3600", J(seconds="3600", size="32x32"), 422, "seconds"),
    ("steps-100000", J(num_inference_steps=100000), 422, "num_inference_steps"),
    ("steps-huge-int", J(num_inference_steps=10**40), 422, "num_inference_steps"),
    ("prompt-3000-chars", J_({"prompt": "a" * 3000}), 422, "prompt"),
    ("negative-prompt-3000-chars", J(negative_prompt="b" * 3000), 422, "negative_prompt"),
    ("prompt-1MB", J_({"prompt": "a" * MB}), 413, "body"),
    ("body-20MB", RAW(b"{" + b" " * (20 * MB) + b"}"), 413, "body"),
    # NaN and infinities, as JSON tokens (Python's json reads them) and as strings
    ("guidance-NaN-token", RAW(f'{{"prompt": "{P}", "guidance_scale": NaN}}'), 422, "guidance_scale"),
    ("guidance-Infinity-token", RAW(f'{{"prompt": "{P}", "guidance_scale": Infinity}}'), 422, "guidance_scale"),
    ("guidance-minus-Infinity", RAW(f'{{"prompt": "{P}", "guidance_scale": -Infinity}}'), 422, "guidance_scale"),
    ("guidance-1e400", RAW(f'{{"prompt": "{P}", "guidance_scale": 1e400}}'), 422, "guidance_scale"),
    ("guidance-nan-string", J(guidance_scale="nan"), 422, "guidance_scale"),
    ("flow-shift-NaN-token", RAW(f'{{"prompt": "{P}", "flow_shift": NaN}}'), 422, "flow_shift"),
    ("flow-shift-Infinity-token", RAW(f'{{"prompt": "{P}", "flow_shift": Infinity}}'), 422, "flow_shift"),
    ("flow-shift-inf-string", J(flow_shift="inf"), 422, "flow_shift"),
    ("seconds-NaN-token", RAW(f'{{"prompt": "{P}", "seconds": NaN}}'), 422, "seconds"),
    # numeric fields: negative, zero, non-integer, bool, string, list, object
    ("width-negative", J(width=-16), 422, "width"),
    ("width-zero", J(width=0), 422, "width"),
    ("width-not-multiple-of-16", J(width=30), 422, "width"),
    ("width-fraction", J(width=16.5), 422, "width"),
    ("width-bool", J(width=True), 422, "width"),
    ("width-string", J(width="wide"), 422, "width"),
    ("width-list", J(width=[32]), 422, "width"),
    ("height-object", J(height={"px": 32}), 422, "height"),
    ("height-negative", J(height=-32), 422, "height"),
    ("frames-zero", J(num_frames=0), 422, "num_frames"),
    ("frames-negative", J(num_frames=-3), 422, "num_frames"),
    ("frames-not-4n+1", J(num_frames=8), 422, "num_frames"),
    ("frames-fraction", J(num_frames=5.5), 422, "num_frames"),
    ("frames-bool", J(num_frames=True), 422, "num_frames"),
    ("frames-list", J(num_frames=[5]), 422, "num_frames"),
    ("steps-zero", J(num_inference_steps=0), 422, "num_inference_steps"),
    ("steps-negative", J(num_inference_steps=-1), 422, "num_inference_steps"),
    ("steps-fraction", J(num_inference_steps=2.5), 422, "num_inference_steps"),
    ("steps-bool", J(num_inference_steps=True), 422, "num_inference_steps"),
    ("steps-string", J(num_inference_steps="many"), 422, "num_inference_steps"),
    ("steps-object", J(num_inference_steps={}), 422, "num_inference_steps"),
    ("guidance-negative", J(guidance_scale=-1), 422, "guidance_scale"),
    ("guidance-bool", J(guidance_scale=True), 422, "guidance_scale"),
    ("guidance-string", J(guidance_scale="high"), 422, "guidance_scale"),
    ("guidance-list", J(guidance_scale=[5.0]), 422, "guidance_scale"),
    ("flow-shift-zero", J(flow_shift=0), 422, "flow_shift"),
    ("flow-shift-negative", J(flow_shift=-1.5), 422, "flow_shift"),
    ("flow-shift-bool", J(flow_shift=False), 422, "flow_shift"),
    ("seed-negative", J(seed=-1), 422, "seed"),
    ("seed-2**63", J(seed=2**63), 422, "seed"),
    ("seed-huge", J(seed=10**400), 422, "seed"),
    ("seed-fraction", J(seed=1.5), 422, "seed"),
    ("seed-bool", J(seed=True), 422, "seed"),
    ("seed-string", J(seed="lucky"), 422, "seed"),
    # switch specs
    ("switch-unknown-kind", J(switch="sometimes:3"), 422, "switch"),
    ("switch-K-over-N", J(num_inference_steps=4, switch="step:9"), 422, "switch"),
    ("switch-ratio-0", J(switch="ratio:0"), 422, "switch"),
    ("switch-ratio-over-1", J(switch="ratio:1.5"), 422, "switch"),
    ("switch-garbage", J(switch="@@@"), 422, "switch"),
    ("switch-empty", J(switch=""), 422, "switch"),
    ("switch-step-inf", J(switch="step:inf"), 422, "switch"),
    ("switch-step-nan", J(switch="step:nan"), 422, "switch"),
    ("switch-adaptive-inf", J(switch="adaptive:0.5:inf:inf"), 422, "switch"),
    ("switch-not-a-string", J(switch=3), 422, "switch"),
    # size strings
    ("size-64", J(size="64"), 422, "size"),
    ("size-64x", J(size="64x"), 422, "size"),
    ("size-x64", J(size="x64"), 422, "size"),
    ("size-64x64x64", J(size="64x64x64"), 422, "size"),
    ("size--64x64", J(size="-64x64"), 422, "size"),
    ("size-63x64", J(size="63x64"), 422, "size"),
    ("size-0x0", J(size="0x0"), 422, "size"),
    ("size-5000-digits", J(size="1" * 5000 + "x16"), 422, "size"),
    ("size-not-a-string", J(size=64), 422, "size"),
    ("size-disagrees-with-width", J(size="32x32", width=64), 422, "size"),
    # seconds
    ("seconds-0", J(seconds="0"), 422, "seconds"),
    ("seconds--1", J(seconds="-1"), 422, "seconds"),
    ("seconds-abc", J(seconds="abc"), 422, "seconds"),
    ("seconds-1e400", J(seconds="1e400"), 422, "seconds"),
    ("seconds-inf", J(seconds="inf"), 422, "seconds"),
    ("seconds-nan", J(seconds="nan"), 422, "seconds"),
    ("seconds-bool", J(seconds=True), 422, "seconds"),
    ("seconds-list", J(seconds=["1"]), 422, "seconds"),
    ("seconds-with-num-frames", J(seconds="1", num_frames=17), 422, "seconds"),
    ("switch-quality-uncalibrated", J(switch="quality:0.99"), 422, "switch"),  # the tiny pair has no calibration
    # model, input_reference, unknown and missing fields, the prompt itself
    ("model-unknown", J(model="sora-2"), 422, "model"),
    ("model-not-a-string", J(model=5), 422, "model"),
    ("input-reference-string", J(input_reference="https://example.com/cat.png"), 422, "input_reference"),
    ("input-reference-object", J(input_reference={"file_id": "file_1"}), 422, "input_reference"),
    ("unknown-field", J(colour="red"), 422, "colour"),
    ("unknown-field-lone-surrogate", RAW(f'{{"prompt": "{P}", "\\ud800": 1}}'), 422, "\\ud800"),
    ("prompt-missing", J_({"seed": 1}), 422, "prompt"),
    ("prompt-empty", J_({"prompt": ""}), 422, "prompt"),
    ("prompt-blank", J_({"prompt": "   "}), 422, "prompt"),
    ("prompt-null", J_({"prompt": None}), 422, "prompt"),
    ("prompt-number", J_({"prompt": 5}), 422, "prompt"),
    ("prompt-list", J_({"prompt": ["a", "b"]}), 422, "prompt"),
    ("prompt-lone-surrogate", RAW('{"prompt": "a \\ud800 b"}'), 422, "prompt"),
    ("negative-prompt-number", J(negative_prompt=1), 422, "negative_prompt"),
    # multipart/form-data (the openai SDK's encoding)
    ("form-input-reference-file", FORM(files={"input_reference": ("ref.png", PNG_1x1, "image/png")}), 422,
     "input_reference"),
    ("form-prompt-as-file", {"files": {"prompt": ("prompt.txt", b"a cat", "text/plain")}}, 422, "prompt"),
    ("form-width-abc", FORM(width="abc"), 422, "width"),
    ("form-seconds-nan", FORM(seconds="nan"), 422, "seconds"),
    ("form-guidance-inf", FORM(guidance_scale="inf"), 422, "guidance_scale"),
    ("form-unknown-field", FORM(colour="red"), 422, "colour"),
    ("form-model-unknown", FORM(model="sora-2-pro"), 422, "model"),
    ("form-missing-prompt", {"files": {"seed": (None, "1")}}, 422, "prompt"),
    ("form-no-boundary", RAW("--x\r\n\r\n", "multipart/form-data"), 400, "body"),
    # the body itself
    ("body-not-json", RAW("{prompt: a cat"), 400, "body"),
    ("body-json-array", J_([{"prompt": P}]), 400, "body"),
    ("body-json-string", J_("a cat"), 400, "body"),
    ("body-json-null", RAW("null"), 400, "body"),
    ("body-empty", RAW(""), 400, "body"),
    ("body-invalid-utf8", RAW(b'{"prompt": "\xff\xfe"}'), 400, "body"),
    ("body-nested-30000-deep", RAW('{"prompt": ' + "[" * 30000 + "]" * 30000 + "}"), 400, "body"),
    ("content-type-text-plain", RAW(json.dumps({"prompt": P}), "text/plain"), 415, "body"),
    ("content-type-xml", RAW("<prompt>a cat</prompt>", "application/xml"), 415, "body"),
]


@pytest.mark.parametrize("request_kwargs, status, param",
                         [case[1:] for case in MALFORMED], ids=[case[0] for case in MALFORMED])
def test_malformed_request_is_a_4xx_naming_the_field(app, request_kwargs, status, param):
    response = app.a.post("/v1/videos", **request_kwargs)
    assert response.status_code == status, response.text
    body = response.json()
    assert body["error"]["param"] == param, body
    assert body["error"]["type"] == "invalid_request_error" and param in body["error"]["message"], body
    assert body["detail"][0]["loc"] == ["body", param], body


def test_server_keeps_serving_after_malformed_requests(app):
    from serve.video import read_mp4

    assert len(MALFORMED) >= 40 and len({case[0] for case in MALFORMED}) == len(MALFORMED)
    assert app.anon.get("/healthz").json() == {"status": "ok"}
    job = wait_for(app.a, create(app.a, seed=5)["id"])
    assert job["status"] == "completed", job
    assert job["size"] == "32x32" and job["num_frames"] == 5 and job["request"]["num_inference_steps"] == 2
    assert read_mp4(app.a.get(f"/v1/videos/{job['id']}/content").content).shape == (5, 32, 32, 3)
    assert job["id"] in [v["id"] for v in app.a.get("/v1/videos").json()["data"]]


# -- 2. admission ------------------------------------------------------------------------------------------------


def test_admission_answers_429_with_retry_after_and_keeps_serving(admission):
    first = [admission.post("/v1/videos", json={"prompt": f"job {i}", **SMALL}) for i in range(2)]
    assert [r.status_code for r in first] == [200, 200], [r.text for r in first]
    for _ in range(3):  # the bound holds however often one asks
        refused = admission.post("/v1/videos", json={"prompt": "one too many", **SMALL})
        assert refused.status_code == 429, refused.text
        assert refused.headers["retry-after"] == "7"
        assert refused.json()["error"]["code"] == "rate_limit_exceeded"
    # still serving: health, status, lists, and the refused jobs were never stored
    assert admission.get("/healthz").json() == {"status": "ok"}
    listed = admission.get("/v1/videos").json()["data"]
    assert sorted(v["id"] for v in listed) == sorted(r.json()["id"] for r in first)
    assert {v["status"] for v in listed} == {"queued"}
    # a cancelled (finished) job frees its slot: one more is admitted, and the next is refused again
    cancelled = admission.post(f"/v1/videos/{first[0].json()['id']}/cancel")
    assert cancelled.status_code == 200 and cancelled.json()["status"] == "failed" and cancelled.json()["cancelled"]
    assert admission.post("/v1/videos", json={"prompt": "admitted now", **SMALL}).status_code == 200
    assert admission.post("/v1/videos", json={"prompt": "refused again", **SMALL}).status_code == 429
    assert admission.get("/v1/models").status_code == 200  # auth is off in this app


# -- 3. auth -----------------------------------------------------------------------------------------------------


def v1_routes(job_id: str) -> list[tuple[str, str]]:
    return [("POST", "/v1/videos"), ("GET", "/v1/videos"), ("GET", f"/v1/videos/{job_id}"),
            ("GET", f"/v1/videos/{job_id}/content"), ("GET", f"/v1/videos/{job_id}/content?variant=thumbnail"),
            ("GET", f"/v1/videos/{job_id}/preview"), ("GET", f"/v1/videos/{job_id}/latents"),
            ("GET", f"/v1/videos/{job_id}/events"), ("POST", f"/v1/videos/{job_id}/cancel"),
            ("DELETE", f"/v1/videos/{job_id}"), ("GET", "/v1/models")]


def test_auth_tokens_and_ownership(app):
    job = create(app.a, seed=9)
    job_id = job["id"]
    for headers in ({}, bearer("tok-c"), {"Authorization": "Bearer"}, {"Authorization": f"Basic {TOKEN_A}"},
                    {"Authorization": TOKEN_A}, bearer(TOKEN_A + "x"), bearer(TOKEN_A[:-1])):
        for method, path in v1_routes(job_id):
            response = app.anon.request(method, path, headers=headers, json={"prompt": P})
            assert response.status_code == 401, (headers, method, path, response.text)
            assert response.headers["www-authenticate"] == "Bearer", (method, path)
            assert response.json()["error"]["code"] == "invalid_api_key"
    assert app.anon.get("/healthz").json() == {"status": "ok"}  # no token needed
    assert app.anon.get("/openapi.json").status_code == 200

    # token B: A's job is as good as absent, on every route
    for method, path in v1_routes(job_id)[2:10]:
        response = app.b.request(method, path)
        assert response.status_code == 404, (method, path, response.text)
        assert job_id in response.json()["error"]["message"]
    assert job_id not in [v["id"] for v in app.b.get("/v1/videos", params={"limit": 100}).json()["data"]]
    after = app.b.get("/v1/videos", params={"after": job_id})
    assert after.status_code == 404 and after.json()["error"]["param"] == "after"
    assert app.b.get("/v1/models").status_code == 200

    # token A sees it, and B's delete and cancel did nothing to it
    done = wait_for(app.a, job_id)
    assert done["status"] == "completed" and not done["cancel_requested"], done
    assert job_id in [v["id"] for v in app.a.get("/v1/videos", params={"limit": 100}).json()["data"]]
    assert app.a.get(f"/v1/videos/{job_id}/content").status_code == 200
    assert app.anon.get(f"/v1/videos/{job_id}", headers={"Authorization": f"bearer {TOKEN_A}"}).status_code == 200


# -- 4. the official openai SDK, unchanged -----------------------------------------------------------------------


def test_openai_sdk_end_to_end(app):
    import openai
    from PIL import Image

    from serve.video import read_mp4

    def sdk(api_key: str):
        return openai.OpenAI(api_key=api_key, base_url="http://testserver/v1", max_retries=0, timeout=60,
                             http_client=TestClient(app.api))

    client = sdk(TOKEN_A)
    steps = {"num_inference_steps": 2, "switch": "step:1", "seed": 4}
    video = client.videos.create(prompt="a lighthouse at dusk", size="32x32", seconds="1", extra_body=steps)
    other = client.videos.create(prompt="a second video", size="32x32", seconds="0.25", extra_body=steps)
    assert video.status == "queued" and video.size == "32x32" and video.seconds == "1" and video.model == "tiny"
    ids = {video.id, other.id}

    deadline = time.monotonic() + 180
    while (video := client.videos.retrieve(video.id)).status != "completed":
        assert video.status in ("queued", "in_progress") and time.monotonic() < deadline, video
        time.sleep(0.1)
    assert video.progress == 100 and video.completed_at >= video.created_at
    assert video.model_extra["num_frames"] == 17 and video.model_extra["request"]["num_inference_steps"] == 2

    frames = read_mp4(client.videos.download_content(video.id).read())
    assert frames.shape == (17, 32, 32, 3)  # "1" second at the tiny preset's 16 fps: 4n+1 = 17 frames
    thumbnail = client.videos.download_content(video.id, variant="thumbnail").read()
    assert thumbnail[:8] == b"\x89PNG\r\n\x1a\n" and Image.open(io.BytesIO(thumbnail)).size == (32, 32)

    listed = [v.id for v in client.videos.list()]
    assert ids <= set(listed)
    page = client.videos.list(limit=1)
    assert len(page.data) == 1 and page.has_more
    second = client.videos.list(limit=1, after=page.data[0].id)
    assert len(second.data) == 1 and second.data[0].id != page.data[0].id
    paged = [v.id for v in client.videos.list(limit=1)]  # the SDK's auto-paging follows `after`
    assert paged == listed and len(set(paged)) == len(paged)

    # errors come back as the SDK's own exceptions, naming the field
    with pytest.raises((openai.UnprocessableEntityError, openai.BadRequestError)) as unknown:
        client.videos.create(prompt="x", model="sora-2", size="32x32")
    assert unknown.value.body["param"] == "model" and "model" in unknown.value.message
    with pytest.raises(openai.UnprocessableEntityError) as reference:
        client.videos.create(prompt="x", input_reference=("ref.png", PNG_1x1, "image/png"))
    assert reference.value.body["param"] == "input_reference"
    with pytest.raises(openai.AuthenticationError):
        sdk("wrong").videos.list()

    other = client.videos.retrieve(other.id)
    while other.status in ("queued", "in_progress"):
        assert time.monotonic() < deadline, other
        time.sleep(0.1)
        other = client.videos.retrieve(other.id)
    for job_id in ids:
        deleted = client.videos.delete(job_id)
        assert deleted.deleted is True and deleted.id == job_id
        with pytest.raises(openai.NotFoundError):
            client.videos.retrieve(job_id)
    assert not ids & {v.id for v in client.videos.list()}


def test_openapi_schema_lists_the_request_and_video_fields(app):
    schema = app.anon.get("/openapi.json").json()
    body = schema["paths"]["/v1/videos"]["post"]["requestBody"]["content"]
    for content_type in ("application/json", "multipart/form-data"):
        fields = set(body[content_type]["schema"]["properties"])
        assert {"prompt", "model", "size", "seconds", "input_reference"} <= fields, content_type
    video = set(schema["components"]["schemas"]["Video"]["properties"])
    assert {"id", "object", "model", "status", "progress", "created_at", "completed_at", "expires_at", "size",
            "seconds", "prompt", "error"} <= video


# -- 5. pagination ------------------------------------------------------------------------------------------------


def test_list_pagination(app):
    """Token B's jobs (no other test creates any): every page size and order gives each job exactly once."""
    created = [create(app.b, seed=20 + i, prompt=f"page {i}")["id"] for i in range(5)]
    try:
        def pages(order: str, limit: int) -> list[str]:
            ids, after = [], None
            for _ in range(len(created) + 2):
                params = {"order": order, "limit": limit, **({"after": after} if after else {})}
                response = app.b.get("/v1/videos", params=params)
                assert response.status_code == 200, response.text
                page = response.json()
                assert page["object"] == "list" and len(page["data"]) <= limit
                if page["data"]:
                    assert page["first_id"] == page["data"][0]["id"] and page["last_id"] == page["data"][-1]["id"]
                ids += [v["id"] for v in page["data"]]
                if not page["has_more"]:
                    return ids
                after = page["last_id"]
            raise AssertionError(f"pagination never ended: {ids}")

        for limit in (1, 2, 3, 5, 100):
            assert pages("asc", limit) == created, limit  # creation order
            assert pages("desc", limit) == created[::-1], limit  # newest first
        assert [v["id"] for v in app.b.get("/v1/videos").json()["data"]] == created[::-1]  # desc by default

        for params, param in (({"order": "sideways"}, "order"), ({"limit": 0}, "limit"), ({"limit": 101}, "limit"),
                              ({"limit": "ten"}, "limit")):
            response = app.b.get("/v1/videos", params=params)
            assert response.status_code == 422, (params, response.text)
            error = response.json()
            assert error["error"]["param"] == param and error["detail"][0]["loc"] == ["query", param], error
        unknown = app.b.get("/v1/videos", params={"after": "video_doesnotexist"})
        assert unknown.status_code == 404, unknown.text
        assert unknown.json()["error"]["param"] == "after" and unknown.json()["detail"][0]["loc"][-1] == "after"
        assert "video_doesnotexist" in unknown.json()["error"]["message"]
    finally:
        for job_id in created:
            app.b.post(f"/v1/videos/{job_id}/cancel")  # 409 once finished: fine
    for job_id in created:
        assert wait_for(app.b, job_id)["status"] in ("completed", "failed")
    assert app.anon.get("/healthz").json() == {"status": "ok"}
