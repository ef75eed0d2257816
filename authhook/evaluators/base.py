"""The one interface every policy engine implements."""

from __future__ import annotations

from typing import NamedTuple, Protocol, runtime_checkable

from authhook.models import Action, AuthzRequest, Target, Verdict


@runtime_checkable
class PolicyEvaluator(Protocol):
    """Decides one request.

    Contract: the same request at the same store revision yields the same verdict (this is what makes
    caching legal); failures raise ``AuthhookError`` subclasses and the decision point turns them into a
    fail-closed deny; ``trace``, when given, receives one line per step for ``explain``.
    """

    name: str

    async def evaluate(self, request: AuthzRequest, target: Target, *, trace: list[str] | None = None) -> Verdict: ...

    async def close(self) -> None: ...


class Grants(NamedTuple):
    """Everything one subject may do, listed up front (for brokers that enforce a session ACL locally)."""

    tenant: str
    channels: dict[Action, tuple[str, ...]]  # per action: the existing channels it is allowed on, expanded
    tenant_wide: frozenset[Action]  # actions whose wildcard-channel filters are allowed (no deny in the way)
    system: tuple[tuple[str, Action, bool], ...]  # ($ topic filter, action, allowed), denials first


@runtime_checkable
class AclProvider(Protocol):
    """An evaluator that can list a subject's grants; optional, checked once at wiring time."""

    async def grants(self, subject: str) -> Grants | None:
        """None when the subject is unknown or may not connect."""
        ...
