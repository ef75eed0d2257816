"""Property: the ACL pushed to EMQX at CONNECT is authhook's own policy, wherever it decides anything.

Random worlds (tenants, channels, a channel that is created then deleted, connections, roles with tenant /
channel / channel-group / ``$SYS`` blocks, allow and deny, nested channel groups, subject groups, three topic
templates) are built through the store API on an in-memory store. Random requests (literal ``+``/``#``
levels, empty levels, other tenants, nonexistent channels, ``$SYS/...``, ``$share/``, ``$queue/``,
``$exclusive/``, ``$delayed/``) are replayed through the model of EMQX below, written here from EMQX 5.8's
``emqx_topic`` / ``emqx_authz_rule`` / ``emqx_channel`` and not from ``authhook.topics``:

* EMQX refuses an invalid filter or topic name before any authorization (``emqx_topic:validate``);
* it strips ``$share/<group>/``, ``$queue/`` and ``$exclusive/`` from a filter (``emqx_topic:parse``, then
  ``get_shared_real_topic`` in ``emqx_channel``) and ``$delayed/<n>/`` from a topic name
  (``emqx_access_control:authorize``), and asks every source about what is left;
* the session's rules are tried in order; a rule matches when its action does and one of its topics does;
  the first match decides, and no match falls through to the next source, authhook's ``/emqx/authz``.

Wherever a rule matched, its permission must be the PDP's answer for the same subject, action and topic
(0 differences); and a publish on a channel the subject may use must always be decided by an allow rule, so
ordinary traffic never costs a call.
"""

from __future__ import annotations

import asyncio
import random
from dataclasses import dataclass, field
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from authhook import PDP, Settings, make_request
from authhook.brokers.emqx import acl_rules
from authhook.store.base import Assignment, Block, Channel, Connection, Group, Role, SubjectRecord, Tenant
from authhook.topics import TopicTemplate

from .emqx_model import emqx_first_match, emqx_real_filter, emqx_real_name, emqx_topic_matches

TENANTS = ("t0", "t1")
CHANNELS = ("c0", "c1", "c2")
GONE = "c3"  # created, named by a group and a role, then deleted: the store must forget it everywhere
ACTIONS = ("publish", "subscribe")
TEMPLATES = ("m/{tenant}/c/{channel}/{subtopic}", "{channel}/x/{tenant}", "d/{tenant}/{channel}/{subtopic}")
SYS_REFS = (
    "$SYS/#",
    "$SYS/broker/#",
    "$SYS/broker/+",
    "$SYS/broker/secret/#",
    "$SYS/broker/uptime",
    "$SYS/+/clients",
    "$SYS/broker/+/x",
    "$SYS",
    "$SYS/${username}/#",  # EMQX would render this in a rule topic: it must never be sent as one
)


def subjects_of(tenant: str) -> tuple[str, ...]:
    return (f"{tenant}-d0", f"{tenant}-d1", f"{tenant}-u0")


ALL_SUBJECTS = tuple(s for t in TENANTS for s in subjects_of(t))
BlockSpec = tuple[str, "str | None", frozenset[str], str]  # scope, ref, actions, effect


# -- worlds --------------------------------------------------------------------------------------------


@dataclass
class World:
    template: str = TEMPLATES[0]
    connections: dict[tuple[str, str], frozenset[str]] = field(default_factory=dict)
    groups: dict[str, tuple[set[str], set[str], set[str]]] = field(default_factory=dict)  # cg, cg2 (in cg), sg
    roles: dict[str, list[tuple[list[BlockSpec], set[str]]]] = field(default_factory=dict)


action_sets = st.sampled_from([frozenset({"publish"}), frozenset({"subscribe"}), frozenset(ACTIONS)])


@st.composite
def blocks(draw: st.DrawFn) -> BlockSpec:
    scope = draw(st.sampled_from(["tenant", "channel", "channel", "channel_group", "topic", "topic"]))
    ref = {
        "tenant": None,
        "channel": draw(st.sampled_from((*CHANNELS, GONE))),
        "channel_group": draw(st.sampled_from(["cg", "cg2"])),
        "topic": draw(st.sampled_from(SYS_REFS)),
    }[scope]
    return scope, ref, draw(action_sets), draw(st.sampled_from(["allow", "allow", "deny"]))


