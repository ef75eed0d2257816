"""Client ids are owned, and revokes reach live sessions: the session layer of the tenant boundary.

The revocation watcher is driven pass by pass (``check_once``) with a recording closer, so these tests need
no clock; the brokers' real management APIs are exercised in ``test_broker_api.py`` and end to end with a
real RabbitMQ in ``test_e2e_rabbitmq.py``.
"""

from __future__ import annotations

from collections.abc import Collection
from pathlib import Path
from typing import Any

import pytest

from authhook import PDP
from authhook.config import ClientIdSettings, ClientIdTenantSettings
from authhook.models import Action, Reason
from authhook.pdp import make_request
from authhook.sessions.broker_api import CloseResult
from authhook.sessions.client_ids import ClientIdPolicy
from authhook.sessions.registry import SessionRegistry
from authhook.sessions.revoker import RevocationWatcher
from authhook.store.base import Connection, SubjectKind, SubjectRecord

SECRET = {
    "acme-thermo-1": "acme-thermo-1-demo-secret",
    "acme-dashboard": "acme-dashboard-demo-secret",
    "globex-meter-7": "globex-meter-7-demo-secret",
}


async def connect(pdp: PDP, username: str, client_id: str | None, broker: str = "emqx") -> Any:
    return await pdp.authenticate(username, SECRET[username], client_id=client_id, broker=broker)


# -- client-id ownership ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("username", "client_id", "allowed"),
    [
        ("acme-thermo-1", "acme-thermo-1", True),
        ("acme-thermo-1", "acme-thermo-1:boot", True),
        ("acme-thermo-1", "acme-thermo-1-7", True),
        ("acme-thermo-1", "acme-thermo-1_x", True),
        ("acme-thermo-1", "acme-thermo-1:", False),  # a separator with nothing after it
        ("acme-thermo-1", "acme-thermo-10", False),  # a prefix without a separator is another name
        ("acme-thermo-1", "globex-meter-7", False),  # another tenant's client's own id
        ("acme-thermo-1", "globex-meter-7:persist", False),
        ("acme-thermo-1", "acme-dashboard", False),  # same tenant, another client
        ("acme-thermo-1", "random-device-id", False),
        ("globex-meter-7", "acme-thermo-1:sub", False),
    ],
)
async def test_a_client_id_must_be_the_username_or_start_with_it_and_a_separator(
    demo: PDP, username: str, client_id: str, allowed: bool
) -> None:
    decision = await connect(demo, username, client_id)
    assert decision.allowed is allowed, decision.verdict
    if not allowed:
        assert decision.reason is Reason.CLIENT_ID_NOT_OWNED
        event = demo.decision_log.recent()[-1].to_dict()
        assert event["reason"] == "client_id_not_owned"


async def test_the_longest_subject_id_owns_a_client_id_even_across_tenants(demo: PDP) -> None:
    # A globex device whose id extends an acme device's id: `acme-thermo-1-x:...` is globex's, not acme's.
    await demo.store.put_subject(
        SubjectRecord(id="acme-thermo-1-x", tenant="globex", kind=SubjectKind.CLIENT),
        demo.hasher.hash_client_secret("globex-x-secret-0123456789"),
    )
    assert not (await connect(demo, "acme-thermo-1", "acme-thermo-1-x:sub")).allowed
    assert not (await connect(demo, "acme-thermo-1", "acme-thermo-1-x")).allowed
    assert (await connect(demo, "acme-thermo-1", "acme-thermo-1-y")).allowed
    taker = await demo.authenticate(
        "acme-thermo-1-x", "globex-x-secret-0123456789", client_id="acme-thermo-1-x:sub", broker="emqx"
    )
    assert taker.allowed


async def test_a_broker_session_needs_a_client_id_but_a_library_caller_does_not(demo: PDP) -> None:
    missing = await connect(demo, "acme-thermo-1", None, broker="emqx")
    assert not missing.allowed
    assert missing.reason is Reason.CLIENT_ID_MISSING
    assert (await connect(demo, "acme-thermo-1", None, broker="library")).allowed
    assert not (await connect(demo, "acme-thermo-1", "globex-meter-7", broker="library")).allowed


