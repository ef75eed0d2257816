"""How a verdict's detail is worded, shared by the engines whose policies answer with a reason code.

Cedar and Rego decide; they report *which* reason (and block) decided, not a sentence. The words come from
here, from the same request and facts, so an operator reads the same detail whichever engine decided, and
the same as the in-house evaluator writes inline on its hot path.
"""

from __future__ import annotations

from authhook.models import Action, AuthzRequest, Reason, Target


def describe(
    reason: Reason, block: str | None, request: AuthzRequest, target: Target, subject: str, tenant: str
) -> str:
    """The detail for ``reason``; ``block`` is the deciding block's label (``role:<r>/block:<b>``), if any."""
    action = request.action.value
    topic = target.topic
    address = target.address
    channel = address.channel if address is not None else None
    if reason is Reason.CONNECTED:
        return f"`{subject}` is connected to `{channel}` for {action}"
    if reason is Reason.NOT_CONNECTED:
        return f"`{subject}` is not connected to `{channel}` for {action}"
    by = f" by {block}" if block is not None else ""
    if reason is Reason.WRONG_TENANT:
        claimed = request.subject.tenant
        if claimed is not None and claimed != tenant:
            return f"broker claims tenant `{claimed}`, subject is in `{tenant}`"
        owner = address.tenant if address is not None else None
        return f"`{topic}` belongs to tenant `{owner}`, not `{tenant}`"
    if reason is Reason.TENANT_DISABLED:
        return f"tenant `{tenant}` is disabled"
    if reason is Reason.SUBJECT_DISABLED:
        return f"`{subject}` is disabled"
    if reason is Reason.SUBJECT_ACTIVE:
        return f"`{subject}` is active in tenant `{tenant}`"
    if reason is Reason.UNKNOWN_CHANNEL:
        return f"no channel `{channel}` in tenant `{tenant}`"
    if reason is Reason.SYSTEM_TOPIC:
        return f"system topic `{topic}` is not granted"
    if reason is Reason.WILDCARD_TOO_BROAD:
        if address is None or address.tenant is None:
            return f"`{topic}` has a wildcard tenant level and could reach other tenants"
        return f"no tenant-wide `{action}` grant for a wildcard channel"
    if reason is Reason.MISSING_TOPIC:
        return f"{action} without a topic"
    if reason is Reason.OUTSIDE_NAMESPACE:
        return f"`{topic}` is outside the channel namespace"
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
            return f"tenant-wide `{action}`{' from ' + block if block else ''}"
        return f"`{action}` on `{channel}` granted{by}"
    return f"{reason.value}{by}"