@st.composite
def worlds(draw: st.DrawFn) -> World:
    world = World(template=draw(st.sampled_from(TEMPLATES)))
    for tenant in TENANTS:
        for client in subjects_of(tenant)[:2]:
            for channel in CHANNELS:
                if draw(st.integers(0, 2)) == 0:
                    world.connections[(client, channel)] = draw(action_sets)
        world.groups[tenant] = (
            set(draw(st.sets(st.sampled_from((*CHANNELS, GONE))))),
            set(draw(st.sets(st.sampled_from((*CHANNELS, GONE))))),
            set(draw(st.sets(st.sampled_from(subjects_of(tenant))))),
        )
        world.roles[tenant] = [
            (
                draw(st.lists(blocks(), min_size=1, max_size=3)),
                set(draw(st.sets(st.sampled_from([*subjects_of(tenant), "group:sg"]), min_size=1))),
            )
            for _ in range(draw(st.integers(0, 3)))
        ]
    return world


async def build(world: World) -> PDP:
    pdp = PDP.from_settings(Settings(store_url="sqlite://:memory:", secret_key="k" * 64, topic_template=world.template))
    await pdp.open()
    store = pdp.store
    secret = pdp.hasher.hash_client_secret("0123456789abcdef")
    for tenant in TENANTS:
        await store.put_tenant(Tenant(id=tenant))
        for subject in subjects_of(tenant):
            kind = "user" if subject.endswith("u0") else "client"
            await store.put_subject(SubjectRecord(id=subject, tenant=tenant, kind=kind), secret)
        for channel in (*CHANNELS, GONE):
            await store.put_channel(Channel(id=channel, tenant=tenant))
        channel_group, nested, subject_group = world.groups[tenant]
        await store.put_group(Group(id="cg", tenant=tenant, kind="channels"))
        await store.put_group(Group(id="cg2", tenant=tenant, kind="channels", parent="cg"))
        await store.put_group(Group(id="sg", tenant=tenant, kind="subjects"))
        for group, members in (("cg", channel_group), ("cg2", nested), ("sg", subject_group)):
            for member in sorted(members):
                await store.add_member(tenant, group, member)
        for index, (specs, assignees) in enumerate(world.roles[tenant]):
            role = Role(
                id=f"r{index}",
                tenant=tenant,
                blocks=tuple(
                    Block(id=f"b{i}", scope=scope, ref=ref, actions=actions, effect=effect)
                    for i, (scope, ref, actions, effect) in enumerate(specs)
                ),
            )
            await store.put_role(role)
            for assignee in sorted(assignees):
                is_group = assignee.startswith("group:")
                await store.assign(
                    Assignment(
                        tenant=tenant,
                        role=role.id,
                        assignee_kind="group" if is_group else "subject",
                        assignee=assignee.removeprefix("group:"),
                    )
                )
        await store.delete_channel(tenant, GONE)
    for (client, channel), actions in world.connections.items():
        tenant = client.split("-")[0]
        await store.connect(Connection(tenant=tenant, client=client, channel=channel, actions=actions))
    return pdp


# -- requests ------------------------------------------------------------------------------------------

SPECIAL = (
    "$SYS/#",
    "$SYS",
    "$SYS/broker",
    "$SYS/broker/#",
    "$SYS/broker/+",
    "$SYS/broker/secret",
    "$SYS/broker/secret/#",
    "$SYS/broker/secret/k",
    "$SYS/broker/uptime",
    "$SYS/+/clients",
    "$SYS/a/clients",
    "$SYS//clients",
    "$SYS/broker/+/x",
    "$SYS/broker/y/x",
    "$SYS/+",
    "$SYS/{me}/x",
    "$SYS/${username}/x",
    "#",
    "+",
    "+/#",
    "foo/bar",
    "$other/x",
)


def raw_topic(rng: random.Random, template: str, tenant: str, me: str) -> str:
    """A topic or filter shaped by the template, with every level drawn from right and wrong values."""
    if rng.randrange(5) == 0:
        return rng.choice(SPECIAL).replace("{me}", me)
    levels = template.split("/")
    if levels[-1] == "{subtopic}":
        levels.pop()
    words: list[str] = []
    for level in levels:
        if level == "{tenant}":
            options: tuple[str, ...] = (tenant, tenant, *TENANTS, "tX", "+", "")
        elif level == "{channel}":
            options = (*CHANNELS, *CHANNELS, GONE, "cX", "+", "")
        else:
            options = (level, level, level, "+", "zz", "")
        words.append(rng.choice(options))
    words += rng.choice([[], [], ["a"], ["+"], ["", "b"], ["a", "b"], [""], ["a", "+", "c"]])
    cut = rng.randrange(len(words) + 4)
    if cut <= len(words):  # end the filter in '#' somewhere
        words = [*words[:cut], "#"]
    return "/".join(words)


