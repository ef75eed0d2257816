"""Policy evaluators: the in-house model, OPA (Rego, embedded or remote) and Cedar, behind one protocol.

``build_evaluator`` picks one from settings and imports an engine's module only when it is chosen.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from authhook.errors import ConfigError
from authhook.evaluators.base import PolicyEvaluator
from authhook.evaluators.inhouse import InHouseEvaluator
from authhook.store.base import Store

if TYPE_CHECKING:
    from authhook.config import EvaluatorSettings


def build_evaluator(settings: EvaluatorSettings, store: Store) -> PolicyEvaluator:
    """The evaluator ``settings`` names; a missing optional engine is a ``ConfigError`` naming its extra."""
    try:
        return _build(settings, store)
    except ImportError as exc:
        extra = "cedar" if settings.kind == "cedar" else "opa"
        missing = f"pip install 'authhook[{extra}]' ({exc})"
        raise ConfigError(f"evaluator `{settings.kind}` needs an engine that is not installed: {missing}") from exc


def _build(settings: EvaluatorSettings, store: Store) -> PolicyEvaluator:
    if settings.kind == "opa":
        if settings.opa_mode == "remote":
            from authhook.evaluators.opa import RemoteOpaEvaluator

            assert settings.opa_url is not None  # checked by the settings model
            return RemoteOpaEvaluator(
                store,
                settings.opa_url,
                deadline_s=settings.opa_deadline_s,
                retries=settings.opa_retries,
                breaker_failures=settings.opa_breaker_failures,
                breaker_reset_s=settings.opa_breaker_reset_s,
            )
        from authhook.evaluators.opa import DEFAULT_POLICY_PATH, EmbeddedOpaEvaluator

        return EmbeddedOpaEvaluator(store, settings.opa_policy or DEFAULT_POLICY_PATH)
    if settings.kind == "cedar":
        from authhook.evaluators.cedar import DEFAULT_POLICIES, DEFAULT_SCHEMA, CedarEvaluator

        return CedarEvaluator(
            store,
            policies_path=settings.cedar_policies or DEFAULT_POLICIES,
            schema_path=settings.cedar_schema or DEFAULT_SCHEMA,
            entities_file=settings.cedar_entities,
        )
    return InHouseEvaluator(store)


__all__ = ["InHouseEvaluator", "PolicyEvaluator", "build_evaluator"]
