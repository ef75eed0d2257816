"""EMQX 5.x HTTP authentication (``POST /emqx/authn``) and HTTP authorization (``POST /emqx/authz``).

EMQX renders every template variable as a string (``"qos":"1"``, ``"retain":"false"``) and treats any
non-200 answer as "ignore", so a malformed request is answered 200 ``deny`` with a reason, never a 4xx
that would let the chain fall through. ``ignore`` is only sent for failures when configured.

With ``brokers.emqx_return_acl`` a successful CONNECT also carries the session's ACL and an ``expire_at``
(``brokers.emqx_acl_ttl_s`` from now): EMQX disconnects the client at that moment, so a revoke reaches a live
session within the TTL instead of waiting for the client to reconnect on its own.
"""

from __future__ import annotations

import time
from typing import Any

import orjson
from aiohttp import web

from authhook.brokers.common import (
    JSON_HEADERS,
    Malformed,
    TranslationMemo,
    failed_open,
    json_answer,
    read_fields,
    refuse,
    text,
    too_large,
)
from authhook.config import Settings
from authhook.evaluators.base import Grants
from authhook.models import Action, AuthzRequest, CacheKey, Subject, Verdict, request_cache_key
from authhook.pdp import PDP
from authhook.topics import TopicTemplate, filters_overlap

BROKER = "emqx"
_ACCESS = {"1": Action.SUBSCRIBE, "2": Action.PUBLISH}  # EMQX 4 compatible `${access}`
wall_clock = time.time  # the source of `expire_at`; a module attribute so tests can pin it


# -- translate (pure) ---------------------------------------------------------------------------------


def authn_credentials(data: dict[str, Any]) -> tuple[str | None, str | None, str | None, str | None]:
    """(username, password, clientid, peerhost) from the operator's body template."""
    return text(data, "username"), text(data, "password"), text(data, "clientid"), text(data, "peerhost")


def authz_action(data: dict[str, Any]) -> Action:
    """``${action}``, or EMQX 4's ``${access}`` when the template sends that instead."""
    action_text = text(data, "action")
    if action_text in ("publish", "subscribe"):
        return Action(action_text)
    if action_text is None and text(data, "access") in _ACCESS:
        return _ACCESS[str(data["access"])]
    raise Malformed("`action` must be publish or subscribe")


def authz_request(data: dict[str, Any]) -> AuthzRequest:
    action = authz_action(data)
    try:
        qos_text = text(data, "qos")
        if qos_text is not None and qos_text not in ("0", "1", "2"):
            raise Malformed("`qos` must be 0, 1 or 2")
        try:
            subject = Subject(
                username=text(data, "username"), client_id=text(data, "clientid"), peer=text(data, "peerhost")
            )
        except ValueError:
            raise Malformed("username or clientid contains `+`, `#`, `/` or NUL") from None
        return AuthzRequest(
            subject=subject,
            action=action,
            topic=text(data, "topic", required=True),
            qos=int(qos_text) if qos_text is not None else None,
            retain=text(data, "retain") == "true",
        )
    except Malformed as exc:  # the action is known by now: log a bad SUBSCRIBE as a subscribe
        raise exc.about(action) from None


def keyed_authz_request(data: dict[str, Any]) -> tuple[AuthzRequest, CacheKey]:
    """``authz_request`` with its cache key, which the memo then keeps beside it (see ``PDP.cached``)."""
    request = authz_request(data)
    return request, request_cache_key(request)


ACL_MAX_CHANNELS = 1000  # per action; a longer list is left out and that action is asked over HTTP instead
_PLACEHOLDER = "${"  # EMQX renders ${username} / ${clientid} in rule topics: such a filter cannot be sent as is


def _rule(permission: str, action: Action, topics: list[str]) -> dict[str, Any]:
    return {"permission": permission, "action": action.value, "topics": topics}


