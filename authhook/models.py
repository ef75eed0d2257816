"""The normalized request every broker adapter produces and the decision every evaluator returns.

Requests are pydantic models: they are built once at the edge (adapter, CLI, library caller) where input
must be validated. What the core builds per decision - targets, verdicts, decisions - are named tuples
and a slotted dataclass, because they sit on the hot path: a pydantic model costs ~2 µs to build and a
frozen dataclass ~1 µs, against ~0.4 µs for a named tuple.
``Decision.to_dict`` gives the JSON shape used by the CLI, the decision log and the HTTP API.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntFlag, StrEnum
from typing import Annotated, Any, Literal, NamedTuple

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from authhook.topics import MAX_IDENTITY_LENGTH, ChannelAddress


class Action(StrEnum):
    """What the broker asks about."""

    CONNECT = "connect"
    PUBLISH = "publish"
    SUBSCRIBE = "subscribe"


class ActionSet(IntFlag):
    """Actions as bits, the form stored for connections and permission blocks."""

    NONE = 0
    CONNECT = 1
    PUBLISH = 2
    SUBSCRIBE = 4

    @classmethod
    def of(cls, actions: Any) -> ActionSet:
        result = cls.NONE
        for action in actions:
            result |= cls[Action(action).name]
        return result

    def names(self) -> list[str]:
        return [a.value for a in Action if self & ActionSet[a.name]]


# Plain ints for the hot path: IntFlag arithmetic runs in Python (enum.__and__), int arithmetic in C.
ACTION_BIT: dict[Action, int] = {a: int(ActionSet[a.name]) for a in Action}


class Reason(StrEnum):
    """Machine-readable reason codes; stable, because operators alert and query on them."""

    # allow
    CONNECTED = "connected"
    ROLE_GRANT = "role_grant"
    SUBJECT_ACTIVE = "subject_active"
    AUTHENTICATED = "authenticated"
    HEALTH_TOPIC = "health_topic"
    # deny: the request itself
    INVALID_TOPIC = "invalid_topic"
    INVALID_FILTER = "invalid_filter"
    INVALID_SHARED_SUBSCRIPTION = "invalid_shared_subscription"
    INVALID_IDENTITY = "invalid_identity"
    MISSING_TOPIC = "missing_topic"
    MALFORMED_REQUEST = "malformed_request"
    NOT_SUPERUSER = "not_superuser"
    # deny: the model
    UNKNOWN_SUBJECT = "unknown_subject"
    SUBJECT_DISABLED = "subject_disabled"
    TENANT_DISABLED = "tenant_disabled"
    BAD_CREDENTIALS = "bad_credentials"
    OUTSIDE_NAMESPACE = "outside_namespace"
    SYSTEM_TOPIC = "system_topic"
    WRONG_TENANT = "wrong_tenant"
    UNKNOWN_CHANNEL = "unknown_channel"
    NOT_CONNECTED = "not_connected"
    WILDCARD_TOO_BROAD = "wildcard_too_broad"
    DENIED_BY_BLOCK = "denied_by_block"
    # deny: the session around the decision (client ids are part of the tenant boundary)
    CLIENT_ID_MISSING = "client_id_missing"
    CLIENT_ID_NOT_OWNED = "client_id_not_owned"
    # actions on live sessions after a revoke (decision-log events, not answers to a broker)
    SESSION_CLOSED = "session_closed"
    SESSION_CLOSE_FAILED = "session_close_failed"
    # deny: failures (fail closed; never cached)
    STORE_UNAVAILABLE = "store_unavailable"
    EVALUATOR_UNAVAILABLE = "evaluator_unavailable"
    INTERNAL_ERROR = "internal_error"


FAILURE_REASONS = frozenset({Reason.STORE_UNAVAILABLE, Reason.EVALUATOR_UNAVAILABLE, Reason.INTERNAL_ERROR})

CacheStatus = Literal["hit", "miss", "bypass"]


# '+'/'#' in an identity could smuggle a wildcard into an ACL built from it (EMQX %u/%c), '/' a topic level.
# The same rule as ``topics.validate_identity``, as a pattern so pydantic-core checks it without a Python call.
Identity = Annotated[str, StringConstraints(min_length=1, max_length=MAX_IDENTITY_LENGTH, pattern=r"^[^+#/\x00]+$")]


class Subject(BaseModel):
    """Who is asking: what the broker knows about the MQTT session.

    ``id`` is the client or user id in the store; brokers usually only know the username, which in the
    Magistrala model *is* the client id, so ``id`` defaults to the username.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    id: Identity | None = None
    tenant: str | None = None
    username: Identity | None = None
    client_id: Identity | None = None
    peer: str | None = None

    @property
    def key(self) -> str | None:
        """The id the store knows this subject by."""
        return self.id or self.username


