"""Stand-in management APIs of EMQX, VerneMQ and RabbitMQ, served on real sockets for the session closers.

Each fake speaks its broker's API for the calls ``authhook.sessions.broker_api`` makes: the same paths,
methods, Basic-auth check (401 with the broker's own body and ``WWW-Authenticate``), answer shapes and
status codes, failures included. Where the shapes come from:

* EMQX: ``emqx_mgmt_api_clients.erl`` / ``emqx_dashboard.erl`` (list ``{"data", "meta": {"page", "limit",
  "count", "hasnext"}}``, 204 on kick and cache drain, 404 ``{"code": "CLIENTID_NOT_FOUND", "message":
  "Client ID not found"}``, 401 ``BAD_API_KEY_OR_SECRET`` "Check api_key/api_secret"). The 404 for a route
  an older EMQX lacks (``node_cache/reset``) is ASSUMED to be ``{"code": "NOT_FOUND", ...}``.
* VerneMQ: ``vmq_http_mgmt_api.erl`` / ``vmq_auth_apikey.erl`` / ``vmq_info_cli.erl`` and clique's JSON writer
  (every answer a list of ``{"type": ...}`` objects, 200 even for an alert, 400 with an empty body for an
  unknown command, 401 with ``www-authenticate: Authorization realm="VerneMQ"`` and no body).
* RabbitMQ: what a real 3.10.8 node answered here (``version="3.10"``): the duplicated ``client_properties``
  key under ``columns=``, 204 on DELETE, 404 ``{"error":"Object Not Found","reason":"Not Found"}``, 401
  ``{"error":"not_authorized","reason":"Login failed"}``, the paged object for ``page=``, and connections
  that only show in the listing once "statistics" ran (``visible=False`` until ``emit_stats``).

Knobs common to all: ``failures`` (statuses answered, in order, before any real handling, e.g. ``[503, 500]``),
``stall`` (hold every request until the fake closes: a server that never answers) and ``calls`` (every request
received, auth failures included).
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
from dataclasses import dataclass, field
from typing import Any, Self
from urllib.parse import unquote, unquote_plus

from aiohttp import web


@dataclass(frozen=True, slots=True)
class Call:
    """One request as the fake received it (``path`` percent-decoded; ``raw_path`` and ``query`` as sent)."""

    method: str
    path: str
    raw_path: str
    query: str
    headers: dict[str, str]
    authorized: bool


def _basic(request: web.Request) -> tuple[str, str] | None:
    header = request.headers.get("Authorization", "")
    scheme, _, value = header.partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        login, _, password = base64.b64decode(value, validate=True).decode("utf-8").partition(":")
    except ValueError:
        return None
    return login, password


class _FakeApi:
    """The server part: an aiohttp app on 127.0.0.1, port 0, with the shared knobs."""

    def __init__(self) -> None:
        self.calls: list[Call] = []
        self.failures: list[int] = []
        self.stall = False
        self._release = asyncio.Event()
        self._runner: web.AppRunner | None = None
        self.url = ""
        self.app = web.Application(middlewares=[self._front])

    def authorized(self, request: web.Request) -> bool:
        raise NotImplementedError

    def unauthorized(self) -> web.Response:
        raise NotImplementedError

    def failure(self, status: int, request: web.Request) -> web.Response:
        """The answer for an injected failure (``failures``); a subclass gives it the broker's body."""
        return web.Response(status=status)

    @web.middleware
    async def _front(self, request: web.Request, handler: Any) -> web.StreamResponse:
        ok = self.authorized(request)
        raw_path, _, raw_query = request.raw_path.partition("?")
        self.calls.append(
            Call(
                request.method,
                request.path,
                raw_path,
                raw_query,
                {k: v for k, v in request.headers.items() if k.lower() != "authorization"},
                ok,
            )
        )
        if self.stall:
            await self._release.wait()
        if self.failures:
            return self.failure(self.failures.pop(0), request)
        if not ok:
            return self.unauthorized()
        response: web.StreamResponse = await handler(request)
        return response

    def calls_to(self, method: str, path_prefix: str) -> list[Call]:
        return [c for c in self.calls if c.method == method and c.path.startswith(path_prefix)]

    async def start(self) -> Self:
        self._runner = web.AppRunner(self.app, shutdown_timeout=0.5)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        server = site._server
        assert isinstance(server, asyncio.base_events.Server)
        port = server.sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        return self

    async def close(self) -> None:
        self._release.set()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> Self:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


# ---------------------------------------------------------------------------------------------------------
# EMQX
# ---------------------------------------------------------------------------------------------------------


