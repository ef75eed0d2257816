"""What the end-to-end tests against real brokers share: prerequisites, ports and processes, a running
``authhook serve`` on a store of its own, and paho-mqtt clients whose every wait has a deadline.

Nothing here sleeps for correctness: waits poll a condition until a deadline and fail with what they saw.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import selectors
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

try:
    import paho.mqtt.client as mqtt
except ImportError:  # reported by the tests' prerequisite check: a skip here, a failure in CI
    mqtt = None

WAIT_S = 5.0  # how long we wait for anything a broker should do promptly


# ---------------------------------------------------------------------------------------------------------
# Prerequisites
# ---------------------------------------------------------------------------------------------------------


def in_ci(env: Mapping[str, str]) -> bool:
    """``CI`` set to anything but an explicit no (GitHub, GitLab and ``.ci/run`` all set ``CI=true``)."""
    return env.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def require(what: str, reason: str | None, env: Mapping[str, str]) -> None:
    """Skip ``what`` for a missing prerequisite on a developer's machine; fail in CI, where it must run."""
    if reason is None:
        return
    if in_ci(env):
        pytest.fail(f"CI is set, so {what} must run, but: {reason}", pytrace=False)
    pytest.skip(reason)


# ---------------------------------------------------------------------------------------------------------
# Ports and processes
# ---------------------------------------------------------------------------------------------------------


def free_port() -> int:
    """A port nothing listens on now (the kernel's pick); a caller that loses a race to it should retry."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def tail(path: Path, lines: int = 40) -> str:
    """The end of a log file, for assertion messages (a failing harness must say why)."""
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError as exc:
        return f"<no log at {path}: {exc}>"


def wait_for_tcp(port: int, proc: subprocess.Popen[Any], timeout: float) -> bool:
    """Poll until 127.0.0.1:port accepts a connection: True, or False if ``proc`` exits or time runs out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.settimeout(1.0)
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return True
        time.sleep(0.05)
    return False


