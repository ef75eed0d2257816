"""RabbitMQ ``rabbitmq_auth_backend_http`` as used by its MQTT plugin: ``/rabbitmq/user``, ``/vhost``,
``/resource``, ``/topic`` (POST form or GET query; answers are the bare words ``allow`` / ``deny``).

The MQTT plugin turns an MQTT topic into an AMQP routing key by swapping ``/`` and ``.`` and mapping
``+`` to ``*``; ``/topic`` converts it back, so policies see the MQTT topic the client used. ``/vhost`` and
``/resource`` are RabbitMQ plumbing under every MQTT session (the ``amq.topic`` exchange, the
``mqtt-subscription-*`` queues): they are allowed exactly when the subject may connect; any other
resource is denied. The real question is asked on ``/topic``: ``write`` is a publish, ``read`` a
subscribe.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from authhook.brokers.common import Malformed, TranslationMemo, read_fields, text
from authhook.config import Settings
from authhook.models import Action, AuthzRequest, Reason, Subject
from authhook.pdp import PDP

BROKER = "rabbitmq"
SUBSCRIPTION_QUEUE_PREFIX = "mqtt-subscription-"
_TO_MQTT = str.maketrans({".": "/", "/": ".", "*": "+"})


# -- translate (pure) ---------------------------------------------------------------------------------


def mqtt_topic(routing_key: str) -> str:
    """The MQTT topic (or filter) a routing key came from: ``m.acme.c.ch.*`` -> ``m/acme/c/ch/+``."""
    return routing_key.translate(_TO_MQTT)


def subject_of(data: dict[str, Any]) -> Subject:
    client_id = text(data, "client_id") or text(data, "variable_map.client_id")
    try:
        return Subject(username=text(data, "username", required=True), client_id=client_id, peer=text(data, "ip"))
    except ValueError:
        raise Malformed("username or client_id contains `+`, `#`, `/` or NUL") from None


def is_mqtt_plumbing(data: dict[str, Any], exchange: str) -> bool:
    resource, name = text(data, "resource"), text(data, "name") or ""
    if resource == "exchange":
        return name == exchange
    return resource == "queue" and name.startswith(SUBSCRIPTION_QUEUE_PREFIX)


def topic_request(data: dict[str, Any], exchange: str) -> AuthzRequest:
    if text(data, "resource") != "topic" or text(data, "name") != exchange:
        raise Malformed(f"only topic permissions on the `{exchange}` exchange are answered")
    permission = text(data, "permission")
    if permission not in ("write", "read"):
        raise Malformed("`permission` must be write or read")
    action = Action.PUBLISH if permission == "write" else Action.SUBSCRIBE
    return AuthzRequest(
        subject=subject_of(data), action=action, topic=mqtt_topic(text(data, "routing_key", required=True) or "")
    )


def word(allowed: bool) -> web.Response:
    # The bare word, no newline: RabbitMQ trims spaces only.
    return web.Response(text="allow" if allowed else "deny", content_type="text/plain")


# -- routes -------------------------------------------------------------------------------------------


def add_routes(app: web.Application, pdp: PDP, settings: Settings) -> None:
    exchange = settings.brokers.rabbitmq_exchange

    def malformed(action: Action, exc: Malformed, hook: str) -> web.Response:
        pdp.refuse(action, Reason.MALFORMED_REQUEST, str(exc), broker=BROKER, hook=hook)
        return word(False)

    async def user(request: web.Request) -> web.Response:
        try:
            data = await read_fields(request)
            subject = subject_of(data)
            password = text(data, "password")
        except Malformed as exc:
            return malformed(Action.CONNECT, exc, "user")
        decision = await pdp.authenticate(
            subject.username, password, client_id=subject.client_id, broker=BROKER, hook="user"
        )
        return word(decision.allowed)

    async def may_connect(request: web.Request, hook: str) -> web.Response:
        try:
            data = await read_fields(request)
            subject = subject_of(data)
            if hook == "resource" and not is_mqtt_plumbing(data, exchange):
                raise Malformed(f"resource `{text(data, 'resource')}` `{text(data, 'name')}` is not MQTT plumbing")
        except Malformed as exc:
            return malformed(Action.CONNECT, exc, hook)
        decision = await pdp.authorize(AuthzRequest(subject=subject, action=Action.CONNECT), broker=BROKER, hook=hook)
        return word(decision.allowed)

    async def vhost(request: web.Request) -> web.Response:
        return await may_connect(request, "vhost")

    async def resource(request: web.Request) -> web.Response:
        return await may_connect(request, "resource")

    translate_topic = TranslationMemo(lambda data: topic_request(data, exchange))

    async def topic(request: web.Request) -> web.Response:
        try:
            authz = await translate_topic(request)
        except Malformed as exc:
            return malformed(Action.PUBLISH, exc, "topic")
        decision = await pdp.authorize(authz, broker=BROKER, hook="topic")
        return word(decision.allowed)

    for path, handler in (("user", user), ("vhost", vhost), ("resource", resource), ("topic", topic)):
        app.router.add_post(f"/rabbitmq/{path}", handler)
        app.router.add_get(f"/rabbitmq/{path}", handler)
