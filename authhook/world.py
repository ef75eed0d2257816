"""The import file: a whole world (tenants and everything inside them) in YAML or JSON.

Everything is nested under its tenant, so a file cannot even express a reference across tenants.
Secrets in the file are hashed on import and never written back out. See README "World file".
Tenant and channel ids (topic levels, so no `.`) are checked as the file is read: a file naming a bad one is
refused whole, before anything is written.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from authhook.credentials import SecretHasher
from authhook.errors import InvalidInput
from authhook.models import Action
from authhook.store.base import (
    AssigneeKind,
    Assignment,
    Block,
    Channel,
    Connection,
    Group,
    GroupKind,
    Role,
    Store,
    SubjectKind,
    SubjectRecord,
    Tenant,
    TopicLevelId,
)


class _Spec(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class ClientSpec(_Spec):
    id: str
    name: str = ""
    secret: str | None = Field(default=None, description="plain secret; hashed on import")
    secret_hash: str | None = Field(default=None, description="an `hmac-sha256$...` hash from an export")
    enabled: bool = True

    @model_validator(mode="after")
    def _one_secret(self) -> ClientSpec:
        if (self.secret is None) == (self.secret_hash is None):
            raise ValueError(f"client `{self.id}` needs exactly one of `secret` or `secret_hash`")
        return self


class UserSpec(_Spec):
    id: str
    name: str = ""
    password: str | None = None
    password_hash: str | None = None
    enabled: bool = True

    @model_validator(mode="after")
    def _one_password(self) -> UserSpec:
        if (self.password is None) == (self.password_hash is None):
            raise ValueError(f"user `{self.id}` needs exactly one of `password` or `password_hash`")
        return self


class ChannelSpec(_Spec):
    id: TopicLevelId  # a topic level: no `.` (see README "World file")
    name: str = ""


class ConnectionSpec(_Spec):
    client: str
    channel: str
    actions: list[Action] = [Action.PUBLISH, Action.SUBSCRIBE]


class GroupSpec(_Spec):
    id: str
    kind: GroupKind
    name: str = ""
    parent: str | None = None
    members: list[str] = []


class BlockSpec(_Spec):
    id: str | None = None
    scope: str | dict[str, str] = Field(description="`tenant`, or one of {channel|channel_group|topic: ref}")
    actions: list[Action]
    effect: str = "allow"

    def to_block(self, index: int) -> Block:
        if isinstance(self.scope, str):
            kind, ref = self.scope, None
        elif len(self.scope) == 1:
            ((kind, ref),) = self.scope.items()
        else:
            raise ValueError("a block scope names exactly one of channel, channel_group, topic")
        return Block(
            id=self.id or f"b{index}",
            scope=kind,
            ref=ref,
            actions=frozenset(self.actions),
            effect=self.effect,
        )


class RoleSpec(_Spec):
    id: str
    name: str = ""
    blocks: list[BlockSpec] = []
    assign: list[str] = Field(default=[], description="subject ids, or `group:<id>` for subject groups")


class TenantSpec(_Spec):
    id: TopicLevelId  # a topic level: no `.` (see README "World file")
    name: str = ""
    enabled: bool = True
    clients: list[ClientSpec] = []
    users: list[UserSpec] = []
    channels: list[ChannelSpec] = []
    connections: list[ConnectionSpec] = []
    groups: list[GroupSpec] = []
    roles: list[RoleSpec] = []


class World(_Spec):
    tenants: list[TenantSpec] = []


def load_world(path: str | Path) -> World:
    """A world file (YAML, or JSON by its ``.json`` suffix), validated; ``InvalidInput`` says what is wrong."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise InvalidInput(f"cannot read `{path}`: {exc.strerror}") from exc
    try:
        data: Any = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as exc:
        raise InvalidInput(f"`{path}` is not valid {'JSON' if path.suffix == '.json' else 'YAML'}: {exc}") from exc
    try:
        return World.model_validate(data or {})
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise InvalidInput(f"`{path}`: {where}: {first['msg']}") from exc


