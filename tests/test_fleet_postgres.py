"""A fleet of PDP instances on one real PostgreSQL: invalidation, a lost change feed, database outages.

Timing here is only bounded generously (a revoke must reach the other instance within a second, no
decision may hang); the latency distributions live in ``bench/pg_scale_bench.py``.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import pytest

from authhook import PDP, Reason, make_request
from authhook.errors import StoreUnavailable
from authhook.store.postgres import PostgresStore
from authhook.world import import_world, load_world

from .conftest import DEMO_WORLD, PG_DSN, settings_for

PUBLISH = make_request("publish", "acme-thermo-1", "m/acme/c/telemetry/temp")


@pytest.fixture
async def fleet(pg_schema: str) -> AsyncIterator[tuple[PDP, PDP]]:
    url = f"{PG_DSN}?schema={pg_schema}"
    async with PDP.from_settings(settings_for(url)) as a, PDP.from_settings(settings_for(url)) as b:
        await import_world(a.store, a.hasher, load_world(DEMO_WORLD))
        yield a, b


def store_of(pdp: PDP) -> PostgresStore:
    assert isinstance(pdp.store, PostgresStore)
    return pdp.store


async def until(predicate: object, within: float = 5.0) -> float:
    """Poll an async predicate; return how long it took to become true."""
    start = time.perf_counter()
    while True:
        if await predicate():  # type: ignore[operator]
            return time.perf_counter() - start
        if time.perf_counter() - start > within:
            raise AssertionError(f"not true within {within} s")
        await asyncio.sleep(0.002)


async def test_a_revoke_on_one_instance_reaches_the_other(fleet: tuple[PDP, PDP]) -> None:
    a, b = fleet
    for pdp in (a, b):
        assert (await pdp.authorize(PUBLISH)).allowed
        assert (await pdp.authorize(PUBLISH)).cache == "hit"
    await a.store.disconnect("acme", "acme-thermo-1", "telemetry", frozenset({"publish"}))
    # read-your-writes: the writer never serves the old allow
    assert (await a.authorize(PUBLISH)).reason is Reason.NOT_CONNECTED

    async def b_denies() -> bool:
        return not (await b.authorize(PUBLISH)).allowed

    assert await until(b_denies, within=1.0) < 1.0
    assert store_of(b).listener.received >= 1


async def test_a_grant_on_one_instance_drops_the_others_cached_denial(fleet: tuple[PDP, PDP]) -> None:
    a, b = fleet
    request = make_request("subscribe", "acme-thermo-1", "m/acme/c/telemetry")
    assert not (await b.authorize(request)).allowed
    assert (await b.authorize(request)).cache == "hit"
    from authhook.store.base import Connection

    await a.store.connect(
        Connection(tenant="acme", client="acme-thermo-1", channel="telemetry", actions=frozenset({"subscribe"}))
    )

    async def b_allows() -> bool:
        return (await b.authorize(request)).allowed

    await until(b_allows, within=1.0)


async def terminate_listener(pdp: PDP) -> None:
    listener_conn = store_of(pdp).listener._conn
    assert listener_conn is not None
    pid = listener_conn.get_server_pid()
    admin = await asyncpg.connect(PG_DSN)
    try:
        assert await admin.fetchval("SELECT pg_terminate_backend($1)", pid)
    finally:
        await admin.close()


async def test_losing_the_listening_connection_flushes_and_recovers(fleet: tuple[PDP, PDP]) -> None:
    _, b = fleet
    listener = store_of(b).listener
    assert (await b.authorize(PUBLISH)).allowed
    assert (await b.authorize(PUBLISH)).cache == "hit"
    first_connection = listener._conn
    await terminate_listener(b)

    async def relistening() -> bool:
        return listener.listening.is_set() and listener._conn is not first_connection

    await until(relistening)
    # everything cached before the loss is gone: the next answer is evaluated afresh
    again = await b.authorize(PUBLISH)
    assert (again.allowed, again.cache) == (True, "miss")
    assert (await b.authorize(PUBLISH)).cache == "hit"  # and caching works again


async def test_while_deaf_an_instance_serves_no_stale_allow(
    fleet: tuple[PDP, PDP], monkeypatch: pytest.MonkeyPatch
) -> None:
    a, b = fleet
    store_b = store_of(b)
    assert (await b.authorize(PUBLISH)).allowed
    assert (await b.authorize(PUBLISH)).cache == "hit"

    async def refuse() -> asyncpg.Connection:
        raise OSError("listener kept down by the test")

    monkeypatch.setattr(store_b, "connect_raw", refuse)  # B cannot listen again until the test allows
    await terminate_listener(b)

    async def deaf() -> bool:
        return store_b.board.suspended

    await until(deaf)
    await a.store.disconnect("acme", "acme-thermo-1", "telemetry", frozenset({"publish"}))
    # B heard nothing, yet it must not answer from its cache
    for _ in range(3):
        decision = await b.authorize(PUBLISH)
        assert (decision.allowed, decision.cache) == (False, "miss")
    with pytest.raises(StoreUnavailable, match="not listening"):
        await b.store.ping()
    monkeypatch.undo()

    async def listening() -> bool:
        return store_b.listener.listening.is_set()

    await until(listening)
    await b.store.ping()


async def terminate_pool_connections(schema_owner_app: str = "authhook") -> int:
    admin = await asyncpg.connect(PG_DSN)
    try:
        killed: int = await admin.fetchval(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
            "WHERE application_name = $1 AND pid <> pg_backend_pid() AND datname = current_database()",
            schema_owner_app,
        )
        return killed
    finally:
        await admin.close()


async def test_backends_killed_during_decisions_never_yield_a_wrong_allow(fleet: tuple[PDP, PDP]) -> None:
    a, b = fleet
    allowed = make_request("publish", "acme-thermo-1", "m/acme/c/telemetry/t")
    denied = make_request("publish", "acme-thermo-1", "m/globex/c/telemetry")
    outcomes: list[tuple[bool, Reason, float]] = []
    stop = asyncio.Event()

    async def decide_continuously(pdp: PDP) -> None:
        i = 0
        while not stop.is_set():
            pdp.cache.clear() if pdp.cache is not None else None  # keep every decision on the database
            request = allowed if i % 2 == 0 else denied
            decision = await pdp.authorize(request)
            outcomes.append((request is allowed, decision.reason, decision.latency_us))
            if request is denied:
                assert not decision.allowed
            else:
                assert decision.allowed or decision.reason is Reason.STORE_UNAVAILABLE
            i += 1
            await asyncio.sleep(0)

    workers = [asyncio.create_task(decide_continuously(pdp)) for pdp in (a, b) for _ in range(3)]
    await asyncio.sleep(0.2)
    for _ in range(3):
        assert await terminate_pool_connections() > 0
        await asyncio.sleep(0.15)
    stop.set()
    await asyncio.gather(*workers)
    assert len(outcomes) > 50
    # no decision hung: each finished within a few deadlines (0.5 s each), failures included
    assert max(latency for _, _, latency in outcomes) < 3_000_000
    # both instances recovered by themselves, without a restart
    for pdp in (a, b):
        if pdp.cache is not None:
            pdp.cache.clear()
        assert (await pdp.authorize(allowed)).allowed


async def test_an_unreachable_database_fails_closed_quickly(tmp_path: Path) -> None:
    settings = settings_for(f"postgresql://127.0.0.1:1/test?schema=s_{uuid.uuid4().hex[:8]}")
    pdp = PDP.from_settings(settings)
    with pytest.raises(StoreUnavailable):
        await pdp.open()
    started = time.perf_counter()
    decision = await pdp.authorize(PUBLISH)
    assert (decision.allowed, decision.reason) == (False, Reason.STORE_UNAVAILABLE)
    assert time.perf_counter() - started < 3
    assert pdp.decision_log.recent()[-1].decision.reason is Reason.STORE_UNAVAILABLE


async def test_a_cli_revoke_reaches_a_running_instance(fleet: tuple[PDP, PDP], pg_schema: str) -> None:
    import os
    import subprocess
    import sys

    from .conftest import TEST_KEY

    _, b = fleet
    assert (await b.authorize(PUBLISH)).allowed
    assert (await b.authorize(PUBLISH)).cache == "hit"
    done = await asyncio.to_thread(
        subprocess.run,
        [
            sys.executable,
            "-m",
            "authhook",
            "--store",
            f"{PG_DSN}?schema={pg_schema}",
            "disconnect",
            "acme",
            "acme-thermo-1",
            "telemetry",
        ],
        env={**os.environ, "AUTHHOOK_SECRET_KEY": TEST_KEY},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr

    async def b_denies() -> bool:
        return not (await b.authorize(PUBLISH)).allowed

    await until(b_denies, within=1.0)
