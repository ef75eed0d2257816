"""The OPA evaluators must agree with the in-house model: the whole behaviour table, embedded and remote.
Plus the Rego unit tests of ``policy/opa/authhook_test.rego`` (run with regopy, as ``opa test`` would),
the checks on the policy's answers, the native regopy path, and the remote client's failure modes."""

from __future__ import annotations

import asyncio
import json
import re
import socket
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import regopy  # type: ignore[import-untyped]
from aiohttp.test_utils import TestServer

from authhook import PDP, Reason, make_request
from authhook.breaker import CircuitBreaker
from authhook.errors import EvaluatorUnavailable, StoreUnavailable
from authhook.evaluators.base import PolicyEvaluator
from authhook.evaluators.opa import (
    DEFAULT_POLICY_PATH,
    EmbeddedOpaEvaluator,
    RegoPolicy,
    RemoteOpaEvaluator,
    build_input,
    to_verdict,
)
from authhook.models import AuthzRequest, Target
from authhook.store.base import BlockFact, Effect, Facts, ScopeKind, Store, SubjectFact, SubjectKind
from authhook.topics import ChannelAddress
from tests.fake_opa import FakeOpa
from tests.test_inhouse import CASES

P, S, C = "publish", "subscribe", "connect"
REGO_DIR = Path(__file__).resolve().parent.parent / "policy" / "opa"  # the policy and its Rego tests
REGO_POLICY_PATH, REGO_TESTS_PATH = REGO_DIR / "authhook.rego", REGO_DIR / "authhook_test.rego"


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
            request = make_request(action, user, topic)
            decision = await pdp.authorize(request)
            assert (decision.allowed, decision.reason) == (allowed, reason), (user, topic, decision.verdict.detail)
            if decision.verdict.evaluator != "core":
                assert decision.verdict.evaluator == "opa-remote"
                expected = await demo.authorize(request)
                assert decision.verdict._replace(evaluator="x") == expected.verdict._replace(evaluator="x")
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


# -- the Rego unit tests (policy/opa/authhook_test.rego), as `opa test` would run them ------------------

_TEST_RULE = re.compile(r"^(test_[A-Za-z0-9_]*)\s+if\b", re.MULTILINE)
_WHOLE_INPUT_WITH = re.compile(r"\bwith\s+input\s+as\b")


def _rego_tests(source: str) -> list[str]:
    return sorted(set(_TEST_RULE.findall(source)))


def _run_rego_tests(policy: str, tests: str) -> dict[str, str]:
    """Every ``test_*`` rule of the test module -> regopy's answer (``{"expressions":[true]}`` passes)."""
    # rego-cpp 1.5.2 crashes the process on `with input as <object>`: refuse it instead of dying
    code = "\n".join(line for line in tests.splitlines() if not line.lstrip().startswith("#"))
    assert not _WHOLE_INPUT_WITH.search(code), "use per-key `with input.<key> as` (see authhook_test.rego)"
    package = re.search(r"^package\s+([\w.]+)", tests, re.MULTILINE)
    assert package is not None
    interpreter = regopy.Interpreter()
    interpreter.add_module("authhook.rego", policy)
    interpreter.add_module("authhook_test.rego", tests)
    return {name: str(interpreter.query(f"data.{package.group(1)}.{name}")) for name in _rego_tests(tests)}


REGO_TEST_NAMES = _rego_tests(REGO_TESTS_PATH.read_text(encoding="utf-8"))
PASS = '{"expressions":[true]}'


@pytest.fixture(scope="module")
def rego_results() -> dict[str, str]:
    return _run_rego_tests(REGO_POLICY_PATH.read_text(encoding="utf-8"), REGO_TESTS_PATH.read_text(encoding="utf-8"))


def test_rego_tests_are_found() -> None:
    assert len(REGO_TEST_NAMES) >= 20
    for topic in ("connected", "not_connected", "deny", "wildcard", "group", "wrong_tenant", "disabled", "sys"):
        assert any(topic in name for name in REGO_TEST_NAMES), topic


@pytest.mark.parametrize("name", REGO_TEST_NAMES)
def test_rego(rego_results: dict[str, str], name: str) -> None:
    assert rego_results[name] == PASS


