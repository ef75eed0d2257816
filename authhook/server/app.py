"""The aiohttp application: health, readiness and the PDP's own JSON API; broker adapters mount here.

Every error leaves as a small JSON body with a stable code - never a traceback - and bodies over
``http.max_body_bytes`` are refused with 413 before they are read.
"""

from __future__ import annotations

import asyncio
import gc
import ipaddress
import logging
import signal
import ssl
from collections.abc import Callable
from typing import Any

import orjson
from aiohttp import web
from pydantic import ValidationError

from authhook.brokers import broker_routes
from authhook.brokers.common import MAX_BODY_KEY
from authhook.config import HttpSettings, Settings
from authhook.errors import AuthhookError, ConfigError
from authhook.models import AuthzRequest
from authhook.pdp import PDP
from authhook.server.edge import Edge, MalformedBody, error_response, mount, mount_catch_all

log = logging.getLogger("authhook.server")

PDP_KEY = web.AppKey("pdp", PDP)


async def read_json(request: web.Request) -> Any:
    """The body as JSON, or a 400 that says what is wrong."""
    body = await request.read()
    try:
        # orjson, like the broker adapters: it refuses what the standard library would turn into a 500
        # (nesting deep enough for RecursionError, integers past its digit limit, lone surrogates)
        return orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise MalformedBody(f"body is not valid json: {exc}") from None


async def healthz(request: web.Request) -> web.Response:
    """Alive: the process answers. No dependency is checked here on purpose."""
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    """Ready: the store answers, so decisions can be made."""
    pdp = request.app[PDP_KEY]
    try:
        await pdp.store.ping()
        revision = await pdp.store.revision()
    except AuthhookError as exc:
        return web.json_response({"status": "unavailable", "reason": exc.code}, status=503)
    return web.json_response({"status": "ready", "revision": revision, "evaluator": pdp.evaluator.name})


async def authorize_v1(request: web.Request) -> web.Response:
    """POST /v1/authorize with an ``AuthzRequest`` body; answers the decision as JSON."""
    payload = await read_json(request)
    try:
        authz = AuthzRequest.model_validate(payload)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "body"
        return error_response(400, "invalid_request", f"{where}: {first['msg'].lower()}")
    decision = await request.app[PDP_KEY].authorize(authz, broker="api", hook="v1/authorize")
    return web.json_response(decision.to_dict())


async def decisions_v1(request: web.Request) -> web.Response:
    """GET /v1/decisions?limit=N: the newest decisions from the in-memory ring buffer."""
    try:
        limit = int(request.query.get("limit", "100"))
    except ValueError:
        return error_response(400, "invalid_request", "limit must be an integer")
    events = request.app[PDP_KEY].decision_log.recent()[-max(limit, 0) :] if limit > 0 else []
    return web.json_response([e.to_dict() for e in events])


def create_app(pdp: PDP, settings: Settings) -> web.Application:
    """The app: health open to all; the PDP's API and every broker's endpoints behind the token check."""
    app = web.Application(client_max_size=settings.http.max_body_bytes)
    app[PDP_KEY] = pdp
    app[MAX_BODY_KEY] = settings.http.max_body_bytes
    edge = Edge(settings)
    mount(app, edge, [web.get("/healthz", healthz), web.get("/readyz", readyz)], token=False)
    mount(app, edge, [web.post("/v1/authorize", authorize_v1), web.get("/v1/decisions", decisions_v1)])
    mount(app, edge, broker_routes(pdp, settings))
    mount_catch_all(app, edge)
    return app


def tls_context(http: HttpSettings) -> ssl.SSLContext | None:
    """Server TLS when a certificate is configured; with a client CA, mutual TLS (client certs required)."""
    if http.tls_cert is None:
        if http.tls_key is not None or http.tls_client_ca is not None:
            raise ConfigError("http.tls_key and http.tls_client_ca need http.tls_cert")
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(http.tls_cert, http.tls_key)
        if http.tls_client_ca is not None:
            context.load_verify_locations(http.tls_client_ca)
            context.verify_mode = ssl.CERT_REQUIRED
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"cannot load tls files: {exc}") from exc
    return context


def check_webhook_protection(settings: Settings) -> None:
    """Refuse to expose unauthenticated broker endpoints beyond this machine."""
    if settings.webhook.token is not None or settings.http.tls_client_ca is not None:
        return
    try:
        loopback = ipaddress.ip_address(settings.http.host).is_loopback
    except ValueError:
        loopback = settings.http.host == "localhost"
    if not loopback:
        raise ConfigError(
            f"listening on `{settings.http.host}` needs webhook.token (AUTHHOOK_WEBHOOK__TOKEN) "
            "or mutual TLS (http.tls_client_ca): brokers' endpoints must not be open"
        )
    log.warning("broker endpoints are not protected: set webhook.token before listening beyond loopback")


def tune_garbage_collector(http: HttpSettings) -> None:
    """Collect the young generation less often in the server process (``http.gc_young_threshold``).

    Only ``serve`` does this: it owns its process, and a library must not retune its host's collector. Every
    decision stays referenced by the decision log until it is written and while it is among the recent ones,
    so under load most young objects survive a collection; at Python's threshold of 700 the collector walks
    them over and over. Under wrk (``bench/http_bench.py``, timed with ``gc.callbacks``) collections took
    ~0.45 µs a cache-hit request at 700 and ~0.05 µs at 20,000, of ~90 µs. The older generations keep their
    thresholds, and authhook makes few reference cycles, so memory stays flat.
    """
    if http.gc_young_threshold:
        _, older, oldest = gc.get_threshold()
        gc.set_threshold(http.gc_young_threshold, older, oldest)


async def serve(settings: Settings, *, ready: Callable[[int], None] | None = None) -> None:
    """Run until SIGINT/SIGTERM; ``ready`` gets the bound port (useful with port 0)."""
    check_webhook_protection(settings)
    context = tls_context(settings.http)
    pdp = PDP.from_settings(settings)
    await pdp.open(retry_store=True)
    tune_garbage_collector(settings.http)
    runner = web.AppRunner(create_app(pdp, settings), access_log=None)
    await runner.setup()
    try:
        site = web.TCPSite(runner, settings.http.host, settings.http.port, ssl_context=context)
        await site.start()
        port = settings.http.port
        for address in runner.addresses:  # the real port when 0 asked the kernel to pick one
            port = address[1]
        scheme = "https" if context is not None else "http"
        log.info(
            "authhook listening on %s://%s:%s (store %s)",
            scheme,
            settings.http.host,
            port,
            settings.store_url_for_logs(),
        )
        print(f"authhook listening on {scheme}://{settings.http.host}:{port}", flush=True)
        if ready is not None:
            ready(port)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
    finally:
        await runner.cleanup()
        await pdp.close()
