"""The embedded default needs no optional engine: with asyncpg, cedarpy and regopy unimportable, a library
program on SQLite runs, and choosing what needs one of them is a clear error naming the extra to install."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

PROGRAM = r'''
import asyncio, sys

class Missing:
    """Refuse the optional engines, as on an install without the extras."""
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("asyncpg", "cedarpy", "regopy"):
            raise ImportError(f"No module named {name!r}")
        return None

sys.meta_path.insert(0, Missing())

from authhook import ConfigError, Settings, make_request, open_pdp
from authhook.config import EvaluatorSettings
from authhook.pdp import PDP


async def main() -> None:
    pdp = await open_pdp(store_url="sqlite:///extras.db", secret_key="k" * 64)
    try:
        print("inhouse:", (await pdp.authorize(make_request("publish", "nobody", "m/a/c/b"))).reason.value)
    finally:
        await pdp.close()
    for what, settings in (
        ("postgres", Settings(store_url="postgresql://127.0.0.1/test", secret_key="k" * 64)),
        ("cedar", Settings(store_url="sqlite:///x.db", secret_key="k" * 64, evaluator=EvaluatorSettings(kind="cedar"))),
        ("opa", Settings(store_url="sqlite:///x.db", secret_key="k" * 64, evaluator=EvaluatorSettings(kind="opa"))),
    ):
        try:
            PDP.from_settings(settings)
        except ConfigError as exc:
            print(what + ":", f"authhook[{what}]" in str(exc))
    print("loaded:", sorted(m for m in ("asyncpg", "cedarpy", "regopy") if m in sys.modules))


asyncio.run(main())
'''


def test_the_embedded_default_runs_without_the_optional_engines(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AUTHHOOK_")}
    done = subprocess.run(
        [sys.executable, "-c", PROGRAM], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [
        "inhouse: unknown_subject",
        "postgres: True",
        "cedar: True",
        "opa: True",
        "loaded: []",
    ], done.stdout
