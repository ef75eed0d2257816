"""PostgreSQL store (asyncpg) for production and for a fleet of PDP instances on one database.

* One round trip per decision: ``_FACTS_SQL`` returns the subject, its tenant's state, the channel, the
  connection and every applicable permission block (recursive over nested groups) in a single row.
* Every write runs in one transaction that bumps the revision and sends ``pg_notify`` with the revision
  board slots it touched; NOTIFY is delivered only on commit, so listeners never hear of a rolled-back
  write. The writing instance moves its own board around the transaction (read-your-writes, stale
  window 0); every other instance's ``ChangeListener`` moves the same slots when the notification
  arrives.
* If the listening connection is lost, the instance suspends its board - every cached entry is dropped
  and nothing new is cached - until it listens again (then drops everything once more, since changes
  may have been missed meanwhile).
* Each decision read runs under a deadline; an unreachable or slow database becomes ``StoreUnavailable``
  (the decision point denies with ``store_unavailable``) and the pool reconnects by itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import asynccontextmanager
from contextvars import ContextVar
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import asyncpg
from asyncpg.pool import PoolConnectionProxy

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

log = logging.getLogger("authhook.store.postgres")

Conn = asyncpg.Connection | PoolConnectionProxy

DEFAULT_SCHEMA = "authhook"
DEFAULT_DEADLINE_S = 0.5
DEFAULT_LISTEN_CHECK_S = 0.05
# Cached decisions are trusted only while the change feed was proven alive this recently: a connection
# that dies silently (a frozen network, no reset) loses notifications without any error to react to.
DEFAULT_LISTEN_LEASE_S = 0.25
# Loop iterations an expired lease waits for a probe answer that already arrived to be processed: the read,
# asyncpg's future, the probe task, ``asyncio.wait``'s waiter and the watcher's resumption take about five;
# twice that, still well under a millisecond.
CONFIRM_ITERATIONS = 10
_CHANNEL_PREFIX = "authhook_changes_"
# The NOTIFY channel name embeds the schema and PostgreSQL identifiers stop at 63 bytes; `pg_` is reserved.
_SCHEMA_PATTERN = re.compile(rf"(?!pg_)[a-z_][a-z0-9_]{{0,{63 - len(_CHANNEL_PREFIX) - 1}}}")

# Errors that mean "the database cannot answer now", as opposed to "the data says no".
_UNAVAILABLE = (
    OSError,
    TimeoutError,
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,
    asyncpg.CannotConnectNowError,
    asyncpg.AdminShutdownError,
    asyncpg.TooManyConnectionsError,
    # A connection killed mid-operation can leave asyncpg's protocol confused for the next call on it.
    asyncpg.InternalClientError,
)

# Versioned, additive migrations: never edit a shipped entry, append. Applied under an advisory lock so
# instances starting together migrate once; additive steps keep running older instances working.
MIGRATIONS: tuple[str, ...] = (
    """
    CREATE TABLE meta (id boolean PRIMARY KEY DEFAULT true CHECK (id), revision bigint NOT NULL);
    INSERT INTO meta (revision) VALUES (0);
    CREATE TABLE tenants (id text PRIMARY KEY, name text NOT NULL DEFAULT '', enabled boolean NOT NULL DEFAULT true);
    CREATE TABLE subjects (
        id text PRIMARY KEY,
        tenant_id text NOT NULL REFERENCES tenants(id) ON DELETE CASCADE,
        kind text NOT NULL CHECK (kind IN ('client', 'user')),
        name text NOT NULL DEFAULT '',
        credential text NOT NULL,
        enabled boolean NOT NULL DEFAULT true);
    CREATE INDEX subjects_by_tenant ON subjects(tenant_id);
    CREATE TABLE channels (
        tenant_id text NOT NULL REFERENCES tenants(id) ON DELETE CASCADE,
        id text NOT NULL, name text NOT NULL DEFAULT '',
        PRIMARY KEY (tenant_id, id));
    CREATE TABLE connections (
        tenant_id text NOT NULL,
        client_id text NOT NULL REFERENCES subjects(id) ON DELETE CASCADE,
        channel_id text NOT NULL,
        actions integer NOT NULL,
        PRIMARY KEY (client_id, channel_id),
        FOREIGN KEY (tenant_id, channel_id) REFERENCES channels(tenant_id, id) ON DELETE CASCADE);
    CREATE INDEX connections_by_channel ON connections(tenant_id, channel_id);
    CREATE TABLE groups (
        tenant_id text NOT NULL REFERENCES tenants(id) ON DELETE CASCADE,
        id text NOT NULL,
        kind text NOT NULL CHECK (kind IN ('subjects', 'channels')),
        name text NOT NULL DEFAULT '',
        parent_id text,
        PRIMARY KEY (tenant_id, id));
    CREATE TABLE group_members (
        tenant_id text NOT NULL, group_id text NOT NULL, member_id text NOT NULL,
        PRIMARY KEY (tenant_id, group_id, member_id),
        FOREIGN KEY (tenant_id, group_id) REFERENCES groups(tenant_id, id) ON DELETE CASCADE);
    CREATE INDEX group_members_by_member ON group_members(tenant_id, member_id);
    CREATE TABLE roles (
        tenant_id text NOT NULL REFERENCES tenants(id) ON DELETE CASCADE,
        id text NOT NULL, name text NOT NULL DEFAULT '',
        PRIMARY KEY (tenant_id, id));
    CREATE TABLE role_blocks (
        tenant_id text NOT NULL, role_id text NOT NULL, id text NOT NULL,
        scope_kind text NOT NULL, scope_ref text, actions integer NOT NULL,
        effect text NOT NULL CHECK (effect IN ('allow', 'deny')),
        PRIMARY KEY (tenant_id, role_id, id),
        FOREIGN KEY (tenant_id, role_id) REFERENCES roles(tenant_id, id) ON DELETE CASCADE);
    CREATE TABLE role_assignments (
        tenant_id text NOT NULL, role_id text NOT NULL,
        assignee_kind text NOT NULL CHECK (assignee_kind IN ('subject', 'group')),
        assignee_id text NOT NULL,
        PRIMARY KEY (tenant_id, role_id, assignee_kind, assignee_id),
        FOREIGN KEY (tenant_id, role_id) REFERENCES roles(tenant_id, id) ON DELETE CASCADE);
    CREATE INDEX role_assignments_by_assignee ON role_assignments(tenant_id, assignee_kind, assignee_id);
    """,
    # 2: walking a channel group down to its sub-groups (role scopes, group deletion) by parent.
    """
    CREATE INDEX groups_by_parent ON groups(tenant_id, parent_id) WHERE parent_id IS NOT NULL;
    """,
    # 3: which instance of a fleet acts on a revoke (see ``Store.claim_revocation``).
    """
    CREATE TABLE revocation_claims (
        subject text NOT NULL, revision bigint NOT NULL, claimed_at timestamptz NOT NULL DEFAULT now(),
        PRIMARY KEY (subject, revision));
    """,
)

# $1 subject, $2 topic tenant (NULL: none), $3 channel (NULL: none). Channel, connection and blocks are
# only read inside the subject's own tenant and only when the topic names that tenant (or none).
_FACTS_SQL = """
SELECT m.revision, s.id, s.tenant_id, s.kind, s.enabled, t.enabled,
    EXISTS (SELECT 1 FROM channels c WHERE c.tenant_id = s.tenant_id AND c.tenant_id = $2 AND c.id = $3),
    (SELECT n.actions FROM connections n
     WHERE n.client_id = s.id AND n.channel_id = $3 AND n.tenant_id = s.tenant_id AND n.tenant_id = $2),
    CASE WHEN s.id IS NOT NULL AND ($2::text IS NULL OR $2 = s.tenant_id) THEN ARRAY(
        WITH RECURSIVE sg(id) AS (
            SELECT gm.group_id FROM group_members gm
            JOIN groups g ON g.tenant_id = gm.tenant_id AND g.id = gm.group_id AND g.kind = 'subjects'
            WHERE gm.tenant_id = s.tenant_id AND gm.member_id = s.id
            UNION
            SELECT g.parent_id FROM sg JOIN groups g ON g.tenant_id = s.tenant_id AND g.id = sg.id
            WHERE g.parent_id IS NOT NULL),
        assignee(kind, id) AS (SELECT 'subject', s.id UNION ALL SELECT 'group', id FROM sg)
        SELECT DISTINCT ROW(b.role_id, b.id, b.scope_kind, b.scope_ref, b.actions, b.effect)
        FROM assignee x
        JOIN role_assignments a ON a.tenant_id = s.tenant_id AND a.assignee_kind = x.kind AND a.assignee_id = x.id
        JOIN role_blocks b ON b.tenant_id = a.tenant_id AND b.role_id = a.role_id) END,
    CASE WHEN s.id IS NOT NULL AND $2 = s.tenant_id AND $3::text IS NOT NULL THEN ARRAY(
        WITH RECURSIVE cg(id) AS (
            SELECT gm.group_id FROM group_members gm
            JOIN groups g ON g.tenant_id = gm.tenant_id AND g.id = gm.group_id AND g.kind = 'channels'
            WHERE gm.tenant_id = s.tenant_id AND gm.member_id = $3
            UNION
            SELECT g.parent_id FROM cg JOIN groups g ON g.tenant_id = s.tenant_id AND g.id = cg.id
            WHERE g.parent_id IS NOT NULL)
        SELECT id FROM cg) END
