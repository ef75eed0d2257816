"""One Cedar authorization through cedarpy, as cheaply as cedarpy allows, with the public API as fallback.

``cedarpy.is_authorized`` wraps a compiled call that returns the answer as JSON text: the wrapper copies
the request into a list, parses the text with the standard ``json`` module and builds result objects around
it. For authhook's reference policies that wrapping cost ~18 µs of a ~75 µs call. ``authorize`` below makes
the same compiled call (``cedarpy._internal.is_authorized``, with the handles the public classes hold) and
reads the text with orjson.

That compiled entry point is not public API, so it is used only after ``probe`` has asked it and the
public function the same questions (once per process) and got the same answers (decision, policy ids,
errors); with any other cedarpy, or any difference, every call goes through ``cedarpy.is_authorized``.
``pyproject.toml`` pins cedarpy to the 4.x line this was checked against.
"""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Callable
from typing import Any

import cedarpy
import orjson

log = logging.getLogger("authhook.evaluators.cedar")

# (request, policies, entities, schema) -> (allowed, ids of the deciding policies, errors)
Authorize = Callable[[dict[str, Any], cedarpy.PolicySet, cedarpy.Entities, Any], tuple[bool, list[str], list[str]]]


def authorize_public(
    query: dict[str, Any], policies: cedarpy.PolicySet, entities: cedarpy.Entities, schema: Any
) -> tuple[bool, list[str], list[str]]:
    """Through cedarpy's public ``is_authorized``; a policy's ``@id`` stands for it when it has one."""
    result = cedarpy.is_authorized(query, policies, entities, schema)
    diagnostics = result.diagnostics
    annotations = diagnostics.id_annotations_by_reason
    return (
        result.allowed,
        [str(annotations.get(r, r)) for r in diagnostics.reasons],
        [str(e) for e in diagnostics.errors],
    )


def _compiled() -> Callable[..., str] | None:
    try:
        from cedarpy import _internal
    except ImportError:
        return None
    entry = getattr(_internal, "is_authorized", None)
    return entry if callable(entry) else None


_COMPILED = _compiled()


def authorize_compiled(
    query: dict[str, Any], policies: cedarpy.PolicySet, entities: cedarpy.Entities, schema: Any
) -> tuple[bool, list[str], list[str]]:
    """The compiled call ``authorize_public`` makes underneath, without the wrapping (see the module doc)."""
    assert _COMPILED is not None
    answer = orjson.loads(_COMPILED(query, policies, entities._inner, schema, False))
    diagnostics = answer["diagnostics"]
    annotations = diagnostics["id_annotations_by_reason"]
    return (
        answer["decision"] == "Allow",
        [str(annotations.get(r, r)) for r in diagnostics["reason"]],
        [str(e) for e in diagnostics["errors"]],
    )


_PROBE_POLICIES = """
@id("allow-own") permit (principal, action, resource) when { resource in principal.owns };
@id("deny-flagged") forbid (principal, action, resource) when { principal.flagged };
permit (principal, action == Action::"read", resource);
forbid (principal, action, resource) when { principal.missing == 1 };
"""
_PROBE_ENTITIES = [
    {"uid": {"type": "R", "id": "r1"}, "attrs": {}, "parents": []},
    {"uid": {"type": "U", "id": "a"}, "attrs": {"owns": [{"type": "R", "id": "r1"}], "flagged": False}, "parents": []},
    {"uid": {"type": "U", "id": "b"}, "attrs": {"owns": [], "flagged": True}, "parents": []},
]


@functools.cache
def authorizer() -> Authorize:
    """The call to use in this process: ``probe``'s choice, made once."""
    return probe()


def probe() -> Authorize:
    """``authorize_compiled`` if it answers like ``authorize_public`` here, else ``authorize_public``."""
    if _COMPILED is None:
        return authorize_public
    try:
        policies = cedarpy.PolicySet.from_str(_PROBE_POLICIES)
        entities = cedarpy.Entities.from_json_str(json.dumps(_PROBE_ENTITIES))
        for principal, action in (("a", "write"), ("b", "write"), ("b", "read"), ("a", "read"), ("c", "write")):
            query = {
                "principal": {"type": "U", "id": principal},
                "action": {"type": "Action", "id": action},
                "resource": {"type": "R", "id": "r1"},
                "context": "{}",
            }
            compiled = authorize_compiled(query, policies, entities, None)
            public = authorize_public(query, policies, entities, None)
            if (compiled[0], sorted(compiled[1]), len(compiled[2])) != (public[0], sorted(public[1]), len(public[2])):
                raise ValueError(f"answers differ for {principal}/{action}: {compiled} != {public}")
    except Exception as exc:  # any surprise at all: the public API it is
        log.warning("cedarpy's compiled call is not used (%s); deciding through cedarpy.is_authorized", exc)
        return authorize_public
    return authorize_compiled
