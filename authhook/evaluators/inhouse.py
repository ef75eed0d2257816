"""The in-house evaluator: Magistrala's channel model, deny wins, default deny.

Order of a publish/subscribe decision (each step's outcome is a ``Reason``):
  1. the subject must exist, in an enabled tenant, be enabled, and match any tenant the broker claims;
  2. the topic must sit in the channel namespace (or be a broker ``$`` topic granted by a topic block);
  3. the topic's tenant must be the subject's tenant: there is no grant that crosses tenants;
  4. a filter with a wildcard channel level needs a tenant-wide allow and no deny block that could apply;
  5. the channel must exist;
  6. any deny block covering the channel wins;
  7. a connection for the action allows; else an allow block covering the channel allows; else deny.
"""

from __future__ import annotations

from authhook.evaluators.base import Grants
from authhook.models import ACTION_BIT, Action, AuthzRequest, Reason, Target, Verdict
from authhook.store.base import BlockFact, Effect, Facts, GrantFacts, ScopeKind, Store
from authhook.topics import filter_covers, filters_overlap, topic_matches

NAME = "inhouse"


def _block_id(block: BlockFact) -> str:
    return f"role:{block.role}/block:{block.block}"


def _covers_channel(block: BlockFact, channel: str, channel_groups: tuple[str, ...]) -> bool:
    if block.scope is ScopeKind.TENANT:
        return True
    if block.scope is ScopeKind.CHANNEL:
        return block.ref == channel
    if block.scope is ScopeKind.CHANNEL_GROUP:
        return block.ref in channel_groups
    return False


class InHouseEvaluator:
    """``PolicyEvaluator`` over a ``Store``'s facts."""

    name = NAME

    def __init__(self, store: Store) -> None:
        self._store = store

    async def close(self) -> None:
        return None

    async def evaluate(self, request: AuthzRequest, target: Target, *, trace: list[str] | None = None) -> Verdict:
        key = request.subject.key
        if key is None:
            return self._verdict(False, Reason.UNKNOWN_SUBJECT, "request names no username or subject id", 0, trace)
        address = target.address
        tenant = address.tenant if address is not None else None
        channel = address.channel if address is not None and tenant is not None else None
        facts = await self._store.facts(key, tenant, channel)
        return decide(request, target, facts, trace)

    async def grants(self, subject: str) -> Grants | None:
        facts = await self._store.grant_facts(subject)
        if facts is None or not (facts.subject.enabled and facts.subject.tenant_enabled):
            return None
        existing: frozenset[str] | None = None
        if any(b.scope is ScopeKind.TENANT and b.effect is Effect.ALLOW for b in facts.blocks):
            # A tenant-wide allow is listed as the tenant's channels (never as a channel wildcard, which
            # would also admit channels that do not exist): one more read, only for such subjects.
            existing = frozenset(c.id for c in await self._store.list_channels(facts.subject.tenant))
        return list_grants(facts, existing)

    def _verdict(self, allowed: bool, reason: Reason, detail: str, revision: int, trace: list[str] | None) -> Verdict:
        if trace is not None:
            trace.append(detail)
        return Verdict(allowed, reason, detail, NAME, revision)


