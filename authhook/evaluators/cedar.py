"""The Cedar evaluator: the in-house channel model written as Cedar policies (``policy/cedar/``).

The policy text and schema are parsed once, at construction, into cedarpy handles that every call reuses.
Per call the evaluator asks the store for the same ``Facts`` as ``InHouseEvaluator``, builds the Cedar
entities of this one request from them (tenant, subject, blocks, channel and its groups, or a channel
wildcard, or a system topic) and asks Cedar. What Cedar cannot express, or what is request validation
rather than policy, is decided here before Cedar runs (see ``policy/cedar/README.md``):

  * no subject key / unknown subject -> ``unknown_subject``;
  * a publish/subscribe without a topic -> ``missing_topic``;
  * a topic outside the channel namespace that is not a ``$`` topic -> ``outside_namespace``;
  * a filter with a wildcard tenant level -> ``wildcard_too_broad``;
  * MQTT topic algebra for ``$`` topics (which topic blocks overlap / cover the topic), passed to Cedar as
    hierarchy edges (the ``SystemTopic`` is a child of the blocks that apply to it).

Everything else - tenant and subject enablement, the tenant a broker claims, tenant isolation, unknown
channels, deny blocks, connections, allow blocks, channel wildcards - is decided by the Cedar policies.
Which policies decided is mapped back to the in-house reason codes, in the in-house order.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import cedarpy

from authhook.errors import EvaluatorUnavailable
from authhook.models import Action, AuthzRequest, Reason, Target, Verdict
from authhook.policy_files import reference_policy
from authhook.store.base import BlockFact, Effect, Facts, ScopeKind, Store, SubjectKind
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
)
PERMIT_ORDER: tuple[tuple[str, Reason], ...] = (
    ("permit-connect", Reason.SUBJECT_ACTIVE),
    ("permit-connection", Reason.CONNECTED),
    ("permit-allow-block", Reason.ROLE_GRANT),
)
DENY_BLOCK = "forbid-deny-block"
ALLOW_BLOCK = "permit-allow-block"
# No policy was satisfied: Cedar's default deny, named after the kind of resource.
DEFAULT_DENY: dict[str, Reason] = {
    "Channel": Reason.NOT_CONNECTED,
    "ChannelWildcard": Reason.WILDCARD_TOO_BROAD,
    "SystemTopic": Reason.SYSTEM_TOPIC,
    "Tenant": Reason.SUBJECT_DISABLED,  # unreachable: connect is permitted unless a forbid applies
}
_PRINCIPAL_TYPE = {SubjectKind.CLIENT: "Client", SubjectKind.USER: "User"}
_ACTIONS = {Action.CONNECT: 1, Action.PUBLISH: 2, Action.SUBSCRIBE: 4}


def _uid(kind: str, id_: str) -> dict[str, str]:
    return {"type": kind, "id": id_}


def _ref(kind: str, id_: str) -> dict[str, dict[str, str]]:
    return {"__entity": {"type": kind, "id": id_}}


def block_id(block: BlockFact) -> str:
    """How verdicts name a block (the in-house form)."""
    return f"role:{block.role}/block:{block.block}"


class _Request:
    """The Cedar request and entities for one decision, plus what is needed to explain the answer."""

    __slots__ = ("blocks_over", "entities", "query", "resource_type")

    def __init__(self) -> None:
        self.entities: list[dict[str, Any]] = []
        self.query: dict[str, Any] = {}
        self.resource_type = ""
        # block uid -> block, for every block the resource sits under (to name the block that decided)
        self.blocks_over: dict[str, BlockFact] = {}


class CedarEvaluator:
    """``PolicyEvaluator`` backed by cedarpy, reproducing ``inhouse.decide`` allow/deny and reason codes."""

    name = NAME

    def __init__(
        self,
        store: Store,
        policies_path: Path | str = DEFAULT_POLICIES,
        schema_path: Path | str = DEFAULT_SCHEMA,
        *,
        validate_requests: bool = True,
    ) -> None:
        """Parse and validate the policies against the schema once; raises ``EvaluatorUnavailable``.

        ``validate_requests`` also checks every request and its entities against the schema (the parsed
        schema handle is reused; costs a few microseconds per call).
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

    @property
    def policies(self) -> Any:
        """The parsed ``cedarpy.PolicySet`` every call reuses."""
        return self._policies

    @property
    def schema(self) -> Any:
        """The parsed ``cedarpy.Schema``."""
        return self._schema

    async def close(self) -> None:
        return None

    async def evaluate(self, request: AuthzRequest, target: Target, *, trace: list[str] | None = None) -> Verdict:
        key = request.subject.key
        if key is None:
            return _python_verdict(Reason.UNKNOWN_SUBJECT, "request names no username or subject id", 0, None, trace)
        address = target.address
        tenant = address.tenant if address is not None else None
        channel = address.channel if address is not None and tenant is not None else None
        facts = await self._store.facts(key, tenant, channel)
        return self.decide(request, target, facts, trace)

    def decide(self, request: AuthzRequest, target: Target, facts: Facts, trace: list[str] | None = None) -> Verdict:
        """Pre-checks in Python, then Cedar; a pure function of the request and the facts."""
        subject = facts.subject
        rev = facts.revision
        if subject is None:
            return _python_verdict(
                Reason.UNKNOWN_SUBJECT, f"no client or user `{request.subject.key}`", rev, None, trace
            )
        action = request.action
        if action is not Action.CONNECT:
            topic = target.topic
            if topic is None:
                detail = f"{action.value} without a topic"
                return _python_verdict(Reason.MISSING_TOPIC, detail, rev, subject.tenant, trace)
            if target.address is None and not target.is_system:
                detail = f"`{topic}` is outside the channel namespace"
                return _python_verdict(Reason.OUTSIDE_NAMESPACE, detail, rev, subject.tenant, trace)
            if target.address is not None and target.address.tenant is None:
                detail = f"`{topic}` has a wildcard tenant level and could reach other tenants"
                return _python_verdict(Reason.WILDCARD_TOO_BROAD, detail, rev, subject.tenant, trace)
        built = build_request(request, target, facts)
        try:
            result = cedarpy.is_authorized(built.query, self._policies, built.entities, self._request_schema)
            errors = list(result.diagnostics.errors)
            allowed = bool(result.allowed)
            reasons = list(result.diagnostics.reasons)
            annotations = dict(result.diagnostics.id_annotations_by_reason)
        except Exception as exc:  # cedarpy raises ValueError, but nothing it raises may turn into an allow
            raise EvaluatorUnavailable(f"cedar could not evaluate the request: {exc}") from exc
        if errors:
            # A policy that errors is skipped by Cedar; for a forbid that could mean a wrongful allow.
            raise EvaluatorUnavailable(f"cedar reported errors: {'; '.join(str(e) for e in errors)}")
        ids = [str(annotations.get(r, r)) for r in reasons]
        return _verdict(allowed, ids, built, request, target, facts, trace)


