"""What every adapter needs: body parsing that never raises, field helpers, answers."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Generic, TypeVar
from urllib.parse import parse_qsl

import orjson
from aiohttp import hdrs, web
from multidict import CIMultiDict, CIMultiDictProxy

from authhook.config import Settings
from authhook.models import Action, Decision, Reason, Subject, Verdict

if TYPE_CHECKING:
    from authhook.pdp import PDP

MAX_BODY_KEY = web.AppKey("max_body", int)
MAX_MEMO_BODY = 1024
T = TypeVar("T")


class Malformed(Exception):
    """The broker's request could not be read; adapters answer it as a deny in the broker's terms.

    ``action`` is what the request asked about when that was readable before the fault, so the decision
    log files a bad SUBSCRIBE as a subscribe; ``reason`` lets a translator name a sharper code than
    ``malformed_request`` (an unusable topic is ``invalid_topic``).
    """

    def __init__(self, detail: str, *, action: Action | None = None, reason: Reason = Reason.MALFORMED_REQUEST) -> None:
        super().__init__(detail)
        self.action = action
        self.reason = reason

    def about(self, action: Action) -> Malformed:
        """This fault, filed under ``action`` unless the raiser already knew better."""
        if self.action is None:
            self.action = action
        return self


async def read_raw(request: web.Request) -> bytes:
    """The body (or, for GET, the query string) as bytes; ``Malformed`` if it is over the size limit."""
    if request.method == "GET":
        return request.query_string.encode()
    try:
        return await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise too_large(request) from None


def too_large(request: web.Request) -> Malformed:
    """The fault for a body over ``http.max_body_bytes`` (aiohttp refuses to read it)."""
    return Malformed(f"body exceeds {request.app.get(MAX_BODY_KEY, 'the configured')} bytes")


def parse_fields(method: str, content_type: str, raw: bytes) -> dict[str, Any]:
    """Parameters from a JSON object, a form, or a query string; ``Malformed`` with a reason otherwise."""
    if method == "GET" or content_type == "application/x-www-form-urlencoded":
        try:
            return dict(parse_qsl(raw.decode("utf-8"), keep_blank_values=True, strict_parsing=bool(raw)))
        except (UnicodeDecodeError, ValueError):
            raise Malformed("form body is not valid") from None
    try:
        # orjson, not the json module: it bounds nesting (1024 levels, no RecursionError), rejects lone
        # surrogates (which could not be encoded back into an answer or a log line) and refuses numbers no
        # double holds instead of building 5000-digit ints. Every refusal is a JSONDecodeError.
        data = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise Malformed("body is not valid json") from None
    if not isinstance(data, dict):
        raise Malformed("body is not a json object")
    return data


async def read_fields(request: web.Request) -> dict[str, Any]:
    """The request's parameters from a JSON object body, a form body, or (GET) the query string."""
    return parse_fields(request.method, request.content_type, await read_raw(request))


class TranslationMemo(Generic[T]):
    """Raw request bytes -> translated request, for the byte-identical callbacks brokers repeat.

    A device publishing on one topic makes its broker send the same authz body again and again; parsing
    JSON and building the pydantic request costs more than the cached decision itself (a quarter of the
    request time under load). Requests are immutable, so sharing one is safe. Only bodies up to
    ``MAX_MEMO_BODY`` bytes are kept (bounded memory), and malformed input is never kept.
    """

    def __init__(
        self, translate: Callable[[dict[str, Any]], T], maxsize: int = 10_000, *, post_only: bool = False
    ) -> None:
        self._translate = translate
        self._maxsize = maxsize
        # For a route mounted for POST alone the method need not be read (~500 instructions a call) nor kept.
        self._post_only = post_only
        # First in, first out, on an OrderedDict: a hit is one C-level lookup. cachetools' LRU bookkeeping
        # costs three Python calls per hit, of the ~35 authhook added to a cached /emqx/authz (cProfile).
        self._memo: OrderedDict[tuple[str | bytes, ...], T] = OrderedDict()

    async def __call__(self, request: web.Request) -> T:
        """Read the request's parameters (body, or query string for GET) and translate them."""
        return self.translate(request, await read_raw(request))

    def translate(self, request: web.Request, raw: bytes) -> T:
        """``raw`` (what ``read_raw`` gave for ``request``) translated, from the memo when seen before.

        Synchronous, so the hottest routes can read the body themselves and spare a coroutine per call.
        """
        # The raw header, not ``request.content_type``, which parses it again on every request (~2.5 µs of
        # a ~130 µs hit); equal raw headers parse equally, so the key is just as exact.
        content_type = request.headers.get(hdrs.CONTENT_TYPE, "")
        key = (content_type, raw) if self._post_only else (request.method, content_type, raw)
        translated = self._memo.get(key)
        if translated is not None:
            return translated
        translated = translate_fields(self._translate, parse_fields(request.method, request.content_type, raw))
        if len(raw) <= MAX_MEMO_BODY:
            self._memo[key] = translated
            if len(self._memo) > self._maxsize:
                self._memo.popitem(last=False)
        return translated


def translate_fields(translate: Callable[[dict[str, Any]], T], data: dict[str, Any]) -> T:
    """``translate(data)``, with a model rule the translator did not check first turned into ``Malformed``:
    whatever the broker sent, the answer is its deny, never a 500."""
    try:
        return translate(data)
    except ValueError as exc:  # pydantic's ValidationError is a ValueError
        raise Malformed(str(exc).splitlines()[0]) from None


def text(data: dict[str, Any], key: str, *, required: bool = False) -> str | None:
    """A string field; brokers send '' for unset template variables, which counts as absent."""
    value = data.get(key)
    if value is None or value == "":
        if required:
            raise Malformed(f"`{key}` is missing")
        return None
    if not isinstance(value, str):
        raise Malformed(f"`{key}` must be a string")
    return value


def refuse(
    pdp: PDP, exc: Malformed, action: Action, *, broker: str, hook: str, subject: Subject | None = None
) -> Decision:
    """Log and return the deny for unreadable input; ``action`` is the hook's default when the request did
    not get far enough to say what it asked, ``subject`` who asked when that much was readable."""
    username, client_id = (subject.username, subject.client_id) if subject is not None else (None, None)
    return pdp.refuse(
        exc.action or action, exc.reason, str(exc), broker=broker, hook=hook, username=username, client_id=client_id
    )


def failed_open(verdict: Verdict, settings: Settings) -> bool:
    """True when a failure should become the broker's "ask someone else" instead of a deny."""
    return verdict.failed and settings.brokers.on_failure == "ignore"


# Handed to ``web.Response(headers=...)``, which copies them in C; ``content_type=`` costs ~650 instructions
# more per answer (aiohttp checks and sets it in Python), 0.3 % of a cache-hit /emqx/authz round trip.
JSON_HEADERS: CIMultiDictProxy[str] = CIMultiDictProxy(CIMultiDict({hdrs.CONTENT_TYPE: "application/json"}))


def json_answer(body: dict[str, Any]) -> web.Response:
    """A JSON answer serialized with orjson (several times faster than aiohttp's default json.dumps)."""
    return web.Response(body=orjson.dumps(body), headers=JSON_HEADERS)
