"""The policy decision point: the one object adapters, the CLI and library users ask.

It resolves the topic (validation, ``$share/`` stripping, template) once, asks the cache and then the
evaluator, turns every failure into a fail-closed deny that says why, and writes exactly one decision-log
event per call. It never raises to its caller for a decision; only setup errors raise.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass, field
from pathlib import Path
from time import perf_counter
from types import TracebackType
from typing import Any

from authhook.cache import DecisionCache
from authhook.config import ClientIdSettings, Settings, load_settings
from authhook.credentials import SecretHasher, load_or_create_pepper
from authhook.decision_log import DecisionLog
from authhook.errors import AuthhookError, EvaluatorError, InvalidInput, StoreError
from authhook.evaluators import build_evaluator
from authhook.evaluators.base import AclProvider, Grants, PolicyEvaluator
from authhook.evaluators.inhouse import InHouseEvaluator
from authhook.models import (
    Action,
    AuthzRequest,
    CacheKey,
    CacheStatus,
    Decision,
    Reason,
    Subject,
    Target,
    Verdict,
    request_cache_key,
)
from authhook.sessions.broker_api import build_closers
from authhook.sessions.client_ids import ClientIdPolicy, Refusal
from authhook.sessions.registry import SessionRegistry
from authhook.sessions.revoker import RevocationWatcher
from authhook.store import Store, create_store
from authhook.store.base import SubjectKind
from authhook.topics import (
    TopicError,
    TopicTemplate,
    is_system_topic,
    split_shared,
    validate_identity,
    validate_topic_filter,
    validate_topic_name,
)

log = logging.getLogger("authhook.pdp")

LIBRARY = "library"  # the broker name of in-process callers
# Callers with no broker session behind them: they need no client id, and nothing of theirs is a live session.
SESSIONLESS = frozenset({LIBRARY, "cli", "api"})
CORE = "core"  # the evaluator name on verdicts the core reaches before any evaluator runs
_TOPIC_REASONS = {
    "invalid_topic": Reason.INVALID_TOPIC,
    "invalid_filter": Reason.INVALID_FILTER,
    "invalid_shared_subscription": Reason.INVALID_SHARED_SUBSCRIPTION,
    "invalid_identity": Reason.INVALID_IDENTITY,
}


def make_request(
    action: Action | str,
    username: str,
    topic: str | None = None,
    *,
    client_id: str | None = None,
    tenant: str | None = None,
    peer: str | None = None,
    qos: int | None = None,
    retain: bool = False,
) -> AuthzRequest:
    """Shorthand for library callers: ``make_request("publish", "dev-1", "m/acme/c/telemetry")``."""
    subject = Subject(username=username, client_id=client_id, tenant=tenant, peer=peer)
    return AuthzRequest(subject=subject, action=Action(action), topic=topic, qos=qos, retain=retain)


@dataclass(frozen=True, slots=True)
class Explanation:
    """A decision with the path that led to it, step by step."""

    decision: Decision
    steps: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {**self.decision.to_dict(), "steps": self.steps}


class PDP:
    """Authenticate, authorize and explain, in-process, with the cache and decision log in front."""

    def __init__(
        self,
        store: Store,
        hasher: SecretHasher,
        *,
        evaluator: PolicyEvaluator | None = None,
        cache: DecisionCache | None = None,
        decision_log: DecisionLog | None = None,
        template: TopicTemplate | None = None,
        client_ids: ClientIdPolicy | None = None,
        sessions: SessionRegistry | None = None,
        revocation: RevocationWatcher | None = None,
    ) -> None:
        self.store = store
        self.hasher = hasher
        self.evaluator: PolicyEvaluator = evaluator or InHouseEvaluator(store)
        self.cache = cache
        self.decision_log = decision_log or DecisionLog()
        self.template = template or TopicTemplate()
        self.client_ids = client_ids or ClientIdPolicy(ClientIdSettings(), store)
        # Sessions are always learned (CONNECTs are few); allowed pairs only while a watcher can act on them.
        self.sessions = sessions or SessionRegistry(track_pairs=False)
        self.revocation = revocation
        self._reopening: asyncio.Task[None] | None = None

    @classmethod
    def from_settings(cls, settings: Settings | None = None, *, watch_sessions: bool = True, **overrides: Any) -> PDP:
        """Build everything from settings (or ``load_settings(**overrides)``); call ``open`` next.

        ``watch_sessions`` starts the revocation watcher when ``revocation`` names a broker API; one-shot
        commands pass False (they make changes; the serving instances act on them).
        """
        settings = settings or load_settings(**overrides)
        store = create_store(settings.store_url, deadline_s=settings.store_deadline_s)
        if settings.secret_key is not None:
            pepper = settings.secret_key.get_secret_value().encode()
        else:
            key_file = settings.resolved_secret_key_file()
            if key_file is None:
                raise InvalidInput("an in-memory store needs `secret_key` (AUTHHOOK_SECRET_KEY)")
            pepper = load_or_create_pepper(key_file)
        cache = None
        if settings.cache.enabled:
            c = settings.cache
            cache = DecisionCache(store.board, maxsize=c.maxsize, allow_ttl=c.allow_ttl_s, deny_ttl=c.deny_ttl_s)
        decision_log = DecisionLog(
            settings.resolved_decision_log_path(),
            ring_size=settings.decision_log.ring_size,
            flush_interval=settings.decision_log.flush_interval_s,
        )
        closers = build_closers(settings.revocation) if watch_sessions else []
        sessions = SessionRegistry(max_pairs=settings.revocation.max_pairs_per_subject, track_pairs=bool(closers))
        pdp = cls(
            store,
            SecretHasher(pepper),
            evaluator=build_evaluator(settings.evaluator, store),
            cache=cache,
            decision_log=decision_log,
            template=TopicTemplate(settings.topic_template),
            client_ids=ClientIdPolicy(settings.client_ids, store),
            sessions=sessions,
        )
        if closers:
            pdp.revocation = RevocationWatcher(
                pdp, sessions, closers, poll_interval_s=settings.revocation.poll_interval_s
            )
        return pdp

    # -- lifecycle ------------------------------------------------------------------------------
    async def open(self, *, retry_store: bool = False) -> PDP:
        """Open the store and start the decision log.

        With ``retry_store`` (what ``serve`` uses) a database that cannot be reached yet does not stop the
        PDP: it answers every decision with a fail-closed ``store_unavailable`` deny, ``/readyz`` says 503,
        and the store is opened in the background as soon as the database answers. Without it (one-shot
        commands, library callers) the error is raised, so the caller can say so at once.
        """
        await self.decision_log.start()
        try:
            await self.store.open()
        except StoreError as exc:
            if not retry_store:
                await self.decision_log.close()
                raise
            log.error("store unavailable at start, retrying in the background: %s", exc)
            self._reopening = asyncio.create_task(self._open_store_eventually(), name="authhook-store-open")
        if self.revocation is not None:
            self.revocation.start()
        return self

    async def _open_store_eventually(self, first_wait: float = 0.5, longest_wait: float = 10.0) -> None:
        wait = first_wait
        while True:
            await asyncio.sleep(wait)
            try:
                await self.store.open()
            except StoreError as exc:
                log.warning("store still unavailable: %s", exc)
                wait = min(wait * 2, longest_wait)
            else:
                log.info("store open")
                return

    async def close(self) -> None:
        if self._reopening is not None:
            self._reopening.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reopening
            self._reopening = None
        if self.revocation is not None:
            await self.revocation.stop()
        await self.decision_log.close()
        await self.evaluator.close()
        await self.store.close()

    async def __aenter__(self) -> PDP:
        return await self.open()

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    # -- decisions ------------------------------------------------------------------------------
    def cached(
        self, request: AuthzRequest, *, broker: str = "library", hook: str = "authorize", key: CacheKey | None = None
    ) -> Verdict | None:
        """The cached verdict, logged as a hit, or None when ``authorize`` must be awaited.

        The answer ``authorize`` gives on a hit, without a coroutine and without a ``Decision``: broker
        adapters try this first on their hottest path, where an awaited coroutine (~0.2 µs) and the
        ``Decision`` object (~1,700 instructions under callgrind) would be a sizeable part of a ~2 µs hit.

        ``key``, here and in ``authorize``, is ``request.cache_key()`` for a caller that keeps it beside the
        request, as the adapters' translation memo does: it is not built again (~2,000 instructions), and
        when it is the very object the entry was stored under the lookup compares it by identity. It must
        be this request's key: another one would be answered with another request's decision.
        """
        cache = self.cache
        if cache is None:
            return None
        started = perf_counter()
        entry = cache.get(request_cache_key(request) if key is None else key)
        if entry is None:
            return None
        verdict = entry.verdict
        self.decision_log.record(request, entry.target, verdict, "hit", (perf_counter() - started) * 1e6, broker, hook)
        return verdict

    async def authorize(
        self, request: AuthzRequest, *, broker: str = "library", hook: str = "authorize", key: CacheKey | None = None
    ) -> Decision:
        """May this subject publish/subscribe/connect? Never raises; always logged. ``key``: see ``cached``."""
        cache = self.cache
        started = perf_counter()
        if cache is not None:
            if key is None:
                key = request_cache_key(request)  # once, for the lookup and, on a miss, for storing the answer
            entry = cache.get(key)
            if entry is not None:
                decision = Decision(entry.verdict, "hit", (perf_counter() - started) * 1e6)
                self._log(request, entry.target, decision, broker, hook)
                return decision
        target = self.resolve(request)
        if isinstance(target, Verdict):
            decision = Decision(target, "bypass", (perf_counter() - started) * 1e6)
            self._log(request, None, decision, broker, hook)
            return decision
        status: CacheStatus = "bypass"
        if cache is None:
            verdict = await self._evaluate(request, target)
        else:
            assert key is not None
            verdict, status = await cache.get_or_evaluate(key, target, lambda: self._evaluate(request, target))
        if verdict.allowed and self.sessions.track_pairs:
            self._remember_allow(request, verdict)
        decision = Decision(verdict, status, (perf_counter() - started) * 1e6)
        self._log(request, target, decision, broker, hook)
        return decision

    def _remember_allow(self, request: AuthzRequest, verdict: Verdict) -> None:
        """An allow a broker may now keep: the revocation watcher asks it again after every change.

        Only misses pass here. A hit serves an answer first computed (and remembered) on a miss, and the
        registry keeps what is still allowed across a revoke, so nothing a broker holds goes unremembered.
        """
        subject = request.subject.key
        if subject is not None and request.topic is not None and request.action is not Action.CONNECT:
            self.sessions.allowed(subject, verdict.subject_tenant, request.action, request.topic, verdict.revision)

    def _log(self, request: AuthzRequest, target: Target | None, decision: Decision, broker: str, hook: str) -> None:
        self.decision_log.record(request, target, decision.verdict, decision.cache, decision.latency_us, broker, hook)

    async def authenticate(
        self,
        username: str | None,
        password: str | None,
        *,
        client_id: str | None = None,
        peer: str | None = None,
        broker: str = "library",
        hook: str = "connect",
    ) -> Decision:
        """CONNECT: check the secret (client) or password (user), then whether the subject may connect."""
        started = perf_counter()
        verdict: Verdict
        request = AuthzRequest(
            subject=Subject(username=_safe_identity(username), client_id=_safe_identity(client_id), peer=peer),
            action=Action.CONNECT,
        )
        try:
            verdict = await self._authenticate(username, password, client_id, request, broker)
        except Exception as exc:
            verdict = self._failure(exc)
        if verdict.allowed and username and client_id and broker not in SESSIONLESS:
            self.sessions.connected(broker, client_id, username, verdict.subject_tenant, verdict.revision, peer=peer)
        decision = Decision(verdict, "bypass", (perf_counter() - started) * 1e6)
        self._log(request, None, decision, broker, hook)
        return decision

    def refuse(
        self,
        action: Action,
        reason: Reason,
        detail: str,
        *,
        broker: str,
        hook: str,
        username: str | None = None,
        client_id: str | None = None,
    ) -> Decision:
        """Log and return a deny reached before any question could be asked (malformed input, a check
        authhook has no concept for such as superuser); adapters answer it in the broker's vocabulary."""
        subject = Subject(username=_safe_identity(username), client_id=_safe_identity(client_id))
        decision = Decision(_core_deny(reason, detail), "bypass", 0.0)
        self._log(AuthzRequest(subject=subject, action=action), None, decision, broker, hook)
        return decision

    async def client_id_refusal(self, username: str, client_id: str) -> Refusal | None:
        """Why ``username`` may not use ``client_id`` (None: it owns it); for adapters whose broker names an
        object after a client id (RabbitMQ's subscription queues), and for the revocation watcher.

        Answered from the policy's cache while no subject was created or deleted: RabbitMQ asks on every
        queue check. An unknown subject owns nothing; a store failure raises (callers fail closed).
        """
        return await self.client_ids.check(username, client_id)

    async def pushed_acl(self, username: str, tenant: str | None, grants: Grants) -> None:
        """A broker will enforce ``grants`` locally for the session (EMQX's ``acl``): remember them, so the
        revocation watcher closes the session when they shrink. The revision is read after the grants were,
        so it is never older than what they show."""
        if self.sessions.track_pairs:
            try:
                revision = await self.store.revision()
            except AuthhookError:
                revision = 2**62  # unknown: newer than any claim, so a later loss is always acted on
            self.sessions.pushed_acl(username, tenant, grants, revision)

    async def evaluate_fresh(self, request: AuthzRequest) -> Verdict:
        """The evaluator's answer now: no cache, no decision-log event, never raises (failures fail closed)."""
        target = self.resolve(request)
        if isinstance(target, Verdict):
            return target
        return await self._evaluate(request, target)

    async def grants(self, subject: str) -> Grants | None:
        """The subject's grants listed up front, if the evaluator can list them; None on any failure,
        so a broker then asks per PUBLISH/SUBSCRIBE instead of getting a partial list."""
        if not isinstance(self.evaluator, AclProvider):
            return None
        try:
            return await self.evaluator.grants(subject)
        except AuthhookError as exc:
            log.warning("could not list grants for `%s`: %s", subject, exc)
            return None

    async def explain(self, request: AuthzRequest) -> Explanation:
        """The decision as the evaluator reaches it now (no cache), with every step it took."""
        started = perf_counter()
        steps: list[str] = []
        target = self.resolve(request)
        if isinstance(target, Verdict):
            steps.append(target.detail)
            return Explanation(Decision(target, "bypass", (perf_counter() - started) * 1e6), steps)
        if target.shared_group is not None:
            steps.append(f"shared subscription group `{target.shared_group}` stripped: `{target.topic}`")
        address = target.address
        if address is not None:
            steps.append(
                f"topic maps to tenant `{address.tenant or '*'}`, channel `{address.channel or '*'}`"
                + (f", subtopic `{address.subtopic}`" if address.subtopic else "")
            )
        verdict = await self._evaluate(request, target, steps)
        return Explanation(Decision(verdict, "bypass", (perf_counter() - started) * 1e6), steps)

    # -- internals ------------------------------------------------------------------------------
    def resolve(self, request: AuthzRequest) -> Target | Verdict:
        """Validate and map the topic; a Verdict means the request was refused before evaluation."""
        if request.action is Action.CONNECT:
            return Target(None, None)
        topic = request.topic
        if topic is None:
            return _core_deny(Reason.MISSING_TOPIC, f"{request.action.value} without a topic")
        try:
            if request.action is Action.PUBLISH:
                validate_topic_name(topic)
                if is_system_topic(topic):
                    return Target(topic, None, is_system=True)
                return Target(topic, self.template.parse_topic(topic))
            group, inner = split_shared(topic)
            validate_topic_filter(inner)
        except TopicError as exc:
            return _core_deny(_TOPIC_REASONS.get(exc.code, Reason.INVALID_TOPIC), str(exc))
        if is_system_topic(inner):
            return Target(inner, None, group, is_filter=True, is_system=True)
        return Target(inner, self.template.parse_filter(inner), group, is_filter=True)

    async def _evaluate(self, request: AuthzRequest, target: Target, trace: list[str] | None = None) -> Verdict:
        try:
            return await self.evaluator.evaluate(request, target, trace=trace)
        except Exception as exc:
            verdict = self._failure(exc)
            if trace is not None:
                trace.append(f"deny: {verdict.detail}")
            return verdict

    def _failure(self, exc: Exception) -> Verdict:
        """Fail closed, and say why in the decision log."""
        if isinstance(exc, StoreError):
            reason = Reason.STORE_UNAVAILABLE
        elif isinstance(exc, EvaluatorError):
            reason = Reason.EVALUATOR_UNAVAILABLE
        else:
            reason = Reason.INTERNAL_ERROR
        if isinstance(exc, AuthhookError):
            log.warning("decision failed closed: %s", exc)
            detail = str(exc)
        else:
            log.exception("decision failed closed on an unexpected error")
            detail = "internal error (see the server log)"
        return Verdict(False, reason, detail, self.evaluator.name)

    async def _authenticate(
        self, username: str | None, password: str | None, client_id: str | None, request: AuthzRequest, broker: str
    ) -> Verdict:
        if not username or password is None or password == "":
            return _core_deny(Reason.BAD_CREDENTIALS, "username and password are required")
        try:
            validate_identity(username, "username")
            if client_id:
                validate_identity(client_id, "client id")
        except TopicError as exc:
            return _core_deny(Reason.INVALID_IDENTITY, str(exc))
        credential = await self.store.credential(username)
        if credential is None:
            # Same cost as checking a client secret, so an unknown id is not told apart by timing.
            self.hasher.verify_client_secret(password, "hmac-sha256$" + "0" * 64)
            return _core_deny(Reason.UNKNOWN_SUBJECT, f"no client or user `{username}`")
        if credential.subject.kind is SubjectKind.CLIENT:
            valid = self.hasher.verify_client_secret(password, credential.stored_hash)
        else:
            valid = await self.hasher.verify_password(password, credential.stored_hash)
        if not valid:
            return Verdict(
                False,
                Reason.BAD_CREDENTIALS,
                f"wrong secret for `{username}`",
                CORE,
                subject_tenant=credential.subject.tenant,
            )
        verdict = await self.evaluator.evaluate(request, Target(None, None))
        if not verdict.allowed:
            return verdict
        tenant = credential.subject.tenant
        if client_id is None and broker not in SESSIONLESS:
            # A broker session without a client id cannot be tied to its owner (EMQX: `${clientid}` missing
            # from the authn body template); refusing is the only answer that cannot hand a session over.
            return Verdict(
                False,
                Reason.CLIENT_ID_MISSING,
                "the broker sent no client id",
                CORE,
                verdict.revision,
                subject_tenant=tenant,
            )
        if client_id is not None:
            refusal = await self.client_ids.check(username, client_id, tenant)
            if refusal is not None:
                return Verdict(False, refusal.reason, refusal.detail, CORE, verdict.revision, subject_tenant=tenant)
        return Verdict(
            True,
            Reason.AUTHENTICATED,
            f"credentials valid; {verdict.detail}",
            verdict.evaluator,
            verdict.revision,
            f"{credential.subject.kind.value}:{username}",
            credential.subject.tenant,
        )


def _core_deny(reason: Reason, detail: str) -> Verdict:
    return Verdict(False, reason, detail, CORE)


def _safe_identity(value: str | None) -> str | None:
    """Identity for the log record; one that fails validation is dropped rather than logged raw."""
    if value is None:
        return None
    try:
        validate_identity(value, "identity")
    except TopicError:
        return None
    return value


async def open_pdp(config_file: Path | None = None, **overrides: Any) -> PDP:
    """``pdp = await open_pdp(store_url="sqlite:///authhook.db")`` - build from settings and open."""
    return await PDP.from_settings(load_settings(config_file, **overrides)).open()
