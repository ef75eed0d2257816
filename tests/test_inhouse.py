"""The in-house model's behaviour over the demo world: every reason code, deny-wins, tenant isolation."""

from __future__ import annotations

import pytest

from authhook import PDP, Reason, make_request
from authhook.store.base import Block, Role

P, S, C = "publish", "subscribe", "connect"

CASES = [
    # connections
    (P, "acme-thermo-1", "m/acme/c/telemetry/temp", True, Reason.CONNECTED),
    (P, "acme-thermo-1", "m/acme/c/telemetry", True, Reason.CONNECTED),
    (S, "acme-thermo-1", "m/acme/c/telemetry", False, Reason.NOT_CONNECTED),
    (S, "acme-thermo-1", "m/acme/c/commands/#", True, Reason.CONNECTED),
    (S, "acme-dashboard", "m/acme/c/telemetry/+/temp", True, Reason.CONNECTED),
    (S, "acme-dashboard", "$share/g1/m/acme/c/telemetry/#", True, Reason.CONNECTED),
    (S, "acme-dashboard", "$queue/m/acme/c/telemetry/#", True, Reason.CONNECTED),
    # tenant isolation, whatever the wildcard or prefix
    (P, "acme-thermo-1", "m/globex/c/telemetry", False, Reason.WRONG_TENANT),
    (S, "acme-dashboard", "m/globex/c/telemetry/#", False, Reason.WRONG_TENANT),
    (S, "acme-dashboard", "$share/g1/m/globex/c/telemetry/#", False, Reason.WRONG_TENANT),
    (S, "alice@acme.example", "m/+/c/telemetry", False, Reason.WILDCARD_TOO_BROAD),
    (S, "alice@acme.example", "#", False, Reason.WILDCARD_TOO_BROAD),
    (S, "alice@acme.example", "m/#", False, Reason.WILDCARD_TOO_BROAD),
    (S, "alice@acme.example", "+/+/+/+", False, Reason.OUTSIDE_NAMESPACE),  # `+` at the literal `m` level
    (S, "alice@acme.example", "m/+/c/telemetry", False, Reason.WILDCARD_TOO_BROAD),
    (S, "acme-dashboard", "m/acme/+/telemetry/#", False, Reason.OUTSIDE_NAMESPACE),
    (S, "acme-dashboard", "+/acme/c/telemetry/#", False, Reason.OUTSIDE_NAMESPACE),
    (S, "alice@acme.example", "$share/ops/#", False, Reason.WILDCARD_TOO_BROAD),
    # channel wildcards need a tenant-wide grant
    (S, "acme-dashboard", "m/acme/c/+/temp", False, Reason.WILDCARD_TOO_BROAD),
    (S, "acme-dashboard", "m/acme/#", False, Reason.WILDCARD_TOO_BROAD),
    (S, "alice@acme.example", "m/acme/c/+/temp", True, Reason.ROLE_GRANT),
    (S, "alice@acme.example", "m/acme/#", True, Reason.ROLE_GRANT),
    (S, "alice@acme.example", "$share/ops/m/acme/c/+", True, Reason.ROLE_GRANT),
    (P, "alice@acme.example", "m/acme/c/telemetry", False, Reason.NOT_CONNECTED),
    # groups, nesting and deny-wins
    (P, "acme-gateway", "m/acme/c/telemetry/x", True, Reason.ROLE_GRANT),
    (S, "acme-gateway", "m/acme/c/alarms", True, Reason.ROLE_GRANT),
    (P, "acme-gateway", "m/acme/c/alarms", False, Reason.DENIED_BY_BLOCK),
    (P, "acme-gateway", "m/acme/c/commands", False, Reason.NOT_CONNECTED),
    # $SYS only when granted
    (S, "alice@acme.example", "$SYS/broker/load/#", True, Reason.ROLE_GRANT),
    (S, "alice@acme.example", "$SYS/#", True, Reason.ROLE_GRANT),
    (P, "alice@acme.example", "$SYS/broker/load", False, Reason.SYSTEM_TOPIC),
    (S, "acme-dashboard", "$SYS/#", False, Reason.SYSTEM_TOPIC),
    (S, "acme-dashboard", "$share/g/$SYS/#", False, Reason.SYSTEM_TOPIC),
    # unknowns and outside the namespace
    (P, "nobody", "m/acme/c/telemetry", False, Reason.UNKNOWN_SUBJECT),
    (P, "acme-thermo-1", "m/acme/c/nochannel", False, Reason.UNKNOWN_CHANNEL),
    (P, "acme-thermo-1", "foo/bar", False, Reason.OUTSIDE_NAMESPACE),
    (P, "acme-thermo-1", "/m/acme/c/telemetry", False, Reason.OUTSIDE_NAMESPACE),
    (P, "acme-thermo-1", "m//c/telemetry", False, Reason.OUTSIDE_NAMESPACE),
    # invalid topics never reach the evaluator
    (P, "acme-thermo-1", "m/acme/c/telemetry/+", False, Reason.INVALID_TOPIC),
    (P, "acme-thermo-1", "m/acme/c/telemetry/#", False, Reason.INVALID_TOPIC),
    (P, "acme-thermo-1", "m/acme/c/telemetry\x00x", False, Reason.INVALID_TOPIC),
    (P, "acme-thermo-1", "", False, Reason.INVALID_TOPIC),
    (S, "acme-thermo-1", "m/acme/c/commands/#/x", False, Reason.INVALID_FILTER),
    (S, "acme-thermo-1", "m/acme/c/comm+ands", False, Reason.INVALID_FILTER),
    (S, "acme-thermo-1", "$share//m/acme/c/commands", False, Reason.INVALID_SHARED_SUBSCRIPTION),
    (S, "acme-thermo-1", "$share/g", False, Reason.INVALID_SHARED_SUBSCRIPTION),
    (P, "acme-thermo-1", None, False, Reason.MISSING_TOPIC),
    # connect
    (C, "acme-thermo-1", None, True, Reason.SUBJECT_ACTIVE),
    (C, "nobody", None, False, Reason.UNKNOWN_SUBJECT),
]


