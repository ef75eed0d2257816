"""Fail closed: every deny and every refusal, read the way each broker reads it, in every one of its modes.

An answer is only a deny if the broker reads it as one. Each broker's reading rule is written out below as a
small function (from its source and from what a real broker did: /work/shared/spec/brokers.md and
mosquitto-go-auth-observed.md), and every answer authhook gives for a deny, a malformed request, a store
failure, a wrong token, an unknown path or method, an oversized body or a crashed handler is put through it:

- mosquitto-go-auth: ``http_response_mode`` status, json or text, configured on its side independently of
  authhook's ``brokers.mosquitto_response_mode``; every pair of the two is tried.
- EMQX: anything but a 200 (or 204) is ``ignore``, and ``ignore`` falls through to ``no_match``, which is
  ``allow`` by default in EMQX 5; so only a 200 ``deny`` counts.
- VerneMQ: a 200 JSON answer decides; anything else is an error, which refuses.
- RabbitMQ: a 200/201 ``allow``/``deny`` decides; anything else is an error, which refuses.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any, Literal
from urllib.parse import parse_qsl, urlencode

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from authhook import PDP
from authhook.config import BrokerSettings, HttpSettings, WebhookSettings
from authhook.server import create_app
from authhook.server.edge import MalformedBody

from .conftest import settings_for

TOKEN = "fail-closed-token-0123456789"
GO_MODES = ("status", "json", "text")
Reading = Literal["allow", "deny", "error", "ignore", "next"]
Client = TestClient  # type: ignore[type-arg]


@dataclass(frozen=True)
class Answer:
    status: int
    content_type: str | None
    body: bytes


# -- how each broker reads an answer ---------------------------------------------------------------------


def go_auth_reads(answer: Answer, mode: str) -> Reading:
    """mosquitto-go-auth 3.0, HTTP backend: a 5xx is an error; any other non-2xx a deny; a 2xx allows in
    ``status`` mode whatever the body, in ``json`` mode when ``ok`` is true (an unparsable body is an
    error), in ``text`` mode when the body is exactly ``ok``."""
    if answer.status >= 500:
        return "error"
    if not 200 <= answer.status < 300:
        return "deny"
    if mode == "status":
        return "allow"
    if mode == "json":
        try:
            body = json.loads(answer.body)
        except ValueError:
            return "error"
        if not isinstance(body, dict) or not isinstance(body.get("ok", False), bool):
            return "error"
        return "allow" if body.get("ok") else "deny"
    return "allow" if answer.body == b"ok" else "deny"


def emqx_reads(answer: Answer) -> Reading:
    """EMQX 5 HTTP authn and authz: 204 allows; a 200 JSON (the default when no content type is given) or
    form body decides by ``result``; every other status, body or ``result`` is ``ignore``."""
    if answer.status == 204:
        return "allow"
    if answer.status != 200:
        return "ignore"
    body: Any
    if answer.content_type in (None, "application/json"):
        try:
            body = json.loads(answer.body)
        except ValueError:
            return "ignore"
    elif answer.content_type == "application/x-www-form-urlencoded":
        body = dict(parse_qsl(answer.body.decode()))
    else:
        return "ignore"
    result = body.get("result") if isinstance(body, dict) else None
    return result if result in ("allow", "deny") else "ignore"


def vernemq_reads(answer: Answer, hook: str) -> Reading:
    """vmq_webhooks: anything but a 200 JSON object with a known ``result`` is an error (the client, publish
    or subscription is refused). ``ok`` allows, except that a subscription answer rejects each topic given
    back with QoS 128 (v3, top-level ``topics``) or 135 (m5, ``modifiers.topics``); ``{"error": ...}``
    refuses; ``next`` asks the next plugin."""
    if answer.status != 200:
        return "error"
    try:
        body = json.loads(answer.body)
    except ValueError:
        return "error"
    result = body.get("result") if isinstance(body, dict) else None
    if result == "next":
        return "next"
    if isinstance(result, dict) and isinstance(result.get("error"), str):
        return "deny"
    if result != "ok":
        return "error"
    if hook.startswith("auth_on_subscribe"):
        topics = body.get("modifiers", {}).get("topics") if hook.endswith("_m5") else body.get("topics")
        if topics is not None and all(t["qos"] not in (0, 1, 2) for t in topics):
            return "deny"  # our requests carry one topic each: all of them rejected is the deny
    return "allow"


def rabbitmq_reads(answer: Answer) -> Reading:
    """rabbitmq_auth_backend_http: a 200/201 body, trimmed of spaces and lower-cased, of ``allow`` (with tags
    on /user) or ``deny`` decides; anything else is an error, which refuses (a login goes on to the next
    ``auth_backends`` entry, as it does after a deny)."""
    if answer.status not in (200, 201):
        return "error"
    word = answer.body.decode(errors="replace").strip(" ").lower()
    if word == "deny":
        return "deny"
    if word == "allow" or word.startswith("allow "):
        return "allow"
    return "error"


# -- what is asked ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Call:
    """One broker callback: where it goes and how it is sent, and how that broker reads the answer."""

    broker: str
    path: str
    body: bytes
    content_type: str
    headers: tuple[tuple[str, str], ...] = ()

    def reads(self, answer: Answer, go_mode: str) -> Reading:
        if self.broker == "mosquitto-go-auth":
            return go_auth_reads(answer, go_mode)
        if self.broker == "emqx":
            return emqx_reads(answer)
        if self.broker == "vernemq":
            return vernemq_reads(answer, dict(self.headers)["vernemq-hook"])
        return rabbitmq_reads(answer)


SECRET = "acme-thermo-1-demo-secret"
OWN_ID = "acme-thermo-1:fc"  # a client id the connecting subject owns under any client-id policy
FOREIGN = "m/globex/c/telemetry"


def as_json(body: dict[str, Any]) -> bytes:
    return json.dumps(body, sort_keys=True).encode()


def emqx(hook: str, **fields: str) -> Call:
    base = {"username": "acme-thermo-1", "clientid": OWN_ID, "peerhost": "127.0.0.1"}
    return Call("emqx", f"/emqx/{hook}", as_json({**base, **fields}), "application/json")


def vernemq(hook: str, **fields: Any) -> Call:
    base = {"username": "acme-thermo-1", "client_id": OWN_ID, "mountpoint": "", "peer_addr": "127.0.0.1"}
    headers = (("vernemq-hook", hook),)
    return Call("vernemq", "/vernemq", as_json({**base, **fields}), "application/json", headers)


def go_auth(hook: str, form: bool = False, **fields: Any) -> Call:
    body = {"username": "acme-thermo-1", "clientid": OWN_ID, **fields}
    if form:
        encoded = urlencode(sorted((k, str(v)) for k, v in body.items())).encode()
        return Call("mosquitto-go-auth", f"/mosquitto-go-auth/{hook}", encoded, "application/x-www-form-urlencoded")
    return Call("mosquitto-go-auth", f"/mosquitto-go-auth/{hook}", as_json(body), "application/json")


def rabbitmq(hook: str, **fields: str) -> Call:
    body = urlencode({"username": "acme-thermo-1", "client_id": OWN_ID, "vhost": "/", **fields}).encode()
    return Call("rabbitmq", f"/rabbitmq/{hook}", body, "application/x-www-form-urlencoded")


def rabbit_topic(permission: str, key: str) -> Call:
    return rabbitmq("topic", resource="topic", name="amq.topic", permission=permission, routing_key=key)


m5_entry = {"topic": FOREIGN, "qos": 1, "no_local": False, "rap": False, "retain_handling": "send_retain"}

# Callbacks whose answer is a deny (wrong secret, unknown subject, another tenant's topic, no superuser).
DENIED: dict[str, Call] = {
    "emqx authn wrong secret": emqx("authn", password="not-the-secret-at-all"),
    "emqx authn unknown subject": emqx("authn", username="ghost", password=SECRET),
    "emqx authz foreign publish": emqx("authz", topic=FOREIGN, action="publish", qos="1", retain="false"),
    "emqx authz foreign subscribe": emqx("authz", topic=FOREIGN + "/#", action="subscribe", qos="1"),
    "vernemq register wrong secret": vernemq("auth_on_register", password="wrong-secret", clean_session=True),
    "vernemq register_m5 wrong secret": vernemq("auth_on_register_m5", password="wrong", clean_start=True),
    "vernemq publish foreign": vernemq("auth_on_publish", topic=FOREIGN, qos=1, retain=False, payload=""),
    "vernemq publish_m5 foreign": vernemq("auth_on_publish_m5", topic=FOREIGN, qos=1, retain=False, payload=""),
    "vernemq subscribe foreign": vernemq("auth_on_subscribe", topics=[{"topic": FOREIGN, "qos": 1}]),
    "vernemq subscribe_m5 foreign": vernemq("auth_on_subscribe_m5", topics=[m5_entry], properties={}),
    "go-auth user wrong secret": go_auth("user", password="not-the-secret-at-all"),
    "go-auth user wrong secret, form": go_auth("user", form=True, password="not-the-secret-at-all"),
    "go-auth user unknown subject": go_auth("user", username="ghost", password=SECRET),
    "go-auth superuser": go_auth("superuser"),
    "go-auth acl publish foreign": go_auth("acl", topic=FOREIGN, acc=2),
    "go-auth acl subscribe foreign": go_auth("acl", topic=FOREIGN + "/#", acc=4),
    "go-auth acl subscribe foreign, form": go_auth("acl", form=True, topic=FOREIGN + "/#", acc=4),
    "go-auth acl delivery foreign": go_auth("acl", topic=FOREIGN, acc=1),
    "go-auth acl read+write half allowed": go_auth("acl", topic="m/acme/c/telemetry", acc=3),
    "rabbitmq user wrong secret": rabbitmq("user", password="not-the-secret-at-all"),
    "rabbitmq vhost other": rabbitmq("vhost", vhost="other"),
    "rabbitmq resource foreign queue": rabbitmq(
        "resource", resource="queue", name="mqtt-subscription-globex-meter-7qos1", permission="read"
    ),
    "rabbitmq topic publish foreign": rabbit_topic("write", "m.globex.c.telemetry"),
    "rabbitmq topic subscribe foreign": rabbit_topic("read", "m.globex.c.telemetry.#"),
}

# The same hooks, asked something that is allowed: the reading rules are not "always deny".
ALLOWED: dict[str, Call] = {
    "emqx authn": emqx("authn", password=SECRET),
    "emqx authz": emqx("authz", topic="m/acme/c/telemetry", action="publish", qos="1", retain="false"),
    "vernemq register": vernemq("auth_on_register", password=SECRET, clean_session=True),
    "vernemq subscribe": vernemq("auth_on_subscribe", topics=[{"topic": "m/acme/c/commands", "qos": 1}]),
    "go-auth user": go_auth("user", password=SECRET),
    "go-auth acl publish": go_auth("acl", topic="m/acme/c/telemetry", acc=2),
    "go-auth acl subscribe, form": go_auth("acl", form=True, topic="m/acme/c/commands/#", acc=4),
    "rabbitmq user": rabbitmq("user", password=SECRET),
    "rabbitmq topic publish": rabbit_topic("write", "m.acme.c.telemetry"),
}

# One callback per route authhook mounts for a broker: for refusals that do not depend on what is asked.
ROUTES: dict[str, Call] = {
    "emqx authn": DENIED["emqx authn wrong secret"],
    "emqx authz": DENIED["emqx authz foreign publish"],
    **{f"vernemq {call.headers[0][1]}": call for name, call in DENIED.items() if name.startswith("vernemq")},
    "go-auth user": DENIED["go-auth user wrong secret"],
    "go-auth superuser": DENIED["go-auth superuser"],
    "go-auth acl": DENIED["go-auth acl publish foreign"],
    "rabbitmq user": DENIED["rabbitmq user wrong secret"],
    "rabbitmq vhost": rabbitmq("vhost"),
    "rabbitmq resource": rabbitmq("resource", resource="exchange", name="amq.topic", permission="write"),
    "rabbitmq topic": DENIED["rabbitmq topic publish foreign"],
}
BROKER_PREFIXES = {"emqx": "/emqx/", "vernemq": "/vernemq/", "mosquitto-go-auth": "/mosquitto-go-auth/"}
BROKER_PREFIXES["rabbitmq"] = "/rabbitmq/"


# -- harness ---------------------------------------------------------------------------------------------

MakeClient = Callable[..., Any]


@pytest.fixture
async def make_client(sqlite_demo: PDP) -> AsyncIterator[MakeClient]:
    clients: list[Client] = []

    async def make(authhook_mode: str = "status", **brokers: Any) -> Client:
        settings = settings_for(
            "sqlite:///unused.db",
            http=HttpSettings(max_body_bytes=4096),
            webhook=WebhookSettings(token=TOKEN),  # type: ignore[arg-type]
            brokers=BrokerSettings(mosquitto_response_mode=authhook_mode, **brokers),
        )
        client = TestClient(TestServer(create_app(sqlite_demo, settings)))
        await client.start_server()
        clients.append(client)
        return client

    yield make
    for client in clients:
        await client.close()


async def ask(
    client: Client, call: Call, *, token: str | None = TOKEN, method: str = "POST", path: str | None = None
) -> Answer:
    headers = {"content-type": call.content_type, **dict(call.headers)}
    if token is not None:
        headers["x-authhook-token"] = token
    response = await client.request(method, path or call.path, data=call.body, headers=headers)
    content_type = response.headers.get("content-type")
    return Answer(response.status, content_type.split(";")[0] if content_type else None, await response.read())


def modes_of(call: Call) -> tuple[str, ...]:
    """The broker's own reading modes to try: go-auth's three response modes; one for the others."""
    return GO_MODES if call.broker == "mosquitto-go-auth" else ("-",)


def assert_refused(call: Call, answer: Answer, *, exactly: Reading = "deny", also: tuple[Reading, ...] = ()) -> None:
    for mode in modes_of(call):
        reading = call.reads(answer, mode)
        assert reading in (exactly, *also), (call.path, call.headers, mode, answer, reading)


# -- the tests -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("authhook_mode", GO_MODES)
async def test_every_deny_is_read_as_a_deny_by_every_broker_in_every_mode(
    make_client: MakeClient, authhook_mode: str
) -> None:
    """Whatever authhook's go-auth response mode and whatever the plugin's own: a deny is a deny."""
    client = await make_client(authhook_mode)
    for name, call in DENIED.items():
        answer = await ask(client, call)
        assert answer.status < 500, (name, answer)
        assert_refused(call, answer)


@pytest.mark.parametrize("on_failure", ["deny", "ignore"])
async def test_malformed_requests_are_read_as_a_deny(make_client: MakeClient, on_failure: str) -> None:
    """Unreadable input is a deny, never an error or ``ignore``, even where failures may be ignored."""
    for authhook_mode in GO_MODES:
        client = await make_client(authhook_mode, on_failure=on_failure)
        for call in ROUTES.values():
            unreadable = Call(call.broker, call.path, b"{not json", "application/json", call.headers)
            assert_refused(call, await ask(client, unreadable))


@pytest.mark.parametrize("authhook_mode", GO_MODES)
async def test_allows_read_as_allows_only_where_the_two_modes_agree(
    make_client: MakeClient, authhook_mode: str
) -> None:
    """The other side of the rules: an allow is an allow to every broker, and to a go-auth plugin whose
    mode is authhook's or ``status``. Any other mismatch breaks allows (fails closed), never denies."""
    client = await make_client(authhook_mode)
    for name, call in ALLOWED.items():
        answer = await ask(client, call)
        for mode in modes_of(call):
            reading = call.reads(answer, mode)
            if call.broker != "mosquitto-go-auth" or mode in (authhook_mode, "status"):
                assert reading == "allow", (name, mode, answer)
            else:
                assert reading in ("deny", "error"), (name, mode, answer)


