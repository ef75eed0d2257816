"""Decision log: one event per decision with broker and hook, a JSON-lines file, queries, explain."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from authhook import PDP, Reason, make_request
from authhook.decision_log import DecisionFilter, DecisionLog, parse_since, read_events


async def test_every_decision_is_recorded_with_broker_hook_and_why(demo: PDP) -> None:
    await demo.authenticate("acme-thermo-1", "acme-thermo-1-demo-secret", broker="emqx", hook="authn")
    await demo.authorize(make_request("publish", "acme-thermo-1", "m/acme/c/telemetry/t"), broker="emqx", hook="authz")
    await demo.authorize(make_request("publish", "acme-thermo-1", "m/acme/c/telemetry/t"), broker="emqx", hook="authz")
    await demo.authorize(
        make_request("subscribe", "acme-thermo-1", "m/globex/c/telemetry"), broker="vernemq", hook="sub"
    )
    events = [e.to_dict() for e in demo.decision_log.recent()]
    assert [(e["broker"], e["hook"], e["action"]) for e in events] == [
        ("emqx", "authn", "connect"),
        ("emqx", "authz", "publish"),
        ("emqx", "authz", "publish"),
        ("vernemq", "sub", "subscribe"),
    ]
    assert [e["cache"] for e in events[1:3]] == ["miss", "hit"]
    publish = events[1]
    assert publish["allowed"] is True
    assert publish["reason"] == "connected"
    assert publish["decided_by"] == "connection:acme-thermo-1/telemetry"
    assert publish["tenant"] == "acme" and publish["channel"] == "telemetry"
    assert publish["evaluator"] == "inhouse" and publish["revision"] > 0 and publish["latency_us"] > 0
    assert events[3]["reason"] == "wrong_tenant" and events[3]["allowed"] is False
    assert events[2]["channel"] == "telemetry"  # a cache hit still says which channel


async def test_each_line_in_the_file_is_the_event_the_api_shows(demo: PDP) -> None:
    """The file sink reuses a serialized part per (request, target, verdict, broker, hook): a verdict met again
    with another broker, hook or request object (same cache key, another peer) must not reuse a wrong one."""
    publish = make_request("publish", "acme-thermo-1", "m/acme/c/telemetry/t")
    elsewhere = publish.model_copy(update={"subject": publish.subject.model_copy(update={"peer": "10.0.0.9"})})
    for request, broker, hook in [
        (publish, "emqx", "authz"),
        (publish, "emqx", "authz"),
        (publish, "vernemq", "authz"),  # another broker, same hook name
        (publish, "vernemq", "auth_on_publish"),  # another hook, same broker
        (elsewhere, "vernemq", "auth_on_publish"),
        (publish, "emqx", "authz"),
        (make_request("subscribe", "acme-thermo-1", "m/globex/c/#"), "emqx", "authz"),
    ]:
        await demo.authorize(request, broker=broker, hook=hook)
    demo.decision_log.flush()
    assert demo.decision_log.path is not None
    written = [json.loads(line) for line in demo.decision_log.path.read_text().splitlines()][-7:]
    shown = [json.loads(json.dumps(event.to_dict())) for event in demo.decision_log.recent()][-7:]
    assert written == shown
    assert [(e["broker"], e["hook"], e["peer"], e["cache"]) for e in written[:6]] == [
        ("emqx", "authz", None, "miss"),
        ("emqx", "authz", None, "hit"),
        ("vernemq", "authz", None, "hit"),
        ("vernemq", "auth_on_publish", None, "hit"),
        ("vernemq", "auth_on_publish", "10.0.0.9", "hit"),
        ("emqx", "authz", None, "hit"),
    ]


def test_one_verdict_met_with_two_targets_writes_each_its_own_channel(tmp_path: object) -> None:
    from pathlib import Path

    from authhook.models import Target, Verdict
    from authhook.topics import ChannelAddress

    log = DecisionLog(Path(str(tmp_path)) / "decisions.jsonl")
    request = make_request("publish", "acme-thermo-1", "m/acme/c/telemetry")
    verdict = Verdict(True, Reason.CONNECTED, "connected", "inhouse")
    for channel in ("telemetry", "alarms", "telemetry"):
        target = Target("m/acme/c/" + channel, ChannelAddress("acme", channel, ""))
        log.record(request, target, verdict, "hit", 1.0, "emqx", "authz")
    log.flush()
    assert log.path is not None
    lines = [json.loads(line) for line in log.path.read_text().splitlines()]
    assert [e["channel"] for e in lines] == ["telemetry", "alarms", "telemetry"]


def test_times_in_the_file_match_the_api_across_seconds_and_a_clock_step_back(tmp_path: object) -> None:
    from pathlib import Path

    from authhook.decision_log import event_fields
    from authhook.models import Target, Verdict

    log = DecisionLog(Path(str(tmp_path)) / "decisions.jsonl")
    request = make_request("publish", "acme-thermo-1", "m/acme/c/telemetry")
    verdict = Verdict(True, Reason.CONNECTED, "connected", "inhouse")
    target = Target("m/acme/c/telemetry", None)
    start = 1_790_000_000.0
    times = [start + 0.000001, start + 0.999999, start + 1.0, start + 1.5, start - 3.25, start + 61.0000004]
    events = [(ts, "emqx", "authz", request, target, verdict, "hit", 1.0 + i / 3) for i, ts in enumerate(times)]
    lines = log._render(events).decode().splitlines()
    assert [json.loads(line) for line in lines] == [json.loads(json.dumps(event_fields(*e))) for e in events]
    assert json.loads(lines[4])["time"] == "2026-09-21T14:13:16.750000+00:00"


# Text a format string would read as directives, and text JSON must escape.
_AWKWARD = ["%", "s", "d", "(", ")", "x", '"', "\\", "é", "2", "."]
_AWKWARD_TEXT = st.text(alphabet=st.sampled_from([*_AWKWARD, "/"]))
_AWKWARD_NAMES = st.text(alphabet=st.sampled_from(_AWKWARD), min_size=1)


@settings(max_examples=60, deadline=None)
@given(
    lines=st.lists(
        st.tuples(
            st.integers(0, 3),  # which of four requests
            st.sampled_from(["hit", "miss", "bypass"]),
            st.floats(0, 5_000, allow_nan=False),  # latency, µs
            st.floats(-2.0, 2.0, allow_nan=False),  # time step from the previous event, s (back included)
        ),
        min_size=1,
        max_size=1_200,  # more than one format chunk
    ),
    usernames=st.lists(_AWKWARD_NAMES, min_size=4, max_size=4),
    topic_tail=_AWKWARD_TEXT,
)
def test_each_line_in_the_file_is_the_event_the_api_gives(
    lines: list[tuple[int, str, float, float]], usernames: list[str], topic_tail: str
) -> None:
    """Usernames and topics full of ``%``: the file's chunked format must still write exactly each event."""
    from authhook.decision_log import event_fields
    from authhook.models import Action, AuthzRequest, Subject, Target, Verdict

    log = DecisionLog(None)
    requests = [
        AuthzRequest(subject=Subject(username=name), action=Action.PUBLISH, topic="m/a/c/b/" + topic_tail)
        for name in usernames
    ]
    verdicts = [Verdict(i % 2 == 0, Reason.CONNECTED, f"{i}% sure", "inhouse") for i in range(4)]
    target = Target("m/a/c/b/" + topic_tail, None)
    ts = 1_790_000_000.0
    events = []
    for which, cache, latency, step in lines:
        ts += step
        events.append((ts, "emqx", "authz", requests[which], target, verdicts[which], cache, latency))
    written = log._render(events).decode().splitlines()
    assert [json.loads(line) for line in written] == [json.loads(json.dumps(event_fields(*e))) for e in events]