def stop(proc: subprocess.Popen[Any], timeout: float = 10.0) -> None:
    """SIGTERM, then SIGKILL if it has not exited within ``timeout``; always reaped."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=timeout)


def read_line(proc: subprocess.Popen[str], timeout: float) -> str:
    """One stdout line, or "" on timeout/EOF, so a server that never says it is ready cannot hang the test."""
    assert proc.stdout is not None
    with selectors.DefaultSelector() as selector:
        selector.register(proc.stdout, selectors.EVENT_READ)
        if not selector.select(timeout):
            return ""
    return proc.stdout.readline()


def wait_until(predicate: Callable[[], bool], timeout: float = WAIT_S, poll: float = 0.1) -> bool:
    """Poll ``predicate`` until it holds (True) or ``timeout`` passes (False)."""
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(poll)


# ---------------------------------------------------------------------------------------------------------
# authhook: a store with a world in it, servers on it, its CLI
# ---------------------------------------------------------------------------------------------------------


@dataclass
class Store:
    """A SQLite store holding a world, and the environment (key, token) every process on it uses."""

    db: Path
    token: str
    env: dict[str, str]

    @classmethod
    def create(cls, folder: Path, world: str) -> Store:
        env = {k: v for k, v in os.environ.items() if not k.startswith("AUTHHOOK_")}
        env["AUTHHOOK_SECRET_KEY"] = secrets.token_hex(32)
        token = secrets.token_urlsafe(24)
        env["AUTHHOOK_WEBHOOK__TOKEN"] = token
        store = cls(folder / "e2e.db", token, env)
        (folder / "world.yaml").write_text(world)
        store.cli("import", str(folder / "world.yaml"))
        return store

    def cli(self, *args: str, env: Mapping[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        """``python -m authhook --store sqlite:///<db> ARGS``; raises (with its output) on failure."""
        done = subprocess.run(
            [sys.executable, "-m", "authhook", "--store", f"sqlite:///{self.db}", *args],
            env={**self.env, **(env or {})},
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert done.returncode == 0, f"authhook {' '.join(args)} failed ({done.returncode}):\n{done.stderr}"
        return done


@dataclass
class Server:
    """A running ``authhook serve``: where it listens and the decision log it writes."""

    host: str
    port: int
    decision_log: Path
    stderr: Path

    def decisions(self, broker: str | None = None) -> list[dict[str, Any]]:
        """Every decision the server has flushed to its log so far (it flushes every ~0.2 s), oldest first."""
        try:
            lines = self.decision_log.read_text().splitlines()
        except FileNotFoundError:
            return []
        events = [json.loads(line) for line in lines if line.strip()]
        return [e for e in events if broker is None or e.get("broker") == broker]


@contextlib.contextmanager
def serve(store: Store, folder: Path, **env: str) -> Iterator[Server]:
    """``authhook serve`` on a kernel-picked port with ``env`` added (e.g. ``AUTHHOOK_BROKERS__...``);
    stopped (SIGTERM, then SIGKILL) on the way out."""
    folder.mkdir(parents=True, exist_ok=True)
    log, stderr_path = folder / "decisions.jsonl", folder / "authhook.stderr"
    full_env = {**store.env, "AUTHHOOK_DECISION_LOG__PATH": str(log), **env}
    command = [sys.executable, "-m", "authhook", "--store", f"sqlite:///{store.db}", "serve", "--port", "0"]
    with (
        stderr_path.open("w") as stderr,
        subprocess.Popen(command, env=full_env, stdout=subprocess.PIPE, stderr=stderr, text=True) as proc,
    ):
        try:
            line = read_line(proc, 30)
            assert "authhook listening on http://127.0.0.1:" in line, f"{line!r}\n{tail(stderr_path)}"
            yield Server("127.0.0.1", int(line.strip().rsplit(":", 1)[1]), log, stderr_path)
        finally:
            stop(proc, timeout=20)


# ---------------------------------------------------------------------------------------------------------
# MQTT clients
# ---------------------------------------------------------------------------------------------------------


class Device:
    """A paho MQTT 3.1.1 client with events for everything a test waits on, so no wait can hang."""

    def __init__(self, port: int, username: str, password: str, client_id: str, *, clean_session: bool = True) -> None:
        assert mqtt is not None, "paho-mqtt is needed"
        self.port = port
        self.client_id = client_id
        self.connack = threading.Event()
        self.connack_failure: bool | None = None
        self.disconnected = threading.Event()
        self.subacks: dict[int, list[Any]] = {}
        self.suback = threading.Event()
        self.published: set[int] = set()
        self.messages: list[tuple[str, bytes]] = []
        self.message = threading.Event()
        self._lock = threading.Lock()
        self.client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2,
            client_id=client_id,
            protocol=mqtt.MQTTv311,
            clean_session=clean_session,
        )
        self.client.username_pw_set(username, password)
        # A refused connection must stay refused: no automatic reconnect (and re-sent publish) in our window.
        self.client.reconnect_delay_set(min_delay=60, max_delay=60)
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_subscribe = self._on_subscribe
        self.client.on_publish = self._on_publish
        self.client.on_message = self._on_message

    def _on_connect(self, client: Any, userdata: Any, flags: Any, reason_code: Any, properties: Any) -> None:
        self.connack_failure = bool(reason_code.is_failure)
        self.connack.set()

    def _on_disconnect(self, client: Any, userdata: Any, flags: Any, reason_code: Any, properties: Any) -> None:
        self.disconnected.set()

    def _on_subscribe(self, client: Any, userdata: Any, mid: int, reason_codes: Any, properties: Any) -> None:
        with self._lock:
            self.subacks[mid] = list(reason_codes)
        self.suback.set()

    def _on_publish(self, client: Any, userdata: Any, mid: int, reason_code: Any, properties: Any) -> None:
        with self._lock:
            self.published.add(mid)

    def _on_message(self, client: Any, userdata: Any, message: Any) -> None:
        with self._lock:
            self.messages.append((message.topic, message.payload))
        self.message.set()

    @property
    def connected(self) -> bool:
        """CONNACK accepted and not disconnected since."""
        return self.connack_failure is False and not self.disconnected.is_set()

    def start(self) -> Device:
        """Connect and wait for the CONNACK, or for the broker to close the connection without one (what
        Mosquitto does when its auth plugin reports an error): ``connected`` then tells which."""
        self.client.connect("127.0.0.1", self.port, keepalive=30)
        self.client.loop_start()
        deadline = time.monotonic() + WAIT_S
        while not self.connack.is_set() and not self.disconnected.is_set():
            assert time.monotonic() < deadline, f"{self.client_id}: neither CONNACK nor disconnect"
            self.connack.wait(0.05)
        return self

    def stop(self) -> None:
        """Disconnect if still connected and join paho's thread (also closes its sockets)."""
        with contextlib.suppress(Exception):
            self.client.disconnect()
        self.client.loop_stop()

    def subscribe(self, topic: str) -> list[int] | None:
        """Subscribe with QoS 1: the SUBACK's return codes (128 is a refusal), or None if the connection closed."""
        self.suback.clear()
        result, mid = self.client.subscribe(topic, qos=1)
        assert result == mqtt.MQTT_ERR_SUCCESS
        deadline = time.monotonic() + WAIT_S
        while time.monotonic() < deadline:
            with self._lock:
                codes = self.subacks.get(mid)
            if codes is not None:
                return [code.value for code in codes]
            if self.disconnected.is_set():
                return None
            self.suback.wait(0.05)
        raise AssertionError(f"{self.client_id}: no SUBACK and no disconnect for {topic}")

    def publish(self, topic: str, payload: bytes) -> bool:
        """Publish with QoS 1: True once PUBACKed (MQTT 3.1.1 acks a publish the broker then drops), False
        when the broker closed the connection instead."""
        info = self.client.publish(topic, payload, qos=1)
        deadline = time.monotonic() + WAIT_S
        while time.monotonic() < deadline:
            with self._lock:
                if info.mid in self.published:
                    return True
            if self.disconnected.wait(0.02):
                with self._lock:
                    return info.mid in self.published
        raise AssertionError(f"{self.client_id}: neither PUBACK nor disconnect for {topic}")

    def has(self, payload: bytes) -> bool:
        with self._lock:
            return any(p == payload for _, p in self.messages)

    def received(self, payload: bytes, within: float = WAIT_S) -> bool:
        """Whether a message with this payload arrives within ``within`` seconds."""
        deadline = time.monotonic() + within
        while True:
            with self._lock:
                if any(p == payload for _, p in self.messages):
                    return True
                self.message.clear()
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            self.message.wait(remaining)


@contextlib.contextmanager
def devices(port: int, passwords: Mapping[str, str]) -> Iterator[Callable[..., Device]]:
    """A factory of started devices (``connect(username, client_id, password=None, clean_session=True)``)
    that are all stopped at the end, whatever happened."""
    opened: list[Device] = []

    def connect(username: str, client_id: str, password: str | None = None, *, clean_session: bool = True) -> Device:
        secret = passwords[username] if password is None else password
        device = Device(port, username, secret, client_id, clean_session=clean_session)
        opened.append(device)
        return device.start()

    try:
        yield connect
    finally:
        for device in opened:
            device.stop()
