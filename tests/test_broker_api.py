"""The session closers against their brokers' management APIs.

Most tests run against the stand-in APIs of ``fake_broker_apis`` (real sockets on 127.0.0.1): what each
closer asks for (paths, encoding, headers, paging), what it makes of every answer (success, gone, refused,
5xx then success, silence) and that no secret leaks into a log line or a result. The last test closes real
MQTT connections on a private RabbitMQ 3.10 node (skipped where RabbitMQ cannot run, failed in CI).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import os
import re
import secrets
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.request
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from pydantic import SecretStr

from authhook.config import BrokerApiCredentials, EmqxApiSettings, RevocationSettings, VernemqApiSettings
from authhook.errors import ConfigError
from authhook.sessions.broker_api import (
    CloseResult,
    EmqxCloser,
    RabbitmqCloser,
    SessionCloser,
    VernemqCloser,
    build_closers,
)
from tests.fake_broker_apis import FakeEmqx, FakeRabbitmq, FakeSession, FakeVernemq

KEY = "authhook-key"
SECRET = "s3cret-Zq8v-never-shown"
RMQ_USER = "authhook-admin"


def _emqx(fake: FakeEmqx, *, secret: str = SECRET, **kwargs: Any) -> EmqxCloser:
    settings = EmqxApiSettings(url=fake.url, username=KEY, secret=SecretStr(secret), **kwargs)
    return EmqxCloser(settings, attempts=3, timeout_s=2.0, backoff_s=0)


def _vernemq(fake: FakeVernemq, *, key: str = SECRET, **kwargs: Any) -> VernemqCloser:
    settings = VernemqApiSettings(url=fake.url, secret=SecretStr(key), **kwargs)
    return VernemqCloser(settings, attempts=3, timeout_s=2.0, backoff_s=0)


def _rabbitmq(fake: FakeRabbitmq, *, secret: str = SECRET) -> RabbitmqCloser:
    settings = BrokerApiCredentials(url=fake.url, username=RMQ_USER, secret=SecretStr(secret))
    return RabbitmqCloser(settings, attempts=3, timeout_s=2.0, backoff_s=0)


@contextlib.asynccontextmanager
async def closing(closer: SessionCloser) -> AsyncIterator[SessionCloser]:
    try:
        yield closer
    finally:
        await closer.aclose()


def by_target(results: list[CloseResult]) -> dict[str, CloseResult]:
    return {r.target: r for r in results}


# ---------------------------------------------------------------------------------------------------------
# EMQX
# ---------------------------------------------------------------------------------------------------------


async def test_emqx_kicks_every_client_of_the_user_and_the_known_ids() -> None:
    async with FakeEmqx(KEY, SECRET) as fake:
        fake.clients.update({"dev1-a": "dev1", "mosq/x y": "dev1", "dev2-a": "dev2", "dev1-by-id": "other"})
        async with closing(_emqx(fake)) as closer:
            results = await closer.close_sessions("dev1", ["dev1-by-id", "dev1-gone"], reason="revoked")

    assert sorted(fake.kicked) == ["dev1-a", "dev1-by-id", "mosq/x y"]
    assert fake.clients == {"dev2-a": "dev2"}
    assert all(r.ok and r.broker == "emqx" for r in results)
    found = by_target(results)
    assert found["dev1-gone"].detail == "client `dev1-gone`: not connected"
    assert found["mosq/x y"].detail == "client `mosq/x y`: kicked"
    # The listing asked for the user, 100 a page; the client id went out as one escaped path segment.
    listing = fake.calls_to("GET", "/api/v5/clients")
    assert [c.query for c in listing] == ["username=dev1&limit=100&page=1"]
    assert "/api/v5/clients/mosq%2Fx%20y" in [c.raw_path for c in fake.calls_to("DELETE", "/api/v5/clients/")]


async def test_emqx_resets_both_node_caches_before_touching_a_client() -> None:
    async with FakeEmqx(KEY, SECRET) as fake:
        fake.clients["dev1-a"] = "dev1"
        async with closing(_emqx(fake)) as closer:
            results = await closer.close_sessions("dev1", [], reason="revoked")

    assert fake.resets == ["authorization", "authentication"]
    order = [(c.method, c.path) for c in fake.calls]
    assert order.index(("POST", "/api/v5/authentication/node_cache/reset")) < order.index(
        ("DELETE", "/api/v5/clients/dev1-a")
    )
    assert by_target(results)["authorization node cache"] == CloseResult(
        "emqx", "authorization node cache", True, "reset the authorization node cache"
    )


async def test_emqx_follows_hasnext_through_every_page() -> None:
    async with FakeEmqx(KEY, SECRET) as fake:
        fake.clients.update({f"dev1-{i:03d}": "dev1" for i in range(230)})
        async with closing(_emqx(fake)) as closer:
            results = await closer.close_sessions("dev1", [], reason="revoked")

    assert [c.query for c in fake.calls_to("GET", "/api/v5/clients")] == [
        f"username=dev1&limit=100&page={page}" for page in (1, 2, 3)
    ]
    assert len(fake.kicked) == 230 and not fake.clients
    assert sum(r.ok for r in results) == 232  # 230 kicks and the two cache resets


async def test_emqx_clean_cache_drains_instead_of_kicking() -> None:
    async with FakeEmqx(KEY, SECRET) as fake:
        fake.clients.update({"dev1-a": "dev1", "dev1-b": "dev1"})
        async with closing(_emqx(fake, action="clean_cache")) as closer:
            results = await closer.close_sessions("dev1", ["dev1-gone"], reason="revoked")

    assert fake.kicked == [] and sorted(fake.drained) == ["dev1-a", "dev1-b"]
    assert set(fake.clients) == {"dev1-a", "dev1-b"}  # still connected, only refreshed
    assert by_target(results)["dev1-a"].detail == "client `dev1-a`: drained its authorization cache"
    assert by_target(results)["dev1-gone"].ok  # 404 CLIENTID_NOT_FOUND: nothing left to refresh
    assert [c.raw_path for c in fake.calls_to("DELETE", "/api/v5/clients/dev1-a")] == [
        "/api/v5/clients/dev1-a/authorization/cache"
    ]


async def test_emqx_clean_cache_still_kicks_when_the_acl_was_pushed_at_connect() -> None:
    async with FakeEmqx(KEY, SECRET) as fake:
        fake.clients["dev1-a"] = "dev1"
        async with closing(_emqx(fake, action="clean_cache")) as closer:
            await closer.close_sessions("dev1", [], reason="revoked", must_close=True)

    assert fake.kicked == ["dev1-a"] and fake.drained == []


async def test_emqx_without_node_caches_is_fine() -> None:
    async with FakeEmqx(KEY, SECRET, node_cache=False) as fake, closing(_emqx(fake)) as closer:
        results = await closer.close_sessions("dev1", [], reason="revoked")

    assert results == [
        CloseResult(
            "emqx", "authorization node cache", True, "no authorization node cache on this EMQX (before 6.2 / e5.9)"
        ),
        CloseResult(
            "emqx", "authentication node cache", True, "no authentication node cache on this EMQX (before 6.2 / e5.9)"
        ),
    ]


async def test_emqx_wrong_secret_fails_every_call_with_the_brokers_reason() -> None:
    async with FakeEmqx(KEY, SECRET) as fake:
        fake.clients["dev1-a"] = "dev1"
        async with closing(_emqx(fake, secret="wrong")) as closer:
            results = await closer.close_sessions("dev1", ["dev1-a"], reason="revoked")

    assert results and not any(r.ok for r in results)
    assert by_target(results)["dev1-a"].detail == (
        "client `dev1-a`: HTTP 401 BAD_API_KEY_OR_SECRET: Check api_key/api_secret (check the credentials)"
    )
    assert by_target(results)["dev1"].detail.startswith("listing the user's clients: HTTP 401")
    assert fake.clients == {"dev1-a": "dev1"}
    assert len(fake.calls) == 4  # a 4xx is an answer: no second try


async def test_emqx_retries_5xx_then_succeeds() -> None:
    async with FakeEmqx(KEY, SECRET) as fake:
        fake.clients["dev1-a"] = "dev1"
        fake.failures = [503, 500]
        async with closing(_emqx(fake)) as closer:
            results = await closer.close_sessions("dev1", [], reason="revoked")

    assert all(r.ok for r in results)
    assert len(fake.calls_to("POST", "/api/v5/authorization/node_cache/reset")) == 3
    assert fake.kicked == ["dev1-a"]


async def test_emqx_gives_up_after_the_last_5xx() -> None:
    async with FakeEmqx(KEY, SECRET) as fake:
        fake.failures = [503, 503, 503]
        async with closing(_emqx(fake)) as closer:
            results = await closer.close_sessions("dev1", [], reason="revoked")

    assert results[0] == CloseResult(
        "emqx",
        "authorization node cache",
        False,
        "resetting the authorization node cache: HTTP 503 SERVICE_UNAVAILABLE: injected",
    )
    assert results[1].ok


# ---------------------------------------------------------------------------------------------------------
# VerneMQ
# ---------------------------------------------------------------------------------------------------------


async def test_vernemq_disconnects_found_and_known_sessions_after_clearing_the_cache() -> None:
    sessions = {
        "dev1-a": FakeSession("dev1"),
        "mosq/qJ pv": FakeSession("dev1", mountpoint="mp1"),
        "dev1-off": FakeSession("dev1", is_online=False),
        "dev2-a": FakeSession("dev2"),
    }
    async with FakeVernemq(SECRET, sessions=sessions) as fake, closing(_vernemq(fake)) as closer:
        results = await closer.close_sessions("dev1", ["dev1-known"], reason="revoked")

    assert all(r.ok for r in results), results
    assert fake.cache_clears == 1
    assert [c.path for c in fake.calls][:2] == ["/api/v1/webhooks/cache/clear", "/api/v1/session/show"]
    assert fake.calls[1].query == "--user=dev1&--client_id&--mountpoint&--is_online&--limit=1000"
    assert sorted(fake.disconnected) == [
        ("dev1-a", "", False),
        ("dev1-known", "", False),
        ("dev1-off", "", False),
        ("mosq/qJ pv", "mp1", False),
    ]
    assert "client-id=mosq%2FqJ%20pv&--mountpoint=mp1" in [c.query for c in fake.calls]
    assert by_target(results)["dev1-a"].detail == "client `dev1-a`: disconnect done (was online)"
    assert by_target(results)["dev1-known"].detail == "client `dev1-known`: disconnect done (not listed)"
    assert sessions["dev2-a"].is_online and not sessions["dev1-a"].is_online


async def test_vernemq_cleanup_flag_drops_stored_state() -> None:
    sessions = {"dev1-a": FakeSession("dev1")}
    async with FakeVernemq(SECRET, sessions=sessions) as fake, closing(_vernemq(fake, cleanup=True)) as closer:
        results = await closer.close_sessions("dev1", [], reason="revoked")

    assert "client-id=dev1-a&--cleanup" in [c.query for c in fake.calls]
    assert sessions == {}
    assert by_target(results)["dev1-a"].detail == "client `dev1-a`: disconnect done (was online, stored state dropped)"


async def test_vernemq_clears_the_cache_on_every_node_and_disconnects_once() -> None:
    sessions = {"dev1-a": FakeSession("dev1")}
    async with FakeVernemq(SECRET, sessions=sessions) as one, FakeVernemq(SECRET, sessions=sessions) as two:
        settings = VernemqApiSettings(url=one.url, secret=SecretStr(SECRET), node_urls=(one.url, two.url))
        async with closing(VernemqCloser(settings, backoff_s=0)) as closer:
            results = await closer.close_sessions("dev1", [], reason="revoked")

    assert (one.cache_clears, two.cache_clears) == (1, 1)
    assert one.disconnected == [("dev1-a", "", False)] and two.disconnected == []
    assert sum(r.target.startswith("webhook cache 127.0.0.1:") and r.ok for r in results) == 2


async def test_vernemq_without_cache_clear_reports_it_and_still_disconnects() -> None:
    sessions = {"dev1-a": FakeSession("dev1")}
    async with FakeVernemq(SECRET, sessions=sessions, cache_clear=False) as fake, closing(_vernemq(fake)) as closer:
        results = await closer.close_sessions("dev1", [], reason="revoked")

    assert not results[0].ok and "no `webhooks cache clear` here" in results[0].detail
    assert fake.disconnected == [("dev1-a", "", False)] and results[-1].ok


async def test_vernemq_wrong_key_is_refused_everywhere() -> None:
    sessions = {"dev1-a": FakeSession("dev1")}
    async with FakeVernemq(SECRET, sessions=sessions) as fake, closing(_vernemq(fake, key="wrong-key")) as closer:
        results = await closer.close_sessions("dev1", ["dev1-a"], reason="revoked")

    assert not any(r.ok for r in results)
    assert by_target(results)["dev1-a"].detail == "client `dev1-a`: HTTP 401 (check the credentials)"
    assert fake.disconnected == []


async def test_vernemq_accepts_the_key_from_username_with_an_empty_password() -> None:
    async with FakeVernemq(KEY, sessions={"dev1-a": FakeSession("dev1")}) as fake:
        settings = VernemqApiSettings(url=fake.url, username=KEY)
        async with closing(VernemqCloser(settings, backoff_s=0)) as closer:
            results = await closer.close_sessions("dev1", [], reason="revoked")
    assert all(r.ok for r in results) and fake.disconnected == [("dev1-a", "", False)]


async def test_vernemq_never_sends_a_value_that_would_change_its_query() -> None:
    async with FakeVernemq(SECRET) as fake, closing(_vernemq(fake)) as closer:
        results = await closer.close_sessions('dev"1', ['x" OR client_id != "y'], reason="revoked")

    assert [c.path for c in fake.calls] == ["/api/v1/webhooks/cache/clear"]
    assert [r.ok for r in results] == [True, False, False]


async def test_vernemq_alert_answer_is_a_failure() -> None:
    class Alerting(FakeVernemq):
        def _disconnect(self, args: list[tuple[str, str | bool]]) -> web.Response:
            body = '[{"type":"alert","alert":[{"type":"text","text":"Invalid mountpoint value"}]}]'
            return web.Response(text=body, content_type="application/json")

    async with Alerting(SECRET) as fake, closing(_vernemq(fake)) as closer:
        results = await closer.close_sessions("dev1", ["dev1-a"], reason="revoked")

    assert by_target(results)["dev1-a"] == CloseResult(
        "vernemq", "dev1-a", False, "client `dev1-a`: vernemq said: Invalid mountpoint value"
    )


async def test_vernemq_silent_server_times_out_per_call() -> None:
    async with FakeVernemq(SECRET) as fake:
        fake.stall = True
        settings = VernemqApiSettings(url=fake.url, secret=SecretStr(SECRET))
        async with closing(VernemqCloser(settings, attempts=2, timeout_s=0.2, backoff_s=0)) as closer:
            started = time.monotonic()
            results = await closer.close_sessions("dev1", [], reason="revoked")
            elapsed = time.monotonic() - started

    assert [r.detail for r in results] == [
        f"clearing the webhook cache 127.0.0.1:{fake.url.rsplit(':', 1)[1]}: no answer within 0.2 s (2 tries)",
        "listing the user's sessions: no answer within 0.2 s (2 tries)",
    ]
    assert len(fake.calls) == 4 and elapsed < 3


# ---------------------------------------------------------------------------------------------------------
# RabbitMQ
# ---------------------------------------------------------------------------------------------------------


async def test_rabbitmq_310_closes_every_connection_of_the_user() -> None:
    async with FakeRabbitmq(RMQ_USER, SECRET) as fake:
        a = fake.connect("dev1", "dev1-a")
        b = fake.connect("dev1", "dev1-b")
        other = fake.connect("dev2", "dev2-a")
        fresh = fake.connect("dev1", "dev1-c", visible=False)  # CONNACKed, not in the stats yet
        async with closing(_rabbitmq(fake)) as closer:
            results = await closer.close_sessions("dev1", ["dev1-a"], reason="authhook revoke: publish m/ä\r\n")

    assert set(fake.connections) == {other}
    assert all(r.ok for r in results)
    assert [r.target for r in results] == [a, b, "dev1"]
    assert results[-1].detail == "closed every connection of user `dev1` (by user name)"
    assert {name for name, _ in fake.closed} == {a, b, fresh}
    assert {reason for _, reason in fake.closed} == {"authhook revoke: publish m/???"}
    listing = fake.calls_to("GET", "/api/connections")[0]
    assert listing.query == "page=1&page_size=500&columns=name,user,client_properties"
    deletes = [c.raw_path for c in fake.calls_to("DELETE", "/api/connections/")]
    assert deletes[0] == "/api/connections/127.0.0.1%3A50001%20-%3E%20127.0.0.1%3A1883"
    assert deletes[-1] == "/api/connections/username/dev1"


async def test_rabbitmq_matches_a_userless_connection_by_client_id_on_312() -> None:
    async with FakeRabbitmq(RMQ_USER, SECRET, version="3.12") as fake:
        known = fake.connect(None, "dev1-a")
        stranger = fake.connect(None, "dev9-a")
        async with closing(_rabbitmq(fake)) as closer:
            results = await closer.close_sessions("dev1", ["dev1-a"], reason="revoked")

    assert set(fake.connections) == {stranger}
    assert by_target(results)[known].detail == f"connection `{known}`: closed"


async def test_rabbitmq_connection_that_left_meanwhile_is_fine() -> None:
    async with FakeRabbitmq(RMQ_USER, SECRET) as fake:
        name = fake.connect("dev1", "dev1-a")
        fake.leave_after_listing.add(name)
        async with closing(_rabbitmq(fake)) as closer:
            results = await closer.close_sessions("dev1", [], reason="revoked")

    assert results[0] == CloseResult("rabbitmq", name, True, f"connection `{name}`: already closed")


async def test_rabbitmq_without_close_by_user_name_says_what_may_stay_open() -> None:
    async with FakeRabbitmq(RMQ_USER, SECRET, by_username=False) as fake:
        fake.connect("dev1", "dev1-a")
        hidden = fake.connect("dev1", "dev1-b", visible=False)
        async with closing(_rabbitmq(fake)) as closer:
            results = await closer.close_sessions("dev1", [], reason="revoked")

    assert results[0].ok and not results[-1].ok
    assert "no close-by-user-name endpoint" in results[-1].detail
    assert set(fake.connections) == {hidden}


async def test_rabbitmq_pages_through_a_long_listing() -> None:
    async with FakeRabbitmq(RMQ_USER, SECRET) as fake:
        for i in range(1100):
            fake.connect("dev1" if i % 2 else "dev2", f"c{i}")
        async with closing(_rabbitmq(fake)) as closer:
            results = await closer.close_sessions("dev1", [], reason="revoked")

    assert [c.query.split("&")[0] for c in fake.calls_to("GET", "/api/connections")] == ["page=1", "page=2", "page=3"]
    assert len(results) == 551 and all(r.ok for r in results)
    assert {c.user for c in fake.connections.values()} == {"dev2"}


async def test_rabbitmq_wrong_password_and_retried_5xx() -> None:
    async with FakeRabbitmq(RMQ_USER, SECRET) as fake:
        fake.connect("dev1", "dev1-a")
        async with closing(_rabbitmq(fake, secret="wrong")) as closer:
            refused = await closer.close_sessions("dev1", [], reason="revoked")
        fake.failures = [500, 503]
        async with closing(_rabbitmq(fake)) as closer:
            retried = await closer.close_sessions("dev1", [], reason="revoked")

    assert [r.detail for r in refused] == [
        "listing connections: HTTP 401 not_authorized: Login failed (check the credentials)",
        "closing every connection of user `dev1`: HTTP 401 not_authorized: Login failed (check the credentials)",
    ]
    assert all(r.ok for r in retried) and len(retried) == 2 and not fake.connections


# ---------------------------------------------------------------------------------------------------------
# Shared: secrets, transport, factory, lifecycle
# ---------------------------------------------------------------------------------------------------------


async def test_no_secret_in_any_log_record_or_detail(caplog: pytest.LogCaptureFixture) -> None:
    """Refusals, retries, timeouts and a broker that echoes the credentials back: the secret shows nowhere."""

    def echo(status: int, request: web.Request) -> web.Response:
        header = request.headers.get("Authorization", "")
        decoded = base64.b64decode(header.split(" ", 1)[1]).decode() if " " in header else ""
        return web.json_response({"code": "ECHO", "message": f"you sent {header} = {decoded}"}, status=status)

    caplog.set_level(logging.DEBUG)
    results: list[CloseResult] = []
    async with FakeEmqx(KEY, SECRET) as emqx, FakeVernemq(SECRET) as vmq, FakeRabbitmq(RMQ_USER, SECRET) as rmq:
        emqx.clients["dev1-a"] = "dev1"
        vmq.sessions["dev1-a"] = FakeSession("dev1")
        rmq.connect("dev1", "dev1-a")
        for fake in (emqx, vmq, rmq):
            fake.failures = [503, 500]  # retried, logged
        async with closing(_emqx(emqx)) as c1, closing(_vernemq(vmq)) as c2, closing(_rabbitmq(rmq)) as c3:
            for closer in (c1, c2, c3):
                results += await closer.close_sessions("dev1", ["dev1-a"], reason="revoked")
        for fake in (emqx, vmq, rmq):
            fake.failure = echo  # type: ignore[method-assign]
            fake.failures = [500] * 20
        async with closing(_emqx(emqx)) as c1, closing(_vernemq(vmq)) as c2, closing(_rabbitmq(rmq)) as c3:
            for closer in (c1, c2, c3):
                results += await closer.close_sessions("dev1", ["dev1-b"], reason="revoked")

    assert any("ECHO: you sent Basic" in r.detail for r in results)  # the echo did reach the details
    assert any("trying again" in record.getMessage() for record in caplog.records)
    encoded = {base64.b64encode(f"{u}:{SECRET}".encode()).decode() for u in (KEY, RMQ_USER)}
    encoded.add(base64.b64encode(f"{SECRET}:".encode()).decode())
    texts = [r.detail for r in results] + [record.getMessage() for record in caplog.records]
    for text in texts:
        assert SECRET not in text
        assert not any(e in text for e in encoded), text


async def test_unreachable_broker_is_reported_after_every_try() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # closed again before the call: nothing listens there
    settings = EmqxApiSettings(url=f"http://127.0.0.1:{port}", username=KEY, secret=SecretStr(SECRET))
    async with closing(EmqxCloser(settings, attempts=2, backoff_s=0)) as closer:
        results = await closer.close_sessions("dev1", [], reason="revoked")
    assert results[0].detail == f"resetting the authorization node cache: cannot connect to 127.0.0.1:{port} (2 tries)"
    assert not any(r.ok for r in results)


def test_build_closers_makes_one_per_configured_broker() -> None:
    assert build_closers(RevocationSettings()) == []
    settings = RevocationSettings(
        attempts=2,
        timeout_s=0.5,
        rabbitmq=BrokerApiCredentials(url="http://127.0.0.1:15672", username="admin", secret=SecretStr("x")),
        emqx=EmqxApiSettings(url="http://127.0.0.1:18083/", username="key", secret=SecretStr("y")),
        vernemq=VernemqApiSettings(url="http://127.0.0.1:8888", secret=SecretStr("z")),
    )
    closers = build_closers(settings)
    assert [type(c) for c in closers] == [EmqxCloser, VernemqCloser, RabbitmqCloser]
    assert [c.broker for c in closers] == ["emqx", "vernemq", "rabbitmq"]


@pytest.mark.parametrize(
    ("url", "why"),
    [("http://admin:pw@127.0.0.1:15672", "must not hold credentials"), ("ftp://127.0.0.1", "http(s) url")],
)
def test_refuses_a_url_with_credentials_or_not_http(url: str, why: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(why)) as info:
        RabbitmqCloser(BrokerApiCredentials(url=url, username="admin", secret=SecretStr("x")))
    assert "pw" not in str(info.value)


def test_refuses_missing_credentials() -> None:
    with pytest.raises(ConfigError, match="API key"):
        VernemqCloser(VernemqApiSettings(url="http://127.0.0.1:8888"))
    with pytest.raises(ConfigError, match="username"):
        EmqxCloser(EmqxApiSettings(url="http://127.0.0.1:18083", secret=SecretStr("y")))


async def test_secret_file_is_read_and_the_session_is_reopened_after_aclose(tmp_path: Path) -> None:
    secret_file = tmp_path / "emqx.secret"
    secret_file.write_text(SECRET + "\n")
    async with FakeEmqx(KEY, SECRET) as fake:
        fake.clients["dev1-a"] = "dev1"
        closer = EmqxCloser(EmqxApiSettings(url=fake.url, username=KEY, secret_file=secret_file), backoff_s=0)
        first = await closer.close_sessions("dev1", [], reason="revoked")
        await closer.aclose()
        await closer.aclose()  # twice is fine
        fake.clients["dev1-b"] = "dev1"
        second = await closer.close_sessions("dev1", [], reason="revoked")
        await closer.aclose()
    assert all(r.ok for r in first + second) and fake.kicked == ["dev1-a", "dev1-b"]


# ---------------------------------------------------------------------------------------------------------
# A real RabbitMQ 3.10 node
# ---------------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _management_node() -> Iterator[tuple[Any, int, str]]:
    """A private node with internal users, MQTT and the management plugin: (node, management port, admin pw)."""
    from tests import test_e2e_rabbitmq as e2e

    e2e.require_prerequisites(e2e._skip_reason(), os.environ)
    base = Path(tempfile.mkdtemp(prefix="authhook-closer-rmq-"))
    try:
        amqp_port, mqtt_port, dist_port, mgmt_port = e2e._free_ports(4)
        name = f"authhook-closer-{secrets.token_hex(4)}@localhost"
        data, log_dir = base / "data", base / "log"
        data.mkdir()
        log_dir.mkdir()
        (base / "rabbitmq.conf").write_text(
            "auth_backends.1 = internal\n"
            f"listeners.tcp.default = 127.0.0.1:{amqp_port}\n"
            f"mqtt.listeners.tcp.default = 127.0.0.1:{mqtt_port}\n"
            "mqtt.allow_anonymous = false\n"
            "loopback_users = none\n"
            f"management.tcp.port = {mgmt_port}\n"
            "management.tcp.ip = 127.0.0.1\n"
        )
        (base / "enabled_plugins").write_text("[rabbitmq_mqtt,rabbitmq_management].\n")
        pid_file = data / "node.pid"
        env = {k: v for k, v in os.environ.items() if not k.startswith(("RABBITMQ_", "ERL_"))}
        env.update(
            RABBITMQ_NODENAME=name,
            RABBITMQ_NODE_PORT=str(amqp_port),
            RABBITMQ_DIST_PORT=str(dist_port),
            RABBITMQ_CONFIG_FILE=str(base / "rabbitmq"),
            RABBITMQ_ENABLED_PLUGINS_FILE=str(base / "enabled_plugins"),
            RABBITMQ_MNESIA_BASE=str(data / "mnesia"),
            RABBITMQ_LOG_BASE=str(log_dir),
            RABBITMQ_FEATURE_FLAGS_FILE=str(data / "feature_flags"),
            RABBITMQ_PID_FILE=str(pid_file),
        )
        e2e._chown_tree(base, "rabbitmq")
        node = e2e.RabbitNode(name, mqtt_port, amqp_port, dist_port, log_dir, env)
        with (
            (base / "server.out").open("wb") as out,
            subprocess.Popen(
                [str(e2e.RABBITMQ_SERVER)],
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            ) as proc,
        ):
            try:
                deadline = time.monotonic() + e2e.NODE_START_TIMEOUT_S
                e2e._wait_for_tcp(mqtt_port, proc, deadline, base / "server.out")
                e2e._wait_for_tcp(mgmt_port, proc, deadline, base / "server.out")
                password = secrets.token_urlsafe(16)
                for args in (
                    ("add_user", RMQ_USER, password),
                    ("set_user_tags", RMQ_USER, "administrator"),
                    *(
                        step
                        for user in ("dev1", "dev2")
                        for step in (("add_user", user, f"{user}-pw"), ("set_permissions", user, ".*", ".*", ".*"))
                    ),
                ):
                    done = node.ctl(*args)
                    assert done.returncode == 0, done.stderr
                yield node, mgmt_port, password
            finally:
                e2e._stop_node(node, proc, pid_file)
    finally:
        shutil.rmtree(base, ignore_errors=True)


def _listed_client_ids(mgmt_port: int, password: str) -> list[str]:
    """The MQTT client ids RabbitMQ's management API lists right now (a blocking call, for a thread)."""
    request = urllib.request.Request(f"http://127.0.0.1:{mgmt_port}/api/connections?columns=client_properties")
    token = base64.b64encode(f"{RMQ_USER}:{password}".encode()).decode()
    request.add_header("Authorization", f"Basic {token}")
    with urllib.request.urlopen(request, timeout=5) as answer:
        listing = json.loads(answer.read())  # the last of 3.10's two `client_properties` keys is the real one
    return [c["client_properties"].get("client_id") for c in listing]