FROM meta m LEFT JOIN subjects s ON s.id = $1 LEFT JOIN tenants t ON t.id = s.tenant_id"""

_GROUP_CHANNELS_SQL = """
WITH RECURSIVE down(id) AS (
    SELECT $2::text
    UNION
    SELECT g.id FROM down JOIN groups g ON g.tenant_id = $1 AND g.parent_id = down.id)
SELECT DISTINCT m.member_id FROM down
JOIN groups g ON g.tenant_id = $1 AND g.id = down.id AND g.kind = 'channels'
JOIN group_members m ON m.tenant_id = $1 AND m.group_id = down.id
ORDER BY 1"""

_SUBJECT_KINDS = {k.value: k for k in SubjectKind}
_SCOPES = {k.value: k for k in ScopeKind}
_EFFECTS = {k.value: k for k in Effect}


async def _keep_session(_conn: asyncpg.Connection) -> None:
    """Pool reset hook: nothing to undo. asyncpg's default sends a reset query on every release - one
    extra round trip per decision (~0.2 ms here). authhook never changes session state (no SET, LISTEN,
    cursors or session locks on pool connections), and asyncpg still rolls back an open transaction."""


def parse_url(url: str) -> tuple[str, str]:
    """Split ``postgresql://…?schema=NAME`` into (dsn for asyncpg, schema)."""
    parts = urlsplit(url)
    query = parse_qsl(parts.query, keep_blank_values=True)
    schema = next((v for k, v in query if k == "schema"), DEFAULT_SCHEMA)
    if not _SCHEMA_PATTERN.fullmatch(schema):
        raise InvalidInput(
            f"schema `{schema}` must be a lowercase sql identifier of at most "
            f"{63 - len(_CHANNEL_PREFIX)} characters, not starting with pg_"
        )
    rest = urlencode([(k, v) for k, v in query if k != "schema"])
    return urlunsplit(parts._replace(query=rest)), schema


