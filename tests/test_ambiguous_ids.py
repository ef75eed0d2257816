"""No id can be read two ways. RabbitMQ's MQTT plugin maps `/` to `.`, so a tenant `a.c` would share routing
keys with tenant `a`'s channel `c` (`m/a.c/c/x/#` and `m/a/c/c/x/#` are both `m.a.c.c.x.#`): tenant and
channel ids may not contain `.`, wherever they enter, and every routing key authhook accepts names one tenant
and one channel."""

from __future__ import annotations

import asyncio
import itertools
import os
import re
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from urllib.parse import quote

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from authhook import PDP
from authhook.brokers.common import Malformed
from authhook.brokers.rabbitmq import mqtt_topic, to_routing_key
from authhook.cli import _dotted_ids
from authhook.config import WebhookSettings
from authhook.errors import InvalidInput
from authhook.pdp import make_request
from authhook.server import create_app
from authhook.store.base import (
    TOPIC_LEVEL_ID_PATTERN,
    Channel,
    SubjectKind,
    SubjectRecord,
    Tenant,
    dotted_ids_readable,
    is_topic_level_id,
)
from authhook.topics import TopicTemplate
from authhook.world import import_world, load_world

from .conftest import TEST_KEY, settings_for

TOKEN = "broker-shared-token-0123456789"
FORM = {"x-authhook-token": TOKEN, "content-type": "application/x-www-form-urlencoded"}

TENANT_A = """
  - id: a
    clients:
      - id: a-dev
        secret: a-dev-demo-secret-0123
    users:
      - id: alice@acme.example
        password: alice-demo-password
    channels:
      - id: c
    connections:
      - client: a-dev
        channel: c
        actions: [publish, subscribe]
    groups:
      - id: ops.team
        kind: subjects
        members: [alice@acme.example]
    roles:
      - id: ops.read
        blocks:
          - id: read.all
            scope: tenant
            actions: [subscribe]
        assign: [group:ops.team]
"""
TENANT_A_C = """
  - id: a.c
    clients:
      - id: ac-dev
        secret: ac-dev-demo-secret-0123
    channels:
      - id: x
    connections:
      - client: ac-dev
        channel: x
"""
DOTTED_RULE = "tenant and channel ids cannot contain `.`"
DOTTED_MATCH = re.escape("cannot contain `.`")


def world_file(tmp_path: Path, name: str, *tenants: str) -> Path:
    path = tmp_path / name
    path.write_text("tenants:" + "".join(tenants))
    return path


Client = TestClient[web.Request, web.Application]


@pytest.fixture
async def rabbit(pdp: PDP) -> AsyncIterator[Client]:
    settings = settings_for("sqlite:///unused.db", webhook=WebhookSettings(token=TOKEN))
    client = Client(TestServer(create_app(pdp, settings)))
    await client.start_server()
    yield client
    await client.close()


async def topic_check(client: Client, user: str, permission: str, routing_key: str) -> str:
    form = (
        f"username={quote(user)}&vhost=%2F&resource=topic&name=amq.topic&permission={permission}"
        f"&routing_key={quote(routing_key)}&variable_map.client_id={quote(user)}"
    )
    response = await client.post("/rabbitmq/topic", data=form, headers=FORM)
    assert response.status == 200
    return await response.text()


# -- the reported case: tenants `a` and `a.c` ----------------------------------------------------------


async def test_a_dotted_tenant_cannot_be_imported_so_the_routing_key_names_one_tenant(
    pdp: PDP,
    rabbit: Client,
    tmp_path: Path,
) -> None:
    both = world_file(tmp_path, "both.yaml", TENANT_A, TENANT_A_C)
    with pytest.raises(InvalidInput) as refused:
        load_world(both)
    message = str(refused.value)
    assert "tenants.1.id" in message and "`a.c`" in message and DOTTED_RULE in message
    assert "RabbitMQ maps `/` to `.`" in message and "\n" not in message
    assert await pdp.store.list_tenants() == []  # nothing of that file was written, tenant `a` included

    await import_world(pdp.store, pdp.hasher, load_world(world_file(tmp_path, "a.yaml", TENANT_A)))
    assert [t.id for t in await pdp.store.list_tenants()] == ["a"]
    assert [s.id for s in await pdp.store.list_subjects("a")] == ["a-dev", "alice@acme.example"]

    # `a-dev` is connected to channel `c` of tenant `a`: `m/a/c/c/x/#` is its channel `c`, subtopic `x/#`.
    # No tenant `a.c` can exist, so no other tenant's messages travel under that routing key.
    assert await topic_check(rabbit, "a-dev", "read", "m.a.c.c.x.#") == "allow"
    event = pdp.decision_log.recent()[-1].to_dict()
    assert (event["topic"], event["tenant"], event["channel"], event["reason"]) == (
        "m/a/c/c/x/#",
        "a",
        "c",
        "connected",
    )
    explained = await pdp.explain(make_request("subscribe", "a-dev", mqtt_topic("m.a.c.c.x.#", pdp.template)))
    assert "topic maps to tenant `a`, channel `c`, subtopic `x/#`" in explained.steps
    assert await topic_check(rabbit, "a-dev", "write", "m.a.c.c.x.temp") == "allow"
    assert pdp.decision_log.recent()[-1].to_dict()["channel"] == "c"


