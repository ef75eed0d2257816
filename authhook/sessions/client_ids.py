"""Who may connect with which MQTT client id.

A broker keys everything about a session on its client id: the live connection (a second CONNECT with the
same id kicks the first), the messages queued for a persistent session, RabbitMQ's subscription queues
``mqtt-subscription-<clientid>qos0|1``. Whoever connects with a client id takes all of that over, so a
decision about a username is only as safe as the client id that comes with it: one tenant's device that
connects with another tenant's client id would receive that tenant's queued messages.

Ownership is decided the same way under every policy: the owner of a client id is the subject whose id
``u`` is the longest such that the client id is ``u`` itself or ``u`` + a separator + more. Subject ids
are unique across tenants, so every client id has at most one owner, and a subject created later with a
longer matching id takes the id over (the revocation watcher then closes the old holder's session). On top
of that the policy says which shapes a subject may use: ``exact`` (the username itself), ``prefixed`` (the
default: the username, or the username, a separator and a suffix) or ``pattern`` (a per-tenant regular
expression that must name ``{username}``). A client id nobody owns is refused under ``exact`` and
``prefixed``; under ``pattern`` it is refused unless the pattern admits it for this username.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from cachetools import LRUCache

from authhook.config import ClientIdSettings
from authhook.models import Reason
from authhook.revision import IDENTITY_SLOT
from authhook.store.base import Store

MAX_OWNER_LOOKUPS = 16  # candidate owners looked up per client id; a client id with more separators is refused


@dataclass(frozen=True, slots=True)
class Refusal:
    """Why a client id was refused: the reason code brokers see, and the detail the decision log keeps."""

    reason: Reason
    detail: str


@dataclass(frozen=True, slots=True)
class _Rule:
    policy: str
    pattern: str | None


class ClientIdPolicy:
    """Checks (username, client id) pairs against the ownership rule and the tenant's policy.

    Answers are cached per pair for as long as no subject was created or deleted anywhere (the revision
    board's identity slot): ownership depends on nothing else, and RabbitMQ asks again on every queue check.
    """

    def __init__(self, settings: ClientIdSettings, store: Store, *, cache_size: int = 10_000) -> None:
        self._store = store
        self._separators = settings.separators
        self._default = _Rule(settings.policy, settings.pattern)
        self._tenants = {tenant: _Rule(rule.policy, rule.pattern) for tenant, rule in settings.tenants.items()}
        self._compiled: dict[tuple[str, str], re.Pattern[str]] = {}
        self._answers: LRUCache[tuple[str, str], Refusal | None] = LRUCache(cache_size)
        self._identity_value = -1

    async def check(self, username: str, client_id: str, tenant: str | None = None) -> Refusal | None:
        """None when ``username`` may use ``client_id``; else why not.

        ``tenant`` is the subject's tenant when the caller already read it (CONNECT); without it the subject
        is looked up on a miss, and an unknown one owns nothing. A subject's tenant changes only with its
        deletion and re-creation, which moves the identity slot too, so the answer is cached per pair.
        A store failure raises (``AuthhookError``): callers fail closed.
        """
        identity = self._store.board.read(IDENTITY_SLOT)
        if identity != self._identity_value or identity % 2:
            self._answers.clear()
            self._identity_value = identity if identity % 2 == 0 else -1
        key = (username, client_id)
        if key in self._answers:
            return self._answers[key]
        if tenant is None:
            credential = await self._store.credential(username)
            if credential is None:
                return Refusal(Reason.UNKNOWN_SUBJECT, f"no client or user `{username}`")
            tenant = credential.subject.tenant
        refusal = await self._check(username, client_id, tenant)
        if self._identity_value == identity:  # nothing moved while we looked: the answer may be kept
            self._answers[key] = refusal
        return refusal

    async def _check(self, username: str, client_id: str, tenant: str) -> Refusal | None:
        rule = self._tenants.get(tenant, self._default)
        if not self._shape_allowed(rule, username, client_id):
            return Refusal(Reason.CLIENT_ID_NOT_OWNED, self._shape_detail(rule, username, client_id))
        try:
            owner = await self.owner(client_id, unless_longer=None if rule.policy == "pattern" else username)
        except TooManyCandidates:
            return Refusal(
                Reason.CLIENT_ID_NOT_OWNED, f"client id `{client_id}` has more than {MAX_OWNER_LOOKUPS} separators"
            )
        if owner is not None and owner != username:
            # The other subject is not named: it may be another tenant's, and the log is read per tenant.
            return Refusal(Reason.CLIENT_ID_NOT_OWNED, f"client id `{client_id}` belongs to another subject")
        return None

    def _shape_allowed(self, rule: _Rule, username: str, client_id: str) -> bool:
        if rule.policy == "exact":
            return client_id == username
        if rule.policy == "prefixed":
            return client_id == username or (
                len(client_id) > len(username) + 1
                and client_id.startswith(username)
                and client_id[len(username)] in self._separators
            )
        assert rule.pattern is not None
        return self._pattern(rule.pattern, username).fullmatch(client_id) is not None

    def _shape_detail(self, rule: _Rule, username: str, client_id: str) -> str:
        if rule.policy == "exact":
            return f"client id `{client_id}` is not the username `{username}`"
        if rule.policy == "prefixed":
            return (
                f"client id `{client_id}` is neither `{username}` nor `{username}` followed by one of "
                f"`{self._separators}` and more"
            )
        return f"client id `{client_id}` does not match the tenant's client-id pattern for `{username}`"

    def _pattern(self, pattern: str, username: str) -> re.Pattern[str]:
        key = (pattern, username)
        compiled = self._compiled.get(key)
        if compiled is None:
            if len(self._compiled) > 10_000:
                self._compiled.clear()
            compiled = self._compiled[key] = re.compile(pattern.replace("{username}", re.escape(username)))
        return compiled

    async def owner(self, client_id: str, *, unless_longer: str | None = None) -> str | None:
        """The subject id owning ``client_id`` (the longest id that is it or prefixes it at a separator).

        ``unless_longer`` is a subject id already known to own it unless a longer one does (the username,
        once ``prefixed`` or ``exact`` passed): only longer candidates are looked up then. Raises
        ``TooManyCandidates`` past ``MAX_OWNER_LOOKUPS``.
        """
        floor = len(unless_longer) if unless_longer is not None else 0
        candidates = [client_id] if client_id != unless_longer else []
        candidates += [client_id[:i] for i in range(len(client_id) - 1, floor, -1) if client_id[i] in self._separators]
        if len(candidates) > MAX_OWNER_LOOKUPS:
            raise TooManyCandidates(client_id)
        for candidate in candidates:
            if await self._store.credential(candidate) is not None:
                return candidate
        return unless_longer


class TooManyCandidates(Exception):
    """A client id with more separators than ``MAX_OWNER_LOOKUPS``: refused rather than looked up."""
