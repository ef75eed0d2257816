"""The store contract: entities, the facts an evaluator needs for one decision, and the Store protocol.

Every backend (SQLite here, PostgreSQL later) implements ``Store`` and passes one contract suite.
Evaluators never run SQL: they ask for ``Facts`` - everything about one (subject, channel) pair in one
call - so a backend can answer with a handful of indexed lookups (or one round trip) and the policy
logic stays in the evaluators.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import AbstractAsyncContextManager, contextmanager
from contextvars import ContextVar
from enum import StrEnum
from typing import Annotated, NamedTuple, Protocol, runtime_checkable

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic_core import PydanticCustomError

from authhook.models import Action, ActionSet
from authhook.revision import RevisionBoard
from authhook.topics import TopicError, validate_identity, validate_topic_filter

_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._:@-]{0,127}$"

# Tenant and channel ids are levels of topics (the topic template puts them there), and a broker may rewrite
# topics: RabbitMQ's MQTT plugin maps `/` to `.` and `+` to `*`. A `.` in one of them would make two topics
# one routing key (tenant `a.c`'s `m/a.c/c/x` and tenant `a`'s channel `c`, subtopic `x`), so these ids may
# not hold `.`; `*` (RabbitMQ's `+`), `+`, `#`, `/` and NUL are outside _ID_PATTERN already. Group, role,
# block and subject ids never stand in a topic level and keep `.` (`alice@acme.example`).
TOPIC_LEVEL_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_:@-]{0,127}$"
_WHY_NO_DOT = "RabbitMQ maps `/` to `.`, so `a.c` and `a/c` would be one routing key"
DOTTED_ID_RULE = f"tenant and channel ids cannot contain `.`: {_WHY_NO_DOT}"
_TOPIC_LEVEL_ID = re.compile(TOPIC_LEVEL_ID_PATTERN)
_ANY_ID = re.compile(_ID_PATTERN)
_dotted_ids_readable: ContextVar[bool] = ContextVar("authhook_dotted_ids_readable", default=False)


def is_topic_level_id(value: str) -> bool:
    """Could ``value`` be a tenant or channel id (and so stand alone in a topic level)?"""
    return _TOPIC_LEVEL_ID.match(value) is not None


def _topic_level_id(value: str) -> str:
    if _TOPIC_LEVEL_ID.match(value):
        return value
    if "." in value and _ANY_ID.match(value):
        if _dotted_ids_readable.get():
            return value
        raise PydanticCustomError(
            "dotted_id", f"tenant and channel ids cannot contain `.` (got `{{value}}`): {_WHY_NO_DOT}", {"value": value}
        )
    raise PydanticCustomError(
        "topic_level_id",
        "`{value}` is not a tenant or channel id: letters, digits and `_:@-`, starting with a letter or digit, "
        "at most 128 characters",
        {"value": value if len(value) <= 60 else value[:60] + "..."},
    )


TopicLevelId = Annotated[str, AfterValidator(_topic_level_id)]


@contextmanager
def dotted_ids_readable() -> Iterator[None]:
    """Within this block, tenant and channel ids stored before the no-`.` rule load instead of failing
    validation, so ``authhook serve`` can name them when it refuses to start. Only for reading them."""
    token = _dotted_ids_readable.set(True)
    try:
        yield
    finally:
        _dotted_ids_readable.reset(token)


class SubjectKind(StrEnum):
    CLIENT = "client"
    USER = "user"


class GroupKind(StrEnum):
    SUBJECTS = "subjects"
    CHANNELS = "channels"


class ScopeKind(StrEnum):
    """What a permission block covers, always inside the role's own tenant (except ``topic``)."""

    TENANT = "tenant"  # every channel of the tenant
    CHANNEL = "channel"  # one channel
    CHANNEL_GROUP = "channel_group"  # every channel in a channel group or its subgroups
    TOPIC = "topic"  # a broker system topic filter such as `$SYS/#`; no tenant data lives there


class Effect(StrEnum):
    ALLOW = "allow"
    DENY = "deny"