async def import_world(store: Store, hasher: SecretHasher, world: World) -> dict[str, int]:
    """Create or update everything in ``world`` in one transaction; returns how many of each kind were written.

    One file, one transaction: an entity that fails late in the file (a bad block, a reference to another
    tenant's subject) leaves nothing of the file behind.
    """
    counts = dict.fromkeys(("tenants", "clients", "users", "channels", "connections", "groups", "roles"), 0)
    try:
        async with store.batch():
            await _import(store, hasher, world, counts)
    except ValidationError as exc:
        first = exc.errors()[0]
        raise InvalidInput(f"{'.'.join(str(p) for p in first['loc']) or 'value'}: {first['msg']}") from exc
    except ValueError as exc:
        raise InvalidInput(str(exc)) from exc
    return counts


async def _import(store: Store, hasher: SecretHasher, world: World, counts: dict[str, int]) -> None:
    for t in world.tenants:
        await store.put_tenant(Tenant(id=t.id, name=t.name, enabled=t.enabled))
        counts["tenants"] += 1
        for c in t.clients:
            stored = c.secret_hash or hasher.hash_client_secret(c.secret or "")
            record = SubjectRecord(id=c.id, tenant=t.id, kind=SubjectKind.CLIENT, name=c.name, enabled=c.enabled)
            await store.put_subject(record, stored)
            counts["clients"] += 1
        for u in t.users:
            # argon2 is slow on purpose (~0.1 s): off the event loop, so a server importing keeps answering
            password_hash = u.password_hash
            if not password_hash:
                password_hash = await asyncio.to_thread(hasher.hash_password, u.password or "")
            record = SubjectRecord(id=u.id, tenant=t.id, kind=SubjectKind.USER, name=u.name, enabled=u.enabled)
            await store.put_subject(record, password_hash)
            counts["users"] += 1
        for ch in t.channels:
            await store.put_channel(Channel(id=ch.id, tenant=t.id, name=ch.name))
            counts["channels"] += 1
        for cn in t.connections:
            await store.connect(
                Connection(tenant=t.id, client=cn.client, channel=cn.channel, actions=frozenset(cn.actions))
            )
            counts["connections"] += 1
        # Parents before children, so nesting can be declared in any order.
        for g in _parents_first(t.groups):
            await store.put_group(Group(id=g.id, tenant=t.id, kind=g.kind, name=g.name, parent=g.parent))
            counts["groups"] += 1
        for g in t.groups:
            for member in g.members:
                await store.add_member(t.id, g.id, member)
        for r in t.roles:
            blocks = tuple(b.to_block(i) for i, b in enumerate(r.blocks, start=1))
            await store.put_role(Role(id=r.id, tenant=t.id, name=r.name, blocks=blocks))
            for assignee in r.assign:
                kind, _, ref = assignee.partition(":") if assignee.startswith("group:") else ("", "", assignee)
                await store.assign(
                    Assignment(
                        tenant=t.id,
                        role=r.id,
                        assignee_kind=AssigneeKind.GROUP if kind == "group" else AssigneeKind.SUBJECT,
                        assignee=ref,
                    )
                )
            counts["roles"] += 1


def _parents_first(groups: list[GroupSpec]) -> list[GroupSpec]:
    by_id = {g.id: g for g in groups}
    ordered: list[GroupSpec] = []
    seen: set[str] = set()

    def visit(group: GroupSpec, path: tuple[str, ...]) -> None:
        if group.id in seen:
            return
        if group.id in path:
            raise InvalidInput(f"group `{group.id}` nests inside itself")
        parent = by_id.get(group.parent) if group.parent else None
        if parent is not None:
            visit(parent, (*path, group.id))
        seen.add(group.id)
        ordered.append(group)

    for group in groups:
        visit(group, ())
    return ordered
