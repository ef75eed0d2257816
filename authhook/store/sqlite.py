"""Embedded SQLite store: the default, one file, created and migrated on first start.

Reads run synchronously on the event loop on purpose: an indexed SQLite lookup takes ~5 µs, while handing
it to a thread (aiosqlite) costs ~50-100 µs per call, which alone would miss the uncached decision budget.
Writes take SQLite's write lock (``BEGIN IMMEDIATE``) inside the revision board's write bracket, so any
process sharing the file - a server, the CLI - sees a committed revoke on its next decision.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from contextlib import asynccontextmanager, contextmanager
from contextvars import ContextVar
from pathlib import Path
from typing import Any, TypeVar

from authhook.errors import Conflict, InvalidInput, NotFound, StoreUnavailable
from authhook.models import Action, ActionSet
from authhook.revision import IDENTITY_SLOT, SLOT_COUNT, RevisionBoard, tenant_slot
from authhook.store.base import (
    AssigneeKind,
    Assignment,
    BlockFact,
    Channel,
    Connection,
    Credential,
    Effect,
    Facts,
    GrantFacts,
    Group,
    GroupKind,
    Role,
    ScopeKind,
    SubjectFact,
    SubjectKind,
    SubjectRecord,
    Tenant,
)
from authhook.store.base import Block as BlockModel

T = TypeVar("T")
CLAIM_KEEP_S = 7 * 24 * 3600.0  # revocation claims older than this are dropped when a new one is taken

# Each entry is one schema version; never edit a shipped entry, append a new one (additive migrations).
MIGRATIONS: tuple[str, ...] = (
    """
    CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
    INSERT INTO meta VALUES ('revision', '0');
    CREATE TABLE tenants (
        id TEXT PRIMARY KEY, name TEXT NOT NULL DEFAULT '', enabled INTEGER NOT NULL DEFAULT 1);
    CREATE TABLE subjects (
        id TEXT PRIMARY KEY,
        tenant_id TEXT NOT NULL REFERENCES tenants(id) ON DELETE CASCADE,
        kind TEXT NOT NULL CHECK (kind IN ('client', 'user')),
        name TEXT NOT NULL DEFAULT '',
        credential TEXT NOT NULL,
        enabled INTEGER NOT NULL DEFAULT 1);
    CREATE INDEX subjects_by_tenant ON subjects(tenant_id);
    CREATE TABLE channels (
        tenant_id TEXT NOT NULL REFERENCES tenants(id) ON DELETE CASCADE,
        id TEXT NOT NULL, name TEXT NOT NULL DEFAULT '',
        PRIMARY KEY (tenant_id, id));
    CREATE TABLE connections (
        tenant_id TEXT NOT NULL,
        client_id TEXT NOT NULL REFERENCES subjects(id) ON DELETE CASCADE,
        channel_id TEXT NOT NULL,
        actions INTEGER NOT NULL,
        PRIMARY KEY (client_id, channel_id),
        FOREIGN KEY (tenant_id, channel_id) REFERENCES channels(tenant_id, id) ON DELETE CASCADE);
    CREATE INDEX connections_by_channel ON connections(tenant_id, channel_id);
    CREATE TABLE groups (
        tenant_id TEXT NOT NULL REFERENCES tenants(id) ON DELETE CASCADE,
        id TEXT NOT NULL,
        kind TEXT NOT NULL CHECK (kind IN ('subjects', 'channels')),
        name TEXT NOT NULL DEFAULT '',
        parent_id TEXT,
        PRIMARY KEY (tenant_id, id));
    CREATE TABLE group_members (
        tenant_id TEXT NOT NULL, group_id TEXT NOT NULL, member_id TEXT NOT NULL,
        PRIMARY KEY (tenant_id, group_id, member_id),
        FOREIGN KEY (tenant_id, group_id) REFERENCES groups(tenant_id, id) ON DELETE CASCADE);
    CREATE INDEX group_members_by_member ON group_members(tenant_id, member_id);
    CREATE TABLE roles (
        tenant_id TEXT NOT NULL REFERENCES tenants(id) ON DELETE CASCADE,
        id TEXT NOT NULL, name TEXT NOT NULL DEFAULT '',
        PRIMARY KEY (tenant_id, id));
    CREATE TABLE role_blocks (
        tenant_id TEXT NOT NULL, role_id TEXT NOT NULL, id TEXT NOT NULL,
        scope_kind TEXT NOT NULL, scope_ref TEXT, actions INTEGER NOT NULL,
        effect TEXT NOT NULL CHECK (effect IN ('allow', 'deny')),
        PRIMARY KEY (tenant_id, role_id, id),
        FOREIGN KEY (tenant_id, role_id) REFERENCES roles(tenant_id, id) ON DELETE CASCADE);
    CREATE TABLE role_assignments (
        tenant_id TEXT NOT NULL, role_id TEXT NOT NULL,
        assignee_kind TEXT NOT NULL CHECK (assignee_kind IN ('subject', 'group')),
        assignee_id TEXT NOT NULL,
        PRIMARY KEY (tenant_id, role_id, assignee_kind, assignee_id),
        FOREIGN KEY (tenant_id, role_id) REFERENCES roles(tenant_id, id) ON DELETE CASCADE);
    CREATE INDEX role_assignments_by_assignee ON role_assignments(tenant_id, assignee_kind, assignee_id);
    """,
    # 2: which instance acts on a revoke (see ``Store.claim_revocation``).
    """
    CREATE TABLE revocation_claims (
        subject TEXT NOT NULL, revision INTEGER NOT NULL, claimed_at REAL NOT NULL,
        PRIMARY KEY (subject, revision))
    """,
)

# One row answers everything scalar about a (subject, tenant, channel) question: the subject and its
# tenant's state, whether the channel exists, the subject's connection to it, and whether the subject can
# hold any role at all (a direct assignment or a subject-group membership) - most devices cannot, and
# then the blocks query is skipped. ?1 subject, ?2 topic tenant (NULL: none), ?3 channel (NULL: none).
# The channel columns only look inside the subject's own tenant: nothing of another tenant is read.
_SUBJECT_SQL = """
SELECT s.id, s.tenant_id, s.kind, s.enabled, t.enabled,
    EXISTS (SELECT 1 FROM channels c WHERE c.tenant_id = s.tenant_id AND c.tenant_id = ?2 AND c.id = ?3),
    (SELECT n.actions FROM connections n
     WHERE n.client_id = s.id AND n.channel_id = ?3 AND n.tenant_id = s.tenant_id AND n.tenant_id = ?2),
    EXISTS (SELECT 1 FROM role_assignments a INDEXED BY role_assignments_by_assignee
            WHERE a.tenant_id = s.tenant_id AND a.assignee_kind = 'subject' AND a.assignee_id = s.id)
    OR EXISTS (SELECT 1 FROM group_members m INDEXED BY group_members_by_member
               WHERE m.tenant_id = s.tenant_id AND m.member_id = s.id)
