"""Property: over random worlds, no subject is ever allowed to publish or subscribe outside what its
connections and roles grant - across tenants, with wildcard filters and ``$share/`` prefixes.

The oracle below is written independently of the evaluator: it enumerates the concrete topics a request
could reach and asks, per (tenant, channel), whether a connection or an allow block grants the action and
no deny block takes it away. Allowed requests must be covered everywhere they reach (soundness); exact
topics on known channels must be answered exactly as the oracle says (completeness).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from itertools import product

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from authhook import PDP, Settings, make_request
from authhook.store.base import Assignment, Block, Channel, Connection, Group, Role, Store, SubjectRecord, Tenant

TENANTS = ("t0", "t1", "t2")
CHANNELS = ("c0", "c1", "c2")
ACTIONS = ("publish", "subscribe")


def subjects_of(tenant: str) -> tuple[str, ...]:
    return (f"{tenant}-d0", f"{tenant}-d1", f"{tenant}-u0")


ALL_SUBJECTS = tuple(s for t in TENANTS for s in subjects_of(t))


@dataclass
class World:
    connections: dict[tuple[str, str], set[str]] = field(default_factory=dict)  # (client, channel) -> actions
    channel_group: dict[str, set[str]] = field(default_factory=dict)  # tenant -> channels in its group "cg"
    subject_group: dict[str, set[str]] = field(default_factory=dict)  # tenant -> subjects in group "sg"
    # tenant -> list of (blocks, assignees); block = (scope, ref, actions, effect)
    roles: dict[str, list[tuple[list[tuple[str, str | None, frozenset[str], str]], set[str]]]] = field(
        default_factory=dict
    )

    def blocks_for(self, subject: str) -> list[tuple[str, str | None, frozenset[str], str]]:
        tenant = subject.split("-")[0]
        in_group = subject in self.subject_group.get(tenant, set())
        found = []
        for blocks, assignees in self.roles.get(tenant, []):
            if subject in assignees or (in_group and "group:sg" in assignees):
                found.extend(blocks)
        return found

    def grants(self, subject: str, action: str, tenant: str, channel: str) -> bool:
        """Oracle: may ``subject`` do ``action`` on ``channel`` of ``tenant``? Unknown channels: 'cX'."""
        if tenant != subject.split("-")[0]:
            return False
        blocks = [b for b in self.blocks_for(subject) if action in b[2]]

        def covers(scope: str, ref: str | None) -> bool:
            if scope == "tenant":
                return True
            if scope == "channel":
                return ref == channel
            return channel in self.channel_group.get(tenant, set())

        if any(effect == "deny" and covers(scope, ref) for scope, ref, _, effect in blocks):
            return False
        if channel == "cX":  # reachable only through a wildcard, and only with a tenant-wide allow
            return any(scope == "tenant" and effect == "allow" for scope, _, _, effect in blocks)
        if action in self.connections.get((subject, channel), set()):
            return True
        return any(effect == "allow" and covers(scope, ref) for scope, ref, _, effect in blocks)


action_sets = st.sampled_from([frozenset({"publish"}), frozenset({"subscribe"}), frozenset(ACTIONS)])


@st.composite
def worlds(draw: st.DrawFn) -> World:
    world = World()
    for tenant in TENANTS:
        clients = subjects_of(tenant)[:2]
        for client, channel in product(clients, CHANNELS):
            if draw(st.booleans()) and draw(st.booleans()):
                world.connections[(client, channel)] = set(draw(action_sets))
        world.channel_group[tenant] = set(draw(st.sets(st.sampled_from(CHANNELS))))
        world.subject_group[tenant] = set(draw(st.sets(st.sampled_from(subjects_of(tenant)))))
        roles = []
        for _ in range(draw(st.integers(0, 3))):
            blocks = []
            for _ in range(draw(st.integers(1, 2))):
                scope = draw(st.sampled_from(["tenant", "channel", "channel_group"]))
                ref = {"tenant": None, "channel": draw(st.sampled_from(CHANNELS)), "channel_group": "cg"}[scope]
                effect = draw(st.sampled_from(["allow", "allow", "deny"]))
                blocks.append((scope, ref, draw(action_sets), effect))
            assignees = set(draw(st.sets(st.sampled_from([*subjects_of(tenant), "group:sg"]), min_size=1)))
            roles.append((blocks, assignees))
        world.roles[tenant] = roles
    return world


TENANT_LEVELS = (*TENANTS, "tX", "+", "#")
CHANNEL_LEVELS = (*CHANNELS, "cX", "+", "#")
SUBTOPICS = ("", "/a", "/+", "/#", "/a/b")


@st.composite
def topics(draw: st.DrawFn) -> str:
    kind = draw(st.sampled_from(["channel", "channel", "channel", "special"]))
    if kind == "special":
        return draw(st.sampled_from(["#", "+/#", "+/+/+/+", "m/#", "m/+/#", "foo/bar", "$SYS/#", "m/t0", "+"]))
    tenant, channel, sub = draw(st.sampled_from(TENANT_LEVELS)), draw(st.sampled_from(CHANNEL_LEVELS)), ""
    if tenant == "#":
        return "m/#"
    if channel == "#":
        return f"m/{tenant}/c/#"
    sub = draw(st.sampled_from(SUBTOPICS))
    return f"m/{tenant}/c/{channel}{sub}"


@st.composite
def requests(draw: st.DrawFn) -> tuple[str, str, str]:
    subject = draw(st.sampled_from(ALL_SUBJECTS))
    action = draw(st.sampled_from(ACTIONS))
    topic = draw(topics())
    if action == "subscribe":
        topic = draw(st.sampled_from(["", "$share/grp/", "$queue/"])) + topic
    return subject, action, topic


CONCRETE = [f"m/{t}/c/{c}{s}" for t in (*TENANTS, "tX") for c in (*CHANNELS, "cX") for s in ("", "/a", "/a/b")] + [
    "foo/bar",
    "$SYS/x",
    "m/t0",
    "m/t0/c",
]


def stripped(topic: str) -> str:
    for prefix in ("$share/grp/", "$queue/"):
        if topic.startswith(prefix):
            return topic[len(prefix) :]
    return topic


RoleSpec = tuple[list[tuple[str, str | None, frozenset[str], str]], "set[str] | frozenset[str]"]


async def put_roles(store: Store, tenant: str, roles: list[RoleSpec]) -> None:
    """Roles r0, r1, ... with blocks b0, b1, ..., assigned to subjects or to `group:<id>`."""
    for index, (blocks, assignees) in enumerate(roles):
        role = Role(
            id=f"r{index}",
            tenant=tenant,
            blocks=tuple(
                Block(id=f"b{i}", scope=scope, ref=ref, actions=actions, effect=effect)
                for i, (scope, ref, actions, effect) in enumerate(blocks)
            ),
        )
        await store.put_role(role)
        for assignee in sorted(assignees):
            group = assignee.startswith("group:")
            await store.assign(
                Assignment(
                    tenant=tenant,
                    role=role.id,
                    assignee_kind="group" if group else "subject",
                    assignee=assignee.removeprefix("group:"),
                )
            )


async def build(world: World) -> PDP:
    pdp = PDP.from_settings(Settings(store_url="sqlite://:memory:", secret_key="k" * 64))
    await pdp.open()
    store = pdp.store
    secret = pdp.hasher.hash_client_secret("0123456789abcdef")
    for tenant in TENANTS:
        await store.put_tenant(Tenant(id=tenant))
        for subject in subjects_of(tenant):
            kind = "user" if subject.endswith("u0") else "client"
            await store.put_subject(SubjectRecord(id=subject, tenant=tenant, kind=kind), secret)
        for channel in CHANNELS:
            await store.put_channel(Channel(id=channel, tenant=tenant))
        await store.put_group(Group(id="cg", tenant=tenant, kind="channels"))
        for channel in world.channel_group[tenant]:
            await store.add_member(tenant, "cg", channel)
        await store.put_group(Group(id="sg", tenant=tenant, kind="subjects"))
        for subject in world.subject_group[tenant]:
            await store.add_member(tenant, "sg", subject)
        await put_roles(store, tenant, world.roles[tenant])
    for (client, channel), actions in world.connections.items():
        tenant = client.split("-")[0]
        await store.connect(Connection(tenant=tenant, client=client, channel=channel, actions=frozenset(actions)))
    return pdp


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(world=worlds(), asks=st.lists(requests(), min_size=1, max_size=25))
def test_no_allow_outside_connections_and_roles(world: World, asks: list[tuple[str, str, str]]) -> None:
    async def run() -> None:
        pdp = await build(world)
        try:
            for subject, action, topic in asks:
                # Ask twice: the cached answer must be the same answer.
                for _ in range(2):
                    decision = await pdp.authorize(make_request(action, subject, topic))
                    check(world, subject, action, topic, decision.allowed, decision.verdict.detail)
        finally:
            await pdp.close()

    asyncio.run(run())


def reaches(topic_filter: str, topic: str) -> bool:
    """MQTT 3.1.1 section 4.7 matching, written here so the oracle does not share the code under test:
    `+` is one whole level, `#` the rest (including the parent level), and a first level starting with `$`
    is never matched by a leading wildcard."""
    if topic.startswith("$") and topic_filter[:1] in ("+", "#"):
        return False
    want, have = topic_filter.split("/"), topic.split("/")
    for i, level in enumerate(want):
        if level == "#":
            return True
        if i >= len(have) or (level != "+" and level != have[i]):
            return False
    return len(want) == len(have)


def check(world: World, subject: str, action: str, topic: str, allowed: bool, detail: str) -> None:
    inner = stripped(topic)
    if allowed:
        for concrete in CONCRETE:
            reached = concrete == inner if action == "publish" else reaches(inner, concrete)
            if not reached:
                continue
            parts = concrete.split("/")
            in_namespace = len(parts) >= 4 and parts[0] == "m" and parts[2] == "c"
            if not in_namespace:
                # `m/t0/c/#` also matches `m/t0/c`. Nobody may publish outside the channel namespace
                # (asserted below), so nothing can arrive there; it must still be the subject's own prefix.
                own = subject.split("-")[0]
                assert action == "subscribe" and concrete.startswith(f"m/{own}"), (
                    f"{subject} may {action} {topic!r}, which reaches {concrete!r}"
                )
                continue
            assert world.grants(subject, action, parts[1], parts[3]), (
                f"{subject} may {action} {topic!r}, reaching {concrete!r} without a grant ({detail})"
            )
    parts = topic.split("/")
    if action == "publish" and allowed:
        assert len(parts) >= 4 and parts[0] == "m" and parts[2] == "c", f"{subject} may publish {topic!r}"
    exact = (
        len(parts) >= 4
        and parts[0] == "m"
        and parts[2] == "c"
        and parts[1] in TENANTS
        and parts[3] in CHANNELS
        and not any(p in ("+", "#") for p in parts)
    )
    if exact:
        assert allowed == world.grants(subject, action, parts[1], parts[3]), (
            f"{subject} {action} {topic!r}: got {allowed}, oracle says otherwise ({detail})"
        )