# each mutation breaks one rule of the model; the Rego tests must notice every one
MUTATIONS = {
    "group coverage ignores the channel's groups": (
        '\tblock.scope == "channel_group"\n\tblock.ref in input.channel_groups\n',
        '\tblock.scope == "channel_group"\n',
    ),
    "allow before deny": (
        '} else := {"allowed": false, "reason": "denied_by_block", "block": i} if {\n'
        '\ti := first_channel_block("deny")\n'
        '} else := {"allowed": true, "reason": "connected"} if {\n'
        "\tinput.action in input.connection\n}",
        '} else := {"allowed": true, "reason": "connected"} if {\n'
        "\tinput.action in input.connection\n"
        '} else := {"allowed": false, "reason": "denied_by_block", "block": i} if {\n'
        '\ti := first_channel_block("deny")\n}',
    ),
    "first shortcut skips the tenant": ("\taddress.tenant == subject.tenant\n", ""),
    "first shortcut ignores blocks": ("\tinput.blocks == []\n", ""),
    "first shortcut lets disabled subjects pass": ("\tsubject.enabled == true\n", ""),
    "second shortcut skips the tenant": ("\ta.tenant == s.tenant\n", ""),
    "second shortcut lets disabled tenants pass": ("\ts.tenant_enabled == true\n", ""),
    "second shortcut ignores a claimed tenant": (
        "\tinput.claimed_tenant == null\n\ta := input.address\n",
        "\ta := input.address\n",
    ),
    "topic grants need not cover": ("\t\tblock.grants_topic == true\n", ""),
}


@pytest.mark.parametrize("mutation", sorted(MUTATIONS))
def test_rego_tests_catch_a_broken_policy(mutation: str) -> None:
    policy = REGO_POLICY_PATH.read_text(encoding="utf-8")
    old, new = MUTATIONS[mutation]
    assert policy.count(old) == 1, "the mutation no longer applies: update it with the policy"
    results = _run_rego_tests(policy.replace(old, new), REGO_TESTS_PATH.read_text(encoding="utf-8"))
    assert [name for name, answer in results.items() if answer != PASS]


# -- the policy on inputs built from facts -----------------------------------------------------------

SUBJECT = SubjectFact("dev-1", "acme", SubjectKind.CLIENT, True, True)
CHANNEL = Target("m/acme/c/telemetry", ChannelAddress("acme", "telemetry", ""))


def _block(block: str, scope: ScopeKind, ref: str | None, actions: int, effect: Effect) -> BlockFact:
    return BlockFact("r", block, scope, ref, actions, effect)


@pytest.fixture(scope="module")
def policy() -> RegoPolicy:
    return RegoPolicy.from_file(DEFAULT_POLICY_PATH)


def _decide(policy: RegoPolicy, action: str, target: Target, facts: Facts, **subject: Any) -> dict[str, Any]:
    request = make_request(action, "dev-1", target.topic, **subject)
    defined, result = policy.decide(request, target, facts)
    assert defined
    assert isinstance(result, dict)
    return result


def test_policy_answers_with_a_reason_code_and_the_deciding_block(policy: RegoPolicy) -> None:
    facts = Facts(3, SUBJECT, channel_exists=True, connection=2)
    assert _decide(policy, P, CHANNEL, facts) == {"allowed": True, "reason": "connected"}
    blocks = (
        _block("all", ScopeKind.TENANT, None, 6, Effect.ALLOW),
        _block("no", ScopeKind.CHANNEL, "telemetry", 2, Effect.DENY),
    )
    denied = _decide(policy, P, CHANNEL, facts._replace(blocks=blocks))
    assert denied == {"allowed": False, "reason": "denied_by_block", "block": 1}


def test_channel_coverage_is_decided_by_the_policy(policy: RegoPolicy) -> None:
    # the input says which groups the channel is in; whether a block covers it is the policy's call
    group = _block("group", ScopeKind.CHANNEL_GROUP, "floor", 2, Effect.ALLOW)
    facts = Facts(3, SUBJECT, (group,), channel_exists=True, channel_groups=("plant", "floor"))
    document = build_input(make_request(P, "dev-1", CHANNEL.topic), CHANNEL, facts)
    assert "covers_channel" not in document["blocks"][0]
    assert _decide(policy, P, CHANNEL, facts)["reason"] == "role_grant"
    assert _decide(policy, P, CHANNEL, facts._replace(channel_groups=("plant",)))["reason"] == "not_connected"


def test_policy_is_undefined_for_an_empty_input(policy: RegoPolicy) -> None:
    # a document missing `subject` matches no branch: undefined, which the evaluators turn into a deny
    defined, _ = policy.evaluate({"action": "publish"})
    assert not defined


