"""Broker adapters: the exact requests each broker sends (headers, encoding, string-typed values) and the
exact answers it parses, for allow, deny, unknown client, malformed and oversized bodies, and failures."""

from __future__ import annotations

import base64
import json
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer

from authhook import PDP
from authhook.brokers.common import Malformed
from authhook.brokers.rabbitmq import mqtt_topic
from authhook.config import BrokerSettings, HttpSettings, WebhookSettings
from authhook.models import Action
from authhook.server import create_app
from authhook.store.base import Connection

from .conftest import settings_for

TOKEN = "broker-shared-token-0123456789"
AUTH = {"x-authhook-token": TOKEN}
GOOD_SECRET = "acme-thermo-1-demo-secret"

Client = TestClient  # type: ignore[type-arg]
MakeClient = Callable[..., Any]


@pytest.fixture
async def make_client(demo: PDP) -> AsyncIterator[MakeClient]:
    clients: list[Client] = []

    async def make(token: str | None = TOKEN, max_body_bytes: int = 4096, **brokers: Any) -> Client:
        settings = settings_for(
            "sqlite:///unused.db",
            http=HttpSettings(max_body_bytes=max_body_bytes),
            webhook=WebhookSettings(token=token),  # type: ignore[arg-type]
            brokers=BrokerSettings(**brokers),
        )
        client = TestClient(TestServer(create_app(demo, settings)))
        await client.start_server()
        clients.append(client)
        return client

    yield make
    for client in clients:
        await client.close()


@pytest.fixture
async def client(make_client: MakeClient) -> Client:
    made: Client = await make_client()
    return made


def last_event(pdp: PDP) -> dict[str, Any]:
    return pdp.decision_log.recent()[-1].to_dict()


# -- webhook protection -------------------------------------------------------------------------------

# No token, a wrong one, and the right one with a non-ASCII letter added (compared as text, it must not raise),
# in the header and in the query string.
WRONG_TOKENS = (
    ({}, ""),
    ({"x-authhook-token": "wrong"}, ""),
    ({}, "?token=wrong"),
    ({"x-authhook-token": TOKEN + "é"}, ""),
    ({}, f"?token={TOKEN}%C3%A9"),
)
UNAUTHORIZED = (401, {"error": "unauthorized"})
# EMQX reads any status but 200 as `ignore`, which its `no_match` (allow by default) then decides: under
# /emqx/ the edge refuses with EMQX's deny instead (tests/test_fail_closed.py holds every broker to this).
EMQX_UNAUTHORIZED = (200, {"result": "deny", "reason": "unauthorized"})


def refused_without_token(path: str) -> tuple[int, dict[str, Any]]:
    return EMQX_UNAUTHORIZED if path.startswith("/emqx/") else UNAUTHORIZED


@pytest.mark.parametrize(
    "path",
    [
        "/emqx/authn",
        "/emqx/authz",
        "/vernemq",
        "/mosquitto-go-auth/user",
        "/mosquitto-go-auth/acl",
        "/rabbitmq/user",
        "/rabbitmq/topic",
        "/v1/authorize",
    ],
)
async def test_without_the_token_a_caller_gets_401_and_learns_nothing(client: Client, path: str) -> None:
    for headers, query in WRONG_TOKENS:
        response = await client.post(path + query, data=b"{}", headers=headers)
        assert (response.status, await response.json()) == refused_without_token(path)
    assert (await client.get("/healthz")).status == 200  # health stays open for probes


@pytest.mark.parametrize("path", ["/emqx/authz", "/vernemq", "/emqx/no-such-hook", "/v1/authorize"])
async def test_a_wrong_method_or_unknown_path_under_a_broker_prefix_is_401_without_the_token(
    client: Client, path: str
) -> None:
    """Without the token nobody learns which broker paths exist or which methods they take: every wrong form
    is refused the same way on the catch-all as on the routes."""
    for headers, query in WRONG_TOKENS:
        for method in ("GET", "PUT", "DELETE", "POST"):
            response = await client.request(method, path + query, data=b"{}", headers=headers)
            assert (response.status, await response.json()) == refused_without_token(path), (method, query)


async def test_with_the_token_a_wrong_method_is_a_json_405_naming_the_allowed_ones(client: Client) -> None:
    response = await client.get("/mosquitto-go-auth/acl", headers=AUTH)
    assert response.status == 405
    assert response.headers["allow"] == "POST"
    assert await response.json() == {"error": "method_not_allowed", "message": "method not allowed"}
    missing = await client.post("/mosquitto-go-auth/no-such-hook", data=b"{}", headers=AUTH)
    assert (missing.status, (await missing.json())["error"]) == (404, "not_found")
    # under /emqx/ both are EMQX's deny: its GET method or a mistyped URL must not fall through to no_match
    for method, path, code in (("GET", "/emqx/authz", "method_not_allowed"), ("POST", "/emqx/authx", "not_found")):
        response = await client.request(method, path, data=b"{}", headers=AUTH)
        assert (response.status, await response.json()) == (200, {"result": "deny", "reason": code})
        assert "allow" not in response.headers


async def test_a_token_header_that_is_not_utf8_is_a_refusal_not_a_crash(client: Client) -> None:
    """Raw bytes on the wire (a client library would refuse to send them): aiohttp hands the handler an
    undecodable header value, which must read as a wrong token."""
    import asyncio

    assert client.server.port is not None
    reader, writer = await asyncio.open_connection("127.0.0.1", client.server.port)
    body = b'{"username":"acme-thermo-1","topic":"m/acme/c/telemetry","action":"publish"}'
    writer.write(
        b"POST /emqx/authz HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"x-authhook-token: " + TOKEN.encode() + b"\xff\xfe\r\n"
        b"Content-Length: " + str(len(body)).encode() + b"\r\nConnection: close\r\n\r\n" + body
    )
    answer = await reader.read()
    writer.close()
    status_line, _, rest = answer.partition(b"\r\n")
    assert status_line.split()[1] == b"200", answer  # EMQX's refusal: see EMQX_UNAUTHORIZED
    assert rest.endswith(b'{"result":"deny","reason":"unauthorized"}')


async def test_the_token_may_come_as_a_query_parameter(client: Client) -> None:
    response = await client.post(
        f"/rabbitmq/user?token={TOKEN}",
        data="username=acme-thermo-1&password=acme-thermo-1-demo-secret&vhost=%2F&client_id=acme-thermo-1:c1",
        headers={"content-type": "application/x-www-form-urlencoded"},
    )
    assert (response.status, await response.text()) == (200, "allow")


# -- EMQX ---------------------------------------------------------------------------------------------

EMQX_HEADERS = {**AUTH, "content-type": "application/json", "accept": "application/json", "cache-control": "no-cache"}


