"""Shared fixtures. ``pdp``/``demo`` run every test that uses them against both stores - the embedded
SQLite file and the real PostgreSQL on this machine (one fresh schema per test, dropped afterwards) -
which makes those tests the store contract suite. ``sqlite_pdp``/``sqlite_demo`` are for what only the
file store has (the file itself, other processes sharing it)."""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import asyncpg
import pytest

from authhook import PDP, Settings
from authhook.config import DecisionLogSettings
from authhook.world import import_world, load_world

ROOT = Path(__file__).resolve().parent.parent
DEMO_WORLD = ROOT / "examples" / "demo-world.yaml"
TEST_KEY = "k" * 64
PG_DSN = os.environ.get("AUTHHOOK_TEST_PG_DSN", "postgresql://127.0.0.1:5432/test")


def settings_for(db: Path | str, **overrides: object) -> Settings:
    """Settings for a sqlite file path, or for any store url (then with a log file in the temp dir)."""
    url = db if isinstance(db, str) else f"sqlite:///{db}"
    return Settings(store_url=url, secret_key=TEST_KEY, **overrides)  # type: ignore[arg-type]


async def drop_schema(schema: str) -> None:
    conn = await asyncpg.connect(PG_DSN)
    try:
        await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
    finally:
        await conn.close()


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "authhook.db"


@pytest.fixture
def pg_schema() -> Iterator[str]:
    import asyncio

    schema = f"t_{uuid.uuid4().hex[:16]}"
    yield schema
    asyncio.run(drop_schema(schema))


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request: pytest.FixtureRequest, db_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{db_path}"
    schema: str = request.getfixturevalue("pg_schema")
    return f"{PG_DSN}?schema={schema}"


@pytest.fixture
async def pdp(store_url: str, tmp_path: Path) -> AsyncIterator[PDP]:
    log = DecisionLogSettings(path=tmp_path / "decisions.jsonl")
    async with PDP.from_settings(settings_for(store_url, decision_log=log)) as opened:
        yield opened


@pytest.fixture
async def demo(pdp: PDP) -> PDP:
    await import_world(pdp.store, pdp.hasher, load_world(DEMO_WORLD))
    return pdp


@pytest.fixture
async def sqlite_pdp(db_path: Path) -> AsyncIterator[PDP]:
    async with PDP.from_settings(settings_for(db_path)) as opened:
        yield opened


@pytest.fixture
async def sqlite_demo(sqlite_pdp: PDP) -> PDP:
    await import_world(sqlite_pdp.store, sqlite_pdp.hasher, load_world(DEMO_WORLD))
    return sqlite_pdp
