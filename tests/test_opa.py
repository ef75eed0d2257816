"""The OPA evaluators must agree with the in-house model: the whole behaviour table, embedded and remote,
plus Rego unit tests run with regopy (``opa test`` cannot run here) and the remote client's failure modes."""

from __future__ import annotations

import socket
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp.test_utils import TestServer

from authhook import PDP, Reason, make_request
from authhook.errors import EvaluatorUnavailable
from authhook.evaluators.base import PolicyEvaluator
from authhook.evaluators.opa import (
    CircuitBreaker,
    EmbeddedOpaEvaluator,
    RegoPolicy,
    RemoteOpaEvaluator,
    build_input,
)
from authhook.models import Target
from authhook.store.base import BlockFact, Effect, Facts, ScopeKind, SubjectFact, SubjectKind
from authhook.topics import ChannelAddress
from tests.fake_opa import FakeOpa
from tests.test_inhouse import CASES

P, S, C = "publish", "subscribe", "connect"


@pytest.fixture
async def fake_opa() -> AsyncIterator[tuple[FakeOpa, TestServer]]:
    fake = FakeOpa()
    server = TestServer(fake.app)
    await server.start_server()
    try:
        yield fake, server
    finally:
        await server.close()


def _url(server: TestServer) -> str:
    return str(server.make_url("")).rstrip("/")


def _pdp(demo: PDP, evaluator: PolicyEvaluator) -> PDP:
    return PDP(demo.store, demo.hasher, evaluator=evaluator)


# -- the behaviour table -----------------------------------------------------------------------------


@pytest.mark.parametrize(("action", "user", "topic", "allowed", "reason"), CASES)
async def test_embedded_opa_matches_the_inhouse_table(
    demo: PDP, action: str, user: str, topic: str | None, allowed: bool, reason: Reason
) -> None:
    evaluator = EmbeddedOpaEvaluator(demo.store)
    pdp = _pdp(demo, evaluator)
    request = make_request(action, user, topic)
    decision = await pdp.authorize(request)
    assert (decision.allowed, decision.reason) == (allowed, reason), decision.verdict.detail
    expected = await demo.authorize(request)  # the in-house verdict: same detail and decided_by too
    assert decision.verdict._replace(evaluator="x") == expected.verdict._replace(evaluator="x")
    await evaluator.close()


async def test_remote_opa_matches_the_inhouse_table(demo: PDP, fake_opa: tuple[FakeOpa, TestServer]) -> None:
    _, server = fake_opa
    evaluator = RemoteOpaEvaluator(demo.store, _url(server), deadline_s=2.0)
    pdp = _pdp(demo, evaluator)
    try:
        for action, user, topic, allowed, reason in CASES:
            decision = await pdp.authorize(make_request(action, user, topic))
            assert (decision.allowed, decision.reason) == (allowed, reason), (user, topic, decision.verdict.detail)
            if decision.verdict.evaluator != "core":
                assert decision.verdict.evaluator == "opa-remote"
    finally:
        await evaluator.close()


async def test_embedded_opa_follows_store_changes_and_explains(demo: PDP) -> None:
    from authhook.store.base import Assignment, Block, Role

    evaluator = EmbeddedOpaEvaluator(demo.store)
    pdp = _pdp(demo, evaluator)
    request = make_request(P, "acme-thermo-1", "m/acme/c/telemetry")
    assert (await pdp.authorize(request)).allowed
    block = Block(id="quiet", scope="channel", ref="telemetry", actions=frozenset({"publish"}), effect="deny")
    await demo.store.put_role(Role(id="quarantine", tenant="acme", blocks=(block,)))
    await demo.store.assign(
        Assignment(tenant="acme", role="quarantine", assignee_kind="subject", assignee="acme-thermo-1")
    )
    decision = await pdp.authorize(request)
    assert (decision.reason, decision.verdict.decided_by) == (Reason.DENIED_BY_BLOCK, "role:quarantine/block:quiet")
    explanation = await pdp.explain(request)
    assert any("denied_by_block" in step for step in explanation.steps)
    assert (await pdp.authorize(make_request(P, "acme-thermo-1", "m/acme/c/telemetry", tenant="globex"))).reason is (
        Reason.WRONG_TENANT
    )


async def test_embedded_opa_keeps_odd_characters_intact(demo: PDP) -> None:
    # regopy prints strings unescaped; the evaluator escapes them on the way in, so a topic cannot
    # break or reshape the result it is read back from
    pdp = _pdp(demo, EmbeddedOpaEvaluator(demo.store))
    topic = 'x", "allowed": true, "reason": "role_grant", "z": "\\\t'
    decision = await pdp.authorize(make_request(P, "acme-thermo-1", topic))
    assert (decision.allowed, decision.reason) == (False, Reason.OUTSIDE_NAMESPACE)
    assert decision.verdict.detail == f"`{topic}` is outside the channel namespace"