class FakeEmqx(_FakeApi):
    """EMQX's ``/api/v5`` for clients, their authz cache and the node caches.

    ``clients`` maps client id -> user name of every live client; a kick removes it. ``node_cache=False``
    makes the ``node_cache/reset`` routes absent (404), as on an EMQX before 6.2 / e5.9.
    """

    def __init__(self, api_key: str, api_secret: str, *, node_cache: bool = True) -> None:
        super().__init__()
        self.api_key = api_key
        self.api_secret = api_secret
        self.node_cache = node_cache
        self.clients: dict[str, str] = {}
        self.kicked: list[str] = []
        self.drained: list[str] = []
        self.resets: list[str] = []  # "authorization" / "authentication"
        r = self.app.router
        r.add_get("/api/v5/clients", self._list)
        r.add_delete("/api/v5/clients/{rest:.+}", self._client_route)
        r.add_post("/api/v5/{kind:authorization|authentication}/node_cache/reset", self._reset)

    def authorized(self, request: web.Request) -> bool:
        return _basic(request) == (self.api_key, self.api_secret)

    def unauthorized(self) -> web.Response:
        return web.json_response(
            {"code": "BAD_API_KEY_OR_SECRET", "message": "Check api_key/api_secret"},
            status=401,
            headers={"WWW-Authenticate": 'Basic Realm="emqx-dashboard"'},
        )

    def failure(self, status: int, request: web.Request) -> web.Response:
        code = "SERVICE_UNAVAILABLE" if status == 503 else "INTERNAL_ERROR"
        return web.json_response({"code": code, "message": "injected"}, status=status)

    @staticmethod
    def _not_found() -> web.Response:
        return web.json_response({"code": "CLIENTID_NOT_FOUND", "message": "Client ID not found"}, status=404)

    def _row(self, clientid: str, username: str) -> dict[str, Any]:
        return {
            "clientid": clientid,
            "username": username,
            "node": "emqx@127.0.0.1",
            "connected": True,
            "proto_name": "MQTT",
            "proto_ver": 4,
            "ip_address": "127.0.0.1",
            "port": 50000,
            "clean_start": True,
            "keepalive": 60,
        }

    async def _list(self, request: web.Request) -> web.Response:
        try:
            page = int(request.query.get("page", "1"))
            limit = int(request.query.get("limit", "100"))
        except ValueError:
            return web.json_response({"code": "INVALID_PARAMETER", "message": "page_limit_invalid"}, status=400)
        if page < 1 or not 1 <= limit <= 10000:
            return web.json_response({"code": "INVALID_PARAMETER", "message": "page_limit_invalid"}, status=400)
        users = request.query.getall("username", [])
        rows = [self._row(c, u) for c, u in sorted(self.clients.items()) if not users or u in users]
        chunk = rows[(page - 1) * limit : page * limit]
        meta = {"page": page, "limit": limit, "count": len(rows), "hasnext": page * limit < len(rows)}
        return web.json_response({"data": chunk, "meta": meta})

    async def _client_route(self, request: web.Request) -> web.Response:
        # Cowboy matches the still-encoded segments, then decodes the binding: `a%2Fb` is one client id.
        segments = request.raw_path.split("?", 1)[0].removeprefix("/api/v5/clients/").split("/")
        clientid = unquote(segments[0])
        if len(segments) == 1:
            return self._kick(clientid)
        if segments[1:] == ["authorization", "cache"]:
            return self._drain(clientid)
        return web.json_response({"code": "NOT_FOUND", "message": "Request Path Not Found"}, status=404)

    def _kick(self, clientid: str) -> web.Response:
        if self.clients.pop(clientid, None) is None:
            return self._not_found()
        self.kicked.append(clientid)
        return web.Response(status=204)

    def _drain(self, clientid: str) -> web.Response:
        if clientid not in self.clients:
            return self._not_found()
        self.drained.append(clientid)
        return web.Response(status=204)

    async def _reset(self, request: web.Request) -> web.Response:
        if not self.node_cache:
            return web.json_response({"code": "NOT_FOUND", "message": "Request Path Not Found"}, status=404)
        self.resets.append(request.match_info["kind"])
        return web.Response(status=204)


# ---------------------------------------------------------------------------------------------------------
# VerneMQ
# ---------------------------------------------------------------------------------------------------------


@dataclass
class FakeSession:
    user: str
    mountpoint: str = ""
    is_online: bool = True


def _cowboy_qs(query: str) -> list[tuple[str, str | bool]]:
    """``cowboy_req:parse_qs``: a key without ``=`` has the value ``true``."""
    pairs: list[tuple[str, str | bool]] = []
    for part in query.split("&") if query else []:
        key, eq, value = part.partition("=")
        pairs.append((unquote_plus(key), unquote_plus(value) if eq else True))
    return pairs


def _clique(*items: dict[str, Any]) -> web.Response:
    return web.Response(body=json.dumps(list(items)) + "\n", content_type="application/json")


