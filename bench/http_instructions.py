"""Instructions per request under callgrind: ``POST /emqx/authz`` (cache hits) against the bare aiohttp handler.

    .venv/bin/python bench/http_instructions.py [--seconds 20] [--json results.json]

``http_bench.py`` measures what the target is about, requests per second; on this shared VM that figure moves
by tens of percent from one round to the next. The number of instructions a server executes per request does
not move with the neighbours, so this script prices the same two servers that way, to tell a real change from
noise. It runs each server (the same two as ``http_bench``: same world, token, body, decision log on) under
``valgrind --tool=callgrind --instr-atstart=no``, warms it with wrk, switches collection on
(``callgrind_control -i on``), drives it with wrk for ``--seconds``, switches collection off, and divides the
instructions by the requests the server parsed meanwhile (calls of aiohttp's parser callback for a complete
message, so the requests in flight when wrk stopped count as well).

It counts user-space instructions only: the system calls, the same for both servers, and cache misses, worse
for the larger process, are not in it. Read it beside ``http_bench``'s throughput, not instead of it.
"""

from __future__ import annotations

import argparse
import json
import re
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import http_bench as hb

PARSED_MESSAGE = "http_parser_cb_on_message_complete ["  # aiohttp's C parser, once per request
CALL_COUNT = re.compile(r"\(([\d,]+)x\)")


def callgrind(outfile: Path) -> list[str]:
    return ["valgrind", "--tool=callgrind", "--instr-atstart=no", f"--callgrind-out-file={outfile}"]


def collect(server: hb.Server, on: bool) -> None:
    subprocess.run(
        ["callgrind_control", "-i", "on" if on else "off", str(server.proc.pid)], check=True, capture_output=True
    )


def instructions(outfile: Path) -> int:
    """The collected total: the profile's ``totals:`` line (its ``summary:`` line, written first, says 0)."""
    for line in outfile.read_text(errors="replace").splitlines():
        if line.startswith("totals:"):
            return int(line.split()[1])
    hb.fail(f"no totals in {outfile}")


def requests_parsed(outfile: Path) -> int:
    """Calls of the parser's message-complete callback while collecting, from callgrind_annotate's caller tree."""
    tree = subprocess.run(
        ["callgrind_annotate", "--tree=caller", "--threshold=100", str(outfile)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    block: list[str] = []
    calls = 0
    for line in tree.splitlines():
        if not line.strip():
            block = []
            continue
        block.append(line)
        if "*" in line and PARSED_MESSAGE in line:
            calls += sum(
                int(n.replace(",", "")) for caller in block if "<" in caller for n in CALL_COUNT.findall(caller)
            )
    return calls


def measure(server: hb.Server, outfile: Path, token: str, args: argparse.Namespace) -> dict[str, float]:
    hb.check_allow(server, token)
    hb.run_wrk(server.url, token, args, args.warmup, hb.WRK_CPU)  # discarded: imports, first misses, memo
    collect(server, True)
    wrk = hb.run_wrk(server.url, token, args, args.seconds, hb.WRK_CPU)
    time.sleep(1.0)  # the last responses and the decision log's next flush land inside the window
    collect(server, False)
    server.stop()  # callgrind writes the profile as the process exits
    total, parsed = instructions(outfile), requests_parsed(outfile)
    if parsed == 0:
        hb.fail(f"{server.name}: found no parsed requests in {outfile}")
    return {"instructions": total, "requests": parsed, "wrk_requests": wrk.requests, "per_request": total / parsed}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--seconds", type=float, default=20.0, help="seconds of collected load per server")
    parser.add_argument("--warmup", type=float, default=3.0, help="seconds of load before collecting")
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--python", default=str(hb.DEFAULT_PYTHON if hb.DEFAULT_PYTHON.exists() else sys.executable))
    parser.add_argument("--json", type=Path, help="also write the results here as JSON")
    parser.add_argument("--keep", type=Path, help="copy both callgrind profiles here, for callgrind_annotate")
    args = parser.parse_args()
    args.threads = 1
    for tool in ("valgrind", "callgrind_control", "callgrind_annotate", "wrk"):
        if shutil.which(tool) is None:
            hb.fail(f"{tool} is not installed (Debian: valgrind, wrk); this script installs nothing")

    token = secrets.token_urlsafe(24)
    env = hb.bench_env(token)
    results: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory(prefix="authhook-http-instructions-") as tmp:
        workdir = Path(tmp)
        for name in ("baseline", "authhook"):
            outfile = workdir / f"{name}.callgrind"
            if name == "baseline":
                argv = [*callgrind(outfile), args.python, str(Path(hb.__file__).resolve()), "--baseline-server"]
                server = hb.start_server(name, argv, env, workdir, hb.SERVER_CPU, hb.READY_TIMEOUT_S * 10)
            else:
                server = hb.start_authhook(args.python, workdir, env, hb.SERVER_CPU, wrapper=callgrind(outfile))
            try:
                results[name] = measure(server, outfile, token, args)
            finally:
                server.stop()
            if args.keep is not None:
                args.keep.mkdir(parents=True, exist_ok=True)
                shutil.copy(outfile, args.keep / outfile.name)
            r = results[name]
            print(
                f"{name:8} {r['per_request']:9,.0f} instructions/request "
                f"({r['instructions']:,.0f} over {r['requests']:,.0f} requests parsed, "
                f"{r['wrk_requests']:,.0f} by wrk)",
                flush=True,
            )
    ratio = results["baseline"]["per_request"] / results["authhook"]["per_request"]
    print(
        f"ratio bare handler / authhook: {ratio:.3f} (what authhook adds: "
        f"{results['authhook']['per_request'] - results['baseline']['per_request']:,.0f} instructions/request)"
    )
    if args.json:
        report = {"seconds": args.seconds, "connections": args.connections, "servers": results, "ratio": ratio}
        args.json.write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
