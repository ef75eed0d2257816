"""The Cedar evaluator against the in-house behaviour table: same allow/deny, same reason codes."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import cedarpy
import pytest

from authhook import PDP, Reason, make_request
from authhook.errors import EvaluatorUnavailable
from authhook.evaluators.base import PolicyEvaluator
from authhook.evaluators.cedar import DEFAULT_POLICIES, DEFAULT_SCHEMA, CedarEvaluator
from authhook.evaluators.inhouse import decide
from authhook.models import Action, Target
from authhook.store.base import (
    Assignment,
    Block,
    BlockFact,
    Effect,
    Facts,
    Group,
    Role,
    ScopeKind,
    SubjectFact,
    SubjectKind,
)
from authhook.topics import ChannelAddress
from tests.test_inhouse import CASES

P, S, C = "publish", "subscribe", "connect"


@pytest.fixture
async def cedar(demo: PDP) -> AsyncIterator[PDP]:
    """The demo world, decided by Cedar (no cache)."""
    pdp = PDP(demo.store, demo.hasher, evaluator=CedarEvaluator(demo.store))
    yield pdp
    await pdp.evaluator.close()


def _assign(role: str, subject: str) -> Assignment:
    return Assignment(tenant="acme", role=role, assignee_kind="subject", assignee=subject)


@pytest.mark.parametrize(("action", "user", "topic", "allowed", "reason"), CASES)
async def test_demo_world_decisions_match_inhouse(
    cedar: PDP, demo: PDP, action: str, user: str, topic: str | None, allowed: bool, reason: Reason
) -> None:
    request = make_request(action, user, topic)
    decision = await cedar.authorize(request)
    inhouse = await demo.authorize(request)
    assert decision.allowed == inhouse.allowed == allowed, decision.verdict.detail
    assert decision.reason is reason, decision.verdict.detail
    # decisions reached by the core before any evaluator runs carry the core's name
    if decision.verdict.evaluator != "core":
        assert decision.verdict.evaluator == "cedar"
        assert decision.verdict.revision == inhouse.verdict.revision


async def test_decided_by_names_the_cedar_policies(cedar: PDP) -> None:
    verdict = (await cedar.authorize(make_request(P, "acme-thermo-1", "m/acme/c/telemetry"))).verdict
    assert verdict.decided_by == "permit-connection"
    verdict = (await cedar.authorize(make_request(P, "acme-gateway", "m/acme/c/alarms"))).verdict
    assert verdict.decided_by == "forbid-deny-block[role:floor-gateway/block:no-alarms]"
    verdict = (await cedar.authorize(make_request(S, "alice@acme.example", "$SYS/#"))).verdict
    assert verdict.decided_by == "permit-allow-block[role:operator/block:broker-stats]"
    verdict = (await cedar.authorize(make_request(S, "alice@acme.example", "m/acme/#"))).verdict
    assert verdict.decided_by == "permit-allow-block[role:operator/block:watch-all]"
    verdict = (await cedar.authorize(make_request(P, "acme-thermo-1", "m/globex/c/telemetry"))).verdict
    # every satisfied forbid is named, the first (in the in-house order) gives the reason
    assert verdict.decided_by is not None
    assert verdict.decided_by.split(",")[0] == "forbid-cross-tenant"
    assert verdict.subject_tenant == "acme"
    verdict = (await cedar.authorize(make_request(S, "acme-thermo-1", "m/acme/c/telemetry"))).verdict
    assert verdict.decided_by is None  # Cedar's default deny


async def test_a_claimed_tenant_must_match_the_subjects(cedar: PDP) -> None:
    decision = await cedar.authorize(make_request(P, "acme-thermo-1", "m/acme/c/telemetry", tenant="globex"))
    assert (decision.allowed, decision.reason) == (False, Reason.WRONG_TENANT)
    assert decision.verdict.decided_by == "forbid-claimed-tenant"
    decision = await cedar.authorize(make_request(P, "acme-thermo-1", "m/acme/c/telemetry", tenant="acme"))
    assert decision.allowed


async def test_disabled_subject_and_tenant_are_denied(cedar: PDP) -> None:
    request = make_request(P, "acme-thermo-1", "m/acme/c/telemetry")
    await cedar.store.set_subject_enabled("acme-thermo-1", False)
    assert (await cedar.authorize(request)).reason is Reason.SUBJECT_DISABLED
    assert (await cedar.authorize(make_request(C, "acme-thermo-1"))).reason is Reason.SUBJECT_DISABLED
    await cedar.store.set_subject_enabled("acme-thermo-1", True)
    assert (await cedar.authorize(request)).allowed
    tenant = next(t for t in await cedar.store.list_tenants() if t.id == "acme")
    await cedar.store.put_tenant(tenant.model_copy(update={"enabled": False}))
    assert (await cedar.authorize(request)).reason is Reason.TENANT_DISABLED
    assert (await cedar.authorize(make_request(C, "acme-thermo-1"))).reason is Reason.TENANT_DISABLED


async def test_a_deny_block_beats_a_connection(cedar: PDP) -> None:
    request = make_request(P, "acme-thermo-1", "m/acme/c/telemetry")
    assert (await cedar.authorize(request)).allowed
    block = Block(id="quiet", scope="channel", ref="telemetry", actions=frozenset({"publish"}), effect="deny")
    await cedar.store.put_role(Role(id="quarantine", tenant="acme", blocks=(block,)))
    await cedar.store.assign(_assign("quarantine", "acme-thermo-1"))
    decision = await cedar.authorize(request)
    assert (decision.allowed, decision.reason) == (False, Reason.DENIED_BY_BLOCK)
    assert decision.verdict.decided_by == "forbid-deny-block[role:quarantine/block:quiet]"


async def test_a_deny_block_anywhere_in_the_tenant_stops_a_channel_wildcard(cedar: PDP) -> None:
    request = make_request(S, "alice@acme.example", "m/acme/c/+")
    assert (await cedar.authorize(request)).allowed
    block = Block(id="no-cmd", scope="channel", ref="commands", actions=frozenset({"subscribe"}), effect="deny")
    await cedar.store.put_role(Role(id="restrict", tenant="acme", blocks=(block,)))
    await cedar.store.assign(_assign("restrict", "alice@acme.example"))
    decision = await cedar.authorize(request)
    assert (decision.allowed, decision.reason) == (False, Reason.DENIED_BY_BLOCK)
    assert decision.verdict.decided_by == "forbid-deny-block[role:restrict/block:no-cmd]"
    # the exact channel that is not denied stays reachable, the denied one does not
    assert (await cedar.authorize(make_request(S, "alice@acme.example", "m/acme/c/telemetry"))).allowed
    assert not (await cedar.authorize(make_request(S, "alice@acme.example", "m/acme/c/commands"))).allowed


async def test_nested_channel_groups_grant_through_the_parent(cedar: PDP) -> None:
    await cedar.store.put_group(Group(id="site", tenant="acme", kind="channels"))
    await cedar.store.put_group(Group(id="plant-floor", tenant="acme", kind="channels", parent="site"))
    block = Block(id="site-pub", scope="channel_group", ref="site", actions=frozenset({"publish"}))
    await cedar.store.put_role(Role(id="site-writer", tenant="acme", blocks=(block,)))
    await cedar.store.assign(_assign("site-writer", "acme-dashboard"))
    decision = await cedar.authorize(make_request(P, "acme-dashboard", "m/acme/c/telemetry"))
    assert (decision.allowed, decision.reason) == (True, Reason.ROLE_GRANT)
    assert decision.verdict.decided_by == "permit-allow-block[role:site-writer/block:site-pub]"
    assert not (await cedar.authorize(make_request(P, "acme-dashboard", "m/acme/c/commands"))).allowed


async def test_a_connect_deny_block_refuses_the_session(cedar: PDP) -> None:
    assert (await cedar.authorize(make_request(C, "acme-thermo-1"))).reason is Reason.SUBJECT_ACTIVE
    block = Block(id="banned", scope="tenant", actions=frozenset({"connect"}), effect="deny")
    await cedar.store.put_role(Role(id="ban", tenant="acme", blocks=(block,)))
    await cedar.store.assign(_assign("ban", "acme-thermo-1"))
    decision = await cedar.authorize(make_request(C, "acme-thermo-1"))
    assert (decision.allowed, decision.reason) == (False, Reason.DENIED_BY_BLOCK)
    assert decision.verdict.decided_by == "forbid-deny-block[role:ban/block:banned]"
    # and authentication, which asks the evaluator about connect, refuses too
    auth = await cedar.authenticate("acme-thermo-1", "acme-thermo-1-demo-secret")
    assert (auth.allowed, auth.reason) == (False, Reason.DENIED_BY_BLOCK)


async def test_a_system_topic_deny_block_wins(cedar: PDP) -> None:
    block = Block(
        id="no-clients", scope="topic", ref="$SYS/+/clients/#", actions=frozenset({"subscribe"}), effect="deny"
    )
    await cedar.store.put_role(Role(id="quiet-sys", tenant="acme", blocks=(block,)))
    await cedar.store.assign(_assign("quiet-sys", "alice@acme.example"))
    decision = await cedar.authorize(make_request(S, "alice@acme.example", "$SYS/#"))
    assert (decision.allowed, decision.reason) == (False, Reason.DENIED_BY_BLOCK)
    assert (await cedar.authorize(make_request(S, "alice@acme.example", "$SYS/broker/load/#"))).allowed


async def test_authentication_goes_through_cedar(cedar: PDP) -> None:
    decision = await cedar.authenticate("acme-thermo-1", "acme-thermo-1-demo-secret")
    assert (decision.allowed, decision.reason) == (True, Reason.AUTHENTICATED)
    assert decision.verdict.evaluator == "cedar"


async def test_explain_traces_the_cedar_decision(cedar: PDP) -> None:
    explanation = await cedar.explain(make_request(P, "acme-gateway", "m/acme/c/alarms"))
    assert not explanation.decision.allowed
    assert any(step.startswith("cedar: Deny by [forbid-deny-block]") for step in explanation.steps)


# -- the policy set itself ------------------------------------------------------------------------


def test_policies_validate_against_the_schema() -> None:
    schema = cedarpy.Schema.from_str(DEFAULT_SCHEMA.read_text())
    result = cedarpy.validate_policies(DEFAULT_POLICIES.read_text(), schema)
    assert result.validation_passed, result.errors


def test_every_policy_has_an_id_the_evaluator_maps() -> None:
    from authhook.evaluators.cedar import FORBID_ORDER, PERMIT_ORDER

    text = DEFAULT_POLICIES.read_text()
    policies = cedarpy.PolicySet.from_str(text)
    ids = {line.split('"')[1] for line in text.splitlines() if line.startswith("@id(")}
    assert len(ids) == len(policies)
    assert ids == {policy for policy, _ in FORBID_ORDER + PERMIT_ORDER}


def test_handles_are_parsed_once(tmp_path: Path) -> None:
    evaluator = CedarEvaluator(store=None)  # type: ignore[arg-type]
    assert isinstance(evaluator, PolicyEvaluator)
    assert isinstance(evaluator.policies, cedarpy.PolicySet)
    assert isinstance(evaluator.schema, cedarpy.Schema)


def test_broken_policies_fail_at_construction(tmp_path: Path) -> None:
    bad = tmp_path / "bad.cedar"
    bad.write_text("permit (principal, action, resource) when { principal.nope };")
    with pytest.raises(EvaluatorUnavailable):
        CedarEvaluator(store=None, policies_path=bad)  # type: ignore[arg-type]
    bad.write_text("this is not cedar")
    with pytest.raises(EvaluatorUnavailable):
        CedarEvaluator(store=None, policies_path=bad)  # type: ignore[arg-type]
    with pytest.raises(EvaluatorUnavailable):
        CedarEvaluator(store=None, policies_path=tmp_path / "missing.cedar")  # type: ignore[arg-type]


def test_a_cedar_evaluation_error_fails_closed(tmp_path: Path) -> None:
    # A permit that would allow everything, reached only through an attribute Cedar cannot find at run time.
    text = DEFAULT_POLICIES.read_text() + '\n@id("extra")\npermit (principal, action, resource) when { true };\n'
    policies = tmp_path / "extra.cedar"
    policies.write_text(text)
    evaluator = CedarEvaluator(store=None, policies_path=policies, validate_requests=False)  # type: ignore[arg-type]
    facts = Facts(1, SubjectFact("dev", "acme", SubjectKind.CLIENT, True, True), channel_exists=True)
    target = Target("m/acme/c/x", ChannelAddress("acme", "x", ""))
    assert evaluator.decide(make_request(P, "dev", "m/acme/c/x"), target, facts).allowed  # the extra permit
    # entities that do not match the schema: cedarpy errors must surface as EvaluatorUnavailable, not allow
    bogus = Facts(1, SubjectFact("dev", "acme", SubjectKind.CLIENT, True, True), channel_exists=True)
    strict = CedarEvaluator(store=None)  # type: ignore[arg-type]
    import authhook.evaluators.cedar as module

    original = module.build_request

    def broken(*args: object) -> module._Request:
        built = original(*args)  # type: ignore[arg-type]
        built.entities[-1]["attrs"]["known"] = "yes"  # a string where the schema wants a Bool
        return built

    module.build_request = broken  # type: ignore[assignment]
    try:
        with pytest.raises(EvaluatorUnavailable):
            strict.decide(make_request(P, "dev", "m/acme/c/x"), target, bogus)
    finally:
        module.build_request = original


# -- the same verdict as the in-house policy over synthetic facts -----------------------------------

_BLOCKS = [
    BlockFact("r", "t-all", ScopeKind.TENANT, None, 6, Effect.ALLOW),
    BlockFact("r", "t-deny", ScopeKind.TENANT, None, 4, Effect.DENY),
    BlockFact("r", "t-noconn", ScopeKind.TENANT, None, 1, Effect.DENY),
    BlockFact("r", "ch-allow", ScopeKind.CHANNEL, "x", 2, Effect.ALLOW),
    BlockFact("r", "ch-deny", ScopeKind.CHANNEL, "x", 2, Effect.DENY),
    BlockFact("r", "other-deny", ScopeKind.CHANNEL, "y", 6, Effect.DENY),
    BlockFact("r", "g-allow", ScopeKind.CHANNEL_GROUP, "g", 6, Effect.ALLOW),
    BlockFact("r", "g-deny", ScopeKind.CHANNEL_GROUP, "g", 4, Effect.DENY),
    BlockFact("r", "sys", ScopeKind.TOPIC, "$SYS/#", 4, Effect.ALLOW),
    BlockFact("r", "sys-deny", ScopeKind.TOPIC, "$SYS/a/#", 6, Effect.DENY),
]
_TARGETS = [
    (Action.CONNECT, None, Target(None, None)),
    (Action.PUBLISH, "m/acme/c/x", Target("m/acme/c/x", ChannelAddress("acme", "x", ""))),
    (Action.SUBSCRIBE, "m/acme/c/x", Target("m/acme/c/x", ChannelAddress("acme", "x", ""), is_filter=True)),
    (Action.SUBSCRIBE, "m/acme/c/+", Target("m/acme/c/+", ChannelAddress("acme", None, ""), is_filter=True)),
    (Action.PUBLISH, "m/other/c/x", Target("m/other/c/x", ChannelAddress("other", "x", ""))),
    (Action.SUBSCRIBE, "$SYS/b/#", Target("$SYS/b/#", None, is_filter=True, is_system=True)),
    (Action.SUBSCRIBE, "$SYS/#", Target("$SYS/#", None, is_filter=True, is_system=True)),
    (Action.PUBLISH, "$SYS/a/b", Target("$SYS/a/b", None, is_system=True)),
]


def _subsets() -> list[tuple[BlockFact, ...]]:
    # every single block, every pair, and all of them: enough to exercise each policy and their interplay
    singles = [(b,) for b in _BLOCKS]
    pairs = [(a, b) for i, a in enumerate(_BLOCKS) for b in _BLOCKS[i + 1 :]]
    return [(), *singles, *pairs, tuple(_BLOCKS)]


@pytest.mark.parametrize("kind", [SubjectKind.CLIENT, SubjectKind.USER])
def test_synthetic_facts_agree_with_inhouse(kind: SubjectKind) -> None:
    evaluator = CedarEvaluator(store=None)  # type: ignore[arg-type]
    checked = 0
    for blocks in _subsets():
        for enabled, tenant_enabled in ((True, True), (False, True), (True, False)):
            subject = SubjectFact("dev", "acme", kind, enabled, tenant_enabled)
            for exists in (True, False):
                for connection in (0, 2, 4, 6):
                    for groups in ((), ("g",)):
                        facts = Facts(7, subject, blocks, exists, groups, connection)
                        for action, topic, target in _TARGETS:
                            request = make_request(action, "dev", topic)
                            want = decide(request, target, facts)
                            got = evaluator.decide(request, target, facts)
                            assert (got.allowed, got.reason) == (want.allowed, want.reason), (facts, target, got)
                            checked += 1
    assert checked > 10_000
