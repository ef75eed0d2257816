"""A fleet of PDP instances on one real PostgreSQL: invalidation, a lost change feed, database outages.

Timing here is only bounded generously (a revoke must reach the other instance within a second, no
decision may hang); the latency distributions live in ``bench/pg_scale_bench.py``.
"""

from __future__ import annotations

import asyncio
import socket
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
        await b_has_heard_everything(a, b)
        yield a, b


async def b_has_heard_everything(a: PDP, b: PDP) -> None:
    """Wait until B has applied every write so far (one notification each since the schema was new), so
    a late notification of the set-up cannot invalidate what a test caches next."""
    revision = await a.store.revision()

    async def heard() -> bool:
        return store_of(b).listener.received >= revision

    await until(heard)


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


async def terminate_pool_connections(schema: str) -> int:
    """Kill this test's pool connections only (other runs may share the database)."""
    admin = await asyncpg.connect(PG_DSN)
    try:
        killed: int = await admin.fetchval(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
            "WHERE application_name = $1 AND pid <> pg_backend_pid() AND datname = current_database()",
            f"authhook:{schema}",
        )
        return killed
    finally:
        await admin.close()


async def test_backends_killed_during_decisions_never_yield_a_wrong_allow(
    fleet: tuple[PDP, PDP], pg_schema: str
) -> None:
    """Backends die under running decisions, and a revoke commits in the middle of it: no decision that
    began after the revoke returned may allow, whatever the failures; then both recover unaided."""
    a, b = fleet
    allowed = make_request("publish", "acme-thermo-1", "m/acme/c/telemetry/t")
    other_tenant = make_request("publish", "acme-thermo-1", "m/globex/c/telemetry")
    outcomes: list[tuple[str, Reason, float]] = []
    revoking_from = revoked_at = float("inf")
    stop = asyncio.Event()

    async def decide_continuously(pdp: PDP) -> None:
        i = 0
        while not stop.is_set():
            if pdp.cache is not None:
                pdp.cache.clear()  # keep every decision on the database
            request = allowed if i % 2 == 0 else other_tenant
            started = time.perf_counter()
            decision = await pdp.authorize(request)
            outcomes.append(("allowed" if request is allowed else "other", decision.reason, decision.latency_us))
            if request is other_tenant or started > revoked_at:
                assert not decision.allowed, (decision.reason, started - revoked_at)
            elif time.perf_counter() < revoking_from:  # over before the revoke began
                assert decision.allowed or decision.reason is Reason.STORE_UNAVAILABLE
            # one in flight while the revoke ran may have read either side of it: both answers are right
            i += 1
            await asyncio.sleep(0)

    workers = [asyncio.create_task(decide_continuously(pdp)) for pdp in (a, b) for _ in range(3)]
    await asyncio.sleep(0.2)
    for round_ in range(4):
        assert await terminate_pool_connections(pg_schema) > 0
        if round_ == 1:
            revoking_from = time.perf_counter()
            for _attempt in range(50):  # a write can meet a killed connection too: retry until it lands
                try:
                    await a.store.disconnect("acme", "acme-thermo-1", "telemetry", frozenset({"publish"}))
                    break
                except StoreUnavailable:
                    await asyncio.sleep(0.02)
            else:
                pytest.fail("the revoke never committed in 50 attempts")
            revoked_at = time.perf_counter()
        await asyncio.sleep(0.15)
    stop.set()
    await asyncio.gather(*workers)
    assert len(outcomes) > 50
    assert any(reason is Reason.STORE_UNAVAILABLE for _, reason, _ in outcomes)  # the failures were real
    # no decision hung: each finished within a few deadlines (0.5 s each), failures included
    assert max(latency for _, _, latency in outcomes) < 3_000_000
    # both instances recovered by themselves, without a restart, and both know of the revoke
    for pdp in (a, b):
        if pdp.cache is not None:
            pdp.cache.clear()
        assert (await pdp.authorize(allowed)).reason is Reason.NOT_CONNECTED


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