def decide(request: AuthzRequest, target: Target, facts: Facts, trace: list[str] | None = None) -> Verdict:
    """The policy itself: a pure function of the request and the facts the store returned."""
    rev = facts.revision
    subject = facts.subject
    key = request.subject.key

    def done(allowed: bool, reason: Reason, detail: str, decided_by: str | None = None) -> Verdict:
        if trace is not None:
            trace.append(("allow: " if allowed else "deny: ") + detail)
        return Verdict(allowed, reason, detail, NAME, rev, decided_by, subject.tenant if subject else None)

    if subject is None:
        return done(False, Reason.UNKNOWN_SUBJECT, f"no client or user `{key}`")
    if trace is not None:
        trace.append(f"subject `{subject.id}` is a {subject.kind.value} of tenant `{subject.tenant}`")
    claimed = request.subject.tenant
    if claimed is not None and claimed != subject.tenant:
        return done(False, Reason.WRONG_TENANT, f"broker claims tenant `{claimed}`, subject is in `{subject.tenant}`")
    if not subject.tenant_enabled:
        return done(False, Reason.TENANT_DISABLED, f"tenant `{subject.tenant}` is disabled")
    if not subject.enabled:
        return done(False, Reason.SUBJECT_DISABLED, f"`{subject.id}` is disabled")

    action = request.action
    bit = ACTION_BIT[action]
    blocks = [b for b in facts.blocks if b.actions & bit]
    denies = [b for b in blocks if b.effect is Effect.DENY]
    allows = [b for b in blocks if b.effect is Effect.ALLOW]
    if blocks and trace is not None:
        trace.append(f"{len(blocks)} permission block(s) mention `{action.value}`")

    if action is Action.CONNECT:
        for block in denies:
            if block.scope is ScopeKind.TENANT:
                return done(False, Reason.DENIED_BY_BLOCK, f"connect denied by {_block_id(block)}", _block_id(block))
        return done(True, Reason.SUBJECT_ACTIVE, f"`{subject.id}` is active in tenant `{subject.tenant}`")

    topic = target.topic
    if topic is None:
        return done(False, Reason.MISSING_TOPIC, f"{action.value} without a topic")
    address = target.address
    if address is None:
        if not target.is_system:
            return done(False, Reason.OUTSIDE_NAMESPACE, f"`{topic}` is outside the channel namespace")
        for block in denies:
            if block.scope is ScopeKind.TOPIC and block.ref is not None and filters_overlap(block.ref, topic):
                return done(False, Reason.DENIED_BY_BLOCK, f"`{topic}` denied by {_block_id(block)}", _block_id(block))
        for block in allows:
            if block.scope is ScopeKind.TOPIC and block.ref is not None:
                granted = filter_covers(block.ref, topic) if target.is_filter else topic_matches(block.ref, topic)
                if granted:
                    return done(True, Reason.ROLE_GRANT, f"`{topic}` granted by {_block_id(block)}", _block_id(block))
        return done(False, Reason.SYSTEM_TOPIC, f"system topic `{topic}` is not granted")

    if address.tenant is None:
        return done(
            False,
            Reason.WILDCARD_TOO_BROAD,
            f"`{topic}` has a wildcard tenant level and could reach other tenants",
        )
    if address.tenant != subject.tenant:
        return done(
            False,
            Reason.WRONG_TENANT,
            f"`{topic}` belongs to tenant `{address.tenant}`, not `{subject.tenant}`",
        )

    if address.channel is None:
        if trace is not None:
            trace.append(f"`{topic}` has a wildcard channel level: needs `{action.value}` on every channel")
        for block in denies:
            if block.scope is not ScopeKind.TOPIC:
                return done(
                    False,
                    Reason.DENIED_BY_BLOCK,
                    f"wildcard filter could reach a channel denied by {_block_id(block)}",
                    _block_id(block),
                )
        for block in allows:
            if block.scope is ScopeKind.TENANT:
                return done(
                    True,
                    Reason.ROLE_GRANT,
                    f"tenant-wide `{action.value}` from {_block_id(block)}",
                    _block_id(block),
                )
        return done(False, Reason.WILDCARD_TOO_BROAD, f"no tenant-wide `{action.value}` grant for a wildcard channel")

    channel = address.channel
    if not facts.channel_exists:
        return done(False, Reason.UNKNOWN_CHANNEL, f"no channel `{channel}` in tenant `{subject.tenant}`")
    for block in denies:
        if _covers_channel(block, channel, facts.channel_groups):
            return done(
                False,
                Reason.DENIED_BY_BLOCK,
                f"`{action.value}` on `{channel}` denied by {_block_id(block)}",
                _block_id(block),
            )
    if facts.connection & bit:
        ref = f"connection:{subject.id}/{channel}"
        return done(True, Reason.CONNECTED, f"`{subject.id}` is connected to `{channel}` for {action.value}", ref)
    for block in allows:
        if _covers_channel(block, channel, facts.channel_groups):
            return done(
                True,
                Reason.ROLE_GRANT,
                f"`{action.value}` on `{channel}` granted by {_block_id(block)}",
                _block_id(block),
            )
    return done(False, Reason.NOT_CONNECTED, f"`{subject.id}` is not connected to `{channel}` for {action.value}")


def list_grants(facts: GrantFacts, existing: frozenset[str] | None = None) -> Grants:
    """The same policy as ``decide``, enumerated: per action, the existing channels a subject may use.

    ``existing`` is the tenant's channel list; it is needed only when a tenant-wide allow must be expanded
    (a tenant-wide allow with a deny elsewhere still allows every other existing channel, as ``decide``
    does), and when given, every listed channel is also checked against it. Without it the listed
    channels are those of connections and of channel / channel-group blocks, which the store keeps
    pointing at existing channels (``put_role`` and ``add_member`` check, ``delete_channel`` cascades).

    ``tenant_wide`` says whether a filter with a wildcard channel level is allowed, exactly as ``decide``
    judges one: a tenant-wide allow and no channel deny block for the action. ``system`` lists the
    ``$``-topic blocks as (filter, action, allowed), denials first.
    """

    def covered(block: BlockFact) -> set[str]:
        if block.scope is ScopeKind.CHANNEL and block.ref is not None:
            return {block.ref}
        if block.scope is ScopeKind.CHANNEL_GROUP and block.ref is not None:
            return set(facts.group_channels.get(block.ref, ()))
        if block.scope is ScopeKind.TENANT and existing is not None:
            return set(existing)
        return set()

    channels: dict[Action, tuple[str, ...]] = {}
    tenant_wide: set[Action] = set()
    system: list[tuple[str, Action, bool]] = []
    for action in (Action.PUBLISH, Action.SUBSCRIBE):
        bit = ACTION_BIT[action]
        blocks = [b for b in facts.blocks if b.actions & bit]
        system += [(b.ref, action, b.effect is Effect.ALLOW) for b in blocks if b.scope is ScopeKind.TOPIC and b.ref]
        channel_blocks = [b for b in blocks if b.scope is not ScopeKind.TOPIC]
        denies = [b for b in channel_blocks if b.effect is Effect.DENY]
        if any(b.scope is ScopeKind.TENANT for b in denies):
            channels[action] = ()
            continue
        denied = set().union(*(covered(b) for b in denies)) if denies else set()
        allowed = {channel for channel, bits in facts.connections if bits & bit}
        for block in channel_blocks:
            if block.effect is Effect.ALLOW:
                allowed |= covered(block)
                if block.scope is ScopeKind.TENANT and not denies:
                    tenant_wide.add(action)
        if existing is not None:
            allowed &= existing
        channels[action] = tuple(sorted(allowed - denied))
    system.sort(key=lambda rule: rule[2])  # denials first: the first matching rule wins
    return Grants(facts.subject.tenant, channels, frozenset(tenant_wide), tuple(system))
