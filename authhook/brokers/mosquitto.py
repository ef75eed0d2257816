"""mosquitto-go-auth HTTP backend: ``POST /mosquitto-go-auth/user``, ``/superuser``, ``/acl``.

Parameters arrive as JSON or as a form (``http_params_mode``). The answer's body follows the plugin's
``http_response_mode`` (authhook's ``brokers.mosquitto_response_mode``), but the *status* alone already
says allow, deny or failure, so the answer is read the same in every mode:

| mode   | allow                          | deny                                    | failure (store down)     |
| status | 200                            | 403                                     | 503                      |
| json   | 200 ``{"ok":true,"error":""}`` | 403 ``{"ok":false,"error":"<reason>"}`` | 503 ``{"ok":false,...}`` |
| text   | 200 ``ok``                     | 403 ``<reason>``                        | 503 ``<reason>``         |

Fail closed whatever the plugin is set to. The plugin reads a 4xx as a deny in every response mode, a 5xx
as an error; only a 2xx can allow, and in ``status`` mode (its default) *any* 2xx allows, whatever the body
says. A deny sent as 200 ``{"ok":false}`` would therefore be an allow to a plugin left at ``status`` while
authhook says ``json``: a wrong secret connects, another tenant's topic is granted. So a deny is a 403 in
every mode, and a mismatch between the two settings costs at most the reason in the plugin's log.

| authhook answers       | plugin reads it, in status / json / text mode             |
| allow: 200             | allow / allow (``ok`` true) / allow (body ``ok``)         |
| deny: 403              | deny in every mode                                        |
| malformed input: 400   | deny in every mode                                        |
| bad or no token: 401   | deny in every mode (from the edge, authhook.server.edge)  |
| failure: 503, or 500   | error in every mode: not cached, retried, then refused    |

A failure is a 5xx on purpose: the plugin treats it as an error (not cached, retried, then refused)
rather than caching a deny. ``acc``: 1 read (a delivery: the subscriber's subscribe right on the concrete
topic), 2 write (publish), 3 read+write (both must hold), 4 subscribe (the filter as sent).
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from authhook.brokers.common import Malformed, TranslationMemo, read_fields, refuse, text
from authhook.config import Settings
from authhook.models import Action, AuthzRequest, Reason, Subject, Verdict
from authhook.pdp import PDP

BROKER = "mosquitto-go-auth"
_ACC_ACTIONS = {
    1: (Action.SUBSCRIBE,),
    2: (Action.PUBLISH,),
    3: (Action.SUBSCRIBE, Action.PUBLISH),
    4: (Action.SUBSCRIBE,),
}


# -- translate (pure) ---------------------------------------------------------------------------------


def acl_requests(data: dict[str, Any]) -> list[AuthzRequest]:
    raw_acc = data.get("acc")
    try:
        acc = int(raw_acc) if isinstance(raw_acc, (int, str)) and not isinstance(raw_acc, bool) else None
    except ValueError:
        acc = None
    if acc not in _ACC_ACTIONS:
        raise Malformed("`acc` must be 1, 2, 3 or 4")
    actions = _ACC_ACTIONS[acc]
    try:
        try:
            subject = Subject(username=text(data, "username"), client_id=text(data, "clientid"))
        except ValueError:
            raise Malformed("username or clientid contains `+`, `#`, `/` or NUL") from None
        topic = text(data, "topic", required=True)
    except Malformed as exc:  # `acc` said what was asked: log it under that action
        raise exc.about(actions[-1]) from None
    return [AuthzRequest(subject=subject, action=action, topic=topic) for action in actions]


def answer(verdict: Verdict, mode: str) -> web.Response:
    """The status says it all (200 allow, 403 deny, 503 failure); the body is the mode's, for the plugin's log."""
    status = 200 if verdict.allowed else 503 if verdict.failed else 403
    if mode == "json":
        ok = verdict.allowed
        return web.json_response({"ok": ok, "error": "" if ok else verdict.reason.value}, status=status)
    if mode == "text":
        return web.Response(text="ok" if verdict.allowed else verdict.reason.value, status=status)
    return web.Response(status=status)


# -- routes -------------------------------------------------------------------------------------------


def add_routes(routes: web.RouteTableDef, pdp: PDP, settings: Settings) -> None:
    mode = settings.brokers.mosquitto_response_mode

    def malformed(action: Action, exc: Malformed, hook: str) -> web.Response:
        decision = refuse(pdp, exc, action, broker=BROKER, hook=hook)
        # 400 is a clean deny in every response mode (non-2xx below 500).
        return web.json_response({"ok": False, "error": decision.reason.value}, status=400)

    async def user(request: web.Request) -> web.Response:
        try:
            data = await read_fields(request)
            username, password, clientid = text(data, "username"), text(data, "password"), text(data, "clientid")
        except Malformed as exc:
            return malformed(Action.CONNECT, exc, "user")
        decision = await pdp.authenticate(username, password, client_id=clientid, broker=BROKER, hook="user")
        return answer(decision.verdict, mode)

    async def superuser(request: web.Request) -> web.Response:
        # authhook's model has no superusers: every subject is bound by its tenant's grants.
        try:
            username = text(await read_fields(request), "username")
        except Malformed as exc:
            return malformed(Action.CONNECT, exc, "superuser")
        decision = pdp.refuse(
            Action.CONNECT,
            Reason.NOT_SUPERUSER,
            "authhook grants no superuser rights",
            broker=BROKER,
            hook="superuser",
            username=username,
        )
        return answer(decision.verdict, mode)

    translate_acl = TranslationMemo(acl_requests)

    async def acl(request: web.Request) -> web.Response:
        try:
            requests = await translate_acl(request)
        except Malformed as exc:
            return malformed(Action.PUBLISH, exc, "acl")
        verdict = None
        for authz in requests:  # acc 3 needs both; the first deny answers
            verdict = (
                pdp.cached(authz, broker=BROKER, hook="acl")
                or (await pdp.authorize(authz, broker=BROKER, hook="acl")).verdict
            )
            if not verdict.allowed:
                break
        assert verdict is not None
        return answer(verdict, mode)

    routes.post("/mosquitto-go-auth/user")(user)
    routes.post("/mosquitto-go-auth/superuser")(superuser)
    routes.post("/mosquitto-go-auth/acl")(acl)
