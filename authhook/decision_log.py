"""Decision log: every decision, CONNECT included, with why - kept in memory and appended to JSON lines.

``record`` is on the hot path of every decision, so it only appends a tuple of references to one list
(the pending list with a file sink, else the ring of recent events); turning them into JSON happens when
the file sink flushes (a background task in the server, ``close`` elsewhere) or when someone queries. It
takes a decision's parts (verdict, cache status, latency) rather than a ``Decision``, so a cache hit need
not build one. Requests carry no secrets - passwords never enter ``AuthzRequest`` - so nothing here can
leak one.

Lines are rendered on the event loop (a thread measured worse: GIL hand-offs) but written by a worker
thread, one write in flight at a time, so a slow or full disk never stalls the loop and with it every
broker. If the file sink falls behind by more than ``max_pending`` events (a write still in flight, or
batches too large), the oldest pending ones are dropped and counted in ``dropped`` (and the drop is written
to the file as its own line): memory stays bounded and the brokers keep their answers. The check runs once
per flush interval, not per event, so between two checks the list may briefly hold more.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson

from authhook.models import AuthzRequest, CacheStatus, Decision, Target, Verdict

log = logging.getLogger("authhook.decision_log")

DEFAULT_RING_SIZE = 10_000
DEFAULT_MAX_PENDING = 200_000
DEFAULT_FLUSH_INTERVAL_S = 0.2
_SLICE = 128  # events serialized per event-loop turn (~1 ms here)

# (time, broker, hook, request, target, verdict, cache status, latency in µs)
_Raw = tuple[float, str, str, AuthzRequest, "Target | None", Verdict, CacheStatus, float]


@dataclass(slots=True)
class DecisionEvent:
    """One logged decision, kept as references until someone needs the JSON."""

    ts: float
    broker: str
    hook: str
    request: AuthzRequest
    target: Target | None
    decision: Decision

    @classmethod
    def from_raw(cls, raw: _Raw) -> DecisionEvent:
        ts, broker, hook, request, target, verdict, cache, latency_us = raw
        return cls(ts, broker, hook, request, target, Decision(verdict, cache, latency_us))

    def to_dict(self) -> dict[str, Any]:
        """The JSON shape of the log line and of ``GET /v1/decisions``."""
        decision = self.decision
        return event_fields(
            self.ts,
            self.broker,
            self.hook,
            self.request,
            self.target,
            decision.verdict,
            decision.cache,
            decision.latency_us,
        )


_iso_second: list[Any] = [-1, ""]  # (epoch second, its ISO text): events come in bursts within one second


def iso_second(second: int) -> str:
    """``2026-11-22T01:51:16``: the part of a log line's time both ``iso_time`` and the file sink share."""
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))


def iso_time(ts: float) -> str:
    """``2026-11-22T01:51:16.123456+00:00``, formatting the date part once per second (~0.3 µs, not 1.5)."""
    second = int(ts)
    if second != _iso_second[0]:
        _iso_second[:] = [second, iso_second(second)]
    return f"{_iso_second[1]}.{int((ts - second) * 1_000_000):06d}+00:00"


_STATIC_MAX = 4096  # verdicts whose line's static part is kept serialized; cleared when full
_CHUNK = 512  # lines formatted by one ``%``: bounds the format string's size however long the batch
# A line, around its static part: the time's date and second, its microseconds (%d truncates the float)
# and, after the static part, the latency. The same text ``event_fields`` gives.
_TEMPLATE_HEAD = b'{"time":"%s.%06d+00:00",'
_TEMPLATE_TAIL = b',"cache":"%s","latency_us":%%.2f}\n'

_Entry = tuple[AuthzRequest, "Target | None", Verdict, str, str, bytes, dict[str, bytes]]