async def test_the_file_sink_writes_json_lines_that_the_query_filters(demo: PDP) -> None:
    await demo.authorize(make_request("publish", "acme-thermo-1", "m/acme/c/telemetry"))
    await demo.authorize(make_request("publish", "acme-thermo-1", "m/acme/c/alarms"))
    await demo.authorize(make_request("publish", "globex-meter-7", "m/globex/c/telemetry"))
    demo.decision_log.flush()
    assert demo.decision_log.path is not None
    lines = demo.decision_log.path.read_text().splitlines()
    assert len(lines) == 3 and all(json.loads(line)["action"] == "publish" for line in lines)

    def query(**kw: object) -> list[dict[str, object]]:
        return list(read_events(lines, DecisionFilter(**kw)))  # type: ignore[arg-type]

    assert len(query(client="acme-thermo-1")) == 2
    assert [e["channel"] for e in query(client="acme-thermo-1", allowed=False)] == ["alarms"]
    assert [e["tenant"] for e in query(tenant="globex")] == ["globex"]
    assert len(query(channel="telemetry")) == 2
    assert len(query(allowed=True)) == 2
    assert query(since=datetime.now(UTC) + timedelta(minutes=1)) == []
    assert len(query(since=parse_since("5m"))) == 3


def test_since_accepts_durations_and_iso_times_and_rejects_the_rest() -> None:
    assert datetime.now(UTC) - parse_since("2h") > timedelta(minutes=119)
    assert parse_since("2026-01-02T03:04:05").tzinfo is not None
    with pytest.raises(ValueError, match="neither"):
        parse_since("yesterday")


def test_a_truncated_line_does_not_hide_the_rest() -> None:
    good = json.dumps({"action": "publish", "allowed": True, "time": datetime.now(UTC).isoformat()})
    assert len(list(read_events(['{"action": "pub', good, ""], DecisionFilter()))) == 1