def _python_verdict(reason: Reason, detail: str, rev: int, tenant: str | None, trace: list[str] | None) -> Verdict:
    if trace is not None:
        trace.append(f"deny (before cedar): {detail}")
    return Verdict(False, reason, detail, NAME, rev, None, tenant)


def _verdict(
    allowed: bool,
    ids: list[str],
    built: _Request,
    request: AuthzRequest,
    target: Target,
    facts: Facts,
    trace: list[str] | None,
) -> Verdict:
    subject = facts.subject
    assert subject is not None
    order = PERMIT_ORDER if allowed else FORBID_ORDER
    ranked = [(policy, reason) for policy, reason in order if policy in ids]
    unknown = [i for i in ids if all(i != policy for policy, _ in order)]
    if trace is not None:
        decision = "Allow" if allowed else "Deny"
        trace.append(f"cedar: {decision} by [{', '.join(ids)}]" if ids else f"cedar: {decision} (no policy applies)")
    if ranked:
        policy, reason = ranked[0]
    elif unknown:
        # A policy added to the set without a reason mapping: name it, keep Cedar's answer.
        policy, reason = unknown[0], (Reason.ROLE_GRANT if allowed else Reason.DENIED_BY_BLOCK)
    else:
        policy, reason = "", DEFAULT_DENY.get(built.resource_type, Reason.NOT_CONNECTED)
    names = [p for p, _ in ranked] + unknown
    decided_by = ",".join(names) or None
    block = _deciding_block(policy, built, request.action, facts)
    if block is not None:
        decided_by = f"{decided_by}[{block_id(block)}]"
    detail = _detail(reason, block, request, target, facts)
    if trace is not None:
        trace.append(("allow: " if allowed else "deny: ") + detail)
    return Verdict(allowed, reason, detail, NAME, facts.revision, decided_by, subject.tenant)


def _deciding_block(policy: str, built: _Request, action: Action, facts: Facts) -> BlockFact | None:
    """The first block (in store order, as the in-house evaluator reports it) that made a block policy hold."""
    if policy not in (DENY_BLOCK, ALLOW_BLOCK):
        return None
    effect = Effect.DENY if policy == DENY_BLOCK else Effect.ALLOW
    bit = _ACTIONS[action]
    for block in facts.blocks:
        if block.effect is effect and block.actions & bit and _block_uid(facts, block) in built.blocks_over:
            return block
    return None


