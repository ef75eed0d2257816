"""The ``authhook`` command, run as operators run it: a separate process on a store file."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import DEMO_WORLD, TEST_KEY


class Cli:
    def __init__(self, db: Path) -> None:
        self.db = db
        self.env = {**os.environ, "AUTHHOOK_SECRET_KEY": TEST_KEY}

    def __call__(self, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "authhook", "--store", f"sqlite:///{self.db}", *args],
            env=self.env,
            input=stdin,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )

    def json(self, *args: str) -> dict[str, object]:
        done = self(*args)
        assert done.returncode in (0, 1), done.stderr
        result: dict[str, object] = json.loads(done.stdout)
        return result


@pytest.fixture
def cli(tmp_path: Path) -> Cli:
    runner = Cli(tmp_path / "cli.db")
    done = runner("import", str(DEMO_WORLD))
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["imported"]["clients"] == 4
    return runner


def test_check_prints_the_decision_and_exits_by_it(cli: Cli) -> None:
    allow = cli("check", "publish", "acme-thermo-1", "m/acme/c/telemetry")
    assert allow.returncode == 0
    assert json.loads(allow.stdout)["reason"] == "connected"
    deny = cli("check", "publish", "acme-thermo-1", "m/globex/c/telemetry")
    assert deny.returncode == 1
    assert json.loads(deny.stdout)["reason"] == "wrong_tenant"
    claimed = cli("check", "publish", "acme-thermo-1", "m/acme/c/telemetry", "--tenant", "globex", "--qos", "1")
    assert (claimed.returncode, json.loads(claimed.stdout)["reason"]) == (1, "wrong_tenant")


def test_revoke_through_the_cli_is_denied_on_the_next_check(cli: Cli) -> None:
    assert cli("check", "publish", "acme-thermo-1", "m/acme/c/telemetry").returncode == 0
    assert cli("disconnect", "acme", "acme-thermo-1", "telemetry").returncode == 0
    after = cli("check", "publish", "acme-thermo-1", "m/acme/c/telemetry")
    assert after.returncode == 1
    assert json.loads(after.stdout)["reason"] == "not_connected"


def test_explain_shows_the_steps(cli: Cli) -> None:
    result = cli.json("explain", "publish", "acme-gateway", "m/acme/c/alarms")
    assert result["allowed"] is False
    steps = result["steps"]
    assert isinstance(steps, list) and any("no-alarms" in s for s in steps)


def test_crud_round_trip_and_generated_secret_authenticates(cli: Cli) -> None:
    assert cli("tenant", "add", "initech", "--name", "Initech").returncode == 0
    made = cli("client", "add", "initech", "printer-1")
    assert made.returncode == 0, made.stderr
    secret = json.loads(made.stdout)["secret"]
    assert len(secret) >= 32
    assert cli("channel", "add", "initech", "jobs").returncode == 0
    assert cli("connect", "initech", "printer-1", "jobs", "--actions", "subscribe").returncode == 0
    assert cli("check", "subscribe", "printer-1", "m/initech/c/jobs/#").returncode == 0
    assert cli("check", "publish", "printer-1", "m/initech/c/jobs").returncode == 1
    assert cli("authenticate", "printer-1", "--secret-stdin", stdin=secret + "\n").returncode == 0
    assert cli("authenticate", "printer-1", "--secret-stdin", stdin="wrong-secret-000000\n").returncode == 1
    listed = [json.loads(line) for line in cli("client", "list", "--tenant", "initech").stdout.splitlines()]
    assert [c["id"] for c in listed] == ["printer-1"]
    assert secret not in cli("client", "list").stdout
    # roles and groups
    assert cli("group", "add", "initech", "printers", "--kind", "subjects").returncode == 0
    assert cli("group", "add-member", "initech", "printers", "printer-1").returncode == 0
    role = cli("role", "add", "initech", "pub-all", "--block", "scope=tenant;actions=publish")
    assert role.returncode == 0, role.stderr
    assert cli("role", "assign", "initech", "pub-all", "group:printers").returncode == 0
    assert cli("check", "publish", "printer-1", "m/initech/c/jobs").returncode == 0
    assert cli("role", "unassign", "initech", "pub-all", "group:printers").returncode == 0
    assert cli("check", "publish", "printer-1", "m/initech/c/jobs").returncode == 1
    assert cli("client", "rm", "printer-1").returncode == 0
    gone = cli("check", "subscribe", "printer-1", "m/initech/c/jobs")
    assert json.loads(gone.stdout)["reason"] == "unknown_subject"


def test_decisions_query_filters_the_log(cli: Cli) -> None:
    cli("check", "publish", "acme-thermo-1", "m/acme/c/telemetry")
    cli("check", "publish", "acme-thermo-1", "m/acme/c/alarms")
    cli("check", "publish", "globex-meter-7", "m/globex/c/telemetry")
    lines = cli("decisions", "--json", "--client", "acme-thermo-1").stdout.splitlines()
    assert [json.loads(line)["topic"] for line in lines] == ["m/acme/c/telemetry", "m/acme/c/alarms"]
    denied = cli("decisions", "--json", "--denied").stdout.splitlines()
    assert [json.loads(line)["channel"] for line in denied] == ["alarms"]
    by_tenant = cli("decisions", "--json", "--tenant", "globex", "--since", "10m").stdout.splitlines()
    assert len(by_tenant) == 1
    text = cli("decisions", "--channel", "alarms").stdout
    assert "DENY" in text and "not_connected" in text
    assert cli("decisions", "--since", "whenever").returncode == 2


def test_errors_exit_2_with_a_one_line_message(cli: Cli, tmp_path: Path) -> None:
    missing = cli("connect", "acme", "nobody", "telemetry")
    assert missing.returncode == 2
    assert missing.stderr.startswith("error: ") and "Traceback" not in missing.stderr
    bad = tmp_path / "bad.yaml"
    bad.write_text("tenants:\n  - id: x\n    clients:\n      - id: d\n")
    result = cli("import", str(bad))
    assert result.returncode == 2 and "exactly one of" in result.stderr
    short = cli("client", "add", "acme", "weak", "--secret-stdin", stdin="short\n")
    assert short.returncode == 2 and "shorter than 16" in short.stderr


def test_decisions_follow_prints_new_decisions_as_they_arrive(cli: Cli) -> None:
    import selectors

    command = [sys.executable, "-m", "authhook", "--store", f"sqlite:///{cli.db}", "decisions", "--follow", "--json"]
    with subprocess.Popen(command, env=cli.env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True) as tail:
        try:
            assert cli("check", "publish", "globex-meter-7", "m/globex/c/telemetry").returncode == 0
            assert tail.stdout is not None
            selector = selectors.DefaultSelector()
            selector.register(tail.stdout, selectors.EVENT_READ)
            assert selector.select(timeout=20), "no decision arrived within 20 s"
            event = json.loads(tail.stdout.readline())
            assert (event["subject"], event["allowed"], event["broker"]) == ("globex-meter-7", True, "cli")
            selector.close()
        finally:
            tail.terminate()
            tail.wait(timeout=10)