FROM subjects s JOIN tenants t ON t.id = s.tenant_id WHERE s.id = ?1"""

_REVISION_SQL = "SELECT value FROM meta WHERE key = 'revision'"

# Blocks of every role assigned to the subject directly or to any subject group it is in, transitively.
# CROSS JOIN and INDEXED BY pin the plan: without statistics SQLite's planner scanned a tenant's blocks
# and built an automatic index per call (170 µs); driven from the assignee index it takes ~13 µs.
_BLOCKS_SQL = """
WITH RECURSIVE sg(id) AS (
    SELECT m.group_id FROM group_members m INDEXED BY group_members_by_member
    CROSS JOIN groups g ON g.tenant_id = m.tenant_id AND g.id = m.group_id AND g.kind = 'subjects'
    WHERE m.tenant_id = ?1 AND m.member_id = ?2
    UNION
    SELECT g.parent_id FROM sg CROSS JOIN groups g ON g.tenant_id = ?1 AND g.id = sg.id
    WHERE g.parent_id IS NOT NULL),
assignee(kind, id) AS (SELECT 'subject', ?2 UNION ALL SELECT 'group', id FROM sg)
SELECT DISTINCT b.role_id, b.id, b.scope_kind, b.scope_ref, b.actions, b.effect
FROM assignee x
CROSS JOIN role_assignments a INDEXED BY role_assignments_by_assignee
    ON a.tenant_id = ?1 AND a.assignee_kind = x.kind AND a.assignee_id = x.id
CROSS JOIN role_blocks b ON b.tenant_id = a.tenant_id AND b.role_id = a.role_id"""

# Channels of a channel group and of every group nested below it.
_GROUP_CHANNELS_SQL = """
WITH RECURSIVE down(id) AS (
    SELECT ?2
    UNION
    SELECT g.id FROM down CROSS JOIN groups g ON g.tenant_id = ?1 AND g.parent_id = down.id)
