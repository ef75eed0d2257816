"""``authhook serve`` as a real process: it creates the store on first start, answers health and
readiness, decides over HTTP, and stops cleanly on SIGTERM."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

from .conftest import DEMO_WORLD


def test_serve_starts_on_a_fresh_store_and_stops_on_sigterm(tmp_path: Path) -> None:
    db = tmp_path / "served.db"
    base = [sys.executable, "-m", "authhook", "--store", f"sqlite:///{db}"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("AUTHHOOK_")}
    subprocess.run([*base, "import", str(DEMO_WORLD)], env=env, check=True, capture_output=True, timeout=60)
    key_file = tmp_path / "served.db.key"
    assert key_file.exists() and (key_file.stat().st_mode & 0o077) == 0
    with subprocess.Popen(
        [*base, "serve", "--port", "0"], env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
    ) as server:
        try:
            assert server.stdout is not None
            line = server.stdout.readline()
            assert "listening on http://127.0.0.1:" in line, line
            url = line.strip().rsplit(" ", 1)[1]
            with urllib.request.urlopen(f"{url}/healthz", timeout=10) as response:
                assert json.load(response) == {"status": "ok"}
            with urllib.request.urlopen(f"{url}/readyz", timeout=10) as response:
                assert json.load(response)["status"] == "ready"
            body = json.dumps(
                {"subject": {"username": "acme-thermo-1"}, "action": "publish", "topic": "m/acme/c/telemetry/t"}
            ).encode()
            request = urllib.request.Request(f"{url}/v1/authorize", data=body, method="POST")
            with urllib.request.urlopen(request, timeout=10) as response:
                assert json.load(response)["reason"] == "connected"
        finally:
            server.send_signal(signal.SIGTERM)
            assert server.wait(timeout=20) == 0
    log = (tmp_path / "served.db.decisions.jsonl").read_text().splitlines()
    assert json.loads(log[-1])["broker"] == "api"
