"""HTTP throughput of ``POST /emqx/authz`` (cache hits) next to a bare aiohttp handler, measured in the same run.

    apt-get install -y wrk          # once; the script does not install anything
    .venv/bin/python bench/http_bench.py [--rounds 3] [--duration 10] [--connections 32] [--json results.json]

Two servers run as subprocesses on 127.0.0.1: authhook (``python -m authhook serve`` on a throw-away SQLite
world, decision log on, as in production) and a bare aiohttp app whose handler does the same JSON work with
the same library authhook uses (``orjson.loads`` of the body read as bytes, then the ``{"result": "allow"}``
answer written with ``orjson.dumps``), access logs off in both. So the ratio prices what authhook adds
(token check, translation, decision, decision log), not a faster JSON library on one side only. wrk
drives each in turn with the same settings and the same request (EMQX 5 HTTP authorizer body, every value a
string). With ``taskset`` available the servers are pinned to CPU 0 and wrk to CPU 1. Each server gets a 2 s
warm-up run that is thrown away; then the measured runs alternate, ``--rounds`` times each, and the best
(least-disturbed) run of each side is reported with the ratio of the two.

The machine is a shared, noisy 2-core VM: absolute requests/s move by tens of percent between runs, so the
figure that matters is the ratio authhook / bare handler taken in the same run (target: >= 0.9).

``--baseline-only`` measures the bare handler alone; ``--baseline-server`` is the internal mode that runs it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, NoReturn

ROOT = Path(__file__).resolve().parent.parent
LUA_SCRIPT = Path(__file__).resolve().parent / "emqx_authz.lua"
DEFAULT_PYTHON = ROOT / ".venv" / "bin" / "python"
ENDPOINT_MARKERS = (ROOT / "authhook" / "brokers" / "emqx", ROOT / "authhook" / "brokers" / "emqx.py")

PATH = "/emqx/authz"
BODY = json.dumps(
    {
        "clientid": "sensor-1",
        "username": "acme-dev",
        "topic": "m/acme/c/telemetry/temp",
        "action": "publish",
        "qos": "1",
        "retain": "false",
    },
    separators=(",", ":"),
)
CLIENT_SECRET = "acme-dev-bench-secret-0123456789"
WORLD = {
    "tenants": [
        {
            "id": "acme",
            "name": "Acme (http bench)",
            "clients": [{"id": "acme-dev", "secret": CLIENT_SECRET}],
            "channels": [{"id": "telemetry"}],
            "connections": [{"client": "acme-dev", "channel": "telemetry", "actions": ["publish"]}],
        }
    ]
}
SERVER_CPU, WRK_CPU = "0", "1"
READY_TIMEOUT_S = 30.0


# -- the bare baseline server (runs in its own process) ----------------------------------------------------


def run_baseline_server(host: str, port: int) -> None:
    """A bare aiohttp app doing authhook's JSON work, with authhook's JSON library, and nothing else; prints
    its address when ready."""
    import asyncio

    import orjson
    from aiohttp import web

    async def authz(request: web.Request) -> web.Response:
        orjson.loads(await request.read())
        return web.Response(body=orjson.dumps({"result": "allow"}), content_type="application/json")

    async def main() -> None:
        app = web.Application()
        app.router.add_post(PATH, authz)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        try:
            site = web.TCPSite(runner, host, port)
            await site.start()
            bound = next((a[1] for a in runner.addresses), port)
            print(f"baseline listening on http://{host}:{bound}", flush=True)
            stop = asyncio.Event()
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(sig, stop.set)
            await stop.wait()
        finally:
            await runner.cleanup()

    asyncio.run(main())


# -- subprocess helpers ------------------------------------------------------------------------------------


@dataclass
class Server:
    name: str
    proc: subprocess.Popen[bytes]
    port: int
    log: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}{PATH}"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def fail(message: str) -> NoReturn:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def pinned(cpu: str | None, argv: list[str]) -> list[str]:
    return ["taskset", "-c", cpu, *argv] if cpu is not None else argv


def bench_env(token: str) -> dict[str, str]:
    """The caller's environment without its own AUTHHOOK_* settings, plus the bench's."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AUTHHOOK_")}
    env.update(
        AUTHHOOK_SECRET_KEY=secrets.token_hex(32),  # 64 characters
        AUTHHOOK_WEBHOOK__TOKEN=token,
        AUTHHOOK_DECISION_LOG__ENABLED="true",
    )
    return env


def tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def start_server(
    name: str, argv: list[str], env: dict[str, str], workdir: Path, cpu: str | None, timeout: float = READY_TIMEOUT_S
) -> Server:
    """Start a server writing to files (no pipe can fill up) and wait for its 'listening on' line."""
    out, err = workdir / f"{name}.out", workdir / f"{name}.err"
    with out.open("wb") as stdout, err.open("wb") as stderr:
        proc = subprocess.Popen(pinned(cpu, argv), env=env, stdout=stdout, stderr=stderr, cwd=workdir)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for line in out.read_text(errors="replace").splitlines():
            if " listening on http://" in line:
                server = Server(name, proc, int(line.rsplit(":", 1)[1].split("/")[0]), err)
                return server
        if proc.poll() is not None:
            fail(f"{name} server exited with status {proc.returncode}:\n{tail(err)}")
        time.sleep(0.05)
    proc.kill()
    fail(f"{name} server did not report its address within {timeout:.0f} s:\n{tail(err)}")


def check_allow(server: Server, token: str) -> dict[str, Any]:
    """One request by hand: the benchmark is worthless unless the answer is an allow."""
    request = urllib.request.Request(
        server.url,
        data=BODY.encode(),
        method="POST",
        headers={"content-type": "application/json", "x-authhook-token": token},
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            status, raw = response.status, response.read()
    except urllib.error.HTTPError as exc:
        status, raw = exc.code, exc.read()
    except OSError as exc:
        fail(f"{server.name}: request to {server.url} failed: {exc}")
    try:
        answer: Any = json.loads(raw)
    except ValueError:
        answer = None
    if status != 200 or not isinstance(answer, dict) or answer.get("result") != "allow":
        fail(f"{server.name}: expected HTTP 200 {{'result': 'allow'}}, got {status} {raw[:300]!r}\n{tail(server.log)}")
    allow: dict[str, Any] = answer
    return allow


# -- wrk ---------------------------------------------------------------------------------------------------


@dataclass
class WrkResult:
    requests_per_s: float
    requests: int
    duration_s: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    p999_ms: float
    mean_ms: float
    max_ms: float
    errors: dict[str, int] = field(default_factory=dict)
    non_2xx: int = 0
    socket_errors: str = ""
    server_cpu_us_per_request: float | None = None  # user+system CPU of the server process, per request

    @property
    def failed(self) -> int:
        return self.non_2xx + sum(v for k, v in self.errors.items() if k != "status")


def run_wrk(url: str, token: str, args: argparse.Namespace, duration_s: float, cpu: str | None) -> WrkResult:
    argv = [
        "wrk",
        "-t",
        str(args.threads),
        "-c",
        str(args.connections),
        "-d",
        f"{duration_s:g}s",
        "--timeout",
        "5s",
        "--latency",
        "-s",
        str(LUA_SCRIPT),
        url,
        "--",
        token,
        BODY,
    ]
    done = subprocess.run(pinned(cpu, argv), capture_output=True, text=True, timeout=duration_s + 60)
    if done.returncode != 0:
        fail(f"wrk exited with status {done.returncode}:\n{done.stdout}\n{done.stderr}")
    data: dict[str, Any] | None = None
    non_2xx, socket_errors = 0, ""
    for line in done.stdout.splitlines():
        if line.startswith("BENCH_JSON "):
            data = json.loads(line.removeprefix("BENCH_JSON "))
        elif "Non-2xx or 3xx responses:" in line:
            non_2xx = int(line.rsplit(":", 1)[1])
        elif "Socket errors:" in line:
            socket_errors = line.strip()
    if data is None:
        fail(f"no BENCH_JSON line in wrk's output:\n{done.stdout}\n{done.stderr}")
    latency, duration = data["latency_us"], data["duration_us"] / 1e6
    return WrkResult(
        requests_per_s=data["requests"] / duration,
        requests=data["requests"],
        duration_s=duration,
        p50_ms=latency["p50"] / 1000,
        p90_ms=latency["p90"] / 1000,
        p99_ms=latency["p99"] / 1000,
        p999_ms=latency["p999"] / 1000,
        mean_ms=latency["mean"] / 1000,
        max_ms=latency["max"] / 1000,
        errors=data["errors"],
        non_2xx=max(non_2xx, data["errors"]["status"]),
        socket_errors=socket_errors,
    )


def cpu_seconds(pid: int) -> float | None:
    """User+system CPU time of a process so far (Linux /proc), or None where that cannot be read."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def measured_run(server: Server, token: str, args: argparse.Namespace, cpu: str | None) -> WrkResult:
    """One wrk run, with the CPU time the server spent on it: on a shared VM, CPU per request moves less
    than requests per second, since time the hypervisor gives to other guests is not charged to it."""
    before = cpu_seconds(server.proc.pid)
    result = run_wrk(server.url, token, args, args.duration, cpu)
    after = cpu_seconds(server.proc.pid)
    if before is not None and after is not None and result.requests:
        result.server_cpu_us_per_request = (after - before) / result.requests * 1e6
    return result


def describe(result: WrkResult) -> str:
    text = (
        f"{result.requests_per_s:9.0f} req/s  p50 {result.p50_ms:6.2f} ms  p90 {result.p90_ms:6.2f} ms  "
        f"p99 {result.p99_ms:6.2f} ms  ({result.requests} requests)"
    )
    if result.server_cpu_us_per_request is not None:
        text += f"  server CPU {result.server_cpu_us_per_request:6.1f} µs/request"
    if result.failed:
        text += f"  non-2xx {result.non_2xx}, socket errors {result.errors}"
    return text


# -- the run -----------------------------------------------------------------------------------------------


def wait_for_endpoint(wait_s: float) -> None:
    deadline = time.monotonic() + wait_s
    announced = False
    while not any(p.exists() for p in ENDPOINT_MARKERS):
        if time.monotonic() >= deadline:
            fail(f"{ENDPOINT_MARKERS[0].relative_to(ROOT)} does not exist (waited {wait_s:.0f} s); try --baseline-only")
        if not announced:
            print(f"waiting up to {wait_s:.0f} s for {ENDPOINT_MARKERS[0].relative_to(ROOT)} to appear ...", flush=True)
            announced = True
        time.sleep(5)


def start_authhook(
    python: str, workdir: Path, env: dict[str, str], cpu: str | None, wrapper: list[str] | None = None
) -> Server:
    """Import the bench world into a fresh SQLite store and serve it; ``wrapper`` runs the server under
    another command (``http_instructions.py`` passes valgrind)."""
    store = f"sqlite:///{workdir / 'bench.db'}"
    world = workdir / "world.json"
    world.write_text(json.dumps(WORLD))
    imported = subprocess.run(
        [python, "-m", "authhook", "--store", store, "import", str(world)],
        env=env,
        cwd=workdir,
        capture_output=True,
        text=True,
        timeout=120,
    )
    if imported.returncode != 0:
        fail(f"authhook import failed ({imported.returncode}):\n{imported.stdout}{imported.stderr}")
    argv = [*(wrapper or []), python, "-m", "authhook", "--store", store, "serve", "--host", "127.0.0.1", "--port", "0"]
    return start_server("authhook", argv, env, workdir, cpu, READY_TIMEOUT_S * (10 if wrapper else 1))


def best(results: list[WrkResult]) -> WrkResult:
    return max(results, key=lambda r: r.requests_per_s)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--rounds", type=int, default=3, help="measured runs per server, alternating (default 3)")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per measured wrk run (default 10)")
    parser.add_argument("--warmup", type=float, default=2.0, help="seconds of discarded warm-up per server (default 2)")
    parser.add_argument("--threads", type=int, default=1, help="wrk threads (default 1)")
    parser.add_argument("--connections", type=int, default=32, help="wrk connections (default 32)")
    parser.add_argument("--pause", type=float, default=1.0, help="idle seconds between runs (default 1)")
    parser.add_argument("--no-pin", action="store_true", help="do not pin servers and wrk to CPUs with taskset")
    parser.add_argument("--python", default=str(DEFAULT_PYTHON if DEFAULT_PYTHON.exists() else sys.executable))
    parser.add_argument("--baseline-only", action="store_true", help="measure the bare aiohttp handler alone")
    parser.add_argument("--wait-endpoint", type=float, default=0.0, help="seconds to wait for the emqx adapter")
    parser.add_argument("--json", type=Path, help="also write the results here as JSON")
    parser.add_argument("--baseline-server", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.baseline_server:
        run_baseline_server("127.0.0.1", args.port)
        return
    if shutil.which("wrk") is None:
        fail("wrk is not installed (Debian/Ubuntu: `apt-get install -y wrk`); this script installs nothing")
    if not args.baseline_only:
        wait_for_endpoint(args.wait_endpoint)
    pin = not args.no_pin and shutil.which("taskset") is not None and (os.cpu_count() or 1) >= 2
    server_cpu, wrk_cpu = (SERVER_CPU, WRK_CPU) if pin else (None, None)
    token = secrets.token_urlsafe(24)
    env = bench_env(token)

    load_before = os.getloadavg()
    print(f"python {platform.python_version()} on {platform.machine()}, {os.cpu_count()} CPUs")
    print(f"load average before: {load_before[0]:.2f} (above ~0.5 other work shares the machine: expect noise)")
    print(
        f"wrk -t {args.threads} -c {args.connections} -d {args.duration:g}s (warm-up {args.warmup:g}s), "
        f"{args.rounds} rounds alternating, best of each"
    )
    if pin:
        print(f"pinned with taskset: servers on CPU {SERVER_CPU}, wrk on CPU {WRK_CPU}")
    else:
        print("not pinned: servers and wrk share all CPUs")

    servers: list[Server] = []
    with tempfile.TemporaryDirectory(prefix="authhook-http-bench-") as tmp:
        workdir = Path(tmp)
        try:
            baseline_argv = [args.python, str(Path(__file__).resolve()), "--baseline-server", "--port", "0"]
            servers.append(start_server("baseline", baseline_argv, env, workdir, server_cpu))
            if not args.baseline_only:
                servers.append(start_authhook(args.python, workdir, env, server_cpu))
            for server in servers:
                answer = check_allow(server, token)
                print(f"{server.name:8} on port {server.port}: {json.dumps(answer)}")
            served = dict.fromkeys((s.name for s in servers), 2)  # the two checks by hand
            for server in servers:
                served[server.name] += run_wrk(server.url, token, args, args.warmup, wrk_cpu).requests  # discarded
                time.sleep(args.pause)
            results: dict[str, list[WrkResult]] = {s.name: [] for s in servers}
            for round_no in range(1, args.rounds + 1):
                order = servers if round_no % 2 else servers[::-1]
                for server in order:
                    result = measured_run(server, token, args, wrk_cpu)
                    results[server.name].append(result)
                    served[server.name] += result.requests
                    print(f"round {round_no} {server.name:8} {describe(result)}", flush=True)
                    if result.failed:
                        fail(f"{server.name}: wrk saw failures: non-2xx {result.non_2xx}, {result.errors}")
                    if server.proc.poll() is not None:
                        fail(f"{server.name} server died:\n{tail(server.log)}")
                    time.sleep(args.pause)
            for server in servers:
                check_allow(server, token)  # still answering allow after the load
        finally:
            for server in servers:
                server.stop()
        decision_log = workdir / "bench.db.decisions.jsonl"
        logged = sum(1 for _ in decision_log.open()) if decision_log.exists() else None

    load_after = os.getloadavg()
    bests = {name: best(rs) for name, rs in results.items()}
    print()
    for name, result in bests.items():
        print(f"best     {name:8} {describe(result)}")
    report: dict[str, Any] = {
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "pinned": pin,
        "load_average_1m": {"before": load_before[0], "after": load_after[0]},
        "wrk": {"threads": args.threads, "connections": args.connections, "duration_s": args.duration},
        "rounds": {name: [asdict(r) for r in rs] for name, rs in results.items()},
        "best": {name: asdict(r) for name, r in bests.items()},
    }
    if "authhook" in bests:
        ratio = bests["authhook"].requests_per_s / bests["baseline"].requests_per_s
        verdict = "meets" if ratio >= 0.9 else "misses"
        print(f"ratio authhook / bare handler: {ratio:.3f} ({verdict} the >= 0.9 target)")
        # Each round ran the two servers back to back, so a round's ratio shares that moment's machine.
        pairs = zip(results["authhook"], results["baseline"], strict=True)
        paired = [a.requests_per_s / b.requests_per_s for a, b in pairs]
        print(f"per-round ratios: {', '.join(f'{r:.3f}' for r in paired)} (median {statistics.median(paired):.3f})")
        costs = {
            name: measured
            for name, rs in results.items()
            if (measured := [r.server_cpu_us_per_request for r in rs if r.server_cpu_us_per_request is not None])
        }
        cpu = {name: statistics.median(measured) for name, measured in costs.items()}
        least = {name: min(measured) for name, measured in costs.items()}
        if len(costs) == 2:
            print(
                f"server CPU per request (median): bare {cpu['baseline']:.1f} µs, authhook {cpu['authhook']:.1f} µs; "
                f"ratio {cpu['baseline'] / cpu['authhook']:.3f}"
            )
            # The least CPU a request took in any round is the least disturbed measure of its cost, as the
            # best throughput is: both move together when neither server is disturbed.
            print(
                f"server CPU per request (least): bare {least['baseline']:.1f} µs, "
                f"authhook {least['authhook']:.1f} µs; ratio {least['baseline'] / least['authhook']:.3f}"
            )
            report.update(
                cpu_us_per_request_median=cpu,
                cpu_ratio=cpu["baseline"] / cpu["authhook"],
                cpu_us_per_request_least=least,
                cpu_least_ratio=least["baseline"] / least["authhook"],
            )
        if logged is not None:
            print(f"decision log: {logged} lines for {served['authhook']} requests wrk and the checks saw answered")
        report.update(
            ratio=ratio,
            target=0.9,
            paired_ratios=paired,
            paired_ratio_median=statistics.median(paired),
            decision_log_lines=logged,
            authhook_requests=served["authhook"],
        )
    print(f"load average after: {load_after[0]:.2f} (includes this run's own load)")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