class FakeVernemq(_FakeApi):
    """One VerneMQ node's ``/api/v1`` (vmq-admin over HTTP): ``session show``/``disconnect``, ``webhooks cache clear``.

    ``sessions`` maps client id -> ``FakeSession``; pass the same dict to several nodes for a cluster (a
    disconnect finds the session wherever it lives). ``cache_clears`` counts this node's cache clears;
    ``cache_clear=False`` makes the command unknown (400), as on a VerneMQ without it.
    """

    SHOW_DEFAULT = ("peer_port", "peer_host", "user", "mountpoint", "client_id", "is_online")
    SHOW_ITEMS = (*SHOW_DEFAULT, "node", "protocol", "waiting_acks", "topic", "qos")

    def __init__(
        self, api_key: str, *, sessions: dict[str, FakeSession] | None = None, cache_clear: bool = True
    ) -> None:
        super().__init__()
        self.api_key = api_key
        self.sessions: dict[str, FakeSession] = {} if sessions is None else sessions
        self.cache_clear = cache_clear
        self.cache_clears = 0
        self.disconnected: list[tuple[str, str, bool]] = []  # (client id, mountpoint, cleanup)
        self.app.router.add_route("*", "/api/v1/{command:.*}", self._command)

    def authorized(self, request: web.Request) -> bool:
        basic = _basic(request)
        key = basic[0] if basic is not None else request.headers.get("x-api-key")
        return key == self.api_key

    def unauthorized(self) -> web.Response:
        return web.Response(status=401, headers={"www-authenticate": 'Authorization realm="VerneMQ"'})

    async def _command(self, request: web.Request) -> web.Response:
        if request.method not in ("GET", "HEAD", "OPTIONS"):
            return web.Response(status=405)
        command = request.match_info["command"].strip("/")
        args = _cowboy_qs(request.raw_path.partition("?")[2])
        if command == "session/show":
            return self._show(args)
        if command == "session/disconnect":
            return self._disconnect(args)
        if command == "webhooks/cache/clear" and self.cache_clear and not args:
            self.cache_clears += 1
            return _clique({"type": "text", "text": "Done"})
        return web.Response(status=400)  # malformed_request: no such vmq-admin command

    def _show(self, args: list[tuple[str, str | bool]]) -> web.Response:
        fields: list[str] = []
        where: dict[str, str] = {}
        for key, value in args:
            name = key.removeprefix("--")
            if not key.startswith("--") or name not in (*self.SHOW_ITEMS, "limit", "rowtimeout"):
                return web.Response(status=400)
            if name in ("limit", "rowtimeout"):
                continue
            if value is True:
                fields.append(name)
            else:
                where[name] = str(value)
        rows = []
        for client_id, s in sorted(self.sessions.items()):
            record = {
                "client_id": client_id,
                "user": s.user,
                "mountpoint": s.mountpoint,
                "is_online": s.is_online,
                "peer_host": "127.0.0.1",
                "peer_port": 40000,
                "node": "VerneMQ@127.0.0.1",
            }
            if all(
                str(record.get(k)).lower() == v.lower() if k == "is_online" else str(record.get(k)) == v
                for k, v in where.items()
            ):
                rows.append({f: record.get(f) for f in (fields or self.SHOW_DEFAULT)})
        return _clique({"type": "table", "table": rows})

    def _disconnect(self, args: list[tuple[str, str | bool]]) -> web.Response:
        client_id = next((v for k, v in args if k == "client-id" and isinstance(v, str)), None)
        flags = {k: v for k, v in args if k.startswith("-")}
        unknown = set(flags) - {"--cleanup", "-c", "--mountpoint", "-m"}
        if unknown or any(k not in ("client-id", *flags) for k, _ in args):
            return web.Response(status=400)
        if client_id is None:
            usage = "vmq-admin session disconnect client-id=<ClientId>\n\n  Forcefully disconnects a client"
            return _clique({"type": "alert", "alert": [{"type": "text", "text": usage}]})
        mountpoint = flags.get("--mountpoint", flags.get("-m", ""))
        cleanup = "--cleanup" in flags or "-c" in flags
        session = self.sessions.get(client_id)
        if session is not None and session.mountpoint == mountpoint:
            if cleanup or not session.is_online:
                del self.sessions[client_id]
            else:
                session.is_online = False
        self.disconnected.append((client_id, str(mountpoint), cleanup))
        return _clique({"type": "text", "text": "Done"})


# ---------------------------------------------------------------------------------------------------------
# RabbitMQ
# ---------------------------------------------------------------------------------------------------------


@dataclass
class FakeConnection:
    user: str | None
    client_id: str
    visible: bool = True  # in the stats database yet (shown by GET /api/connections)
    closed_with: list[str] = field(default_factory=list)