async def emqx(client: Client, path: str, body: dict[str, str]) -> dict[str, Any]:
    response = await client.post(path, data=json.dumps(body), headers=EMQX_HEADERS)
    assert response.status == 200
    assert response.content_type == "application/json"
    result: dict[str, Any] = await response.json()
    return result


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (
            {
                "username": "acme-thermo-1",
                "password": GOOD_SECRET,
                "clientid": "acme-thermo-1:sensor-42",
                "peerhost": "10.1.2.3",
            },
            {"result": "allow", "is_superuser": False},
        ),
        (
            {"username": "acme-thermo-1", "password": "not-the-secret-at-all", "clientid": "s", "peerhost": ""},
            {"result": "deny", "reason": "bad_credentials"},
        ),
        (
            {"username": "ghost", "password": GOOD_SECRET, "clientid": "s", "peerhost": ""},
            {"result": "deny", "reason": "unknown_subject"},
        ),
        (
            {"username": "", "password": "", "clientid": "s", "peerhost": ""},
            {"result": "deny", "reason": "bad_credentials"},
        ),
    ],
)
async def test_emqx_authn(client: Client, demo: PDP, body: dict[str, str], expected: dict[str, Any]) -> None:
    assert await emqx(client, "/emqx/authn", body) == expected
    event = last_event(demo)
    assert (event["broker"], event["hook"], event["action"]) == ("emqx", "authn", "connect")


async def test_emqx_authn_accepts_a_form_body(client: Client) -> None:
    response = await client.post(
        "/emqx/authn",
        data=f"username=acme-thermo-1&password={GOOD_SECRET}&clientid=acme-thermo-1:x",
        headers={**AUTH, "content-type": "application/x-www-form-urlencoded"},
    )
    assert (await response.json())["result"] == "allow"


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (
            {
                "clientid": "acme-thermo-1:sensor-42",
                "username": "acme-thermo-1",
                "topic": "m/acme/c/telemetry/temp",
                "action": "publish",
                "qos": "1",
                "retain": "false",
            },
            {"result": "allow"},
        ),
        (
            {
                "clientid": "acme-thermo-1:sensor-42",
                "username": "acme-thermo-1",
                "topic": "m/globex/c/telemetry",
                "action": "publish",
                "qos": "0",
                "retain": "true",
            },
            {"result": "deny", "reason": "wrong_tenant"},
        ),
        (
            {
                "clientid": "d",
                "username": "acme-dashboard",
                "topic": "$share/g/m/acme/c/telemetry/#",
                "action": "subscribe",
                "qos": "1",
                "retain": "false",
            },
            {"result": "allow"},
        ),
        (
            {"clientid": "d", "username": "acme-dashboard", "topic": "m/acme/c/telemetry/#", "access": "1"},
            {"result": "allow"},
        ),
        (
            {"clientid": "d", "username": "ghost", "topic": "m/acme/c/telemetry", "action": "publish"},
            {"result": "deny", "reason": "unknown_subject"},
        ),
        (
            {"clientid": "d", "username": "acme-thermo-1", "topic": "m/acme/c/telemetry", "action": "all"},
            {"result": "deny", "reason": "malformed_request"},
        ),
        (
            {"clientid": "d", "username": "acme-thermo-1", "topic": "", "action": "publish"},
            {"result": "deny", "reason": "malformed_request"},
        ),
        (
            {"clientid": "d", "username": "acme-#", "topic": "m/acme/c/telemetry", "action": "publish"},
            {"result": "deny", "reason": "malformed_request"},
        ),
        (
            {
                "clientid": "d",
                "username": "acme-thermo-1",
                "topic": "m/acme/c/telemetry",
                "action": "publish",
                "qos": "7",
            },
            {"result": "deny", "reason": "malformed_request"},
        ),
    ],
)
async def test_emqx_authz(client: Client, demo: PDP, body: dict[str, str], expected: dict[str, Any]) -> None:
    assert await emqx(client, "/emqx/authz", body) == expected
    assert (last_event(demo)["broker"], last_event(demo)["hook"]) == ("emqx", "authz")


@pytest.mark.parametrize("raw", [b"{not json", b"[1, 2]", b"\xff\xfe", b'{"topic": "' + b"x" * 5000 + b'"}'])
async def test_emqx_malformed_or_oversized_bodies_are_denied_not_ignored(client: Client, raw: bytes) -> None:
    for path in ("/emqx/authn", "/emqx/authz"):
        response = await client.post(path, data=raw, headers=EMQX_HEADERS)
        assert response.status == 200  # any other status would make EMQX ignore us and ask the next source
        body = await response.json()
        assert body["result"] == "deny" and body["reason"] == "malformed_request"


async def test_emqx_failures_deny_by_default_or_ignore_when_configured(make_client: MakeClient, demo: PDP) -> None:
    strict, lenient = await make_client(), await make_client(on_failure="ignore")
    await demo.store.close()
    body = {"username": "acme-thermo-1", "topic": "m/acme/c/telemetry", "action": "publish", "qos": "0"}
    assert await emqx(strict, "/emqx/authz", body) == {"result": "deny", "reason": "store_unavailable"}
    assert await emqx(lenient, "/emqx/authz", body) == {"result": "ignore", "reason": "store_unavailable"}
    assert last_event(demo)["reason"] == "store_unavailable"


# -- VerneMQ ------------------------------------------------------------------------------------------


async def vernemq(client: Client, hook: str, body: dict[str, Any]) -> tuple[dict[str, Any], str | None]:
    response = await client.post(
        "/vernemq", data=json.dumps(body), headers={**AUTH, "content-type": "application/json", "vernemq-hook": hook}
    )
    assert response.status == 200
    return await response.json(), response.headers.get("cache-control")


REGISTER = {
    "peer_addr": "127.0.0.1",
    "peer_port": 12345,
    "mountpoint": "",
    "client_id": "acme-thermo-1:boiler",
    "username": "acme-thermo-1",
    "password": GOOD_SECRET,
    "clean_session": True,
}


async def test_vernemq_register(client: Client, demo: PDP) -> None:
    assert await vernemq(client, "auth_on_register", REGISTER) == ({"result": "ok"}, None)
    wrong = {**REGISTER, "password": "a-wrong-secret-value"}
    assert (await vernemq(client, "auth_on_register", wrong))[0] == {"result": {"error": "bad_credentials"}}
    anonymous = {**REGISTER, "username": None, "password": None}
    assert (await vernemq(client, "auth_on_register", anonymous))[0] == {"result": {"error": "bad_credentials"}}
    m5 = {**{k: v for k, v in REGISTER.items() if k != "clean_session"}, "clean_start": True, "properties": {}}
    assert (await vernemq(client, "auth_on_register_m5", m5))[0] == {"result": "ok"}
    assert (last_event(demo)["broker"], last_event(demo)["hook"]) == ("vernemq", "auth_on_register_m5")


