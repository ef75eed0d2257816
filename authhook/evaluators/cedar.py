"""The Cedar evaluator: the in-house channel model written as Cedar policies (``policy/cedar/``).

Parsed once, reused. The policy text and schema become cedarpy ``PolicySet``/``Schema`` handles at
construction. The entities are the store's model as a Cedar graph, one cedarpy ``Entities`` handle per
tenant - the tenant, its roles and blocks, subject groups and channel groups (nested, as trees), channels,
clients and users with their connections - built by the first decision that needs the tenant, validated
against the schema then (never per request), and reused by every later decision. Each graph is stamped
with the tenant's slot on the store's revision board. When a write moves the slot, the next decision about
the tenant reads it again (the store's ``list_*``) and compares it with the graph entity by entity: if
nothing Cedar sees changed the handle is kept; if entities were only added, just those are parsed and
added to the handle (``Entities.with_added_json_str``); otherwise that one tenant is parsed again (cedarpy
4.12 cannot replace or remove an entity in a handle). Instead of the store, the entities may come from a
Cedar JSON entities file, parsed once.

Per call only the request's own facts go to Cedar: the principal's and the resource's uids and a small
context (the claimed tenant, the topic, the tenant it names, and for ``$`` topics the topic blocks whose
filters overlap or cover it - MQTT topic matching, which Cedar cannot express). Cedar decides everything
else: enablement, the claimed tenant, tenant isolation, unknown channels, deny blocks (a wildcard channel
level included), connections, allow blocks, and default deny. Only a subject that is not in the store is
answered without Cedar (there is no principal to ask about). The verdict's ``decided_by`` lists the ids of
the policies that decided, ranked in the in-house order (the first gives the reason code), followed by the
block that made a block policy hold.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import cedarpy

from authhook.errors import EvaluatorUnavailable
from authhook.evaluators import cedar_call
from authhook.evaluators.wording import describe
from authhook.models import Action, AuthzRequest, Reason, Target, Verdict
from authhook.policy_files import reference_policy
from authhook.revision import tenant_slot
from authhook.store.base import (
    AssigneeKind,
    Assignment,
    Channel,
    Connection,
    Effect,
    Group,
    GroupKind,
    Role,
    ScopeKind,
    Store,
    SubjectKind,
    SubjectRecord,
    Tenant,
)
from authhook.topics import filter_covers, filters_overlap, topic_matches

NAME = "cedar"
DEFAULT_POLICIES = reference_policy("cedar", "authhook.cedar")
DEFAULT_SCHEMA = reference_policy("cedar", "authhook.cedarschema")

# Policy ids (their @id annotations) and what they mean, in the in-house evaluator's order: when several
# forbid (or permit) policies are satisfied, the first one in this order names the reason.
FORBID_ORDER: tuple[tuple[str, Reason], ...] = (
    ("forbid-claimed-tenant", Reason.WRONG_TENANT),
    ("forbid-tenant-disabled", Reason.TENANT_DISABLED),
    ("forbid-subject-disabled", Reason.SUBJECT_DISABLED),
    ("forbid-cross-tenant", Reason.WRONG_TENANT),
    ("forbid-unknown-channel", Reason.UNKNOWN_CHANNEL),
    ("forbid-deny-block", Reason.DENIED_BY_BLOCK),
    ("forbid-wildcard-deny", Reason.DENIED_BY_BLOCK),
    ("forbid-topic-deny-block", Reason.DENIED_BY_BLOCK),
)
PERMIT_ORDER: tuple[tuple[str, Reason], ...] = (
    ("permit-connect", Reason.SUBJECT_ACTIVE),
    ("permit-connection", Reason.CONNECTED),
    ("permit-allow-block", Reason.ROLE_GRANT),
    ("permit-topic-allow-block", Reason.ROLE_GRANT),
)
# No policy was satisfied: Cedar's default deny, named after the kind of resource.
DEFAULT_DENY: dict[str, Reason] = {
    "Channel": Reason.NOT_CONNECTED,
    "Tenant": Reason.WILDCARD_TOO_BROAD,  # a wildcard channel level; connect is permitted unless forbidden
    "SystemTopic": Reason.SYSTEM_TOPIC,
}
# The principal attribute each block policy reads, by action: the prefix, then the action, capitalized.
_BLOCK_POLICIES: dict[str, str] = {
    "forbid-deny-block": "deny",
    "forbid-wildcard-deny": "deny",
    "forbid-topic-deny-block": "denyTopic",
    "permit-allow-block": "allow",
    "permit-topic-allow-block": "allowTopic",
}
_SET_ATTRS = tuple(
    f"{prefix}{action.value.capitalize()}"
    for prefix in ("allow", "deny", "allowTopic", "denyTopic")
    for action in Action
    if action is not Action.CONNECT or prefix == "deny"
)
_ORDER = {policy: reason for policy, reason in FORBID_ORDER + PERMIT_ORDER}
_RANK = {policy: rank for rank, (policy, _) in enumerate(FORBID_ORDER + PERMIT_ORDER)}
_quote = json.encoder.encode_basestring_ascii  # a JSON string literal, as json.dumps writes it
_PRINCIPAL_TYPE = {SubjectKind.CLIENT: "Client", SubjectKind.USER: "User"}
_ACTION_UID = {action: {"type": "Action", "id": action.value} for action in Action}

Uid = tuple[str, str]  # (entity type, entity id)
Json = dict[str, Any]


def _uid(kind: str, id_: str) -> dict[str, str]:
    return {"type": kind, "id": id_}


def _ref(kind: str, id_: str) -> dict[str, dict[str, str]]:
    return {"__entity": {"type": kind, "id": id_}}


def _uid_of(value: Any) -> Uid | None:
    """An entity reference in Cedar JSON (``{"__entity": {...}}`` or the bare ``{"type", "id"}`` form)."""
    if isinstance(value, dict):
        value = value.get("__entity", value)
    if isinstance(value, dict):
        kind, id_ = value.get("type"), value.get("id")
        if isinstance(kind, str) and isinstance(id_, str):
            return kind, id_
    return None


def block_uid(tenant: str, role: str, block: str) -> str:
    return f"{tenant}/role:{role}/block:{block}"


def block_label(uid: str) -> str:
    """How verdicts name a block: its id without the tenant (``role:<role>/block:<block>``, as in-house)."""
    return uid.partition("/")[2] or uid


# -- the graph: one cedarpy Entities handle and the index Python needs beside it -----------------------


class Principal(NamedTuple):
    """A subject as the graph has it: its uid, its tenant, and its block sets (to name the deciding block)."""

    uid: dict[str, str]
    tenant: str
    blocks: dict[str, tuple[str, ...]]  # set attribute (``denyPublish``...) -> block ids, in graph order


@dataclass(slots=True, eq=False)
class EntityGraph:
    """A parsed entity set and what the evaluator reads beside it; replaced, never mutated, on refresh."""

    handle: cedarpy.Entities
    entities: dict[Uid, Json]  # what the handle was parsed from, by uid
    principals: dict[str, Principal]
    parents: dict[Uid, tuple[Uid, ...]]
    topic_blocks: tuple[tuple[str, str], ...]  # (TopicBlock id, filter)
    revision: int = 0  # the store revision the graph was read at (the verdicts' revision)
    stamp: int = -1  # the tenant's revision-board slot value it reflects; -1: read it again before use
    slot: int = 0  # the tenant's revision-board slot

    def ancestors(self, uid: Uid) -> set[Uid]:
        seen: set[Uid] = set()
        todo = list(self.parents.get(uid, ()))
        while todo:
            node = todo.pop()
            if node not in seen:
                seen.add(node)
                todo.extend(self.parents.get(node, ()))
        return seen


@dataclass(slots=True)
class GraphStats:
    """What keeping graphs up to date has cost so far (tests and the bench read it)."""

    full_parses: int = 0  # a tenant (or the entities file) parsed whole
    delta_parses: int = 0  # only new entities parsed, added to the tenant's handle
    unchanged: int = 0  # the slot moved but nothing Cedar sees changed: the handle was kept
    reads: int = 0  # tenants read from the store


def _index(
    entities: Iterable[Json],
    principals: dict[str, Principal],
    parents: dict[Uid, tuple[Uid, ...]],
    topic_blocks: list[tuple[str, str]],
) -> None:
    """Add what Python needs to know about ``entities`` to the three indexes."""
    for entity in entities:
        uid = _uid_of(entity.get("uid"))
        if uid is None:
            continue
        edges = tuple(p for p in map(_uid_of, entity.get("parents", ())) if p is not None)
        if edges:
            parents[uid] = edges
        attrs = entity.get("attrs") or {}
        kind, id_ = uid
        if kind in ("Client", "User"):
            tenant = _uid_of(attrs.get("tenant"))
            blocks = {
                attr: tuple(r[1] for r in map(_uid_of, attrs[attr]) if r is not None)
                for attr in _SET_ATTRS
                if isinstance(attrs.get(attr), list)
            }
            principals[id_] = Principal(_uid(kind, id_), tenant[1] if tenant else "", blocks)
        elif kind == "TopicBlock" and isinstance(attrs.get("filter"), str):
            topic_blocks.append((id_, attrs["filter"]))


def tenant_entities(
    tenant: Tenant,
    subjects: Sequence[SubjectRecord],
    channels: Sequence[Channel],
    connections: Sequence[Connection],
    groups: Sequence[tuple[Group, list[str]]],
    roles: Sequence[tuple[Role, list[Assignment]]],
) -> list[Json]:
    """One tenant of the store as Cedar entities (the schema is ``policy/cedar/authhook.cedarschema``).

    Coverage is the hierarchy: a tenant-scope block is a parent of the ``Tenant``, a channel-scope block of
    the ``Channel`` it names, a channel-group block of the ``ChannelGroup``; a channel is a child of its
    tenant and of its channel groups, a group of its parent group. A subject is a child of its subject
    groups and of the roles assigned to it, a subject group of its parent and of its roles. A subject's
    block sets hold the blocks of every role it holds directly or through a subject group or its ancestors.
    """
    t = tenant.id
    tenant_uid = _uid("Tenant", t)
    channel_ids = {c.id for c in channels}
    subject_groups = {g.id: g for g, _ in groups if g.kind is GroupKind.SUBJECTS}
    channel_groups = {g.id: g for g, _ in groups if g.kind is GroupKind.CHANNELS}
    member_of: dict[str, list[str]] = {}  # subject or channel -> the groups it is a direct member of
    for group, members in groups:
        for member in members:
            member_of.setdefault(member, []).append(group.id)
    roles_of: dict[tuple[AssigneeKind, str], list[str]] = {}
    for role, assignments in roles:
        for a in assignments:
            roles_of.setdefault((a.assignee_kind, a.assignee), []).append(role.id)

    entities: list[Json] = []
    covering: dict[tuple[ScopeKind, str | None], list[dict[str, str]]] = {}  # what a block names -> blocks
    # (set attribute prefix, action, block ref) for every block of every role, by role
    grants: dict[str, list[tuple[str, Action, dict[str, dict[str, str]]]]] = {}
    for role, _ in roles:
        entities.append({"uid": _uid("Role", f"{t}/{role.id}"), "attrs": {}, "parents": []})
        listed = grants[role.id] = []
        for block in role.blocks:
            uid = block_uid(t, role.id, block.id)
            effect = "allow" if block.effect is Effect.ALLOW else "deny"
            if block.scope is ScopeKind.TOPIC:
                entities.append({"uid": _uid("TopicBlock", uid), "attrs": {"filter": block.ref}, "parents": []})
                ref = _ref("TopicBlock", uid)
                effect += "Topic"
            else:
                entities.append({"uid": _uid("Block", uid), "attrs": {}, "parents": []})
                covering.setdefault((block.scope, block.ref), []).append(_uid("Block", uid))
                ref = _ref("Block", uid)
            # an allow never matters for connect (it is allowed unless denied), nor a topic block
            listed += [
                (effect, action, ref)
                for action in Action
                if action in block.actions and (action is not Action.CONNECT or effect == "deny")
            ]

    tenant_attrs = {"id": t, "enabled": tenant.enabled}
    entities.append({"uid": tenant_uid, "attrs": tenant_attrs, "parents": covering.get((ScopeKind.TENANT, None), [])})
    for group in channel_groups.values():
        parents = [_uid("ChannelGroup", f"{t}/{group.parent}")] if group.parent in channel_groups else []
        parents += covering.get((ScopeKind.CHANNEL_GROUP, group.id), [])
        entities.append({"uid": _uid("ChannelGroup", f"{t}/{group.id}"), "attrs": {}, "parents": parents})
    for channel in channels:
        parents = [tenant_uid]
        parents += [_uid("ChannelGroup", f"{t}/{g}") for g in member_of.get(channel.id, ()) if g in channel_groups]
        parents += covering.get((ScopeKind.CHANNEL, channel.id), [])
        entities.append({"uid": _uid("Channel", f"{t}/{channel.id}"), "attrs": {}, "parents": parents})
    for group in subject_groups.values():
        parents = [_uid("SubjectGroup", f"{t}/{group.parent}")] if group.parent in subject_groups else []
        parents += [_uid("Role", f"{t}/{r}") for r in roles_of.get((AssigneeKind.GROUP, group.id), ())]
        entities.append({"uid": _uid("SubjectGroup", f"{t}/{group.id}"), "attrs": {}, "parents": parents})

    def held_through(direct: list[str]) -> list[str]:
        """The roles of the subject groups given and of all their ancestors."""
        seen: set[str] = set()
        held: list[str] = []
        todo = list(direct)
        while todo:
            g = todo.pop()
            if g in seen:
                continue
            seen.add(g)
            held += roles_of.get((AssigneeKind.GROUP, g), ())
            parent = subject_groups[g].parent
            if parent is not None and parent in subject_groups:
                todo.append(parent)
        return held

    connected: dict[tuple[str, Action], list[Json]] = {}
    for connection in connections:
        if connection.channel in channel_ids:
            ref = _ref("Channel", f"{t}/{connection.channel}")
            for action in connection.actions:
                connected.setdefault((connection.client, action), []).append(ref)
    ref_tenant = {"__entity": tenant_uid}
    for subject in subjects:
        direct_groups = [g for g in member_of.get(subject.id, ()) if g in subject_groups]
        direct_roles = roles_of.get((AssigneeKind.SUBJECT, subject.id), [])
        attrs: Json = {"tenant": ref_tenant, "enabled": subject.enabled}
        held = sorted(set(direct_roles).union(held_through(direct_groups))) if direct_groups or direct_roles else ()
        for role_id in held:
            for effect, action, ref in grants.get(role_id, ()):
                attrs.setdefault(f"{effect}{action.value.capitalize()}", []).append(ref)
        if subject.kind is SubjectKind.CLIENT:
            for action, attr in ((Action.PUBLISH, "publishTo"), (Action.SUBSCRIBE, "subscribeTo")):
                if (subject.id, action) in connected:
                    attrs[attr] = connected[subject.id, action]
        parents = [_uid("SubjectGroup", f"{t}/{g}") for g in direct_groups]
        parents += [_uid("Role", f"{t}/{r}") for r in direct_roles]
        entities.append({"uid": _uid(_PRINCIPAL_TYPE[subject.kind], subject.id), "attrs": attrs, "parents": parents})
    return entities


async def read_tenant(store: Store, tenant: str) -> list[Json]:
    """The tenant's entities, read through the store's listings (none if there is no such tenant)."""
    found = [t for t in await store.list_tenants() if t.id == tenant]
    if not found:
        return []
    return tenant_entities(
        found[0],
        await store.list_subjects(tenant),
        await store.list_channels(tenant),
        await store.list_connections(tenant),
        await store.list_groups(tenant),
        await store.list_roles(tenant),
    )


# -- the evaluator -------------------------------------------------------------------------------


class CedarEvaluator:
    """``PolicyEvaluator`` backed by cedarpy, reproducing ``inhouse.decide`` allow/deny and reason codes."""

    name = NAME

    def __init__(
        self,
        store: Store,
        policies_path: Path | str = DEFAULT_POLICIES,
        schema_path: Path | str = DEFAULT_SCHEMA,
        *,
        entities_file: Path | str | None = None,
        validate_requests: bool = False,
    ) -> None:
        """Parse and validate the policies against the schema once; raises ``EvaluatorUnavailable``.

        ``entities_file``: a Cedar JSON entities file to decide on instead of the store's model (parsed and
        validated once, here). ``validate_requests`` also checks each request and its context against the
        schema (entities are validated once, when a graph is parsed, never per request).
        """
        self._store = store
        try:
            policy_text = Path(policies_path).read_text(encoding="utf-8")
            schema_file = Path(schema_path)
            schema_text = schema_file.read_text(encoding="utf-8")
            if schema_file.name.endswith(".json"):
                self._schema = cedarpy.Schema.from_json_str(schema_text)
            else:
                self._schema = cedarpy.Schema.from_str(schema_text)
            self._policies = cedarpy.PolicySet.from_str(policy_text)
            validation = cedarpy.validate_policies(policy_text, self._schema)
        except (OSError, ValueError) as exc:
            raise EvaluatorUnavailable(f"cannot load cedar policies `{policies_path}`: {exc}") from exc
        if not validation.validation_passed:
            errors = "; ".join(str(error) for error in validation.errors)
            raise EvaluatorUnavailable(f"cedar policies do not validate against the schema: {errors}")
        self._request_schema = self._schema if validate_requests else None
        # Cedar parses every context attribute on every call (~3 µs for the topic); the reference policies
        # never read `context.topic`, so it is sent only to policies that may, or when requests are validated
        # against the schema (where it is required).
        self._send_topic = validate_requests or may_read_context_topic(policy_text)
        self._authorize = cedar_call.authorizer()
        self.stats = GraphStats()
        self._graphs: dict[str, EntityGraph] = {}  # by tenant
        self._locks: dict[str, asyncio.Lock] = {}
        self._tenant_of: dict[str, str] = {}  # subject -> tenant, for subjects seen in a graph
        self._file: EntityGraph | None = None
        self._board_read: Callable[[int], int] = store.board.read if store is not None else lambda slot: -1
        if entities_file is not None:
            self._file = self._load_file(Path(entities_file))

    @property
    def policies(self) -> cedarpy.PolicySet:
        """The parsed ``cedarpy.PolicySet`` every call reuses."""
        return self._policies

    @property
    def schema(self) -> cedarpy.Schema:
        """The parsed ``cedarpy.Schema``."""
        return self._schema

    def graph(self, tenant: str | None = None) -> EntityGraph | None:
        """The graph decisions about ``tenant`` use now (the entities file's, if one was given)."""
        return self._file if self._file is not None else self._graphs.get(tenant or "")

    async def close(self) -> None:
        self._graphs.clear()
        self._locks.clear()
        self._tenant_of.clear()

    # -- graphs ----------------------------------------------------------------------------------

    def parse(self, entities: Iterable[Json], revision: int = 0, stamp: int = -1) -> EntityGraph:
        """A graph from Cedar JSON entities, parsed and validated against the schema once."""
        return self._build({uid: e for e in entities if (uid := _uid_of(e.get("uid"))) is not None}, revision, stamp)

    def _build(
        self,
        entities: dict[Uid, Json],
        revision: int,
        stamp: int,
        base: EntityGraph | None = None,
        tenant: str | None = None,
    ) -> EntityGraph:
        """Parse ``entities`` into a graph. Given the graph they replace (``base``): keep its handle if no
        entity changed, or parse only the new ones and add them to it if nothing else changed (cedarpy
        4.12 can add entities to a handle, but not replace or remove one: anything else is parsed whole).
        """
        slot = tenant_slot(tenant) if tenant is not None else 0
        if base is not None:
            old = base.entities
            if len(old) > len(entities) or any(entities.get(uid) != entity for uid, entity in old.items()):
                base = None
        principals: dict[str, Principal] = {}
        parents: dict[Uid, tuple[Uid, ...]] = {}
        topic_blocks: list[tuple[str, str]] = []
        try:
            if base is None:
                handle = cedarpy.Entities.from_json_str(json.dumps(list(entities.values())), self._schema)
                self.stats.full_parses += 1
                _index(entities.values(), principals, parents, topic_blocks)
            elif len(entities) == len(base.entities):
                self.stats.unchanged += 1
                return EntityGraph(
                    base.handle, base.entities, base.principals, base.parents, base.topic_blocks, revision, stamp, slot
                )
            else:
                added = [entity for uid, entity in entities.items() if uid not in base.entities]
                handle = base.handle.with_added_json_str(json.dumps(added), self._schema)
                self.stats.delta_parses += 1
                principals, parents, topic_blocks = dict(base.principals), dict(base.parents), [*base.topic_blocks]
                _index(added, principals, parents, topic_blocks)
        except ValueError as exc:
            raise EvaluatorUnavailable(f"cedar entities do not parse or validate: {exc}") from exc
        return EntityGraph(handle, entities, principals, parents, tuple(topic_blocks), revision, stamp, slot)

    def _load_file(self, path: Path) -> EntityGraph:
        try:
            entities = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise EvaluatorUnavailable(f"cannot read cedar entities `{path}`: {exc}") from exc
        if not isinstance(entities, list) or not all(isinstance(e, dict) for e in entities):
            raise EvaluatorUnavailable(f"cedar entities `{path}` must be a JSON list of entities")
        return self.parse(entities)

    async def _graph(self, tenant: str) -> EntityGraph:
        """The tenant's graph, refreshed first if its revision-board slot moved since it was read."""
        board = self._store.board
        slot = tenant_slot(tenant)
        graph = self._graphs.get(tenant)
        if graph is not None and board.read(slot) == graph.stamp:
            return graph
        async with self._locks.setdefault(tenant, asyncio.Lock()):  # one refresh per tenant at a time
            graph = self._graphs.get(tenant)
            if graph is not None and board.read(slot) == graph.stamp:
                return graph  # refreshed by the decision we waited for
            for _ in range(3):
                before = board.read(slot)
                revision = await self._store.revision()
                entities = await read_tenant(self._store, tenant)
                self.stats.reads += 1
                # Stamp the graph only if no write to this tenant began or ended while it was read. One
                # that did: read again. One still under way (odd slot), or a board that cannot hear other
                # instances' writes (suspended): leave it unstamped, so the next decision reads again.
                settled = before == board.read(slot) and before % 2 == 0 and not board.suspended
                if settled or before % 2 == 1 or board.suspended:
                    break
            by_uid = {uid: e for e in entities if (uid := _uid_of(e["uid"])) is not None}
            graph = self._build(by_uid, revision, before if settled else -1, graph, tenant)
            if by_uid:
                self._graphs[tenant] = graph
            else:  # no such tenant (any more)
                self._graphs.pop(tenant, None)
            for subject in graph.principals:
                self._tenant_of[subject] = tenant
            return graph

    async def _principal(self, key: str) -> tuple[EntityGraph, Principal] | int:
        """The graph holding subject ``key`` and its principal, or the store revision if there is none."""
        if self._file is not None:
            principal = self._file.principals.get(key)
            return (self._file, principal) if principal is not None else 0
        tenant = self._tenant_of.get(key)
        if tenant is not None:
            graph = await self._graph(tenant)
            principal = graph.principals.get(key)
            if principal is not None:
                return graph, principal
            self._tenant_of.pop(key, None)  # deleted since
        facts = await self._store.facts(key, None, None)
        if facts.subject is None:
            return facts.revision
        graph = await self._graph(facts.subject.tenant)
        principal = graph.principals.get(key)
        return (graph, principal) if principal is not None else graph.revision

    # -- deciding --------------------------------------------------------------------------------

    async def evaluate(self, request: AuthzRequest, target: Target, *, trace: list[str] | None = None) -> Verdict:
        key = request.subject.key
        if key is None:
            return _unknown_subject("request names no username or subject id", 0, trace)
        # the common case inline: a subject seen before, whose tenant's graph is still current
        graph = self._graphs.get(self._tenant_of.get(key, ""))
        if graph is None or self._board_read(graph.slot) != graph.stamp or key not in graph.principals:
            found = await self._principal(key)
            if isinstance(found, int):
                return _unknown_subject(f"no client or user `{key}`", found, trace)
            graph = found[0]
        return self.decide(request, target, graph, trace)

    def decide(
        self, request: AuthzRequest, target: Target, graph: EntityGraph, trace: list[str] | None = None
    ) -> Verdict:
        """Cedar's answer over ``graph``: a pure function of the request and the graph.

        Python only says what the request is about - the principal, the resource the topic names, the
        topic blocks whose filters match a ``$`` topic - and names the policies (and block) that decided.
        """
        key = request.subject.key or ""
        rev = graph.revision
        principal = graph.principals.get(key)
        if principal is None:
            return _unknown_subject(f"no client or user `{key}`", rev, trace)
        tenant = principal.tenant
        if trace is not None:
            trace.append(f"subject `{key}` is a {principal.uid['type']} of tenant `{tenant}`")
        action = request.action
        # The context goes to cedarpy as JSON text, built here; tenants in it are strings (see the schema).
        claimed = request.subject.tenant
        context = f',"claimedTenant":{_quote(claimed)}' if claimed is not None else ""
        overlaps: list[str] | tuple[()] = ()
        covers: list[str] | tuple[()] = ()
        # the reason for Cedar's default deny, when no policy applies; by the kind of resource, or for a
        # Topic (no grant reaches it) by what is wrong with the topic
        unreached: Reason | None = None
        if action is Action.CONNECT:
            resource = {"type": "Tenant", "id": tenant}
        else:
            topic = target.topic
            address = target.address
            if topic is None:
                resource, unreached = {"type": "Topic", "id": ""}, Reason.MISSING_TOPIC
            elif address is None and not target.is_system:
                resource, unreached = {"type": "Topic", "id": topic}, Reason.OUTSIDE_NAMESPACE
            elif address is None:
                # a `$` topic: MQTT matching is done here, the topic blocks it selects go to Cedar
                resource = {"type": "SystemTopic", "id": topic}
                overlaps, covers = [], []
                for topic_block, pattern in graph.topic_blocks:
                    if filters_overlap(pattern, topic):
                        overlaps.append(topic_block)
                    if filter_covers(pattern, topic) if target.is_filter else topic_matches(pattern, topic):
                        covers.append(topic_block)
                context += f',"topicOverlaps":{json.dumps([_ref("TopicBlock", b) for b in overlaps])}'
                context += f',"topicCovers":{json.dumps([_ref("TopicBlock", b) for b in covers])}'
            elif address.tenant is None:  # a wildcard tenant level: it could reach other tenants
                resource, unreached = {"type": "Topic", "id": topic}, Reason.WILDCARD_TOO_BROAD
            else:
                context += f',"topicTenant":{_quote(address.tenant)}'
                if address.channel is None:  # a wildcard channel level: the tenant's whole channel space
                    resource = {"type": "Tenant", "id": address.tenant}
                else:
                    resource = {"type": "Channel", "id": f"{address.tenant}/{address.channel}"}
            if self._send_topic:
                context += f',"topic":{_quote(topic or "")}'
        query: Json = {"principal": principal.uid, "action": _ACTION_UID[action], "resource": resource}
        query["context"] = "{" + context[1:] + "}"
        try:
            allowed, ids, errors = self._authorize(query, self._policies, graph.handle, self._request_schema)
        except Exception as exc:  # cedarpy raises ValueError, but nothing it raises may turn into an allow
            raise EvaluatorUnavailable(f"cedar could not evaluate the request: {exc}") from exc
        if errors:
            # A policy that errors is skipped by Cedar; for a forbid that could mean a wrongful allow.
            raise EvaluatorUnavailable(f"cedar reported errors: {'; '.join(str(e) for e in errors)}")
        if trace is not None:
            decision = "Allow" if allowed else "Deny"
            trace.append(
                f"cedar: {decision} by [{', '.join(ids)}]" if ids else f"cedar: {decision} (no policy applies)"
            )
        # Cedar reports the satisfied policies of the deciding effect: rank them in the in-house order; one
        # the evaluator has no reason for (a policy added to the set) is named after them and keeps Cedar's
        # answer.
        if len(ids) > 1:
            ids.sort(key=lambda i: _RANK.get(i, len(_RANK)))
        if ids:
            policy = ids[0]
            reason = _ORDER.get(policy) or (Reason.ROLE_GRANT if allowed else Reason.DENIED_BY_BLOCK)
            decided_by: str | None = ",".join(ids)
        else:
            reason = unreached or DEFAULT_DENY.get(resource["type"], Reason.NOT_CONNECTED)
            policy, decided_by = "", None
        block = None
        if policy in _BLOCK_POLICIES:
            block = _deciding_block(policy, graph, principal, action, resource, overlaps, covers)
            if block is not None:
                decided_by = f"{decided_by}[{block}]"
        detail = describe(reason, block, request, target, key, tenant)
        if trace is not None:
            trace.append(("allow: " if allowed else "deny: ") + detail)
        return Verdict(allowed, reason, detail, NAME, rev, decided_by, tenant)


_ANNOTATION = re.compile(r'@\w+\s*(?:\(\s*"(?:[^"\\]|\\.)*"\s*\))?')
_WHOLE_LINE_COMMENT = re.compile(r"^\s*//.*$", re.MULTILINE)


def may_read_context_topic(policy_text: str) -> bool:
    """Whether a policy could read the context's ``topic``: the word ``topic`` anywhere in the policy code
    (annotations and whole-line comments aside), in any form - ``context.topic``, ``context has topic``,
    ``context["topic"]``, or a string that only happens to hold it. Errs on the side of sending it."""
    code = _WHOLE_LINE_COMMENT.sub("", _ANNOTATION.sub("", policy_text))
    return re.search(r"\btopic\b", code) is not None


def _unknown_subject(detail: str, rev: int, trace: list[str] | None) -> Verdict:
    """No principal to ask Cedar about."""
    if trace is not None:
        trace.append(f"deny (before cedar): {detail}")
    return Verdict(False, Reason.UNKNOWN_SUBJECT, detail, NAME, rev)


def _deciding_block(
    policy: str,
    graph: EntityGraph,
    principal: Principal,
    action: Action,
    resource: Mapping[str, str],
    overlaps: Sequence[str],
    covers: Sequence[str],
) -> str | None:
    """Name the first of the principal's blocks that made a block policy hold (for ``decided_by``).

    Cedar reports policies, not the entities that satisfied them; this reads the same graph the decision
    used to say which block it was, and decides nothing.
    """
    attr = _BLOCK_POLICIES.get(policy)
    if attr is None:
        return None  # not a block policy (most decisions)
    blocks = principal.blocks.get(attr + action.value.capitalize(), ())
    if policy == "forbid-wildcard-deny":
        candidates: Iterable[str] = blocks
    elif policy == "forbid-topic-deny-block":
        candidates = (b for b in blocks if b in overlaps)
    elif policy == "permit-topic-allow-block":
        candidates = (b for b in blocks if b in covers)
    else:
        above = graph.ancestors((resource["type"], resource["id"]))
        candidates = (b for b in blocks if ("Block", b) in above)
    first = next(iter(candidates), None)
    return block_label(first) if first is not None else None