@pytest.mark.parametrize(("action", "user", "topic", "allowed", "reason"), CASES)
async def test_demo_world_decisions(
    demo: PDP, action: str, user: str, topic: str | None, allowed: bool, reason: Reason
) -> None:
    decision = await demo.authorize(make_request(action, user, topic))
    assert (decision.allowed, decision.reason) == (allowed, reason), decision.verdict.detail


async def test_a_claimed_tenant_must_match_the_subjects(demo: PDP) -> None:
    decision = await demo.authorize(make_request(P, "acme-thermo-1", "m/acme/c/telemetry", tenant="globex"))
    assert decision.reason is Reason.WRONG_TENANT
    assert not decision.allowed


async def test_disabled_subject_and_tenant_are_denied(demo: PDP) -> None:
    request = make_request(P, "acme-thermo-1", "m/acme/c/telemetry")
    await demo.store.set_subject_enabled("acme-thermo-1", False)
    assert (await demo.authorize(request)).reason is Reason.SUBJECT_DISABLED
    await demo.store.set_subject_enabled("acme-thermo-1", True)
    assert (await demo.authorize(request)).allowed
    tenant = (await demo.store.list_tenants())[0]
    await demo.store.put_tenant(tenant.model_copy(update={"enabled": False}))
    assert (await demo.authorize(request)).reason is Reason.TENANT_DISABLED


async def test_a_deny_block_beats_a_connection(demo: PDP) -> None:
    request = make_request(P, "acme-thermo-1", "m/acme/c/telemetry")
    assert (await demo.authorize(request)).allowed
    block = Block(id="quiet", scope="channel", ref="telemetry", actions=frozenset({"publish"}), effect="deny")
    await demo.store.put_role(Role(id="quarantine", tenant="acme", blocks=(block,)))
    await demo.store.assign(_subject_assignment("quarantine", "acme-thermo-1"))
    decision = await demo.authorize(request)
    assert decision.reason is Reason.DENIED_BY_BLOCK
    assert decision.verdict.decided_by == "role:quarantine/block:quiet"


async def test_a_deny_block_anywhere_in_the_tenant_stops_a_channel_wildcard(demo: PDP) -> None:
    request = make_request(S, "alice@acme.example", "m/acme/c/+")
    assert (await demo.authorize(request)).allowed
    block = Block(id="no-cmd", scope="channel", ref="commands", actions=frozenset({"subscribe"}), effect="deny")
    await demo.store.put_role(Role(id="restrict", tenant="acme", blocks=(block,)))
    await demo.store.assign(_subject_assignment("restrict", "alice@acme.example"))
    assert (await demo.authorize(request)).reason is Reason.DENIED_BY_BLOCK
    # the exact channel that is not denied stays reachable
    assert (await demo.authorize(make_request(S, "alice@acme.example", "m/acme/c/telemetry"))).allowed


async def test_nested_channel_groups_grant_through_the_parent(demo: PDP) -> None:
    from authhook.store.base import Group

    await demo.store.put_group(Group(id="site", tenant="acme", kind="channels"))
    await demo.store.put_group(Group(id="plant-floor", tenant="acme", kind="channels", parent="site"))
    block = Block(id="site-pub", scope="channel_group", ref="site", actions=frozenset({"publish"}))
    await demo.store.put_role(Role(id="site-writer", tenant="acme", blocks=(block,)))
    await demo.store.assign(_subject_assignment("site-writer", "acme-dashboard"))
    decision = await demo.authorize(make_request(P, "acme-dashboard", "m/acme/c/telemetry"))
    assert (decision.allowed, decision.verdict.decided_by) == (True, "role:site-writer/block:site-pub")
    assert not (await demo.authorize(make_request(P, "acme-dashboard", "m/acme/c/commands"))).allowed


async def test_a_connect_deny_block_refuses_the_session(demo: PDP) -> None:
    block = Block(id="banned", scope="tenant", actions=frozenset({"connect"}), effect="deny")
    await demo.store.put_role(Role(id="ban", tenant="acme", blocks=(block,)))
    await demo.store.assign(_subject_assignment("ban", "acme-thermo-1"))
    decision = await demo.authorize(make_request(C, "acme-thermo-1"))
    assert decision.reason is Reason.DENIED_BY_BLOCK


def _subject_assignment(role: str, subject: str):  # type: ignore[no-untyped-def]
    from authhook.store.base import Assignment

    return Assignment(tenant="acme", role=role, assignee_kind="subject", assignee=subject)
