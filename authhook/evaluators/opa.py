"""OPA evaluators: the channel model as Rego (``policy/opa/authhook.rego``), embedded or remote.

Both gather the same ``Facts`` as the in-house evaluator, turn them into one input document
(``build_input``; the shape is documented in ``policy/README.md``) and ask for
``data.authhook.mqtt.decision``. The policy decides: which blocks apply, which channels they cover, deny
over allow, the order of the steps. It answers with a reason code (and the position of the deciding
block); ``to_verdict`` checks that answer and words the human-readable detail from it and the facts.
Only MQTT filter algebra for broker ``$`` topics is precomputed per topic-scoped block
(``grants_topic``, ``overlaps_topic``): the same ``authhook.topics`` functions every engine uses.

* ``EmbeddedOpaEvaluator`` runs the policy in-process with rego-cpp (``regopy``): the module is compiled
  once into a bundle, and each call only sets the input and runs the bundle's entrypoint.
* ``RemoteOpaEvaluator`` asks an OPA server over its Data API, with a per-call deadline, bounded retries
  and a circuit breaker so a dead or slow OPA costs a fail-fast deny instead of a stalled broker.

Anything but a well-formed decision object - an undefined result, an engine error, a malformed value -
raises ``EvaluatorUnavailable``; the decision point turns that into a fail-closed deny.
"""

from __future__ import annotations

import asyncio
import ctypes
import json
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp

from authhook.breaker import CircuitBreaker
from authhook.errors import ConfigError, EvaluatorUnavailable
from authhook.evaluators.wording import describe
from authhook.models import ACTION_BIT, Action, AuthzRequest, Reason, Target, Verdict
from authhook.policy_files import reference_policy
from authhook.store.base import BlockFact, Effect, Facts, ScopeKind, Store
from authhook.topics import filter_covers, filters_overlap, topic_matches

EMBEDDED_NAME = "opa-embedded"
REMOTE_NAME = "opa-remote"
DECISION_PATH = "authhook/mqtt/decision"  # the rule both evaluators query: data.authhook.mqtt.decision
DEFAULT_POLICY_PATH = reference_policy("opa", "authhook.rego")


# -- the input document -----------------------------------------------------------------------------

# connection and block actions as names, per ActionSet bit pattern (tuples: shared, never mutated)
_ACTION_NAMES: tuple[tuple[str, ...], ...] = tuple(
    tuple(action.value for action in Action if bits & ACTION_BIT[action]) for bits in range(8)
)


def _block_input(block: BlockFact, target: Target) -> dict[str, Any]:
    # keys in the order the policy reads them (rego-cpp finds an object key by a linear scan)
    entry: dict[str, Any] = {
        "effect": block.effect.value,
        "actions": _ACTION_NAMES[block.actions & 7],
        "scope": block.scope.value,
        "ref": block.ref,
        "id": f"role:{block.role}/block:{block.block}",
    }
    if block.scope is ScopeKind.TOPIC:
        # MQTT filter algebra, not policy: does this block's `$` filter reach the requested topic?
        ref, topic = block.ref, target.topic
        grants = overlaps = False
        if ref is not None and topic is not None:
            grants = filter_covers(ref, topic) if target.is_filter else topic_matches(ref, topic)
            overlaps = filters_overlap(ref, topic)
        entry["grants_topic"] = grants
        entry["overlaps_topic"] = overlaps
    return entry


def build_input(request: AuthzRequest, target: Target, facts: Facts) -> dict[str, Any]:
    """The OPA input document for one decision: a pure function of the request, target and facts.

    Keys come in the order the policy's common path reads them: rego-cpp looks a key up by scanning an
    object's items in order, at about a microsecond per item passed, so the order is a cost, not cosmetics.
    """
    address = target.address
    subject = facts.subject
    return {
        "action": request.action.value,
        "subject": None
        if subject is None
        else {
            "enabled": subject.enabled,
            "tenant_enabled": subject.tenant_enabled,
            "tenant": subject.tenant,
            "id": subject.id,
        },
        "claimed_tenant": request.subject.tenant,
        "address": None if address is None else {"tenant": address.tenant, "channel": address.channel},
        "channel_exists": facts.channel_exists,
        "blocks": [_block_input(block, target) for block in facts.blocks],
        "connection": _ACTION_NAMES[facts.connection & 7],
        "channel_groups": list(facts.channel_groups),
        "topic": target.topic,
        "system": target.is_system,
    }