def _detail(reason: Reason, block: BlockFact | None, request: AuthzRequest, target: Target, facts: Facts) -> str:
    subject = facts.subject
    assert subject is not None
    action = request.action.value
    topic = target.topic
    address = target.address
    channel = address.channel if address is not None else None
    by = f" by {block_id(block)}" if block is not None else ""
    if reason is Reason.WRONG_TENANT:
        claimed = request.subject.tenant
        if claimed is not None and claimed != subject.tenant:
            return f"broker claims tenant `{claimed}`, subject is in `{subject.tenant}`"
        owner = address.tenant if address is not None else None
        return f"`{topic}` belongs to tenant `{owner}`, not `{subject.tenant}`"
    if reason is Reason.TENANT_DISABLED:
        return f"tenant `{subject.tenant}` is disabled"
    if reason is Reason.SUBJECT_DISABLED:
        return f"`{subject.id}` is disabled"
    if reason is Reason.SUBJECT_ACTIVE:
        return f"`{subject.id}` is active in tenant `{subject.tenant}`"
    if reason is Reason.UNKNOWN_CHANNEL:
        return f"no channel `{channel}` in tenant `{subject.tenant}`"
    if reason is Reason.CONNECTED:
        return f"`{subject.id}` is connected to `{channel}` for {action}"
    if reason is Reason.NOT_CONNECTED:
        return f"`{subject.id}` is not connected to `{channel}` for {action}"
    if reason is Reason.SYSTEM_TOPIC:
        return f"system topic `{topic}` is not granted"
    if reason is Reason.WILDCARD_TOO_BROAD:
        return f"no tenant-wide `{action}` grant for a wildcard channel"
    if reason is Reason.DENIED_BY_BLOCK:
        if request.action is Action.CONNECT:
            return f"connect denied{by}"
        if target.is_system:
            return f"`{topic}` denied{by}"
        if channel is None:
            return f"wildcard filter could reach a channel denied{by}"
        return f"`{action}` on `{channel}` denied{by}"
    if reason is Reason.ROLE_GRANT:
        if target.is_system:
            return f"`{topic}` granted{by}"
        if channel is None:
            return f"tenant-wide `{action}`{' from ' + block_id(block) if block else ''}"
        return f"`{action}` on `{channel}` granted{by}"
    return f"{reason.value}{by}"


# -- entities ------------------------------------------------------------------------------------


def _block_uid(facts: Facts, block: BlockFact) -> str:
    assert facts.subject is not None
    return f"{facts.subject.tenant}/{block_id(block)}"


def _blocks(uids: Iterable[str]) -> list[dict[str, dict[str, str]]]:
    return [_ref("Block", uid) for uid in dict.fromkeys(uids)]


