"""The decision cache: hits, TTLs, revision stamps (stale window 0), single flight, failures uncached."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from authhook import PDP, Reason, make_request
from authhook.cache import DecisionCache
from authhook.errors import StoreUnavailable
from authhook.models import Action, AuthzRequest, Subject, Target, Verdict, request_cache_key
from authhook.revision import RevisionBoard, tenant_slot
from authhook.store.base import Channel, Connection
from authhook.topics import ChannelAddress

from .conftest import TEST_KEY, settings_for

PUBLISH = make_request("publish", "acme-thermo-1", "m/acme/c/telemetry/temp")


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def test_second_identical_request_is_a_hit_with_the_same_answer(demo: PDP) -> None:
    first = await demo.authorize(PUBLISH)
    second = await demo.authorize(PUBLISH)
    assert (first.cache, second.cache) == ("miss", "hit")
    assert second.verdict is first.verdict


async def test_revoke_through_the_library_is_denied_on_the_very_next_decision(demo: PDP) -> None:
    assert (await demo.authorize(PUBLISH)).allowed
    assert (await demo.authorize(PUBLISH)).cache == "hit"
    await demo.store.disconnect("acme", "acme-thermo-1", "telemetry", frozenset({"publish"}))
    after = await demo.authorize(PUBLISH)
    assert not after.allowed
    assert (after.reason, after.cache) == (Reason.NOT_CONNECTED, "miss")


async def test_the_synchronous_cache_path_answers_hits_only_and_never_after_a_revoke(demo: PDP) -> None:
    """``pdp.cached`` (tried by adapters before awaiting ``authorize``) is the same hit's verdict, logged alike."""
    assert demo.cached(PUBLISH) is None  # nothing cached yet: the caller must await authorize
    first = await demo.authorize(PUBLISH, broker="emqx", hook="authz")
    logged = len(demo.decision_log.recent())
    hit = demo.cached(PUBLISH, broker="emqx", hook="authz")
    assert hit is not None
    assert hit == first.verdict and hit.allowed
    event = demo.decision_log.recent()[-1].to_dict()
    assert len(demo.decision_log.recent()) == logged + 1
    assert (event["broker"], event["hook"], event["cache"], event["allowed"]) == ("emqx", "authz", "hit", True)
    await demo.store.disconnect("acme", "acme-thermo-1", "telemetry", frozenset({"publish"}))
    assert demo.cached(PUBLISH) is None
    assert not (await demo.authorize(PUBLISH)).allowed


async def test_a_grant_drops_a_cached_denial(demo: PDP) -> None:
    request = make_request("subscribe", "acme-thermo-1", "m/acme/c/telemetry")
    assert not (await demo.authorize(request)).allowed
    assert (await demo.authorize(request)).cache == "hit"
    await demo.store.connect(
        Connection(tenant="acme", client="acme-thermo-1", channel="telemetry", actions=frozenset({"subscribe"}))
    )
    assert (await demo.authorize(request)).allowed


async def test_a_write_in_another_tenant_keeps_this_tenants_entries(demo: PDP) -> None:
    await demo.authorize(PUBLISH)
    assert tenant_slot("globex") != tenant_slot("acme")
    await demo.store.put_channel(Channel(id="new", tenant="globex"))
    assert (await demo.authorize(PUBLISH)).cache == "hit"


async def test_a_new_client_invalidates_a_cached_unknown_subject(demo: PDP) -> None:
    from authhook.store.base import SubjectRecord

    request = make_request("publish", "late-device", "m/acme/c/telemetry")
    assert (await demo.authorize(request)).reason is Reason.UNKNOWN_SUBJECT
    record = SubjectRecord(id="late-device", tenant="acme", kind="client")
    await demo.store.put_subject(record, demo.hasher.hash_client_secret("late-device-secret-0123"))
    await demo.store.connect(
        Connection(tenant="acme", client="late-device", channel="telemetry", actions=frozenset({"publish"}))
    )
    assert (await demo.authorize(request)).allowed