def asks(rng: random.Random, template: str, count: int) -> list[tuple[str, str, str]]:
    """(subject, action, raw topic) as a client would send them; publishes carry no wildcard (EMQX refuses
    one before asking anyone, which ``emqx_real_name`` models too)."""
    found = []
    for _ in range(count):
        subject = rng.choice(ALL_SUBJECTS)
        action = rng.choice(ACTIONS)
        topic = raw_topic(rng, template, subject.split("-")[0], subject)
        if action == "subscribe":
            topic = rng.choice(["", "", "", "$share/g/", "$queue/", "$exclusive/"]) + topic
        else:
            topic = rng.choice(["", "", "", "", "$delayed/5/"]) + topic.replace("+", "p").replace("#", "h")
        found.append((subject, action, topic))
    return found


# -- replay --------------------------------------------------------------------------------------------


async def pdp_allows(pdp: PDP, subject: str, action: str, topic: str) -> bool:
    request = make_request(action, subject, topic, client_id=subject)
    return (await pdp.authorize(request, broker="emqx", hook="authz")).allowed


async def session_acl(pdp: PDP, subject: str) -> list[dict[str, Any]] | None:
    grants = await pdp.grants(subject)
    return None if grants is None else acl_rules(grants, pdp.template)


async def replay(pdp: PDP, rules: list[dict[str, Any]], subject: str, action: str, raw: str) -> tuple[str, bool]:
    """('refused' | 'fell_through' | 'decided', agrees)."""
    real = emqx_real_name(raw) if action == "publish" else emqx_real_filter(raw)
    if real is None:
        return "refused", True
    decided = emqx_first_match(rules, action, real, subject)
    if decided is None:
        return "fell_through", True
    return "decided", decided == await pdp_allows(pdp, subject, action, real)


async def own_channel_publishes(pdp: PDP, rules: list[dict[str, Any]], subject: str) -> None:
    """Every publish the subject may make on a channel is allowed by a rule, never left to an HTTP call."""
    tenant = subject.split("-")[0]
    template = TopicTemplate(pdp.template.template)
    for channel in (*CHANNELS, GONE, "cX"):
        for subtopic in ("", "a", "a/b") if template.has_subtopic else ("",):
            topic = template.topic_for(tenant, channel, subtopic)
            if await pdp_allows(pdp, subject, "publish", topic):
                assert emqx_first_match(rules, "publish", topic, subject) is True, (subject, topic, rules)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(world=worlds(), rng=st.randoms(use_true_random=False))
def test_the_pushed_acl_decides_only_what_authhook_decides_the_same_way(world: World, rng: random.Random) -> None:
    requests = asks(rng, world.template, 100)

    async def run() -> None:
        pdp = await build(world)
        try:
            acls = {subject: await session_acl(pdp, subject) for subject in ALL_SUBJECTS}
            for subject, rules in acls.items():
                assert rules is not None
                await own_channel_publishes(pdp, rules, subject)
            for subject, action, raw in requests:
                rules = acls[subject]
                assert rules is not None
                _, agrees = await replay(pdp, rules, subject, action, raw)
                assert agrees, (subject, action, raw, rules)
                if raw.startswith("$share/g/") and action == "subscribe" and emqx_real_filter(raw) is not None:
                    # authhook strips the prefix itself too: asked with it, it gives the same answer
                    assert await pdp_allows(pdp, subject, action, raw) == await pdp_allows(
                        pdp, subject, action, raw[len("$share/g/") :]
                    )
        finally:
            await pdp.close()

    asyncio.run(run())


# -- the cases that were wrong, one by one ---------------------------------------------------------------


async def single_role(*specs: BlockSpec, template: str = TEMPLATES[0]) -> PDP:
    """t0-u0 holds one role with the given blocks; t0 has channels c0..c2 (c3 existed once)."""
    world = World(template=template)
    for tenant in TENANTS:
        world.groups[tenant] = (set(), set(), set())
        world.roles[tenant] = []
    world.roles["t0"] = [(list(specs), {"t0-u0"})]
    return await build(world)


