"""VerneMQ webhooks (``POST /vernemq``, hook named by the ``vernemq-hook`` header).

VerneMQ refuses on any non-200 or non-JSON answer, so every answer is 200 JSON: ``{"result":"ok"}``,
``{"result":{"error":"<reason>"}}`` or, for failures when configured, ``{"result":"next"}``. A SUBSCRIBE
is answered per topic: denied topics come back with QoS 128 (v3, top-level ``topics``) or 135 (m5,
``modifiers.topics``), so one forbidden filter does not fail the others. ``cache-control: max-age`` is
sent on allows only when the operator configures it: VerneMQ cannot be told to forget, so N seconds is
how long a revoke may go unnoticed.
"""

from __future__ import annotations

from typing import Any

import orjson
from aiohttp import web

from authhook.brokers.common import Malformed, failed_open, json_answer, read_fields, refuse, text, translate_fields
from authhook.config import Settings
from authhook.models import Action, AuthzRequest, Subject, Verdict
from authhook.pdp import PDP

BROKER = "vernemq"
REGISTER_HOOKS = frozenset({"auth_on_register", "auth_on_register_m5"})
PUBLISH_HOOKS = frozenset({"auth_on_publish", "auth_on_publish_m5"})
SUBSCRIBE_HOOKS = frozenset({"auth_on_subscribe", "auth_on_subscribe_m5"})
# Notifications that a session ended (the answer is ignored); they keep the session registry current.
GONE_HOOKS = frozenset({"on_client_offline", "on_client_gone"})
REJECTED_QOS = {"auth_on_subscribe": 128, "auth_on_subscribe_m5": 135}


# -- translate (pure) ---------------------------------------------------------------------------------


def subject_of(data: dict[str, Any]) -> Subject:
    try:
        return Subject(username=text(data, "username"), client_id=text(data, "client_id"), peer=text(data, "peer_addr"))
    except ValueError:
        raise Malformed("username or client_id contains `+`, `#`, `/` or NUL") from None


def publish_request(data: dict[str, Any]) -> AuthzRequest:
    qos = data.get("qos")
    if not isinstance(qos, int) or isinstance(qos, bool) or not 0 <= qos <= 2:
        raise Malformed("`qos` must be 0, 1 or 2")
    retain = data.get("retain", False)
    if not isinstance(retain, bool):
        raise Malformed("`retain` must be a boolean")
    return AuthzRequest(
        subject=subject_of(data),
        action=Action.PUBLISH,
        topic=text(data, "topic", required=True),
        qos=qos,
        retain=retain,
    )


def subscribe_requests(data: dict[str, Any]) -> list[tuple[dict[str, Any], AuthzRequest]]:
    topics = data.get("topics")
    if not isinstance(topics, list) or not topics:
        raise Malformed("`topics` must be a non-empty list")
    subject = subject_of(data)
    result = []
    for entry in topics:
        if not isinstance(entry, dict) or not isinstance(entry.get("topic"), str):
            raise Malformed("each of `topics` needs a `topic` string")
        qos = entry.get("qos")
        if not isinstance(qos, int) or isinstance(qos, bool) or not 0 <= qos <= 2:
            raise Malformed("each of `topics` needs a `qos` of 0, 1 or 2")
        result.append((entry, AuthzRequest(subject=subject, action=Action.SUBSCRIBE, topic=entry["topic"], qos=qos)))
    return result


def answer(verdict: Verdict, settings: Settings) -> dict[str, Any]:
    if verdict.allowed:
        return {"result": "ok"}
    if failed_open(verdict, settings):
        return {"result": "next"}
    return {"result": {"error": verdict.reason.value}}


def subscribe_answer(
    hook: str, entries: list[dict[str, Any]], verdicts: list[Verdict], settings: Settings
) -> dict[str, Any]:
    if all(v.allowed for v in verdicts):
        return {"result": "ok"}
    if any(failed_open(v, settings) for v in verdicts):
        return {"result": "next"}
    rejected = REJECTED_QOS[hook]
    topics = [entry if v.allowed else {**entry, "qos": rejected} for entry, v in zip(entries, verdicts, strict=True)]
    if hook.endswith("_m5"):
        return {"result": "ok", "modifiers": {"topics": topics}}
    return {"result": "ok", "topics": topics}


# -- routes -------------------------------------------------------------------------------------------


def add_routes(routes: web.RouteTableDef, pdp: PDP, settings: Settings) -> None:
    max_age = settings.brokers.vernemq_cache_max_age_s

    def respond(body: dict[str, Any]) -> web.Response:
        response = json_answer(body)
        if max_age is not None and body == {"result": "ok"}:  # never cache an answer that rejects a topic
            response.headers["cache-control"] = f"max-age={max_age}"
        return response

    def refused(exc: Malformed, action: Action, hook: str) -> web.Response:
        return json_answer(answer(refuse(pdp, exc, action, broker=BROKER, hook=hook).verdict, settings))

    async def webhook(request: web.Request) -> web.Response:
        hook = request.headers.get("vernemq-hook", "")
        if hook in GONE_HOOKS:
            return await session_gone(request)
        if hook not in REGISTER_HOOKS | PUBLISH_HOOKS | SUBSCRIBE_HOOKS:
            # Other deciding hooks (on_unsubscribe, on_deliver, on_auth_m5) are not ours to decide.
            return json_answer({"result": "next"} if hook else {"result": {"error": "missing_hook_header"}})
        action = (
            Action.CONNECT if hook in REGISTER_HOOKS else Action.PUBLISH if hook in PUBLISH_HOOKS else Action.SUBSCRIBE
        )
        try:
            data = await read_fields(request)
            if hook in REGISTER_HOOKS:
                subject = subject_of(data)
                password = data.get("password")
                if password is not None and not isinstance(password, str):
                    raise Malformed("`password` must be a string or null")
                decision = await pdp.authenticate(
                    subject.username,
                    password,
                    client_id=subject.client_id,
                    peer=subject.peer,
                    broker=BROKER,
                    hook=hook,
                )
                return respond(answer(decision.verdict, settings))
            if hook in PUBLISH_HOOKS:
                decision = await pdp.authorize(translate_fields(publish_request, data), broker=BROKER, hook=hook)
                return respond(answer(decision.verdict, settings))
            pairs = translate_fields(subscribe_requests, data)
        except Malformed as exc:
            return refused(exc, action, hook)
        verdicts = [(await pdp.authorize(req, broker=BROKER, hook=hook)).verdict for _, req in pairs]
        try:
            # The entries go back as VerneMQ sent them; one it could send but orjson cannot write (nested
            # deeper than orjson's 254 levels) is the broker's deny, not a 500.
            return respond(subscribe_answer(hook, [entry for entry, _ in pairs], verdicts, settings))
        except orjson.JSONEncodeError:
            return refused(Malformed("a subscription entry cannot be echoed back as json"), action, hook)

    async def session_gone(request: web.Request) -> web.Response:
        # A notification (VerneMQ ignores the answer): the session registry forgets the client, so a later
        # revoke does not try to close a session that no longer exists.
        try:
            client_id = text(await read_fields(request), "client_id")
        except Malformed:
            client_id = None
        if client_id is not None:
            pdp.sessions.disconnected(BROKER, client_id)
        return json_answer({"result": "ok"})

    routes.post("/vernemq")(webhook)
