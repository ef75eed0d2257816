"""PostgreSQL at scale: 1,000,000 clients and 100,000 channels loaded with COPY, then uncached decisions
and the cross-instance invalidation lag.

    .venv/bin/python bench/pg_scale_bench.py [--dsn postgresql://127.0.0.1:5432/test] [--tenants 1000]
        [--decisions 20000] [--revokes 300] [--json bench/results/pg_scale_bench.json] [--keep]

World: T tenants, each with 1,000 clients and 100 channels; every client connected to one channel of its
tenant for publish and subscribe; every tenant has an operator role (tenant-wide subscribe) assigned to a
group of ten clients, so some decisions walk groups and roles. Decisions run with the cache off; the
figure is the server-side time ``Decision.latency_us`` (topic parse, one round trip, policy), sequential.
The invalidation lag is measured between two processes, as in a real fleet: instance B runs in a child
process and prints the wall-clock time at which its revision board moved for each notification; instance
A, here, revokes a connection and notes when its write started and when it returned (committed). The lag
is B's apply time minus A's commit (negative when B applied before A's call had even returned), and,
as an upper bound, minus the start of A's write.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import asyncpg

from authhook import PDP, Settings, make_request
from authhook.config import CacheSettings, DecisionLogSettings
from authhook.revision import tenant_slot
from authhook.store.base import Connection

CLIENTS_PER_TENANT = 1_000
CHANNELS_PER_TENANT = 100


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


def summary(values: list[float]) -> dict[str, float]:
    return {
        "n": len(values),
        "p50": round(percentile(values, 50), 3),
        "p90": round(percentile(values, 90), 3),
        "p99": round(percentile(values, 99), 3),
        "p99.9": round(percentile(values, 99.9), 3),
        "max": round(max(values), 3),
        "mean": round(statistics.fmean(values), 3),
    }


async def load(dsn: str, schema: str, tenants: int, secret_hash: str) -> dict[str, Any]:
    conn = await asyncpg.connect(dsn, server_settings={"search_path": schema})
    try:
        started = time.perf_counter()
        await conn.copy_records_to_table(
            "tenants", records=[(f"t{t}", "", True) for t in range(tenants)], columns=["id", "name", "enabled"]
        )
        await conn.copy_records_to_table(
            "subjects",
            records=(
                (f"t{t}-d{d}", f"t{t}", "client", "", secret_hash, True)
                for t in range(tenants)
                for d in range(CLIENTS_PER_TENANT)
            ),
            columns=["id", "tenant_id", "kind", "name", "credential", "enabled"],
        )
        await conn.copy_records_to_table(
            "channels",
            records=((f"t{t}", f"c{c}", "") for t in range(tenants) for c in range(CHANNELS_PER_TENANT)),
            columns=["tenant_id", "id", "name"],
        )
        await conn.copy_records_to_table(
            "connections",
            records=(
                (f"t{t}", f"t{t}-d{d}", f"c{d % CHANNELS_PER_TENANT}", 6)
                for t in range(tenants)
                for d in range(CLIENTS_PER_TENANT)
            ),
            columns=["tenant_id", "client_id", "channel_id", "actions"],
        )
        await conn.copy_records_to_table(
            "groups",
            records=[(f"t{t}", "ops", "subjects", "", None) for t in range(tenants)],
            columns=["tenant_id", "id", "kind", "name", "parent_id"],
        )
        await conn.copy_records_to_table(
            "group_members",
            records=((f"t{t}", "ops", f"t{t}-d{d}") for t in range(tenants) for d in range(10)),
            columns=["tenant_id", "group_id", "member_id"],
        )
        await conn.copy_records_to_table(
            "roles", records=[(f"t{t}", "operator", "") for t in range(tenants)], columns=["tenant_id", "id", "name"]
        )
        await conn.copy_records_to_table(
            "role_blocks",
            records=[(f"t{t}", "operator", "watch", "tenant", None, 4, "allow") for t in range(tenants)],
            columns=["tenant_id", "role_id", "id", "scope_kind", "scope_ref", "actions", "effect"],
        )
        await conn.copy_records_to_table(
            "role_assignments",
            records=[(f"t{t}", "operator", "group", "ops") for t in range(tenants)],
            columns=["tenant_id", "role_id", "assignee_kind", "assignee_id"],
        )
        copied = time.perf_counter() - started
        await conn.execute("UPDATE meta SET revision = revision + 1")
        await conn.execute("ANALYZE")
        analyzed = time.perf_counter() - started
        size = await conn.fetchval(
            "SELECT pg_size_pretty(sum(pg_total_relation_size(c.oid))) FROM pg_class c "
            "JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = $1 AND c.relkind = 'r'",
            schema,
        )
    finally:
        await conn.close()
    return {"copy_s": round(copied, 1), "copy_and_analyze_s": round(analyzed, 1), "size_on_disk": size}


def requests(tenants: int, count: int) -> list[Any]:
    rng = random.Random(11)
    made = []
    for _ in range(count):
        t, d = rng.randrange(tenants), rng.randrange(CLIENTS_PER_TENANT)
        kind = rng.random()
        if kind < 0.6:  # connected channel: allow
            made.append(make_request("publish", f"t{t}-d{d}", f"m/t{t}/c/c{d % CHANNELS_PER_TENANT}/temp"))
        elif kind < 0.8:  # another channel of the tenant: deny (or allow for the ops group on subscribe)
            made.append(make_request("subscribe", f"t{t}-d{d}", f"m/t{t}/c/c{rng.randrange(CHANNELS_PER_TENANT)}"))
        elif kind < 0.9:  # another tenant: deny
            made.append(make_request("publish", f"t{t}-d{d}", f"m/t{(t + 1) % tenants}/c/c0"))
        else:  # unknown client
            made.append(make_request("publish", f"ghost-{d}", f"m/t{t}/c/c0"))
    return made


async def invalidation_lag(a: PDP, url: str, tenants: int, revokes: int) -> dict[str, Any]:
    """Revoke on A (this process), see it applied on B (a child process); lags in milliseconds."""
    child = await asyncio.create_subprocess_exec(
        sys.executable,
        __file__,
        "--listen-only",
        url,
        stdout=asyncio.subprocess.PIPE,
        env={**os.environ, "AUTHHOOK_SECRET_KEY": "b" * 64},
    )
    assert child.stdout is not None
    try:
        assert (await child.stdout.readline()).strip() == b"listening"
        from_commit, from_start, write_ms = [], [], []
        rng = random.Random(5)
        for _ in range(revokes):
            t, d = rng.randrange(tenants), rng.randrange(CLIENTS_PER_TENANT)
            tenant, client, channel = f"t{t}", f"t{t}-d{d}", f"c{d % CHANNELS_PER_TENANT}"
            for write in ("revoke", "grant"):
                started = time.time()
                if write == "revoke":
                    await a.store.disconnect(tenant, client, channel, frozenset({"publish"}))
                else:
                    connection = Connection(
                        tenant=tenant, client=client, channel=channel, actions=frozenset({"publish"})
                    )
                    await a.store.connect(connection)
                committed = time.time()
                slot, applied = (await child.stdout.readline()).split()
                assert int(slot) == tenant_slot(tenant)
                if write == "revoke":
                    from_commit.append((float(applied) - committed) * 1000)
                    from_start.append((float(applied) - started) * 1000)
                    write_ms.append((committed - started) * 1000)
    finally:
        child.terminate()
        await child.wait()
    return {
        "invalidation_lag_ms_from_commit": summary(from_commit),
        "invalidation_lag_ms_from_write_start": summary(from_start),
        "revoke_write_ms_on_a": summary(write_ms),
        "b_applied_before_a_returned": f"{sum(lag <= 0 for lag in from_commit)}/{revokes}",
    }


async def listen_only(url: str) -> None:
    """Instance B: print when the board moved for each notification, until terminated."""
    b = PDP.from_settings(Settings(store_url=url, decision_log=DecisionLogSettings(enabled=False)))
    listener = b.store.listener  # type: ignore[attr-defined]
    hear = listener._on_notify  # wrapped before the listener starts, so every (re)connection uses it

    def heard(conn: object, pid: int, channel: str, payload: object) -> None:
        hear(conn, pid, channel, payload)
        moved = time.time()
        for slot in json.loads(str(payload))["slots"]:
            print(slot, repr(moved), flush=True)

    listener._on_notify = heard
    async with b:
        print("listening", flush=True)
        await asyncio.Event().wait()


async def main(args: argparse.Namespace) -> dict[str, Any]:
    schema = f"bench_{uuid.uuid4().hex[:10]}"
    url = f"{args.dsn}?schema={schema}"
    results: dict[str, Any] = {
        "world": f"{args.tenants} tenants, {args.tenants * CLIENTS_PER_TENANT:,} clients, "
        f"{args.tenants * CHANNELS_PER_TENANT:,} channels, {args.tenants * CLIENTS_PER_TENANT:,} connections",
    }
    no_cache = CacheSettings(enabled=False)
    no_log = DecisionLogSettings(enabled=False)
    base = dict(store_url=url, secret_key="b" * 64, decision_log=no_log)
    try:
        async with PDP.from_settings(Settings(**base, cache=no_cache)) as a:  # type: ignore[arg-type]
            results["load"] = await load(args.dsn, schema, args.tenants, a.hasher.hash_client_secret("x" * 32))
            asks = requests(args.tenants, args.decisions)
            for request in asks[:500]:  # warm the pool's prepared statements
                await a.authorize(request)
            latencies, allowed = [], 0
            for request in asks:
                decision = await a.authorize(request)
                latencies.append(decision.latency_us / 1000)
                allowed += decision.allowed
            results["uncached_decision_ms"] = summary(latencies)
            results["allowed_share"] = round(allowed / len(asks), 3)

            results.update(await invalidation_lag(a, url, args.tenants, args.revokes))
    finally:
        if not args.keep:
            conn = await asyncpg.connect(args.dsn)
            await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
            await conn.close()
    results["targets"] = {"uncached_decision_ms_p99": 1.0, "invalidation_lag_ms_p99": 100.0}
    return results


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dsn", default="postgresql://127.0.0.1:5432/test")
    parser.add_argument("--tenants", type=int, default=1000)
    parser.add_argument("--decisions", type=int, default=20_000)
    parser.add_argument("--revokes", type=int, default=300)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--keep", action="store_true", help="keep the schema for inspection")
    parser.add_argument("--listen-only", metavar="URL", help=argparse.SUPPRESS)  # the child process, instance B
    arguments = parser.parse_args()
    if arguments.listen_only:
        asyncio.run(listen_only(arguments.listen_only))
        sys.exit(0)
    outcome = asyncio.run(main(arguments))
    text = json.dumps(outcome, indent=2)
    print(text)
    if arguments.json:
        arguments.json.write_text(text + "\n")