PUBLISH = {
    "username": "acme-thermo-1",
    "mountpoint": "",
    "client_id": "acme-thermo-1:boiler",
    "qos": 1,
    "topic": "m/acme/c/telemetry/temp",
    "payload": base64.b64encode(b"21.5").decode(),
    "retain": False,
}


async def test_vernemq_publish(client: Client) -> None:
    assert (await vernemq(client, "auth_on_publish", PUBLISH))[0] == {"result": "ok"}
    foreign = {**PUBLISH, "topic": "m/globex/c/telemetry"}
    assert (await vernemq(client, "auth_on_publish", foreign))[0] == {"result": {"error": "wrong_tenant"}}
    assert (await vernemq(client, "auth_on_publish_m5", {**PUBLISH, "properties": {}}))[0] == {"result": "ok"}
    ghost = {**PUBLISH, "username": "ghost"}
    assert (await vernemq(client, "auth_on_publish", ghost))[0] == {"result": {"error": "unknown_subject"}}
    bad_qos = {**PUBLISH, "qos": "1"}
    assert (await vernemq(client, "auth_on_publish", bad_qos))[0] == {"result": {"error": "malformed_request"}}


async def test_vernemq_subscribe_rejects_single_topics(client: Client, demo: PDP) -> None:
    body = {
        "username": "acme-dashboard",
        "mountpoint": "",
        "client_id": "acme-dashboard:ui",
        "topics": [{"topic": "m/acme/c/telemetry/#", "qos": 1}, {"topic": "m/globex/c/telemetry/#", "qos": 0}],
    }
    answer, cache = await vernemq(client, "auth_on_subscribe", body)
    assert answer == {
        "result": "ok",
        "topics": [{"topic": "m/acme/c/telemetry/#", "qos": 1}, {"topic": "m/globex/c/telemetry/#", "qos": 128}],
    }
    assert cache is None
    m5_topics = [
        {"topic": "m/acme/c/telemetry/#", "qos": 1, "no_local": False, "rap": False, "retain_handling": "send_retain"},
        {"topic": "#", "qos": 2, "no_local": True, "rap": True, "retain_handling": "dont_send"},
    ]
    answer, _ = await vernemq(client, "auth_on_subscribe_m5", {**body, "topics": m5_topics, "properties": {}})
    assert answer == {"result": "ok", "modifiers": {"topics": [m5_topics[0], {**m5_topics[1], "qos": 135}]}}
    only_good = {**body, "topics": body["topics"][:1]}
    assert (await vernemq(client, "auth_on_subscribe", only_good))[0] == {"result": "ok"}
    reasons = [e.to_dict()["reason"] for e in demo.decision_log.recent()[-5:]]
    assert "wrong_tenant" in reasons and "wildcard_too_broad" in reasons


async def test_vernemq_cache_header_only_when_configured_and_only_on_plain_allows(make_client: MakeClient) -> None:
    cached = await make_client(vernemq_cache_max_age_s=30)
    assert await vernemq(cached, "auth_on_publish", PUBLISH) == ({"result": "ok"}, "max-age=30")
    foreign = {**PUBLISH, "topic": "m/globex/c/telemetry"}
    assert (await vernemq(cached, "auth_on_publish", foreign))[1] is None


async def test_vernemq_hooks_it_does_not_decide_and_bad_input(client: Client) -> None:
    assert (await vernemq(client, "on_deliver", {"topic": "x"}))[0] == {"result": "next"}
    response = await client.post("/vernemq", data=b"{}", headers={**AUTH, "content-type": "application/json"})
    assert (response.status, await response.json()) == (200, {"result": {"error": "missing_hook_header"}})
    for raw in (b"{oops", b"x" * 5000):
        response = await client.post(
            "/vernemq",
            data=raw,
            headers={**AUTH, "content-type": "application/json", "vernemq-hook": "auth_on_publish"},
        )
        assert (response.status, await response.json()) == (200, {"result": {"error": "malformed_request"}})
    empty = {"username": "acme-dashboard", "topics": []}
    assert (await vernemq(client, "auth_on_subscribe", empty))[0] == {"result": {"error": "malformed_request"}}


# -- mosquitto-go-auth --------------------------------------------------------------------------------

GO_HEADERS = {**AUTH, "user-agent": "mosquitto-2.0.11"}


async def go_auth(client: Client, path: str, body: dict[str, Any], form: bool = False) -> tuple[int, str]:
    if form:
        from urllib.parse import urlencode

        data, ctype = urlencode(sorted((k, str(v)) for k, v in body.items())), "application/x-www-form-urlencoded"
    else:
        data, ctype = json.dumps(body, sort_keys=True).replace("&", "\\u0026"), "application/json"
    response = await client.post(f"/mosquitto-go-auth/{path}", data=data, headers={**GO_HEADERS, "content-type": ctype})
    return response.status, await response.text()


@pytest.mark.parametrize("form", [False, True])
async def test_go_auth_status_mode(client: Client, demo: PDP, form: bool) -> None:
    user = {"username": "acme-thermo-1", "password": GOOD_SECRET, "clientid": "acme-thermo-1:boiler"}
    assert (await go_auth(client, "user", user, form))[0] == 200
    assert (await go_auth(client, "user", {**user, "password": "wrong-secret-value-1"}, form))[0] == 403
    assert (await go_auth(client, "superuser", {"username": "acme-thermo-1"}, form))[0] == 403
    assert last_event(demo)["reason"] == "not_superuser"
    acl = {
        "username": "acme-thermo-1",
        "clientid": "acme-thermo-1:boiler",
        "topic": "m/acme/c/telemetry/temp",
        "acc": 2,
    }
    assert (await go_auth(client, "acl", acl, form))[0] == 200
    assert (await go_auth(client, "acl", {**acl, "topic": "m/globex/c/telemetry"}, form))[0] == 403
    sub = {"username": "acme-dashboard", "clientid": "acme-dashboard:ui", "topic": "m/acme/c/telemetry/#", "acc": 4}
    assert (await go_auth(client, "acl", sub, form))[0] == 200
    read = {**sub, "topic": "m/acme/c/telemetry/temp", "acc": 1}  # delivery to the subscriber
    assert (await go_auth(client, "acl", read, form))[0] == 200
    both = {**sub, "topic": "m/acme/c/telemetry/temp", "acc": 3}  # dashboard may read, not write
    assert (await go_auth(client, "acl", both, form))[0] == 403
    # ...and the other way round: the thermometer may write, not read. acc 3 needs both, whichever fails.
    assert (await go_auth(client, "acl", {**acl, "acc": 3}, form))[0] == 403
    assert (await go_auth(client, "acl", {**sub, "acc": 9}, form))[0] == 400


