"""PDP calls per 1,000 PUBLISH with EMQX's session ACL on (``brokers.emqx_return_acl``): the target is 0.

    .venv/bin/python bench/emqx_acl_calls.py [--publishes 1000] [--json bench/results/emqx_acl_calls.json]

An in-process authhook (the real aiohttp app from ``create_app``, on a throw-away SQLite world, listening on
127.0.0.1) and a fake EMQX written here. For each client profile the fake EMQX CONNECTs through
``POST /emqx/authn``, keeps the returned ``acl``, then performs the PUBLISHes a client of that kind makes on
the channels it may use: each is decided by the ACL with EMQX 5.8's semantics (first matching rule wins, rule
``+``/``#`` are the only wildcards, no ``$`` topic under a leading wildcard, ``eq`` is string equality), and
only when no rule matches does it ask ``POST /emqx/authz``, as EMQX's HTTP source would. It also counts, for
information, the calls a batch of SUBSCRIBEs costs (exact channel filters, wildcard filters, ``$SYS``),
which are expected to fall through where no rule can say exactly what authhook says.

Every answer, from the ACL or from authhook, is checked against the answer authhook gives when asked
directly, so a figure is only reported for an ACL that agrees with the PDP.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the EMQX model lives beside the tests

from authhook import PDP, Settings, make_request
from authhook.config import BrokerSettings, DecisionLogSettings, WebhookSettings
from authhook.server import create_app
from authhook.world import World, import_world
from tests.emqx_model import emqx_first_match, emqx_real_filter

TOKEN = "emqx-acl-bench-token-0123456789"
LINES = [f"line-{i:02d}" for i in range(12)]
WORLD: dict[str, Any] = {
    "tenants": [
        {
            "id": "acme",
            "clients": [
                {"id": "acme-sensor", "secret": "acme-sensor-bench-secret-0123456789"},
                {"id": "acme-gateway", "secret": "acme-gateway-bench-secret-0123456789"},
            ],
            "users": [{"id": "acme-operator", "password": "acme-operator-bench-password"}],
            "channels": [{"id": c} for c in ("telemetry", "commands", "alarms", *LINES)],
            "connections": [
                {"client": "acme-sensor", "channel": "telemetry", "actions": ["publish"]},
                {"client": "acme-sensor", "channel": "commands", "actions": ["subscribe"]},
            ],
            "groups": [
                {"id": "gateways", "kind": "subjects", "members": ["acme-gateway"]},
                {"id": "plant-floor", "kind": "channels", "members": ["telemetry", "alarms", *LINES[:6]]},
            ],
            "roles": [
                {
                    "id": "floor-gateway",
                    "blocks": [
                        {"scope": {"channel_group": "plant-floor"}, "actions": ["publish", "subscribe"]},
                        {"scope": {"channel": "alarms"}, "actions": ["publish"], "effect": "deny"},
                    ],
                    "assign": ["group:gateways"],
                },
                {
                    "id": "operator",
                    "blocks": [
                        {"scope": "tenant", "actions": ["publish", "subscribe"]},
                        {"scope": {"channel": "alarms"}, "actions": ["publish"], "effect": "deny"},
                        {"scope": {"topic": "$SYS/#"}, "actions": ["subscribe"]},
                        {"scope": {"topic": "$SYS/broker/secret/#"}, "actions": ["subscribe"], "effect": "deny"},
                    ],
                    "assign": ["acme-operator"],
                },
            ],
        },
        {
            "id": "globex",
            "clients": [{"id": "globex-meter", "secret": "globex-meter-bench-secret-0123456789"}],
            "channels": [{"id": "telemetry"}],
            "connections": [{"client": "globex-meter", "channel": "telemetry", "actions": ["publish"]}],
        },
    ]
}


@dataclass
class Profile:
    username: str
    password: str
    publish_channels: tuple[str, ...]  # the channels this client may publish on, from the world above
    subscribes: tuple[str, ...]  # a mix of filters a client of this kind sends


PROFILES = (
    Profile(
        "acme-sensor",
        "acme-sensor-bench-secret-0123456789",
        ("telemetry",),
        ("m/acme/c/commands/#", "m/acme/c/commands", "m/acme/c/alarms/#", "$share/g/m/acme/c/commands/+"),
    ),
    Profile(
        "acme-gateway",
        "acme-gateway-bench-secret-0123456789",
        ("telemetry", *LINES[:6]),
        ("m/acme/c/telemetry/#", "m/acme/c/line-03/+/x", "m/acme/c/+/temp", "m/acme/c/commands/#"),
    ),
    Profile(
        "acme-operator",
        "acme-operator-bench-password",
        ("telemetry", "commands", *LINES),
        ("m/acme/c/alarms/#", "m/acme/c/+/temp", "m/acme/#", "$SYS/broker/load", "$SYS/#", "$SYS/broker/secret/k"),
    ),
    Profile("globex-meter", "globex-meter-bench-secret-0123456789", ("telemetry",), ("m/globex/c/telemetry/#",)),
)
TENANT_OF = {"acme-sensor": "acme", "acme-gateway": "acme", "acme-operator": "acme", "globex-meter": "globex"}
SUBTOPICS = ("", "/temp", "/a/b", "/status/online")


# -- the fake EMQX -------------------------------------------------------------------------------------


@dataclass
class FakeEmqx:
    """One EMQX node as far as authorization goes: the session ACL first, then the HTTP source."""

    http: aiohttp.ClientSession
    base: str
    authz_calls: int = 0
    acl: dict[str, list[dict[str, Any]]] = field(default_factory=dict)

    async def connect(self, username: str, password: str) -> None:
        body = {"username": username, "password": password, "clientid": username, "peerhost": "127.0.0.1"}
        async with self.http.post(f"{self.base}/emqx/authn", json=body, headers={"x-authhook-token": TOKEN}) as r:
            answer = await r.json()
        if answer.get("result") != "allow" or "acl" not in answer:
            raise SystemExit(f"CONNECT of {username} got {answer}: is emqx_return_acl on?")
        self.acl[username] = answer["acl"]

    def local(self, username: str, action: str, topic: str) -> bool | None:
        return emqx_first_match(self.acl[username], action, topic, username)

    async def authorize(self, username: str, action: str, topic: str) -> tuple[bool, bool]:
        """(allowed, asked authhook)."""
        if action == "subscribe":
            real = emqx_real_filter(topic)
            if real is None:
                raise SystemExit(f"EMQX would refuse the filter {topic!r} itself; the bench only sends valid ones")
            topic = real
        decided = self.local(username, action, topic)
        if decided is not None:
            return decided, False
        self.authz_calls += 1
        body = {"clientid": username, "username": username, "topic": topic, "action": action, "qos": "1"}
        async with self.http.post(f"{self.base}/emqx/authz", json=body, headers={"x-authhook-token": TOKEN}) as r:
            return (await r.json())["result"] == "allow", True


# -- the run -------------------------------------------------------------------------------------------


async def run(publishes: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        settings = Settings(
            store_url=f"sqlite:///{tmp}/bench.db",
            secret_key="b" * 64,
            webhook=WebhookSettings(token=TOKEN),
            brokers=BrokerSettings(emqx_return_acl=True),
            decision_log=DecisionLogSettings(path=Path(tmp) / "decisions.jsonl"),
        )
        async with PDP.from_settings(settings) as pdp:
            await import_world(pdp.store, pdp.hasher, World.model_validate(WORLD))
            runner = web.AppRunner(create_app(pdp, settings), access_log=None)
            await runner.setup()
            site = web.TCPSite(runner, "127.0.0.1", 0)
            await site.start()
            port = runner.addresses[0][1]
            try:
                async with aiohttp.ClientSession() as http:
                    return await drive(FakeEmqx(http, f"http://127.0.0.1:{port}"), pdp, publishes)
            finally:
                await runner.cleanup()


async def drive(emqx: FakeEmqx, pdp: PDP, publishes: int) -> dict[str, Any]:
    started = time.perf_counter()
    subjects: dict[str, Any] = {}
    for profile in PROFILES:
        await emqx.connect(profile.username, profile.password)
        tenant = TENANT_OF[profile.username]
        before = emqx.authz_calls
        for i in range(publishes):
            channel = profile.publish_channels[i % len(profile.publish_channels)]
            topic = f"m/{tenant}/c/{channel}{SUBTOPICS[i % len(SUBTOPICS)]}"
            allowed, _ = await emqx.authorize(profile.username, "publish", topic)
            await must_agree(pdp, profile.username, "publish", topic, allowed)
        publish_calls = emqx.authz_calls - before
        asked = []
        for topic_filter in profile.subscribes:
            allowed, fell_through = await emqx.authorize(profile.username, "subscribe", topic_filter)
            await must_agree(pdp, profile.username, "subscribe", topic_filter, allowed)
            if fell_through:
                asked.append(topic_filter)
        rules = emqx.acl[profile.username]
        subjects[profile.username] = {
            "publishes": publishes,
            "pdp_calls": publish_calls,
            "pdp_calls_per_1000_publish": round(publish_calls * 1000 / publishes, 3),
            "acl_rules": len(rules),
            "acl_rule_topics": sum(len(r.get("topics", [r.get("topic")])) for r in rules),
            "subscribes": len(profile.subscribes),
            "subscribes_asked_over_http": asked,
        }
    total = sum(s["pdp_calls"] for s in subjects.values())
    return {
        "script": "bench/emqx_acl_calls.py",
        "python": platform.python_version(),
        "emqx_model": "5.8 first-match session ACL, then the HTTP authorization source",
        "publishes_per_client": publishes,
        "pdp_calls_per_1000_publish": round(total * 1000 / (publishes * len(PROFILES)), 3),
        "clients": subjects,
        "elapsed_s": round(time.perf_counter() - started, 2),
    }


async def must_agree(pdp: PDP, username: str, action: str, topic: str, allowed: bool) -> None:
    expected = (await pdp.authorize(make_request(action, username, topic, client_id=username))).allowed
    if expected != allowed:
        raise SystemExit(f"{username} {action} {topic}: EMQX would answer {allowed}, authhook says {expected}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--publishes", type=int, default=1000, help="PUBLISHes per client profile")
    parser.add_argument("--json", type=Path, help="also write the result here")
    args = parser.parse_args()
    result = asyncio.run(run(args.publishes))
    for name, figures in result["clients"].items():
        print(
            f"{name:15} {figures['pdp_calls']:5} PDP calls for {figures['publishes']} PUBLISH "
            f"({figures['acl_rules']} rules, {figures['acl_rule_topics']} rule topics); "
            f"SUBSCRIBEs asked over HTTP: {figures['subscribes_asked_over_http'] or 'none'}"
        )
    print(f"PDP calls per 1,000 PUBLISH: {result['pdp_calls_per_1000_publish']} ({result['elapsed_s']} s)")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