async def test_exact_and_pattern_policies_per_tenant(demo: PDP) -> None:
    settings = ClientIdSettings(
        policy="exact",
        tenants={"globex": ClientIdTenantSettings(policy="pattern", pattern=r"meter-{username}-[0-9]{1,3}")},
    )
    policy = ClientIdPolicy(settings, demo.store)
    assert await policy.check("acme-thermo-1", "acme-thermo-1", "acme") is None
    assert await policy.check("acme-thermo-1", "acme-thermo-1:x", "acme") is not None
    assert await policy.check("globex-meter-7", "meter-globex-meter-7-12", "globex") is None
    assert await policy.check("globex-meter-7", "meter-globex-meter-7-1234", "globex") is not None
    # A pattern cannot hand a subject another subject's client id, even one of its own tenant.
    await demo.store.put_subject(
        SubjectRecord(id="meter-globex-meter-7-12", tenant="acme", kind=SubjectKind.CLIENT),
        demo.hasher.hash_client_secret("other-secret-0123456789"),
    )
    refusal = await policy.check("globex-meter-7", "meter-globex-meter-7-12", "globex")
    assert refusal is not None and refusal.reason is Reason.CLIENT_ID_NOT_OWNED


def test_a_pattern_must_name_the_username() -> None:
    with pytest.raises(ValueError, match="username"):
        ClientIdTenantSettings(policy="pattern", pattern="dev-[0-9]+")
    with pytest.raises(ValueError, match="separators"):
        ClientIdSettings(separators="/")


async def test_a_client_id_with_too_many_separators_is_refused_without_a_lookup_storm(demo: PDP) -> None:
    decision = await connect(demo, "acme-thermo-1", "acme-thermo-1" + ":a" * 40)
    assert decision.reason is Reason.CLIENT_ID_NOT_OWNED
    assert "separators" in decision.verdict.detail


# -- the revocation watcher ---------------------------------------------------------------------------


class RecordingCloser:
    """A ``SessionCloser`` that records what it was asked to close (the brokers' APIs are tested apart)."""

    broker = "emqx"

    def __init__(self, ok: bool = True) -> None:
        self.calls: list[tuple[str, tuple[str, ...], bool]] = []
        self.ok = ok

    async def close_sessions(
        self, username: str, client_ids: Collection[str], *, reason: str, must_close: bool = False
    ) -> list[CloseResult]:
        self.calls.append((username, tuple(sorted(client_ids)), must_close))
        return [CloseResult(self.broker, cid, self.ok, "kicked" if self.ok else "HTTP 503") for cid in client_ids]

    async def aclose(self) -> None:
        return None


def watched(pdp: PDP, closer: RecordingCloser) -> RevocationWatcher:
    pdp.sessions = SessionRegistry(track_pairs=True)
    watcher = RevocationWatcher(pdp, pdp.sessions, [closer])
    pdp.revocation = watcher
    return watcher


async def live(pdp: PDP, username: str, client_id: str, *asks: tuple[str, str]) -> None:
    assert (await connect(pdp, username, client_id)).allowed
    for action, topic in asks:
        assert (await pdp.authorize(make_request(action, username, topic, client_id=client_id), broker="emqx")).allowed


async def test_a_disconnect_closes_exactly_the_sessions_that_used_the_channel(demo: PDP) -> None:
    closer = RecordingCloser()
    watcher = watched(demo, closer)
    await live(demo, "acme-thermo-1", "acme-thermo-1:a", ("publish", "m/acme/c/telemetry/temp"))
    await live(demo, "acme-dashboard", "acme-dashboard:ui", ("subscribe", "m/acme/c/telemetry/#"))
    await live(demo, "globex-meter-7", "globex-meter-7", ("publish", "m/globex/c/telemetry/kwh"))
    assert await watcher.check_once() == []  # the first pass re-checks everyone: nothing was lost
    assert closer.calls == []

    await demo.store.disconnect("acme", "acme-thermo-1", "telemetry", frozenset({Action.PUBLISH}))
    results = await watcher.check_once()
    assert closer.calls == [("acme-thermo-1", ("acme-thermo-1:a",), False)]
    assert [r.ok for r in results] == [True]
    event = demo.decision_log.recent()[-1].to_dict()
    assert (event["hook"], event["reason"], event["broker"]) == ("revoke", "session_closed", "emqx")
    assert "publish m/acme/c/telemetry/temp: not_connected" in event["detail"]

    # Nothing else changed: another pass closes nothing more.
    assert await watcher.check_once() == []
    assert len(closer.calls) == 1


