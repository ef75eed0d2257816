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
from authhook.topics import TopicTemplate

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


def acl_rules(grants: Grants, template: TopicTemplate) -> list[dict[str, Any]]:
    """EMQX 5.8 ``acl`` rules (first match wins) equivalent to the grants, ending in ``deny all #``."""
    rules: list[dict[str, Any]] = [
        {"permission": "allow" if allowed else "deny", "action": action.value, "topic": topic_filter}
        for topic_filter, action, allowed in grants.system
    ]
    suffix = "/#" if template.has_subtopic else ""  # '#' also matches the channel topic itself
    for action in (Action.PUBLISH, Action.SUBSCRIBE):
        if action in grants.tenant_wide:
            topics = [template.topic_for(grants.tenant, "+") + suffix]
        else:
            topics = [template.topic_for(grants.tenant, channel) + suffix for channel in grants.channels[action]]
        if topics:
            rules.append({"permission": "allow", "action": action.value, "topics": topics})
    rules.append({"permission": "deny", "action": "all", "topic": "#"})
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