SELECT DISTINCT m.member_id FROM down
CROSS JOIN groups g ON g.tenant_id = ?1 AND g.id = down.id AND g.kind = 'channels'
CROSS JOIN group_members m ON m.tenant_id = ?1 AND m.group_id = down.id
ORDER BY 1"""

_CHANNEL_GROUPS_SQL = """
WITH RECURSIVE cg(id) AS (
    SELECT m.group_id FROM group_members m INDEXED BY group_members_by_member
    CROSS JOIN groups g ON g.tenant_id = m.tenant_id AND g.id = m.group_id AND g.kind = 'channels'
    WHERE m.tenant_id = ?1 AND m.member_id = ?2
    UNION
    SELECT g.parent_id FROM cg CROSS JOIN groups g ON g.tenant_id = ?1 AND g.id = cg.id
    WHERE g.parent_id IS NOT NULL)
SELECT id FROM cg"""


# Enum lookups by value through plain dicts: calling an Enum class costs ~1 µs per row on the hot path.
_SUBJECT_KINDS = {k.value: k for k in SubjectKind}
_SCOPES = {k.value: k for k in ScopeKind}
_EFFECTS = {k.value: k for k in Effect}


def path_from_url(url: str) -> str:
    """``sqlite:///relative.db``, ``sqlite:////abs/path.db`` or ``sqlite://:memory:``."""
    if not url.startswith("sqlite://"):
        raise InvalidInput(f"not a sqlite url: `{url}`")
    rest = url[len("sqlite://") :]
    if rest in (":memory:", "/:memory:"):
        return ":memory:"
    if not rest.startswith("/"):
        raise InvalidInput(f"sqlite url needs a path after `sqlite:///`: `{url}`")
    return rest[1:]