class AuthzRequest(BaseModel):
    """One question: may this subject do this action (on this topic)?"""

    model_config = ConfigDict(frozen=True, extra="forbid")

    subject: Subject
    action: Action
    topic: str | None = Field(default=None, description="topic name (publish) or filter (subscribe)")
    qos: int | None = Field(default=None, ge=0, le=2)
    retain: bool = False

    def cache_key(self) -> tuple[object, ...]:
        """Exactly what a policy can see, so equal keys mean equal answers at one revision.

        Evaluators read the action, the subject (its id, else its username), the tenant the broker claims
        and the topic; nothing else. QoS, retain, the MQTT client id and the peer are not policy inputs (the
        client id is checked once, at CONNECT), so they stay out: a device publishing at QoS 0 and 1 hits the
        same entry. If one of them ever becomes a policy input, it joins the key in the same change.
        """
        return request_cache_key(self)


CacheKey = tuple[object, ...]


def request_cache_key(request: AuthzRequest) -> CacheKey:
    """``AuthzRequest.cache_key``, read from the models' ``__dict__``: the PDP's cache-hit path calls this.

    pydantic models define ``__getattr__``, so every attribute read goes through CPython's slow hook for it
    (~400 instructions each under callgrind). pydantic 2 keeps field values in the instance ``__dict__``: two
    hooked reads and a few dict lookups instead. ``tests/test_cache.py`` holds this to the attribute values
    for generated requests, and checks by behaviour that every field in it changes the answer.
    """
    fields = request.__dict__
    subject = fields["subject"].__dict__
    return (fields["action"], subject["id"] or subject["username"], subject["tenant"], fields["topic"])


class Target(NamedTuple):
    """The request's topic as the core resolved it, handed to every evaluator.

    Topic validation and ``$share/`` stripping happen once in the core so that no evaluator can get
    them wrong; what the address *means* for access is left to the evaluator.
    """

    topic: str | None  # the topic or filter with any $share/<group>/ prefix removed
    address: ChannelAddress | None  # where it points in the channel namespace; None if outside it
    shared_group: str | None = None
    is_filter: bool = False
    is_system: bool = False


class Verdict(NamedTuple):
    """What an evaluator decided. Immutable so the cache can hand one object to many callers."""

    allowed: bool
    reason: Reason
    detail: str
    evaluator: str
    revision: int = 0
    decided_by: str | None = None  # e.g. "connection:dev-1/telemetry" or "role:ops/block:read-all"
    subject_tenant: str | None = None  # the tenant the subject was found in (cache dependency)

    @property
    def failed(self) -> bool:
        """True when no real decision was possible (store or evaluator down)."""
        return self.reason in FAILURE_REASONS


@dataclass(slots=True)
class Decision:
    """One answer to one call: the verdict plus how it was reached this time."""

    verdict: Verdict
    cache: CacheStatus
    latency_us: float

    @property
    def allowed(self) -> bool:
        return self.verdict.allowed

    @property
    def reason(self) -> Reason:
        return self.verdict.reason

    def to_dict(self) -> dict[str, Any]:
        v = self.verdict
        return {
            "allowed": v.allowed,
            "reason": v.reason.value,
            "detail": v.detail,
            "decided_by": v.decided_by,
            "evaluator": v.evaluator,
            "cache": self.cache,
            "revision": v.revision,
            "latency_us": round(self.latency_us, 2),
        }
