"""LRU+TTL decision cache that never serves an allow after a revoke has committed.

Entries live in a cachetools ``LRUCache`` (bounded memory, least-recently-used eviction) and carry their
own deadline: allows and denies get different TTLs, and checking one float on the hit path costs far
less than ``TLRUCache``'s expiry sweep on every access (measured ~0.8 µs against ~4 µs). A hit moves its
entry to the young end of the LRU order at most once a second (``RECENCY_GRAIN_S``), and otherwise reads
it through the base ``Cache`` lookup: the LRU's own ``__getitem__`` costs two Python frames, ~1,000
instructions of a ~250,000-instruction HTTP round trip, on every hit. Eviction order is then exact to
the second, which is all a 100,000-entry cache that takes far fewer new keys a second needs.

Correctness does not rest on the TTL. Each entry records the revision-board slots its answer depends on
(the topic's tenant and the subject's tenant, or the identity slot when the subject was unknown) and the
values they held; a write moves those slots before it commits, so the very next lookup misses. See
``authhook.revision`` for the protocol. Failures are never cached, and concurrent identical misses share
one evaluation (single flight).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Hashable
from dataclasses import dataclass

from cachetools import Cache, LRUCache

from authhook.models import CacheStatus, Target, Verdict
from authhook.revision import IDENTITY_SLOT, RevisionBoard, tenant_slot

DEFAULT_MAXSIZE = 100_000
DEFAULT_ALLOW_TTL_S = 60.0
DEFAULT_DENY_TTL_S = 10.0
RECENCY_GRAIN_S = 1.0  # how stale an entry's place in the LRU order may get before a hit refreshes it

_peek = Cache.__getitem__  # the plain mapping lookup under LRUCache's, without its order bookkeeping


@dataclass(slots=True)
class CacheEntry:
    verdict: Verdict
    target: Target
    expires: float
    deps: tuple[int, ...]  # flat (slot, value, slot, value)
    refreshed: float  # when a hit (or the store) last put it at the young end of the LRU order


@dataclass(slots=True)
class _Flight:
    """An evaluation under way, and the write sequence it started at (who may share its answer)."""

    future: asyncio.Future[Verdict]
    sequence: int


@dataclass(slots=True)
class CacheStats:
    hits: int = 0
    misses: int = 0
    stale: int = 0  # entries found but invalidated by a write or expired
    shared: int = 0  # misses answered by another caller's in-flight evaluation


class DecisionCache:
    """Verdicts by request key, validated against the revision board on every hit."""

    def __init__(
        self,
        board: RevisionBoard,
        *,
        maxsize: int = DEFAULT_MAXSIZE,
        allow_ttl: float = DEFAULT_ALLOW_TTL_S,
        deny_ttl: float = DEFAULT_DENY_TTL_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if deny_ttl > allow_ttl:
            raise ValueError("deny TTL must not exceed allow TTL")
        self._board = board
        self._words = board.words
        self._lru: LRUCache[Hashable, CacheEntry] = LRUCache(maxsize)
        self._allow_ttl = allow_ttl
        self._deny_ttl = deny_ttl
        self._clock = clock
        self._inflight: dict[Hashable, _Flight] = {}
        self.stats = CacheStats()

    def __len__(self) -> int:
        return len(self._lru)

    def clear(self) -> None:
        self._lru.clear()

    def get(self, key: Hashable) -> CacheEntry | None:
        """The cached entry, or None if absent, expired or invalidated by a write."""
        try:
            entry: CacheEntry = _peek(self._lru, key)
        except KeyError:
            return None
        words = self._words
        deps = entry.deps
        now = self._clock()
        # deps is (slot, value[, slot, value]): at most two slots, unrolled for the hot path
        if entry.expires >= now and words[deps[0]] == deps[1] and (len(deps) == 2 or words[deps[2]] == deps[3]):
            self.stats.hits += 1
            if now - entry.refreshed >= RECENCY_GRAIN_S:
                entry.refreshed = now
                self._lru[key]  # LRUCache's own lookup: it moves the entry to the young end
            return entry
        del self._lru[key]
        self.stats.stale += 1
        return None

    async def get_or_evaluate(
        self, key: Hashable, target: Target, evaluate: Callable[[], Awaitable[Verdict]]
    ) -> tuple[Verdict, CacheStatus]:
        entry = self.get(key)
        if entry is not None:
            return entry.verdict, "hit"
        self.stats.misses += 1
        board = self._board
        sequence = board.sequence()
        pending = self._inflight.get(key)
        # Join an evaluation already under way only if no write has begun since it started: one that
        # began before a revoke may have read the old facts, and sharing it would serve the old allow.
        if pending is not None and pending.sequence == sequence and sequence % 2 == 0:
            self.stats.shared += 1
            try:
                return await asyncio.shield(pending.future), "miss"
            except asyncio.CancelledError:
                task = asyncio.current_task()
                if not pending.future.cancelled() or (task is not None and task.cancelling()):
                    raise  # we were cancelled ourselves
                # The caller that was evaluating for us went away (its broker hung up): evaluate ourselves.
                return await self.get_or_evaluate(key, target, evaluate)
        flight = _Flight(asyncio.get_running_loop().create_future(), sequence)
        future = flight.future
        self._inflight[key] = flight
        try:
            verdict = await evaluate()
        except asyncio.CancelledError:
            future.cancel()  # followers notice and evaluate for themselves
            raise
        except BaseException as exc:
            future.set_exception(exc)
            future.exception()  # mark retrieved: followers, if any, re-raise it themselves
            raise
        finally:
            if self._inflight.get(key) is flight:  # a newer flight may have replaced ours after a write
                del self._inflight[key]
        future.set_result(verdict)
        if not verdict.failed and sequence % 2 == 0:
            deps = self._dependencies(target, verdict)
            values = tuple(v for slot in deps for v in (slot, board.read(slot)))
            # Store only if no write began since we started: otherwise the facts may predate it.
            if board.sequence() == sequence:
                ttl = self._allow_ttl if verdict.allowed else self._deny_ttl
                now = self._clock()
                self._lru[key] = CacheEntry(verdict, target, now + ttl, values, now)
        return verdict, "miss"

    @staticmethod
    def _dependencies(target: Target, verdict: Verdict) -> tuple[int, ...]:
        subject_slot = tenant_slot(verdict.subject_tenant) if verdict.subject_tenant else IDENTITY_SLOT
        address = target.address
        if address is not None and address.tenant is not None:
            topic_slot = tenant_slot(address.tenant)
            if topic_slot != subject_slot:
                return (subject_slot, topic_slot)
        return (subject_slot,)