def _system_rules(grants: Grants, action: Action) -> list[dict[str, Any]]:
    """The ``$``-topic blocks for one action, written only where EMQX's first match gives authhook's answer.

    Every deny rule is safe: when EMQX's rule matches the request, the block's filter overlaps it and
    ``decide`` denies too. An allow rule is written only if EMQX cannot reach it with a request authhook
    denies. For publish the request is a topic name, so after all the denies an allow matches exactly the
    names its block grants. For subscribe the request is a filter, and EMQX matches a rule's ``+`` against any
    level of it, a literal ``+`` or ``#`` included (``$SYS/broker/+`` admits ``$SYS/broker/#``), while
    ``decide`` wants the filter covered. So a subscribe allow is written only without ``+`` (then EMQX's match
    is coverage), and only if no deny block overlaps it: a deny that overlaps a filter without matching it
    (``$SYS/broker/secret/#`` against ``$SYS/#``) would otherwise be passed over. What is left out falls
    through to the HTTP source, which asks authhook; a trailing ``deny ... #`` never hides that, because EMQX
    does not match a ``$`` topic against a rule starting with ``+`` or ``#``.
    """
    entries = [(ref, allowed) for ref, of, allowed in grants.system if of is action]
    denies = [ref for ref, allowed in entries if not allowed]
    allows = [ref for ref, allowed in entries if allowed and _PLACEHOLDER not in ref]
    if any(_PLACEHOLDER in ref for ref in denies):
        allows = []  # that deny cannot be written, so nothing it should take away may be allowed after it
    if action is Action.SUBSCRIBE:
        allows = [
            ref
            for ref in allows
            if "+" not in ref.split("/") and not any(filters_overlap(deny, ref) for deny in denies)
        ]
    rules = []
    written = [ref for ref in denies if _PLACEHOLDER not in ref]
    if written:
        rules.append(_rule("deny", action, written))
    if allows:
        rules.append(_rule("allow", action, allows))
    return rules


def _channel_topics(grants: Grants, template: TopicTemplate, action: Action) -> list[str] | None:
    """Rule topics admitting exactly the action on the subject's allowed channels; None when too many.

    One rule topic per existing channel, never a ``+`` in the channel level: EMQX would match it against a
    nonexistent channel, an empty level, or a client's literal ``+``/``#`` alike, all of which authhook
    refuses. With a ``{subtopic}`` template ``<channel topic>/#`` is exactly the channel's topics and every
    filter inside them (``#`` also matches the channel topic itself); without one, the channel topic, and
    for subscribe also ``eq <channel topic>/#``, the one longer filter authhook accepts.
    """
    channels = grants.channels.get(action, ())
    if len(channels) > ACL_MAX_CHANNELS:
        return None
    topics: list[str] = []
    for channel in channels:
        topic = template.topic_for(grants.tenant, channel)
        if template.has_subtopic:
            topics.append(topic + "/#")
        else:
            topics.append(topic)
            if action is Action.SUBSCRIBE:
                topics.append(f"eq {topic}/#")
    return topics


def acl_rules(grants: Grants, template: TopicTemplate) -> list[dict[str, Any]]:
    """EMQX 5.8 ``acl`` rules (first match wins) that decide a request only where authhook would decide it
    the same way; a request no rule matches falls through to the HTTP source, which asks ``/emqx/authz``.

    Modelled on ``emqx_authz_rule`` / ``emqx_topic:match/2`` (EMQX 5.8): the request's topic or filter is
    split on ``/`` and matched word by word against each rule topic, where only the rule's ``+`` and ``#`` are
    wildcards (a ``+`` or ``#`` in the client's filter is a word like any other), ``#`` also matches nothing,
    a first word starting with ``$`` is never matched by a rule's leading ``+`` or ``#``, and ``eq T`` matches
    the string T alone. A shared subscription is authorized on its inner filter (EMQX strips ``$share/<g>/``
    and ``$queue/`` before asking, ``emqx_channel``), so one set of rules serves both.

    The list: the ``$``-topic rules that are exact (see ``_system_rules``), then one allow per action over the
    subject's allowed existing channels (see ``_channel_topics``), then ``deny publish #``, since a topic name
    outside those channels is refused by authhook (``$`` names excepted, which ``#`` does not match and which
    fall through). ``deny subscribe #`` follows unless the subject may subscribe tenant-wide: then authhook
    also allows filters with a wildcard channel level (``m/acme/c/+/temp``, ``m/acme/#``), which no rule can
    admit without admitting nonexistent channels too, so its other subscribes fall through. (A `+` in a
    literal level of the template, ``+/acme/c/x``, is refused by authhook, so the deny covers it.)
    """
    rules = [*_system_rules(grants, Action.PUBLISH), *_system_rules(grants, Action.SUBSCRIBE)]
    listed: dict[Action, bool] = {}
    for action in (Action.PUBLISH, Action.SUBSCRIBE):
        topics = _channel_topics(grants, template, action)
        listed[action] = topics is not None
        if topics:
            rules.append(_rule("allow", action, topics))
    if listed[Action.PUBLISH]:
        rules.append({"permission": "deny", "action": Action.PUBLISH.value, "topic": "#"})
    if listed[Action.SUBSCRIBE] and Action.SUBSCRIBE not in grants.tenant_wide:
        rules.append({"permission": "deny", "action": Action.SUBSCRIBE.value, "topic": "#"})
    return rules