def event_fields(
    ts: float,
    broker: str,
    hook: str,
    request: AuthzRequest,
    target: Target | None,
    verdict: Verdict,
    cache: CacheStatus,
    latency_us: float,
) -> dict[str, Any]:
    """One decision as the flat mapping the log file and the API carry."""
    subject = request.subject
    address = target.address if target is not None else None
    return {
        "time": iso_time(ts),
        "broker": broker,
        "hook": hook,
        "action": request.action,  # a StrEnum: both json and orjson write its value
        "subject": subject.id or subject.username,
        "username": subject.username,
        "client_id": subject.client_id,
        "peer": subject.peer,
        "tenant": verdict.subject_tenant or subject.tenant or (address.tenant if address else None),
        "topic": request.topic,
        "channel": address.channel if address else None,
        "qos": request.qos,
        "retain": request.retain,
        "allowed": verdict.allowed,
        "reason": verdict.reason,
        "detail": verdict.detail,
        "decided_by": verdict.decided_by,
        "evaluator": verdict.evaluator,
        "cache": cache,
        "revision": verdict.revision,
        "latency_us": round(latency_us, 2),
    }


class DecisionLog:
    """In-memory ring buffer plus an optional JSON-lines file."""

    def __init__(
        self,
        path: Path | None = None,
        *,
        ring_size: int = DEFAULT_RING_SIZE,
        max_pending: int = DEFAULT_MAX_PENDING,
        flush_interval: float = DEFAULT_FLUSH_INTERVAL_S,
    ) -> None:
        self.path = path
        # Raw tuples on the hot path (a tuple is ~5x cheaper to build than a dataclass instance);
        # they become DecisionEvent objects only when someone reads them.
        # With a file sink, events wait in ``_pending`` and join the ring when the sink takes them; either
        # way ``record`` makes one append through ``_append``, bound once (a per-event second list and
        # counter cost ~500 instructions of a ~2,700-instruction cache hit). ``_pending`` stays the same
        # list for its whole life - the sink copies and clears it - so that binding never goes stale.
        self._ring: deque[_Raw] = deque(maxlen=ring_size)
        self._pending: list[_Raw] = []
        self._append: Callable[[_Raw], None] = self._pending.append if path is not None else self._ring.append
        self._ring_size = ring_size
        self._max_pending = max_pending
        self._flush_interval = flush_interval
        self._task: asyncio.Task[None] | None = None
        self._static: dict[int, _Entry] = {}
        self.dropped = 0
        self._unreported_drops = 0  # dropped while a write was in flight, not yet said in the file

    def record(
        self,
        request: AuthzRequest,
        target: Target | None,
        verdict: Verdict,
        cache: CacheStatus,
        latency_us: float,
        broker: str,
        hook: str,
    ) -> None:
        self._append((time.time(), broker, hook, request, target, verdict, cache, latency_us))

    def recent(self) -> list[DecisionEvent]:
        """The latest ``ring_size`` events, oldest first, written to the file or not."""
        raws = [*self._ring, *self._pending][-self._ring_size :]
        return [DecisionEvent.from_raw(raw) for raw in raws]

    # -- file sink ------------------------------------------------------------------------------
    def _take_batch(self) -> tuple[list[_Raw], int]:
        events = self._pending.copy()
        self._pending.clear()
        self._ring.extend(events)
        excess = max(len(events) - self._max_pending, 0)
        if excess:
            events = events[excess:]
            self.dropped += excess
        dropped, self._unreported_drops = excess + self._unreported_drops, 0  # the file line says both
        return events, dropped

    def _trim_pending(self) -> None:
        """While a write is still in flight: keep only the newest ``max_pending`` events (the rest still join
        the ring, so the API shows them), and count the drop for the file's next ``dropped_events`` line."""
        excess = len(self._pending) - self._max_pending
        if excess > 0:
            self._ring.extend(self._pending[:excess])
            del self._pending[:excess]
            self.dropped += excess
            self._unreported_drops += excess

    def _batch_bytes(self, events: Iterable[_Raw], dropped: int) -> bytes:
        data = self._render(events)
        if dropped:
            data += orjson.dumps({"time": _now_iso(), "dropped_events": dropped}) + b"\n"
        return data

    def _append_bytes(self, data: bytes) -> None:
        """Append to the file (any thread). Opened per batch, so a log rotated by renaming (logrotate
        `create`) continues in a fresh file; one write, so lines from several processes never interleave."""
        assert self.path is not None
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
        try:
            os.write(fd, data)
        finally:
            os.close(fd)

    def _write_batch(self, events: Iterable[_Raw], dropped: int) -> None:
        """Render and write on this thread (``flush``, one-shot commands, the benchmark)."""
        self._append_bytes(self._batch_bytes(events, dropped))

    def _render(self, events: Iterable[_Raw]) -> bytes:
        """The JSON lines for ``events``, each ending in a newline.

        This runs once per decision, on the same CPU as the decisions, so it does as little per line as it
        can: a dict lookup, and a place in one ``%`` format that writes a whole chunk of lines. Each line's
        template (its static part, with every ``%`` in it doubled) goes into the chunk's format string and
        its time and latency into the arguments, so Python dispatches one format per chunk rather than one
        per line. Under callgrind a line costs ~6,400 instructions, against ~7,400 formatted one by one and
        ~13,300 through a method per line (a cache-hit HTTP round trip is ~250,000). The time's second is
        kept as a float: comparing or subtracting a float and an int costs a conversion each time.

        Everything but time, cache and latency depends only on (request, target, verdict, broker, hook);
        a broker repeating a question on a cached answer brings the very same objects again, so that part
        is serialized once and reused. It is keyed by the verdict alone (one per evaluation, shared by every
        hit on it); the entry pins the objects, and the identity checks make a verdict met with another
        request or target simply re-serialize. A plain dict, emptied when full, keeps those parts: an LRU's
        bookkeeping would cost more than the line itself.
        """
        static = self._static
        chunks: list[bytes] = []
        second, next_second, date_and_second = 0.0, 0.0, b""  # floats: comparing a float with an int costs more
        events = events if isinstance(events, list) else list(events)
        for start in range(0, len(events), _CHUNK):
            templates: list[bytes] = []
            values: list[object] = []
            add_template, add_values = templates.append, values.extend
            for ts, broker, hook, request, target, verdict, cache, latency_us in events[start : start + _CHUNK]:
                # The entry holds the verdict, so no other object can have its id while the entry lives.
                entry = static.get(id(verdict))
                if (
                    entry is None
                    or entry[0] is not request
                    or entry[1] is not target
                    or entry[3] != broker
                    or entry[4] != hook
                ):
                    entry = self._remember(broker, hook, request, target, verdict)
                if ts >= next_second or ts < second:  # in time order, but the wall clock may step back
                    second = float(int(ts))
                    next_second = second + 1.0
                    date_and_second = iso_second(int(ts)).encode()
                add_template(entry[6].get(cache) or _template(entry, cache))
                add_values((date_and_second, (ts - second) * 1e6, latency_us))
            chunks.append(b"".join(templates) % tuple(values))
        return b"".join(chunks)

    def _remember(
        self, broker: str, hook: str, request: AuthzRequest, target: Target | None, verdict: Verdict
    ) -> _Entry:
        """Serialize the static part of a line and keep it for the next events with the same objects."""
        fields = event_fields(0.0, broker, hook, request, target, verdict, "hit", 0.0)
        for dynamic in ("time", "cache", "latency_us"):
            del fields[dynamic]
        if len(self._static) >= _STATIC_MAX:
            self._static.clear()
        # Doubled, every % in the request's text (a topic may hold one) is literal to the format.
        entry: _Entry = (request, target, verdict, broker, hook, _dumps(fields)[1:-1].replace(b"%", b"%%"), {})
        self._static[id(verdict)] = entry
        return entry

    def flush(self) -> None:
        """Write what is pending now, on this thread (used on close and by one-shot commands)."""
        if self.path is not None and (self._pending or self._unreported_drops):
            self._write_batch(*self._take_batch())

    async def start(self) -> None:
        if self.path is not None and self._task is None:
            self._task = asyncio.create_task(self._flush_forever(), name="authhook-decision-log")

    async def _flush_forever(self) -> None:
        # Rendered on the event loop in slices of _SLICE events with a yield between them: a worker thread
        # measured worse for rendering (GIL hand-offs cost the loop ~25 % of its throughput under load, for
        # ~6 % of actual serializing work), and slices keep any one stall well under a millisecond or two.
        # The write itself is a syscall that may block for as long as the disk likes: a worker thread does it
        # (the GIL is released meanwhile), one at a time; while it is in flight, pending events are trimmed.
        writing: asyncio.Future[None] | None = None
        written = 0
        while True:
            await asyncio.sleep(self._flush_interval)
            if writing is not None:
                if not writing.done():
                    self._trim_pending()
                    continue
                try:
                    writing.result()
                except Exception as exc:  # the sink outlives a bad write, or every later event is lost
                    self.dropped += written  # counted, and said, rather than silently gone
                    log.error("decision log write to %s failed, %d events lost: %s", self.path, written, exc)
                writing = None
            if not self._pending and not self._unreported_drops:
                continue
            batch, dropped = self._take_batch()
            parts: list[bytes] = []
            for start in range(0, len(batch), _SLICE):
                parts.append(self._batch_bytes(batch[start : start + _SLICE], dropped if start == 0 else 0))
                await asyncio.sleep(0)
            written = len(batch)
            writing = asyncio.ensure_future(asyncio.to_thread(self._append_bytes, b"".join(parts)))

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        self.flush()


