"""The store contract (both stores, through the `pdp` fixture) and what only the SQLite file has."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from authhook import PDP
from authhook.errors import Conflict, InvalidInput, NotFound
from authhook.store.base import Assignment, Block, Channel, Connection, Group, Role, SubjectRecord, Tenant
from authhook.store.sqlite import MIGRATIONS, SQLiteStore

from .conftest import settings_for


async def test_first_start_creates_and_migrates_the_file(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "fresh.db"
    path.parent.mkdir()
    store = SQLiteStore(str(path))
    await store.open()
    assert await store.revision() == 0
    await store.close()
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == len(MIGRATIONS)
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert {"tenants", "subjects", "channels", "connections", "groups", "roles", "role_blocks"} <= tables
    # a second start on the same file migrates nothing and keeps the data
    store = SQLiteStore(str(path))
    await store.open()
    assert await store.revision() == 0
    await store.close()


async def test_every_write_bumps_the_revision(pdp: PDP) -> None:
    store = pdp.store
    seen = [await store.revision()]
    await store.put_tenant(Tenant(id="acme"))
    seen.append(await store.revision())
    await store.put_channel(Channel(id="ch", tenant="acme"))
    seen.append(await store.revision())
    await store.put_subject(SubjectRecord(id="dev", tenant="acme", kind="client"), "hmac-sha256$00")
    seen.append(await store.revision())
    await store.connect(Connection(tenant="acme", client="dev", channel="ch", actions=frozenset({"publish"})))
    seen.append(await store.revision())
    assert seen == sorted(set(seen))


async def _tenant_with_client(pdp: PDP, tenant: str, client: str) -> None:
    await pdp.store.put_tenant(Tenant(id=tenant))
    await pdp.store.put_subject(SubjectRecord(id=client, tenant=tenant, kind="client"), "hmac-sha256$00")
    await pdp.store.put_channel(Channel(id="ch", tenant=tenant))


async def test_references_across_tenants_are_refused(pdp: PDP) -> None:
    await _tenant_with_client(pdp, "a", "dev-a")
    await _tenant_with_client(pdp, "b", "dev-b")
    store = pdp.store
    with pytest.raises(Conflict):
        await store.connect(Connection(tenant="b", client="dev-a", channel="ch", actions=frozenset({"publish"})))
    with pytest.raises(Conflict):  # one id, one tenant
        await store.put_subject(SubjectRecord(id="dev-a", tenant="b", kind="client"), "hmac-sha256$00")
    await store.put_group(Group(id="g", tenant="b", kind="subjects"))
    with pytest.raises(NotFound):
        await store.add_member("b", "g", "dev-a")
    await store.put_role(Role(id="r", tenant="b"))
    with pytest.raises(NotFound):
        await store.assign(Assignment(tenant="b", role="r", assignee_kind="subject", assignee="dev-a"))
    with pytest.raises(NotFound):
        await store.put_role(
            Role(
                id="r2",
                tenant="b",
                blocks=(Block(id="x", scope="channel", ref="nope", actions=frozenset({"publish"})),),
            )
        )


async def test_group_nesting_refuses_cycles_and_mixed_kinds(pdp: PDP) -> None:
    await _tenant_with_client(pdp, "a", "dev-a")
    store = pdp.store
    await store.put_group(Group(id="top", tenant="a", kind="channels"))
    await store.put_group(Group(id="mid", tenant="a", kind="channels", parent="top"))
    with pytest.raises(InvalidInput, match="own subgroup"):
        await store.put_group(Group(id="top", tenant="a", kind="channels", parent="mid"))
    await store.put_group(Group(id="people", tenant="a", kind="subjects"))
    with pytest.raises(InvalidInput):
        await store.put_group(Group(id="odd", tenant="a", kind="subjects", parent="top"))


async def test_deleting_a_tenant_removes_everything_in_it(pdp: PDP) -> None:
    await _tenant_with_client(pdp, "a", "dev-a")
    await pdp.store.connect(Connection(tenant="a", client="dev-a", channel="ch", actions=frozenset({"publish"})))
    await pdp.store.delete_tenant("a")
    assert await pdp.store.list_subjects() == []
    assert await pdp.store.list_connections() == []
    assert await pdp.store.credential("dev-a") is None


async def test_partial_disconnect_keeps_the_other_action(pdp: PDP) -> None:
    await _tenant_with_client(pdp, "a", "dev-a")
    both = frozenset({"publish", "subscribe"})
    await pdp.store.connect(Connection(tenant="a", client="dev-a", channel="ch", actions=both))
    await pdp.store.disconnect("a", "dev-a", "ch", frozenset({"publish"}))
    (left,) = await pdp.store.list_connections("a")
    assert left.actions == frozenset({"subscribe"})
    await pdp.store.disconnect("a", "dev-a", "ch", frozenset({"subscribe"}))
    assert await pdp.store.list_connections("a") == []
    with pytest.raises(NotFound):
        await pdp.store.disconnect("a", "dev-a", "ch", both)


def test_topic_blocks_may_only_name_system_topics() -> None:
    with pytest.raises(ValueError, match="system topics"):
        Block(id="x", scope="topic", ref="#", actions=frozenset({"subscribe"}))
    with pytest.raises(ValueError):
        Block(id="x", scope="topic", ref="$SYS/#/x", actions=frozenset({"subscribe"}))
    Block(id="x", scope="topic", ref="$SYS/#", actions=frozenset({"subscribe"}))


def test_identities_with_wildcards_are_refused() -> None:
    for bad in ("dev+1", "dev#", "a/b", ""):
        with pytest.raises(ValueError):
            SubjectRecord(id=bad, tenant="a", kind="client")


async def test_a_second_pdp_on_the_same_file_shares_the_data(db_path: Path, sqlite_pdp: PDP) -> None:
    pdp = sqlite_pdp
    await _tenant_with_client(pdp, "a", "dev-a")
    async with PDP.from_settings(settings_for(db_path)) as other:
        assert [s.id for s in await other.store.list_subjects()] == ["dev-a"]


async def test_a_world_file_that_fails_late_leaves_nothing_behind(pdp: PDP, tmp_path: Path) -> None:
    """One file, one transaction: the tenant and client before a bad role are not kept either."""
    from authhook.errors import InvalidInput
    from authhook.world import import_world, load_world

    world = tmp_path / "late.yaml"
    world.write_text(
        "tenants:\n"
        "  - id: initech\n"
        "    clients: [{id: printer-1, secret: printer-1-secret-0123456789}]\n"
        "    channels: [{id: jobs}]\n"
        "    roles:\n"
        "      - id: snoop\n"
        "        blocks: [{id: b, scope: {topic: 'm/globex/c/telemetry/#'}, actions: [subscribe]}]\n"
    )
    before = await pdp.store.revision()
    with pytest.raises(InvalidInput, match="system topics"):
        await import_world(pdp.store, pdp.hasher, load_world(world))
    assert await pdp.store.list_tenants() == []
    assert await pdp.store.list_subjects() == []
    assert await pdp.store.credential("printer-1") is None
    assert await pdp.store.revision() == before
    # The same file without the bad role imports whole, in one revision.
    world.write_text(world.read_text().split("    roles:")[0])
    await import_world(pdp.store, pdp.hasher, load_world(world))
    assert [t.id for t in await pdp.store.list_tenants()] == ["initech"]
    assert await pdp.store.revision() == before + 1