def expire_at(settings: Settings) -> int:
    """Unix seconds at which EMQX drops the session and its ACL (the client reconnects and is asked again)."""
    return int(wall_clock()) + settings.brokers.emqx_acl_ttl_s


def answer(verdict: Verdict, settings: Settings, *, authn: bool) -> dict[str, Any]:
    if verdict.allowed:
        return {"result": "allow", "is_superuser": False} if authn else {"result": "allow"}
    if failed_open(verdict, settings):
        return {"result": "ignore", "reason": verdict.reason.value}
    return {"result": "deny", "reason": verdict.reason.value}


_AUTHZ_ALLOW = orjson.dumps({"result": "allow"})  # the answer to nearly every authz call, written once


# -- routes -------------------------------------------------------------------------------------------


def add_routes(routes: web.RouteTableDef, pdp: PDP, settings: Settings) -> None:
    async def authn(request: web.Request) -> web.Response:
        try:
            data = await read_fields(request)
            username, password, clientid, peer = authn_credentials(data)
        except Malformed as exc:
            decision = refuse(pdp, exc, Action.CONNECT, broker=BROKER, hook="authn")
        else:
            decision = await pdp.authenticate(
                username, password, client_id=clientid, peer=peer, broker=BROKER, hook="authn"
            )
            if decision.allowed and settings.brokers.emqx_return_acl and username is not None:
                grants = await pdp.grants(username)
                if grants is not None:  # without a complete list, EMQX keeps asking per PUBLISH/SUBSCRIBE
                    await pdp.pushed_acl(username, decision.verdict.subject_tenant, grants)
                    return json_answer(
                        {
                            **answer(decision.verdict, settings, authn=True),
                            "expire_at": expire_at(settings),
                            "acl": acl_rules(grants, pdp.template),
                        }
                    )
        return json_answer(answer(decision.verdict, settings, authn=True))

    translate_authz = TranslationMemo(keyed_authz_request, post_only=True)  # the route below is POST only

    async def authz(request: web.Request) -> web.Response:
        # Called for every PUBLISH and SUBSCRIBE EMQX does not decide itself: the body is read here rather
        # than through ``translate_authz(request)``, the memo hands back the cache key it keeps beside the
        # request, a hit is taken synchronously (see ``PDP.cached``), and the allow is answered inline.
        try:
            try:
                raw = await request.read()
            except web.HTTPRequestEntityTooLarge:
                raise too_large(request) from None
            authz_req, key = translate_authz.translate(request, raw)
        except Malformed as exc:
            verdict = refuse(pdp, exc, Action.PUBLISH, broker=BROKER, hook="authz").verdict
        else:
            verdict = (
                pdp.cached(authz_req, broker=BROKER, hook="authz", key=key)
                or (await pdp.authorize(authz_req, broker=BROKER, hook="authz", key=key)).verdict
            )
        body = _AUTHZ_ALLOW if verdict.allowed else orjson.dumps(answer(verdict, settings, authn=False))
        return web.Response(body=body, headers=JSON_HEADERS)

    routes.post("/emqx/authn")(authn)
    routes.post("/emqx/authz")(authz)
