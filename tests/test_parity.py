"""Parity: over random worlds and requests, the in-house, Cedar and embedded-OPA evaluators give the same
allow/deny. Any difference is a bug in one of them. Worlds and requests come from the isolation property
test (tenants, connections, groups, allow and deny blocks, wildcards, ``$share/`` prefixes).

A second test draws richer worlds that the isolation oracle does not model - nested subject and channel
groups, `$SYS` topic blocks, disabled subjects and tenants, CONNECT, broker-claimed tenants - biased
towards the subject's own tenant, where allows and deny blocks actually decide."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from authhook import PDP, Settings, make_request
from authhook.evaluators.cedar import CedarEvaluator
from authhook.evaluators.inhouse import InHouseEvaluator
from authhook.evaluators.opa import EmbeddedOpaEvaluator
from authhook.models import AuthzRequest, Verdict
from authhook.store.base import Channel, Connection, Group, SubjectRecord, Tenant

from .test_property_isolation import CHANNELS, World, action_sets, build, put_roles, requests, worlds


@pytest.mark.timeout(900)  # 2,000 random worlds, three engines each: minutes, not the 2-minute default
@settings(max_examples=2000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(world=worlds(), asks=st.lists(requests(), min_size=1, max_size=12))
def test_all_evaluators_agree(world: World, asks: list[tuple[str, str, str]]) -> None:
    async def run() -> None:
        pdp = await build(world)
        evaluators = [InHouseEvaluator(pdp.store), CedarEvaluator(pdp.store), EmbeddedOpaEvaluator(pdp.store)]
        try:
            for subject, action, topic in asks:
                request = make_request(action, subject, topic)
                target = pdp.resolve(request)
                if not hasattr(target, "address"):  # refused before any evaluator runs
                    continue
                verdicts = [await evaluator.evaluate(request, target) for evaluator in evaluators]  # type: ignore[arg-type]
                answers = {v.evaluator: v.allowed for v in verdicts}
                assert len(set(answers.values())) == 1, (subject, action, topic, answers, [v.detail for v in verdicts])
        finally:
            for evaluator in evaluators:
                await evaluator.close()
            await pdp.close()

    asyncio.run(run())


# -- richer worlds: what the isolation oracle does not model, so only agreement can be checked ----------

RICH_TENANTS = ("t0", "t1")
RICH_SUBJECTS = tuple(f"{t}-{s}" for t in RICH_TENANTS for s in ("d0", "d1", "u0"))
SYSTEM_FILTERS = ("$SYS/#", "$SYS/broker/+", "$SYS/broker/load", "$SYS/+/load")


@dataclass
class RichWorld:
    """Two tenants with every feature the evaluators must agree on: nested subject and channel groups,
    topic-scoped (`$SYS`) blocks, disabled subjects and tenants, and requests that claim a tenant."""

    disabled_tenants: frozenset[str]
    disabled_subjects: frozenset[str]
    connections: dict[tuple[str, str], frozenset[str]]
    # per tenant: members of the leaf subject group "sg" (nested under "sgp") and of "sgp" itself
    subject_groups: dict[str, tuple[frozenset[str], frozenset[str]]]
    # per tenant: channels of the leaf channel group "cg" (nested under "cgp") and of "cgp" itself
    channel_groups: dict[str, tuple[frozenset[str], frozenset[str]]]
    roles: dict[str, list[tuple[list[tuple[str, str | None, frozenset[str], str]], frozenset[str]]]]


rich_action_sets = st.sampled_from(
    [frozenset({"publish"}), frozenset({"subscribe"}), frozenset({"publish", "subscribe"}), frozenset({"connect"})]
)


@st.composite
def rich_worlds(draw: st.DrawFn) -> RichWorld:
    connections, subject_groups, channel_groups, roles = {}, {}, {}, {}
    for tenant in RICH_TENANTS:
        subjects = [s for s in RICH_SUBJECTS if s.startswith(tenant)]
        for client in subjects[:2]:
            for channel in CHANNELS:
                if draw(st.integers(0, 2)) == 0:
                    connections[(client, channel)] = draw(action_sets)
        pick_subjects = st.frozensets(st.sampled_from(subjects))
        pick_channels = st.frozensets(st.sampled_from(CHANNELS))
        subject_groups[tenant] = (draw(pick_subjects), draw(pick_subjects))
        channel_groups[tenant] = (draw(pick_channels), draw(pick_channels))
        tenant_roles = []
        for _ in range(draw(st.integers(0, 3))):
            blocks = []
            for _ in range(draw(st.integers(1, 3))):
                scope = draw(st.sampled_from(["tenant", "channel", "channel_group", "topic"]))
                ref = {
                    "tenant": None,
                    "channel": draw(st.sampled_from(CHANNELS)),
                    "channel_group": draw(st.sampled_from(["cg", "cgp"])),
                    "topic": draw(st.sampled_from(SYSTEM_FILTERS)),
                }[scope]
                effect = draw(st.sampled_from(["allow", "allow", "deny"]))
                blocks.append((scope, ref, draw(rich_action_sets), effect))
            assignees = draw(st.frozensets(st.sampled_from([*subjects, "group:sg", "group:sgp"]), min_size=1))
            tenant_roles.append((blocks, assignees))
        roles[tenant] = tenant_roles
    return RichWorld(
        # mostly everything enabled, so that the rest of the world gets to decide
        disabled_tenants=draw(st.sampled_from([frozenset(), frozenset(), frozenset(), *map(frozenset, RICH_TENANTS)])),
        disabled_subjects=draw(st.frozensets(st.sampled_from(RICH_SUBJECTS), max_size=1)),
        connections=connections,
        subject_groups=subject_groups,
        channel_groups=channel_groups,
        roles=roles,
    )


@st.composite
def rich_requests(draw: st.DrawFn) -> AuthzRequest:
    subject = draw(st.sampled_from([*RICH_SUBJECTS, "ghost"]))
    own = subject.split("-")[0]
    action = draw(st.sampled_from(["publish", "subscribe", "subscribe", "connect"]))
    claimed = draw(st.sampled_from([None, None, None, own, "t1" if own == "t0" else "t0"]))
    if action == "connect":
        return make_request(action, subject, tenant=claimed)
    # mostly the subject's own tenant, where allows and deny blocks live
    tenant = draw(st.sampled_from([own, own, own, "t0", "t1", "+"]))
    channel = draw(st.sampled_from([*CHANNELS, "cX", "+", "#"]))
    if draw(st.integers(0, 5)) == 0:
        topic = draw(st.sampled_from(["$SYS/broker/load", "$SYS/broker/+", "$SYS/#", "$SYS/other/load", "#"]))
    elif channel == "#":
        topic = f"m/{tenant}/c/#"
    else:
        topic = f"m/{tenant}/c/{channel}" + draw(st.sampled_from(["", "/a", "/+", "/#"]))
    if action == "publish" and any(w in topic for w in "+#"):
        topic = topic.replace("+", "c0").replace("/#", "/a").replace("#", "x")
    if action == "subscribe" and draw(st.integers(0, 4)) == 0:
        topic = "$share/grp/" + topic
    return make_request(action, subject, topic, tenant=claimed)


async def build_rich(world: RichWorld) -> PDP:
    pdp = PDP.from_settings(Settings(store_url="sqlite://:memory:", secret_key="k" * 64))
    await pdp.open()
    store = pdp.store
    secret = pdp.hasher.hash_client_secret("0123456789abcdef")
    for tenant in RICH_TENANTS:
        await store.put_tenant(Tenant(id=tenant, enabled=tenant not in world.disabled_tenants))
        for subject in (s for s in RICH_SUBJECTS if s.startswith(tenant)):
            kind = "user" if subject.endswith("u0") else "client"
            enabled = subject not in world.disabled_subjects
            await store.put_subject(SubjectRecord(id=subject, tenant=tenant, kind=kind, enabled=enabled), secret)
        for channel in CHANNELS:
            await store.put_channel(Channel(id=channel, tenant=tenant))
        for kind, parent, leaf, (leaf_members, parent_members) in (
            ("subjects", "sgp", "sg", world.subject_groups[tenant]),
            ("channels", "cgp", "cg", world.channel_groups[tenant]),
        ):
            await store.put_group(Group(id=parent, tenant=tenant, kind=kind))
            await store.put_group(Group(id=leaf, tenant=tenant, kind=kind, parent=parent))
            for member in leaf_members:
                await store.add_member(tenant, leaf, member)
            for member in parent_members:
                await store.add_member(tenant, parent, member)
        await put_roles(store, tenant, world.roles[tenant])
    for (client, channel), actions in world.connections.items():
        tenant = client.split("-")[0]
        await store.connect(Connection(tenant=tenant, client=client, channel=channel, actions=actions))
    return pdp


@pytest.mark.timeout(900)
@settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(world=rich_worlds(), asks=st.lists(rich_requests(), min_size=1, max_size=12))
def test_all_evaluators_agree_on_groups_system_topics_and_disabled_subjects(
    world: RichWorld, asks: list[AuthzRequest]
) -> None:
    async def run() -> None:
        pdp = await build_rich(world)
        evaluators = [InHouseEvaluator(pdp.store), CedarEvaluator(pdp.store), EmbeddedOpaEvaluator(pdp.store)]
        try:
            for request in asks:
                target = pdp.resolve(request)
                if isinstance(target, Verdict):  # refused before any evaluator runs
                    continue
                verdicts = [await evaluator.evaluate(request, target) for evaluator in evaluators]
                answers = {v.evaluator: v.allowed for v in verdicts}
                event(f"{'allow' if verdicts[0].allowed else 'deny'}: {verdicts[0].reason.value}")
                assert len(set(answers.values())) == 1, (request, answers, [v.detail for v in verdicts])
        finally:
            for evaluator in evaluators:
                await evaluator.close()
            await pdp.close()

    asyncio.run(run())