async def test_go_auth_json_and_text_modes_and_failures(make_client: MakeClient, demo: PDP) -> None:
    as_json, as_text = (
        await make_client(mosquitto_response_mode="json"),
        await make_client(mosquitto_response_mode="text"),
    )
    acl = {"username": "acme-thermo-1", "clientid": "b", "topic": "m/acme/c/telemetry", "acc": 2}
    assert await go_auth(as_json, "acl", acl) == (200, '{"ok": true, "error": ""}')
    denied = {**acl, "topic": "m/acme/c/alarms"}
    # a deny is a 403 in json mode too: a plugin left at `status` reads any 200 as an allow
    assert await go_auth(as_json, "acl", denied) == (403, '{"ok": false, "error": "not_connected"}')
    assert await go_auth(as_text, "acl", acl) == (200, "ok")
    assert await go_auth(as_text, "acl", denied) == (403, "not_connected")
    assert (await go_auth(as_text, "acl", {"acc": 2}))[0] == 400
    await demo.store.close()
    # a failure is an error for the plugin (not cached, retried), never a cached deny
    uncached = {**acl, "topic": "m/acme/c/telemetry/never-asked"}
    assert (await go_auth(as_json, "acl", uncached))[0] == 503
    assert (await go_auth(as_text, "acl", uncached))[0] == 503


# -- RabbitMQ -----------------------------------------------------------------------------------------

FORM = {**AUTH, "content-type": "application/x-www-form-urlencoded"}


async def rabbit(client: Client, path: str, form: str, method: str = "POST") -> str:
    if method == "GET":
        response = await client.get(f"/rabbitmq/{path}?{form}", headers=AUTH)
    else:
        response = await client.post(f"/rabbitmq/{path}", data=form, headers=FORM)
    assert response.status == 200
    body = await response.text()
    assert body in ("allow", "deny")
    return body


LOGIN = f"username=acme-thermo-1&password={GOOD_SECRET}&vhost=%2F&client_id=acme-thermo-1:boiler"


async def test_rabbitmq_connect_path(client: Client) -> None:
    assert await rabbit(client, "user", LOGIN) == "allow"
    assert await rabbit(client, "user", "username=acme-thermo-1&password=wrong-one-123&vhost=%2F") == "deny"
    assert await rabbit(client, "user", "password=x") == "deny"  # malformed: no username
    assert await rabbit(client, "vhost", "username=acme-thermo-1&vhost=%2F&ip=127.0.0.1&tags=") == "allow"
    assert await rabbit(client, "vhost", "username=ghost&vhost=%2F&ip=127.0.0.1&tags=") == "deny"


async def test_rabbitmq_get_with_the_token_in_the_url_is_refused(client: Client, make_client: MakeClient) -> None:
    """With ``http_method = get`` RabbitMQ appends ``?<query>`` to the configured path as it is, so a path that
    already holds ``?token=T`` arrives as ``?token=T?username=...``: the token no longer matches and the
    request is a 401 (RabbitMQ then refuses). That is why the docs require POST with a token in the URL."""
    response = await client.get(f"/rabbitmq/user?token={TOKEN}?{LOGIN}")
    assert (response.status, await response.json()) == (401, {"error": "unauthorized"})
    # Without a token (loopback or mutual TLS only), RabbitMQ's GET query is read like the POST form.
    open_client = await make_client(token=None)
    response = await open_client.get(f"/rabbitmq/user?{LOGIN}")
    assert (response.status, await response.text()) == (200, "allow")


PLUMBING = "username=acme-thermo-1&vhost=%2F&tags=&client_id=acme-thermo-1:boiler"


@pytest.mark.parametrize(
    ("form", "expected"),
    [
        ("resource=exchange&name=amq.topic&permission=write", "allow"),
        ("resource=exchange&name=amq.topic&permission=read", "allow"),
        ("resource=exchange&name=amq.topic&permission=configure", "deny"),  # the MQTT plugin never asks it
        ("resource=queue&name=mqtt-subscription-acme-thermo-1:boilerqos1&permission=configure", "allow"),
        ("resource=queue&name=mqtt-subscription-acme-thermo-1:boilerqos0&permission=read", "allow"),
        ("resource=queue&name=mqtt-subscription-acme-thermo-1:boilerqos0&permission=write", "allow"),
        # another client's subscription queue: read would drain it, configure delete it
        ("resource=queue&name=mqtt-subscription-victim-7qos1&permission=read", "deny"),
        ("resource=queue&name=mqtt-subscription-victim-7qos0&permission=configure", "deny"),
        ("resource=queue&name=mqtt-subscription-acme-thermo-1:boilerqos1-extra&permission=read", "deny"),
        ("resource=queue&name=mqtt-subscription-acme-thermo-1:boilerqos2&permission=read", "deny"),
        ("resource=queue&name=orders&permission=read", "deny"),
        ("resource=exchange&name=amq.direct&permission=write", "deny"),
    ],
)
async def test_rabbitmq_resources_are_the_callers_own_mqtt_plumbing_only(
    client: Client, demo: PDP, form: str, expected: str
) -> None:
    assert await rabbit(client, "resource", f"{PLUMBING}&{form}") == expected
    event = last_event(demo)
    assert (event["hook"], event["action"], event["client_id"]) == ("resource", "connect", "acme-thermo-1:boiler")
    if expected == "deny":
        assert (event["reason"], event["allowed"]) == ("malformed_request", False)


async def test_rabbitmq_subscription_queues_need_the_client_id(client: Client, demo: PDP) -> None:
    form = (
        "username=acme-thermo-1&vhost=%2F&tags=&resource=queue"
        "&name=mqtt-subscription-acme-thermo-1:boilerqos1&permission=read"
    )
    assert await rabbit(client, "resource", form) == "deny"
    assert "client_id" in last_event(demo)["detail"]
    assert await rabbit(client, "resource", form + "&client_id=acme-thermo-1:boiler") == "allow"


