"""OPA evaluators: the channel model as Rego (``policy/opa/authhook.rego``), embedded or remote.

Both gather the same ``Facts`` as the in-house evaluator, turn them into one input document
(``build_input``; the shape is documented in ``policy/opa/README.md``) and ask for
``data.authhook.mqtt.decision``. Topic algebra stays in Python: per block the input carries precomputed
``covers_channel``, ``grants_topic`` and ``overlaps_topic`` booleans, so the policy only compares values.

* ``EmbeddedOpaEvaluator`` runs the policy in-process with rego-cpp (``regopy``): the module is compiled
  once into a bundle, and each call only sets the input and runs the bundle's entrypoint.
* ``RemoteOpaEvaluator`` asks an OPA server over its Data API, with a per-call deadline, bounded retries
  and a circuit breaker so a dead or slow OPA costs a fail-fast deny instead of a stalled broker.

Anything but a well-formed decision object - an undefined result, an engine error, a malformed value -
raises ``EvaluatorUnavailable``; the decision point turns that into a fail-closed deny.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp

from authhook.errors import ConfigError, EvaluatorUnavailable
from authhook.models import ACTION_BIT, Action, AuthzRequest, Reason, Target, Verdict
from authhook.policy_files import reference_policy
from authhook.store.base import BlockFact, Facts, ScopeKind, Store
from authhook.topics import filter_covers, filters_overlap, topic_matches

EMBEDDED_NAME = "opa-embedded"
REMOTE_NAME = "opa-remote"
DECISION_PATH = "authhook/mqtt/decision"  # the rule both evaluators query: data.authhook.mqtt.decision
DEFAULT_POLICY_PATH = reference_policy("opa", "authhook.rego")

_DECISION_KEYS = frozenset({"allowed", "reason", "detail", "decided_by"})


# -- the input document -----------------------------------------------------------------------------


def _action_names(bits: int) -> list[str]:
    return [action.value for action in Action if bits & ACTION_BIT[action]]


def _block_input(block: BlockFact, target: Target, channel: str | None, groups: tuple[str, ...]) -> dict[str, Any]:
    scope = block.scope
    ref = block.ref
    topic = target.topic
    if scope is ScopeKind.TENANT:
        covers = True
    elif scope is ScopeKind.CHANNEL:
        covers = channel is not None and ref == channel
    elif scope is ScopeKind.CHANNEL_GROUP:
        covers = channel is not None and ref in groups
    else:
        covers = False
    grants = overlaps = False
    if scope is ScopeKind.TOPIC and ref is not None and topic is not None:
        grants = filter_covers(ref, topic) if target.is_filter else topic_matches(ref, topic)
        overlaps = filters_overlap(ref, topic)
    return {
        "id": f"role:{block.role}/block:{block.block}",
        "role": block.role,
        "block": block.block,
        "scope": scope.value,
        "ref": ref,
        "effect": block.effect.value,
        "actions": _action_names(block.actions),
        "covers_channel": covers,
        "grants_topic": grants,
        "overlaps_topic": overlaps,
    }


def build_input(request: AuthzRequest, target: Target, facts: Facts) -> dict[str, Any]:
    """The OPA input document for one decision: a pure function of the request, target and facts."""
    address = target.address
    channel = address.channel if address is not None and address.tenant is not None else None
    subject = facts.subject
    return {
        "request": {
            "action": request.action.value,
            "key": request.subject.key,
            "claimed_tenant": request.subject.tenant,
        },
        "target": {
            "topic": target.topic,
            "is_filter": target.is_filter,
            "is_system": target.is_system,
            "shared_group": target.shared_group,
            "address": None
            if address is None
            else {"tenant": address.tenant, "channel": address.channel, "subtopic": address.subtopic},
        },
        "subject": None
        if subject is None
        else {
            "id": subject.id,
            "tenant": subject.tenant,
            "kind": subject.kind.value,
            "enabled": subject.enabled,
            "tenant_enabled": subject.tenant_enabled,
        },
        "channel_exists": facts.channel_exists,
        "channel_groups": list(facts.channel_groups),
        "connection": _action_names(facts.connection),
        "blocks": [_block_input(b, target, channel, facts.channel_groups) for b in facts.blocks],
        "revision": facts.revision,
    }


async def _facts_for(store: Store, request: AuthzRequest, target: Target) -> Facts:
    """The same store question ``InHouseEvaluator.evaluate`` asks (no question without a subject key)."""
    key = request.subject.key
    if key is None:
        return Facts(0, None)
    address = target.address
    tenant = address.tenant if address is not None else None
    channel = address.channel if address is not None and tenant is not None else None
    return await store.facts(key, tenant, channel)


def _reject_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise ValueError(f"duplicate key `{key}`")
        result[key] = value
    return result


def strict_json(text: str | bytes) -> Any:
    """Parse JSON, refusing duplicate object keys (a second ``allowed`` must never win silently)."""
    return json.loads(text, object_pairs_hook=_reject_duplicates)


def to_verdict(result: Any, name: str, facts: Facts, trace: list[str] | None) -> Verdict:
    """Map the policy's decision object to a Verdict; anything malformed is an evaluator failure."""
    if not isinstance(result, dict) or set(result) != _DECISION_KEYS:
        raise EvaluatorUnavailable(f"{name}: the policy returned a malformed decision")
    allowed = result["allowed"]
    detail = result["detail"]
    decided_by = result["decided_by"]
    if not isinstance(allowed, bool) or not isinstance(detail, str):
        raise EvaluatorUnavailable(f"{name}: the policy returned a malformed decision")
    if decided_by is not None and not isinstance(decided_by, str):
        raise EvaluatorUnavailable(f"{name}: the policy returned a malformed decision")
    try:
        reason = Reason(result["reason"])
    except ValueError:
        raise EvaluatorUnavailable(f"{name}: the policy returned an unknown reason code") from None
    if trace is not None:
        trace.append(f"{name}: data.{DECISION_PATH.replace('/', '.')} at revision {facts.revision} -> {reason.value}")
        trace.append(("allow: " if allowed else "deny: ") + detail + (f" ({decided_by})" if decided_by else ""))
    subject = facts.subject
    return Verdict(allowed, reason, detail, name, facts.revision, decided_by, subject.tenant if subject else None)