def _facts_cases() -> list[tuple[AuthzRequest, Target, Facts]]:
    system = Target("$SYS/broker/#", None, is_filter=True, is_system=True)
    odd = Target('m/acme/c/te"le\\me\ttry', ChannelAddress("acme", 'te"le\\me\ttry', ""))
    blocks = (
        _block("sys", ScopeKind.TOPIC, "$SYS/#", 4, Effect.ALLOW),
        _block("grp", ScopeKind.CHANNEL_GROUP, "g\u00e9", 6, Effect.DENY),
        _block("all", ScopeKind.TENANT, None, 7, Effect.ALLOW),
    )
    rich = Facts(9, SUBJECT, blocks, channel_exists=True, channel_groups=("g\u00e9", "x"), connection=6)
    return [
        (make_request(P, "dev-1", CHANNEL.topic), CHANNEL, Facts(1, SUBJECT, channel_exists=True, connection=2)),
        (make_request(S, "dev-1", CHANNEL.topic, tenant="acme"), CHANNEL, rich),
        (make_request(S, "dev-1", system.topic), system, rich),
        (make_request(P, "dev-1", odd.topic), odd, rich._replace(subject=SUBJECT._replace(id='d"v'))),
        (make_request(C, "dev-1"), Target(None, None), Facts(1, None)),
    ]


def test_native_input_is_the_documented_input() -> None:
    # the native path pushes the input without building it; it must be exactly build_input's document
    echo = RegoPolicy("package authhook.mqtt\n\ndecision := input\n")
    assert echo.native
    for request, target, facts in _facts_cases():
        defined, seen = echo.decide(request, target, facts)
        assert defined
        assert seen == json.loads(json.dumps(build_input(request, target, facts)))  # escaping round-trips
        assert echo.evaluate(build_input(request, target, facts)) == (True, seen)


def test_native_and_public_regopy_paths_agree() -> None:
    native = RegoPolicy.from_file(DEFAULT_POLICY_PATH)
    public = RegoPolicy.from_file(DEFAULT_POLICY_PATH, native=False)
    assert native.native and not public.native
    for request, target, facts in _facts_cases():
        assert native.decide(request, target, facts) == public.decide(request, target, facts)


# -- checking the policy's answer --------------------------------------------------------------------

DENY_BLOCK = _block("no", ScopeKind.CHANNEL, "telemetry", 2, Effect.DENY)


@pytest.mark.parametrize(
    ("answer", "why"),
    [
        ({"allowed": True}, "malformed"),
        ({"allowed": True, "reason": "connected", "detail": "x"}, "malformed"),
        ({"allowed": "yes", "reason": "connected"}, "does not match"),
        ({"allowed": True, "reason": "not_connected"}, "does not match"),
        ({"allowed": False, "reason": "evaluator_unavailable"}, "unknown reason"),
        ({"allowed": False, "reason": "denied_by_block"}, "names no deny block"),
        ({"allowed": False, "reason": "denied_by_block", "block": 1}, "names no deny block"),
        ({"allowed": False, "reason": "denied_by_block", "block": True}, "names no deny block"),
        ({"allowed": True, "reason": "role_grant", "block": 0}, "names no allow block"),
        ({"allowed": False, "reason": "not_connected", "block": 0}, "named a block"),
        ({"allowed": True, "reason": "subject_active"}, "does not fit"),
        (["allowed"], "malformed"),
    ],
)
def test_answers_that_do_not_fit_are_evaluator_failures(answer: Any, why: str) -> None:
    facts = Facts(3, SUBJECT, (DENY_BLOCK,), channel_exists=True, connection=2)
    request = make_request(P, "dev-1", CHANNEL.topic)
    with pytest.raises(EvaluatorUnavailable, match=why):
        to_verdict(answer, "opa-embedded", request, CHANNEL, facts, None)


def test_the_detail_is_worded_from_the_facts() -> None:
    facts = Facts(3, SUBJECT, (DENY_BLOCK,), channel_exists=True, connection=2)
    request = make_request(P, "dev-1", CHANNEL.topic)
    trace: list[str] = []
    verdict = to_verdict(
        {"allowed": False, "reason": "denied_by_block", "block": 0}, "opa-embedded", request, CHANNEL, facts, trace
    )
    assert (verdict.detail, verdict.decided_by) == (
        "`publish` on `telemetry` denied by role:r/block:no",
        "role:r/block:no",
    )
    assert trace[-1] == "deny: `publish` on `telemetry` denied by role:r/block:no (role:r/block:no)"