# build_input's keys, for the native path that pushes the same document without building it
_INPUT_KEYS_TOP = (
    "action",
    "subject",
    "claimed_tenant",
    "address",
    "channel_exists",
    "blocks",
    "connection",
    "channel_groups",
    "topic",
    "system",
)
_INPUT_KEYS = (*_INPUT_KEYS_TOP, "enabled", "tenant_enabled", "tenant", "id", "channel")


async def _facts_for(store: Store, request: AuthzRequest, target: Target) -> Facts:
    """The same store question ``InHouseEvaluator.evaluate`` asks (no question without a subject key)."""
    key = request.subject.key
    if key is None:
        return Facts(0, None)
    address = target.address
    tenant = address.tenant if address is not None else None
    channel = address.channel if address is not None and tenant is not None else None
    return await store.facts(key, tenant, channel)


# -- the answer -------------------------------------------------------------------------------------


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


# the reasons the model can give, by verdict; a block names the decision for two of them
_ALLOW_REASONS = frozenset({Reason.CONNECTED, Reason.ROLE_GRANT, Reason.SUBJECT_ACTIVE})
_DENY_REASONS = frozenset(
    {
        Reason.UNKNOWN_SUBJECT,
        Reason.WRONG_TENANT,
        Reason.TENANT_DISABLED,
        Reason.SUBJECT_DISABLED,
        Reason.MISSING_TOPIC,
        Reason.OUTSIDE_NAMESPACE,
        Reason.SYSTEM_TOPIC,
        Reason.WILDCARD_TOO_BROAD,
        Reason.UNKNOWN_CHANNEL,
        Reason.NOT_CONNECTED,
        Reason.DENIED_BY_BLOCK,
    }
)
_BLOCK_EFFECT = {Reason.DENIED_BY_BLOCK: Effect.DENY, Reason.ROLE_GRANT: Effect.ALLOW}
_REASONS = {reason.value: reason for reason in _ALLOW_REASONS | _DENY_REASONS}


class _Malformed(Exception):
    """The policy's answer does not fit the request and facts it was given."""


def _block_id(block: BlockFact) -> str:
    return f"role:{block.role}/block:{block.block}"


def _explain(
    reason: Reason, block: BlockFact | None, request: AuthzRequest, target: Target, facts: Facts
) -> tuple[str, str | None]:
    """(detail, decided_by) for a reason the policy gave: the in-house wording, from the same facts.

    Which step gave the reason follows from the request's shape (connect, `$` topic, wildcard channel,
    named channel) exactly as in ``decide``; an answer that fits no step is malformed.
    """
    subject = facts.subject
    if reason is Reason.UNKNOWN_SUBJECT:
        key = request.subject.key
        return ("request names no username or subject id" if key is None else f"no client or user `{key}`"), None
    if subject is None:
        raise _Malformed(f"`{reason.value}` for an unknown subject")
    address = target.address
    decided_by: str | None = None
    if reason is Reason.WRONG_TENANT:
        claimed = request.subject.tenant
        if (claimed is None or claimed == subject.tenant) and address is None:
            raise _Malformed("`wrong_tenant` for a request outside any tenant")
    elif reason is Reason.SUBJECT_ACTIVE:
        if request.action is not Action.CONNECT:
            raise _Malformed(f"`subject_active` for a {request.action.value}")
    elif block is not None:
        decided_by = _block_id(block)
        if request.action is Action.CONNECT and reason is not Reason.DENIED_BY_BLOCK:
            raise _Malformed("a role grant for connect")
    elif reason in (Reason.UNKNOWN_CHANNEL, Reason.CONNECTED, Reason.NOT_CONNECTED):
        channel = address.channel if address is not None else None
        if channel is None:
            raise _Malformed(f"`{reason.value}` without a channel")
        if reason is Reason.CONNECTED:
            decided_by = f"connection:{subject.id}/{channel}"
    detail = describe(reason, decided_by if block is not None else None, request, target, subject.id, subject.tenant)
    return detail, decided_by