def build_request(request: AuthzRequest, target: Target, facts: Facts) -> _Request:
    """The Cedar request and the entities for it, from the store's facts for this one decision.

    Hierarchy edges carry coverage: a tenant-scope block is a parent of the ``Tenant``, a channel-scope
    block of the ``Channel`` it names, a channel-group block of the ``ChannelGroup``; the channel is a
    child of its tenant and of every group it is in (transitively, as the store reports them). So
    ``resource in principal.deny.publish`` holds exactly when a deny block naming publish covers the resource.
    """
    subject = facts.subject
    assert subject is not None
    tenant = subject.tenant
    out = _Request()
    entities = out.entities

    uid_of = {block: _block_uid(facts, block) for block in facts.blocks}
    block_of = {uid: block for block, uid in reversed(uid_of.items())}  # the first block with a uid wins
    allow: dict[str, list[str]] = {"publish": [], "subscribe": []}
    deny: dict[str, list[str]] = {"connect": [], "publish": [], "subscribe": []}
    for block, uid in uid_of.items():
        sets = deny if block.effect is Effect.DENY else allow
        for name, bit in (("connect", 1), ("publish", 2), ("subscribe", 4)):
            if block.actions & bit and name in sets:
                sets[name].append(uid)
    for uid in dict.fromkeys(uid_of.values()):
        entities.append({"uid": _uid("Block", uid), "attrs": {}, "parents": []})

    # parents by scope: which blocks sit directly above the tenant, a channel, a channel group
    tenant_blocks: list[str] = []
    channel_blocks: dict[str, list[str]] = {}
    group_blocks: dict[str, list[str]] = {}
    for block, uid in uid_of.items():
        if block.scope is ScopeKind.TENANT:
            tenant_blocks.append(uid)
        elif block.scope is ScopeKind.CHANNEL and block.ref is not None:
            channel_blocks.setdefault(block.ref, []).append(uid)
        elif block.scope is ScopeKind.CHANNEL_GROUP and block.ref is not None:
            group_blocks.setdefault(block.ref, []).append(uid)

    entities.append(
        {
            "uid": _uid("Tenant", tenant),
            "attrs": {"enabled": subject.tenant_enabled},
            "parents": [_uid("Block", uid) for uid in dict.fromkeys(tenant_blocks)],
        }
    )
    principal = _uid(_PRINCIPAL_TYPE[subject.kind], subject.id)
    entities.append(
        {
            "uid": principal,
            "attrs": {
                "tenant": _ref("Tenant", tenant),
                "enabled": subject.enabled,
                "allow": {name: _blocks(uids) for name, uids in allow.items()},
                "deny": {name: _blocks(uids) for name, uids in deny.items()},
            },
            "parents": [],
        }
    )
    under_tenant = {uid: b for b, uid in uid_of.items() if b.scope is ScopeKind.TENANT}

    context: dict[str, Any] = {}
    claimed = request.subject.tenant
    if claimed is not None:
        context["claimedTenant"] = _ref("Tenant", claimed)
    action = request.action
    if action is Action.CONNECT:
        resource = _uid("Tenant", tenant)
        out.resource_type = "Tenant"
        out.blocks_over.update(under_tenant)
    else:
        topic = target.topic
        assert topic is not None
        bits = facts.connection
        connection = {"publish": False, "subscribe": False}
        address = target.address
        if address is None:  # a `$` topic: the topic algebra is done here, the result is the hierarchy
            over = []
            for block, uid in uid_of.items():
                if block.scope is not ScopeKind.TOPIC or block.ref is None:
                    continue
                if block.effect is Effect.DENY:
                    applies = filters_overlap(block.ref, topic)
                else:
                    applies = filter_covers(block.ref, topic) if target.is_filter else topic_matches(block.ref, topic)
                if applies:
                    over.append(uid)
                    out.blocks_over[uid] = block
            resource = _uid("SystemTopic", topic)
            out.resource_type = "SystemTopic"
            entities.append({"uid": resource, "attrs": {}, "parents": [_uid("Block", u) for u in dict.fromkeys(over)]})
        else:
            owner = address.tenant
            assert owner is not None
            own = owner == tenant
            if address.channel is None:
                resource = _uid("ChannelWildcard", f"{owner}/+")
                out.resource_type = "ChannelWildcard"
                parents: list[dict[str, str]] = []
                if own:
                    # could reach any channel: under every channel-space deny block, and under the tenant
                    parents.append(_uid("Tenant", tenant))
                    out.blocks_over.update(under_tenant)
                    reach = [
                        uid
                        for b, uid in uid_of.items()
                        if b.effect is Effect.DENY
                        and b.scope is not ScopeKind.TOPIC
                        and b.scope is not ScopeKind.TENANT
                    ]
                    parents += [_uid("Block", uid) for uid in dict.fromkeys(reach)]
                    out.blocks_over.update(
                        {
                            uid: b
                            for b, uid in uid_of.items()
                            if b.effect is Effect.DENY and b.scope is not ScopeKind.TOPIC
                        }
                    )
                entities.append({"uid": resource, "attrs": {"tenant": _ref("Tenant", owner)}, "parents": parents})
            else:
                channel = address.channel
                resource = _uid("Channel", f"{owner}/{channel}")
                out.resource_type = "Channel"
                parents = []
                if own:
                    connection = {"publish": bool(bits & 2), "subscribe": bool(bits & 4)}
                    parents.append(_uid("Tenant", tenant))
                    out.blocks_over.update(under_tenant)
                    for uid in dict.fromkeys(channel_blocks.get(channel, ())):
                        parents.append(_uid("Block", uid))
                        out.blocks_over[uid] = block_of[uid]
                    for group in dict.fromkeys(facts.channel_groups):
                        group_uid = _uid("ChannelGroup", f"{tenant}/{group}")
                        parents.append(group_uid)
                        above = list(dict.fromkeys(group_blocks.get(group, ())))
                        entities.append(
                            {
                                "uid": group_uid,
                                "attrs": {"tenant": _ref("Tenant", tenant)},
                                "parents": [_uid("Block", uid) for uid in above],
                            }
                        )
                        out.blocks_over.update({uid: b for b, uid in uid_of.items() if uid in above})
                known = facts.channel_exists
                entities.append(
                    {"uid": resource, "attrs": {"tenant": _ref("Tenant", owner), "known": known}, "parents": parents}
                )
        context["topic"] = topic
        context["isFilter"] = target.is_filter
        context["connection"] = connection
    out.query = {
        "principal": principal,
        "action": _uid("Action", action.value),
        "resource": resource,
        "context": context,
    }
    return out


def dumps(built: _Request) -> str:
    """The request and entities as JSON, for debugging and the README's examples."""
    return json.dumps({"request": built.query, "entities": built.entities}, indent=2)