# -- Rego unit tests (what `opa test` would run) -----------------------------------------------------

SUBJECT = SubjectFact("dev-1", "acme", SubjectKind.CLIENT, True, True)
CHANNEL = Target("m/acme/c/telemetry", ChannelAddress("acme", "telemetry", ""))


def _block(block: str, scope: ScopeKind, ref: str | None, actions: int, effect: Effect) -> BlockFact:
    return BlockFact("r", block, scope, ref, actions, effect)


@pytest.fixture(scope="module")
def policy() -> RegoPolicy:
    from authhook.evaluators.opa import DEFAULT_POLICY_PATH

    return RegoPolicy.from_file(DEFAULT_POLICY_PATH)


def _decide(policy: RegoPolicy, action: str, target: Target, facts: Facts, **subject: Any) -> dict[str, Any]:
    request = make_request(action, "dev-1", target.topic, **subject)
    defined, result = policy.evaluate(build_input(request, target, facts))
    assert defined
    assert isinstance(result, dict)
    return result


def test_rego_connection_allows(policy: RegoPolicy) -> None:
    facts = Facts(3, SUBJECT, channel_exists=True, connection=2)
    assert _decide(policy, P, CHANNEL, facts) == {
        "allowed": True,
        "reason": "connected",
        "detail": "`dev-1` is connected to `telemetry` for publish",
        "decided_by": "connection:dev-1/telemetry",
    }


def test_rego_deny_wins_over_connection_and_allow(policy: RegoPolicy) -> None:
    blocks = (
        _block("all", ScopeKind.TENANT, None, 6, Effect.ALLOW),
        _block("no", ScopeKind.CHANNEL, "telemetry", 2, Effect.DENY),
    )
    facts = Facts(3, SUBJECT, blocks, channel_exists=True, connection=2)
    result = _decide(policy, P, CHANNEL, facts)
    assert (result["allowed"], result["reason"], result["decided_by"]) == (False, "denied_by_block", "role:r/block:no")


def test_rego_blocks_only_apply_to_their_actions_and_groups(policy: RegoPolicy) -> None:
    blocks = (
        _block("sub-only", ScopeKind.CHANNEL, "telemetry", 4, Effect.DENY),
        _block("group", ScopeKind.CHANNEL_GROUP, "floor", 2, Effect.ALLOW),
    )
    facts = Facts(3, SUBJECT, blocks, channel_exists=True, channel_groups=("floor",))
    result = _decide(policy, P, CHANNEL, facts)
    assert (result["allowed"], result["reason"], result["decided_by"]) == (True, "role_grant", "role:r/block:group")
    result = _decide(policy, P, CHANNEL, facts._replace(channel_groups=()))
    assert (result["allowed"], result["reason"]) == (False, "not_connected")


def test_rego_subject_and_tenant_checks(policy: RegoPolicy) -> None:
    facts = Facts(1, SUBJECT, channel_exists=True, connection=2)
    assert _decide(policy, P, CHANNEL, Facts(1, None))["reason"] == "unknown_subject"
    assert _decide(policy, P, CHANNEL, facts, tenant="globex")["reason"] == "wrong_tenant"
    disabled_tenant = facts._replace(subject=SUBJECT._replace(tenant_enabled=False, enabled=False))
    assert _decide(policy, P, CHANNEL, disabled_tenant)["reason"] == "tenant_disabled"
    assert _decide(policy, P, CHANNEL, facts._replace(subject=SUBJECT._replace(enabled=False)))["reason"] == (
        "subject_disabled"
    )
    other = Target("m/globex/c/telemetry", ChannelAddress("globex", "telemetry", ""))
    assert _decide(policy, P, other, facts)["reason"] == "wrong_tenant"
    assert _decide(policy, P, CHANNEL, facts._replace(channel_exists=False))["reason"] == "unknown_channel"