# -- embedded (regopy) -------------------------------------------------------------------------------


def regopy_safe(value: Any) -> Any:
    """Escape every string as JSON string content before it enters rego-cpp.

    regopy 1.5.2 prints result strings without re-escaping them, so a topic holding ``"`` or ``\\`` would
    break (or, worse, reshape) the JSON the result is read back from. Pre-escaped strings print as valid
    JSON that decodes to the original text; the escaping is injective, so equality tests in the policy
    still hold.
    """
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)[1:-1]
    if isinstance(value, dict):
        return {regopy_safe(k): regopy_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [regopy_safe(v) for v in value]
    return value


class RegoPolicy:
    """One Rego module compiled once (rego-cpp bundle) and evaluated for many inputs."""

    def __init__(self, source: str, entrypoint: str = DECISION_PATH, module_name: str = "authhook.rego") -> None:
        import regopy  # type: ignore[import-untyped]

        self._entrypoint = entrypoint
        self._rego: Any = regopy.Interpreter()
        try:
            self._rego.add_module(module_name, source)
            self._bundle: Any = self._rego.build(None, [entrypoint])
        except regopy.RegoError as exc:
            raise ConfigError(f"cannot compile the rego policy: {exc}") from exc
        # built-in errors (e.g. a bad sprintf) surface as errors, not as a silently undefined result
        self._rego.strict_built_in_errors = True

    @classmethod
    def from_file(cls, path: Path, entrypoint: str = DECISION_PATH) -> RegoPolicy:
        try:
            source = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError(f"cannot read the rego policy `{path}`: {exc.strerror}") from exc
        return cls(source, entrypoint, path.name)

    def evaluate(self, document: dict[str, Any]) -> tuple[bool, Any]:
        """(defined, value) for one input; raises ``EvaluatorUnavailable`` on an engine error.

        Synchronous and short (tens of microseconds): no await sits between setting the input and
        querying, so concurrent coroutines cannot interleave on the one interpreter.
        """
        try:
            self._rego.set_input(regopy_safe(document))
            output = self._rego.query_bundle_entrypoint(self._bundle, self._entrypoint)
            if not output.ok():
                raise EvaluatorUnavailable(f"rego evaluation failed: {str(output)[:200]}")
            text = str(output)
        except EvaluatorUnavailable:
            raise
        except Exception as exc:  # RegoError, or regopy's own JSON parse of a broken result
            raise EvaluatorUnavailable(f"rego evaluation failed: {type(exc).__name__}") from exc
        if text == "undefined":
            return False, None
        try:
            parsed = strict_json(text)
        except ValueError as exc:
            raise EvaluatorUnavailable("rego evaluation returned unreadable output") from exc
        expressions = parsed.get("expressions") if isinstance(parsed, dict) else None
        if not isinstance(expressions, list) or len(expressions) != 1 or set(parsed) != {"expressions"}:
            raise EvaluatorUnavailable("rego evaluation returned an unexpected result shape")
        return True, expressions[0]


class EmbeddedOpaEvaluator:
    """``PolicyEvaluator`` running ``policy/opa/authhook.rego`` in-process (rego-cpp via regopy)."""

    name = EMBEDDED_NAME

    def __init__(self, store: Store, policy_path: Path | str = DEFAULT_POLICY_PATH) -> None:
        self._store = store
        self._policy = RegoPolicy.from_file(Path(policy_path))

    async def close(self) -> None:
        return None

    async def evaluate(self, request: AuthzRequest, target: Target, *, trace: list[str] | None = None) -> Verdict:
        facts = await _facts_for(self._store, request, target)
        defined, result = self._policy.evaluate(build_input(request, target, facts))
        if not defined:
            raise EvaluatorUnavailable(f"{self.name}: data.authhook.mqtt.decision is undefined")
        return to_verdict(result, self.name, facts, trace)


# -- remote (OPA Data API) ---------------------------------------------------------------------------


class CircuitBreaker:
    """closed -> open after ``failures`` consecutive failures; open fails fast for ``reset_s``; then
    half-open lets exactly one trial call through: its success closes the breaker, its failure reopens it."""

    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half-open"

    def __init__(self, failures: int = 5, reset_s: float = 5.0, clock: Callable[[], float] = time.monotonic) -> None:
        if failures < 1:
            raise ValueError("breaker_failures must be at least 1")
        self.failures = failures
        self.reset_s = reset_s
        self._clock = clock
        self._state = self.CLOSED
        self._count = 0
        self._opened_at = 0.0
        self._trial = False

    @property
    def state(self) -> str:
        if self._state == self.OPEN and self._clock() - self._opened_at >= self.reset_s:
            return self.HALF_OPEN
        return self._state

    def allow(self) -> bool:
        """May a call go out now? In half-open, only the first caller gets the trial."""
        if self._state == self.CLOSED:
            return True
        if self._state == self.OPEN:
            if self._clock() - self._opened_at < self.reset_s:
                return False
            self._state = self.HALF_OPEN
            self._trial = False
        if self._trial:
            return False
        self._trial = True
        return True

    def success(self) -> None:
        self._state = self.CLOSED
        self._count = 0
        self._trial = False

    def failure(self) -> None:
        if self._state == self.HALF_OPEN:
            self._open()
            return
        self._count += 1
        if self._count >= self.failures:
            self._open()

    def _open(self) -> None:
        self._state = self.OPEN
        self._opened_at = self._clock()
        self._count = 0
        self._trial = False


class _Retryable(Exception):
    """A transport failure: worth another attempt, and counted by the breaker."""


class _NotADecision(Exception):
    """OPA answered, but not with a decision (4xx): the request or policy is wrong, OPA itself is up."""


class RemoteOpaEvaluator:
    """``PolicyEvaluator`` asking an OPA server: ``POST {url}/v1/data/{path}`` with ``{"input": ...}``.

    ``deadline_s`` bounds the whole call, retries included; a retry is only made while time is left.
    Transport failures (connection errors, timeouts, 5xx, unreadable bodies) are retried and count toward
    the breaker; an answer that is not a decision (undefined, 4xx, malformed) is not retried and does not
    trip the breaker (OPA is up, the policy or request is wrong), but still denies.
    """

    name = REMOTE_NAME

    def __init__(
        self,
        store: Store,
        url: str,
        *,
        path: str = DECISION_PATH,
        deadline_s: float = 0.2,
        retries: int = 1,
        breaker_failures: int = 5,
        breaker_reset_s: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._store = store
        self._endpoint = f"{url.rstrip('/')}/v1/data/{path.strip('/')}"
        self._deadline_s = deadline_s
        self._retries = max(0, retries)
        self.breaker = CircuitBreaker(breaker_failures, breaker_reset_s, clock)
        self._session: aiohttp.ClientSession | None = None

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=None), json_serialize=json.dumps, raise_for_status=False
            )
        return self._session

    async def close(self) -> None:
        session, self._session = self._session, None
        if session is not None and not session.closed:
            await session.close()

    async def evaluate(self, request: AuthzRequest, target: Target, *, trace: list[str] | None = None) -> Verdict:
        facts = await _facts_for(self._store, request, target)
        if not self.breaker.allow():
            if trace is not None:
                trace.append(f"{self.name}: circuit open, not asking {self._endpoint}")
            raise EvaluatorUnavailable("circuit open")
        document = build_input(request, target, facts)
        try:
            body = await self._post(document)
        except _Retryable as exc:
            self.breaker.failure()
            raise EvaluatorUnavailable(f"{self.name}: {exc}") from exc
        except _NotADecision as exc:
            self.breaker.success()  # OPA is up and answering; the breaker guards availability only
            raise EvaluatorUnavailable(f"{self.name}: {exc}") from exc
        except BaseException:
            self.breaker.failure()  # cancelled or unexpected: never leave a half-open trial hanging
            raise
        self.breaker.success()
        if not isinstance(body, dict) or "result" not in body:
            raise EvaluatorUnavailable(f"{self.name}: data.authhook.mqtt.decision is undefined")
        return to_verdict(body["result"], self.name, facts, trace)

    async def _post(self, document: dict[str, Any]) -> Any:
        loop = asyncio.get_running_loop()
        end = loop.time() + self._deadline_s
        session = self._client()
        last = "no attempt made"
        for _attempt in range(self._retries + 1):
            left = end - loop.time()
            if left <= 0:
                break
            try:
                async with asyncio.timeout(left):
                    async with session.post(self._endpoint, json={"input": document}) as response:
                        raw = await response.read()
                        status = response.status
            except TimeoutError:
                last = f"no answer within {self._deadline_s * 1000:.0f} ms"
                break  # the deadline is spent: no time for another attempt
            except aiohttp.ClientError as exc:
                last = f"cannot reach opa: {type(exc).__name__}"
                continue
            if status >= 500:
                last = f"opa answered http {status}"
                continue
            if status != 200:
                raise _NotADecision(f"opa answered http {status}")
            try:
                return strict_json(raw)
            except ValueError:
                last = "opa answered with unreadable json"
                continue
        raise _Retryable(last)
