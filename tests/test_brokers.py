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
from authhook.brokers.rabbitmq import mqtt_topic
from authhook.config import BrokerSettings, HttpSettings, WebhookSettings
from authhook.server import create_app

from .conftest import settings_for

TOKEN = "broker-shared-token-0123456789"
AUTH = {"x-authhook-token": TOKEN}
GOOD_SECRET = "acme-thermo-1-demo-secret"

Client = TestClient  # type: ignore[type-arg]
MakeClient = Callable[..., Any]


@pytest.fixture
async def make_client(demo: PDP) -> AsyncIterator[MakeClient]:
    clients: list[Client] = []

    async def make(**brokers: Any) -> Client:
        settings = settings_for(
            "sqlite:///unused.db",
            http=HttpSettings(max_body_bytes=4096),
            webhook=WebhookSettings(token=TOKEN),  # type: ignore[arg-type]
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
    for headers, query in (({}, ""), ({"x-authhook-token": "wrong"}, ""), ({}, "?token=wrong")):
        response = await client.post(path + query, data=b"{}", headers=headers)
        assert response.status == 401
        assert await response.json() == {"error": "unauthorized"}
    assert (await client.get("/healthz")).status == 200  # health stays open for probes


async def test_the_token_may_come_as_a_query_parameter(client: Client) -> None:
    response = await client.post(
        f"/rabbitmq/user?token={TOKEN}",
        data="username=acme-thermo-1&password=acme-thermo-1-demo-secret&vhost=%2F&client_id=c1",
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
            {"username": "acme-thermo-1", "password": GOOD_SECRET, "clientid": "sensor-42", "peerhost": "10.1.2.3"},
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
        data=f"username=acme-thermo-1&password={GOOD_SECRET}&clientid=x",
        headers={**AUTH, "content-type": "application/x-www-form-urlencoded"},
    )
    assert (await response.json())["result"] == "allow"


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (
            {
                "clientid": "sensor-42",
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
                "clientid": "sensor-42",
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
    "client_id": "boiler-1",
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
    "client_id": "boiler-1",
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
        "client_id": "dash",
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
    user = {"username": "acme-thermo-1", "password": GOOD_SECRET, "clientid": "boiler-1"}
    assert (await go_auth(client, "user", user, form))[0] == 200
    assert (await go_auth(client, "user", {**user, "password": "wrong-secret-value-1"}, form))[0] == 403
    assert (await go_auth(client, "superuser", {"username": "acme-thermo-1"}, form))[0] == 403
    assert last_event(demo)["reason"] == "not_superuser"
    acl = {"username": "acme-thermo-1", "clientid": "boiler-1", "topic": "m/acme/c/telemetry/temp", "acc": 2}
    assert (await go_auth(client, "acl", acl, form))[0] == 200
    assert (await go_auth(client, "acl", {**acl, "topic": "m/globex/c/telemetry"}, form))[0] == 403
    sub = {"username": "acme-dashboard", "clientid": "dash", "topic": "m/acme/c/telemetry/#", "acc": 4}
    assert (await go_auth(client, "acl", sub, form))[0] == 200
    read = {**sub, "topic": "m/acme/c/telemetry/temp", "acc": 1}  # delivery to the subscriber
    assert (await go_auth(client, "acl", read, form))[0] == 200
    both = {**sub, "topic": "m/acme/c/telemetry/temp", "acc": 3}  # dashboard may read, not write
    assert (await go_auth(client, "acl", both, form))[0] == 403
    assert (await go_auth(client, "acl", {**sub, "acc": 9}, form))[0] == 400


async def test_go_auth_json_and_text_modes_and_failures(make_client: MakeClient, demo: PDP) -> None:
    as_json, as_text = (
        await make_client(mosquitto_response_mode="json"),
        await make_client(mosquitto_response_mode="text"),
    )
    acl = {"username": "acme-thermo-1", "clientid": "b", "topic": "m/acme/c/telemetry", "acc": 2}
    assert await go_auth(as_json, "acl", acl) == (200, '{"ok": true, "error": ""}')
    denied = {**acl, "topic": "m/acme/c/alarms"}
    assert await go_auth(as_json, "acl", denied) == (200, '{"ok": false, "error": "not_connected"}')
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


async def test_rabbitmq_connect_path(client: Client) -> None:
    login = f"username=acme-thermo-1&password={GOOD_SECRET}&vhost=%2F&client_id=boiler-1"
    assert await rabbit(client, "user", login) == "allow"
    assert await rabbit(client, "user", login, method="GET") == "allow"
    assert await rabbit(client, "user", "username=acme-thermo-1&password=wrong-one-123&vhost=%2F") == "deny"
    assert await rabbit(client, "user", "password=x") == "deny"  # malformed: no username
    assert await rabbit(client, "vhost", "username=acme-thermo-1&vhost=%2F&ip=127.0.0.1&tags=") == "allow"
    assert await rabbit(client, "vhost", "username=ghost&vhost=%2F&ip=127.0.0.1&tags=") == "deny"


@pytest.mark.parametrize(
    ("form", "expected"),
    [
        ("resource=exchange&name=amq.topic&permission=write", "allow"),
        ("resource=queue&name=mqtt-subscription-boiler-1qos1&permission=configure", "allow"),
        ("resource=queue&name=orders&permission=read", "deny"),
        ("resource=exchange&name=amq.direct&permission=write", "deny"),
    ],
)
async def test_rabbitmq_resources_are_mqtt_plumbing_only(client: Client, form: str, expected: str) -> None:
    assert await rabbit(client, "resource", f"username=acme-thermo-1&vhost=%2F&tags=&{form}") == expected


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
    assert mqtt_topic("m.acme.c.ch.*") == "m/acme/c/ch/+"
    assert mqtt_topic("m.acme.c.ch.#") == "m/acme/c/ch/#"
    assert mqtt_topic("m.acme.c.ch.v1/2") == "m/acme/c/ch/v1.2"  # a '.' in an MQTT level travels as '/'


# -- EMQX session ACL (opt-in) ------------------------------------------------------------------------


def emqx_allows(rules: list[dict[str, Any]], action: str, topic: str) -> bool:
    """EMQX's evaluation of an authn-returned ACL: first matching rule wins; the request topic is matched
    as a name against each rule filter, so a wildcard in a subscription only matches a rule wildcard."""

    def matches(name: str, rule_filter: str) -> bool:
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
    return False


async def authn_acl(client: Client, username: str, password: str) -> list[dict[str, Any]]:
    body = {"username": username, "password": password, "clientid": "c", "peerhost": ""}
    answer = await emqx(client, "/emqx/authn", body)
    assert answer["result"] == "allow"
    rules: list[dict[str, Any]] = answer["acl"]
    return rules


async def test_emqx_acl_is_off_by_default(client: Client) -> None:
    body = {"username": "acme-thermo-1", "password": GOOD_SECRET, "clientid": "c", "peerhost": ""}
    assert "acl" not in await emqx(client, "/emqx/authn", body)


async def test_emqx_acl_lists_the_grants_deny_first_and_closes_with_deny_all(make_client: MakeClient) -> None:
    client = await make_client(emqx_return_acl=True)
    assert await authn_acl(client, "acme-gateway", "acme-gateway-demo-secret") == [
        {"permission": "allow", "action": "publish", "topics": ["m/acme/c/telemetry/#"]},
        {"permission": "allow", "action": "subscribe", "topics": ["m/acme/c/alarms/#", "m/acme/c/telemetry/#"]},
        {"permission": "deny", "action": "all", "topic": "#"},
    ]
    assert await authn_acl(client, "alice@acme.example", "alice-demo-password") == [
        {"permission": "allow", "action": "subscribe", "topic": "$SYS/#"},
        {"permission": "allow", "action": "subscribe", "topics": ["m/acme/c/+/#"]},
        {"permission": "deny", "action": "all", "topic": "#"},
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
    """What EMQX would enforce from the ACL equals authhook's answer on every channel topic, and never allows
    a filter authhook refuses (for wildcard filters EMQX's literal matching may only be stricter)."""
    from authhook import make_request

    client = await make_client(emqx_return_acl=True)
    for username, secret in SUBJECTS.items():
        rules = await authn_acl(client, username, secret)
        for action in ("publish", "subscribe"):
            for topic in EXACT:
                expected = (await demo.authorize(make_request(action, username, topic))).allowed
                assert emqx_allows(rules, action, topic) == expected, (username, action, topic)
        for topic_filter in FILTERS:
            if emqx_allows(rules, "subscribe", topic_filter):
                assert (await demo.authorize(make_request("subscribe", username, topic_filter))).allowed, (
                    username,
                    topic_filter,
                )


async def test_a_repeated_body_is_parsed_once_but_decided_every_time(client: Client, demo: PDP) -> None:
    """The translation memo must never turn into a decision cache: a revoke bites on the next identical body."""
    body = {"clientid": "s", "username": "acme-thermo-1", "topic": "m/acme/c/telemetry/t", "action": "publish"}
    assert await emqx(client, "/emqx/authz", body) == {"result": "allow"}
    assert await emqx(client, "/emqx/authz", body) == {"result": "allow"}
    assert last_event(demo)["cache"] == "hit"
    await demo.store.disconnect("acme", "acme-thermo-1", "telemetry", frozenset({"publish"}))
    assert await emqx(client, "/emqx/authz", body) == {"result": "deny", "reason": "not_connected"}
    malformed = b'{"username": "acme-thermo-1", "action": "publish"}'
    for _ in range(2):  # malformed input is refused every time, never remembered as something else
        response = await client.post("/emqx/authz", data=malformed, headers=EMQX_HEADERS)
        assert (await response.json())["reason"] == "malformed_request"