class SQLiteStore:
    """The ``Store`` protocol over one SQLite file."""

    def __init__(self, path: str) -> None:
        self._path = path
        self._conn: sqlite3.Connection | None = None
        self._revision_value = 0
        self._revision_at = -1  # board sequence at which _revision_value was read; -1: read it again
        self.board = RevisionBoard(None if path == ":memory:" else Path(path + ".rev"))
        # Per task, so only the importing task's writes join its batch; another task's write meanwhile fails
        # on the open transaction (SQLite has one connection here) instead of silently joining it.
        self._batch: ContextVar[bool] = ContextVar(f"authhook-sqlite-batch-{id(self)}", default=False)

    @classmethod
    def from_url(cls, url: str) -> SQLiteStore:
        return cls(path_from_url(url))

    # -- lifecycle ------------------------------------------------------------------------------
    async def open(self) -> None:
        if self._conn is not None:
            return
        try:
            conn = sqlite3.connect(self._path, isolation_level=None, check_same_thread=False)
        except sqlite3.Error as exc:
            raise StoreUnavailable(f"cannot open sqlite database `{self._path}`: {exc}") from exc
        conn.execute("PRAGMA foreign_keys = ON")
        conn.execute("PRAGMA busy_timeout = 5000")
        if self._path != ":memory:":
            conn.execute("PRAGMA journal_mode = WAL")
            conn.execute("PRAGMA synchronous = NORMAL")
        self._conn = conn
        self._migrate()
        self.board.repair()

    def _migrate(self) -> None:
        conn = self._db
        conn.execute("BEGIN IMMEDIATE")
        try:
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            for number, script in enumerate(MIGRATIONS[version:], start=version + 1):
                for statement in script.split(";"):
                    if statement.strip():
                        conn.execute(statement)
                conn.execute(f"PRAGMA user_version = {number}")
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise

    async def close(self) -> None:
        # The board stays mapped: a cache may still consult it, and a decision after close must fail
        # closed with `store_unavailable`, not crash on an unmapped page. It is released with the store.
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    @property
    def _db(self) -> sqlite3.Connection:
        if self._conn is None:
            raise StoreUnavailable("store is not open")
        return self._conn

    async def ping(self) -> None:
        self._read(lambda db: db.execute("SELECT 1").fetchone())

    async def revision(self) -> int:
        row = self._read(lambda db: db.execute(_REVISION_SQL).fetchone())
        return int(row[0])

    def _read(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        try:
            return fn(self._db)
        except sqlite3.OperationalError as exc:
            raise StoreUnavailable(f"sqlite read failed: {exc}") from exc

    # -- decision reads -------------------------------------------------------------------------
    async def facts(self, subject: str, tenant: str | None, channel: str | None) -> Facts:
        try:
            return self._facts(subject, tenant, channel)
        except sqlite3.OperationalError as exc:
            raise StoreUnavailable(f"sqlite read failed: {exc}") from exc

    def _current_revision(self) -> int:
        """The store revision, read again only when the board says some process wrote since."""
        sequence = self.board.sequence()
        if sequence != self._revision_at:
            self._revision_value = int(self._db.execute(_REVISION_SQL).fetchone()[0])
            # Remember it only if no write was in flight, so a half-finished write is read again.
            self._revision_at = sequence if sequence % 2 == 0 and sequence == self.board.sequence() else -1
        return self._revision_value

    def _facts(self, subject: str, tenant: str | None, channel: str | None) -> Facts:
        db = self._db
        revision = self._current_revision()
        row = db.execute(_SUBJECT_SQL, (subject, tenant, channel)).fetchone()
        if row is None:
            return Facts(revision, None)
        fact = SubjectFact(row[0], row[1], _SUBJECT_KINDS[row[2]], bool(row[3]), bool(row[4]))
        if tenant is not None and tenant != fact.tenant:
            return Facts(revision, fact)  # another tenant's topic: the evaluator denies
        blocks: tuple[BlockFact, ...] = ()
        if row[7]:
            blocks = tuple(
                BlockFact(r[0], r[1], _SCOPES[r[2]], r[3], r[4], _EFFECTS[r[5]])
                for r in db.execute(_BLOCKS_SQL, (fact.tenant, subject))
            )
        channel_exists = bool(row[5])
        channel_groups: tuple[str, ...] = ()
        if channel_exists and any(b.scope is ScopeKind.CHANNEL_GROUP for b in blocks):
            channel_groups = tuple(r[0] for r in db.execute(_CHANNEL_GROUPS_SQL, (fact.tenant, channel)))
        return Facts(revision, fact, blocks, channel_exists, channel_groups, row[6] or 0)

    async def grant_facts(self, subject: str) -> GrantFacts | None:
        def read(db: sqlite3.Connection) -> GrantFacts | None:
            credential = self._credential(db, subject)
            if credential is None:
                return None
            fact = credential.subject
            connections = tuple(
                (r[0], r[1])
                for r in db.execute(
                    "SELECT channel_id, actions FROM connections WHERE client_id = ? AND tenant_id = ? ORDER BY 1",
                    (subject, fact.tenant),
                )
            )
            blocks = tuple(
                BlockFact(r[0], r[1], _SCOPES[r[2]], r[3], r[4], _EFFECTS[r[5]])
                for r in db.execute(_BLOCKS_SQL, (fact.tenant, subject))
            )
            groups = {b.ref for b in blocks if b.scope is ScopeKind.CHANNEL_GROUP and b.ref is not None}
            group_channels = {
                g: tuple(r[0] for r in db.execute(_GROUP_CHANNELS_SQL, (fact.tenant, g))) for g in sorted(groups)
            }
            return GrantFacts(fact, connections, blocks, group_channels)

        return self._read(read)

    async def credential(self, subject: str) -> Credential | None:
        return self._read(lambda db: self._credential(db, subject))

    @staticmethod
    def _credential(db: sqlite3.Connection, subject: str) -> Credential | None:
        row = db.execute(
            "SELECT s.id, s.tenant_id, s.kind, s.enabled, t.enabled, s.credential "
            "FROM subjects s JOIN tenants t ON t.id = s.tenant_id WHERE s.id = ?",
            (subject,),
        ).fetchone()
        if row is None:
            return None
        return Credential(SubjectFact(row[0], row[1], _SUBJECT_KINDS[row[2]], bool(row[3]), bool(row[4])), row[5])

    async def claim_revocation(self, subject: str, allowed_since: int, revision: int) -> bool:
        def claim(db: sqlite3.Connection) -> bool:
            db.execute("BEGIN IMMEDIATE")
            try:
                taken = db.execute(
                    "SELECT 1 FROM revocation_claims WHERE subject = ? AND revision >= ?", (subject, allowed_since)
                ).fetchone()
                if taken is None:
                    db.execute("INSERT INTO revocation_claims VALUES (?, ?, ?)", (subject, revision, time.time()))
                    db.execute("DELETE FROM revocation_claims WHERE claimed_at < ?", (time.time() - CLAIM_KEEP_S,))
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise
            return taken is None

        try:
            return claim(self._db)
        except sqlite3.Error as exc:
            raise StoreUnavailable(f"sqlite: {exc}") from exc

    # -- writes ---------------------------------------------------------------------------------
    @asynccontextmanager
    async def batch(self) -> AsyncIterator[None]:
        """Every write inside is one transaction: all of them commit, or none (world import)."""
        if self._batch.get():
            yield
            return
        with self._transaction(range(1, SLOT_COUNT + 1)):
            token = self._batch.set(True)
            try:
                yield
            finally:
                self._batch.reset(token)

    @contextmanager
    def _transaction(self, slots: Iterable[int]) -> Iterator[sqlite3.Connection]:
        db = self._db
        if self._batch.get():  # inside ``batch``: its transaction and its board bracket cover this write
            yield db
            return
        with self.board.writing(slots):
            try:
                db.execute("BEGIN IMMEDIATE")
            except sqlite3.OperationalError as exc:
                raise StoreUnavailable(f"sqlite write lock unavailable: {exc}") from exc
            try:
                yield db
                db.execute("UPDATE meta SET value = CAST(value AS INTEGER) + 1 WHERE key = 'revision'")
                db.execute("COMMIT")
            except sqlite3.IntegrityError as exc:
                db.execute("ROLLBACK")
                raise Conflict(f"write rejected: {exc}") from exc
            except BaseException:
                db.execute("ROLLBACK")
                raise

    def _subject_tenant(self, subject: str) -> str:
        row = self._db.execute("SELECT tenant_id FROM subjects WHERE id = ?", (subject,)).fetchone()
        if row is None:
            raise NotFound(f"no subject `{subject}`")
        return str(row[0])

    def _require(self, sql: str, args: tuple[Any, ...], message: str) -> None:
        if self._db.execute(sql, args).fetchone() is None:
            raise NotFound(message)

    def _require_tenant(self, tenant: str) -> None:
        self._require("SELECT 1 FROM tenants WHERE id = ?", (tenant,), f"no tenant `{tenant}`")

    async def put_tenant(self, tenant: Tenant) -> None:
        with self._transaction([tenant_slot(tenant.id), IDENTITY_SLOT]) as db:
            db.execute(
                "INSERT INTO tenants (id, name, enabled) VALUES (?, ?, ?) "
                "ON CONFLICT (id) DO UPDATE SET name = excluded.name, enabled = excluded.enabled",
                (tenant.id, tenant.name, int(tenant.enabled)),
            )

    async def delete_tenant(self, tenant: str) -> None:
        self._require_tenant(tenant)
        with self._transaction([tenant_slot(tenant), IDENTITY_SLOT]) as db:
            # Tables without a direct tenant foreign key first, then the cascade does the rest.
            for table in ("connections", "group_members", "role_assignments", "role_blocks"):
                db.execute(f"DELETE FROM {table} WHERE tenant_id = ?", (tenant,))
            db.execute("DELETE FROM tenants WHERE id = ?", (tenant,))

    async def put_subject(self, subject: SubjectRecord, credential_hash: str) -> None:
        self._require_tenant(subject.tenant)
        row = self._db.execute("SELECT tenant_id, kind FROM subjects WHERE id = ?", (subject.id,)).fetchone()
        if row is not None and (row[0] != subject.tenant or row[1] != subject.kind.value):
            raise Conflict(f"subject `{subject.id}` already exists as a {row[1]} of tenant `{row[0]}`")
        with self._transaction([tenant_slot(subject.tenant), IDENTITY_SLOT]) as db:
            db.execute(
                "INSERT INTO subjects (id, tenant_id, kind, name, credential, enabled) VALUES (?, ?, ?, ?, ?, ?) "
                "ON CONFLICT (id) DO UPDATE SET name = excluded.name, credential = excluded.credential, "
                "enabled = excluded.enabled",
                (
                    subject.id,
                    subject.tenant,
                    subject.kind.value,
                    subject.name,
                    credential_hash,
                    int(subject.enabled),
                ),
            )

    async def set_subject_enabled(self, subject: str, enabled: bool) -> None:
        tenant = self._subject_tenant(subject)
        with self._transaction([tenant_slot(tenant), IDENTITY_SLOT]) as db:
            db.execute("UPDATE subjects SET enabled = ? WHERE id = ?", (int(enabled), subject))

    async def delete_subject(self, subject: str) -> None:
        tenant = self._subject_tenant(subject)
        with self._transaction([tenant_slot(tenant), IDENTITY_SLOT]) as db:
            db.execute(
                "DELETE FROM group_members WHERE tenant_id = ? AND member_id = ? AND group_id IN "
                "(SELECT id FROM groups WHERE tenant_id = ? AND kind = 'subjects')",
                (tenant, subject, tenant),
            )
            db.execute(
                "DELETE FROM role_assignments WHERE tenant_id = ? AND assignee_kind = 'subject' AND assignee_id = ?",
                (tenant, subject),
            )
            db.execute("DELETE FROM subjects WHERE id = ?", (subject,))

    async def put_channel(self, channel: Channel) -> None:
        self._require_tenant(channel.tenant)
        with self._transaction([tenant_slot(channel.tenant)]) as db:
            db.execute(
                "INSERT INTO channels (tenant_id, id, name) VALUES (?, ?, ?) "
                "ON CONFLICT (tenant_id, id) DO UPDATE SET name = excluded.name",
                (channel.tenant, channel.id, channel.name),
            )

    async def delete_channel(self, tenant: str, channel: str) -> None:
        self._require(
            "SELECT 1 FROM channels WHERE tenant_id = ? AND id = ?",
            (tenant, channel),
            f"no channel `{channel}` in tenant `{tenant}`",
        )
        with self._transaction([tenant_slot(tenant)]) as db:
            db.execute(
                "DELETE FROM group_members WHERE tenant_id = ? AND member_id = ? AND group_id IN "
                "(SELECT id FROM groups WHERE tenant_id = ? AND kind = 'channels')",
                (tenant, channel, tenant),
            )
            db.execute(
                "DELETE FROM role_blocks WHERE tenant_id = ? AND scope_kind = 'channel' AND scope_ref = ?",
                (tenant, channel),
            )
            db.execute("DELETE FROM channels WHERE tenant_id = ? AND id = ?", (tenant, channel))

    async def connect(self, connection: Connection) -> None:
        row = self._db.execute("SELECT tenant_id, kind FROM subjects WHERE id = ?", (connection.client,)).fetchone()
        if row is None or row[1] != SubjectKind.CLIENT.value:
            raise NotFound(f"no client `{connection.client}`")
        if row[0] != connection.tenant:
            raise Conflict(f"client `{connection.client}` belongs to another tenant")
        self._require(
            "SELECT 1 FROM channels WHERE tenant_id = ? AND id = ?",
            (connection.tenant, connection.channel),
            f"no channel `{connection.channel}` in tenant `{connection.tenant}`",
        )
        bits = int(ActionSet.of(connection.actions))
        with self._transaction([tenant_slot(connection.tenant)]) as db:
            db.execute(
                "INSERT INTO connections (tenant_id, client_id, channel_id, actions) VALUES (?, ?, ?, ?) "
                "ON CONFLICT (client_id, channel_id) DO UPDATE SET actions = actions | excluded.actions",
                (connection.tenant, connection.client, connection.channel, bits),
            )

    async def disconnect(self, tenant: str, client: str, channel: str, actions: frozenset[Action]) -> None:
        bits = int(ActionSet.of(actions)) if actions else int(ActionSet.PUBLISH | ActionSet.SUBSCRIBE)
        self._require(
            "SELECT 1 FROM connections WHERE tenant_id = ? AND client_id = ? AND channel_id = ?",
            (tenant, client, channel),
            f"client `{client}` is not connected to channel `{channel}` in tenant `{tenant}`",
        )
        with self._transaction([tenant_slot(tenant)]) as db:
            db.execute(
                "UPDATE connections SET actions = actions & ~? WHERE tenant_id = ? AND client_id = ? "
                "AND channel_id = ?",
                (bits, tenant, client, channel),
            )
            db.execute("DELETE FROM connections WHERE actions = 0 AND client_id = ?", (client,))

    def _group_kind(self, tenant: str, group: str) -> GroupKind:
        row = self._db.execute("SELECT kind FROM groups WHERE tenant_id = ? AND id = ?", (tenant, group)).fetchone()
        if row is None:
            raise NotFound(f"no group `{group}` in tenant `{tenant}`")
        return GroupKind(row[0])

    async def put_group(self, group: Group) -> None:
        self._require_tenant(group.tenant)
        existing = self._db.execute(
            "SELECT kind FROM groups WHERE tenant_id = ? AND id = ?", (group.tenant, group.id)
        ).fetchone()
        if existing is not None and existing[0] != group.kind.value:
            raise Conflict(f"group `{group.id}` already exists with kind `{existing[0]}`")
        if group.parent is not None:
            if self._group_kind(group.tenant, group.parent) is not group.kind:
                raise InvalidInput(
                    f"parent group `{group.parent}` holds {self._group_kind(group.tenant, group.parent)}"
                )
            ancestor: str | None = group.parent
            while ancestor is not None:  # refuse cycles: a group may not nest inside its own subtree
                if ancestor == group.id:
                    raise InvalidInput(f"group `{group.id}` cannot nest inside its own subgroup")
                row = self._db.execute(
                    "SELECT parent_id FROM groups WHERE tenant_id = ? AND id = ?", (group.tenant, ancestor)
                ).fetchone()
                ancestor = row[0] if row else None
        with self._transaction([tenant_slot(group.tenant)]) as db:
            db.execute(
                "INSERT INTO groups (tenant_id, id, kind, name, parent_id) VALUES (?, ?, ?, ?, ?) "
                "ON CONFLICT (tenant_id, id) DO UPDATE SET name = excluded.name, parent_id = excluded.parent_id",
                (group.tenant, group.id, group.kind.value, group.name, group.parent),
            )

    async def delete_group(self, tenant: str, group: str) -> None:
        self._group_kind(tenant, group)
        with self._transaction([tenant_slot(tenant)]) as db:
            db.execute("UPDATE groups SET parent_id = NULL WHERE tenant_id = ? AND parent_id = ?", (tenant, group))
            db.execute(
                "DELETE FROM role_assignments WHERE tenant_id = ? AND assignee_kind = 'group' AND assignee_id = ?",
                (tenant, group),
            )
            db.execute(
                "DELETE FROM role_blocks WHERE tenant_id = ? AND scope_kind = 'channel_group' AND scope_ref = ?",
                (tenant, group),
            )
            db.execute("DELETE FROM groups WHERE tenant_id = ? AND id = ?", (tenant, group))

    async def add_member(self, tenant: str, group: str, member: str) -> None:
        kind = self._group_kind(tenant, group)
        if kind is GroupKind.SUBJECTS:
            self._require(
                "SELECT 1 FROM subjects WHERE tenant_id = ? AND id = ?",
                (tenant, member),
                f"no subject `{member}` in tenant `{tenant}`",
            )
        else:
            self._require(
                "SELECT 1 FROM channels WHERE tenant_id = ? AND id = ?",
                (tenant, member),
                f"no channel `{member}` in tenant `{tenant}`",
            )
        with self._transaction([tenant_slot(tenant)]) as db:
            db.execute("INSERT OR IGNORE INTO group_members VALUES (?, ?, ?)", (tenant, group, member))

    async def remove_member(self, tenant: str, group: str, member: str) -> None:
        with self._transaction([tenant_slot(tenant)]) as db:
            db.execute(
                "DELETE FROM group_members WHERE tenant_id = ? AND group_id = ? AND member_id = ?",
                (tenant, group, member),
            )

    def _check_block_refs(self, role: Role) -> None:
        for block in role.blocks:
            if block.scope is ScopeKind.CHANNEL:
                assert block.ref is not None
                self._require(
                    "SELECT 1 FROM channels WHERE tenant_id = ? AND id = ?",
                    (role.tenant, block.ref),
                    f"block `{block.id}` names unknown channel `{block.ref}`",
                )
            elif block.scope is ScopeKind.CHANNEL_GROUP:
                assert block.ref is not None
                if self._group_kind(role.tenant, block.ref) is not GroupKind.CHANNELS:
                    raise InvalidInput(f"block `{block.id}` names `{block.ref}`, which is not a channel group")

    async def put_role(self, role: Role) -> None:
        """Create or replace a role with exactly the given blocks (assignments are kept)."""
        self._require_tenant(role.tenant)
        self._check_block_refs(role)
        with self._transaction([tenant_slot(role.tenant)]) as db:
            db.execute(
                "INSERT INTO roles (tenant_id, id, name) VALUES (?, ?, ?) "
                "ON CONFLICT (tenant_id, id) DO UPDATE SET name = excluded.name",
                (role.tenant, role.id, role.name),
            )
            db.execute("DELETE FROM role_blocks WHERE tenant_id = ? AND role_id = ?", (role.tenant, role.id))
            db.executemany(
                "INSERT INTO role_blocks (tenant_id, role_id, id, scope_kind, scope_ref, actions, effect) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                [
                    (role.tenant, role.id, b.id, b.scope.value, b.ref, int(b.action_bits), b.effect.value)
                    for b in role.blocks
                ],
            )

    async def delete_role(self, tenant: str, role: str) -> None:
        self._require(
            "SELECT 1 FROM roles WHERE tenant_id = ? AND id = ?",
            (tenant, role),
            f"no role `{role}` in `{tenant}`",
        )
        with self._transaction([tenant_slot(tenant)]) as db:
            db.execute("DELETE FROM roles WHERE tenant_id = ? AND id = ?", (tenant, role))

    async def assign(self, assignment: Assignment) -> None:
        a = assignment
        self._require(
            "SELECT 1 FROM roles WHERE tenant_id = ? AND id = ?",
            (a.tenant, a.role),
            f"no role `{a.role}` in `{a.tenant}`",
        )
        if a.assignee_kind is AssigneeKind.SUBJECT:
            self._require(
                "SELECT 1 FROM subjects WHERE tenant_id = ? AND id = ?",
                (a.tenant, a.assignee),
                f"no subject `{a.assignee}` in tenant `{a.tenant}`",
            )
        elif self._group_kind(a.tenant, a.assignee) is not GroupKind.SUBJECTS:
            raise InvalidInput(f"roles are assigned to subject groups; `{a.assignee}` holds channels")
        with self._transaction([tenant_slot(a.tenant)]) as db:
            db.execute(
                "INSERT OR IGNORE INTO role_assignments VALUES (?, ?, ?, ?)",
                (a.tenant, a.role, a.assignee_kind.value, a.assignee),
            )

    async def unassign(self, assignment: Assignment) -> None:
        a = assignment
        with self._transaction([tenant_slot(a.tenant)]) as db:
            db.execute(
                "DELETE FROM role_assignments WHERE tenant_id = ? AND role_id = ? AND assignee_kind = ? "
                "AND assignee_id = ?",
                (a.tenant, a.role, a.assignee_kind.value, a.assignee),
            )

    # -- listings -------------------------------------------------------------------------------
    def _rows(self, sql: str, tenant: str | None) -> list[Any]:
        if tenant is None:
            return self._db.execute(sql + " ORDER BY 1, 2").fetchall()
        return self._db.execute(sql + " WHERE tenant_id = ? ORDER BY 1, 2", (tenant,)).fetchall()

    async def list_tenants(self) -> list[Tenant]:
        rows = self._db.execute("SELECT id, name, enabled FROM tenants ORDER BY id").fetchall()
        return [Tenant(id=r[0], name=r[1], enabled=bool(r[2])) for r in rows]

    async def list_subjects(self, tenant: str | None = None) -> list[SubjectRecord]:
        rows = self._rows("SELECT tenant_id, id, kind, name, enabled FROM subjects", tenant)
        return [SubjectRecord(tenant=r[0], id=r[1], kind=r[2], name=r[3], enabled=bool(r[4])) for r in rows]

    async def list_channels(self, tenant: str | None = None) -> list[Channel]:
        rows = self._rows("SELECT tenant_id, id, name FROM channels", tenant)
        return [Channel(tenant=r[0], id=r[1], name=r[2]) for r in rows]

    async def list_connections(self, tenant: str | None = None) -> list[Connection]:
        rows = self._rows("SELECT tenant_id, client_id, channel_id, actions FROM connections", tenant)
        return [
            Connection(tenant=r[0], client=r[1], channel=r[2], actions=frozenset(ActionSet(r[3]).names())) for r in rows
        ]

    async def list_groups(self, tenant: str | None = None) -> list[tuple[Group, list[str]]]:
        rows = self._rows("SELECT tenant_id, id, kind, name, parent_id FROM groups", tenant)
        result = []
        for r in rows:
            members = [
                m[0]
                for m in self._db.execute(
                    "SELECT member_id FROM group_members WHERE tenant_id = ? AND group_id = ? ORDER BY 1",
                    (r[0], r[1]),
                )
            ]
            result.append((Group(tenant=r[0], id=r[1], kind=r[2], name=r[3], parent=r[4]), members))
        return result

    async def list_roles(self, tenant: str | None = None) -> list[tuple[Role, list[Assignment]]]:
        rows = self._rows("SELECT tenant_id, id, name FROM roles", tenant)
        result = []
        for r in rows:
            blocks = tuple(
                BlockModel(
                    id=b[0],
                    scope=b[1],
                    ref=b[2],
                    actions=frozenset(ActionSet(b[3]).names()),
                    effect=b[4],
                )
                for b in self._db.execute(
                    "SELECT id, scope_kind, scope_ref, actions, effect FROM role_blocks "
                    "WHERE tenant_id = ? AND role_id = ? ORDER BY id",
                    (r[0], r[1]),
                )
            )
            assignments = [
                Assignment(tenant=r[0], role=r[1], assignee_kind=a[0], assignee=a[1])
                for a in self._db.execute(
                    "SELECT assignee_kind, assignee_id FROM role_assignments WHERE tenant_id = ? AND role_id = ? "
                    "ORDER BY 1, 2",
                    (r[0], r[1]),
                )
            ]
            result.append((Role(tenant=r[0], id=r[1], name=r[2], blocks=blocks), assignments))
        return result