async def test_embedded_undefined_and_engine_errors_are_unavailable(demo: PDP, tmp_path: Path) -> None:
    policy = tmp_path / "broken.rego"
    policy.write_text('package authhook.mqtt\n\ndecision := {"allowed": true} if input.never\n')
    pdp = _pdp(demo, EmbeddedOpaEvaluator(demo.store, policy))
    decision = await pdp.authorize(make_request(P, "acme-thermo-1", "m/acme/c/telemetry"))
    assert (decision.allowed, decision.reason) == (False, Reason.EVALUATOR_UNAVAILABLE)
    policy.write_text("package authhook.mqtt\n\ndecision := x if x := 1 / count(input.blocks)\n")
    pdp = _pdp(demo, EmbeddedOpaEvaluator(demo.store, policy))
    decision = await pdp.authorize(make_request(P, "nobody", "m/acme/c/telemetry"))
    assert (decision.allowed, decision.reason) == (False, Reason.EVALUATOR_UNAVAILABLE)
    policy.write_text('package authhook.mqtt\n\ndecision := {"allowed": true, "reason": "x"}\n')
    pdp = _pdp(demo, EmbeddedOpaEvaluator(demo.store, policy))
    decision = await pdp.authorize(make_request(P, "acme-thermo-1", "m/acme/c/telemetry"))
    assert (decision.allowed, decision.reason) == (False, Reason.EVALUATOR_UNAVAILABLE)


# -- remote failure modes ----------------------------------------------------------------------------


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


class CountingStore:
    """A store that counts fact reads, and can be told to fail them."""

    def __init__(self, store: Store) -> None:
        self._store = store
        self.reads = 0
        self.fail = False

    async def facts(self, subject: str, tenant: str | None, channel: str | None) -> Facts:
        self.reads += 1
        if self.fail:
            raise StoreUnavailable("store down")
        return await self._store.facts(subject, tenant, channel)


async def test_remote_down_opens_the_breaker_and_then_fails_fast_without_a_store_read(demo: PDP) -> None:
    store = CountingStore(demo.store)
    evaluator = RemoteOpaEvaluator(
        store,  # type: ignore[arg-type]
        f"http://127.0.0.1:{_closed_port()}",
        retries=1,
        breaker_failures=3,
        breaker_reset_s=60,
    )
    pdp = _pdp(demo, evaluator)
    request = make_request(P, "acme-thermo-1", "m/acme/c/telemetry")
    try:
        for _ in range(3):
            decision = await pdp.authorize(request)
            assert (decision.allowed, decision.reason) == (False, Reason.EVALUATOR_UNAVAILABLE)
            assert "cannot reach opa" in decision.verdict.detail
        assert evaluator.breaker.state == CircuitBreaker.OPEN
        assert store.reads == 3
        started = time.perf_counter()
        decision = await pdp.authorize(request)
        elapsed = time.perf_counter() - started
        assert (decision.allowed, decision.reason, decision.verdict.detail) == (
            False,
            Reason.EVALUATOR_UNAVAILABLE,
            "circuit open",
        )
        assert elapsed < 0.05
        assert store.reads == 3  # the open breaker answered before any store read
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


async def test_a_late_success_does_not_close_an_open_breaker(demo: PDP, fake_opa: tuple[FakeOpa, TestServer]) -> None:
    fake, server = fake_opa
    fake.hold = asyncio.Event()
    evaluator = RemoteOpaEvaluator(demo.store, _url(server), deadline_s=5.0, retries=0, breaker_failures=1)
    request = make_request(P, "acme-thermo-1", "m/acme/c/telemetry")
    try:
        slow = asyncio.create_task(
            evaluator.evaluate(request, Target(request.topic, ChannelAddress("acme", "telemetry", "")))
        )
        await asyncio.wait_for(fake.arrived.wait(), 5.0)
        other = evaluator.breaker.allow()  # meanwhile another call fails and opens the breaker
        assert other is not None
        evaluator.breaker.failure(other)
        assert evaluator.breaker.state == CircuitBreaker.OPEN
        fake.hold.set()
        verdict = await slow  # the slow call's answer still stands...
        assert (verdict.allowed, verdict.reason) == (True, Reason.CONNECTED)
        assert evaluator.breaker.state == CircuitBreaker.OPEN  # ...but it says nothing about OPA now
    finally:
        fake.hold.set()
        await evaluator.close()


