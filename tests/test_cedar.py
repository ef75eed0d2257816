"""The Cedar evaluator against the in-house behaviour table (same allow/deny, same reason codes), and its
entity graphs: parsed once per tenant, reused, brought up to date when the tenant's board slot moves."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import cedarpy
import pytest

from authhook import PDP, Reason, make_request
from authhook.errors import EvaluatorUnavailable
from authhook.evaluators import cedar_call
from authhook.evaluators.base import PolicyEvaluator
from authhook.evaluators.cedar import (
    DEFAULT_POLICIES,
    DEFAULT_SCHEMA,
    FORBID_ORDER,
    PERMIT_ORDER,
    CedarEvaluator,
    may_read_context_topic,
    tenant_entities,
)
from authhook.evaluators.inhouse import decide
from authhook.models import Action, Target, Verdict
from authhook.store.base import (
    Assignment,
    Block,
    BlockFact,
    Channel,
    Connection,
    Effect,
    Facts,
    Group,
    Role,
    ScopeKind,
    SubjectFact,
    SubjectKind,
    SubjectRecord,
    Tenant,
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


def _evaluator(pdp: PDP) -> CedarEvaluator:
    evaluator = pdp.evaluator
    assert isinstance(evaluator, CedarEvaluator)
    return evaluator


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
    assert verdict.decided_by == "permit-topic-allow-block[role:operator/block:broker-stats]"
    verdict = (await cedar.authorize(make_request(S, "alice@acme.example", "m/acme/#"))).verdict
    assert verdict.decided_by == "permit-allow-block[role:operator/block:watch-all]"
    verdict = (await cedar.authorize(make_request(P, "acme-thermo-1", "m/globex/c/telemetry"))).verdict
    # every satisfied forbid is named, the first (in the in-house order) gives the reason
    assert verdict.decided_by == "forbid-cross-tenant,forbid-unknown-channel"
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
    # decided in Cedar: the wildcard's resource is the tenant, and any channel-space deny block applies to it
    assert decision.verdict.decided_by == "forbid-wildcard-deny[role:restrict/block:no-cmd]"
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
    # the group tree itself is in the graph, not flattened: telemetry -> plant-floor -> site -> the block
    graph = _evaluator(cedar).graph("acme")
    assert graph is not None
    assert ("ChannelGroup", "acme/site") in graph.parents[("ChannelGroup", "acme/plant-floor")]
    assert ("ChannelGroup", "acme/site") not in graph.parents[("Channel", "acme/telemetry")]


async def test_nested_subject_groups_hold_roles_through_the_parent(cedar: PDP) -> None:
    await cedar.store.put_group(Group(id="staff", tenant="acme", kind="subjects"))
    await cedar.store.put_group(Group(id="night-shift", tenant="acme", kind="subjects", parent="staff"))
    await cedar.store.add_member("acme", "night-shift", "acme-dashboard")
    block = Block(id="all-pub", scope="tenant", actions=frozenset({"publish"}))
    await cedar.store.put_role(Role(id="writer", tenant="acme", blocks=(block,)))
    await cedar.store.assign(Assignment(tenant="acme", role="writer", assignee_kind="group", assignee="staff"))
    decision = await cedar.authorize(make_request(P, "acme-dashboard", "m/acme/c/commands"))
    assert (decision.allowed, decision.verdict.decided_by) == (True, "permit-allow-block[role:writer/block:all-pub]")
    graph = _evaluator(cedar).graph("acme")
    assert graph is not None
    above = graph.ancestors(("Client", "acme-dashboard"))
    assert {("SubjectGroup", "acme/night-shift"), ("SubjectGroup", "acme/staff"), ("Role", "acme/writer")} <= above


async def test_policies_can_use_the_group_trees(demo: PDP, tmp_path: Path) -> None:
    # A site policy on top of the reference set: nothing under the `restricted` channel group (at any
    # depth) for anyone in the `contractors` subject group (at any depth). Cedar follows both trees.
    policies = tmp_path / "site.cedar"
    policies.write_text(
        DEFAULT_POLICIES.read_text()
        + '\n@id("site-restricted")\nforbid (principal in SubjectGroup::"acme/contractors", action,'
        + ' resource in ChannelGroup::"acme/restricted");\n'
    )
    store = demo.store
    for group, kind, parent in (
        ("contractors", "subjects", None),
        ("temps", "subjects", "contractors"),
        ("restricted", "channels", None),
        ("plant-floor", "channels", "restricted"),
    ):
        await store.put_group(Group(id=group, tenant="acme", kind=kind, parent=parent))  # type: ignore[arg-type]
    pdp = PDP(store, demo.hasher, evaluator=CedarEvaluator(store, policies_path=policies))
    request = make_request(P, "acme-thermo-1", "m/acme/c/telemetry")  # telemetry is on the plant floor
    assert (await pdp.authorize(request)).allowed
    await store.add_member("acme", "temps", "acme-thermo-1")
    decision = await pdp.authorize(request)
    assert (decision.allowed, decision.verdict.decided_by) == (False, "site-restricted")
    assert (await pdp.authorize(make_request(S, "acme-thermo-1", "m/acme/c/commands"))).allowed


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
    assert decision.verdict.decided_by == "forbid-topic-deny-block[role:quiet-sys/block:no-clients]"
    assert (await cedar.authorize(make_request(S, "alice@acme.example", "$SYS/broker/load/#"))).allowed


async def test_subjects_come_and_go(cedar: PDP) -> None:
    request = make_request(P, "acme-thermo-1", "m/acme/c/telemetry")
    assert (await cedar.authorize(request)).allowed
    await cedar.store.delete_subject("acme-thermo-1")
    assert (await cedar.authorize(request)).reason is Reason.UNKNOWN_SUBJECT
    # the same id again, now in the other tenant: found there, and isolated from the old one
    record = SubjectRecord(id="acme-thermo-1", tenant="globex", kind="client")
    await cedar.store.put_subject(record, cedar.hasher.hash_client_secret("s" * 32))
    assert (await cedar.authorize(request)).reason is Reason.WRONG_TENANT
    await cedar.store.connect(
        Connection(tenant="globex", client="acme-thermo-1", channel="telemetry", actions=frozenset({"publish"}))
    )
    assert (await cedar.authorize(make_request(P, "acme-thermo-1", "m/globex/c/telemetry"))).allowed


async def test_authentication_goes_through_cedar(cedar: PDP) -> None:
    decision = await cedar.authenticate("acme-thermo-1", "acme-thermo-1-demo-secret")
    assert (decision.allowed, decision.reason) == (True, Reason.AUTHENTICATED)
    assert decision.verdict.evaluator == "cedar"


async def test_every_request_matches_the_schema(cedar: PDP) -> None:
    # the context and resource the evaluator builds for each kind of request are the ones the schema declares
    strict = PDP(cedar.store, cedar.hasher, evaluator=CedarEvaluator(cedar.store, validate_requests=True))
    extra = [(S, "alice@acme.example", "$SYS/broker/load/#"), (P, "acme-thermo-1", "m/acme/c/telemetry")]
    for action, user, topic in [case[:3] for case in CASES] + extra:
        for tenant in (None, "acme"):
            request = make_request(action, user, topic, tenant=tenant)
            want, got = await cedar.authorize(request), await strict.authorize(request)
            assert (got.allowed, got.reason) == (want.allowed, want.reason), request
    # and those the core refuses before asking an evaluator, asked directly
    for action, topic, target in _TARGETS:
        request = make_request(action, "acme-thermo-1", topic)
        want, got = await cedar.evaluator.evaluate(request, target), await strict.evaluator.evaluate(request, target)
        assert (got.allowed, got.reason) == (want.allowed, want.reason), request


async def test_explain_traces_the_cedar_decision(cedar: PDP) -> None:
    explanation = await cedar.explain(make_request(P, "acme-gateway", "m/acme/c/alarms"))
    assert not explanation.decision.allowed
    assert any(step.startswith("cedar: Deny by [forbid-deny-block]") for step in explanation.steps)


# -- graphs: parsed once, reused, updated when the store changes --------------------------------------


class _Counting:
    """Stands in for a cedarpy handle class and counts its parse entry points."""

    def __init__(self, real: Any, counts: Counter[str], prefix: str) -> None:
        self._real, self._counts, self._prefix = real, counts, prefix

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._real, name)
        if not name.startswith("from_"):
            return attr

        def counted(*args: Any, **kwargs: Any) -> Any:
            self._counts[f"{self._prefix}.{name}"] += 1
            return attr(*args, **kwargs)

        return counted


@pytest.fixture
def parses(monkeypatch: pytest.MonkeyPatch) -> Counter[str]:
    """Counts every cedarpy parse: policies, schema, entities (whole or added), and which handle each
    authorization call was given."""
    counts: Counter[str] = Counter()
    chosen = cedar_call.authorizer()  # probed before anything is counted

    def authorize(query: Any, policies: Any, entities: Any, schema: Any) -> Any:
        assert isinstance(entities, cedarpy.Entities) and not isinstance(policies, str)
        counts[f"handle:{id(entities)}"] += 1
        return chosen(query, policies, entities, schema)

    monkeypatch.setattr(cedar_call, "authorizer", lambda: authorize)
    monkeypatch.setattr(cedarpy, "PolicySet", _Counting(cedarpy.PolicySet, counts, "PolicySet"))
    monkeypatch.setattr(cedarpy, "Schema", _Counting(cedarpy.Schema, counts, "Schema"))
    real_from_json: Callable[..., Any] = cedarpy.Entities.from_json_str
    real_added: Callable[..., Any] = cedarpy.Entities.with_added_json_str

    def from_json_str(*args: Any, **kwargs: Any) -> Any:
        counts["Entities.from_json_str"] += 1
        return real_from_json(*args, **kwargs)

    def with_added_json_str(self: Any, *args: Any, **kwargs: Any) -> Any:
        counts["Entities.with_added_json_str"] += 1
        return real_added(self, *args, **kwargs)

    monkeypatch.setattr(cedarpy.Entities, "from_json_str", staticmethod(from_json_str))
    monkeypatch.setattr(cedarpy.Entities, "with_added_json_str", with_added_json_str)
    return counts


def _handles(counts: Counter[str]) -> Counter[str]:
    return Counter({k: v for k, v in counts.items() if k.startswith("handle:")})


async def test_handles_are_parsed_once_and_updated_when_the_tenant_changes(demo: PDP, parses: Counter[str]) -> None:
    store = demo.store
    evaluator = CedarEvaluator(store)
    assert isinstance(evaluator, PolicyEvaluator)
    assert parses == {"PolicySet.from_str": 1, "Schema.from_str": 1}
    pdp = PDP(store, demo.hasher, evaluator=evaluator)
    acme = [make_request(*case[:3]) for case in CASES if case[1].startswith("acme") and case[3]]

    async def decide_all() -> None:
        for request in acme * 3:
            await pdp.authorize(request)

    # the first decision for a tenant parses its graph, every later one reuses the very same handle
    await decide_all()
    graph = evaluator.graph("acme")
    assert graph is not None
    assert parses["Entities.from_json_str"] == 1
    assert _handles(parses) == {f"handle:{id(graph.handle)}": len(acme) * 3}
    await pdp.authorize(make_request(P, "globex-meter-7", "m/globex/c/telemetry"))
    assert parses["Entities.from_json_str"] == 2  # globex: its own graph
    assert parses["PolicySet.from_str"] == parses["Schema.from_str"] == 1

    # a new channel only adds an entity: parsed alone and added to the tenant's handle
    await store.put_channel(Channel(id="spare", tenant="acme"))
    await decide_all()
    assert (parses["Entities.from_json_str"], parses["Entities.with_added_json_str"]) == (2, 1)
    added = evaluator.graph("acme")
    assert added is not None and added.handle is not graph.handle
    assert ("Channel", "acme/spare") in added.entities
    # a write Cedar does not see (a display name) moves the slot but keeps the handle
    await store.put_channel(Channel(id="spare", tenant="acme", name="spare channel"))
    await decide_all()
    kept = evaluator.graph("acme")
    assert kept is not None and kept.handle is added.handle
    assert evaluator.stats.unchanged == 1
    # a revoke changes an entity: that tenant is parsed again (and only that tenant), and it bites at once
    await store.disconnect("acme", "acme-thermo-1", "telemetry", frozenset({"publish"}))
    decision = await pdp.authorize(make_request(P, "acme-thermo-1", "m/acme/c/telemetry"))
    assert decision.reason is Reason.NOT_CONNECTED
    assert parses["Entities.from_json_str"] == 3
    globex = evaluator.graph("globex")
    await pdp.authorize(make_request(P, "globex-meter-7", "m/globex/c/telemetry"))
    assert evaluator.graph("globex") is globex
    assert evaluator.stats.full_parses == 3 and evaluator.stats.delta_parses == 1
    assert parses["PolicySet.from_str"] == parses["Schema.from_str"] == 1


async def test_a_board_that_cannot_hear_other_writers_reads_the_tenant_every_time(cedar: PDP) -> None:
    evaluator = _evaluator(cedar)
    request = make_request(P, "acme-thermo-1", "m/acme/c/telemetry")
    assert (await cedar.authorize(request)).allowed
    reads = evaluator.stats.reads
    cedar.store.board.suspend()
    try:
        for _ in range(3):
            assert (await cedar.authorize(request)).allowed
        assert evaluator.stats.reads == reads + 3
    finally:
        cedar.store.board.resume()
    await cedar.authorize(request)
    await cedar.authorize(request)
    assert evaluator.stats.reads == reads + 4  # stamped again after the first read


async def test_each_tenant_graph_holds_only_that_tenant(cedar: PDP) -> None:
    await cedar.authorize(make_request(P, "acme-thermo-1", "m/globex/c/telemetry"))
    graph = _evaluator(cedar).graph("acme")
    assert graph is not None and _evaluator(cedar).graph("globex") is None
    for kind, id_ in graph.entities:
        assert id_ == "acme" or id_.startswith("acme/") or id_ in graph.principals, (kind, id_)
    assert all(p.tenant == "acme" for p in graph.principals.values())


async def test_an_entities_file_decides_like_the_store(cedar: PDP, tmp_path: Path) -> None:
    # The store's graphs, written out, are a valid entities file; deciding on it gives the same answers.
    for subject in ("acme-thermo-1", "globex-meter-7"):
        await cedar.authorize(make_request(C, subject))
    entities = []
    for tenant in ("acme", "globex"):
        graph = _evaluator(cedar).graph(tenant)
        assert graph is not None
        entities += list(graph.entities.values())
    path = tmp_path / "entities.json"
    path.write_text(json.dumps(entities))
    from_file = PDP(cedar.store, cedar.hasher, evaluator=CedarEvaluator(cedar.store, entities_file=path))
    for action, user, topic, _, _ in CASES:
        request = make_request(action, user, topic)
        want, got = await cedar.authorize(request), await from_file.authorize(request)
        assert (got.allowed, got.reason, got.verdict.decided_by) == (
            want.allowed,
            want.reason,
            want.verdict.decided_by,
        ), request
    # the file is what decides: the store no longer matters to it
    await cedar.store.disconnect("acme", "acme-thermo-1", "telemetry", frozenset({"publish"}))
    assert (await from_file.authorize(make_request(P, "acme-thermo-1", "m/acme/c/telemetry"))).allowed
    file_evaluator = _evaluator(from_file)
    assert file_evaluator.stats.full_parses == 1 and file_evaluator.stats.reads == 0


def test_an_entities_file_that_breaks_the_schema_fails_at_construction(tmp_path: Path) -> None:
    path = tmp_path / "entities.json"
    path.write_text(json.dumps([{"uid": {"type": "Channel", "id": "acme/x"}, "attrs": {"known": True}, "parents": []}]))
    with pytest.raises(EvaluatorUnavailable, match="do not parse or validate"):
        CedarEvaluator(store=None, entities_file=path)  # type: ignore[arg-type]
    path.write_text('{"not": "a list"}')
    with pytest.raises(EvaluatorUnavailable):
        CedarEvaluator(store=None, entities_file=path)  # type: ignore[arg-type]
    with pytest.raises(EvaluatorUnavailable):
        CedarEvaluator(store=None, entities_file=tmp_path / "missing.json")  # type: ignore[arg-type]


# -- the policy set itself ------------------------------------------------------------------------


def test_policies_validate_against_the_schema() -> None:
    schema = cedarpy.Schema.from_str(DEFAULT_SCHEMA.read_text())
    result = cedarpy.validate_policies(DEFAULT_POLICIES.read_text(), schema)
    assert result.validation_passed, result.errors


def test_every_policy_has_an_id_the_evaluator_maps() -> None:
    text = DEFAULT_POLICIES.read_text()
    policies = cedarpy.PolicySet.from_str(text)
    ids = {line.split('"')[1] for line in text.splitlines() if line.startswith("@id(")}
    assert len(ids) == len(policies)
    assert ids == {policy for policy, _ in FORBID_ORDER + PERMIT_ORDER}


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


def _acme(*subjects: SubjectRecord, channels: tuple[str, ...] = ("x",)) -> list[dict[str, Any]]:
    return tenant_entities(Tenant(id="acme"), subjects, [Channel(id=c, tenant="acme") for c in channels], [], [], [])


def test_the_answer_comes_from_the_loaded_policies(tmp_path: Path) -> None:
    dev = SubjectRecord(id="dev", tenant="acme", kind="client")
    request, target = make_request(P, "dev", "m/acme/c/x"), Target("m/acme/c/x", ChannelAddress("acme", "x", ""))
    reference = CedarEvaluator(store=None)  # type: ignore[arg-type]
    assert not reference.decide(request, target, reference.parse(_acme(dev))).allowed  # not connected
    # the same graph under a policy set with one more permit, unconditional: now Cedar allows, and says why
    policies = tmp_path / "open.cedar"
    policies.write_text(DEFAULT_POLICIES.read_text() + '\n@id("open-house")\npermit (principal, action, resource);\n')
    permissive = CedarEvaluator(store=None, policies_path=policies)  # type: ignore[arg-type]
    verdict = permissive.decide(request, target, permissive.parse(_acme(dev)))
    assert (verdict.allowed, verdict.decided_by) == (True, "open-house")
    # ... but a forbid still wins over it
    disabled = SubjectRecord(id="dev", tenant="acme", kind="client", enabled=False)
    verdict = permissive.decide(request, target, permissive.parse(_acme(disabled)))
    assert (verdict.allowed, verdict.reason) == (False, Reason.SUBJECT_DISABLED)


def test_a_cedar_evaluation_error_fails_closed(tmp_path: Path) -> None:
    # A forbid that reads an attribute of the resource validates against the schema, but errors at run time
    # when the resource is not in the graph (another tenant's). Cedar skips a policy that errors - here that
    # would drop a forbid - so the evaluator must refuse to answer rather than trust the rest.
    policies = tmp_path / "reads-resource.cedar"
    policies.write_text(
        DEFAULT_POLICIES.read_text()
        + '\n@id("tenant-off")\nforbid (principal, action, resource is Tenant) when { !resource.enabled };\n'
    )
    evaluator = CedarEvaluator(store=None, policies_path=policies)  # type: ignore[arg-type]
    graph = evaluator.parse(_acme(SubjectRecord(id="dev", tenant="acme", kind="client")))
    own = Target("m/acme/c/+", ChannelAddress("acme", None, ""), is_filter=True)
    assert evaluator.decide(make_request(S, "dev", "m/acme/c/+"), own, graph).reason is Reason.WILDCARD_TOO_BROAD
    other = Target("m/globex/c/+", ChannelAddress("globex", None, ""), is_filter=True)
    with pytest.raises(EvaluatorUnavailable, match="errors"):
        evaluator.decide(make_request(S, "dev", "m/globex/c/+"), other, graph)


# -- the same verdict as the in-house policy over synthetic worlds ----------------------------------

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
    (Action.PUBLISH, None, Target(None, None)),
    (Action.PUBLISH, "foo/bar", Target("foo/bar", None)),
    (Action.SUBSCRIBE, "m/+/c/x", Target("m/+/c/x", ChannelAddress(None, "x", ""), is_filter=True)),
]
_NAMES = {1: "connect", 2: "publish", 4: "subscribe"}


def _subsets() -> list[tuple[BlockFact, ...]]:
    # every single block, every pair, and all of them: enough to exercise each policy and their interplay
    singles = [(b,) for b in _BLOCKS]
    pairs = [(a, b) for i, a in enumerate(_BLOCKS) for b in _BLOCKS[i + 1 :]]
    return [(), *singles, *pairs, tuple(_BLOCKS)]


def _model(fact: BlockFact) -> Block:
    actions = frozenset(name for bit, name in _NAMES.items() if fact.actions & bit)
    return Block(id=fact.block, scope=fact.scope, ref=fact.ref, actions=actions, effect=fact.effect)  # type: ignore[arg-type]


@pytest.mark.parametrize("kind", [SubjectKind.CLIENT, SubjectKind.USER])
def test_synthetic_worlds_agree_with_inhouse(kind: SubjectKind) -> None:
    """Each world: one tenant, channels x and y, channel group g, one role with the blocks, assigned to
    subjects that are enabled or not and (clients) connected to x for nothing, publish, subscribe or both."""
    evaluator = CedarEvaluator(store=None)  # type: ignore[arg-type]
    connections = (0, 2, 4, 6) if kind is SubjectKind.CLIENT else (0,)
    checked = 0
    for blocks in _subsets():
        role = Role(id="r", tenant="acme", blocks=tuple(_model(b) for b in blocks))
        for tenant_enabled in (True, False):
            for exists in (True, False):
                for in_group in (True, False):
                    subjects = [
                        SubjectRecord(id=f"dev-{enabled}-{bits}", tenant="acme", kind=kind, enabled=enabled)
                        for enabled in (True, False)
                        for bits in connections
                    ]
                    links = [
                        Connection(
                            tenant="acme",
                            client=s.id,
                            channel="x",
                            actions=frozenset(name for bit, name in _NAMES.items() if int(s.id[-1]) & bit),
                        )
                        for s in subjects
                        if exists and s.id[-1] != "0"
                    ]
                    graph = evaluator.parse(
                        tenant_entities(
                            Tenant(id="acme", enabled=tenant_enabled),
                            subjects,
                            [Channel(id=c, tenant="acme") for c in (("x", "y") if exists else ("y",))],
                            links,
                            [(Group(id="g", tenant="acme", kind="channels"), ["x"] if exists and in_group else [])],
                            [(role, [_assign("r", s.id) for s in subjects])],
                        )
                    )
                    for subject in subjects:
                        fact = SubjectFact(subject.id, "acme", kind, subject.enabled, tenant_enabled)
                        bits = int(subject.id[-1]) if exists else 0
                        groups = ("g",) if exists and in_group else ()
                        facts = Facts(7, fact, blocks, exists, groups, bits)
                        for action, topic, target in _TARGETS:
                            request = make_request(action, subject.id, topic)
                            want = decide(request, target, facts)
                            got = evaluator.decide(request, target, graph)
                            assert (got.allowed, got.reason) == (want.allowed, want.reason), (blocks, facts, target)
                            checked += 1
    assert checked > 5_000


# -- the cedarpy call ---------------------------------------------------------------------------------


async def test_the_compiled_call_and_the_public_api_give_the_same_answers(demo: PDP) -> None:
    """Over the reference policies and a real tenant graph, for every case of the shared table."""
    evaluator = CedarEvaluator(demo.store)
    pdp = PDP(demo.store, demo.hasher, evaluator=evaluator)
    compared = 0
    for case in CASES:
        request = make_request(*case[:3])
        await pdp.authorize(request)  # builds the graph of the subject's tenant
        target = pdp.resolve(request)
        graph = evaluator.graph(evaluator._tenant_of.get(request.subject.key or "", ""))
        if graph is None or isinstance(target, Verdict):
            continue
        seen = []
        for call in (cedar_call.authorize_public, cedar_call.authorize_compiled):
            evaluator._authorize = call
            verdict = evaluator.decide(request, target, graph)
            seen.append((verdict.allowed, verdict.reason, verdict.decided_by, verdict.detail))
        assert seen[0] == seen[1], case
        compared += 1
    assert compared >= 20


def test_a_compiled_call_that_answers_differently_is_not_used(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def says_allow_to_everything(*args: Any) -> str:
        return json.dumps(
            {"decision": "Allow", "diagnostics": {"reason": [], "errors": [], "id_annotations_by_reason": {}}}
        )

    monkeypatch.setattr(cedar_call, "_COMPILED", says_allow_to_everything)
    assert cedar_call.probe() is cedar_call.authorize_public
    assert "not used" in caplog.text
    monkeypatch.setattr(cedar_call, "_COMPILED", None)  # a cedarpy without it
    assert cedar_call.probe() is cedar_call.authorize_public


def test_this_cedarpy_gets_the_compiled_call() -> None:
    """The speed figure in bench/ assumes it; a cedarpy upgrade that changes it shows up here first."""
    assert cedar_call.probe() is cedar_call.authorize_compiled


async def test_a_site_policy_that_reads_the_topic_gets_it(demo: PDP, tmp_path: Path) -> None:
    """The reference policies never read ``context.topic``, so it is left out for them; a policy that
    reads it must still see it, or a forbid guarded by ``context has topic`` would silently not apply."""
    policies = tmp_path / "site.cedar"
    policies.write_text(
        DEFAULT_POLICIES.read_text()
        + '\n@id("no-debug")\nforbid (principal, action, resource)\n'
        + 'when { context has topic && context.topic like "m/acme/c/telemetry/debug*" };\n'
    )
    pdp = PDP(demo.store, demo.hasher, evaluator=CedarEvaluator(demo.store, policies_path=policies))
    assert (await pdp.authorize(make_request(P, "acme-thermo-1", "m/acme/c/telemetry/temp"))).allowed
    refused = await pdp.authorize(make_request(P, "acme-thermo-1", "m/acme/c/telemetry/debug/x"))
    assert (refused.allowed, refused.verdict.decided_by) == (False, "no-debug")


def test_the_topic_reader_detection_errs_on_the_side_of_sending_it() -> None:
    assert not may_read_context_topic(DEFAULT_POLICIES.read_text())
    for text in (
        'permit (principal, action, resource) when { context.topic like "a*" };',
        '@id("x") forbid (principal, action, resource) when { context has topic };',
        'permit (principal, action, resource) when { context["topic"] == "x" };',
        'forbid (principal, action, resource) when { context has "topic" };',
    ):
        assert may_read_context_topic(text), text
    assert not may_read_context_topic('// context.topic\n@id("topic-x") permit (principal, action, resource);')