async def test_a_dotted_channel_is_refused_and_dotted_subject_group_role_ids_are_kept(pdp: PDP, tmp_path: Path) -> None:
    dotted_channel = TENANT_A.replace("      - id: c\n", "      - id: c\n      - id: x.y\n")
    with pytest.raises(InvalidInput) as refused:
        load_world(world_file(tmp_path, "channel.yaml", dotted_channel))
    assert "tenants.0.channels.1.id" in str(refused.value) and "`x.y`" in str(refused.value)
    assert await pdp.store.list_tenants() == []

    await import_world(pdp.store, pdp.hasher, load_world(world_file(tmp_path, "a.yaml", TENANT_A)))
    groups = await pdp.store.list_groups("a")
    assert [(g.id, members) for g, members in groups] == [("ops.team", ["alice@acme.example"])]
    assert [r.id for r, _ in await pdp.store.list_roles("a")] == ["ops.read"]
    decision = await pdp.authorize(make_request("subscribe", "alice@acme.example", "m/a/c/c/#"))
    assert (decision.allowed, decision.verdict.reason) == (True, "role_grant")


async def test_the_store_api_refuses_dotted_tenant_and_channel_ids(pdp: PDP) -> None:
    """Both stores (``pdp`` runs on SQLite and PostgreSQL): the entities they take cannot hold such ids."""
    with pytest.raises(ValidationError, match=DOTTED_MATCH):
        await pdp.store.put_tenant(Tenant(id="a.c"))
    await pdp.store.put_tenant(Tenant(id="a"))
    with pytest.raises(ValidationError, match=DOTTED_MATCH):
        await pdp.store.put_channel(Channel(id="x.y", tenant="a"))
    with pytest.raises(ValidationError, match=DOTTED_MATCH):
        await pdp.store.put_channel(Channel(id="x", tenant="a.c"))
    with pytest.raises(ValidationError, match=DOTTED_MATCH):
        SubjectRecord(id="dev", tenant="a.c", kind=SubjectKind.CLIENT)
    for bad in ("a*", "a+", "a#", "a/b", "", "-a"):
        with pytest.raises(ValidationError, match="is not a tenant or channel id"):
            Tenant(id=bad)
    await pdp.store.put_channel(Channel(id="c", tenant="a"))
    await pdp.store.put_subject(SubjectRecord(id="alice@acme.example", tenant="a", kind=SubjectKind.USER), "x")
    assert [c.id for c in await pdp.store.list_channels("a")] == ["c"]
    assert [s.id for s in await pdp.store.list_subjects("a")] == ["alice@acme.example"]


# -- stores written before the rule ----------------------------------------------------------------------


async def write_legacy_ids(pdp: PDP) -> None:
    """What an older version could write: a dotted tenant, and a dotted channel in a plain tenant."""
    with dotted_ids_readable():
        for tenant in ("a", "a.c"):
            await pdp.store.put_tenant(Tenant(id=tenant))
        await pdp.store.put_channel(Channel(id="x", tenant="a.c"))
        await pdp.store.put_channel(Channel(id="x.y", tenant="a"))


async def test_serve_names_every_dotted_id_a_store_still_holds(pdp: PDP, store_url: str) -> None:
    assert await _dotted_ids(settings_for(store_url)) == []
    await write_legacy_ids(pdp)
    assert await _dotted_ids(settings_for(store_url)) == ["tenant `a.c`", "channel `x.y` of tenant `a`"]
    with pytest.raises(ValidationError, match=DOTTED_MATCH):
        await pdp.store.list_tenants()  # outside the check, such ids are not read back as valid entities


async def test_serve_refuses_to_start_on_a_store_holding_dotted_ids(sqlite_pdp: PDP, db_path: Path) -> None:
    await write_legacy_ids(sqlite_pdp)
    done = await asyncio.to_thread(run_cli, db_path, "serve", "--port", "0")
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and DOTTED_RULE in lines[0]
    assert "tenant `a.c`" in lines[0] and "channel `x.y` of tenant `a`" in lines[0]
    assert "listening" not in done.stdout


def run_cli(db: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "authhook", "--store", f"sqlite:///{db}", *args],
        env={**os.environ, "AUTHHOOK_SECRET_KEY": TEST_KEY},
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def test_the_cli_refuses_dotted_ids_with_one_line_and_exit_2(tmp_path: Path) -> None:
    db = tmp_path / "cli.db"
    for args in (
        ("import", str(world_file(tmp_path, "both.yaml", TENANT_A, TENANT_A_C))),
        ("tenant", "add", "a.c"),
    ):
        done = run_cli(db, *args)
        assert done.returncode == 2, (args, done.stderr)
        assert done.stderr.count("\n") == 1 and done.stderr.startswith("error: "), done.stderr
        assert DOTTED_RULE in done.stderr and "`a.c`" in done.stderr and "RabbitMQ maps" in done.stderr
    assert run_cli(db, "tenant", "list").stdout == ""  # the file was refused whole
    assert run_cli(db, "tenant", "add", "a").returncode == 0
    refused = run_cli(db, "channel", "add", "a", "x.y")
    assert refused.returncode == 2 and DOTTED_RULE in refused.stderr and "`x.y`" in refused.stderr
    assert refused.stderr.count("\n") == 1
    assert run_cli(db, "channel", "add", "a", "x").returncode == 0


