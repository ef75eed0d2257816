"""RabbitMQ ``rabbitmq_auth_backend_http`` as used by its MQTT plugin: ``/rabbitmq/user``, ``/vhost``,
``/resource``, ``/topic`` (POST form or GET query; answers are the bare words ``allow`` / ``deny``).

The MQTT plugin turns an MQTT topic into an AMQP routing key by mapping ``/`` to ``.`` and ``+`` to ``*``
(``#`` stays). ``/topic`` maps it back (``.`` to ``/``, ``*`` to ``+``), so policies see a topic whose levels
are exactly the words RabbitMQ routes on. A ``.`` inside an MQTT level therefore becomes a level separator:
the plugin makes ``a.b/c`` and ``a/b/c`` the same routing key, and authhook judges both as ``a/b/c``, which
is what RabbitMQ will deliver. Tenant and channel ids containing ``.`` cannot be addressed through RabbitMQ
(see plugins/rabbitmq/README.md). A routing key holding ``/`` did not come from the MQTT plugin (it never
sends one) and is refused, so the reverse mapping is exact on everything it accepts.

``/vhost`` and ``/resource`` are RabbitMQ plumbing under every MQTT session: the configured vhost, the
configured exchange and the caller's *own* subscription queues ``mqtt-subscription-<client_id>qos0|1``.
They are allowed exactly when the subject may connect; any other vhost or resource (another client's
queue included) is denied. The real question is asked on ``/topic``: ``write`` is a publish, ``read`` a
subscribe.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from authhook.brokers.common import Malformed, TranslationMemo, read_fields, refuse, text
from authhook.config import Settings
from authhook.models import Action, AuthzRequest, Reason, Subject
from authhook.pdp import PDP

BROKER = "rabbitmq"
SUBSCRIPTION_QUEUE_PREFIX = "mqtt-subscription-"
SUBSCRIPTION_QUEUE_SUFFIXES = ("qos0", "qos1")
_TO_MQTT = str.maketrans({".": "/", "*": "+"})
_PERMISSION_ACTIONS = {"write": Action.PUBLISH, "read": Action.SUBSCRIBE}


# -- translate (pure) ---------------------------------------------------------------------------------


def mqtt_topic(routing_key: str) -> str:
    """The MQTT topic (or filter) a routing key stands for: ``m.acme.c.ch.*`` -> ``m/acme/c/ch/+``.

    The inverse of the MQTT plugin's ``/`` -> ``.``, ``+`` -> ``*``. A key with a ``/`` is refused
    (``invalid_topic``): the plugin never produces one, and letting it through would make two different
    keys judge as one topic.
    """
    if "/" in routing_key:
        raise Malformed(
            f"routing key {routing_key[:60]!r} contains '/', which RabbitMQ's MQTT plugin never sends",
            reason=Reason.INVALID_TOPIC,
        )
    return routing_key.translate(_TO_MQTT)


def subject_of(data: dict[str, Any]) -> Subject:
    client_id = text(data, "client_id") or text(data, "variable_map.client_id")
    try:
        return Subject(username=text(data, "username", required=True), client_id=client_id, peer=text(data, "ip"))
    except ValueError:
        raise Malformed("username or client_id contains `+`, `#`, `/` or NUL") from None


def check_vhost(data: dict[str, Any], vhost: str) -> None:
    """Only the configured vhost is MQTT's; a client naming another (``vhost:user`` logins) is refused."""
    asked = text(data, "vhost", required=True)
    if asked != vhost:
        raise Malformed(
            f"vhost {asked!r} is not the configured brokers.rabbitmq_vhost {vhost!r}", reason=Reason.OUTSIDE_NAMESPACE
        )


def own_queues(client_id: str | None) -> frozenset[str]:
    """The subscription queues RabbitMQ's MQTT plugin declares for this client id (one per QoS)."""
    if client_id is None:
        raise Malformed("`client_id` is missing: a subscription queue cannot be tied to its owner")
    return frozenset(f"{SUBSCRIPTION_QUEUE_PREFIX}{client_id}{suffix}" for suffix in SUBSCRIPTION_QUEUE_SUFFIXES)


def check_plumbing(data: dict[str, Any], subject: Subject, exchange: str) -> None:
    """The resource is the MQTT exchange (``read`` to bind, ``write`` to publish: the plugin asks nothing
    else of it), or one of the caller's own subscription queues; else ``Malformed``.

    Another client's queue is refused even for a subject of the same tenant: with ``configure`` or
    ``read`` on it, one could delete it or drain the messages meant for that client.
    """
    resource, name = text(data, "resource"), text(data, "name") or ""
    if resource == "exchange" and name == exchange and text(data, "permission") in ("read", "write"):
        return
    if resource == "queue" and name in own_queues(subject.client_id):
        return
    raise Malformed(f"resource `{resource}` `{name[:80]}` is not this client's MQTT plumbing")


def topic_request(data: dict[str, Any], exchange: str, vhost: str) -> AuthzRequest:
    action = _PERMISSION_ACTIONS.get(text(data, "permission") or "")
    try:
        if action is None:
            raise Malformed("`permission` must be write or read")
        if text(data, "resource") != "topic" or text(data, "name") != exchange:
            raise Malformed(f"only topic permissions on the `{exchange}` exchange are answered")
        check_vhost(data, vhost)
        topic = mqtt_topic(text(data, "routing_key", required=True) or "")
        return AuthzRequest(subject=subject_of(data), action=action, topic=topic)
    except Malformed as exc:  # once `permission` is read, log a bad SUBSCRIBE as a subscribe
        raise (exc.about(action) if action is not None else exc) from None


def word(allowed: bool) -> web.Response:
    # The bare word, no newline: RabbitMQ trims spaces only.
    return web.Response(text="allow" if allowed else "deny", content_type="text/plain")


# -- routes -------------------------------------------------------------------------------------------


def add_routes(routes: web.RouteTableDef, pdp: PDP, settings: Settings) -> None:
    exchange, vhost = settings.brokers.rabbitmq_exchange, settings.brokers.rabbitmq_vhost

    def malformed(action: Action, exc: Malformed, hook: str, subject: Subject | None = None) -> web.Response:
        refuse(pdp, exc, action, broker=BROKER, hook=hook, subject=subject)
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
        subject = None
        try:
            data = await read_fields(request)
            subject = subject_of(data)
            check_vhost(data, vhost)
            if hook == "resource":
                check_plumbing(data, subject, exchange)
        except Malformed as exc:  # logged with who asked, when that much was readable
            return malformed(Action.CONNECT, exc, hook, subject)
        decision = await pdp.authorize(AuthzRequest(subject=subject, action=Action.CONNECT), broker=BROKER, hook=hook)
        return word(decision.allowed)

    async def vhost_check(request: web.Request) -> web.Response:
        return await may_connect(request, "vhost")

    async def resource(request: web.Request) -> web.Response:
        return await may_connect(request, "resource")

    translate_topic = TranslationMemo(lambda data: topic_request(data, exchange, vhost))

    async def topic(request: web.Request) -> web.Response:
        try:
            authz = await translate_topic(request)
        except Malformed as exc:
            return malformed(Action.PUBLISH, exc, "topic")
        verdict = (
            pdp.cached(authz, broker=BROKER, hook="topic")
            or (await pdp.authorize(authz, broker=BROKER, hook="topic")).verdict
        )
        return word(verdict.allowed)

    for path, handler in (("user", user), ("vhost", vhost_check), ("resource", resource), ("topic", topic)):
        routes.post(f"/rabbitmq/{path}")(handler)
        routes.get(f"/rabbitmq/{path}")(handler)
