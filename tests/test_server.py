"""The HTTP server: health, readiness, and bad input answered with a clear 4xx, never a 500 or an allow."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from aiohttp.test_utils import TestClient, TestServer

from authhook import PDP
from authhook.config import HttpSettings
from authhook.server import create_app

from .conftest import settings_for


@pytest.fixture
async def client(demo: PDP, db_path: object) -> AsyncIterator[TestClient]:  # type: ignore[type-arg]
    from pathlib import Path

    settings = settings_for(Path(str(db_path)), http=HttpSettings(max_body_bytes=2048))
    async with TestClient(TestServer(create_app(demo, settings))) as test_client:
        yield test_client


async def test_health_and_readiness(client: TestClient, demo: PDP) -> None:  # type: ignore[type-arg]
    assert (await client.get("/healthz")).status == 200
    ready = await client.get("/readyz")
    assert ready.status == 200
    assert (await ready.json())["status"] == "ready"
    await demo.store.close()
    down = await client.get("/readyz")
    assert down.status == 503
    assert (await down.json()) == {"status": "unavailable", "reason": "store_unavailable"}


async def test_authorize_answers_the_decision(client: TestClient) -> None:  # type: ignore[type-arg]
    body = {"subject": {"username": "acme-thermo-1"}, "action": "publish", "topic": "m/acme/c/telemetry"}
    response = await client.post("/v1/authorize", json=body)
    assert response.status == 200
    decision = await response.json()
    assert (decision["allowed"], decision["reason"]) == (True, "connected")
    body["subject"] = {"username": "unknown-device"}
    denied = await (await client.post("/v1/authorize", json=body)).json()
    assert (denied["allowed"], denied["reason"]) == (False, "unknown_subject")
    recent = await (await client.get("/v1/decisions?limit=1")).json()
    assert recent[0]["subject"] == "unknown-device" and recent[0]["broker"] == "api"


@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        (b"{not json", 400, "malformed_body"),
        (b"\xff\xfe", 400, "malformed_body"),
        (b'{"subject": {}, "action": "fly"}', 400, "invalid_request"),
        (
            b'{"subject": {"username": "dev#"}, "action": "publish", "topic": "m/a/c/b"}',
            400,
            "invalid_request",
        ),
        (b'{"subject": {"username": "d"}, "action": "publish", "qos": 7}', 400, "invalid_request"),
        (b'["a list"]', 400, "invalid_request"),
        (b"x" * 4096, 413, "body_too_large"),
        (b"[" * 1500, 400, "malformed_body"),
        (b'{"subject": {"username": "d"}, "action": "publish", "qos": ' + b"9" * 1500 + b"}", 400, "malformed_body"),
        (b'{"subject": {"username": "d\\ud800"}, "action": "publish"}', 400, "malformed_body"),
        (b"", 400, "malformed_body"),
    ],
)
async def test_bad_input_gets_a_clear_4xx(client: TestClient, body: bytes, status: int, code: str) -> None:  # type: ignore[type-arg]
    response = await client.post("/v1/authorize", data=body, headers={"content-type": "application/json"})
    assert response.status == status
    payload = await response.json()
    assert payload["error"] == code
    assert "Traceback" not in payload["message"]
    assert "allowed" not in payload


async def test_unknown_paths_are_404_json(client: TestClient) -> None:  # type: ignore[type-arg]
    response = await client.get("/nope")
    assert response.status == 404
    assert (await response.json())["error"] == "not_found"


async def test_a_handler_that_crashes_answers_a_json_500_without_a_traceback(
    client: TestClient,  # type: ignore[type-arg]
    demo: PDP,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    def explode(*args: object, **kwargs: object) -> None:
        raise RuntimeError("boom: secret internals")

    monkeypatch.setattr(demo.decision_log, "recent", explode)
    response = await client.get("/v1/decisions")
    assert response.status == 500
    assert await response.json() == {"error": "internal_error", "message": "internal error"}
    assert "boom" in caplog.text  # the operator's log has it; the caller does not


async def test_head_and_wrong_methods_on_open_paths(client: TestClient) -> None:  # type: ignore[type-arg]
    assert (await client.head("/healthz")).status == 200
    response = await client.post("/healthz", data=b"")
    assert response.status == 405
    assert (await response.json())["error"] == "method_not_allowed"


def test_the_server_collects_the_young_generation_less_often_and_zero_leaves_python_alone() -> None:
    import gc

    from authhook.server.app import tune_garbage_collector

    before = gc.get_threshold()
    try:
        tune_garbage_collector(HttpSettings(gc_young_threshold=12_345))
        assert gc.get_threshold() == (12_345, *before[1:])
        gc.set_threshold(*before)
        tune_garbage_collector(HttpSettings(gc_young_threshold=0))
        assert gc.get_threshold() == before
    finally:
        gc.set_threshold(*before)