async def test_rabbitmq_only_the_configured_vhost(make_client: MakeClient, demo: PDP) -> None:
    default, prod = await make_client(), await make_client(rabbitmq_vhost="prod")
    vhost = "username=acme-thermo-1&ip=127.0.0.1&tags=&client_id=acme-thermo-1:boiler&vhost="
    topic = (
        "username=acme-thermo-1&resource=topic&name=amq.topic&permission=write&tags=&client_id=acme-thermo-1:boiler"
        "&routing_key=m.acme.c.telemetry.t&vhost="
    )
    resource = f"{PLUMBING.replace('vhost=%2F&', '')}&resource=exchange&name=amq.topic&permission=write&vhost="
    for path, form in (("vhost", vhost), ("resource", resource), ("topic", topic)):
        assert await rabbit(default, path, form + "%2F") == "allow", path
        assert await rabbit(default, path, form + "prod") == "deny", path
        event = last_event(demo)
        assert (event["reason"], event["hook"]) == ("outside_namespace", path)
        assert "brokers.rabbitmq_vhost" in event["detail"]
        assert await rabbit(prod, path, form + "prod") == "allow", path
        assert await rabbit(prod, path, form + "%2F") == "deny", path
        assert await rabbit(default, path, form.removesuffix("&vhost=")) == "deny", path  # no vhost at all


@pytest.mark.parametrize(
    ("user", "permission", "routing_key", "expected"),
    [
        ("acme-thermo-1", "write", "m.acme.c.telemetry.temp", "allow"),
        ("acme-thermo-1", "write", "m.globex.c.telemetry", "deny"),
        ("acme-thermo-1", "write", "m.acme.c.alarms", "deny"),
        ("acme-dashboard", "read", "m.acme.c.telemetry.#", "allow"),
        ("acme-dashboard", "read", "m.acme.c.telemetry.*.temp", "allow"),
        ("acme-dashboard", "read", "m.acme.c.*.temp", "deny"),
        ("alice@acme.example", "read", "m.acme.#", "allow"),
        ("acme-dashboard", "read", "#", "deny"),
    ],
)
async def test_rabbitmq_topic(
    client: Client, demo: PDP, user: str, permission: str, routing_key: str, expected: str
) -> None:
    from urllib.parse import quote

    form = (
        f"username={quote(user)}&vhost=%2F&resource=topic&name=amq.topic&permission={permission}&tags="
        f"&routing_key={quote(routing_key)}&variable_map.username={quote(user)}&variable_map.vhost=%2F"
        "&variable_map.client_id=c-1"
    )
    assert await rabbit(client, "topic", form) == expected
    event = last_event(demo)
    assert (event["broker"], event["hook"], event["client_id"]) == ("rabbitmq", "topic", "c-1")
    assert event["topic"] == mqtt_topic(routing_key)


def test_routing_keys_turn_back_into_mqtt_topics() -> None:
    """RabbitMQ 3.10's MQTT plugin maps '/' to '.' and '+' to '*' (and back the same way on delivery); it
    does not swap: a '.' inside an MQTT level becomes a level separator, so it is judged as one."""
    assert mqtt_topic("m.acme.c.ch.*") == "m/acme/c/ch/+"
    assert mqtt_topic("m.acme.c.ch.#") == "m/acme/c/ch/#"
    assert mqtt_topic("m.acme.c.tele.metry.#") == "m/acme/c/tele/metry/#"  # MQTT `m/acme/c/tele.metry/#`
    assert mqtt_topic(".m..x") == "/m//x"  # empty levels survive
    with pytest.raises(Malformed) as refused:
        mqtt_topic("m.acme.c.ch.v1/2")  # the plugin never sends '/': the key did not come from MQTT
    assert refused.value.reason == "invalid_topic"


async def test_rabbitmq_a_dot_in_a_level_is_judged_as_the_level_split_rabbitmq_routes_on(
    client: Client, demo: PDP
) -> None:
    """``m/acme/c/telemetry.x/t`` reaches RabbitMQ as ``m.acme.c.telemetry.x.t``, which subscribers of
    ``m/acme/c/telemetry/#`` receive: authhook judges it as that channel, not as a channel `telemetry.x`."""
    from urllib.parse import quote

    def form(user: str, permission: str, key: str) -> str:
        return (
            f"username={user}&vhost=%2F&resource=topic&name=amq.topic&permission={permission}&tags="
            f"&routing_key={quote(key)}&variable_map.client_id=c-1"
        )

    assert await rabbit(client, "topic", form("acme-thermo-1", "write", "m.acme.c.telemetry.x.t")) == "allow"
    assert last_event(demo)["topic"] == "m/acme/c/telemetry/x/t"
    assert await rabbit(client, "topic", form("acme-thermo-1", "write", "m.acme.c.telemetry/x.t")) == "deny"
    assert (last_event(demo)["reason"], last_event(demo)["action"]) == ("invalid_topic", "publish")
    assert await rabbit(client, "topic", form("acme-dashboard", "read", "m.acme.c.alarms/x.#")) == "deny"
    assert (last_event(demo)["reason"], last_event(demo)["action"]) == ("invalid_topic", "subscribe")


# -- EMQX session ACL (opt-in) ------------------------------------------------------------------------


def emqx_decides(rules: list[dict[str, Any]], action: str, topic: str) -> bool | None:
    """EMQX's evaluation of an authn-returned ACL: first matching rule wins, None when no rule matches (EMQX
    then asks its next source, authhook's `/emqx/authz`); the request topic is matched as a name against each
    rule filter, so a wildcard in a subscription only matches a rule wildcard (or an equal word)."""

    def matches(name: str, rule_filter: str) -> bool:
        if rule_filter.startswith("eq "):
            return name == rule_filter[3:]
        words, pattern = name.split("/"), rule_filter.split("/")
        if name.startswith("$") and pattern[0] in ("+", "#"):
            return False
        for index, word in enumerate(pattern):
            if word == "#":
                return True
            if index >= len(words) or (word != "+" and word != words[index]):
                return False
        return len(words) == len(pattern)

    for rule in rules:
        if rule["action"] not in (action, "all"):
            continue
        filters = rule.get("topics") or [rule["topic"]]
        if any(matches(topic, f) for f in filters):
            return bool(rule["permission"] == "allow")
    return None


async def authn_acl(client: Client, username: str, password: str) -> list[dict[str, Any]]:
    body = {"username": username, "password": password, "clientid": username, "peerhost": ""}
    answer = await emqx(client, "/emqx/authn", body)
    assert answer["result"] == "allow"
    rules: list[dict[str, Any]] = answer["acl"]
    return rules


async def test_emqx_acl_is_off_by_default(client: Client) -> None:
    body = {"username": "acme-thermo-1", "password": GOOD_SECRET, "clientid": "acme-thermo-1", "peerhost": ""}
    assert "acl" not in await emqx(client, "/emqx/authn", body)


