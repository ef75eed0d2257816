"""Stores for the authorization model; ``create_store`` picks one from a URL."""

from __future__ import annotations

from authhook.errors import ConfigError
from authhook.store.base import Facts, Store
from authhook.store.sqlite import SQLiteStore


def create_store(url: str, *, deadline_s: float = 0.5) -> Store:
    """``sqlite:///path.db`` (default, embedded) or ``postgresql://host/db[?schema=NAME]``."""
    if url.startswith("sqlite://"):
        return SQLiteStore.from_url(url)
    if url.startswith(("postgresql://", "postgres://")):
        try:
            from authhook.store.postgres import PostgresStore  # asyncpg is imported only when chosen
        except ImportError as exc:
            raise ConfigError(f"the postgresql store needs asyncpg: pip install 'authhook[postgres]' ({exc})") from exc
        return PostgresStore(url, deadline_s=deadline_s)
    raise ConfigError(f"unsupported store url `{url}`: expected sqlite:/// or postgresql://")


__all__ = ["Facts", "SQLiteStore", "Store", "create_store"]
