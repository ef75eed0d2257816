"""Time from a revoke's commit to a real RabbitMQ closing the affected MQTT session.

    .venv/bin/python bench/revoke_latency.py [--rounds N] [--json bench/results/revoke_latency.json]

Each round runs the end-to-end test ``test_a_revoke_closes_exactly_the_affected_live_session_within_a_second``
(a private RabbitMQ 3.10 node with its management plugin, a real ``authhook serve`` with
``revocation.rabbitmq`` configured, paho clients), which times three revokes: a ``disconnect`` of a publish
right, a ``client disable`` and a ``client rm``. Under this bench the test makes those changes through the
store API in its own process on the server's SQLite file (in CI it uses the CLI, whose commit lies somewhere
inside a ~1 s process run), so the clock starts right after the commit and stops when paho reports the
connection closed: the figure includes the watcher's poll interval (50 ms), the re-check, the management
API's list and close calls and the broker's close. A new node per round, so rounds do not share warm state.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TEST = "tests/test_e2e_rabbitmq.py::test_a_revoke_closes_exactly_the_affected_live_session_within_a_second"


def one_round() -> dict[str, float]:
    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder) / "latencies.json"
        env = {**os.environ, "AUTHHOOK_BENCH_REVOKE_OUT": str(out)}
        run = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", TEST],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        if run.returncode != 0 or not out.exists():
            raise SystemExit(f"the round failed:\n{run.stdout[-3000:]}\n{run.stderr[-2000:]}")
        figures: dict[str, float] = json.loads(out.read_text())
        return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", type=Path, default=ROOT / "bench" / "results" / "revoke_latency.json")
    args = parser.parse_args()
    rounds = [one_round() for _ in range(args.rounds)]
    samples = {kind: [r[kind] * 1000 for r in rounds] for kind in rounds[0]}
    summary = {
        kind: {"median_ms": round(statistics.median(ms), 1), "max_ms": round(max(ms), 1), "samples_ms": ms}
        for kind, ms in samples.items()
    }
    every = [ms for values in samples.values() for ms in values]
    result = {
        "what": "revoke commit (store write in the test process) -> RabbitMQ 3.10 closes the MQTT connection, "
        "via the management API",
        "rounds": args.rounds,
        "per_revoke": summary,
        "all": {"median_ms": round(statistics.median(every), 1), "max_ms": round(max(every), 1)},
    }
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    for kind, figures in summary.items():
        print(f"{kind:>10}: median {figures['median_ms']:7.1f} ms   max {figures['max_ms']:7.1f} ms")
    print(f"{'all':>10}: median {result['all']['median_ms']:7.1f} ms   max {result['all']['max_ms']:7.1f} ms")


if __name__ == "__main__":
    main()