class FakeRabbitmq(_FakeApi):
    """The management plugin's connection endpoints, as RabbitMQ 3.10.8 answers them (or ``version="3.12"``).

    ``connect(user, client_id)`` registers a live MQTT connection and returns its name; ``connections`` holds
    the live ones by name, ``closed`` the (name, X-Reason) of every close through the API. ``by_username=False`` removes
    ``DELETE /api/connections/username/{user}`` (an older release).
    """

    def __init__(self, user: str, password: str, *, version: str = "3.10", by_username: bool = True) -> None:
        super().__init__()
        self.user = user
        self.password = password
        self.version = version
        self.by_username = by_username
        self.connections: dict[str, FakeConnection] = {}
        self.closed: list[tuple[str, str | None]] = []
        self.leave_after_listing: set[str] = set()  # these disconnect on their own right after a listing
        self._ports = itertools.count(50001)
        r = self.app.router
        r.add_get("/api/connections", self._list)
        r.add_delete("/api/connections/{rest:.+}", self._delete_route)

    def connect(self, user: str | None, client_id: str, *, visible: bool = True) -> str:
        name = f"127.0.0.1:{next(self._ports)} -> 127.0.0.1:1883"
        self.connections[name] = FakeConnection(user, client_id, visible)
        return name

    def emit_stats(self) -> None:
        """What the node's next statistics emission does: every connection becomes listed."""
        for connection in self.connections.values():
            connection.visible = True

    def authorized(self, request: web.Request) -> bool:
        return _basic(request) == (self.user, self.password)

    def unauthorized(self) -> web.Response:
        return web.json_response(
            {"error": "not_authorized", "reason": "Login failed"},
            status=401,
            headers={"www-authenticate": 'Basic realm="RabbitMQ Management"'},
        )

    @staticmethod
    def _not_found() -> web.Response:
        return web.json_response({"error": "Object Not Found", "reason": "Not Found"}, status=404)

    def _record(self, name: str, c: FakeConnection, columns: list[str] | None) -> str:
        properties = (
            {"client_id": c.client_id}
            if self.version != "3.10"
            else {"client_id": c.client_id, "product": "MQTT client"}
        )
        full: dict[str, Any] = {
            "name": name,
            "user": c.user,
            "client_properties": properties,
            "type": "direct" if self.version == "3.10" else "network",
            "protocol": "MQTT 3.1.1",
            "vhost": "/",
            "node": "rabbit@localhost",
            "peer_host": "127.0.0.1",
            "channels": 1,
        }
        if c.user is None:
            del full["user"]
        if columns is None:
            return json.dumps(full)
        parts = []
        for column in sorted(set(columns)):
            if column not in full:
                continue
            if column == "client_properties" and self.version == "3.10":
                parts.append('"client_properties":{}')  # what 3.10.8 really sends first
            parts.append(f"{json.dumps(column)}:{json.dumps(full[column])}")
        return "{" + ",".join(parts) + "}"

    async def _list(self, request: web.Request) -> web.Response:
        columns = request.query["columns"].split(",") if "columns" in request.query else None
        records = [self._record(n, c, columns) for n, c in sorted(self.connections.items()) if c.visible]
        for name in self.leave_after_listing:
            self.connections.pop(name, None)
        if "page" not in request.query:
            return web.Response(text="[" + ",".join(records) + "]", content_type="application/json")
        page = int(request.query["page"])
        size = int(request.query.get("page_size", "100"))
        chunk = records[(page - 1) * size : page * size]
        page_count = (len(records) + size - 1) // size
        head = {
            "filtered_count": len(records),
            "item_count": len(chunk),
            "page": page,
            "page_count": page_count,
            "page_size": size,
            "total_count": len(records),
        }
        text = json.dumps(head)[:-1] + ',"items":[' + ",".join(chunk) + "]}"
        return web.Response(text=text, content_type="application/json")

    async def _delete_route(self, request: web.Request) -> web.Response:
        segments = request.raw_path.split("?", 1)[0].removeprefix("/api/connections/").split("/")
        if len(segments) == 2 and segments[0] == "username":
            return self._close_user(unquote(segments[1]), request)
        if len(segments) == 1:
            return self._close(unquote(segments[0]), request)
        return self._not_found()

    def _close(self, name: str, request: web.Request) -> web.Response:
        connection = self.connections.pop(name, None)
        if connection is None:
            return self._not_found()
        self.closed.append((name, request.headers.get("X-Reason")))
        return web.Response(status=204)

    def _close_user(self, username: str, request: web.Request) -> web.Response:
        if not self.by_username:
            return self._not_found()
        for name, connection in list(self.connections.items()):
            if connection.user == username:
                del self.connections[name]
                self.closed.append((name, request.headers.get("X-Reason")))
        return web.Response(status=204)
