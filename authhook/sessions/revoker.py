"""Revokes that reach live sessions: after every committed change, re-ask what live sessions were allowed.

Why re-ask instead of diffing the change: a broker only ever holds *allows* it was given (its caches keep
them, an ACL pushed at CONNECT lists them), so the sessions a change can hurt are exactly those of the
subjects for which something this instance allowed is now denied. Asking the evaluator again for those
remembered (action, topic) pairs - and for CONNECT, the client ids in use and any pushed ACL - finds exactly
them, whatever the change was (a disconnect, a disabled or removed client or tenant, a role or group edit,
a new subject that now owns a client id) and whichever evaluator decides. The revision board says when to
look: the watcher reads its write sequence every ``poll_interval_s`` (a memory read) and re-checks only the
subjects whose tenant slot (or the identity slot) moved.

Acting: the store's ``claim_revocation`` lets exactly one instance of a fleet act on a change; the claimant
closes the subject's sessions through every configured broker's management API (``broker_api``), and every
action and every failure is a decision-log event (hook ``revoke``). A failed re-check (store or evaluator
down) is tried again on the next poll rather than read as a deny.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from time import perf_counter
from typing import TYPE_CHECKING

from authhook.models import Action, AuthzRequest, Reason, Subject, Verdict
from authhook.revision import IDENTITY_SLOT, tenant_slot
from authhook.sessions.broker_api import CloseResult, SessionCloser
from authhook.sessions.registry import Pair, SessionRegistry, SubjectWatch

if TYPE_CHECKING:
    from authhook.pdp import PDP

log = logging.getLogger("authhook.revocation")

EVALUATOR = "revocation"  # the evaluator name on decision-log events of revocation actions


@dataclass(frozen=True, slots=True)
class Finding:
    """What one re-check found: the subject lost something this instance had allowed it."""

    username: str
    tenant: str | None
    revision: int  # the store revision the re-check ran at
    allowed_since: int  # the newest revision at which something now denied had been allowed
    denied: frozenset[Pair]
    connect_denied: bool
    must_close: bool  # a cache refresh is not enough: a pushed ACL, a lost subscription, a refused CONNECT
    cause: str  # the first loss, for the log: "publish m/acme/c/x/t: not_connected"


class RevocationWatcher:
    """Re-checks live subjects after changes and closes the sessions of those that lost a grant."""

    def __init__(
        self,
        pdp: PDP,
        registry: SessionRegistry,
        closers: Sequence[SessionCloser],
        *,
        poll_interval_s: float = 0.05,
    ) -> None:
        self._pdp = pdp
        self._registry = registry
        self._closers = list(closers)
        self._poll_interval = poll_interval_s
        self._last_sequence = -1
        self._task: asyncio.Task[None] | None = None

    # -- lifecycle ------------------------------------------------------------------------------
    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="authhook-revocation")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        for closer in self._closers:
            await closer.aclose()

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self._poll_interval)
            try:
                await self.check_once()
            except Exception:  # never let the loop die: the next change must still be acted on
                log.exception("revocation check failed")

    # -- one pass -------------------------------------------------------------------------------
    async def check_once(self) -> list[CloseResult]:
        """Re-check every subject whose slots moved since the last pass; close what lost a grant."""
        board = self._pdp.store.board
        sequence = board.sequence()
        if sequence % 2:  # a write is in flight (or the change feed is lost): look again next poll
            return []
        pending = self._registry.pending
        if sequence == self._last_sequence and not pending:
            return []
        self._last_sequence = sequence
        identity = board.read(IDENTITY_SLOT)
        results: list[CloseResult] = []
        for watch in self._registry.watches():
            slot_value = board.read(tenant_slot(watch.tenant)) if watch.tenant is not None else identity
            unmoved = slot_value == watch.slot_value and identity == watch.identity_value
            if unmoved and watch.username not in pending:
                continue
            try:
                # The slot values from before asking: a change landing meanwhile moves them again, next pass.
                finding = await self._recheck(watch, slot_value, identity)
            except Exception:
                log.exception("re-checking `%s` failed; it is tried again on the next pass", watch.username)
                self._registry.pending.add(watch.username)
                finding = None
            if finding is None:
                continue
            results += await self._act(finding)
        return results

    async def _recheck(self, watch: SubjectWatch, slot_value: int, identity: int) -> Finding | None:
        pdp = self._pdp
        username = watch.username
        denied: set[Pair] = set()
        causes: list[str] = []
        allowed_since = -1
        revision = -1

        def fresh(verdict: Verdict) -> bool:
            """Whether a real answer came; on a failure the subject stays pending for the next pass."""
            nonlocal revision
            revision = max(revision, verdict.revision)
            if verdict.failed:
                self._registry.pending.add(username)
            return not verdict.failed

        connect = await pdp.evaluate_fresh(AuthzRequest(subject=Subject(username=username), action=Action.CONNECT))
        if not fresh(connect):
            return None  # left pending (slots unmarked): tried again next pass
        connect_denied = not connect.allowed
        if connect_denied:
            causes.append(f"connect: {connect.reason.value}")
            allowed_since = max([watch.connected_at or 0, watch.acl_at, *watch.pairs.values()])
        else:
            for session in self._registry.sessions_of(username):
                refusal = await pdp.client_id_refusal(username, session.client_id)
                if refusal is not None:
                    connect_denied = True
                    causes.append(f"client id {session.client_id}: {refusal.reason.value}")
                    allowed_since = max(allowed_since, watch.connected_at or 0)
                    break
        if not connect_denied:
            for pair, allowed_at in list(watch.pairs.items()):
                action, topic = pair
                verdict = await pdp.evaluate_fresh(
                    AuthzRequest(subject=Subject(username=username), action=action, topic=topic)
                )
                if not fresh(verdict):
                    return None
                if not verdict.allowed:
                    denied.add(pair)
                    causes.append(f"{action.value} {topic}: {verdict.reason.value}")
                    allowed_since = max(allowed_since, allowed_at)
            if watch.acl is not None:
                grants = await pdp.grants(username)
                if grants != watch.acl:
                    causes.append("the ACL pushed at CONNECT changed")
                    allowed_since = max(allowed_since, watch.acl_at)
            if watch.overflow and not causes:
                causes.append("a change in its tenant, with more allowed topics than the registry remembers")
                allowed_since = max([watch.connected_at or 0, *watch.pairs.values()])
        watch.slot_value, watch.identity_value, watch.checked_at = slot_value, identity, revision
        self._registry.pending.discard(username)
        if not causes:
            return None
        return Finding(
            username,
            watch.tenant,
            revision,
            allowed_since,
            frozenset(denied),
            connect_denied,
            connect_denied or watch.acl is not None or any(action is Action.SUBSCRIBE for action, _ in denied),
            causes[0] + (f" (and {len(causes) - 1} more)" if len(causes) > 1 else ""),
        )

    async def _act(self, finding: Finding) -> list[CloseResult]:
        pdp = self._pdp
        username = finding.username
        client_ids = sorted({s.client_id for s in self._registry.sessions_of(username)})
        try:
            claimed = await pdp.store.claim_revocation(username, finding.allowed_since, finding.revision)
        except Exception as exc:  # the store is down: act anyway; closing twice beats not closing
            log.warning("revocation claim for `%s` failed, acting without it: %s", username, exc)
            claimed = True
        results: list[CloseResult] = []
        if claimed:
            started = perf_counter()
            outcomes = await asyncio.gather(
                *(
                    closer.close_sessions(
                        username, client_ids, reason=f"authhook revoke: {finding.cause}", must_close=finding.must_close
                    )
                    for closer in self._closers
                ),
                return_exceptions=True,
            )
            latency_us = (perf_counter() - started) * 1e6
            for closer, outcome in zip(self._closers, outcomes, strict=True):
                if isinstance(outcome, BaseException):
                    outcome = [CloseResult(closer.broker, username, False, f"unexpected error: {outcome!r}")]
                results += outcome
                for result in outcome:
                    self._log(finding, result, latency_us)
        self._registry.closed(username, set(finding.denied), connect_denied=finding.connect_denied)
        return results

    def _log(self, finding: Finding, result: CloseResult, latency_us: float) -> None:
        reason = Reason.SESSION_CLOSED if result.ok else Reason.SESSION_CLOSE_FAILED
        verdict = Verdict(
            False,
            reason,
            f"{result.detail}; because {finding.cause}",
            EVALUATOR,
            finding.revision,
            f"revoke:{finding.cause.split(':', 1)[0]}",
            finding.tenant,
        )
        subject = Subject(username=finding.username)
        request = AuthzRequest(subject=subject, action=Action.CONNECT)
        self._pdp.decision_log.record(request, None, verdict, "bypass", latency_us, result.broker, "revoke")
        if not result.ok:
            log.warning("could not close a session of `%s` on %s: %s", finding.username, result.broker, result.detail)