async def test_emqx_acl_lists_the_allowed_channels_and_denies_other_publishes(make_client: MakeClient) -> None:
    """One rule topic per allowed existing channel (a tenant-wide right is listed channel by channel, never as
    `+`); `deny publish #` closes the list, and `deny subscribe #` unless the subject may subscribe tenant-wide
    (alice: her wildcard-channel filters fall through to `/emqx/authz`)."""
    client = await make_client(emqx_return_acl=True)
    assert await authn_acl(client, "acme-gateway", "acme-gateway-demo-secret") == [
        {"permission": "allow", "action": "publish", "topics": ["m/acme/c/telemetry/#"]},
        {"permission": "allow", "action": "subscribe", "topics": ["m/acme/c/alarms/#", "m/acme/c/telemetry/#"]},
        {"permission": "deny", "action": "publish", "topic": "#"},
        {"permission": "deny", "action": "subscribe", "topic": "#"},  # no tenant-wide right: nothing else
    ]
    assert await authn_acl(client, "alice@acme.example", "alice-demo-password") == [
        {"permission": "allow", "action": "subscribe", "topics": ["$SYS/#"]},
        {
            "permission": "allow",
            "action": "subscribe",
            "topics": ["m/acme/c/alarms/#", "m/acme/c/commands/#", "m/acme/c/telemetry/#"],
        },
        {"permission": "deny", "action": "publish", "topic": "#"},
    ]


SUBJECTS = {
    "acme-thermo-1": GOOD_SECRET,
    "acme-dashboard": "acme-dashboard-demo-secret",
    "acme-gateway": "acme-gateway-demo-secret",
    "alice@acme.example": "alice-demo-password",
    "globex-meter-7": "globex-meter-7-demo-secret",
}
EXACT = [f"m/{t}/c/{c}{s}" for t in ("acme", "globex") for c in ("telemetry", "commands", "alarms") for s in ("", "/x")]
FILTERS = ["m/acme/c/telemetry/#", "m/acme/c/+/temp", "m/acme/#", "#", "m/+/c/telemetry", "$SYS/#", "$SYS/a/b"]


async def test_emqx_acl_agrees_with_the_pdp(make_client: MakeClient, demo: PDP) -> None:
    """Wherever a rule of the ACL decides, EMQX's answer is authhook's, for channel topics and wildcard filters;
    what no rule decides is asked over HTTP (tests/test_emqx_acl_replay.py holds this over random worlds)."""
    from authhook import make_request

    client = await make_client(emqx_return_acl=True)
    for username, secret in SUBJECTS.items():
        rules = await authn_acl(client, username, secret)
        for action in ("publish", "subscribe"):
            for topic in EXACT:
                expected = (await demo.authorize(make_request(action, username, topic))).allowed
                assert emqx_decides(rules, action, topic) in (expected, None), (username, action, topic)
                if action == "publish" and expected:  # an allowed publish never costs a call
                    assert emqx_decides(rules, action, topic), (username, topic)
        for topic_filter in FILTERS:
            expected = (await demo.authorize(make_request("subscribe", username, topic_filter))).allowed
            assert emqx_decides(rules, "subscribe", topic_filter) in (expected, None), (username, topic_filter)


async def test_a_repeated_body_is_parsed_once_but_decided_every_time(client: Client, demo: PDP) -> None:
    """The translation memo must never turn into a decision cache: a revoke bites on the next identical body."""
    body = {"clientid": "s", "username": "acme-thermo-1", "topic": "m/acme/c/telemetry/t", "action": "publish"}
    assert await emqx(client, "/emqx/authz", body) == {"result": "allow"}
    assert await emqx(client, "/emqx/authz", body) == {"result": "allow"}
    assert last_event(demo)["cache"] == "hit"
    # The same question in other bytes is another memo entry with an equal cache key: still a hit.
    assert await emqx(client, "/emqx/authz", dict(reversed(body.items()))) == {"result": "allow"}
    assert last_event(demo)["cache"] == "hit"
    await demo.store.disconnect("acme", "acme-thermo-1", "telemetry", frozenset({"publish"}))
    assert await emqx(client, "/emqx/authz", body) == {"result": "deny", "reason": "not_connected"}
    assert await emqx(client, "/emqx/authz", dict(reversed(body.items()))) == {
        "result": "deny",
        "reason": "not_connected",
    }
    await demo.store.connect(
        Connection(tenant="acme", client="acme-thermo-1", channel="telemetry", actions=frozenset({Action.PUBLISH}))
    )
    assert await emqx(client, "/emqx/authz", body) == {"result": "allow"}
    malformed = b'{"username": "acme-thermo-1", "action": "publish"}'
    for _ in range(2):  # malformed input is refused every time, never remembered as something else
        response = await client.post("/emqx/authz", data=malformed, headers=EMQX_HEADERS)
        assert (await response.json())["reason"] == "malformed_request"


# -- every hook: unknown client, bad input -------------------------------------------------------------
#
# One table row per hook a broker calls: how to send it, and its exact deny for malformed input. Bad input
# of every kind must come back as that deny (never a 500, never an allow), logged as malformed_request.

JSON_CT = "application/json"
FORM_CT = "application/x-www-form-urlencoded"
EMQX_DENY = (200, {"result": "deny", "reason": "malformed_request"})
VERNE_DENY = (200, {"result": {"error": "malformed_request"}})
GO_DENY = (400, {"ok": False, "error": "malformed_request"})
RABBIT_DENY = (200, "deny")
HOOKS: list[tuple[str, dict[str, str], tuple[int, Any]]] = [
    ("/emqx/authn", {}, EMQX_DENY),
    ("/emqx/authz", {}, EMQX_DENY),
    *(
        ("/vernemq", {"vernemq-hook": hook}, VERNE_DENY)
        for hook in (
            "auth_on_register",
            "auth_on_register_m5",
            "auth_on_publish",
            "auth_on_publish_m5",
            "auth_on_subscribe",
            "auth_on_subscribe_m5",
        )
    ),
    ("/mosquitto-go-auth/user", {}, GO_DENY),
    ("/mosquitto-go-auth/superuser", {}, GO_DENY),
    ("/mosquitto-go-auth/acl", {}, GO_DENY),
    *((f"/rabbitmq/{path}", {}, RABBIT_DENY) for path in ("user", "vhost", "resource", "topic")),
]
HOOK_IDS = [path + (f":{headers['vernemq-hook']}" if headers else "") for path, headers, _ in HOOKS]

