"""In-process decision cost: cached and uncached, next to a bare dict lookup measured in the same run.

    .venv/bin/python bench/decision_bench.py [--rounds N] [--json results.json]

The machine is shared and noisy, so the numbers that matter are the ratios to the dict baseline taken
in the same run; absolute microseconds are printed too. Each figure is the best of several rounds
(the least-disturbed one), each round averaging many calls.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import sys
import tempfile
import time
import tracemalloc
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from authhook import PDP, Settings, make_request
from authhook.config import CacheSettings, DecisionLogSettings, EvaluatorSettings
from authhook.models import AuthzRequest
from authhook.store.base import Channel, Connection, SubjectRecord, Tenant

TENANTS, CLIENTS_PER_TENANT, CHANNELS_PER_TENANT = 10, 100, 20


async def build_world(pdp: PDP) -> list[AuthzRequest]:
    store, secret = pdp.store, pdp.hasher.hash_client_secret("bench-secret-0123456789")
    requests = []
    rng = random.Random(7)
    for t in range(TENANTS):
        tenant = f"tenant-{t}"
        await store.put_tenant(Tenant(id=tenant))
        for c in range(CHANNELS_PER_TENANT):
            await store.put_channel(Channel(id=f"ch-{c}", tenant=tenant))
        for d in range(CLIENTS_PER_TENANT):
            client = f"{tenant}-dev-{d}"
            await store.put_subject(SubjectRecord(id=client, tenant=tenant, kind="client"), secret)
            channel = f"ch-{rng.randrange(CHANNELS_PER_TENANT)}"
            await store.connect(
                Connection(tenant=tenant, client=client, channel=channel, actions=frozenset({"publish"}))
            )
            requests.append(make_request("publish", client, f"m/{tenant}/c/{channel}/sensors/temp"))
    return requests


def best_of(rounds: int, run: Callable[[], float]) -> float:
    return min(run() for _ in range(rounds))


def time_sync(fn: Callable[[], Any], n: int) -> float:
    start = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - start) / n * 1e6


async def time_async(fn: Callable[[], Awaitable[Any]], n: int, drain: Callable[[], None]) -> float:
    """Average cost of ``await fn()`` on the decision path alone.

    Calls run in chunks of 10,000; between chunks (outside the timed region) the decision log is written
    out, as the server's background flusher does, so its queue never grows large enough for garbage
    collection to skew the figure. What writing the log costs is measured on its own (``log_write_us``).
    """
    total = 0.0
    for done in range(0, n, 10_000):
        start = time.perf_counter()
        for _ in range(min(10_000, n - done)):
            await fn()
        total += time.perf_counter() - start
        drain()
    return total / n * 1e6


async def uncached_cost(settings: Settings, kind: str, requests: list[AuthzRequest], rounds: int) -> float:
    """Best-of-rounds cost of an uncached decision through evaluator ``kind`` on the same store."""
    other_settings = settings.model_copy(update={"evaluator": EvaluatorSettings(kind=kind)})  # type: ignore[arg-type]
    async with PDP.from_settings(other_settings) as other:
        for request in requests:  # untimed: builds what an evaluator keeps (Cedar's graphs, measured apart)
            await other.authorize(request)
        cycle = iter(requests * (rounds + 1))
        costs = [
            await time_async(lambda: other.authorize(next(cycle)), len(requests), other.decision_log.flush)
            for _ in range(rounds)
        ]
        assert (await other.authorize(requests[0])).allowed
    return min(costs)


async def cedar_update_cost(pdp: PDP, requests: list[AuthzRequest], rounds: int) -> dict[str, Any]:
    """What applying one store change to the Cedar evaluator's entities costs, per kind of change.

    Each figure is the first decision after a write to the tenant (which re-reads the tenant from the
    store and brings its cedarpy ``Entities`` handle up to date) minus a decision without a write: a
    modification re-parses the tenant's graph, an addition parses only the new entity and adds it to the
    handle, a write Cedar does not see keeps the handle. Also the two parts of a modification on their own.
    Best of ``rounds``, each the mean over 20 changes; run last, because it writes to the bench world.
    """
    from authhook.evaluators.cedar import CedarEvaluator, read_tenant
    from authhook.models import Action, Target

    store, request = pdp.store, requests[0]
    target = pdp.resolve(request)
    assert isinstance(target, Target) and target.address is not None and target.address.tenant is not None
    tenant, client = target.address.tenant, request.subject.key
    assert client is not None
    evaluator = CedarEvaluator(store)
    await evaluator.evaluate(request, target)
    n, sub = 20, frozenset({Action.SUBSCRIBE})

    async def decision_after(write: Callable[[int], Awaitable[Any]] | None) -> float:
        total = 0.0
        for i in range(n):
            if write is not None:
                await write(i)
            start = time.perf_counter()
            await evaluator.evaluate(request, target)
            total += time.perf_counter() - start
        return total / n * 1e6

    async def toggle(i: int) -> None:
        if i % 2:
            await store.disconnect(tenant, client, "ch-0", sub)
        else:
            await store.connect(Connection(tenant=tenant, client=client, channel="ch-0", actions=sub))

    added = iter(range(1_000_000))
    writes: dict[str, Callable[[int], Awaitable[Any]]] = {
        "modify_connect_disconnect": toggle,
        "add_channel": lambda i: store.put_channel(Channel(id=f"bench-{next(added)}", tenant=tenant)),
        "invisible_rename_channel": lambda i: store.put_channel(Channel(id="ch-1", tenant=tenant, name=f"n{i}")),
    }
    best = {name: float("inf") for name in ("decision_without_change", *writes, "store_reread", "cedar_parse")}
    for _ in range(rounds):
        steady = await decision_after(None)
        best["decision_without_change"] = min(best["decision_without_change"], steady)
        for name, write in writes.items():
            best[name] = min(best[name], await decision_after(write) - steady)
        start = time.perf_counter()
        entities = await read_tenant(store, tenant)
        best["store_reread"] = min(best["store_reread"], (time.perf_counter() - start) * 1e6)
        start = time.perf_counter()
        evaluator.parse(entities)
        best["cedar_parse"] = min(best["cedar_parse"], (time.perf_counter() - start) * 1e6)
    counts = evaluator.stats
    return {
        **{name: round(value, 1) for name, value in best.items()},
        "entities_in_tenant": len(entities),
        "parses": {"full": counts.full_parses, "delta": counts.delta_parses, "kept": counts.unchanged},
    }


async def main(rounds: int) -> dict[str, Any]:
    results: dict[str, Any] = {"python": sys.version.split()[0], "cpus": os.cpu_count()}
    with tempfile.TemporaryDirectory() as tmp:
        db = Path(tmp) / "bench.db"
        log = DecisionLogSettings(path=Path(tmp) / "decisions.jsonl")
        settings = Settings(store_url=f"sqlite:///{db}", secret_key="b" * 64, decision_log=log)
        uncached_settings = settings.model_copy(update={"cache": CacheSettings(enabled=False)})
        async with PDP.from_settings(settings) as pdp, PDP.from_settings(uncached_settings) as bare:
            requests = await build_world(pdp)
            hot = requests[0]
            key = hot.cache_key()
            baseline = {key: object()}

            # 1. bare dict lookup of the same key: the floor any Python cache sits on
            n = 200_000
            dict_us = best_of(rounds, lambda: time_sync(lambda: baseline.get(key), n))
            # 2. the cache's own lookup (LRU + deadline + revision-board check)
            await pdp.authorize(hot)
            assert pdp.cache is not None
            cache = pdp.cache
            lookup_us = best_of(rounds, lambda: time_sync(lambda: cache.get(key), n))
            # 3. a full cached decision: key, lookup, Decision, decision-log record
            cached_rounds = [
                await time_async(lambda: pdp.authorize(hot), n, pdp.decision_log.flush) for _ in range(rounds)
            ]
            cached_us = min(cached_rounds)
            # 4. writing one decision-log line (serialize + append), off the decision path in a worker thread
            log = pdp.decision_log
            for _ in range(10_000):
                await pdp.authorize(hot)
            batch, dropped = log._take_batch()
            start = time.perf_counter()
            log._write_batch(batch, dropped)
            log_write_us = (time.perf_counter() - start) / len(batch) * 1e6
            # 5. a full uncached decision through the in-house evaluator on SQLite (cache disabled)
            m = 5_000
            cycle = iter(requests * (m * rounds // len(requests) + 1))
            uncached_us = min(
                [
                    await time_async(lambda: bare.authorize(next(cycle)), m, bare.decision_log.flush)
                    for _ in range(rounds)
                ]
            )
            bare.decision_log.flush()
            assert (await bare.authorize(hot)).allowed
            # 4b. the same uncached decisions through the other evaluators, on the same store
            per_evaluator = {"inhouse": round(uncached_us, 2)}
            for kind in ("cedar", "opa"):
                per_evaluator[kind] = round(await uncached_cost(uncached_settings, kind, requests, rounds), 1)
            # 6. memory per cache entry
            cache.clear()
            tracemalloc.start()
            before = tracemalloc.take_snapshot()
            for request in requests:
                await pdp.authorize(request)
            after = tracemalloc.take_snapshot()
            tracemalloc.stop()
            grown = sum(s.size_diff for s in after.compare_to(before, "filename"))
            per_entry = grown / len(requests)
            cedar_update = await cedar_update_cost(pdp, requests, rounds)

    results.update(
        dict_lookup_us=round(dict_us, 3),
        cache_lookup_us=round(lookup_us, 3),
        cached_decision_us=round(cached_us, 3),
        uncached_decision_us=round(uncached_us, 2),
        log_write_us_per_decision=round(log_write_us, 2),
        uncached_decision_us_by_evaluator=per_evaluator,
        cedar_update_us_per_change=cedar_update,
        cached_vs_dict=round(cached_us / dict_us, 1),
        cache_lookup_vs_dict=round(lookup_us / dict_us, 1),
        uncached_vs_cached=round(uncached_us / cached_us, 1),
        bytes_per_cached_decision_incl_log=round(per_entry),
        world=f"{TENANTS} tenants, {TENANTS * CLIENTS_PER_TENANT} clients, {TENANTS * CHANNELS_PER_TENANT} channels",
        targets={
            "cached_decision_us": 2.0,
            "uncached_decision_us": {"inhouse": 50.0, "cedar": 100.0, "opa": 250.0},
        },
    )
    return results


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    outcome = asyncio.run(main(args.rounds))
    text = json.dumps(outcome, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