async def test_revoke_by_another_process_is_seen_on_the_next_decision(sqlite_demo: PDP, db_path: Path) -> None:
    demo = sqlite_demo
    """The CLI (a separate process) revokes while this PDP holds a cached allow."""
    before = await demo.authorize(PUBLISH)
    assert before.allowed
    assert (await demo.authorize(PUBLISH)).cache == "hit"
    cli = [sys.executable, "-m", "authhook", "--store", f"sqlite:///{db_path}"]
    env = {"AUTHHOOK_SECRET_KEY": TEST_KEY, "PATH": "/usr/bin:/bin"}
    done = await asyncio.to_thread(
        subprocess.run,
        [*cli, "disconnect", "acme", "acme-thermo-1", "telemetry", "--actions", "publish"],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    after = await demo.authorize(PUBLISH)
    assert (after.allowed, after.reason) == (False, Reason.NOT_CONNECTED)
    assert after.verdict.revision == before.verdict.revision + 1  # the other process's write, read afresh


def _verdict(allowed: bool, reason: Reason = Reason.CONNECTED) -> Verdict:
    return Verdict(allowed, reason, "test", "test", 1, None, "acme")


TARGET = Target("m/acme/c/x", ChannelAddress("acme", "x", ""))


async def test_denials_expire_sooner_than_allows() -> None:
    clock = FakeClock()
    cache = DecisionCache(RevisionBoard(), allow_ttl=60, deny_ttl=5, clock=clock)

    async def allow() -> Verdict:
        return _verdict(True)

    async def deny() -> Verdict:
        return _verdict(False, Reason.NOT_CONNECTED)

    await cache.get_or_evaluate("a", TARGET, allow)
    await cache.get_or_evaluate("d", TARGET, deny)
    clock.now += 6
    assert cache.get("d") is None
    assert cache.get("a") is not None
    clock.now += 55
    assert cache.get("a") is None


async def test_a_full_cache_evicts_the_entry_hit_longest_ago_to_the_second() -> None:
    """Hits refresh an entry's place in the LRU order at most once per ``RECENCY_GRAIN_S``."""
    from authhook.cache import RECENCY_GRAIN_S

    clock = FakeClock()
    cache = DecisionCache(RevisionBoard(), maxsize=3, clock=clock)

    async def allow() -> Verdict:
        return _verdict(True)

    for key in ("a", "b", "c"):
        await cache.get_or_evaluate(key, TARGET, allow)
    clock.now += RECENCY_GRAIN_S
    assert cache.get("a") is not None  # a second on: "a" moves to the young end, "b" is now the oldest
    await cache.get_or_evaluate("d", TARGET, allow)
    assert [k for k in ("a", "b", "c", "d") if cache.get(k) is not None] == ["a", "c", "d"]

    clock.now += RECENCY_GRAIN_S / 2
    assert cache.get("c") is not None  # "c" was refreshed by the check above, under a second ago: no move
    await cache.get_or_evaluate("e", TARGET, allow)
    assert cache.get("a") is None  # refreshed longest ago, so first out
    assert all(cache.get(k) is not None for k in ("c", "d", "e"))


async def test_concurrent_identical_misses_are_evaluated_once() -> None:
    cache = DecisionCache(RevisionBoard())
    calls = 0
    gate = asyncio.Event()

    async def slow() -> Verdict:
        nonlocal calls
        calls += 1
        await gate.wait()
        return _verdict(True)

    tasks = [asyncio.create_task(cache.get_or_evaluate("k", TARGET, slow)) for _ in range(50)]
    await asyncio.sleep(0)
    gate.set()
    results = await asyncio.gather(*tasks)
    assert calls == 1
    assert all(v.allowed for v, _ in results)
    assert cache.stats.shared == 49


async def test_a_miss_after_a_write_does_not_share_an_evaluation_that_began_before_it() -> None:
    """The leader may have read the facts before the revoke: whoever asks after the write evaluates anew."""
    board = RevisionBoard()
    cache = DecisionCache(board)
    gate = asyncio.Event()
    answers = iter([True, False])  # what the facts said before and after the revoke

    async def evaluate() -> Verdict:
        allowed = next(answers)
        if allowed:
            await gate.wait()  # the leader read the old facts and is still working
        return _verdict(allowed)

    leader = asyncio.create_task(cache.get_or_evaluate("k", TARGET, evaluate))
    await asyncio.sleep(0)
    with board.writing([tenant_slot("acme")]):
        pass  # the revoke commits
    # Sharing the leader's flight would wait on its gate, which opens only below: fail then, do not hang.
    done, _ = await asyncio.wait({asyncio.ensure_future(cache.get_or_evaluate("k", TARGET, evaluate))}, timeout=2)
    assert done, "the miss after the write joined the evaluation that began before it"
    after, _ = done.pop().result()
    assert not after.allowed
    assert cache.stats.shared == 0
    gate.set()
    assert (await leader)[0].allowed  # the leader's own caller asked before the write
    stored = cache.get("k")  # what is cached is the answer computed after the write, not the leader's
    assert stored is not None
    assert not stored.verdict.allowed


async def test_failures_are_never_cached_and_followers_see_the_error() -> None:
    cache = DecisionCache(RevisionBoard())

    async def failing() -> Verdict:
        return Verdict(False, Reason.STORE_UNAVAILABLE, "down", "test")

    await cache.get_or_evaluate("k", TARGET, failing)
    assert cache.get("k") is None

    async def raising() -> Verdict:
        await asyncio.sleep(0)
        raise StoreUnavailable("down")

    results = await asyncio.gather(
        *(cache.get_or_evaluate("r", TARGET, raising) for _ in range(3)), return_exceptions=True
    )
    assert all(isinstance(r, StoreUnavailable) for r in results)


async def test_a_result_computed_while_a_write_is_in_flight_is_not_stored() -> None:
    board = RevisionBoard()
    cache = DecisionCache(board)

    async def evaluate_during_write() -> Verdict:
        with board.writing([tenant_slot("acme")]):
            return _verdict(True)

    await cache.get_or_evaluate("k", TARGET, evaluate_during_write)
    assert cache.get("k") is None

    async def evaluate_before_write_commits() -> Verdict:
        return _verdict(True)

    with board.writing([tenant_slot("other")]):
        await cache.get_or_evaluate("k2", TARGET, evaluate_before_write_commits)
    assert cache.get("k2") is None


async def test_store_outage_fails_closed_and_is_logged(demo: PDP) -> None:
    await demo.store.close()
    decision = await demo.authorize(make_request("publish", "acme-dashboard", "m/acme/c/telemetry"))
    assert (decision.allowed, decision.reason) == (False, Reason.STORE_UNAVAILABLE)
    event = demo.decision_log.recent()[-1]
    assert event.decision.reason is Reason.STORE_UNAVAILABLE


async def test_cache_can_be_disabled(db_path: Path) -> None:
    from authhook.config import CacheSettings

    async with PDP.from_settings(settings_for(db_path, cache=CacheSettings(enabled=False))) as pdp:
        assert pdp.cache is None
        decision = await pdp.authorize(make_request("publish", "x", "m/a/c/b"))
        assert decision.cache == "bypass"
        assert pdp.cached(make_request("publish", "x", "m/a/c/b")) is None


def test_request_cache_keys_differ_on_every_policy_visible_field_and_only_on_those() -> None:
    base = make_request("publish", "u", "m/a/c/b", client_id="c", tenant="a", qos=1, retain=True)
    variants = [
        make_request("subscribe", "u", "m/a/c/b", client_id="c", tenant="a", qos=1, retain=True),
        make_request("publish", "v", "m/a/c/b", client_id="c", tenant="a", qos=1, retain=True),
        make_request("publish", "u", "m/a/c/x", client_id="c", tenant="a", qos=1, retain=True),
        make_request("publish", "u", "m/a/c/b", client_id="c", tenant="z", qos=1, retain=True),
    ]
    keys = {base.cache_key(), *(v.cache_key() for v in variants)}
    assert len(keys) == 1 + len(variants)
    for same in (
        AuthzRequest.model_validate(base.model_dump()),
        make_request("publish", "u", "m/a/c/b", client_id="other", tenant="a", qos=0, retain=False),
    ):
        assert same.cache_key() == base.cache_key()


async def test_a_cached_allow_is_never_served_to_a_request_claiming_another_tenant(sqlite_demo: PDP) -> None:
    """The tenant a broker claims is the one input beyond subject, action and topic: a hit must not cross it."""
    pdp = sqlite_demo
    topic = "m/acme/c/telemetry/temp"
    assert (await pdp.authorize(make_request("publish", "acme-thermo-1", topic))).allowed
    hit = await pdp.authorize(make_request("publish", "acme-thermo-1", topic, tenant="acme"))
    assert hit.allowed
    claimed = await pdp.authorize(make_request("publish", "acme-thermo-1", topic, tenant="globex"))
    assert (claimed.allowed, claimed.reason) == (False, Reason.WRONG_TENANT)
    own_entry = pdp.cached(make_request("publish", "acme-thermo-1", topic, tenant="globex"))
    assert own_entry is not None and not own_entry.allowed  # the deny was cached under its own key


async def test_qos_retain_and_client_id_share_one_cached_decision(sqlite_demo: PDP) -> None:
    pdp = sqlite_demo
    topic = "m/acme/c/telemetry/temp"
    first = await pdp.authorize(make_request("publish", "acme-thermo-1", topic, client_id="acme-thermo-1", qos=0))
    again = await pdp.authorize(
        make_request("publish", "acme-thermo-1", topic, client_id="acme-thermo-1:b", qos=2, retain=True)
    )
    assert (first.cache, again.cache) == ("miss", "hit")
    assert again.allowed


_names = st.one_of(st.none(), st.from_regex(r"[a-z0-9-]{1,12}", fullmatch=True))


@settings(max_examples=200, deadline=None)
@given(
    action=st.sampled_from(list(Action)),
    username=_names,
    client_id=_names,
    tenant=_names,
    subject_id=_names,
    topic=st.one_of(st.none(), st.from_regex(r"m/[a-z]{1,5}/c/[a-z]{1,5}(/[a-z#+]{1,3})?", fullmatch=True)),
    qos=st.one_of(st.none(), st.integers(0, 2)),
    retain=st.booleans(),
    new_topic=st.from_regex(r"m/[a-z]{1,5}/c/[a-z]{1,5}", fullmatch=True),
)
def test_the_hit_path_key_is_the_attribute_values_however_the_request_was_built(
    action: Action,
    username: str | None,
    client_id: str | None,
    tenant: str | None,
    subject_id: str | None,
    topic: str | None,
    qos: int | None,
    retain: bool,
    new_topic: str,
) -> None:
    """``request_cache_key`` reads pydantic's ``__dict__`` for speed: it must give what the attributes say,
    for validated, copied-with-changes and unvalidated (model_construct) requests alike."""
    subject = Subject(id=subject_id, username=username, client_id=client_id, tenant=tenant)
    request = AuthzRequest(subject=subject, action=action, topic=topic, qos=qos, retain=retain)
    built = [
        request,
        request.model_copy(update={"topic": new_topic}),
        request.model_copy(update={"subject": subject.model_copy(update={"tenant": "other"})}),
        AuthzRequest.model_construct(subject=subject, action=action, topic=topic, qos=qos, retain=retain),
        AuthzRequest.model_construct(subject=subject, action=action),  # defaults filled in
    ]
    for r in built:
        s = r.subject
        expected = (r.action, s.id or s.username, s.tenant, r.topic)
        assert request_cache_key(r) == expected == r.cache_key()


async def test_when_the_evaluating_caller_is_cancelled_the_waiters_evaluate_themselves() -> None:
    cache = DecisionCache(RevisionBoard())
    started = asyncio.Event()
    calls = 0

    async def evaluate() -> Verdict:
        nonlocal calls
        calls += 1
        if calls == 1:
            started.set()
            await asyncio.sleep(3600)  # the first caller hangs until cancelled
        return _verdict(True)

    leader = asyncio.create_task(cache.get_or_evaluate("k", TARGET, evaluate))
    await started.wait()
    follower = asyncio.create_task(cache.get_or_evaluate("k", TARGET, evaluate))
    await asyncio.sleep(0)
    leader.cancel()
    verdict, status = await asyncio.wait_for(follower, timeout=5)
    assert (verdict.allowed, status, calls) == (True, "miss", 2)
    assert leader.cancelled()


async def test_the_background_flusher_writes_the_log_file(demo: PDP) -> None:
    log = demo.decision_log
    assert log.path is not None
    await demo.authorize(make_request("publish", "acme-thermo-1", "m/acme/c/telemetry"))
    for _ in range(50):  # the flusher runs every 0.2 s in a worker thread
        await asyncio.sleep(0.1)
        if log.path.exists() and log.path.read_text():
            break
    assert '"subject":"acme-thermo-1"' in log.path.read_text()
