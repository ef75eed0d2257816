"""The HTTP edge: every route is mounted through it.

It does two things for each request: the webhook token check (on broker and API routes; health is open),
and turning every error into a small JSON answer with a stable code - never a traceback.

It wraps each route's handler instead of being an aiohttp middleware. A middleware costs every request
aiohttp's per-application wrapping (a ``functools.partial`` and a contextlib manager that sets
``current_app``, around one more coroutine); under callgrind that came to ~19,000 instructions a request,
6 % of a cache-hit ``/emqx/authz`` round trip. The wrapper here costs one extra await. Paths no route
claims reach a catch-all route mounted last, which answers 404 or 405 in the same JSON shape.
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import Awaitable, Callable, Iterable

import orjson
from aiohttp import hdrs, web
from aiohttp.web_routedef import AbstractRouteDef

from authhook.brokers.common import MAX_BODY_KEY
from authhook.config import Settings

log = logging.getLogger("authhook.server")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

# Paths that need the token; the catch-all checks it before saying whether such a path exists.
PROTECTED_PREFIXES = ("/emqx/", "/vernemq", "/mosquitto-go-auth/", "/rabbitmq/", "/v1/")
UNAUTHORIZED = b'{"error":"unauthorized"}'  # says nothing more, on purpose


class MalformedBody(Exception):
    """The body could not be parsed; answered as 400 ``malformed_body``."""


def error_response(status: int, code: str, message: str) -> web.Response:
    return web.Response(
        body=orjson.dumps({"error": code, "message": message}), status=status, content_type="application/json"
    )


class Edge:
    """Guards handlers with the token check and the error answers; see the module docstring.

    The shared token comes in a header or a query parameter and is compared in constant time. With no
    token configured every request is admitted (``serve`` allows that only on loopback or with mutual TLS).
    """

    def __init__(self, settings: Settings) -> None:
        token = settings.webhook.token
        # Printable ASCII (the settings check it), so it is compared as text: no encoding per request.
        self._expected = token.get_secret_value() if token is not None else None
        self._header, self._query_param = settings.webhook.header, settings.webhook.query_param

    def admitted(self, request: web.Request) -> bool:
        """Does this request carry the token (or is none configured)?"""
        if self._expected is None:
            return True
        offered = request.headers.get(self._header) or request.query.get(self._query_param) or ""
        try:
            return hmac.compare_digest(offered, self._expected)
        except TypeError:  # non-ASCII text (or bytes aiohttp could not decode) is never the ASCII token
            return False

    def guard(self, handler: Handler, *, token: bool = True) -> Handler:
        """``handler`` behind the token check (when ``token``) and the error answers."""
        expected = self._expected if token else None
        header, query_param = self._header, self._query_param

        async def guarded(request: web.Request) -> web.StreamResponse:
            # ``admitted``, written out: every broker callback passes here, and the call cost more than the
            # check itself. tests/test_brokers.py holds the two to the same answers.
            if expected is not None:
                offered = request.headers.get(header) or request.query.get(query_param) or ""
                try:
                    admitted = hmac.compare_digest(offered, expected)
                except TypeError:  # non-ASCII text (or bytes aiohttp could not decode) is never the token
                    admitted = False
                if not admitted:
                    return web.Response(body=UNAUTHORIZED, status=401, content_type="application/json")
            try:
                return await handler(request)
            except Exception as exc:
                return failure_response(request, exc)

        return guarded

    async def unmatched(self, request: web.Request) -> web.StreamResponse:
        """No route claims this method and path: 405 if another method would do, else 404.

        On a protected path the token is checked first, so a caller without it cannot tell which paths
        exist (it gets 401 for every method).
        """
        if request.path.startswith(PROTECTED_PREFIXES) and not self.admitted(request):
            return web.Response(body=UNAUTHORIZED, status=401, content_type="application/json")
        allowed: set[str] = set()
        for resource in request.app.router.resources():
            if resource.canonical != CATCH_ALL:
                allowed |= (await resource.resolve(request))[1]
        if allowed:
            response = error_response(405, "method_not_allowed", "method not allowed")
            response.headers[hdrs.ALLOW] = ",".join(sorted(allowed))
            return response
        return error_response(404, "not_found", "not found")


CATCH_ALL = "/{tail}"


def failure_response(request: web.Request, exc: Exception) -> web.StreamResponse:
    """The JSON answer for an exception a handler let through."""
    if isinstance(exc, MalformedBody):
        return error_response(400, "malformed_body", str(exc))
    if isinstance(exc, web.HTTPRequestEntityTooLarge):
        return error_response(413, "body_too_large", f"body exceeds {request.app[MAX_BODY_KEY]} bytes")
    if isinstance(exc, web.HTTPException) and exc.status >= 400:
        return error_response(exc.status, exc.reason.lower().replace(" ", "_"), exc.reason.lower())
    if isinstance(exc, web.HTTPException):
        raise exc  # a redirect or another non-error answer aiohttp sends as it is
    log.error("unhandled error on %s %s", request.method, request.path, exc_info=exc)
    return error_response(500, "internal_error", "internal error")


def mount(app: web.Application, edge: Edge, routes: Iterable[AbstractRouteDef], *, token: bool = True) -> None:
    """Add ``routes`` to ``app``, each behind ``edge``."""
    for route in routes:
        if not isinstance(route, web.RouteDef):
            raise TypeError(f"only handler routes can be mounted behind the edge, not {route!r}")
        guarded = edge.guard(route.handler, token=token)
        if route.method == hdrs.METH_GET:  # add_get also answers HEAD (its `allow_head`)
            app.router.add_get(route.path, guarded, **route.kwargs)
        else:
            app.router.add_route(route.method, route.path, guarded, **route.kwargs)


def mount_catch_all(app: web.Application, edge: Edge) -> None:
    """Mount last: the JSON 404/405 for everything no route claims."""
    app.router.add_route(hdrs.METH_ANY, "/{tail:.*}", edge.guard(edge.unmatched, token=False))