def to_verdict(
    result: Any, name: str, request: AuthzRequest, target: Target, facts: Facts, trace: list[str] | None
) -> Verdict:
    """Map the policy's decision object to a Verdict; anything malformed is an evaluator failure.

    The verdict is the policy's: ``allowed`` and ``reason`` come from it, checked to agree with each other,
    and ``block`` (required exactly for ``denied_by_block`` and ``role_grant``) must point at a block of
    the matching effect. Only the wording of the detail is done here.
    """
    if not isinstance(result, dict) or not {"allowed", "reason"} <= result.keys() <= {"allowed", "reason", "block"}:
        raise EvaluatorUnavailable(f"{name}: the policy returned a malformed decision")
    allowed = result["allowed"]
    reason = _REASONS.get(result["reason"]) if isinstance(result["reason"], str) else None
    if reason is None:
        raise EvaluatorUnavailable(f"{name}: the policy returned an unknown reason code")
    if not isinstance(allowed, bool) or allowed != (reason in _ALLOW_REASONS):
        raise EvaluatorUnavailable(f"{name}: the policy's verdict does not match its reason `{reason.value}`")
    position = result.get("block")
    block: BlockFact | None = None
    effect = _BLOCK_EFFECT.get(reason)
    if effect is not None:
        blocks = facts.blocks
        if type(position) is not int or not 0 <= position < len(blocks) or blocks[position].effect is not effect:
            raise EvaluatorUnavailable(f"{name}: `{reason.value}` names no {effect.value} block of the input")
        block = blocks[position]
    elif position is not None:
        raise EvaluatorUnavailable(f"{name}: the policy named a block for `{reason.value}`")
    try:
        detail, decided_by = _explain(reason, block, request, target, facts)
    except _Malformed as exc:
        raise EvaluatorUnavailable(f"{name}: the policy's answer does not fit the request: {exc}") from None
    if trace is not None:
        trace.append(f"{name}: data.{DECISION_PATH.replace('/', '.')} at revision {facts.revision} -> {reason.value}")
        trace.append(("allow: " if allowed else "deny: ") + detail + (f" ({decided_by})" if decided_by else ""))
    subject = facts.subject
    return Verdict(allowed, reason, detail, name, facts.revision, decided_by, subject.tenant if subject else None)


# -- embedded (regopy) -------------------------------------------------------------------------------

# characters regopy would print raw inside a result string (see ``regopy_safe``)
_NEEDS_ESCAPE = re.compile(r'["\\\x00-\x1f\x7f-\x9f\u2028\u2029]').search
_encode_json = json.JSONEncoder(ensure_ascii=False).encode


def _safe_text(value: str) -> str:
    return _encode_json(value)[1:-1] if _NEEDS_ESCAPE(value) else value