@pytest.mark.skipif(not PG_DSN.startswith("postgresql://127.0.0.1:5432/"), reason="the relay targets the local server")
async def test_a_server_started_before_its_database_fails_closed_then_opens_by_itself(pg_schema: str) -> None:
    async with PDP.from_settings(settings_for(f"{PG_DSN}?schema={pg_schema}")) as seed:
        await import_world(seed.store, seed.hasher, load_world(DEMO_WORLD))
    with socket.socket() as probe:  # a port with nothing behind it yet: the database is "down"
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    pdp = PDP.from_settings(settings_for(f"postgresql://127.0.0.1:{port}/test?schema={pg_schema}"))
    await pdp.open(retry_store=True)
    try:
        decision = await pdp.authorize(PUBLISH)
        assert (decision.allowed, decision.reason) == (False, Reason.STORE_UNAVAILABLE)
        with pytest.raises(StoreUnavailable):
            await pdp.store.ping()
        async with FreezingProxy(port):  # the database comes up
            await until(lambda: _allows(pdp), within=10.0)
            # Decisions come back as soon as the store opens; the change feed follows (LISTEN on a
            # connection of its own), and only then is the instance ready. Wait for that, not for a guess.
            await until(lambda: _ready(pdp), within=10.0)
    finally:
        await pdp.close()


async def _ready(pdp: PDP) -> bool:
    try:
        await pdp.store.ping()
    except StoreUnavailable:
        return False
    return True


async def test_a_busy_event_loop_is_not_a_lost_change_feed(pg_schema: str) -> None:
    """A CPU-starved instance answers its probes late, but the feed is intact: it must not flush its cache and
    report not ready (that would send every decision to the database: a cascade). Two stalls past the lease
    in a row, with a probe in flight between them, used to be read as a lost feed."""
    async with PDP.from_settings(settings_for(f"{PG_DSN}?schema={pg_schema}")) as pdp:
        store = store_of(pdp)
        await until(lambda: _ready(pdp), within=10.0)
        lease = store._listen_lease
        for _ in range(3):
            time.sleep(lease * 2.5)  # noqa: ASYNC251 - the point: the whole event loop stalls, as under CPU load
            await asyncio.sleep(0)
        # The feed itself never stopped: once the loop runs again it proves so at the next probe.
        proven = store.listener.received, store.listener.lease_expired
        await until(lambda: _ready(pdp), within=2.0)
        assert store.listener.lease_expired == 0, proven
        assert not store.board.suspended


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