class _Entity(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class Tenant(_Entity):
    id: TopicLevelId
    name: str = ""
    enabled: bool = True


class SubjectRecord(_Entity):
    """A client (device) or user; ids share one namespace because brokers only send a username."""

    id: str
    tenant: TopicLevelId
    kind: SubjectKind
    name: str = ""
    enabled: bool = True

    @field_validator("id")
    @classmethod
    def _identity(cls, value: str) -> str:
        try:
            validate_identity(value, "subject id")
        except TopicError as exc:
            raise ValueError(str(exc)) from None
        return value


class Channel(_Entity):
    id: TopicLevelId
    tenant: TopicLevelId
    name: str = ""


class Connection(_Entity):
    tenant: str
    client: str
    channel: str
    actions: frozenset[Action]

    @field_validator("actions")
    @classmethod
    def _pub_sub_only(cls, value: frozenset[Action]) -> frozenset[Action]:
        if not value or Action.CONNECT in value:
            raise ValueError("a connection carries `publish` and/or `subscribe`")
        return value


class Group(_Entity):
    id: str = Field(pattern=_ID_PATTERN)
    tenant: str
    kind: GroupKind
    name: str = ""
    parent: str | None = None


class Block(_Entity):
    """One permission block of a role: scope, actions, effect."""

    id: str = Field(pattern=_ID_PATTERN)
    scope: ScopeKind
    ref: str | None = None  # channel id, channel group id, or topic filter; None for tenant scope
    actions: frozenset[Action]
    effect: Effect = Effect.ALLOW

    @model_validator(mode="after")
    def _scope_ref(self) -> Block:
        if self.scope is ScopeKind.TENANT:
            if self.ref is not None:
                raise ValueError("a tenant-scoped block takes no ref")
        elif not self.ref:
            raise ValueError(f"a `{self.scope}` block needs a ref")
        if self.scope is ScopeKind.TOPIC:
            assert self.ref is not None
            try:
                validate_topic_filter(self.ref)
            except TopicError as exc:
                raise ValueError(str(exc)) from None
            if not self.ref.startswith("$") or self.ref.startswith("$share/"):
                # Topics outside the channel namespace are shared by all tenants; only broker system
                # topics carry no tenant messages, so only they may be granted by raw filter.
                raise ValueError("topic blocks may only name broker system topics (starting with `$`)")
        if not self.actions:
            raise ValueError("a block needs at least one action")
        return self

    @property
    def action_bits(self) -> ActionSet:
        return ActionSet.of(self.actions)


class Role(_Entity):
    id: str = Field(pattern=_ID_PATTERN)
    tenant: str
    name: str = ""
    blocks: tuple[Block, ...] = ()


class AssigneeKind(StrEnum):
    SUBJECT = "subject"
    GROUP = "group"


class Assignment(_Entity):
    tenant: str
    role: str
    assignee_kind: AssigneeKind
    assignee: str


# -- facts for one decision --------------------------------------------------------------------------


class BlockFact(NamedTuple):
    role: str
    block: str
    scope: ScopeKind
    ref: str | None
    actions: int
    effect: Effect


class SubjectFact(NamedTuple):
    id: str
    tenant: str
    kind: SubjectKind
    enabled: bool
    tenant_enabled: bool


class Facts(NamedTuple):
    """What the store knows that bears on one (subject, tenant, channel) question."""

    revision: int
    subject: SubjectFact | None
    blocks: tuple[BlockFact, ...] = ()  # blocks of every role assigned to the subject or its groups
    channel_exists: bool = False
    channel_groups: tuple[str, ...] = ()  # transitive; only filled when some block needs them
    connection: int = 0  # ActionSet bits of the subject's connection to the channel


class GrantFacts(NamedTuple):
    """Everything bearing on what one subject may do anywhere, for answers that list it all up front
    (EMQX's session ACL): its connections, its blocks, and the channels of every channel group they name."""

    subject: SubjectFact
    connections: tuple[tuple[str, int], ...]  # (channel, ActionSet bits)
    blocks: tuple[BlockFact, ...]
    group_channels: dict[str, tuple[str, ...]]  # channel group -> channels in it or its subgroups


class Credential(NamedTuple):
    """What authentication needs; the hash never leaves the store layer except to be compared."""

    subject: SubjectFact
    stored_hash: str


@runtime_checkable
class Store(Protocol):
    """Persistence for the authorization model. All writes bump the revision board before committing."""

    board: RevisionBoard

    async def open(self) -> None: ...
    async def close(self) -> None: ...
    async def ping(self) -> None: ...
    async def revision(self) -> int: ...

    # reads for decisions
    async def facts(self, subject: str, tenant: str | None, channel: str | None) -> Facts: ...
    async def credential(self, subject: str) -> Credential | None: ...
    async def grant_facts(self, subject: str) -> GrantFacts | None: ...

    # revocation: exactly one instance of a fleet acts on each change
    async def claim_revocation(self, subject: str, allowed_since: int, revision: int) -> bool:
        """Claim the closing of ``subject``'s live sessions for the change seen at ``revision``.

        False when any instance already claimed it at a revision >= ``allowed_since`` (the oldest store
        revision at which the caller granted something now denied): the sessions that got those grants were
        closed then. Check and insert are one serialized step, so two instances never both act.
        """
        ...

    # writes
    def batch(self) -> AbstractAsyncContextManager[None]:
        """``async with store.batch():`` - the writes inside commit together or not at all (one revision)."""
        ...

    async def put_tenant(self, tenant: Tenant) -> None: ...
    async def delete_tenant(self, tenant: str) -> None: ...
    async def put_subject(self, subject: SubjectRecord, credential_hash: str) -> None: ...
    async def set_subject_enabled(self, subject: str, enabled: bool) -> None: ...
    async def delete_subject(self, subject: str) -> None: ...
    async def put_channel(self, channel: Channel) -> None: ...
    async def delete_channel(self, tenant: str, channel: str) -> None: ...
    async def connect(self, connection: Connection) -> None: ...
    async def disconnect(self, tenant: str, client: str, channel: str, actions: frozenset[Action]) -> None: ...
    async def put_group(self, group: Group) -> None: ...
    async def delete_group(self, tenant: str, group: str) -> None: ...
    async def add_member(self, tenant: str, group: str, member: str) -> None: ...
    async def remove_member(self, tenant: str, group: str, member: str) -> None: ...
    async def put_role(self, role: Role) -> None: ...
    async def delete_role(self, tenant: str, role: str) -> None: ...
    async def assign(self, assignment: Assignment) -> None: ...
    async def unassign(self, assignment: Assignment) -> None: ...

    # listings (CLI, API)
    async def list_tenants(self) -> list[Tenant]: ...
    async def list_subjects(self, tenant: str | None = None) -> list[SubjectRecord]: ...
    async def list_channels(self, tenant: str | None = None) -> list[Channel]: ...
    async def list_connections(self, tenant: str | None = None) -> list[Connection]: ...
    async def list_groups(self, tenant: str | None = None) -> list[tuple[Group, list[str]]]: ...
    async def list_roles(self, tenant: str | None = None) -> list[tuple[Role, list[Assignment]]]: ...