def regopy_safe(value: Any) -> Any:
    """Escape every string as JSON string content before it enters rego-cpp.

    regopy 1.5.2 prints result strings without re-escaping them, so a topic holding ``"`` or ``\\`` would
    break (or, worse, reshape) the JSON the result is read back from. Pre-escaped strings print as valid
    JSON that decodes to the original text; the escaping is injective and leaves ``/``, ``+`` and ``#``
    alone, so equality tests in the policy still hold.
    """
    if isinstance(value, str):
        return _safe_text(value)
    if isinstance(value, dict):
        return {regopy_safe(k): regopy_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [regopy_safe(v) for v in value]
    return value


_REGO_BUFFER_TOO_SMALL = 2  # REGO_ERROR_BUFFER_TOO_SMALL in rego-cpp's C API


class _Native:
    """Decisions through rego-cpp's C API directly: set the input node by node, run the entrypoint, read
    the result as JSON.

    regopy's ``set_input`` walks a document through Python wrappers that allocate a C buffer per string
    and check every return code, and its ``Output`` parses the result before we do; that overhead, not
    the policy, was most of an embedded decision. This makes the same calls through regopy's own ctypes
    bindings, with strings escaped as in ``regopy_safe``. It is only used when those bindings have the
    signatures written here; otherwise ``RegoPolicy`` uses the public API.
    """

    def __init__(self, interpreter: Any, bundle: Any, entrypoint: str) -> None:
        from regopy import rego_shared  # type: ignore[import-untyped]

        lib = rego_shared.rego
        vp, u32, text = ctypes.c_void_p, ctypes.c_uint32, ctypes.c_char_p
        signatures = {
            "regoNewInput": ([], vp),
            "regoFreeInput": ([vp], None),
            "regoInputString": ([vp, text], u32),
            "regoInputInt": ([vp, ctypes.c_int64], u32),
            "regoInputFloat": ([vp, ctypes.c_double], u32),
            "regoInputBoolean": ([vp, ctypes.c_bool], u32),
            "regoInputNull": ([vp], u32),
            "regoInputObjectItem": ([vp], u32),
            "regoInputObject": ([vp, u32], u32),
            "regoInputArray": ([vp, u32], u32),
            "regoSetInput": ([vp, vp], u32),
            "regoBundleQueryEntrypoint": ([vp, vp, text], vp),
            "regoOutputOk": ([vp], ctypes.c_bool),
            "regoOutputJSONSize": ([vp], u32),
            "regoOutputJSON": ([vp, ctypes.POINTER(ctypes.c_char), u32], u32),
            "regoFreeOutput": ([vp], None),
        }
        for symbol, (argtypes, restype) in signatures.items():
            function = getattr(lib, symbol)
            if list(function.argtypes or ()) != argtypes or function.restype is not restype:
                raise TypeError(f"regopy binds {symbol} differently than expected")
        self._error: Callable[[int], str] = rego_shared.rego_get_error
        self._lib = lib
        self._interpreter: int = interpreter._impl
        self._bundle_handle: int = bundle._impl
        self._keep = (interpreter, bundle)  # the handles above live as long as these objects
        self._entrypoint = entrypoint.encode()
        self._buffer = ctypes.create_string_buffer(1024)
        put_str, put_int, put_float = lib.regoInputString, lib.regoInputInt, lib.regoInputFloat
        put_bool, put_null, put_item = lib.regoInputBoolean, lib.regoInputNull, lib.regoInputObjectItem
        put_object, put_array = lib.regoInputObject, lib.regoInputArray
        texts: dict[str, bytes] = {}  # encoded strings; ids and names recur from decision to decision

        def encode(value: str) -> bytes:
            data = _safe_text(value).encode()
            if len(texts) >= 4096:
                texts.clear()
            texts[value] = data
            return data

        def encoded(value: str) -> bytes:
            return texts.get(value) or encode(value)

        def put(handle: int, value: Any) -> int:
            """Push any JSON-like value; returns the OR of the C return codes (0: all went well)."""
            kind = type(value)
            if kind is str:
                return put_str(handle, encoded(value))  # type: ignore[no-any-return]
            if value is None:
                return put_null(handle)  # type: ignore[no-any-return]
            if kind is bool:
                return put_bool(handle, value)  # type: ignore[no-any-return]
            if kind is dict:
                status = 0
                for key, item in value.items():
                    if type(key) is not str:
                        raise TypeError("object keys must be strings")
                    status |= put_str(handle, encoded(key)) | put(handle, item) | put_item(handle)
                return status | put_object(handle, len(value))  # type: ignore[no-any-return]
            if kind is list or kind is tuple:
                status = 0
                for item in value:
                    status |= put(handle, item)
                return status | put_array(handle, len(value))  # type: ignore[no-any-return]
            if kind is int:
                return put_int(handle, value)  # type: ignore[no-any-return]
            if kind is float:
                return put_float(handle, value)  # type: ignore[no-any-return]
            raise TypeError(f"cannot pass a {kind.__name__} to rego")

        get = texts.get

        def text_or_null(handle: int, value: str | None) -> int:
            if value is None:
                return put_null(handle)  # type: ignore[no-any-return]
            return put_str(handle, get(value) or encode(value))  # type: ignore[no-any-return]

        keys = {key: encoded(key) for key in _INPUT_KEYS}

        def put_decision_input(handle: int, request: AuthzRequest, target: Target, facts: Facts) -> int:
            """Push ``build_input(request, target, facts)`` without building it: the same keys, in the same
            order, with the same values (a test holds the two together)."""
            h, k = handle, keys
            action = request.action.value
            status = put_str(h, k["action"]) | put_str(h, get(action) or encode(action)) | put_item(h)
            status |= put_str(h, k["subject"])
            subject = facts.subject
            if subject is None:
                status |= put_null(h)
            else:
                status |= (
                    put_str(h, k["enabled"]) | put_bool(h, subject.enabled) | put_item(h)
                    | put_str(h, k["tenant_enabled"]) | put_bool(h, subject.tenant_enabled) | put_item(h)
                    | put_str(h, k["tenant"]) | put_str(h, get(subject.tenant) or encode(subject.tenant)) | put_item(h)
                    | put_str(h, k["id"]) | put_str(h, get(subject.id) or encode(subject.id)) | put_item(h)
                    | put_object(h, 4)
                )  # fmt: skip
            status |= put_item(h) | put_str(h, k["claimed_tenant"]) | text_or_null(h, request.subject.tenant)
            status |= put_item(h) | put_str(h, k["address"])
            address = target.address
            if address is None:
                status |= put_null(h)
            else:
                status |= (
                    put_str(h, k["tenant"]) | text_or_null(h, address.tenant) | put_item(h)
                    | put_str(h, k["channel"]) | text_or_null(h, address.channel) | put_item(h)
                    | put_object(h, 2)
                )  # fmt: skip
            status |= put_item(h) | put_str(h, k["channel_exists"]) | put_bool(h, facts.channel_exists) | put_item(h)
            status |= put_str(h, k["blocks"])
            for block in facts.blocks:
                status |= put(h, _block_input(block, target))
            status |= put_array(h, len(facts.blocks)) | put_item(h) | put_str(h, k["connection"])
            names = _ACTION_NAMES[facts.connection & 7]
            for name in names:
                status |= put_str(h, get(name) or encode(name))
            status |= put_array(h, len(names)) | put_item(h) | put_str(h, k["channel_groups"])
            for group in facts.channel_groups:
                status |= put_str(h, get(group) or encode(group))
            status |= put_array(h, len(facts.channel_groups)) | put_item(h)
            status |= put_str(h, k["topic"]) | text_or_null(h, target.topic) | put_item(h)
            status |= put_str(h, k["system"]) | put_bool(h, target.is_system) | put_item(h)
            return status | put_object(h, len(_INPUT_KEYS_TOP))  # type: ignore[no-any-return]

        self._put = put
        self._put_decision_input = put_decision_input

    def run(self, document: Any) -> str:
        """The JSON text of the query result for this input document (``undefined`` when there is none)."""
        return self._run(self._put, document)

    def run_decision(self, request: AuthzRequest, target: Target, facts: Facts) -> str:
        """``run(build_input(request, target, facts))`` without the intermediate document."""
        return self._run(self._put_decision_input, request, target, facts)

    def _run(self, put: Callable[..., int], *args: Any) -> str:
        lib = self._lib
        handle = lib.regoNewInput()
        try:
            if put(handle, *args) or lib.regoSetInput(self._interpreter, handle):
                raise EvaluatorUnavailable("rego refused the input document")
        except TypeError as exc:
            raise EvaluatorUnavailable(f"rego input: {exc}") from None
        finally:
            lib.regoFreeInput(handle)
        output = lib.regoBundleQueryEntrypoint(self._interpreter, self._bundle_handle, self._entrypoint)
        if not output:
            raise EvaluatorUnavailable(f"rego evaluation failed: {self._error(self._interpreter)[:200]}")
        try:
            buffer = self._buffer  # decisions are short: one buffer, sized up when an output needs it
            status = lib.regoOutputJSON(output, buffer, len(buffer))
            if status == _REGO_BUFFER_TOO_SMALL:
                self._buffer = buffer = ctypes.create_string_buffer(lib.regoOutputJSONSize(output))
                status = lib.regoOutputJSON(output, buffer, len(buffer))
            if status:
                raise EvaluatorUnavailable("rego evaluation failed: unreadable output")
            text: str = buffer.value.decode("utf-8", "replace")
            if not lib.regoOutputOk(output):
                raise EvaluatorUnavailable(f"rego evaluation failed: {text[:200]}")
        finally:
            lib.regoFreeOutput(output)
        return text


class RegoPolicy:
    """One Rego module compiled once (rego-cpp bundle) and evaluated for many inputs."""

    def __init__(
        self,
        source: str,
        entrypoint: str = DECISION_PATH,
        module_name: str = "authhook.rego",
        *,
        native: bool = True,
    ) -> None:
        import regopy

        self._entrypoint = entrypoint
        self._rego: Any = regopy.Interpreter()
        try:
            self._rego.add_module(module_name, source)
            self._bundle: Any = self._rego.build(None, [entrypoint])
        except regopy.RegoError as exc:
            raise ConfigError(f"cannot compile the rego policy: {exc}") from exc
        # built-in errors surface as errors, not as a silently undefined result
        self._rego.strict_built_in_errors = True
        self._native: _Native | None = None
        if native:
            try:
                self._native = _Native(self._rego, self._bundle, entrypoint)
            except (ImportError, AttributeError, TypeError):
                self._native = None
        self._results: dict[str, tuple[bool, Any]] = {}  # result text -> parsed; a policy has few answers

    @classmethod
    def from_file(cls, path: Path, entrypoint: str = DECISION_PATH, *, native: bool = True) -> RegoPolicy:
        try:
            source = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError(f"cannot read the rego policy `{path}`: {exc.strerror}") from exc
        return cls(source, entrypoint, path.name, native=native)

    @property
    def native(self) -> bool:
        """Whether decisions go through rego-cpp's C API directly (else through regopy's public API)."""
        return self._native is not None

    def evaluate(self, document: dict[str, Any]) -> tuple[bool, Any]:
        """(defined, value) for one input; raises ``EvaluatorUnavailable`` on an engine error.

        The value may be shared between calls: treat it as read-only. Synchronous and short: no await sits
        between setting the input and querying, so concurrent coroutines cannot interleave on the one
        interpreter.
        """
        native = self._native
        if native is not None:
            return self._parse(native.run(document))
        return self._parse(self._public(document))

    def decide(self, request: AuthzRequest, target: Target, facts: Facts) -> tuple[bool, Any]:
        """``evaluate(build_input(request, target, facts))``, without building the document when native."""
        native = self._native
        if native is not None:
            return self._parse(native.run_decision(request, target, facts))
        return self._parse(self._public(build_input(request, target, facts)))

    def _public(self, document: dict[str, Any]) -> str:
        try:
            self._rego.set_input(regopy_safe(document))
            output = self._rego.query_bundle_entrypoint(self._bundle, self._entrypoint)
            if not output.ok():
                raise EvaluatorUnavailable(f"rego evaluation failed: {str(output)[:200]}")
            return str(output)
        except EvaluatorUnavailable:
            raise
        except Exception as exc:  # RegoError, or regopy's own JSON parse of a broken result
            raise EvaluatorUnavailable(f"rego evaluation failed: {type(exc).__name__}") from exc

    def _parse(self, text: str) -> tuple[bool, Any]:
        known = self._results.get(text)
        if known is not None:
            return known
        if text == "undefined":
            return False, None
        try:
            parsed = strict_json(text)
        except ValueError as exc:
            raise EvaluatorUnavailable("rego evaluation returned unreadable output") from exc
        expressions = parsed.get("expressions") if isinstance(parsed, dict) else None
        if not isinstance(expressions, list) or len(expressions) != 1 or set(parsed) != {"expressions"}:
            raise EvaluatorUnavailable("rego evaluation returned an unexpected result shape")
        result = (True, expressions[0])
        if len(text) <= 200 and len(self._results) < 512:
            self._results[text] = result
        return result


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
        defined, result = self._policy.decide(request, target, facts)
        if not defined:
            raise EvaluatorUnavailable(f"{self.name}: data.authhook.mqtt.decision is undefined")
        return to_verdict(result, self.name, request, target, facts, trace)


# -- remote (OPA Data API) ---------------------------------------------------------------------------


class _Retryable(Exception):
    """A transport failure: worth another attempt, and counted by the breaker."""


class _NotADecision(Exception):
    """OPA answered, but not with a decision (4xx): the request or policy is wrong, OPA itself is up."""


def _opa_error(raw: bytes) -> str:
    """OPA's own account of a refused request (``{"code": ..., "message": ...}``), if it gave one."""
    try:
        body = json.loads(raw)
    except ValueError:
        return ""
    if not isinstance(body, dict):
        return ""
    text = ": ".join(str(body[key]) for key in ("code", "message") if isinstance(body.get(key), str | int))
    return f" ({text[:200]})" if text else ""


class RemoteOpaEvaluator:
    """``PolicyEvaluator`` asking an OPA server: ``POST {url}/v1/data/{path}`` with ``{"input": ...}``.

    ``deadline_s`` bounds the whole call, retries included; a retry is only made while time is left.
    Transport failures (connection errors, timeouts, 5xx, unreadable bodies) are retried and count toward
    the breaker; an answer that is not a decision (undefined, 4xx, malformed) is not retried and does not
    trip the breaker (OPA is up, the policy or request is wrong), but still denies. While the breaker is
    open a call fails at once, before any store read.
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
        self.endpoint = f"{url.rstrip('/')}/v1/data/{path.strip('/')}"
        self.deadline_s = deadline_s
        self.retries = max(0, retries)
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
        ticket = self.breaker.allow()
        if ticket is None:
            if trace is not None:
                trace.append(f"{self.name}: circuit open, not asking {self.endpoint}")
            raise EvaluatorUnavailable("circuit open")
        try:
            facts = await _facts_for(self._store, request, target)
            body = await self._post(build_input(request, target, facts))
        except _Retryable as exc:
            self.breaker.failure(ticket)
            raise EvaluatorUnavailable(f"{self.name}: {exc}") from exc
        except _NotADecision as exc:
            self.breaker.success(ticket)  # OPA is up and answering; the breaker guards availability only
            raise EvaluatorUnavailable(f"{self.name}: {exc}") from exc
        except BaseException:
            self.breaker.cancel(ticket)  # store failure or cancellation: nothing learnt about OPA
            raise
        self.breaker.success(ticket)
        if not isinstance(body, dict) or "result" not in body:
            raise EvaluatorUnavailable(f"{self.name}: data.authhook.mqtt.decision is undefined")
        return to_verdict(body["result"], self.name, request, target, facts, trace)

    async def _post(self, document: dict[str, Any]) -> Any:
        loop = asyncio.get_running_loop()
        end = loop.time() + self.deadline_s
        session = self._client()
        last = "no attempt made"
        for _attempt in range(self.retries + 1):
            left = end - loop.time()
            if left <= 0:
                break
            try:
                async with asyncio.timeout(left):
                    async with session.post(self.endpoint, json={"input": document}) as response:
                        raw = await response.read()
                        status = response.status
            except TimeoutError:
                last = f"no answer within {self.deadline_s * 1000:.0f} ms"
                break  # the deadline is spent: no time for another attempt
            except aiohttp.ClientError as exc:
                last = f"cannot reach opa: {type(exc).__name__}"
                continue
            if status >= 500:
                last = f"opa answered http {status}"
                continue
            if status != 200:
                raise _NotADecision(f"opa answered http {status}{_opa_error(raw)}")
            try:
                return strict_json(raw)
            except ValueError:
                last = "opa answered with unreadable json"
                continue
        raise _Retryable(last)