class FreezingProxy:
    """A TCP relay to PostgreSQL that can stop moving bytes without closing anything: what a frozen
    network or a dead peer behind a firewall looks like to the client (no reset, no error, no answer)."""

    def __init__(self, port: int = 0) -> None:
        self.flowing = asyncio.Event()
        self.flowing.set()
        self._server: asyncio.Server | None = None
        self._pumps: set[asyncio.Task[None]] = set()
        self.port = port

    async def __aenter__(self) -> FreezingProxy:
        self._server = await asyncio.start_server(self._relay, "127.0.0.1", self.port)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *_: object) -> None:
        self.flowing.set()
        assert self._server is not None
        self._server.close()
        for pump in list(self._pumps):
            pump.cancel()
        await asyncio.gather(*self._pumps, return_exceptions=True)

    def url(self, schema: str) -> str:
        return f"postgresql://127.0.0.1:{self.port}/test?schema={schema}"

    async def _relay(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        server_reader, server_writer = await asyncio.open_connection("127.0.0.1", 5432)
        for reader, writer in ((client_reader, server_writer), (server_reader, client_writer)):
            pump = asyncio.create_task(self._pump(reader, writer))
            self._pumps.add(pump)
            pump.add_done_callback(self._pumps.discard)

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                await self.flowing.wait()
                writer.write(data)
                await writer.drain()
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            writer.close()


@pytest.mark.skipif(not PG_DSN.startswith("postgresql://127.0.0.1:5432/"), reason="the relay targets the local server")
async def test_a_frozen_database_is_refused_within_the_deadline(pg_schema: str) -> None:
    async with FreezingProxy() as proxy:
        settings = settings_for(proxy.url(pg_schema), store_deadline_s=0.3)
        async with PDP.from_settings(settings) as pdp:
            await import_world(pdp.store, pdp.hasher, load_world(DEMO_WORLD))
            assert pdp.cache is not None
            assert (await pdp.authorize(PUBLISH)).allowed
            pdp.cache.clear()
            proxy.flowing.clear()
            started = time.perf_counter()
            decision = await pdp.authorize(PUBLISH)
            waited = time.perf_counter() - started
            assert (decision.allowed, decision.reason) == (False, Reason.STORE_UNAVAILABLE)
            assert "did not answer within 0.3 s" in decision.verdict.detail
            # the deadline is the bound, not the deadline plus asyncpg's wait for the cancellation
            assert waited < 0.55, waited
            proxy.flowing.set()
            await until(lambda: _allows(pdp))


async def _allows(pdp: PDP) -> bool:
    return (await pdp.authorize(PUBLISH)).allowed


@pytest.mark.skipif(not PG_DSN.startswith("postgresql://127.0.0.1:5432/"), reason="the relay targets the local server")
async def test_a_silent_change_feed_stops_cached_allows_within_the_lease(pg_schema: str) -> None:
    """B's connections freeze without a reset: B hears nothing of A's revoke and gets no error either.
    Its cached allow must stop being served once the listen lease runs out."""
    async with FreezingProxy() as proxy:
        url_a = f"{PG_DSN}?schema={pg_schema}"
        async with PDP.from_settings(settings_for(url_a)) as a:
            await import_world(a.store, a.hasher, load_world(DEMO_WORLD))
            async with PDP.from_settings(settings_for(proxy.url(pg_schema), store_deadline_s=0.2)) as b:
                store_b = store_of(b)
                assert (await b.authorize(PUBLISH)).allowed
                assert (await b.authorize(PUBLISH)).cache == "hit"
                proxy.flowing.clear()
                await a.store.disconnect("acme", "acme-thermo-1", "telemetry", frozenset({"publish"}))
                revoked = time.perf_counter()

                async def b_no_longer_allows() -> bool:
                    return not (await b.authorize(PUBLISH)).allowed

                await until(b_no_longer_allows, within=2.0)
                stale_for = time.perf_counter() - revoked
                assert store_b.listener.lease_expired >= 1
                assert store_b.board.suspended
                assert stale_for < 1.0, stale_for  # the lease is 0.25 s; before it, up to ~2 s went by
                proxy.flowing.set()

                async def b_heard_again() -> bool:
                    return not store_b.board.suspended and (await b.authorize(PUBLISH)).reason is Reason.NOT_CONNECTED

                await until(b_heard_again)


async def test_instances_starting_together_on_a_new_schema_migrate_once(pg_schema: str) -> None:
    stores = [PostgresStore(f"{PG_DSN}?schema={pg_schema}") for _ in range(4)]
    try:
        await asyncio.gather(*(store.open() for store in stores))
        from authhook.store.postgres import MIGRATIONS

        conn = await asyncpg.connect(PG_DSN)
        try:
            versions = await conn.fetch(f'SELECT version FROM "{pg_schema}".schema_migrations ORDER BY 1')
        finally:
            await conn.close()
        assert [r[0] for r in versions] == list(range(1, len(MIGRATIONS) + 1))
    finally:
        await asyncio.gather(*(store.close() for store in stores))


@pytest.mark.parametrize("schema", ["a" * 47, "pg_authhook", "Authhook", "abc%0A", "a;drop"])
def test_schema_names_that_postgresql_would_refuse_or_truncate_are_refused_up_front(schema: str) -> None:
    from authhook.errors import InvalidInput
    from authhook.store.postgres import parse_url

    with pytest.raises(InvalidInput, match="schema"):
        parse_url(f"{PG_DSN}?schema={schema}")
