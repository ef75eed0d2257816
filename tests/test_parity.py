"""Parity: over random worlds and requests, the in-house, Cedar and embedded-OPA evaluators give the same
allow/deny. Any difference is a bug in one of them. Worlds and requests come from the isolation property
test (tenants, connections, nested groups, allow and deny blocks, wildcards, ``$share/`` prefixes)."""

from __future__ import annotations

import asyncio

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from authhook import make_request
from authhook.evaluators.cedar import CedarEvaluator
from authhook.evaluators.inhouse import InHouseEvaluator
from authhook.evaluators.opa import EmbeddedOpaEvaluator

from .test_property_isolation import World, build, requests, worlds


@pytest.mark.timeout(900)  # 2,000 random worlds, three engines each: minutes, not the 2-minute default
@settings(max_examples=2000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(world=worlds(), asks=st.lists(requests(), min_size=1, max_size=12))
def test_all_evaluators_agree(world: World, asks: list[tuple[str, str, str]]) -> None:
    async def run() -> None:
        pdp = await build(world)
        evaluators = [InHouseEvaluator(pdp.store), CedarEvaluator(pdp.store), EmbeddedOpaEvaluator(pdp.store)]
        try:
            for subject, action, topic in asks:
                request = make_request(action, subject, topic)
                target = pdp.resolve(request)
                if not hasattr(target, "address"):  # refused before any evaluator runs
                    continue
                verdicts = [await evaluator.evaluate(request, target) for evaluator in evaluators]  # type: ignore[arg-type]
                answers = {v.evaluator: v.allowed for v in verdicts}
                assert len(set(answers.values())) == 1, (subject, action, topic, answers, [v.detail for v in verdicts])
        finally:
            for evaluator in evaluators:
                await evaluator.close()
            await pdp.close()

    asyncio.run(run())
