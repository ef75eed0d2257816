"""The public API: ``from authhook import …`` gives what the README promises, sorted and complete."""

from __future__ import annotations

from pathlib import Path

import authhook
from authhook import PDP, Reason, make_request, open_pdp


def test_all_has_no_duplicates_and_every_name_exists() -> None:
    assert len(set(authhook.__all__)) == len(authhook.__all__)
    for name in authhook.__all__:
        assert getattr(authhook, name) is not None


async def test_library_use_as_documented(tmp_path: Path) -> None:
    pdp = await open_pdp(store_url=f"sqlite:///{tmp_path / 'lib.db'}")
    try:
        from authhook.world import import_world, load_world

        from .conftest import DEMO_WORLD

        await import_world(pdp.store, pdp.hasher, load_world(DEMO_WORLD))
        login = await pdp.authenticate("acme-thermo-1", "acme-thermo-1-demo-secret", client_id="acme-thermo-1:boiler")
        assert login.allowed
        decision = await pdp.authorize(make_request("publish", "acme-thermo-1", "m/acme/c/telemetry/temp"))
        assert decision.allowed
        await pdp.store.disconnect("acme", "acme-thermo-1", "telemetry", frozenset({"publish"}))
        revoked = await pdp.authorize(make_request("publish", "acme-thermo-1", "m/acme/c/telemetry/temp"))
        assert (revoked.allowed, revoked.reason) == (False, Reason.NOT_CONNECTED)
        why = await pdp.explain(make_request("subscribe", "alice@acme.example", "m/acme/#"))
        assert why.decision.allowed and why.steps
    finally:
        await pdp.close()
    assert isinstance(pdp, PDP)
    assert (tmp_path / "lib.db.key").exists()
