"""The public API: the README's library example runs as written, and ``from authhook import …`` gives what a
service needs."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import authhook

from .conftest import DEMO_WORLD, ROOT


def readme_library_program() -> str:
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Library use") :]
    found = re.search(r"```python\n(.*?)```", section, re.S)
    assert found, "the README's library section has no python block"
    return found.group(1)


def test_the_readme_library_example_runs_as_written(tmp_path: Path) -> None:
    (tmp_path / "examples").mkdir()
    shutil.copy(DEMO_WORLD, tmp_path / "examples" / "demo-world.yaml")
    program = tmp_path / "example.py"
    program.write_text(readme_library_program())
    env = {k: v for k, v in os.environ.items() if not k.startswith("AUTHHOOK_")}
    done = subprocess.run(
        [sys.executable, str(program)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [
        "connect: True",
        "publish: True",
        "explain: True 5 steps",
        "after revoke: False True",
    ], done.stdout
    assert (tmp_path / "library-example.db.key").exists()  # the key was made beside the database


def test_all_has_no_duplicates_and_every_name_is_the_real_object() -> None:
    from authhook import pdp, store, world
    from authhook.store import base

    assert len(set(authhook.__all__)) == len(authhook.__all__)
    expected = {
        "PDP": pdp.PDP,
        "open_pdp": pdp.open_pdp,
        "make_request": pdp.make_request,
        "Tenant": base.Tenant,
        "SubjectRecord": base.SubjectRecord,
        "Connection": base.Connection,
        "Role": base.Role,
        "Block": base.Block,
        "load_world": world.load_world,
        "import_world": world.import_world,
        "create_store": store.create_store,
    }
    for name, obj in expected.items():
        assert name in authhook.__all__ and getattr(authhook, name) is obj, name
    for name in authhook.__all__:
        assert hasattr(authhook, name), name


def test_the_package_is_typed() -> None:
    assert (Path(authhook.__file__).parent / "py.typed").exists()
