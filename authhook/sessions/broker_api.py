"""Close (or refresh) a subject's live MQTT sessions through each broker's own management API.

The revocation watcher calls ``close_sessions(username, client_ids, reason=...)`` on every configured
closer after a committed change took something away from ``username``; each closer answers one
``CloseResult`` per thing it did (or failed to do), never raising for a broker's refusal or silence.

What each closer does (spec: ``/work/shared/spec/revocation.md`` §2.1-2.3):

* **EMQX** (``/api/v5``, HTTP Basic with API key and secret): finds the user's clients with
  ``GET /clients?username=`` (paged, ``meta.hasnext``) and adds the known client ids; first resets the
  node-level caches (``POST /authorization/node_cache/reset`` and ``POST /authentication/node_cache/reset``,
  on by default from 6.2, where a kicked client would otherwise reconnect into a cached allow; a 404 means an
  EMQX without them), then per client either kicks it (``DELETE /clients/{id}``) or drains its authorization
  cache (``DELETE /clients/{id}/authorization/cache``). ``must_close`` forces the kick: an ACL pushed at
  CONNECT is not in any cache, and a lost subscription or a disabled subject is not undone by a drain. A 404
  on a client means it is gone, which is what we wanted. A cache drain leaves existing subscriptions in place
  (6.2 does not cache subscribe results at all).
* **VerneMQ** (``/api/v1``, the API key - ``secret``/``secret_file``, else ``username`` - as the Basic
  user name with an empty password): clears the webhook
  decision cache on every node (``webhooks/cache/clear`` is node-local), finds the user's sessions with
  ``session/show?--user=<u>&--client_id&--mountpoint&--is_online&--limit=1000``, then disconnects each
  known or found client id with ``session/disconnect?client-id=<id>`` (``&--mountpoint=`` when the session
  has one, ``&--cleanup`` when configured). VerneMQ answers ``Done`` whether or not such a session existed.
  Its session queries paste values between double quotes, so an id or user name holding ``"`` or ``\\`` is
  refused here rather than sent. UNVERIFIED by a call against a real node: the ``session/show`` flag mapping
  and the ``webhooks/cache/clear`` path (both derived from the documented vmq-admin-to-HTTP rule) and the
  JSON shapes (clique's JSON writer: a list of ``{"type": "table"|"text"|"alert", ...}`` objects).
* **RabbitMQ** (management plugin, HTTP Basic with a user tagged ``administrator``; ``monitoring`` may list
  but gets 401 on deleting another user's connection and 500 on close-by-username, and ``management`` sees
  only its own connections, so an empty list): lists
  ``GET /api/connections?page=N&page_size=500&columns=name,user,client_properties``, closes each connection
  whose ``user`` is the subject (or, with no user, whose ``client_properties.client_id`` is a known client
  id) with ``DELETE /api/connections/{name}`` and ``X-Reason``, then sweeps with
  ``DELETE /api/connections/username/{user}``. The sweep matters: verified on RabbitMQ 3.10.8, an MQTT
  connection shows up in the listing only after the node's next statistics emission (seen 0.4 s and 5.0 s
  after CONNACK), while the sweep closed connections not listed yet within 3 ms. Also verified on 3.10.8:
  the MQTT plugin's connection is listed with ``type: "direct"``, ``protocol: "MQTT 3.1.1"``, ``user`` =
  the MQTT user name, ``client_properties: {"client_id": ..., "product": "MQTT client"}`` and ``name`` =
  ``"<peer ip>:<port> -> <local ip>:<port>"``; with ``columns=`` the answer carries ``client_properties``
  twice (an empty object first), which is why JSON objects are read keeping a non-empty duplicate; DELETE
  answers 204 and the client sees its socket closed within milliseconds; a second DELETE answers 404
  ``{"error":"Object Not Found","reason":"Not Found"}``.

Every call goes through one ``aiohttp.ClientSession`` per closer (made on first use, closed by ``aclose``),
with a per-call timeout and ``attempts`` tries, backing off exponentially after a transport error or a 5xx
(a 4xx is an answer, not retried). Credentials travel only in the session's ``Authorization`` header: no
log line and no ``CloseResult.detail`` carries the secret (details are scrubbed of it as well, in case a
broker echoed it), and a URL holding credentials is refused at start.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
from collections.abc import Awaitable, Collection, Iterable
from dataclasses import dataclass
from typing import Any, Protocol
from urllib.parse import quote

import aiohttp
from yarl import URL

from authhook.config import BrokerApiCredentials, EmqxApiSettings, RevocationSettings, VernemqApiSettings
from authhook.errors import ConfigError

log = logging.getLogger("authhook.revocation.api")

DEFAULT_BACKOFF_S = 0.05  # first pause after a failed try; doubled per try, at most MAX_BACKOFF_S
MAX_BACKOFF_S = 1.0
CONCURRENCY = 8  # management calls in flight per close_sessions
EMQX_PAGE_LIMIT = 100
RABBITMQ_PAGE_SIZE = 500
VERNEMQ_SHOW_LIMIT = 1000  # rows per node (VerneMQ's default is 100)
MAX_PAGES = 1000  # a listing that never ends is a broken server, not a reason to loop forever
_DETAIL_CHARS = 200
_REASON_CHARS = 200


@dataclass(frozen=True, slots=True)
class CloseResult:
    """One thing a closer did or failed to do.

    ``target`` is the client id (EMQX, VerneMQ) or connection name (RabbitMQ), or the user name / cache /
    node for calls that are not about one session. ``detail`` says what was done or why it failed; it never
    holds a secret.
    """

    broker: str
    target: str
    ok: bool
    detail: str


class SessionCloser(Protocol):
    """Closes (or refreshes) the live sessions of one MQTT user name on one broker.

    ``client_ids`` are ids this instance saw the user connect with (closed even if the broker's listing
    misses them); ``reason`` goes to the broker where it takes one (RabbitMQ's ``X-Reason``);
    ``must_close`` says only a disconnect will do where a broker could also just refresh caches: an ACL was
    handed over at CONNECT, a subscription lost its right, or the subject may no longer connect at all.
    """

    broker: str

    async def close_sessions(
        self, username: str, client_ids: Collection[str], *, reason: str, must_close: bool = False
    ) -> list[CloseResult]: ...

    async def aclose(self) -> None: ...


def build_closers(settings: RevocationSettings) -> list[SessionCloser]:
    """One closer per broker whose management API is configured (none: revocation stays off)."""
    attempts, timeout_s = settings.attempts, settings.timeout_s
    closers: list[SessionCloser] = []
    if settings.emqx is not None:
        closers.append(EmqxCloser(settings.emqx, attempts=attempts, timeout_s=timeout_s))
    if settings.vernemq is not None:
        closers.append(VernemqCloser(settings.vernemq, attempts=attempts, timeout_s=timeout_s))
    if settings.rabbitmq is not None:
        closers.append(RabbitmqCloser(settings.rabbitmq, attempts=attempts, timeout_s=timeout_s))
    return closers


# ---------------------------------------------------------------------------------------------------------
# The HTTP part every closer shares
# ---------------------------------------------------------------------------------------------------------


class _Unreachable(Exception):
    """No HTTP answer after every try (refused, reset, timed out); the message is safe to show."""


class _Failure(Exception):
    """A call that got no usable answer; the message is already safe for a detail."""


@dataclass(frozen=True, slots=True)
class _Answer:
    status: int
    body: bytes

    def json(self) -> Any:
        """The body as JSON (a duplicated key keeps its non-empty value), or None if it is not JSON."""
        try:
            return json.loads(self.body, object_pairs_hook=_keep_non_empty)
        except ValueError:
            return None


def _is_empty(value: Any) -> bool:
    return value is None or value in ("", {}, [])


def _keep_non_empty(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # RabbitMQ 3.10 with `columns=` sends `"client_properties":{}` and then the real object under the same
    # key; a later duplicate wins unless it is empty and the earlier one is not.
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out and _is_empty(value) and not _is_empty(out[key]):
            continue
        out[key] = value
    return out


def _base_url(raw: str, broker: str) -> str:
    url = URL(raw)
    if url.scheme not in ("http", "https") or not url.host:
        raise ConfigError(f"{broker} management url must be an http(s) url, not `{url.with_user(None)}`")
    if url.user is not None or url.password is not None:
        raise ConfigError(f"{broker} management url must not hold credentials; use `username` and `secret`")
    return str(url.with_query(None).with_fragment(None)).rstrip("/")


def _segment(value: str) -> str:
    """One path segment or query value, every reserved character escaped (``/``, spaces, ``>``, ``:``)."""
    return quote(value, safe="")


def _header_safe(text: str) -> str:
    """Printable ASCII only (anything else becomes ``?``), bounded: a header value must not break the request."""
    return "".join(ch if " " <= ch <= "~" else "?" for ch in text)[:_REASON_CHARS]


def _describe_transport(exc: BaseException, timeout_s: float) -> str:
    if isinstance(exc, TimeoutError):
        return f"no answer within {timeout_s:g} s"
    if isinstance(exc, aiohttp.ClientConnectorError):
        return f"cannot connect to {exc.host}:{exc.port}"
    if isinstance(exc, aiohttp.ServerDisconnectedError):
        return "the server closed the connection"
    return type(exc).__name__


class _Api:
    """A broker's management API: one lazily made session, Basic auth, per-call timeout, retries."""

    def __init__(
        self, broker: str, login: str, password: str, *, attempts: int, timeout_s: float, backoff_s: float
    ) -> None:
        if attempts < 1:
            raise ValueError("attempts must be at least 1")
        self.broker = broker
        token = base64.b64encode(f"{login}:{password}".encode()).decode("ascii")
        self._headers = {"Authorization": f"Basic {token}"}  # never logged, never in a detail
        # What `scrub` hides should a broker echo it: the secret, and the header that carries it, encoded.
        # (VerneMQ's secret is the key itself, sent as the user name.)
        secrets = [token, password, login if broker == "vernemq" else ""]
        self._hidden = tuple(sorted({s for s in secrets if s}, key=len, reverse=True))
        self._attempts = attempts
        self._timeout_s = timeout_s
        self._backoff_s = backoff_s
        self._session: aiohttp.ClientSession | None = None

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(headers=self._headers, raise_for_status=False)
        return self._session

    async def aclose(self) -> None:
        if self._session is not None and not self._session.closed:
            await self._session.close()
        self._session = None

    def scrub(self, text: str) -> str:
        """``text`` bounded and with every credential replaced: what may go into a detail or a log line."""
        for secret in self._hidden:
            text = text.replace(secret, "***")
        return text[:_DETAIL_CHARS]

    async def call(self, method: str, url: str, *, headers: dict[str, str] | None = None) -> _Answer:
        """The broker's answer (a 5xx only once every try got one); ``_Unreachable`` if none answered."""
        path = URL(url, encoded=True).path_qs
        timeout = aiohttp.ClientTimeout(total=self._timeout_s)
        failure = ""
        last: _Answer | None = None
        for attempt in range(1, self._attempts + 1):
            try:
                async with self._client().request(
                    method, URL(url, encoded=True), headers=headers, timeout=timeout, allow_redirects=False
                ) as response:
                    last = _Answer(response.status, await response.read())
            except (aiohttp.ClientError, TimeoutError) as exc:
                last = None
                failure = _describe_transport(exc, self._timeout_s)
            else:
                log.debug("%s %s %s -> %d", self.broker, method, path, last.status)
                if last.status < 500:
                    return last
                failure = f"HTTP {last.status}"
            if attempt < self._attempts:
                log.info(
                    "%s %s %s: %s; trying again (%d of %d)",
                    self.broker,
                    method,
                    path,
                    failure,
                    attempt + 1,
                    self._attempts,
                )
                await asyncio.sleep(min(self._backoff_s * 2 ** (attempt - 1), MAX_BACKOFF_S))
        if last is not None:
            return last
        raise _Unreachable(f"{failure} ({self._attempts} {'try' if self._attempts == 1 else 'tries'})")

    def refusal(self, answer: _Answer) -> str:
        """Why a non-2xx answer is a failure, with the broker's own error code and message when it sent any."""
        hint = {401: " (check the credentials)", 403: " (the API key lacks a scope)"}.get(answer.status, "")
        said = ""
        body = answer.json()
        if isinstance(body, dict):
            parts = [str(body[k]) for k in ("code", "message", "error", "reason") if body.get(k)]
            said = ": ".join(parts)
        elif answer.body:
            said = answer.body[:120].decode("utf-8", "replace").strip()
        return self.scrub(f"HTTP {answer.status}{' ' + said if said else ''}{hint}")


async def _bounded(calls: Iterable[Awaitable[CloseResult]]) -> list[CloseResult]:
    """Run the calls at most ``CONCURRENCY`` at a time; results in the order given."""
    gate = asyncio.Semaphore(CONCURRENCY)

    async def one(call: Awaitable[CloseResult]) -> CloseResult:
        async with gate:
            return await call

    return list(await asyncio.gather(*(one(call) for call in calls)))


def _ok(status: int) -> bool:
    return 200 <= status < 300


# ---------------------------------------------------------------------------------------------------------
# EMQX 5.x / 6.x
# ---------------------------------------------------------------------------------------------------------


class EmqxCloser:
    """Kicks (or refreshes) a user's clients through EMQX's REST API (``/api/v5``)."""

    broker = "emqx"

    def __init__(
        self,
        settings: EmqxApiSettings,
        *,
        attempts: int = 3,
        timeout_s: float = 2.0,
        backoff_s: float = DEFAULT_BACKOFF_S,
    ) -> None:
        if not settings.username:
            raise ConfigError("emqx management api needs `username` (the API key)")
        self._base = _base_url(settings.url, self.broker) + "/api/v5"
        self._action = settings.action
        self._api = _Api(
            self.broker,
            settings.username,
            settings.resolved_secret() or "",
            attempts=attempts,
            timeout_s=timeout_s,
            backoff_s=backoff_s,
        )

    async def aclose(self) -> None:
        await self._api.aclose()

    async def close_sessions(
        self, username: str, client_ids: Collection[str], *, reason: str, must_close: bool = False
    ) -> list[CloseResult]:
        results: list[CloseResult] = []
        # Node caches first: a kicked client reconnects at once and must not meet an allow cached before.
        for kind in ("authorization", "authentication"):
            results.append(await self._reset(kind))
        found: set[str] = set()
        if username:
            try:
                found = await self._clients_of(username)
            except _Failure as failure:
                results.append(CloseResult(self.broker, username, False, f"listing the user's clients: {failure}"))
        kick = self._action == "kick" or must_close
        targets = sorted(set(client_ids) | found)
        results += await _bounded(self._kick(cid) if kick else self._drain(cid) for cid in targets)
        return results

    async def _clients_of(self, username: str) -> set[str]:
        found: set[str] = set()
        for page in range(1, MAX_PAGES + 1):
            url = f"{self._base}/clients?username={_segment(username)}&limit={EMQX_PAGE_LIMIT}&page={page}"
            answer = await self._call("GET", url)
            if not _ok(answer.status):
                raise _Failure(self._api.refusal(answer))
            body = answer.json()
            data = body.get("data") if isinstance(body, dict) else None
            if not isinstance(data, list):
                raise _Failure(f"HTTP {answer.status} without a `data` list")
            rows = [row for row in data if isinstance(row, dict)]
            found |= {str(row["clientid"]) for row in rows if row.get("clientid") is not None}
            meta = body.get("meta")
            more = meta.get("hasnext") if isinstance(meta, dict) else None
            if more is None:  # an EMQX that does not say: a full page may have a successor
                more = len(data) >= EMQX_PAGE_LIMIT
            if not more:
                break
        return found

    async def _kick(self, client_id: str) -> CloseResult:
        return await self._per_client(
            "DELETE", f"{self._base}/clients/{_segment(client_id)}", client_id, "kicked", "not connected"
        )

    async def _drain(self, client_id: str) -> CloseResult:
        return await self._per_client(
            "DELETE",
            f"{self._base}/clients/{_segment(client_id)}/authorization/cache",
            client_id,
            "drained its authorization cache",
            "not connected",
        )

    async def _per_client(self, method: str, url: str, client_id: str, done: str, gone: str) -> CloseResult:
        try:
            answer = await self._call(method, url)
        except _Failure as failure:
            return CloseResult(self.broker, client_id, False, f"client `{client_id}`: {failure}")
        if _ok(answer.status):
            return CloseResult(self.broker, client_id, True, f"client `{client_id}`: {done}")
        if answer.status == 404:  # CLIENTID_NOT_FOUND: already gone
            return CloseResult(self.broker, client_id, True, f"client `{client_id}`: {gone}")
        return CloseResult(self.broker, client_id, False, f"client `{client_id}`: {self._api.refusal(answer)}")

    async def _reset(self, kind: str) -> CloseResult:
        target = f"{kind} node cache"
        try:
            answer = await self._call("POST", f"{self._base}/{kind}/node_cache/reset")
        except _Failure as failure:
            return CloseResult(self.broker, target, False, f"resetting the {target}: {failure}")
        if _ok(answer.status):
            return CloseResult(self.broker, target, True, f"reset the {target}")
        if answer.status == 404:
            return CloseResult(self.broker, target, True, f"no {target} on this EMQX (before 6.2 / e5.9)")
        return CloseResult(self.broker, target, False, f"resetting the {target}: {self._api.refusal(answer)}")

    async def _call(self, method: str, url: str) -> _Answer:
        try:
            return await self._api.call(method, url)
        except _Unreachable as exc:
            raise _Failure(self._api.scrub(str(exc))) from exc


# ---------------------------------------------------------------------------------------------------------
# VerneMQ
# ---------------------------------------------------------------------------------------------------------


def _unquotable(value: str) -> bool:
    # VerneMQ builds `... WHERE client_id ="<value>"` by pasting; a quote or backslash would change the query.
    return '"' in value or "\\" in value


def _clique_outcome(answer: _Answer) -> tuple[bool, list[dict[str, Any]]]:
    """(no alert, the status objects) of a vmq-admin command's JSON output (a list, or one object)."""
    body = answer.json()
    items = body if isinstance(body, list) else [body] if isinstance(body, dict) else []
    objects = [item for item in items if isinstance(item, dict)]
    return (not any(item.get("type") == "alert" for item in objects)), objects


def _alert_text(objects: list[dict[str, Any]]) -> str:
    for item in objects:
        if item.get("type") == "alert":
            texts = [str(a.get("text", "")) for a in item.get("alert", []) if isinstance(a, dict)]
            return " ".join(" ".join(texts).split())[:120] or "alert"
    return "alert"


class VernemqCloser:
    """Disconnects a user's sessions through VerneMQ's HTTP API (``/api/v1``, vmq-admin over HTTP)."""

    broker = "vernemq"

    def __init__(
        self,
        settings: VernemqApiSettings,
        *,
        attempts: int = 3,
        timeout_s: float = 2.0,
        backoff_s: float = DEFAULT_BACKOFF_S,
    ) -> None:
        # The API key is the secret when one is configured (`secret` / `secret_file`), else `username`.
        api_key = settings.resolved_secret() or settings.username
        if not api_key:
            raise ConfigError("vernemq management api needs the API key (`secret`, `secret_file` or `username`)")
        self._base = _base_url(settings.url, self.broker)
        self._nodes = [_base_url(node, self.broker) for node in settings.node_urls] or [self._base]
        self._cleanup = settings.cleanup
        self._api = _Api(self.broker, api_key, "", attempts=attempts, timeout_s=timeout_s, backoff_s=backoff_s)

    async def aclose(self) -> None:
        await self._api.aclose()

    async def close_sessions(
        self, username: str, client_ids: Collection[str], *, reason: str, must_close: bool = False
    ) -> list[CloseResult]:
        # Caches first (every node: the clear is node-local), so a disconnected client reconnects into a
        # fresh decision.
        results = await _bounded(self._clear_cache(node) for node in self._nodes)
        sessions: dict[tuple[str, str], bool | None] = {}  # (client id, mountpoint) -> online, if known
        if username and _unquotable(username):
            refused = 'user name holds `"` or `\\`, which vernemq queries cannot take'
            results.append(CloseResult(self.broker, username, False, refused))
        elif username:
            try:
                sessions = await self._sessions_of(username)
            except _Failure as failure:
                results.append(CloseResult(self.broker, username, False, f"listing the user's sessions: {failure}"))
        listed_ids = {cid for cid, _ in sessions}
        for client_id in client_ids:
            if client_id not in listed_ids:
                sessions[(client_id, "")] = None
        results += await _bounded(
            self._disconnect(cid, mountpoint, online) for (cid, mountpoint), online in sorted(sessions.items())
        )
        return results

    async def _sessions_of(self, username: str) -> dict[tuple[str, str], bool | None]:
        query = f"--user={_segment(username)}&--client_id&--mountpoint&--is_online&--limit={VERNEMQ_SHOW_LIMIT}"
        answer = await self._call("GET", f"{self._base}/api/v1/session/show?{query}")
        if not _ok(answer.status):
            raise _Failure(self._api.refusal(answer))
        clean, objects = _clique_outcome(answer)
        if not clean:
            raise _Failure(f"vernemq said: {self._api.scrub(_alert_text(objects))}")
        found: dict[tuple[str, str], bool | None] = {}
        for item in objects:
            for row in item.get("table", []) if item.get("type") == "table" else []:
                if isinstance(row, dict) and row.get("client_id") is not None:
                    key = (str(row["client_id"]), str(row.get("mountpoint") or ""))
                    online = row.get("is_online")
                    found[key] = bool(found.get(key)) or online is True or online == "true"
        return found

    async def _disconnect(self, client_id: str, mountpoint: str, online: bool | None) -> CloseResult:
        if _unquotable(client_id) or _unquotable(mountpoint):
            return CloseResult(
                self.broker, client_id, False, f'client `{client_id}`: holds `"` or `\\`, not sent to vernemq'
            )
        query = f"client-id={_segment(client_id)}"
        if mountpoint:
            query += f"&--mountpoint={_segment(mountpoint)}"
        if self._cleanup:
            query += "&--cleanup"
        try:
            answer = await self._call("GET", f"{self._base}/api/v1/session/disconnect?{query}")
        except _Failure as failure:
            return CloseResult(self.broker, client_id, False, f"client `{client_id}`: {failure}")
        if not _ok(answer.status):
            return CloseResult(self.broker, client_id, False, f"client `{client_id}`: {self._api.refusal(answer)}")
        clean, objects = _clique_outcome(answer)
        if not clean:
            said = self._api.scrub(_alert_text(objects))
            return CloseResult(self.broker, client_id, False, f"client `{client_id}`: vernemq said: {said}")
        state = {True: "was online", False: "was offline", None: "not listed"}[online]
        cleanup = ", stored state dropped" if self._cleanup else ""
        return CloseResult(self.broker, client_id, True, f"client `{client_id}`: disconnect done ({state}{cleanup})")

    async def _clear_cache(self, node: str) -> CloseResult:
        target = f"webhook cache {URL(node).host}:{URL(node).port}"
        try:
            answer = await self._call("GET", f"{node}/api/v1/webhooks/cache/clear")
        except _Failure as failure:
            return CloseResult(self.broker, target, False, f"clearing the {target}: {failure}")
        if _ok(answer.status) and _clique_outcome(answer)[0]:
            return CloseResult(self.broker, target, True, f"cleared the {target}")
        if answer.status == 400:  # cowboy's answer to an unknown vmq-admin command
            return CloseResult(
                self.broker,
                target,
                False,
                f"clearing the {target}: HTTP 400 (no `webhooks cache clear` here: an older vernemq, "
                "or the webhooks plugin off)",
            )
        return CloseResult(self.broker, target, False, f"clearing the {target}: {self._api.refusal(answer)}")

    async def _call(self, method: str, url: str) -> _Answer:
        try:
            return await self._api.call(method, url)
        except _Unreachable as exc:
            raise _Failure(self._api.scrub(str(exc))) from exc


# ---------------------------------------------------------------------------------------------------------
# RabbitMQ management plugin
# ---------------------------------------------------------------------------------------------------------


def _belongs(connection: dict[str, Any], username: str, client_ids: Collection[str]) -> bool:
    user = connection.get("user")
    if user:
        return bool(user == username)
    properties = connection.get("client_properties")
    client_id = properties.get("client_id") if isinstance(properties, dict) else None
    return isinstance(client_id, str) and client_id in client_ids


class RabbitmqCloser:
    """Closes a user's MQTT connections through RabbitMQ's management plugin (``/api``)."""

    broker = "rabbitmq"

    def __init__(
        self,
        settings: BrokerApiCredentials,
        *,
        attempts: int = 3,
        timeout_s: float = 2.0,
        backoff_s: float = DEFAULT_BACKOFF_S,
    ) -> None:
        if not settings.username:
            raise ConfigError("rabbitmq management api needs `username` (a user tagged administrator)")
        self._base = _base_url(settings.url, self.broker) + "/api"
        self._api = _Api(
            self.broker,
            settings.username,
            settings.resolved_secret() or "",
            attempts=attempts,
            timeout_s=timeout_s,
            backoff_s=backoff_s,
        )

    async def aclose(self) -> None:
        await self._api.aclose()

    async def close_sessions(
        self, username: str, client_ids: Collection[str], *, reason: str, must_close: bool = False
    ) -> list[CloseResult]:
        results: list[CloseResult] = []
        headers = {"X-Reason": _header_safe(reason)}
        names: list[str] = []
        try:
            names = [
                str(c["name"]) for c in await self._connections() if c.get("name") and _belongs(c, username, client_ids)
            ]
        except _Failure as failure:
            results.append(CloseResult(self.broker, username, False, f"listing connections: {failure}"))
        results += await _bounded(self._close(name, headers) for name in dict.fromkeys(names))
        if username:
            results.append(await self._sweep(username, headers))
        return results

    async def _connections(self) -> list[dict[str, Any]]:
        connections: list[dict[str, Any]] = []
        for page in range(1, MAX_PAGES + 1):
            url = (
                f"{self._base}/connections?page={page}&page_size={RABBITMQ_PAGE_SIZE}"
                "&columns=name,user,client_properties"
            )
            answer = await self._call("GET", url)
            if not _ok(answer.status):
                raise _Failure(self._api.refusal(answer))
            body = answer.json()
            if isinstance(body, list):  # an unpaged answer is the whole list
                return connections + [c for c in body if isinstance(c, dict)]
            items = body.get("items") if isinstance(body, dict) else None
            if not isinstance(items, list):
                raise _Failure(f"HTTP {answer.status} without a connection list")
            connections += [c for c in items if isinstance(c, dict)]
            page_count = body.get("page_count")
            if not isinstance(page_count, int) or page >= page_count:
                break
        return connections

    async def _close(self, name: str, headers: dict[str, str]) -> CloseResult:
        try:
            answer = await self._call("DELETE", f"{self._base}/connections/{_segment(name)}", headers)
        except _Failure as failure:
            return CloseResult(self.broker, name, False, f"connection `{name}`: {failure}")
        if _ok(answer.status):
            return CloseResult(self.broker, name, True, f"connection `{name}`: closed")
        if answer.status == 404:
            return CloseResult(self.broker, name, True, f"connection `{name}`: already closed")
        return CloseResult(self.broker, name, False, f"connection `{name}`: {self._api.refusal(answer)}")

    async def _sweep(self, username: str, headers: dict[str, str]) -> CloseResult:
        # Catches the connections the listing cannot show yet (not in the stats database until the next
        # emission, up to `collect_statistics_interval`, 5 s by default).
        what = f"every connection of user `{username}`"
        try:
            answer = await self._call("DELETE", f"{self._base}/connections/username/{_segment(username)}", headers)
        except _Failure as failure:
            return CloseResult(self.broker, username, False, f"closing {what}: {failure}")
        if _ok(answer.status):
            return CloseResult(self.broker, username, True, f"closed {what} (by user name)")
        if answer.status == 404:
            return CloseResult(
                self.broker,
                username,
                False,
                f"closing {what}: HTTP 404, this rabbitmq has no close-by-user-name endpoint, so a connection "
                "opened in the last few seconds (not listed yet) may stay open",
            )
        return CloseResult(self.broker, username, False, f"closing {what}: {self._api.refusal(answer)}")

    async def _call(self, method: str, url: str, headers: dict[str, str] | None = None) -> _Answer:
        try:
            return await self._api.call(method, url, headers=headers)
        except _Unreachable as exc:
            raise _Failure(self._api.scrub(str(exc))) from exc