def test_recent_events_are_the_latest_in_order_whether_written_to_the_file_or_still_pending(tmp_path: object) -> None:
    from pathlib import Path

    from authhook.models import Verdict

    log = DecisionLog(Path(str(tmp_path)) / "decisions.jsonl", ring_size=3)
    verdict = Verdict(True, Reason.CONNECTED, "connected", "inhouse")

    def record(topic: str) -> None:
        log.record(make_request("publish", "x", f"m/a/c/{topic}"), None, verdict, "hit", 1.0, "test", "hook")

    record("one")
    record("two")
    log.flush()
    record("three")
    record("four")
    assert [e.request.topic for e in log.recent()] == ["m/a/c/two", "m/a/c/three", "m/a/c/four"]
    log.flush()
    assert [e.request.topic for e in log.recent()] == ["m/a/c/two", "m/a/c/three", "m/a/c/four"]
    assert log.path is not None and len(log.path.read_text().splitlines()) == 4


async def test_a_full_pending_queue_drops_the_oldest_and_says_so(demo: PDP, tmp_path: object) -> None:
    from pathlib import Path

    path = Path(str(tmp_path)) / "small.jsonl"
    log = DecisionLog(path, max_pending=2)
    request = make_request("publish", "x", "m/a/c/b")
    decision = await demo.authorize(request)
    for _ in range(5):
        log.record(request, None, decision.verdict, decision.cache, decision.latency_us, "test", "hook")
    log.flush()
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert len([line for line in lines if "action" in line]) == 2
    assert lines[-1]["dropped_events"] == 3 and log.dropped == 3


async def test_explain_walks_the_path(demo: PDP) -> None:
    allowed = await demo.explain(make_request("subscribe", "acme-dashboard", "$share/g/m/acme/c/telemetry/#"))
    assert allowed.decision.allowed
    text = "\n".join(allowed.steps)
    assert "shared subscription group `g`" in text
    assert "tenant `acme`, channel `telemetry`" in text
    assert "connected to `telemetry`" in text
    denied = await demo.explain(make_request("publish", "acme-gateway", "m/acme/c/alarms"))
    assert denied.decision.reason is Reason.DENIED_BY_BLOCK
    assert denied.steps[-1].startswith("deny: ") and "role:floor-gateway/block:no-alarms" in denied.steps[-1]
    assert denied.decision.cache == "bypass"
    broad = await demo.explain(make_request("subscribe", "acme-dashboard", "m/acme/c/+"))
    assert broad.decision.reason is Reason.WILDCARD_TOO_BROAD
    assert any("wildcard channel level" in step for step in broad.steps)


async def test_a_refused_topic_with_a_lone_surrogate_is_logged_and_the_sink_keeps_going(demo: PDP) -> None:
    """A JSON body may carry ``"\\ud800"``: the request is refused, and its log line must still be written,
    along with every decision after it."""
    bad = await demo.authorize(make_request("publish", "acme-thermo-1", "m/acme/c/telemetry/\ud800"))
    assert (bad.allowed, bad.reason) == (False, Reason.INVALID_TOPIC)
    await demo.authorize(make_request("publish", "acme-thermo-1", "m/acme/c/telemetry/t"))
    await demo.decision_log.close()
    assert demo.decision_log.path is not None
    lines = demo.decision_log.path.read_text().splitlines()
    events = [json.loads(line) for line in lines]
    assert [e["reason"] for e in events[-2:]] == ["invalid_topic", "connected"]
    assert events[-2]["topic"] == "m/acme/c/telemetry/\ud800"


async def test_a_disk_that_never_drains_neither_stalls_decisions_nor_grows_memory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The file write blocks forever (a hung NFS mount, a full disk): decisions keep being answered at once,
    the pending events stay bounded, the drop is counted, and once the disk drains it is said in the file."""
    import threading

    from authhook import Settings
    from authhook.config import DecisionLogSettings

    stuck = threading.Event()
    calls: list[int] = []
    real_append = DecisionLog._append_bytes

    def never_drains(self: DecisionLog, data: bytes) -> None:
        calls.append(len(data))
        stuck.wait(60)  # blocks the worker thread, not the event loop
        real_append(self, data)

    monkeypatch.setattr(DecisionLog, "_append_bytes", never_drains)
    settings = Settings(
        store_url=f"sqlite:///{tmp_path / 'db.sqlite'}",
        secret_key="k" * 64,  # type: ignore[arg-type]
        decision_log=DecisionLogSettings(path=tmp_path / "log.jsonl", flush_interval_s=0.01),
    )
    async with PDP.from_settings(settings) as pdp:
        log = pdp.decision_log
        log._max_pending = 50
        request = make_request("publish", "nobody", "m/acme/c/telemetry/t")
        try:
            for _ in range(40):
                for _ in range(25):
                    assert not (await pdp.authorize(request)).allowed
                await asyncio.sleep(0.02)  # the flusher's turn
            for _ in range(500):  # the flusher trims on its next turn, even on a busy machine
                if len(log._pending) <= 50:
                    break
                await asyncio.sleep(0.01)
            assert calls, "the flusher never tried to write"
            assert len(log._pending) <= 50  # bounded while the write hangs
            assert log.dropped > 0
        finally:
            stuck.set()
    text = (tmp_path / "log.jsonl").read_text()
    assert '"dropped_events"' in text