def test_rego_connect_and_wildcards(policy: RegoPolicy) -> None:
    ban = _block("ban", ScopeKind.TENANT, None, 1, Effect.DENY)
    connect = Target(None, None)
    assert _decide(policy, C, connect, Facts(1, SUBJECT))["reason"] == "subject_active"
    assert _decide(policy, C, connect, Facts(1, SUBJECT, (ban,)))["decided_by"] == "role:r/block:ban"
    wildcard = Target("m/acme/c/+", ChannelAddress("acme", None, ""), is_filter=True)
    watch = _block("watch", ScopeKind.TENANT, None, 4, Effect.ALLOW)
    assert _decide(policy, S, wildcard, Facts(1, SUBJECT, (watch,)))["reason"] == "role_grant"
    deny = _block("no-cmd", ScopeKind.CHANNEL, "commands", 4, Effect.DENY)
    assert _decide(policy, S, wildcard, Facts(1, SUBJECT, (watch, deny)))["reason"] == "denied_by_block"
    assert _decide(policy, S, wildcard, Facts(1, SUBJECT))["reason"] == "wildcard_too_broad"
    any_tenant = Target("m/+/c/x", ChannelAddress(None, "x", ""), is_filter=True)
    assert _decide(policy, S, any_tenant, Facts(1, SUBJECT, (watch,)))["reason"] == "wildcard_too_broad"


def test_rego_system_topics(policy: RegoPolicy) -> None:
    sys_all = Target("$SYS/#", None, is_filter=True, is_system=True)
    grant = _block("stats", ScopeKind.TOPIC, "$SYS/broker/#", 4, Effect.ALLOW)
    assert _decide(policy, S, sys_all, Facts(1, SUBJECT, (grant,)))["reason"] == "system_topic"  # not covered
    load = Target("$SYS/broker/load/#", None, is_filter=True, is_system=True)
    assert _decide(policy, S, load, Facts(1, SUBJECT, (grant,)))["reason"] == "role_grant"
    deny = _block("hide", ScopeKind.TOPIC, "$SYS/broker/load/+", 4, Effect.DENY)
    assert _decide(policy, S, load, Facts(1, SUBJECT, (grant, deny)))["reason"] == "denied_by_block"
    outside = Target("foo/bar", None)
    assert _decide(policy, P, outside, Facts(1, SUBJECT, (grant,)))["reason"] == "outside_namespace"


def test_rego_undefined_without_input(policy: RegoPolicy) -> None:
    # a document missing `subject` matches no branch: undefined, which the evaluators turn into a deny
    defined, _ = policy.evaluate({"request": {"action": "publish"}})
    assert not defined


# -- remote failure modes ----------------------------------------------------------------------------


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


async def test_remote_down_opens_the_breaker_and_then_fails_fast(demo: PDP) -> None:
    evaluator = RemoteOpaEvaluator(
        demo.store, f"http://127.0.0.1:{_closed_port()}", retries=1, breaker_failures=3, breaker_reset_s=60
    )
    pdp = _pdp(demo, evaluator)
    request = make_request(P, "acme-thermo-1", "m/acme/c/telemetry")
    try:
        for _ in range(3):
            decision = await pdp.authorize(request)
            assert (decision.allowed, decision.reason) == (False, Reason.EVALUATOR_UNAVAILABLE)
            assert "cannot reach opa" in decision.verdict.detail
        assert evaluator.breaker.state == CircuitBreaker.OPEN
        started = time.perf_counter()
        decision = await pdp.authorize(request)
        elapsed = time.perf_counter() - started
        assert (decision.allowed, decision.reason, decision.verdict.detail) == (
            False,
            Reason.EVALUATOR_UNAVAILABLE,
            "circuit open",
        )
        assert elapsed < 0.05
    finally:
        await evaluator.close()


async def test_remote_slow_server_is_a_deny(demo: PDP, fake_opa: tuple[FakeOpa, TestServer]) -> None:
    fake, server = fake_opa
    fake.delay_s = 0.3
    evaluator = RemoteOpaEvaluator(demo.store, _url(server), deadline_s=0.05)
    pdp = _pdp(demo, evaluator)
    try:
        started = time.perf_counter()
        decision = await pdp.authorize(make_request(P, "acme-thermo-1", "m/acme/c/telemetry"))
        assert time.perf_counter() - started < 0.25
        assert (decision.allowed, decision.reason) == (False, Reason.EVALUATOR_UNAVAILABLE)
        assert "no answer within 50 ms" in decision.verdict.detail
        assert fake.requests == 1  # the deadline covers retries too: none left after a timeout
    finally:
        await evaluator.close()


