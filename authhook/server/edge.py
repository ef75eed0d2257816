"""The HTTP edge: every route is mounted through it.

It does two things for each request: the webhook token check (on broker and API routes; health is open),
and turning every error into a small answer with a stable code - never a traceback.

Every refusal the edge makes itself (no or wrong token, an unreadable or oversized body the handler let
through, an unknown path or method, a handler that failed) goes out through the route's *refusal*: the
answer its caller reads as "no". It is chosen once per route, when the route is mounted, so the hot path
pays nothing for it. What each broker gets, and why it cannot read it as an allow:

| broker (path prefix)            | edge refusal                            | how the broker reads it                 |
| EMQX ``/emqx/``                 | 200 ``{"result":"deny","reason":code}`` | deny (any other status is ``ignore``,   |
|                                 |                                         | then ``no_match``: allow in EMQX 5)     |
| go-auth ``/mosquitto-go-auth/`` | 401/400/404/405/413 JSON; 500           | 4xx: deny in every response mode;       |
|                                 |                                         | 5xx: error (refused, not cached)        |
| VerneMQ ``/vernemq``            | 401/400/404/405/413/500 JSON            | not a 200: error, refused               |
| RabbitMQ ``/rabbitmq/``         | 401/400/404/405/413/500 JSON            | not a 200: error, refused (like a deny, |
|                                 |                                         | a login then tries the next backend)    |

The adapters' own denials are in each broker module; tests/test_fail_closed.py puts every one of them, and
every refusal here, through each broker's reading rule. One answer escapes the edge: aiohttp itself answers
400 to a request it cannot parse (say, a request line or a header over 8 KiB) before any route runs. EMQX's
requests are shaped by its configuration, so only a URL template carrying client values could get there;
``authorization.no_match = deny`` (plugins/emqx/emqx.conf) covers it, as it covers authhook being down.

It wraps each route's handler instead of being an aiohttp middleware. A middleware costs every request
aiohttp's per-application wrapping (a ``functools.partial`` and a contextlib manager that sets
``current_app``, around one more coroutine); under callgrind that came to ~19,000 instructions a request,
6 % of a cache-hit ``/emqx/authz`` round trip. The wrapper here costs one extra await. Paths no route
claims reach a catch-all route, which answers 404 or 405 through the same refusal: one catch-all behind the
token for each protected prefix, and an open one mounted last.
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import Awaitable, Callable, Iterable

import orjson
from aiohttp import hdrs, web
from aiohttp.web_routedef import AbstractRouteDef

from authhook.brokers.common import JSON_HEADERS, MAX_BODY_KEY
from authhook.config import Settings

log = logging.getLogger("authhook.server")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
Refusal = Callable[[int, str, str], web.Response]
"""How a route says no: (the HTTP status the refusal stands for, a stable code, a one-line message)."""

UNAUTHORIZED = b'{"error":"unauthorized"}'  # says nothing more, on purpose


class MalformedBody(Exception):
    """The body could not be parsed; answered as 400 ``malformed_body``."""


def error_response(status: int, code: str, message: str) -> web.Response:
    return web.Response(
        body=orjson.dumps({"error": code, "message": message}), status=status, content_type="application/json"
    )


def http_refusal(status: int, code: str, message: str) -> web.Response:
    """The status as it is, with a JSON body naming the code; a 401 says nothing but ``unauthorized``."""
    if status == 401:
        return web.Response(body=UNAUTHORIZED, status=401, content_type="application/json")
    return error_response(status, code, message)


def emqx_refusal(status: int, code: str, message: str) -> web.Response:
    """A 200 ``deny``: any other status is EMQX's ``ignore``, which ``no_match`` (allow by default) decides.

    A deny tells an unauthenticated caller nothing a 401 would not: the reason is the code alone.
    """
    return web.Response(body=orjson.dumps({"result": "deny", "reason": code}), headers=JSON_HEADERS)


# Path prefixes that need the token, with the refusal their callers read as a deny. Each has a catch-all behind
# the token, so a caller without it cannot tell which paths exist under the prefix.
PROTECTED: tuple[tuple[str, Refusal], ...] = (
    ("/emqx/", emqx_refusal),
    ("/vernemq", http_refusal),
    ("/mosquitto-go-auth/", http_refusal),
    ("/rabbitmq/", http_refusal),
    ("/v1/", http_refusal),
)


def refusal_for(path: str) -> Refusal:
    """The refusal a route at ``path`` answers with."""
    for prefix, refusal in PROTECTED:
        if path.startswith(prefix):
            return refusal
    return http_refusal


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

    def guard(self, handler: Handler, *, token: bool = True, refusal: Refusal = http_refusal) -> Handler:
        """``handler`` behind the token check (when ``token``), refusing and failing through ``refusal``."""
        expected = self._expected if token else None
        header, query_param = self._header, self._query_param

        async def guarded(request: web.Request) -> web.StreamResponse:
            # The only token check: every broker callback passes here, so it is written inline.
            if expected is not None:
                offered = request.headers.get(header) or request.query.get(query_param) or ""
                try:
                    admitted = hmac.compare_digest(offered, expected)
                except TypeError:  # non-ASCII text (or bytes aiohttp could not decode) is never the token
                    admitted = False
                if not admitted:
                    return refusal(401, "unauthorized", "unauthorized")
            try:
                return await handler(request)
            except Exception as exc:
                return failure_response(request, exc, refusal)

        return guarded


CATCH_ALL_TAIL = "{tail}"  # how aiohttp writes the catch-alls' ``{tail:.*}`` in a canonical path


def unmatched(refusal: Refusal) -> Handler:
    """A catch-all handler: 405 when another method would do on this path, else 404, through ``refusal``."""

    async def answer(request: web.Request) -> web.StreamResponse:
        allowed: set[str] = set()
        for resource in request.app.router.resources():
            if not resource.canonical.endswith(CATCH_ALL_TAIL):
                allowed |= (await resource.resolve(request))[1]
        if allowed:
            response = refusal(405, "method_not_allowed", "method not allowed")
            if response.status == 405:
                response.headers[hdrs.ALLOW] = ",".join(sorted(allowed))
            return response
        return refusal(404, "not_found", "not found")

    return answer


def failure_response(request: web.Request, exc: Exception, refusal: Refusal = http_refusal) -> web.StreamResponse:
    """The answer for an exception a handler let through."""
    if isinstance(exc, MalformedBody):
        return refusal(400, "malformed_body", str(exc))
    if isinstance(exc, web.HTTPRequestEntityTooLarge):
        return refusal(413, "body_too_large", f"body exceeds {request.app[MAX_BODY_KEY]} bytes")
    if isinstance(exc, web.HTTPException) and exc.status >= 400:
        return refusal(exc.status, exc.reason.lower().replace(" ", "_"), exc.reason.lower())
    if isinstance(exc, web.HTTPException):
        raise exc  # a redirect or another non-error answer aiohttp sends as it is
    log.error("unhandled error on %s %s", request.method, request.path, exc_info=exc)
    return refusal(500, "internal_error", "internal error")


def mount(app: web.Application, edge: Edge, routes: Iterable[AbstractRouteDef], *, token: bool = True) -> None:
    """Add ``routes`` to ``app``, each behind ``edge`` with the refusal its path's callers read as a deny."""
    for route in routes:
        if not isinstance(route, web.RouteDef):
            raise TypeError(f"only handler routes can be mounted behind the edge, not {route!r}")
        guarded = edge.guard(route.handler, token=token, refusal=refusal_for(route.path))
        if route.method == hdrs.METH_GET:  # add_get also answers HEAD (its `allow_head`)
            app.router.add_get(route.path, guarded, **route.kwargs)
        else:
            app.router.add_route(route.method, route.path, guarded, **route.kwargs)


def mount_catch_all(app: web.Application, edge: Edge) -> None:
    """Mount last: the 404/405 for everything no route claims, behind the token under protected prefixes.

    aiohttp tries the resources of the longest matching path prefix first, so a route's own path always
    wins over these, and each protected prefix's catch-all wins over the open one.
    """
    for prefix, refusal in PROTECTED:
        app.router.add_route(hdrs.METH_ANY, prefix + "{tail:.*}", edge.guard(unmatched(refusal), refusal=refusal))
    app.router.add_route(hdrs.METH_ANY, "/{tail:.*}", edge.guard(unmatched(http_refusal), token=False))