async def test_store_failures_are_refusals_and_errors_where_the_broker_has_them(
    make_client: MakeClient, sqlite_demo: PDP
) -> None:
    """With ``on_failure: deny`` (the default) a failure refuses everywhere: go-auth gets an error (5xx: not
    cached, retried, refused) in every mode, the others a deny."""
    clients = [await make_client(mode) for mode in GO_MODES]
    await sqlite_demo.store.close()
    for client in clients:
        for name, call in {**ALLOWED, **DENIED}.items():
            if name.startswith("go-auth superuser"):
                continue  # answered without the store: always the plain deny
            answer = await ask(client, call)
            if call.broker == "mosquitto-go-auth":
                assert_refused(call, answer, exactly="error")
            else:
                assert_refused(call, answer)


async def test_with_on_failure_ignore_only_failures_are_passed_on(make_client: MakeClient, sqlite_demo: PDP) -> None:
    """``brokers.on_failure: ignore`` is the operator's explicit choice to let EMQX and VerneMQ ask someone
    else when the store is down. It never turns a deny into anything else."""
    client = await make_client(on_failure="ignore")
    for call in DENIED.values():
        assert_refused(call, await ask(client, call))
    await sqlite_demo.store.close()
    for name, call in ALLOWED.items():
        reading = call.reads(await ask(client, call), "status")
        expected = {"emqx": "ignore", "vernemq": "next", "mosquitto-go-auth": "error", "rabbitmq": "deny"}
        assert reading == expected[call.broker], (name, reading)


