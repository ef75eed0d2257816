"""RabbitMQ ``rabbitmq_auth_backend_http`` as used by its MQTT plugin: ``/rabbitmq/user``, ``/vhost``,
``/resource``, ``/topic`` (POST form or GET query; answers are the bare words ``allow`` / ``deny``).

The MQTT plugin turns an MQTT topic into an AMQP routing key by mapping ``/`` to ``.`` and ``+`` to ``*``
(``#`` stays). ``/topic`` maps it back (``.`` to ``/``, ``*`` to ``+``), so policies see a topic whose levels
are exactly the words RabbitMQ routes on; ``mqtt_topic`` says why no accepted key has two readings that the
policy would judge differently (see plugins/rabbitmq/README.md).

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
from authhook.errors import AuthhookError
from authhook.models import Action, AuthzRequest, Reason, Subject
from authhook.pdp import PDP
from authhook.sessions.client_ids import Refusal
from authhook.store.base import is_topic_level_id
from authhook.topics import TopicTemplate

BROKER = "rabbitmq"
SUBSCRIPTION_QUEUE_PREFIX = "mqtt-subscription-"
SUBSCRIPTION_QUEUE_SUFFIXES = ("qos0", "qos1")
_TO_MQTT = str.maketrans({".": "/", "*": "+"})
_TO_AMQP = str.maketrans({"/": ".", "+": "*"})
_PERMISSION_ACTIONS = {"write": Action.PUBLISH, "read": Action.SUBSCRIBE}


# -- translate (pure) ---------------------------------------------------------------------------------


def to_routing_key(topic: str) -> str:
    """What RabbitMQ's MQTT plugin makes of an MQTT topic or filter: ``m/acme/c/ch/+`` -> ``m.acme.c.ch.*``."""
    return topic.translate(_TO_AMQP)


def mqtt_topic(routing_key: str, template: TopicTemplate | None = None) -> str:
    """The MQTT topic (or filter) a routing key stands for: ``m.acme.c.ch.*`` -> ``m/acme/c/ch/+``.

    The plugin's mapping is not one to one: a ``.`` inside an MQTT level becomes a level separator, so
    ``m/acme/c/ch/a.b`` and ``m/acme/c/ch/a/b`` are both ``m.acme.c.ch.a.b``. This returns the reading with
    every ``.`` a separator - the words RabbitMQ routes on, and what it delivers to ``m/acme/c/ch/a/#`` - and
    every other reading of an accepted key is judged the same, because the policy reads nothing a ``.``
    could move:

    - Channel topics: the evaluators (in-house, OPA, Cedar) decide on the tenant and channel levels alone;
      no policy input reads the subtopic. Tenant and channel ids cannot contain ``.`` (``TopicLevelId``,
      checked on every write and by ``authhook serve`` for older stores), nor can the template's literal
      levels match a level holding one, so in any reading that is a channel topic the levels up to the
      channel are the same words, naming the same tenant and channel; a ``.`` can only sit in the subtopic.
      (A template whose literals contain ``.`` matches no reading of any key: everything is denied.)
    - ``$`` topics: ``topic`` blocks match the whole topic level by level, and their filters may hold
      ``.`` (EMQX's ``$SYS/brokers/emqx@127.0.0.1/...``), so ``$a.b`` vs ``$a/b`` would matter. A ``$`` key
      of more than one word is refused (``invalid_topic``): RabbitMQ publishes no ``$SYS`` topics, so this
      refuses no broker data, and it also refuses ``$share.g.m.acme...``, where the group/filter boundary
      would be ambiguous. A one-word ``$`` key has one reading.
    - A key with a ``/`` is refused (``invalid_topic``): the plugin never produces one, and it would make
      two different keys judge as one topic.

    With ``template``, a tenant or channel level that is not a valid id (``TopicLevelId``) is refused
    (``invalid_topic``) as well: no such tenant or channel can exist, and it keeps the rule above checked
    here too should the mapping ever change. Wildcard levels (``*``) stay wildcards, judged as such.
    """
    if "/" in routing_key:
        raise Malformed(
            f"routing key {routing_key[:60]!r} contains '/', which RabbitMQ's MQTT plugin never sends",
            reason=Reason.INVALID_TOPIC,
        )
    topic = routing_key.translate(_TO_MQTT)
    if topic[:1] == "$":
        if "/" in topic:
            raise Malformed(
                f"routing key {routing_key[:60]!r} is a `$` topic of several words, which RabbitMQ cannot tell "
                "from one with `.` inside a level (and RabbitMQ has no `$SYS` topics)",
                reason=Reason.INVALID_TOPIC,
            )
        return topic
    address = template.parse_filter(topic) if template is not None else None
    if address is not None:
        for what, level in (("tenant", address.tenant), ("channel", address.channel)):
            if level is not None and not is_topic_level_id(level):
                raise Malformed(
                    f"routing key {routing_key[:60]!r}: the {what} level {level[:60]!r} is not a {what} id",
                    reason=Reason.INVALID_TOPIC,
                )
    return topic


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


def topic_request(
    data: dict[str, Any], exchange: str, vhost: str, template: TopicTemplate | None = None
) -> AuthzRequest:
    action = _PERMISSION_ACTIONS.get(text(data, "permission") or "")
    try:
        if action is None:
            raise Malformed("`permission` must be write or read")
        if text(data, "resource") != "topic" or text(data, "name") != exchange:
            raise Malformed(f"only topic permissions on the `{exchange}` exchange are answered")
        check_vhost(data, vhost)
        topic = mqtt_topic(text(data, "routing_key", required=True) or "", template)
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
        if subject.client_id is not None and subject.username is not None:
            # The queues are named after the client id: the caller must own it, not just have connected.
            try:
                refusal = await pdp.client_id_refusal(subject.username, subject.client_id)
            except AuthhookError as exc:
                refusal = Refusal(Reason.STORE_UNAVAILABLE, str(exc))
            if refusal is not None:
                return malformed(Action.CONNECT, Malformed(refusal.detail, reason=refusal.reason), hook, subject)
        decision = await pdp.authorize(AuthzRequest(subject=subject, action=Action.CONNECT), broker=BROKER, hook=hook)
        return word(decision.allowed)

    async def vhost_check(request: web.Request) -> web.Response:
        return await may_connect(request, "vhost")

    async def resource(request: web.Request) -> web.Response:
        return await may_connect(request, "resource")

    translate_topic = TranslationMemo(lambda data: topic_request(data, exchange, vhost, pdp.template))

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