async def test_remote_breaker_half_opens_after_reset(demo: PDP, fake_opa: tuple[FakeOpa, TestServer]) -> None:
    fake, server = fake_opa
    now = [1000.0]
    evaluator = RemoteOpaEvaluator(
        demo.store, _url(server), retries=0, breaker_failures=2, breaker_reset_s=5.0, clock=lambda: now[0]
    )
    pdp = _pdp(demo, evaluator)
    request = make_request(P, "acme-thermo-1", "m/acme/c/telemetry")
    try:
        fake.fail_status = 500
        for _ in range(2):
            assert (await pdp.authorize(request)).reason is Reason.EVALUATOR_UNAVAILABLE
        assert (evaluator.breaker.state, fake.requests) == (CircuitBreaker.OPEN, 2)
        fake.fail_status = None
        assert (await pdp.authorize(request)).verdict.detail == "circuit open"
        assert fake.requests == 2  # open: nothing was sent
        now[0] += 5.0
        assert evaluator.breaker.state == CircuitBreaker.HALF_OPEN
        fake.fail_status = 500  # a failed trial reopens
        assert (await pdp.authorize(request)).reason is Reason.EVALUATOR_UNAVAILABLE
        assert evaluator.breaker.state == CircuitBreaker.OPEN
        now[0] += 5.0
        fake.fail_status = None  # a good trial closes
        decision = await pdp.authorize(request)
        assert (decision.allowed, decision.reason) == (True, Reason.CONNECTED)
        assert evaluator.breaker.state == CircuitBreaker.CLOSED
        assert fake.requests == 4
    finally:
        await evaluator.close()


async def test_remote_undefined_result_is_a_deny(demo: PDP, fake_opa: tuple[FakeOpa, TestServer]) -> None:
    fake, server = fake_opa
    fake.undefined = True
    evaluator = RemoteOpaEvaluator(demo.store, _url(server), path="authhook/mqtt/decision")
    pdp = _pdp(demo, evaluator)
    try:
        decision = await pdp.authorize(make_request(P, "acme-thermo-1", "m/acme/c/telemetry"))
        assert (decision.allowed, decision.reason) == (False, Reason.EVALUATOR_UNAVAILABLE)
        assert "undefined" in decision.verdict.detail
        assert evaluator.breaker.state == CircuitBreaker.CLOSED  # OPA answered: not an outage
    finally:
        await evaluator.close()


async def test_remote_unknown_path_is_undefined(demo: PDP, fake_opa: tuple[FakeOpa, TestServer]) -> None:
    _, server = fake_opa
    evaluator = RemoteOpaEvaluator(demo.store, _url(server), path="authhook/mqtt/nothing", deadline_s=2.0)
    try:
        with pytest.raises(EvaluatorUnavailable, match="undefined"):
            await evaluator.evaluate(make_request(C, "acme-thermo-1"), Target(None, None))
    finally:
        await evaluator.close()


async def test_fake_opa_rejects_bad_json(fake_opa: tuple[FakeOpa, TestServer]) -> None:
    import aiohttp

    _, server = fake_opa
    url = _url(server) + "/v1/data/authhook/mqtt/decision"
    async with aiohttp.ClientSession() as session, session.post(url, data=b"{nope") as response:
        assert response.status == 400


async def test_embedded_undefined_and_engine_errors_are_unavailable(demo: PDP, tmp_path: Any) -> None:
    policy = tmp_path / "broken.rego"
    policy.write_text('package authhook.mqtt\n\ndecision := {"allowed": true} if input.never\n')
    pdp = _pdp(demo, EmbeddedOpaEvaluator(demo.store, policy))
    decision = await pdp.authorize(make_request(P, "acme-thermo-1", "m/acme/c/telemetry"))
    assert (decision.allowed, decision.reason) == (False, Reason.EVALUATOR_UNAVAILABLE)
    policy.write_text("package authhook.mqtt\n\ndecision := x if x := 1 / count(input.blocks)\n")
    pdp = _pdp(demo, EmbeddedOpaEvaluator(demo.store, policy))
    decision = await pdp.authorize(make_request(P, "nobody", "m/acme/c/telemetry"))
    assert (decision.allowed, decision.reason) == (False, Reason.EVALUATOR_UNAVAILABLE)
    policy.write_text(
        'package authhook.mqtt\n\ndecision := {"allowed": true, "reason": "x", "detail": "", "decided_by": null}\n'
    )
    pdp = _pdp(demo, EmbeddedOpaEvaluator(demo.store, policy))
    decision = await pdp.authorize(make_request(P, "acme-thermo-1", "m/acme/c/telemetry"))
    assert (decision.allowed, decision.reason) == (False, Reason.EVALUATOR_UNAVAILABLE)


def test_breaker_state_machine() -> None:
    now = [0.0]
    breaker = CircuitBreaker(failures=2, reset_s=1.0, clock=lambda: now[0])
    assert breaker.allow()
    breaker.failure()
    breaker.success()  # success resets the count: failures must be consecutive
    breaker.failure()
    assert breaker.state == CircuitBreaker.CLOSED
    breaker.failure()
    assert breaker.state == CircuitBreaker.OPEN
    assert not breaker.allow()
    now[0] = 1.0
    assert breaker.allow()  # the one trial
    assert not breaker.allow()  # others still fail fast while it runs
    breaker.success()
    assert breaker.state == CircuitBreaker.CLOSED