def test_breaker_state_machine() -> None:
    now = [0.0]
    breaker = CircuitBreaker(failures=2, reset_s=1.0, clock=lambda: now[0])
    first = breaker.allow()
    assert first is not None
    breaker.failure(first)
    breaker.success(first)  # success resets the count: failures must be consecutive
    second = breaker.allow()
    assert second is not None
    breaker.failure(second)
    assert breaker.state == CircuitBreaker.CLOSED
    breaker.failure(second)
    assert breaker.state == CircuitBreaker.OPEN
    assert breaker.allow() is None
    now[0] = 1.0
    trial = breaker.allow()  # the one trial
    assert trial is not None and trial.trial
    assert breaker.allow() is None  # others still fail fast while it runs
    breaker.success(trial)
    assert breaker.state == CircuitBreaker.CLOSED


def test_breaker_ignores_outcomes_of_calls_admitted_before_it_opened() -> None:
    now = [0.0]
    breaker = CircuitBreaker(failures=1, reset_s=10.0, clock=lambda: now[0])
    early, late = breaker.allow(), breaker.allow()
    assert early is not None and late is not None
    breaker.failure(early)
    assert breaker.state == CircuitBreaker.OPEN
    breaker.success(late)  # a late success does not close it...
    assert breaker.state == CircuitBreaker.OPEN
    now[0] = 9.0
    breaker.failure(late)  # ...and a late failure does not extend it
    now[0] = 10.0
    assert breaker.state == CircuitBreaker.HALF_OPEN
    trial = breaker.allow()
    assert trial is not None
    breaker.success(late)  # nor does it count in half-open: only the trial decides
    assert breaker.state == CircuitBreaker.HALF_OPEN
    breaker.failure(trial)
    assert breaker.state == CircuitBreaker.OPEN
    now[0] = 20.0
    trial = breaker.allow()
    assert trial is not None
    breaker.success(trial)
    assert breaker.state == CircuitBreaker.CLOSED
    breaker.failure(late)  # from two epochs ago: ignored, the count starts afresh
    fresh = breaker.allow()
    assert fresh is not None
    breaker.failure(fresh)
    assert breaker.state == CircuitBreaker.OPEN


async def test_a_store_failure_during_the_trial_frees_the_trial(
    demo: PDP, fake_opa: tuple[FakeOpa, TestServer]
) -> None:
    _, server = fake_opa
    now = [0.0]
    store = CountingStore(demo.store)
    evaluator = RemoteOpaEvaluator(
        store,  # type: ignore[arg-type]
        _url(server),
        breaker_failures=1,
        breaker_reset_s=5.0,
        clock=lambda: now[0],
    )
    request = make_request(P, "acme-thermo-1", "m/acme/c/telemetry")
    target = Target(request.topic, ChannelAddress("acme", "telemetry", ""))
    try:
        ticket = evaluator.breaker.allow()
        assert ticket is not None
        evaluator.breaker.failure(ticket)
        now[0] = 5.0
        store.fail = True
        with pytest.raises(StoreUnavailable):
            await evaluator.evaluate(request, target)
        assert evaluator.breaker.state == CircuitBreaker.HALF_OPEN  # no verdict on OPA either way
        store.fail = False
        assert (await evaluator.evaluate(request, target)).allowed  # the next caller gets the trial
        assert evaluator.breaker.state == CircuitBreaker.CLOSED
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


async def test_remote_bad_request_fails_closed_and_says_why(demo: PDP, fake_opa: tuple[FakeOpa, TestServer]) -> None:
    fake, server = fake_opa
    fake.fail_status = 400
    evaluator = RemoteOpaEvaluator(demo.store, _url(server), retries=3, breaker_failures=1)
    pdp = _pdp(demo, evaluator)
    try:
        decision = await pdp.authorize(make_request(P, "acme-thermo-1", "m/acme/c/telemetry"))
        assert (decision.allowed, decision.reason) == (False, Reason.EVALUATOR_UNAVAILABLE)
        assert decision.verdict.detail == "opa-remote: opa answered http 400 (invalid_parameter: injected)"
        assert fake.requests == 1  # a refused request is not retried...
        assert evaluator.breaker.state == CircuitBreaker.CLOSED  # ...and OPA is up: not an outage
    finally:
        await evaluator.close()