async def decisions(pdp: PDP, subject: str, action: str, topics: list[str]) -> dict[str, tuple[bool | None, bool]]:
    rules = await session_acl(pdp, subject)
    assert rules is not None
    return {t: (emqx_first_match(rules, action, t, subject), await pdp_allows(pdp, subject, action, t)) for t in topics}


SUB = frozenset({"subscribe"})


async def test_a_deny_inside_an_allowed_sys_tree_is_not_passed_over() -> None:
    """Allow `$SYS/#`, deny `$SYS/broker/secret/#`: the filter `$SYS/#` overlaps the deny without matching
    it, so an allow rule for `$SYS/#` would hand the secret topics over. It is asked over HTTP instead."""
    pdp = await single_role(
        ("topic", "$SYS/#", SUB, "allow"),
        ("topic", "$SYS/broker/secret/#", SUB, "deny"),
    )
    try:
        got = await decisions(pdp, "t0-u0", "subscribe", ["$SYS/#", "$SYS/broker/#", "$SYS/broker/secret/k"])
        assert got == {
            "$SYS/#": (None, False),
            "$SYS/broker/#": (None, False),
            "$SYS/broker/secret/k": (False, False),
        }
    finally:
        await pdp.close()


async def test_a_plus_in_a_sys_grant_does_not_admit_a_wider_filter() -> None:
    """EMQX's rule `+` matches a literal `#` level: `$SYS/broker/+` would admit `$SYS/broker/#`."""
    pdp = await single_role(("topic", "$SYS/broker/+", frozenset(ACTIONS), "allow"))
    try:
        subscribes = await decisions(pdp, "t0-u0", "subscribe", ["$SYS/broker/#", "$SYS/broker/+", "$SYS/broker/u"])
        assert subscribes == {
            "$SYS/broker/#": (None, False),
            "$SYS/broker/+": (None, True),
            "$SYS/broker/u": (None, True),
        }
        # a topic name holds no wildcard, so for publish the same grant is exact
        publishes = await decisions(pdp, "t0-u0", "publish", ["$SYS/broker/u", "$SYS/broker/u/v", "$SYS/x"])
        assert publishes == {"$SYS/broker/u": (True, True), "$SYS/broker/u/v": (None, False), "$SYS/x": (None, False)}
    finally:
        await pdp.close()


async def test_a_tenant_wide_grant_is_listed_channel_by_channel() -> None:
    """`m/t0/c/+/#` would admit channels that do not exist and an empty channel level; the tenant's
    existing channels are listed instead, and wildcard-channel filters are asked over HTTP."""
    pdp = await single_role(("tenant", None, frozenset(ACTIONS), "allow"))
    try:
        rules = await session_acl(pdp, "t0-u0")
        assert rules is not None
        assert {"permission": "allow", "action": "publish", "topics": [f"m/t0/c/{c}/#" for c in CHANNELS]} in rules
        assert not any("+" in t for rule in rules for t in rule.get("topics", [rule.get("topic", "")]))
        topics = ["m/t0/c/cX/x", "m/t0/c//x", "m/t0/c/c3", "m/t0/c/+/temp", "m/t0/#", "m/t0/c/c1/+", "+/t0/c/c1"]
        assert await decisions(pdp, "t0-u0", "subscribe", topics) == {
            "m/t0/c/cX/x": (None, False),
            "m/t0/c//x": (None, False),
            "m/t0/c/c3": (None, False),  # deleted
            "m/t0/c/+/temp": (None, True),
            "m/t0/#": (None, True),
            "m/t0/c/c1/+": (True, True),
            "+/t0/c/c1": (None, False),  # a literal level left open reaches outside the namespace: denied
        }
        publishes = await decisions(pdp, "t0-u0", "publish", ["m/t0/c/cX", "m/t0/c//x", "m/t0/c/c2/a", "m/t1/c/c2"])
        assert publishes == {
            "m/t0/c/cX": (False, False),
            "m/t0/c//x": (False, False),
            "m/t0/c/c2/a": (True, True),
            "m/t1/c/c2": (False, False),
        }
    finally:
        await pdp.close()


