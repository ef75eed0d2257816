"""Revocation through each broker's API, driven from the broker adapters: what a broker was told (an ACL pushed
at CONNECT, an authz allow it caches, a VerneMQ publish allow) is taken back by closing that session through
a local server speaking the broker's management API exactly (``fake_broker_apis``)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer

from authhook import PDP
from authhook.config import (
    BrokerSettings,
    EmqxApiSettings,
    RevocationSettings,
    VernemqApiSettings,
    WebhookSettings,
)
from authhook.models import Action
from authhook.server.app import create_app
from authhook.sessions.broker_api import build_closers
from authhook.sessions.registry import SessionRegistry
from authhook.sessions.revoker import RevocationWatcher

from .conftest import settings_for
from .fake_broker_apis import FakeEmqx, FakeSession, FakeVernemq

TOKEN = "broker-shared-token-0123456789"
AUTH = {"x-authhook-token": TOKEN}
SECRET = "acme-thermo-1-demo-secret"
CLIENT_ID = "acme-thermo-1:boiler"


async def app_client(pdp: PDP, revocation: RevocationSettings, **brokers: Any) -> tuple[Any, RevocationWatcher]:
    settings = settings_for(
        "sqlite:///unused.db",
        webhook=WebhookSettings(token=TOKEN),  # type: ignore[arg-type]
        brokers=BrokerSettings(**brokers),
    )
    pdp.sessions = SessionRegistry(track_pairs=True)
    watcher = RevocationWatcher(pdp, pdp.sessions, build_closers(revocation))
    client = TestClient(TestServer(create_app(pdp, settings)))
    await client.start_server()
    return client, watcher


@pytest.fixture
async def emqx_api() -> AsyncIterator[FakeEmqx]:
    async with FakeEmqx("authhook-key", "emqx-api-secret-0123456789") as fake:
        yield fake


def emqx_settings(fake: FakeEmqx, action: str = "kick") -> RevocationSettings:
    return RevocationSettings(
        emqx=EmqxApiSettings(url=fake.url, username=fake.api_key, secret=fake.api_secret, action=action)  # type: ignore[arg-type]
    )


async def test_an_acl_pushed_at_connect_is_taken_back_by_a_kick(demo: PDP, emqx_api: FakeEmqx) -> None:
    client, watcher = await app_client(demo, emqx_settings(emqx_api), emqx_return_acl=True)
    try:
        body = {"username": "acme-thermo-1", "password": SECRET, "clientid": CLIENT_ID, "peerhost": ""}
        answer = await (await client.post("/emqx/authn", json=body, headers=AUTH)).json()
        assert answer["result"] == "allow" and answer["acl"], answer
        emqx_api.clients[CLIENT_ID] = "acme-thermo-1"
        # EMQX now publishes on its own, asking authhook nothing; nothing changed, so nothing is closed.
        assert await watcher.check_once() == []
        await demo.store.disconnect("acme", "acme-thermo-1", "telemetry", frozenset({Action.PUBLISH}))
        results = await watcher.check_once()
        assert emqx_api.kicked == [CLIENT_ID]
        assert all(r.ok for r in results), results
        event = demo.decision_log.recent()[-1].to_dict()
        assert (event["hook"], event["reason"], event["broker"]) == ("revoke", "session_closed", "emqx")
        assert "ACL pushed at CONNECT changed" in event["detail"]
    finally:
        await client.close()
        await watcher.stop()


async def test_clean_cache_mode_drains_a_lost_publish_but_kicks_a_lost_subscription_or_login(
    demo: PDP, emqx_api: FakeEmqx
) -> None:
    client, watcher = await app_client(demo, emqx_settings(emqx_api, "clean_cache"))
    try:
        for username, password, topic, action in (
            ("acme-thermo-1", SECRET, "m/acme/c/telemetry/temp", "publish"),
            ("acme-dashboard", "acme-dashboard-demo-secret", "m/acme/c/telemetry/#", "subscribe"),
        ):
            login = {"username": username, "password": password, "clientid": username}
            assert (await (await client.post("/emqx/authn", json=login, headers=AUTH)).json())["result"] == "allow"
            emqx_api.clients[username] = username
            ask = {"username": username, "clientid": username, "topic": topic, "action": action}
            assert await (await client.post("/emqx/authz", json=ask, headers=AUTH)).json() == {"result": "allow"}
        await watcher.check_once()
        # A lost publish right: EMQX's cached publish results are drained, the session stays.
        await demo.store.disconnect("acme", "acme-thermo-1", "telemetry", frozenset({Action.PUBLISH}))
        await watcher.check_once()
        assert (emqx_api.drained, emqx_api.kicked) == (["acme-thermo-1"], [])
        assert "authorization" in emqx_api.resets
        # A disabled subscriber: a drain would leave its subscription delivering, so it is kicked.
        await demo.store.set_subject_enabled("acme-dashboard", False)
        await watcher.check_once()
        assert emqx_api.kicked == ["acme-dashboard"]
    finally:
        await client.close()
        await watcher.stop()


async def test_a_vernemq_session_is_disconnected_and_the_webhook_cache_cleared(demo: PDP) -> None:
    sessions = {CLIENT_ID: FakeSession(user="acme-thermo-1")}
    async with FakeVernemq("vmq-api-key-0123456789", sessions=sessions) as fake:
        revocation = RevocationSettings(vernemq=VernemqApiSettings(url=fake.url, secret=fake.api_key))  # type: ignore[arg-type]
        client, watcher = await app_client(demo, revocation, vernemq_cache_max_age_s=60)
        try:
            hooks = {"vernemq-hook": "auth_on_register", **AUTH}
            register = {"username": "acme-thermo-1", "password": SECRET, "client_id": CLIENT_ID, "peer_addr": ""}
            assert (await (await client.post("/vernemq", json=register, headers=hooks)).json()) == {"result": "ok"}
            publish = {
                "username": "acme-thermo-1",
                "client_id": CLIENT_ID,
                "topic": "m/acme/c/telemetry/temp",
                "qos": 1,
                "retain": False,
                "payload": "",
            }
            hooks["vernemq-hook"] = "auth_on_publish"
            response = await client.post("/vernemq", json=publish, headers=hooks)
            assert response.headers.get("cache-control") == "max-age=60"  # VerneMQ will not ask again
            await watcher.check_once()
            await demo.store.disconnect("acme", "acme-thermo-1", "telemetry", frozenset({Action.PUBLISH}))
            await watcher.check_once()
            assert [d[0] for d in fake.disconnected] == [CLIENT_ID]
            assert fake.cache_clears >= 1
        finally:
            await client.close()
            await watcher.stop()


async def test_vernemq_offline_and_gone_hooks_drop_the_session_from_the_registry(demo: PDP) -> None:
    client, watcher = await app_client(demo, RevocationSettings())
    try:
        hooks = {"vernemq-hook": "auth_on_register", **AUTH}
        register = {"username": "acme-thermo-1", "password": SECRET, "client_id": CLIENT_ID, "peer_addr": ""}
        assert (await (await client.post("/vernemq", json=register, headers=hooks)).json()) == {"result": "ok"}
        assert [s.client_id for s in demo.sessions.sessions_of("acme-thermo-1")] == [CLIENT_ID]
        hooks["vernemq-hook"] = "on_client_offline"
        gone = await client.post("/vernemq", json={"mountpoint": "", "client_id": CLIENT_ID}, headers=hooks)
        assert (gone.status, await gone.json()) == (200, {"result": "ok"})
        assert demo.sessions.sessions_of("acme-thermo-1") == []
    finally:
        await client.close()
        await watcher.stop()