# -- the reverse mapping -----------------------------------------------------------------------------------

TEMPLATES = [
    TopicTemplate(),
    TopicTemplate("tenants/{tenant}/channels/{channel}/{subtopic}"),
    TopicTemplate("{channel}/in/{tenant}/{subtopic}"),
    TopicTemplate("org/{tenant}/{channel}"),
]
ids = st.from_regex(TOPIC_LEVEL_ID_PATTERN.replace("{0,127}", "{0,8}"), fullmatch=True)
# Subtopic levels as MQTT allows them in a topic name, `.` and `*` (RabbitMQ's wildcard) included.
levels = st.text(st.sampled_from("ab.*-$é "), max_size=4)


@settings(max_examples=300, deadline=None)
@given(
    template=st.sampled_from(TEMPLATES),
    tenant=ids,
    channel=ids,
    subtopic=st.lists(levels, min_size=1, max_size=4).map("/".join),
    wildcard=st.sampled_from(["", "/#", "/+", "/+/x"]),
)
def test_a_round_trip_through_rabbitmq_names_the_same_tenant_and_channel(
    template: TopicTemplate, tenant: str, channel: str, subtopic: str, wildcard: str
) -> None:
    topic = template.topic_for(tenant, channel, subtopic + wildcard if template.has_subtopic else "")
    address = template.parse_filter(mqtt_topic(to_routing_key(topic), template))
    assert address is not None
    assert (address.tenant, address.channel) == (tenant, channel)


words = st.lists(st.sampled_from(["m", "c", "a", "x", "in", "org", "*", "#", ""]), min_size=1, max_size=8)


@settings(max_examples=300, deadline=None)
@given(template=st.sampled_from(TEMPLATES), key_words=words)
def test_every_reading_of_an_accepted_routing_key_names_the_same_tenant_and_channel(
    template: TopicTemplate, key_words: list[str]
) -> None:
    """Put `/` or `.` back at every separator: each MQTT topic that RabbitMQ would turn into this key and that
    names a real tenant and channel (valid ids) names the ones authhook judges."""
    key = ".".join(key_words)
    try:
        judged = template.parse_filter(mqtt_topic(key, template))
    except Malformed:
        return
    for separators in itertools.product("/.", repeat=len(key_words) - 1):
        reading = key_words[0] + "".join(s + w for s, w in zip(separators, key_words[1:], strict=True))
        address = template.parse_filter(reading.replace("*", "+"))
        if address is None or address.tenant is None or address.channel is None:
            continue
        if not (is_topic_level_id(address.tenant) and is_topic_level_id(address.channel)):
            continue
        assert judged is not None, (key, reading)
        assert (judged.tenant, judged.channel) == (address.tenant, address.channel), (key, reading)


def test_routing_keys_that_could_be_read_two_ways_at_the_levels_policy_reads_are_refused() -> None:
    template = TopicTemplate()
    for key in ("$SYS.#", "$SYS.broker.x", "$share.g.m.a.c.c.x.#", "m.a.c.c/x"):
        with pytest.raises(Malformed) as refused:
            mqtt_topic(key, template)
        assert refused.value.reason == "invalid_topic", key
    assert mqtt_topic("$SYS", template) == "$SYS"  # one word: one reading
    # Defensive: a tenant or channel level that is no id could never name a tenant or channel.
    for key in ("m.@a.c.x", "m.a.c.-x.t", "m.a+b.c.x", "m.é.c.x"):
        with pytest.raises(Malformed, match=r"is not a (tenant|channel) id") as refused:
            mqtt_topic(key, template)
        assert refused.value.reason == "invalid_topic", key
    assert mqtt_topic("m.a.c.*.t", template) == "m/a/c/+/t"  # wildcards stay wildcards, judged as such
    assert mqtt_topic("m.a.c.c.x.y.z", template) == "m/a/c/c/x/y/z"  # a `.` moves subtopic levels only
    assert mqtt_topic("other.@x", template) == "other/@x"  # not a channel topic: judged as outside the namespace


async def test_a_multi_word_dollar_key_is_denied_as_invalid_topic(
    pdp: PDP,
    rabbit: Client,
    tmp_path: Path,
) -> None:
    await import_world(pdp.store, pdp.hasher, load_world(world_file(tmp_path, "a.yaml", TENANT_A)))
    assert await topic_check(rabbit, "a-dev", "read", "$SYS.#") == "deny"
    event = pdp.decision_log.recent()[-1].to_dict()
    assert (event["reason"], event["action"]) == ("invalid_topic", "subscribe")
    assert await topic_check(rabbit, "a-dev", "write", "m.@a.c.x") == "deny"
    assert pdp.decision_log.recent()[-1].to_dict()["reason"] == "invalid_topic"