@pytest.mark.parametrize("token", [None, "wrong-token", TOKEN + "x"])
async def test_a_missing_or_wrong_token_is_read_as_a_refusal(make_client: MakeClient, token: str | None) -> None:
    """The edge's 401, or under /emqx/ a 200 deny: EMQX would read a 401 as ``ignore``, then ``no_match``."""
    client = await make_client()
    for call in [*ROUTES.values(), *ALLOWED.values()]:
        answer = await ask(client, call, token=token)
        assert_refused(call, answer, also=("error",))
        assert b"unauthorized" in answer.body  # and nothing more: no reason a caller could learn from
        assert b"acme" not in answer.body


@pytest.mark.parametrize("broker", list(BROKER_PREFIXES))
async def test_unknown_paths_and_methods_under_a_broker_prefix_are_refusals(
    make_client: MakeClient, broker: str
) -> None:
    """A mistyped URL, or EMQX's ``method = get`` against these POST routes, must not fall through."""
    client = await make_client()
    for call in (c for c in ROUTES.values() if c.broker == broker):
        prefix = BROKER_PREFIXES[broker]
        for token in (TOKEN, None):
            for method, path in (("GET", call.path), ("PUT", call.path), ("POST", prefix + "no-such-hook")):
                answer = await ask(client, call, token=token, method=method, path=path)
                assert_refused(call, answer, also=("error",))


