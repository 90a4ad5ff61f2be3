"""The API keeps the promises of its own OpenAPI schema, as an independent fuzzer reads them: schemathesis runs every
check of its examples, coverage and fuzzing phases (`st run --checks all`, the stateful phase off; settings in
tests/data/schemathesis.toml) against the ingress's routes on the tiny preset, in this process (ASGI, no Ray), with
auth on. Any response the schema does not declare, a server error, a body that does not match its model, an invalid
request accepted or a valid one refused without a declared reason fails the test.

The service has no drive loop: created jobs stay queued, so the run costs no model compute.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from fastapi.testclient import TestClient

TOKEN = "tok-fuzz"
SETTINGS = Path(__file__).parent / "data" / "schemathesis.toml"


def fuzz(api) -> tuple[list[str], int]:
    """schemathesis' findings against `api` (one line each) and how many test cases it sent."""
    import schemathesis
    from schemathesis.config import SchemathesisConfig
    from schemathesis.engine import Status, events, from_schema

    config = SchemathesisConfig.from_path(SETTINGS)
    config.projects.override.update(headers={"Authorization": f"Bearer {TOKEN}"})
    schema = schemathesis.openapi.from_asgi("/openapi.json", api, config=config)
    findings, cases = [], 0
    for event in from_schema(schema).execute():
        if isinstance(event, events.ScenarioFinished):
            cases += len(event.recorder.cases)
            for checks in event.recorder.checks.values():
                findings += sorted({f"{event.recorder.label}: {check.name}: {check.failure_info.failure.title}"
                                    for check in checks if check.status is Status.FAILURE})
        elif isinstance(event, events.NonFatalError):
            findings.append(f"{event.label}: error: {event.value!r}")
        elif isinstance(event, events.FatalError):
            findings.append(f"fatal: {event.exception!r}")
    return sorted(set(findings)), cases


@pytest.fixture(scope="module")
def api(tmp_path_factory):
    from deployments.config import AppConfig
    from deployments.ingress import VideoService, make_api

    config = AppConfig.model_validate({"engine": {"preset": "tiny"},
                                       "jobs": {"data_dir": str(tmp_path_factory.mktemp("srd-fuzz"))},
                                       "auth": {"tokens": [TOKEN], "tokens_env": None}})
    return make_api(VideoService(config))


def test_schemathesis_finds_nothing(api):
    findings, cases = fuzz(api)
    assert not findings, "\n".join(findings)
    assert cases > 500  # it did test: every operation, many cases each (about 1,250 with this seed)


def test_every_error_status_has_the_error_model(api):
    """Every 4xx of every route is declared with ErrorResponse (none falls back to FastAPI's HTTPValidationError);
    every /v1 route declares 401 (auth) and 503 (Serve's proxy shedding load)."""
    schema = api.openapi()
    for path, operations in schema["paths"].items():
        for method, operation in operations.items():
            statuses = operation["responses"]
            for status, response in statuses.items():
                if status.startswith("4"):
                    assert response["content"]["application/json"]["schema"] == {
                        "$ref": "#/components/schemas/ErrorResponse"}, (method, path, status)
            if path.startswith("/v1/"):
                assert {"401", "503"} <= set(statuses), (method, path, sorted(statuses))
    assert "HTTPValidationError" not in schema["components"]["schemas"]


def test_bad_parameters_name_themselves(api):
    with TestClient(api, headers={"Authorization": f"Bearer {TOKEN}"}) as http:
        empty_after = http.get("/v1/videos", params={"after": ""})
        assert empty_after.status_code == 422, empty_after.text
        error = empty_after.json()
        assert error["error"]["param"] == "after" and error["detail"][0]["loc"] == ["query", "after"], error
        for method, path in (("GET", "/v1/videos/video_x"), ("GET", "/v1/videos/video_x/content"),
                             ("POST", "/v1/videos/video_x/cancel"), ("DELETE", "/v1/videos/video_x")):
            missing = http.request(method, path)
            assert missing.status_code == 404, (method, path, missing.text)
            error = missing.json()
            assert error["error"]["param"] == "job_id" and error["detail"][0]["loc"] == ["path", "job_id"], error