async def test_rabbitmq_closer_closes_real_mqtt_connections_on_310() -> None:
    from tests import test_e2e_rabbitmq as e2e

    with _management_node() as (node, mgmt_port, password), contextlib.ExitStack() as stack:

        def connect(user: str, client_id: str) -> Any:
            device = e2e.Device(node.mqtt_port, user, f"{user}-pw", client_id).start()
            stack.callback(device.stop)
            return device

        dev1_a, dev2_a = connect("dev1", "dev1-a"), connect("dev2", "dev2-a")
        deadline = time.monotonic() + 15
        while "dev1-a" not in await asyncio.to_thread(_listed_client_ids, mgmt_port, password):
            assert time.monotonic() < deadline, "dev1-a never showed in the management api"
            await asyncio.sleep(0.2)
        dev1_b = connect("dev1", "dev1-b")  # just CONNACKed: not listed yet, the sweep must close it
        settings = BrokerApiCredentials(
            url=f"http://127.0.0.1:{mgmt_port}", username=RMQ_USER, secret=SecretStr(password)
        )
        async with closing(RabbitmqCloser(settings, timeout_s=5.0)) as closer:
            results = await closer.close_sessions("dev1", [], reason="authhook revoke: test")
        assert all(r.ok for r in results), (results, node.logs())
        by_name = [r for r in results if " -> 127.0.0.1:" in r.target]
        assert by_name and all(r.detail.endswith(": closed") for r in by_name), results  # found by the listing
        assert results[-1] == CloseResult(
            "rabbitmq", "dev1", True, "closed every connection of user `dev1` (by user name)"
        )
        assert dev1_a.disconnected.wait(e2e.WAIT_S) and dev1_b.disconnected.wait(e2e.WAIT_S), node.logs()
        assert not dev2_a.disconnected.wait(e2e.QUIET_S)
        assert "authhook revoke: test" in node.logs()