def _template(entry: _Entry, cache: str) -> bytes:
    """A line's format for this entry and cache status, made once per pair and kept in the entry."""
    template = entry[6][cache] = _TEMPLATE_HEAD + entry[5] + _TEMPLATE_TAIL % cache.encode()
    return template


def _dumps(fields: dict[str, Any]) -> bytes:
    """orjson, or the standard library for what orjson refuses: a refused request's raw topic may hold a
    lone surrogate (a JSON ``\\ud800`` escape), which only an ASCII-escaped line can carry."""
    try:
        return orjson.dumps(fields)
    except TypeError:
        return json.dumps(fields, separators=(",", ":")).encode()


def _now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="microseconds")


# -- querying ----------------------------------------------------------------------------------------

_RELATIVE = re.compile(r"^(\d+)([smhd])$")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days"}


def parse_since(value: str) -> datetime:
    """``10m``, ``2h``, ``1d`` back from now, or an ISO-8601 time (UTC when no offset is given)."""
    match = _RELATIVE.match(value.strip())
    if match:
        return datetime.now(UTC) - timedelta(**{_UNITS[match.group(2)]: int(match.group(1))})
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        raise ValueError(f"`{value}` is neither a duration like 10m nor an ISO-8601 time") from None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


@dataclass(frozen=True, slots=True)
class DecisionFilter:
    """What ``authhook decisions`` filters on; None means any."""

    client: str | None = None  # subject id, username or MQTT client id
    channel: str | None = None
    tenant: str | None = None
    allowed: bool | None = None
    since: datetime | None = None
    broker: str | None = None

    def matches(self, event: dict[str, Any]) -> bool:
        if "action" not in event:  # drop markers and foreign lines
            return False
        if self.client is not None and self.client not in (
            event.get("subject"),
            event.get("username"),
            event.get("client_id"),
        ):
            return False
        if self.channel is not None and event.get("channel") != self.channel:
            return False
        if self.tenant is not None and event.get("tenant") != self.tenant:
            return False
        if self.allowed is not None and event.get("allowed") is not self.allowed:
            return False
        if self.broker is not None and event.get("broker") != self.broker:
            return False
        return not (self.since is not None and datetime.fromisoformat(event["time"]) < self.since)


def read_events(lines: Iterable[str], where: DecisionFilter) -> Iterator[dict[str, Any]]:
    for line in lines:
        line = line.strip()
        if not line:
            continue
        try:
            event = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut by a crash must not hide the rest
        if isinstance(event, dict) and where.matches(event):
            yield event
