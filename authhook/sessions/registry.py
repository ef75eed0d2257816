"""What this PDP instance knows about live broker sessions, and what it has allowed each subject.

Brokers keep allows after they were given: RabbitMQ caches topic checks per connection, EMQX per client
(and node-wide from 6.2), VerneMQ for ``cache-control`` seconds, and an ACL pushed at CONNECT lasts the
whole session. So a revoke only reaches a live session if somebody remembers what was allowed and to whom.
The registry keeps, per subject, the (action, topic) pairs this instance allowed and the store revision it
allowed each at; the revocation watcher (``authhook.sessions.revoker``) asks the evaluator again after every
committed change and closes the sessions of exactly the subjects that lost one of them.

Sessions themselves (broker, client id, peer, since) are learned from CONNECT calls; a broker that offers
a disconnect hook can report the end of one. Both maps are bounded: the oldest session is forgotten past
``max_sessions``, and a subject whose pairs pass ``max_pairs`` is marked ``overflow``: any change in its
tenant then closes its sessions, since what it was allowed is no longer known exactly.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass, field

from authhook.evaluators.base import Grants
from authhook.models import Action

Pair = tuple[Action, str]


@dataclass(slots=True)
class Session:
    """One live MQTT session as a broker reported it at CONNECT."""

    broker: str
    client_id: str
    username: str
    tenant: str | None
    peer: str | None
    since: float  # wall-clock seconds
    node: str | None = None


@dataclass(slots=True)
class SubjectWatch:
    """What one subject was allowed by this instance, each with the store revision it was allowed at."""

    username: str
    tenant: str | None
    connected_at: int | None = None  # store revision of the last allowed CONNECT
    pairs: dict[Pair, int] = field(default_factory=dict)
    overflow: bool = False
    acl: Grants | None = None  # the grants last pushed to a broker at CONNECT (EMQX ``acl``)
    acl_at: int = 0
    slot_value: int = -1  # the revision-board value of the subject's tenant slot when last checked
    identity_value: int = -1
    checked_at: int = -1  # the store revision the last check ran at


class SessionRegistry:
    """In-memory, per instance; the store's revocation claims make a fleet act once per change."""

    def __init__(self, *, max_sessions: int = 100_000, max_pairs: int = 512, track_pairs: bool = True) -> None:
        self.max_sessions = max_sessions
        self.max_pairs = max_pairs
        self.track_pairs = track_pairs
        self._sessions: OrderedDict[tuple[str, str], Session] = OrderedDict()
        self._by_username: dict[str, set[tuple[str, str]]] = {}
        self._subjects: dict[str, SubjectWatch] = {}
        # Subjects to re-check on the next pass whatever the board says: new ones, and those that got an
        # allow decided before a change the watcher had already checked them for.
        self.pending: set[str] = set()

    # -- learning -------------------------------------------------------------------------------
    def connected(
        self,
        broker: str,
        client_id: str,
        username: str,
        tenant: str | None,
        revision: int,
        *,
        peer: str | None = None,
        node: str | None = None,
    ) -> Session:
        key = (broker, client_id)
        self._forget_session(key)
        session = self._sessions[key] = Session(broker, client_id, username, tenant, peer, time.time(), node)
        self._by_username.setdefault(username, set()).add(key)
        while len(self._sessions) > self.max_sessions:
            self._forget_session(next(iter(self._sessions)))
        if self.track_pairs:  # only a revocation watcher reads watches; without one, sessions alone are kept
            watch = self._watch(username, tenant)
            watch.connected_at = revision
            if revision < watch.checked_at:
                self.pending.add(username)
        return session

    def disconnected(self, broker: str, client_id: str) -> None:
        self._forget_session((broker, client_id))

    def _forget_session(self, key: tuple[str, str]) -> None:
        session = self._sessions.pop(key, None)
        if session is not None:
            keys = self._by_username.get(session.username)
            if keys is not None:
                keys.discard(key)
                if not keys:
                    del self._by_username[session.username]

    def allowed(self, username: str, tenant: str | None, action: Action, topic: str, revision: int) -> None:
        """Remember an allow this instance gave (the latest revision wins: see ``revoker``)."""
        watch = self._watch(username, tenant)
        pairs = watch.pairs
        pair = (action, topic)
        if pair not in pairs and len(pairs) >= self.max_pairs:
            watch.overflow = True
            return
        pairs[pair] = revision
        if revision < watch.checked_at:
            # Decided before a change the watcher has already checked this subject for: check it again.
            self.pending.add(username)

    def pushed_acl(self, username: str, tenant: str | None, grants: Grants, revision: int) -> None:
        watch = self._watch(username, tenant)
        watch.acl, watch.acl_at = grants, revision

    def _watch(self, username: str, tenant: str | None) -> SubjectWatch:
        watch = self._subjects.get(username)
        if watch is None or watch.tenant != tenant:
            watch = self._subjects[username] = SubjectWatch(username, tenant)
            self.pending.add(username)
        return watch

    # -- reading --------------------------------------------------------------------------------
    def sessions_of(self, username: str) -> list[Session]:
        return [self._sessions[key] for key in self._by_username.get(username, ())]

    def sessions(self) -> list[Session]:
        return list(self._sessions.values())

    def watches(self) -> list[SubjectWatch]:
        return list(self._subjects.values())

    def watch_of(self, username: str) -> SubjectWatch | None:
        return self._subjects.get(username)

    # -- after a revoke ---------------------------------------------------------------------------
    def closed(self, username: str, denied: set[Pair], *, connect_denied: bool) -> None:
        """The subject's sessions were closed: drop its sessions, the pairs now denied, and the pushed ACL.

        Pairs still allowed are kept: the decision cache may keep serving them to the subject's next
        session without this instance hearing of it again, and a later revoke must still find them.
        """
        for key in list(self._by_username.get(username, ())):
            self._forget_session(key)
        watch = self._subjects.get(username)
        if watch is None:
            return
        for pair in denied:
            watch.pairs.pop(pair, None)
        watch.acl = None  # the next CONNECT pushes a fresh one; ``overflow`` stays: unrecorded pairs may be cached
        if connect_denied:
            watch.connected_at = None
