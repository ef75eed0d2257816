"""The evaluator is chosen in config; cache, decision log and explain work the same with each."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from authhook import PDP, Reason, make_request
from authhook.config import EvaluatorSettings, load_settings
from authhook.errors import ConfigError
from authhook.world import import_world, load_world

from .conftest import DEMO_WORLD, settings_for

EXPECTED_NAME = {"inhouse": "inhouse", "opa": "opa-embedded", "cedar": "cedar"}


@pytest.mark.parametrize("kind", ["inhouse", "opa", "cedar"])
async def test_each_evaluator_behind_the_same_cache_log_and_explain(tmp_path: Path, kind: str) -> None:
    settings = settings_for(tmp_path / "e.db", evaluator=EvaluatorSettings(kind=kind))  # type: ignore[arg-type]
    async with PDP.from_settings(settings) as pdp:
        await import_world(pdp.store, pdp.hasher, load_world(DEMO_WORLD))
        allowed = make_request("publish", "acme-thermo-1", "m/acme/c/telemetry")
        first, second = await pdp.authorize(allowed), await pdp.authorize(allowed)
        assert (first.allowed, first.verdict.evaluator, first.cache, second.cache) == (
            True,
            EXPECTED_NAME[kind],
            "miss",
            "hit",
        )
        await pdp.store.disconnect("acme", "acme-thermo-1", "telemetry", frozenset({"publish"}))
        assert (await pdp.authorize(allowed)).reason is Reason.NOT_CONNECTED  # the revoke bites at once
        why = await pdp.explain(make_request("publish", "acme-gateway", "m/acme/c/alarms"))
        assert (why.decision.allowed, why.decision.reason) == (False, Reason.DENIED_BY_BLOCK)
        assert why.steps
        login = await pdp.authenticate("acme-thermo-1", "acme-thermo-1-demo-secret")
        assert login.allowed
        assert {e.to_dict()["evaluator"] for e in pdp.decision_log.recent()} >= {EXPECTED_NAME[kind]}


def test_a_remote_opa_needs_a_url() -> None:
    with pytest.raises(ConfigError, match="opa_url"):
        load_settings(evaluator={"kind": "opa", "opa_mode": "remote"})


async def test_remote_opa_settings_reach_the_evaluator(tmp_path: Path) -> None:
    from authhook.evaluators import build_evaluator
    from authhook.evaluators.opa import RemoteOpaEvaluator

    evaluator_settings = load_settings(
        evaluator={
            "kind": "opa",
            "opa_mode": "remote",
            "opa_url": "http://opa.internal:8181/",
            "opa_deadline_s": 0.5,
            "opa_retries": 3,
            "opa_breaker_failures": 7,
            "opa_breaker_reset_s": 2.5,
        }
    ).evaluator
    settings = settings_for(tmp_path / "e.db", evaluator=evaluator_settings)
    async with PDP.from_settings(settings) as pdp:
        evaluator = build_evaluator(evaluator_settings, pdp.store)
        assert isinstance(evaluator, RemoteOpaEvaluator)
        assert evaluator.endpoint == "http://opa.internal:8181/v1/data/authhook/mqtt/decision"
        assert (evaluator.deadline_s, evaluator.retries) == (0.5, 3)
        assert (evaluator.breaker.failures, evaluator.breaker.reset_s) == (7, 2.5)
        await evaluator.close()
        assert isinstance(pdp.evaluator, RemoteOpaEvaluator)  # the PDP wires the same settings
        assert (pdp.evaluator.retries, pdp.evaluator.breaker.failures) == (3, 7)


@pytest.mark.parametrize(
    "bad", [{"opa_retries": -1}, {"opa_breaker_failures": 0}, {"opa_breaker_reset_s": 0}, {"opa_deadline_s": 0}]
)
def test_remote_opa_settings_are_validated(bad: dict[str, float]) -> None:
    with pytest.raises(ConfigError):
        load_settings(evaluator={"kind": "opa", "opa_mode": "remote", "opa_url": "http://opa:8181", **bad})


async def test_a_cedar_entities_file_in_settings_reaches_the_evaluator(tmp_path: Path) -> None:
    from authhook.evaluators.cedar import CedarEvaluator

    # Write the demo world's Cedar graph out through a store-backed evaluator, then decide on the file.
    async with PDP.from_settings(settings_for(tmp_path / "a.db", evaluator=EvaluatorSettings(kind="cedar"))) as pdp:
        await import_world(pdp.store, pdp.hasher, load_world(DEMO_WORLD))
        assert (await pdp.authorize(make_request("connect", "acme-thermo-1"))).allowed
        assert isinstance(pdp.evaluator, CedarEvaluator)
        graph = pdp.evaluator.graph("acme")
        assert graph is not None
        entities = tmp_path / "entities.json"
        entities.write_text(json.dumps(list(graph.entities.values())))
    settings = settings_for(tmp_path / "a.db", evaluator=EvaluatorSettings(kind="cedar", cedar_entities=entities))
    async with PDP.from_settings(settings) as from_file:
        assert isinstance(from_file.evaluator, CedarEvaluator)
        publish = make_request("publish", "acme-thermo-1", "m/acme/c/telemetry/t")
        assert (await from_file.authorize(publish)).allowed
        assert from_file.evaluator.stats.reads == 0  # the file decided, not the store