class PostgresStore:
    """The ``Store`` protocol over PostgreSQL."""

    def __init__(
        self,
        url: str,
        *,
        deadline_s: float = DEFAULT_DEADLINE_S,
        listen_check_s: float = DEFAULT_LISTEN_CHECK_S,
        listen_lease_s: float = DEFAULT_LISTEN_LEASE_S,
        min_pool: int = 2,
        max_pool: int = 10,
    ) -> None:
        self._dsn, self.schema = parse_url(url)
        self._deadline = deadline_s
        if listen_lease_s <= listen_check_s:
            raise InvalidInput("the listen lease must be longer than the interval between liveness probes")
        self._listen_check = listen_check_s
        self._listen_lease = listen_lease_s
        self._min_pool, self._max_pool = min_pool, max_pool
        self._pool: asyncpg.Pool | None = None
        self.channel = _CHANNEL_PREFIX + self.schema
        self.instance = uuid.uuid4().hex  # lets the listener skip its own notifications
        self.board = RevisionBoard()
        self.listener = ChangeListener(self)
        self._batch: ContextVar[tuple[Conn, set[int]] | None] = ContextVar(
            f"authhook-pg-batch-{id(self)}", default=None
        )

    # -- lifecycle ------------------------------------------------------------------------------
    async def open(self) -> None:
        if self._pool is not None:
            return
        # jit off: PostgreSQL's JIT makes asyncpg's one-time type introspection take ~1 s per connection.
        # Every decision query is equality lookups on indexed keys, so the generic plan is the right one
        # from the first call (custom plans would be re-planned, ~1 ms each, for the first five).
        settings = {
            "search_path": self.schema,
            "application_name": self.application_name,
            "jit": "off",
            "plan_cache_mode": "force_generic_plan",
        }
        try:
            self._pool = await asyncpg.create_pool(
                self._dsn,
                min_size=self._min_pool,
                max_size=self._max_pool,
                server_settings=settings,
                command_timeout=max(self._deadline * 4, 5.0),
                reset=_keep_session,
            )
            await self._migrate()
        except _UNAVAILABLE as exc:
            # Leave nothing half-open, so that trying again later starts from the beginning.
            pool, self._pool = self._pool, None
            if pool is not None:
                pool.terminate()
            raise StoreUnavailable(f"cannot reach postgresql: {exc}") from exc
        await self.listener.start()

    async def connect_raw(self) -> asyncpg.Connection:
        """A connection outside the pool (the listener's), with the same schema."""
        return await asyncpg.connect(
            self._dsn,
            server_settings={"search_path": self.schema, "application_name": self.application_name + ":listen"},
            timeout=max(self._deadline * 4, 2.0),
        )

    @property
    def application_name(self) -> str:
        """Names this store's sessions in pg_stat_activity, so an operator (or a test) can tell its schema's."""
        return f"authhook:{self.schema}"

    async def _migrate(self) -> None:
        async with self._acquire_for_write() as conn, conn.transaction():
            # The lock comes first, keyed by the schema's name: instances starting together on a new
            # database would otherwise race on CREATE SCHEMA itself.
            await conn.execute("SELECT pg_advisory_xact_lock(hashtext('authhook:' || $1::text))", self.schema)
            exists = await conn.fetchval("SELECT true FROM pg_namespace WHERE nspname = $1", self.schema)
            if not exists:  # a schema a DBA made must not need the CREATE privilege on the database
                await conn.execute(f'CREATE SCHEMA "{self.schema}"')
            await conn.execute(
                "CREATE TABLE IF NOT EXISTS schema_migrations "
                "(version integer PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())"
            )
            done = await conn.fetchval("SELECT coalesce(max(version), 0) FROM schema_migrations")
            for number, script in enumerate(MIGRATIONS[done:], start=done + 1):
                await conn.execute(script)
                await conn.execute("INSERT INTO schema_migrations (version) VALUES ($1)", number)

    async def close(self) -> None:
        await self.listener.stop()
        if self._pool is not None:
            pool, self._pool = self._pool, None
            await pool.close()

    @property
    def pool(self) -> asyncpg.Pool:
        if self._pool is None:
            raise StoreUnavailable("store is not open")
        return self._pool

    @asynccontextmanager
    async def _acquire_for_write(self) -> AsyncIterator[Conn]:
        async with self.pool.acquire(timeout=max(self._deadline * 4, 5.0)) as conn:
            yield conn

    async def ping(self) -> None:
        await self._read(lambda conn: conn.fetchval("SELECT 1"))
        if self.board.suspended:
            raise StoreUnavailable("not listening for changes from other instances")

    async def revision(self) -> int:
        value: int = await self._read(lambda conn: conn.fetchval("SELECT revision FROM meta"))
        return value

    async def _read(self, fn: Callable[[Conn], Any]) -> Any:
        """Run one read under the deadline, all of it: waiting for a connection, the query, the release.

        A query cut short by the deadline is not released the usual way: asyncpg would first wait (up to
        its own timeout) for the server to confirm the cancellation, which on a frozen network doubles the
        time the broker waits. The connection is closed at once instead and the pool opens a new one.
        """
        pool = self.pool
        conn: PoolConnectionProxy[Any] | None = None
        try:
            async with asyncio.timeout(self._deadline):
                conn = await pool.acquire()
                result = await fn(conn)
        except TimeoutError as exc:
            if conn is not None:
                conn.terminate()
            raise StoreUnavailable(f"postgresql did not answer within {self._deadline} s") from exc
        except _UNAVAILABLE as exc:
            raise StoreUnavailable(f"postgresql read failed: {type(exc).__name__}: {exc}") from exc
        finally:
            if conn is not None:
                try:
                    await pool.release(conn)
                except _UNAVAILABLE as exc:  # the answer (or the error above) stands; the pool replaces it
                    log.warning("could not return a connection to the pool: %s", exc)
        return result

    # -- decision reads -------------------------------------------------------------------------
    async def facts(self, subject: str, tenant: str | None, channel: str | None) -> Facts:
        row = await self._read(lambda conn: conn.fetchrow(_FACTS_SQL, subject, tenant, channel))
        revision = row[0]
        if row[1] is None:
            return Facts(revision, None)
        fact = SubjectFact(row[1], row[2], _SUBJECT_KINDS[row[3]], row[4], row[5])
        if tenant is not None and tenant != fact.tenant:
            return Facts(revision, fact)
        blocks = tuple(BlockFact(b[0], b[1], _SCOPES[b[2]], b[3], b[4], _EFFECTS[b[5]]) for b in row[8] or ())
        return Facts(revision, fact, blocks, row[6], tuple(row[9] or ()), row[7] or 0)

    async def grant_facts(self, subject: str) -> GrantFacts | None:
        credential = await self.credential(subject)
        if credential is None:
            return None
        fact = credential.subject

        async def read(conn: Conn) -> GrantFacts:
            connections = tuple(
                (r[0], r[1])
                for r in await conn.fetch(
                    "SELECT channel_id, actions FROM connections WHERE client_id = $1 AND tenant_id = $2 ORDER BY 1",
                    subject,
                    fact.tenant,
                )
            )
            facts = await conn.fetchrow(_FACTS_SQL, subject, None, None)  # the blocks column, reused
            assert facts is not None  # the query always yields the meta row
            blocks = tuple(BlockFact(b[0], b[1], _SCOPES[b[2]], b[3], b[4], _EFFECTS[b[5]]) for b in facts[8] or ())
            groups = sorted({b.ref for b in blocks if b.scope is ScopeKind.CHANNEL_GROUP and b.ref is not None})
            group_channels = {
                g: tuple(r[0] for r in await conn.fetch(_GROUP_CHANNELS_SQL, fact.tenant, g)) for g in groups
            }
            return GrantFacts(fact, connections, blocks, group_channels)

        result: GrantFacts = await self._read(read)
        return result

    async def credential(self, subject: str) -> Credential | None:
        row = await self._read(
            lambda conn: conn.fetchrow(
                "SELECT s.id, s.tenant_id, s.kind, s.enabled, t.enabled, s.credential "
                "FROM subjects s JOIN tenants t ON t.id = s.tenant_id WHERE s.id = $1",
                subject,
            )
        )
        if row is None:
            return None
        return Credential(SubjectFact(row[0], row[1], _SUBJECT_KINDS[row[2]], row[3], row[4]), row[5])

    async def claim_revocation(self, subject: str, allowed_since: int, revision: int) -> bool:
        try:
            async with self._acquire_for_write() as conn, conn.transaction():
                # Serializes claims for one subject across the fleet, so the check and the insert are one step.
                await conn.execute("SELECT pg_advisory_xact_lock(hashtext('authhook-revoke:' || $1::text))", subject)
                taken = await conn.fetchval(
                    "SELECT true FROM revocation_claims WHERE subject = $1 AND revision >= $2 LIMIT 1",
                    subject,
                    allowed_since,
                )
                if taken:
                    return False
                await conn.execute(
                    "INSERT INTO revocation_claims (subject, revision) VALUES ($1, $2)", subject, revision
                )
                await conn.execute("DELETE FROM revocation_claims WHERE claimed_at < now() - interval '7 days'")
                return True
        except (TimeoutError, asyncpg.PostgresError, OSError) as exc:
            raise StoreUnavailable(f"postgresql: {exc}") from exc

    # -- writes ---------------------------------------------------------------------------------
    @asynccontextmanager
    async def batch(self) -> AsyncIterator[None]:
        """Every write inside is one transaction on one connection: all of them commit, or none (world import).

        One revision bump and one notification at the end name every slot the writes touched.
        """
        if self._batch.get() is not None:
            yield
            return
        touched: set[int] = set()
        async with self._transaction(range(1, SLOT_COUNT + 1), notify=touched) as conn:
            token = self._batch.set((conn, touched))
            try:
                yield
            finally:
                self._batch.reset(token)

    @asynccontextmanager
    async def _transaction(self, slots: Iterable[int], *, notify: set[int] | None = None) -> AsyncIterator[Conn]:
        """One write: revision bump and NOTIFY inside the transaction, local board moved around it.

        Inside ``batch`` the batch's connection and transaction are used and the slots are only collected.
        ``notify``, for the batch itself: the slots to announce, filled while the batch runs.
        """
        slots = list(slots)
        current = self._batch.get()
        if current is not None:
            conn, touched = current
            touched.update(slots)
            yield conn
            return
        try:
            with self.board.writing(slots, exclusive=False):
                async with self._acquire_for_write() as conn, conn.transaction():
                    yield conn
                    await conn.execute("UPDATE meta SET revision = revision + 1")
                    announced = sorted(notify if notify is not None else set(slots))
                    change = {"slots": announced, "origin": self.instance, "sent": time.time()}  # sent: lag
                    await conn.execute("SELECT pg_notify($1, $2)", self.channel, json.dumps(change))
        except asyncpg.UniqueViolationError as exc:
            raise Conflict(f"write rejected: {exc.detail or exc}") from exc
        except asyncpg.ForeignKeyViolationError as exc:
            raise NotFound(f"write rejected: {exc.detail or exc}") from exc
        except asyncpg.IntegrityConstraintViolationError as exc:
            raise Conflict(f"write rejected: {exc}") from exc
        except _UNAVAILABLE as exc:
            raise StoreUnavailable(f"postgresql write failed: {exc}") from exc

    @staticmethod
    async def _require(conn: Conn, sql: str, *args: Any, message: str) -> None:
        if await conn.fetchval(sql, *args) is None:
            raise NotFound(message)

    async def _subject_tenant(self, subject: str) -> str:
        tenant = await self._read(lambda conn: conn.fetchval("SELECT tenant_id FROM subjects WHERE id = $1", subject))
        if tenant is None:
            raise NotFound(f"no subject `{subject}`")
        return str(tenant)

    async def put_tenant(self, tenant: Tenant) -> None:
        async with self._transaction([tenant_slot(tenant.id), IDENTITY_SLOT]) as conn:
            await conn.execute(
                "INSERT INTO tenants (id, name, enabled) VALUES ($1, $2, $3) "
                "ON CONFLICT (id) DO UPDATE SET name = excluded.name, enabled = excluded.enabled",
                tenant.id,
                tenant.name,
                tenant.enabled,
            )

    async def delete_tenant(self, tenant: str) -> None:
        async with self._transaction([tenant_slot(tenant), IDENTITY_SLOT]) as conn:
            await self._require(conn, "SELECT 1 FROM tenants WHERE id = $1", tenant, message=f"no tenant `{tenant}`")
            for table in ("connections", "group_members", "role_assignments", "role_blocks"):
                await conn.execute(f"DELETE FROM {table} WHERE tenant_id = $1", tenant)
            await conn.execute("DELETE FROM tenants WHERE id = $1", tenant)

    async def put_subject(self, subject: SubjectRecord, credential_hash: str) -> None:
        async with self._transaction([tenant_slot(subject.tenant), IDENTITY_SLOT]) as conn:
            await self._require(
                conn, "SELECT 1 FROM tenants WHERE id = $1", subject.tenant, message=f"no tenant `{subject.tenant}`"
            )
            row = await conn.fetchrow("SELECT tenant_id, kind FROM subjects WHERE id = $1 FOR UPDATE", subject.id)
            if row is not None and (row[0] != subject.tenant or row[1] != subject.kind.value):
                raise Conflict(f"subject `{subject.id}` already exists as a {row[1]} of tenant `{row[0]}`")
            await conn.execute(
                "INSERT INTO subjects (id, tenant_id, kind, name, credential, enabled) VALUES ($1, $2, $3, $4, $5, $6) "
                "ON CONFLICT (id) DO UPDATE SET name = excluded.name, credential = excluded.credential, "
                "enabled = excluded.enabled",
                subject.id,
                subject.tenant,
                subject.kind.value,
                subject.name,
                credential_hash,
                subject.enabled,
            )

    async def set_subject_enabled(self, subject: str, enabled: bool) -> None:
        tenant = await self._subject_tenant(subject)
        async with self._transaction([tenant_slot(tenant), IDENTITY_SLOT]) as conn:
            await conn.execute("UPDATE subjects SET enabled = $1 WHERE id = $2", enabled, subject)

    async def delete_subject(self, subject: str) -> None:
        tenant = await self._subject_tenant(subject)
        async with self._transaction([tenant_slot(tenant), IDENTITY_SLOT]) as conn:
            await conn.execute(
                "DELETE FROM group_members WHERE tenant_id = $1 AND member_id = $2 AND group_id IN "
                "(SELECT id FROM groups WHERE tenant_id = $1 AND kind = 'subjects')",
                tenant,
                subject,
            )
            await conn.execute(
                "DELETE FROM role_assignments WHERE tenant_id = $1 AND assignee_kind = 'subject' AND assignee_id = $2",
                tenant,
                subject,
            )
            await conn.execute("DELETE FROM subjects WHERE id = $1", subject)

    async def put_channel(self, channel: Channel) -> None:
        async with self._transaction([tenant_slot(channel.tenant)]) as conn:
            await self._require(
                conn, "SELECT 1 FROM tenants WHERE id = $1", channel.tenant, message=f"no tenant `{channel.tenant}`"
            )
            await conn.execute(
                "INSERT INTO channels (tenant_id, id, name) VALUES ($1, $2, $3) "
                "ON CONFLICT (tenant_id, id) DO UPDATE SET name = excluded.name",
                channel.tenant,
                channel.id,
                channel.name,
            )

    async def delete_channel(self, tenant: str, channel: str) -> None:
        async with self._transaction([tenant_slot(tenant)]) as conn:
            await self._require(
                conn,
                "SELECT 1 FROM channels WHERE tenant_id = $1 AND id = $2",
                tenant,
                channel,
                message=f"no channel `{channel}` in tenant `{tenant}`",
            )
            await conn.execute(
                "DELETE FROM group_members WHERE tenant_id = $1 AND member_id = $2 AND group_id IN "
                "(SELECT id FROM groups WHERE tenant_id = $1 AND kind = 'channels')",
                tenant,
                channel,
            )
            await conn.execute(
                "DELETE FROM role_blocks WHERE tenant_id = $1 AND scope_kind = 'channel' AND scope_ref = $2",
                tenant,
                channel,
            )
            await conn.execute("DELETE FROM channels WHERE tenant_id = $1 AND id = $2", tenant, channel)

    async def connect(self, connection: Connection) -> None:
        c = connection
        async with self._transaction([tenant_slot(c.tenant)]) as conn:
            row = await conn.fetchrow("SELECT tenant_id, kind FROM subjects WHERE id = $1", c.client)
            if row is None or row[1] != SubjectKind.CLIENT.value:
                raise NotFound(f"no client `{c.client}`")
            if row[0] != c.tenant:
                raise Conflict(f"client `{c.client}` belongs to another tenant")
            await self._require(
                conn,
                "SELECT 1 FROM channels WHERE tenant_id = $1 AND id = $2",
                c.tenant,
                c.channel,
                message=f"no channel `{c.channel}` in tenant `{c.tenant}`",
            )
            await conn.execute(
                "INSERT INTO connections AS n (tenant_id, client_id, channel_id, actions) VALUES ($1, $2, $3, $4) "
                "ON CONFLICT (client_id, channel_id) DO UPDATE SET actions = n.actions | excluded.actions",
                c.tenant,
                c.client,
                c.channel,
                int(ActionSet.of(c.actions)),
            )

    async def disconnect(self, tenant: str, client: str, channel: str, actions: frozenset[Action]) -> None:
        bits = int(ActionSet.of(actions)) if actions else int(ActionSet.PUBLISH | ActionSet.SUBSCRIBE)
        async with self._transaction([tenant_slot(tenant)]) as conn:
            await self._require(
                conn,
                "SELECT 1 FROM connections WHERE tenant_id = $1 AND client_id = $2 AND channel_id = $3",
                tenant,
                client,
                channel,
                message=f"client `{client}` is not connected to channel `{channel}` in tenant `{tenant}`",
            )
            await conn.execute(
                "UPDATE connections SET actions = actions & ~$1::integer "
                "WHERE tenant_id = $2 AND client_id = $3 AND channel_id = $4",
                bits,
                tenant,
                client,
                channel,
            )
            await conn.execute("DELETE FROM connections WHERE actions = 0 AND client_id = $1", client)

    @staticmethod
    async def _group_kind(conn: Conn, tenant: str, group: str) -> GroupKind:
        kind = await conn.fetchval("SELECT kind FROM groups WHERE tenant_id = $1 AND id = $2", tenant, group)
        if kind is None:
            raise NotFound(f"no group `{group}` in tenant `{tenant}`")
        return GroupKind(kind)

    async def put_group(self, group: Group) -> None:
        async with self._transaction([tenant_slot(group.tenant)]) as conn:
            await self._require(
                conn, "SELECT 1 FROM tenants WHERE id = $1", group.tenant, message=f"no tenant `{group.tenant}`"
            )
            existing = await conn.fetchval(
                "SELECT kind FROM groups WHERE tenant_id = $1 AND id = $2", group.tenant, group.id
            )
            if existing is not None and existing != group.kind.value:
                raise Conflict(f"group `{group.id}` already exists with kind `{existing}`")
            if group.parent is not None:
                parent_kind = await self._group_kind(conn, group.tenant, group.parent)
                if parent_kind is not group.kind:
                    raise InvalidInput(f"parent group `{group.parent}` holds {parent_kind.value}")
                ancestor: str | None = group.parent
                while ancestor is not None:  # refuse cycles: a group may not nest inside its own subtree
                    if ancestor == group.id:
                        raise InvalidInput(f"group `{group.id}` cannot nest inside its own subgroup")
                    ancestor = await conn.fetchval(
                        "SELECT parent_id FROM groups WHERE tenant_id = $1 AND id = $2", group.tenant, ancestor
                    )
            await conn.execute(
                "INSERT INTO groups (tenant_id, id, kind, name, parent_id) VALUES ($1, $2, $3, $4, $5) "
                "ON CONFLICT (tenant_id, id) DO UPDATE SET name = excluded.name, parent_id = excluded.parent_id",
                group.tenant,
                group.id,
                group.kind.value,
                group.name,
                group.parent,
            )

    async def delete_group(self, tenant: str, group: str) -> None:
        async with self._transaction([tenant_slot(tenant)]) as conn:
            await self._group_kind(conn, tenant, group)
            await conn.execute(
                "UPDATE groups SET parent_id = NULL WHERE tenant_id = $1 AND parent_id = $2", tenant, group
            )
            await conn.execute(
                "DELETE FROM role_assignments WHERE tenant_id = $1 AND assignee_kind = 'group' AND assignee_id = $2",
                tenant,
                group,
            )
            await conn.execute(
                "DELETE FROM role_blocks WHERE tenant_id = $1 AND scope_kind = 'channel_group' AND scope_ref = $2",
                tenant,
                group,
            )
            await conn.execute("DELETE FROM groups WHERE tenant_id = $1 AND id = $2", tenant, group)

    async def add_member(self, tenant: str, group: str, member: str) -> None:
        async with self._transaction([tenant_slot(tenant)]) as conn:
            kind = await self._group_kind(conn, tenant, group)
            if kind is GroupKind.SUBJECTS:
                await self._require(
                    conn,
                    "SELECT 1 FROM subjects WHERE tenant_id = $1 AND id = $2",
                    tenant,
                    member,
                    message=f"no subject `{member}` in tenant `{tenant}`",
                )
            else:
                await self._require(
                    conn,
                    "SELECT 1 FROM channels WHERE tenant_id = $1 AND id = $2",
                    tenant,
                    member,
                    message=f"no channel `{member}` in tenant `{tenant}`",
                )
            await conn.execute(
                "INSERT INTO group_members VALUES ($1, $2, $3) ON CONFLICT DO NOTHING", tenant, group, member
            )

    async def remove_member(self, tenant: str, group: str, member: str) -> None:
        async with self._transaction([tenant_slot(tenant)]) as conn:
            await conn.execute(
                "DELETE FROM group_members WHERE tenant_id = $1 AND group_id = $2 AND member_id = $3",
                tenant,
                group,
                member,
            )

    async def put_role(self, role: Role) -> None:
        """Create or replace a role with exactly the given blocks (assignments are kept)."""
        async with self._transaction([tenant_slot(role.tenant)]) as conn:
            await self._require(
                conn, "SELECT 1 FROM tenants WHERE id = $1", role.tenant, message=f"no tenant `{role.tenant}`"
            )
            for block in role.blocks:
                if block.scope is ScopeKind.CHANNEL:
                    await self._require(
                        conn,
                        "SELECT 1 FROM channels WHERE tenant_id = $1 AND id = $2",
                        role.tenant,
                        block.ref,
                        message=f"block `{block.id}` names unknown channel `{block.ref}`",
                    )
                elif block.scope is ScopeKind.CHANNEL_GROUP:
                    assert block.ref is not None
                    if await self._group_kind(conn, role.tenant, block.ref) is not GroupKind.CHANNELS:
                        raise InvalidInput(f"block `{block.id}` names `{block.ref}`, which is not a channel group")
            await conn.execute(
                "INSERT INTO roles (tenant_id, id, name) VALUES ($1, $2, $3) "
                "ON CONFLICT (tenant_id, id) DO UPDATE SET name = excluded.name",
                role.tenant,
                role.id,
                role.name,
            )
            await conn.execute("DELETE FROM role_blocks WHERE tenant_id = $1 AND role_id = $2", role.tenant, role.id)
            await conn.executemany(
                "INSERT INTO role_blocks (tenant_id, role_id, id, scope_kind, scope_ref, actions, effect) "
                "VALUES ($1, $2, $3, $4, $5, $6, $7)",
                [
                    (role.tenant, role.id, b.id, b.scope.value, b.ref, int(b.action_bits), b.effect.value)
                    for b in role.blocks
                ],
            )

    async def delete_role(self, tenant: str, role: str) -> None:
        async with self._transaction([tenant_slot(tenant)]) as conn:
            await self._require(
                conn,
                "SELECT 1 FROM roles WHERE tenant_id = $1 AND id = $2",
                tenant,
                role,
                message=f"no role `{role}` in `{tenant}`",
            )
            await conn.execute("DELETE FROM roles WHERE tenant_id = $1 AND id = $2", tenant, role)

    async def assign(self, assignment: Assignment) -> None:
        a = assignment
        async with self._transaction([tenant_slot(a.tenant)]) as conn:
            await self._require(
                conn,
                "SELECT 1 FROM roles WHERE tenant_id = $1 AND id = $2",
                a.tenant,
                a.role,
                message=f"no role `{a.role}` in `{a.tenant}`",
            )
            if a.assignee_kind is AssigneeKind.SUBJECT:
                await self._require(
                    conn,
                    "SELECT 1 FROM subjects WHERE tenant_id = $1 AND id = $2",
                    a.tenant,
                    a.assignee,
                    message=f"no subject `{a.assignee}` in tenant `{a.tenant}`",
                )
            elif await self._group_kind(conn, a.tenant, a.assignee) is not GroupKind.SUBJECTS:
                raise InvalidInput(f"roles are assigned to subject groups; `{a.assignee}` holds channels")
            await conn.execute(
                "INSERT INTO role_assignments VALUES ($1, $2, $3, $4) ON CONFLICT DO NOTHING",
                a.tenant,
                a.role,
                a.assignee_kind.value,
                a.assignee,
            )

    async def unassign(self, assignment: Assignment) -> None:
        a = assignment
        async with self._transaction([tenant_slot(a.tenant)]) as conn:
            await conn.execute(
                "DELETE FROM role_assignments WHERE tenant_id = $1 AND role_id = $2 AND assignee_kind = $3 "
                "AND assignee_id = $4",
                a.tenant,
                a.role,
                a.assignee_kind.value,
                a.assignee,
            )

    # -- listings -------------------------------------------------------------------------------
    async def _rows(self, sql: str, tenant: str | None) -> list[asyncpg.Record]:
        if tenant is None:
            rows: list[asyncpg.Record] = await self._read(lambda conn: conn.fetch(sql + " ORDER BY 1, 2"))
        else:
            rows = await self._read(lambda conn: conn.fetch(sql + " WHERE tenant_id = $1 ORDER BY 1, 2", tenant))
        return rows

    async def list_tenants(self) -> list[Tenant]:
        rows = await self._read(lambda conn: conn.fetch("SELECT id, name, enabled FROM tenants ORDER BY id"))
        return [Tenant(id=r[0], name=r[1], enabled=r[2]) for r in rows]

    async def list_subjects(self, tenant: str | None = None) -> list[SubjectRecord]:
        rows = await self._rows("SELECT tenant_id, id, kind, name, enabled FROM subjects", tenant)
        return [SubjectRecord(tenant=r[0], id=r[1], kind=r[2], name=r[3], enabled=r[4]) for r in rows]

    async def list_channels(self, tenant: str | None = None) -> list[Channel]:
        rows = await self._rows("SELECT tenant_id, id, name FROM channels", tenant)
        return [Channel(tenant=r[0], id=r[1], name=r[2]) for r in rows]

    async def list_connections(self, tenant: str | None = None) -> list[Connection]:
        rows = await self._rows("SELECT tenant_id, client_id, channel_id, actions FROM connections", tenant)
        return [
            Connection(tenant=r[0], client=r[1], channel=r[2], actions=frozenset(ActionSet(r[3]).names())) for r in rows
        ]

    async def list_groups(self, tenant: str | None = None) -> list[tuple[Group, list[str]]]:
        rows = await self._rows(
            "SELECT tenant_id, id, kind, name, parent_id, "
            "ARRAY(SELECT member_id FROM group_members m WHERE m.tenant_id = groups.tenant_id "
            "AND m.group_id = groups.id ORDER BY 1) FROM groups",
            tenant,
        )
        return [(Group(tenant=r[0], id=r[1], kind=r[2], name=r[3], parent=r[4]), list(r[5])) for r in rows]

    async def list_roles(self, tenant: str | None = None) -> list[tuple[Role, list[Assignment]]]:
        rows = await self._rows(
            "SELECT tenant_id, id, name, "
            "ARRAY(SELECT ROW(b.id, b.scope_kind, b.scope_ref, b.actions, b.effect) FROM role_blocks b "
            "WHERE b.tenant_id = roles.tenant_id AND b.role_id = roles.id ORDER BY b.id), "
            "ARRAY(SELECT ROW(a.assignee_kind, a.assignee_id) FROM role_assignments a "
            "WHERE a.tenant_id = roles.tenant_id AND a.role_id = roles.id ORDER BY 1) FROM roles",
            tenant,
        )
        result = []
        for r in rows:
            blocks = tuple(
                BlockModel(id=b[0], scope=b[1], ref=b[2], actions=frozenset(ActionSet(b[3]).names()), effect=b[4])
                for b in r[3]
            )
            assignments = [Assignment(tenant=r[0], role=r[1], assignee_kind=a[0], assignee=a[1]) for a in r[4]]
            result.append((Role(tenant=r[0], id=r[1], name=r[2], blocks=blocks), assignments))
        return result