@pytest.mark.parametrize(
    "exc",
    [
        MalformedBody("body is not valid json"),
        web.HTTPRequestEntityTooLarge(max_size=4096, actual_size=5000),
        web.HTTPBadRequest(),
        RuntimeError("an unforeseen bug"),
    ],
    ids=["malformed body", "body too large", "http error", "crash"],
)
async def test_what_a_handler_lets_through_is_read_as_a_refusal(
    make_client: MakeClient, sqlite_demo: PDP, monkeypatch: pytest.MonkeyPatch, exc: Exception
) -> None:
    """The edge's answer for an exception escaping a broker route: 400/413/4xx, 500 (go-auth's error: never
    cached), or EMQX's 200 deny."""

    def explode(*args: Any, **kwargs: Any) -> Any:
        raise exc

    for method in ("authenticate", "authorize", "cached", "refuse"):
        monkeypatch.setattr(sqlite_demo, method, explode)
    clients = [await make_client(mode) for mode in GO_MODES]
    for client in clients:
        for call in ROUTES.values():
            answer = await ask(client, call)
            expected_go = "error" if isinstance(exc, RuntimeError) else "deny"
            if call.broker == "mosquitto-go-auth":
                assert_refused(call, answer, exactly=expected_go)
            else:
                assert_refused(call, answer, also=("error",))