# Every field any hook reads, so the fault is in the JSON itself and not in a missing field.
FIELDS = (
    b'"username":"acme-thermo-1","password":"acme-thermo-1-demo-secret","clientid":"c","client_id":"c",'
    b'"vhost":"/","resource":"topic","name":"amq.topic","permission":"write","action":"publish","acc":2,'
    b'"qos":1,"retain":false,"routing_key":"m.acme.c.telemetry.t","topic":"m/acme/c/telemetry/t",'
    b'"topics":[{"topic":"m/acme/c/telemetry/t","qos":1}]'
)
BAD_JSON = {
    "deep nesting": b"[" * 3000,
    "deep nesting in a field": b"{" + FIELDS + b',"x":' + b"[" * 3000 + b"]" * 3000 + b"}",
    "huge integer": b"{" + FIELDS + b',"x":' + b"7" * 5000 + b"}",
    "lone surrogate": b"{" + FIELDS.replace(b"/telemetry/t", b"/telemetry/\\ud800") + b"}",
    "list, not an object": b"[" + b"{" + FIELDS + b"}" + b"]",
    "string, not an object": b'"acme-thermo-1"',
    "not json": b"{not json",
    "invalid utf-8": b'{"username":"\xff\xfe"}',
    "empty body": b"",
    "oversize body": b"{" + FIELDS + b',"x":"' + b"x" * 70_000 + b'"}',
}


async def post_raw(
    client: Client, path: str, raw: bytes, content_type: str, headers: dict[str, str]
) -> tuple[int, Any]:
    response = await client.post(path, data=raw, headers={**AUTH, **headers, "content-type": content_type})
    if response.content_type == "application/json":
        return response.status, await response.json()
    return response.status, await response.text()


@pytest.mark.parametrize("bad", list(BAD_JSON), ids=list(BAD_JSON))
@pytest.mark.parametrize(("path", "headers", "deny"), HOOKS, ids=HOOK_IDS)
async def test_bad_json_is_each_brokers_deny(
    make_client: MakeClient, demo: PDP, path: str, headers: dict[str, str], deny: tuple[int, Any], bad: str
) -> None:
    client = await make_client(max_body_bytes=64 * 1024)  # the default limit: room for a 5000-digit number
    before = len(demo.decision_log.recent())
    assert await post_raw(client, path, BAD_JSON[bad], JSON_CT, headers) == deny
    assert len(demo.decision_log.recent()) == before + 1
    event = last_event(demo)
    assert (event["allowed"], event["reason"]) == (False, "malformed_request")


BAD_FORMS = {
    "unparsable form": b"username=acme-thermo-1&&=&%%%",
    "invalid utf-8": b"username=\xff\xfe&password=x",
    "empty body": b"",
    "oversize body": b"username=acme-thermo-1&password=" + b"x" * 5000,
}
FORM_HOOKS = [hook for hook in HOOKS if hook[0].startswith(("/rabbitmq/", "/mosquitto-go-auth/", "/emqx/"))]


# An empty form is a well-formed request with no fields: where no field is required it gets the hook's
# ordinary deny for "no credentials" rather than malformed_request.
EMPTY_FORM_ANSWERS: dict[str, tuple[tuple[int, Any], str]] = {
    "/emqx/authn": ((200, {"result": "deny", "reason": "bad_credentials"}), "bad_credentials"),
    "/mosquitto-go-auth/user": ((403, ""), "bad_credentials"),
    "/mosquitto-go-auth/superuser": ((403, ""), "not_superuser"),
}


@pytest.mark.parametrize("bad", list(BAD_FORMS), ids=list(BAD_FORMS))
@pytest.mark.parametrize(("path", "headers", "deny"), FORM_HOOKS, ids=[path for path, _, _ in FORM_HOOKS])
async def test_bad_forms_are_each_brokers_deny(
    client: Client, demo: PDP, path: str, headers: dict[str, str], deny: tuple[int, Any], bad: str
) -> None:
    expected, reason = (deny, "malformed_request")
    if bad == "empty body" and path in EMPTY_FORM_ANSWERS:
        expected, reason = EMPTY_FORM_ANSWERS[path]
    assert await post_raw(client, path, BAD_FORMS[bad], FORM_CT, headers) == expected
    assert (last_event(demo)["allowed"], last_event(demo)["reason"]) == (False, reason)


async def test_rabbitmq_get_with_an_oversized_or_bad_query_is_a_deny(make_client: MakeClient) -> None:
    open_client = await make_client(token=None)
    for path in ("user", "vhost", "resource", "topic"):
        response = await open_client.get(f"/rabbitmq/{path}?username=acme-thermo-1&%%%=&=")
        assert (response.status, await response.text()) == (200, "deny")
        response = await open_client.get(f"/rabbitmq/{path}?username=" + "x" * 9000)
        assert 400 <= response.status < 500  # aiohttp refuses an over-long request line before any handler


def topic_form(user: str, permission: str = "write", key: str = "m.acme.c.telemetry.t") -> str:
    return (
        f"username={user}&vhost=%2F&resource=topic&name=amq.topic&permission={permission}&tags="
        f"&routing_key={key}&variable_map.client_id=c-1&variable_map.username={user}&variable_map.vhost=%2F"
    )


async def test_unknown_clients_are_denied_by_every_hook(client: Client, demo: PDP) -> None:
    """Exact answers for a username the store does not know, on every hook that asks about a subject."""
    ghost = {"username": "ghost", "password": GOOD_SECRET, "clientid": "g", "client_id": "g", "peerhost": ""}
    publish = {**PUBLISH, "username": "ghost"}
    subscribe = {"username": "ghost", "mountpoint": "", "client_id": "g", "topics": [{"topic": "m/acme/#", "qos": 1}]}
    m5_topic = {"topic": "m/acme/#", "qos": 1, "no_local": False, "rap": False, "retain_handling": "send_retain"}
    go_acl = {"username": "ghost", "clientid": "g", "topic": "m/acme/c/telemetry", "acc": 2}
    cases: list[tuple[Any, Any]] = [
        (emqx(client, "/emqx/authn", ghost), {"result": "deny", "reason": "unknown_subject"}),
        (
            emqx(client, "/emqx/authz", {**ghost, "topic": "m/acme/c/telemetry", "action": "subscribe"}),
            {"result": "deny", "reason": "unknown_subject"},
        ),
        (
            vernemq(client, "auth_on_register", {**REGISTER, "username": "ghost"}),
            ({"result": {"error": "unknown_subject"}}, None),
        ),
        (vernemq(client, "auth_on_publish", publish), ({"result": {"error": "unknown_subject"}}, None)),
        (
            vernemq(client, "auth_on_subscribe", subscribe),
            ({"result": "ok", "topics": [{"topic": "m/acme/#", "qos": 128}]}, None),
        ),
        (
            vernemq(client, "auth_on_subscribe_m5", {**subscribe, "topics": [m5_topic], "properties": {}}),
            ({"result": "ok", "modifiers": {"topics": [{**m5_topic, "qos": 135}]}}, None),
        ),
        (go_auth(client, "user", {"username": "ghost", "password": GOOD_SECRET, "clientid": "g"}), (403, "")),
        (go_auth(client, "acl", go_acl), (403, "")),
        (go_auth(client, "acl", {**go_acl, "acc": 4, "topic": "m/acme/#"}), (403, "")),
        (rabbit(client, "user", f"username=ghost&password={GOOD_SECRET}&vhost=%2F&client_id=g"), "deny"),
        (rabbit(client, "vhost", "username=ghost&vhost=%2F&ip=127.0.0.1&tags=&client_id=g"), "deny"),
        (
            rabbit(
                client,
                "resource",
                "username=ghost&vhost=%2F&tags=&client_id=g&resource=queue"
                "&name=mqtt-subscription-gqos1&permission=read",
            ),
            "deny",
        ),
        (rabbit(client, "topic", topic_form("ghost")), "deny"),
        (rabbit(client, "topic", topic_form("ghost", "read", "m.acme.%23")), "deny"),
    ]
    for number, (call, expected) in enumerate(cases):
        assert await call == expected, number
        event = last_event(demo)
        assert (event["allowed"], event["reason"], event["username"]) == (False, "unknown_subject", "ghost"), number