@pytest.mark.parametrize("change", ["disable", "remove", "tenant"])
async def test_disabling_or_removing_a_subject_or_its_tenant_closes_its_sessions(demo: PDP, change: str) -> None:
    closer = RecordingCloser()
    watcher = watched(demo, closer)
    await live(demo, "acme-dashboard", "acme-dashboard:ui")
    await live(demo, "globex-meter-7", "globex-meter-7:a")
    await watcher.check_once()
    if change == "disable":
        await demo.store.set_subject_enabled("acme-dashboard", False)
    elif change == "remove":
        await demo.store.delete_subject("acme-dashboard")
    else:
        from authhook.store.base import Tenant

        await demo.store.put_tenant(Tenant(id="acme", enabled=False))
    await watcher.check_once()
    assert [call[0] for call in closer.calls] == ["acme-dashboard"]


async def test_a_widening_change_closes_nothing(demo: PDP) -> None:
    closer = RecordingCloser()
    watcher = watched(demo, closer)
    await live(demo, "acme-thermo-1", "acme-thermo-1", ("publish", "m/acme/c/telemetry/temp"))
    await watcher.check_once()
    await demo.store.connect(
        Connection(tenant="acme", client="acme-thermo-1", channel="alarms", actions=frozenset({Action.PUBLISH}))
    )
    assert await watcher.check_once() == []
    assert closer.calls == []


async def test_a_new_subject_that_now_owns_a_live_client_id_closes_the_old_holder(demo: PDP) -> None:
    closer = RecordingCloser()
    watcher = watched(demo, closer)
    await live(demo, "acme-thermo-1", "acme-thermo-1-x:1")
    await watcher.check_once()
    await demo.store.put_subject(
        SubjectRecord(id="acme-thermo-1-x", tenant="globex", kind=SubjectKind.CLIENT),
        demo.hasher.hash_client_secret("globex-x-secret-0123456789"),
    )
    await watcher.check_once()
    assert closer.calls == [("acme-thermo-1", ("acme-thermo-1-x:1",), True)]  # a refused login: close, not refresh


async def test_a_failed_close_is_logged_as_such(demo: PDP) -> None:
    closer = RecordingCloser(ok=False)
    watcher = watched(demo, closer)
    await live(demo, "acme-dashboard", "acme-dashboard", ("subscribe", "m/acme/c/telemetry/#"))
    await watcher.check_once()
    await demo.store.set_subject_enabled("acme-dashboard", False)
    await watcher.check_once()
    event = demo.decision_log.recent()[-1].to_dict()
    assert (event["reason"], event["hook"]) == ("session_close_failed", "revoke")
    assert "HTTP 503" in event["detail"]


async def test_a_fleet_acts_once_per_change(demo: PDP, store_url: str, tmp_path: Path) -> None:
    """Two instances on one store that both allowed the subject: only one of them closes its sessions."""
    from authhook.config import DecisionLogSettings

    from .conftest import settings_for

    first_closer, second_closer = RecordingCloser(), RecordingCloser()
    first = watched(demo, first_closer)
    log = DecisionLogSettings(path=tmp_path / "second.jsonl")
    async with PDP.from_settings(settings_for(store_url, decision_log=log)) as other:
        second = watched(other, second_closer)
        for pdp in (demo, other):
            await live(pdp, "acme-thermo-1", "acme-thermo-1", ("publish", "m/acme/c/telemetry/temp"))
        await first.check_once()
        await second.check_once()
        before = other.store.board.sequence()
        await demo.store.disconnect("acme", "acme-thermo-1", "telemetry", frozenset({Action.PUBLISH}))
        if store_url.startswith("postgresql"):  # the other instance hears of the change through the feed
            await wait_for_board_change(other, before)
        await first.check_once()
        await second.check_once()
    assert len(first_closer.calls) + len(second_closer.calls) == 1


async def wait_for_board_change(pdp: PDP, before: int) -> None:
    import asyncio

    for _ in range(500):
        now = pdp.store.board.sequence()
        if now != before and now % 2 == 0:
            return
        await asyncio.sleep(0.01)
    raise AssertionError("the change feed never moved the other instance's board")


async def test_claims_are_one_per_change_and_let_later_grants_through(pdp: PDP) -> None:
    assert await pdp.store.claim_revocation("dev", allowed_since=5, revision=10)
    assert not await pdp.store.claim_revocation("dev", allowed_since=7, revision=10)  # same change
    assert not await pdp.store.claim_revocation("dev", allowed_since=9, revision=11)  # granted before that close
    assert await pdp.store.claim_revocation("dev", allowed_since=12, revision=13)  # granted after it
    assert await pdp.store.claim_revocation("other", allowed_since=5, revision=10)