class ChangeListener:
    """Hears other instances' writes (LISTEN) and moves this instance's revision board accordingly.

    While it is not listening - at start-up before the first LISTEN, after the connection drops, while
    reconnecting - the board is suspended: every cached entry is invalid and nothing new is cached.

    A connection can also die silently (a frozen network sends no reset), and then notifications stop
    with no error to react to. So listening is a lease: a liveness probe runs every ``listen_check_s``,
    and each answer proves that every change committed before the probe was sent has been delivered
    (PostgreSQL hands a listener its notifications before the answer to its next query). If no probe
    has been answered for ``listen_lease_s``, a timer suspends the board - no decision waits for it,
    and a cached allow can outlive a lost feed by that long at most.
    """

    def __init__(self, store: PostgresStore) -> None:
        self._store = store
        self._task: asyncio.Task[None] | None = None
        self._conn: asyncpg.Connection | None = None
        self._lost = asyncio.Event()
        self._expiry: asyncio.Handle | None = None
        self.lease_expired = 0  # times a probe went unanswered for a whole lease
        self._proven_at = 0.0  # loop time at which the latest answered probe was sent
        self.listening = asyncio.Event()
        self.received = 0
        # send-to-apply lag of the latest notifications (bounded: the server runs for months)
        self.lags_ms: deque[float] = deque(maxlen=10_000)

    async def start(self) -> None:
        self._store.board.suspend()
        self._task = asyncio.create_task(self._run(), name="authhook-change-listener")
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(5):
                await self.listening.wait()

    async def stop(self) -> None:
        self._cancel_lease()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        await self._close_conn()

    async def _close_conn(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None and not conn.is_closed():
            conn.terminate()

    async def _run(self) -> None:
        backoff = 0.05
        while True:
            try:
                conn = await self._store.connect_raw()
                self._conn = conn
                self._lost.clear()
                conn.add_termination_listener(lambda _conn: self._lost.set())
                started = asyncio.get_running_loop().time()
                await conn.add_listener(self._store.channel, self._on_notify)
                self._renew_lease(started)
                self._store.board.resume()
                self.listening.set()
                log.info("listening for changes on %s", self._store.channel)
                backoff = 0.05
                await self._watch(conn)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # any failure to listen is the same: suspend and retry
                log.warning("change listener unavailable: %s", exc)
            self._cancel_lease()
            self.listening.clear()
            self._store.board.suspend()
            await self._close_conn()
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 2.0)

    async def _watch(self, conn: Conn) -> None:
        """Return when the listening connection is gone (terminated, failing its probe, lease run out).

        The lease runs per probe: from the moment a probe is sent, its answer must be back within
        ``listen_lease_s`` (``_on_probe_overdue``). Time the event loop spends stalled before sending a probe
        does not count, and cannot hurt: a stalled loop serves no decision at all, cached or not. A probe has
        no timeout of its own, since how long its answer takes to be *processed* says as much about this
        process's loop as about the feed.
        """
        check = self._store._listen_check
        loop = asyncio.get_running_loop()
        lost = asyncio.ensure_future(self._lost.wait())
        try:
            while not self._lost.is_set():
                done, _ = await asyncio.wait({lost}, timeout=check)
                if done:
                    return
                sent = loop.time()
                probe = asyncio.ensure_future(conn.fetchval("SELECT 1"))
                self._expiry = loop.call_at(sent + self._store._listen_lease, self._on_probe_overdue, sent)
                done, _ = await asyncio.wait({probe, lost}, return_when=asyncio.FIRST_COMPLETED)
                if probe not in done:
                    probe.cancel()
                    return
                probe.result()  # a failed probe raises: the connection is gone, reconnect
                self._renew_lease(sent)
        finally:
            lost.cancel()

    def _renew_lease(self, proven_at: float) -> None:
        """Everything committed before ``proven_at`` has reached us (the probe sent then was answered)."""
        self._cancel_lease()
        self._proven_at = max(self._proven_at, proven_at)

    def _cancel_lease(self) -> None:
        if self._expiry is not None:
            self._expiry.cancel()
            self._expiry = None

    def _on_probe_overdue(self, sent: float) -> None:
        """The probe sent at ``sent`` is not answered a lease later - or its answer is waiting to be read.

        The loop may have been stalled for the whole lease with the answer in the socket; so before calling
        the feed lost, let it run ``CONFIRM_ITERATIONS`` iterations, enough to read that answer and renew.
        Only a probe still unanswered then proves the feed gone.
        """
        self._expiry = None
        self._confirm_overdue(sent, CONFIRM_ITERATIONS)

    def _confirm_overdue(self, sent: float, iterations_left: int) -> None:
        if self._proven_at >= sent or self._lost.is_set():
            return  # answered meanwhile (or already being reconnected)
        if iterations_left:
            self._expiry = asyncio.get_running_loop().call_soon(self._confirm_overdue, sent, iterations_left - 1)
            return
        self._expiry = None
        self.lease_expired += 1
        log.warning(
            "a change-feed probe went unanswered for %s s: caching stops until the feed is back",
            self._store._listen_lease,
        )
        self._store.board.suspend()
        self._lost.set()  # the watcher reconnects

    def _on_notify(self, _conn: object, _pid: int, _channel: str, payload: object) -> None:
        try:
            change = json.loads(str(payload))
            slots = [int(s) for s in change["slots"]]
            if not all(0 < slot <= SLOT_COUNT for slot in slots):
                raise ValueError("slot out of range")
        except (ValueError, KeyError, TypeError):
            log.error("unreadable change notification; dropping every cached decision")
            self._store.board.invalidate_all()
            return
        self.received += 1
        if "sent" in change:
            self.lags_ms.append((time.time() - float(change["sent"])) * 1000)
        if change.get("origin") == self._store.instance:
            return  # our own write: the board already moved around its transaction
        with self._store.board.writing(slots, exclusive=False):
            pass