async def test_go_auth_superuser_is_always_a_deny(client: Client, demo: PDP) -> None:
    """Kept for operators who still set http_superuser_uri: authhook has no superusers."""
    for username in ("acme-thermo-1", "ghost"):
        assert await go_auth(client, "superuser", {"username": username}) == (403, "")
        assert (last_event(demo)["reason"], last_event(demo)["username"]) == ("not_superuser", username)


async def test_vernemq_a_subscription_entry_too_deep_to_echo_is_a_deny(client: Client, demo: PDP) -> None:
    """orjson reads 1024 levels but writes 254: an entry between the two must not turn into a 500."""
    deep: Any = 0
    for _ in range(400):
        deep = [deep]
    topics = [{"topic": "m/acme/c/telemetry/#", "qos": 1, "x": deep}, {"topic": "m/globex/c/telemetry/#", "qos": 0}]
    body = {"username": "acme-dashboard", "mountpoint": "", "client_id": "acme-dashboard:ui", "topics": topics}
    response = await client.post(
        "/vernemq",
        data=json.dumps(body),
        headers={**AUTH, "content-type": JSON_CT, "vernemq-hook": "auth_on_subscribe"},
    )
    assert (response.status, await response.json()) == VERNE_DENY
    assert (last_event(demo)["reason"], last_event(demo)["action"]) == ("malformed_request", "subscribe")


# -- a malformed request is logged under the action it asked about ------------------------------------


async def test_malformed_subscribes_are_logged_as_subscribes(client: Client, demo: PDP) -> None:
    emqx_sub = {"username": "acme-dashboard", "topic": "m/acme/c/telemetry/#", "action": "subscribe", "qos": "7"}
    assert await emqx(client, "/emqx/authz", emqx_sub) == {"result": "deny", "reason": "malformed_request"}
    assert last_event(demo)["action"] == "subscribe"
    assert await emqx(client, "/emqx/authz", {"username": "a", "topic": "", "access": "1"}) == EMQX_DENY[1]
    assert last_event(demo)["action"] == "subscribe"
    assert await emqx(client, "/emqx/authz", {"username": "a", "topic": "t", "action": "all"}) == EMQX_DENY[1]
    assert last_event(demo)["action"] == "publish"  # the action itself is unreadable: filed as a publish
    assert await rabbit(client, "topic", topic_form("acme-dashboard", "read").replace("amq.topic", "other")) == "deny"
    assert last_event(demo)["action"] == "subscribe"
    assert await rabbit(client, "topic", topic_form("acme-dashboard", "read").replace("routing_key=", "x=")) == "deny"
    assert last_event(demo)["action"] == "subscribe"
    go_sub = {"username": "acme-#", "clientid": "d", "topic": "m/acme/c/telemetry/#", "acc": 4}
    assert (await go_auth(client, "acl", go_sub))[0] == 400
    assert last_event(demo)["action"] == "subscribe"


# -- EMQX session ACL expiry ---------------------------------------------------------------------------


async def test_emqx_acl_carries_expire_at(make_client: MakeClient, monkeypatch: pytest.MonkeyPatch) -> None:
    from authhook.brokers import emqx as emqx_adapter

    monkeypatch.setattr(emqx_adapter, "wall_clock", lambda: 1_767_225_600.75)
    body = {
        "username": "acme-gateway",
        "password": "acme-gateway-demo-secret",
        "clientid": "acme-gateway",
        "peerhost": "",
    }
    default, short = await make_client(emqx_return_acl=True), await make_client(emqx_return_acl=True, emqx_acl_ttl_s=30)
    rules = [
        {"permission": "allow", "action": "publish", "topics": ["m/acme/c/telemetry/#"]},
        {"permission": "allow", "action": "subscribe", "topics": ["m/acme/c/alarms/#", "m/acme/c/telemetry/#"]},
        {"permission": "deny", "action": "publish", "topic": "#"},
        {"permission": "deny", "action": "subscribe", "topic": "#"},
    ]
    answer = await emqx(default, "/emqx/authn", body)
    assert answer == {"result": "allow", "is_superuser": False, "expire_at": 1_767_225_900, "acl": rules}
    assert isinstance(answer["expire_at"], int)  # EMQX fails authentication on a non-integer
    assert (await emqx(short, "/emqx/authn", body))["expire_at"] == 1_767_225_630
    # no ACL, no expiry: without the option (or on a deny) EMQX asks per request and nothing needs expiring
    plain = await make_client()
    assert await emqx(plain, "/emqx/authn", body) == {"result": "allow", "is_superuser": False}
    denied = await emqx(default, "/emqx/authn", {**body, "password": "not-the-gateway-secret"})
    assert denied == {"result": "deny", "reason": "bad_credentials"}


def test_broker_settings_defaults_and_bounds() -> None:
    from pydantic import ValidationError

    defaults = BrokerSettings()
    assert (defaults.rabbitmq_vhost, defaults.emqx_acl_ttl_s) == ("/", 300)
    for bad in ({"emqx_acl_ttl_s": 0}, {"emqx_acl_ttl_s": 10**10}, {"rabbitmq_vhost": ""}):
        with pytest.raises(ValidationError):
            BrokerSettings(**bad)  # type: ignore[arg-type]


async def test_the_translation_memo_keys_on_the_content_type_too(client: Client) -> None:
    """The same bytes sent as a form and as JSON are two different requests, whichever comes first."""
    raw = "username=acme-thermo-1&clientid=s&topic=m%2Facme%2Fc%2Ftelemetry%2Ft&action=publish"
    for _ in range(2):
        for content_type, expected in ((FORM_CT, {"result": "allow"}), (JSON_CT, EMQX_DENY[1])):
            response = await client.post("/emqx/authz", data=raw, headers={**AUTH, "content-type": content_type})
            assert await response.json() == expected