async def test_a_tenant_wide_grant_with_a_deny_still_lists_the_other_channels() -> None:
    """decide() allows every existing channel but the denied one; the ACL says the same, so no allowed
    publish costs a call and the denied channel is refused locally."""
    pdp = await single_role(
        ("tenant", None, frozenset({"publish"}), "allow"), ("channel", "c1", frozenset({"publish"}), "deny")
    )
    try:
        got = await decisions(pdp, "t0-u0", "publish", ["m/t0/c/c0", "m/t0/c/c1/x", "m/t0/c/c2/x"])
        assert got == {"m/t0/c/c0": (True, True), "m/t0/c/c1/x": (False, False), "m/t0/c/c2/x": (True, True)}
    finally:
        await pdp.close()


async def test_without_a_subtopic_level_the_one_longer_filter_is_listed_with_eq() -> None:
    """Template `{channel}/x/{tenant}`: authhook accepts the channel topic and `<channel topic>/#` only."""
    pdp = await single_role(("channel", "c0", SUB, "allow"), template="{channel}/x/{tenant}")
    try:
        got = await decisions(pdp, "t0-u0", "subscribe", ["c0/x/t0", "c0/x/t0/#", "c0/x/t0/a", "c0/x/t0/+"])
        assert got == {
            "c0/x/t0": (True, True),
            "c0/x/t0/#": (True, True),
            "c0/x/t0/a": (False, False),  # `deny subscribe #`: only a tenant-wide subscriber falls through
            "c0/x/t0/+": (False, False),
        }
    finally:
        await pdp.close()


async def test_a_subject_without_any_subscribe_right_is_refused_every_subscribe_locally() -> None:
    pdp = await single_role(("channel", "c0", frozenset({"publish"}), "allow"))
    try:
        rules = await session_acl(pdp, "t0-u0")
        assert rules is not None
        assert rules[-2:] == [
            {"permission": "deny", "action": "publish", "topic": "#"},
            {"permission": "deny", "action": "subscribe", "topic": "#"},
        ]
        got = await decisions(pdp, "t0-u0", "subscribe", ["m/t0/c/c0", "+/t0/c/c0", "$SYS/#"])
        assert got == {"m/t0/c/c0": (False, False), "+/t0/c/c0": (False, False), "$SYS/#": (None, False)}
    finally:
        await pdp.close()


async def test_a_placeholder_in_a_sys_grant_is_never_sent_as_a_rule_topic() -> None:
    """EMQX renders `${username}` in rule topics, authhook reads the block literally."""
    pdp = await single_role(
        ("topic", "$SYS/${username}/#", frozenset(ACTIONS), "deny"), ("topic", "$SYS/#", frozenset(ACTIONS), "allow")
    )
    try:
        rules = await session_acl(pdp, "t0-u0")
        assert rules is not None
        assert not any("$SYS" in t for rule in rules for t in rule.get("topics", [rule.get("topic", "")]))
        got = await decisions(pdp, "t0-u0", "publish", ["$SYS/t0-u0/x", "$SYS/${username}/x"])
        assert got == {"$SYS/t0-u0/x": (None, True), "$SYS/${username}/x": (None, False)}
    finally:
        await pdp.close()


def test_the_emqx_model_follows_emqx_topic_match() -> None:
    """The model itself, on cases read off ``emqx_topic:match/2`` and ``emqx_authz_rule:match_topic``."""
    cases = [
        ("a/b", "a/#", True),
        ("a", "a/#", True),
        ("a/#", "a/+", True),  # a rule '+' takes the request's literal '#'
        ("a/+", "a/b", False),  # a request '+' is just a word
        ("a//b", "a/+/b", True),
        ("$SYS/x", "#", False),
        ("$SYS/x", "+/x", False),
        ("$SYS/x", "$SYS/#", True),
        ("a/b", "eq a/+", False),
        ("a/+", "eq a/+", True),
    ]
    for topic, rule_topic, expected in cases:
        assert emqx_topic_matches(topic, rule_topic, "u", "u") is expected, (topic, rule_topic)
    assert emqx_real_filter("$share/g/a/#") == "a/#"
    assert emqx_real_filter("$queue/a") == "a"
    assert emqx_real_filter("$share/g+/a") is None
    assert emqx_real_filter("a/#/b") is None
    assert emqx_real_name("$delayed/10/a/b") == "a/b"
    assert emqx_real_name("a/+") is None
