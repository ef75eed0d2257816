"""A stand-in OPA server for tests: OPA's Data API (``POST /v1/data/{path}``) over regopy.

No OPA binary can be installed here, so this serves ``policy/opa/authhook.rego`` the way ``opa run
--server`` would for the calls authhook makes: ``{"result": <value>}`` when the document is defined,
``{}`` when it is undefined, 400 on a body that is not a JSON object, 500 on an evaluation error; errors
carry OPA's ``{"code", "message"}`` body. ``FakeOpa`` has knobs to make it slow, hold requests, fail, or
answer undefined, for the transport and breaker tests.
"""

from __future__ import annotations

import asyncio
import json
import re
from pathlib import Path
from typing import Any

import regopy  # type: ignore[import-untyped]
from aiohttp import web

from authhook.evaluators.opa import DECISION_PATH, DEFAULT_POLICY_PATH, RegoPolicy, regopy_safe, strict_json

_PATH = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(/[A-Za-z_][A-Za-z0-9_]*)*$")


class FakeOpa:
    """The app plus its knobs; ``requests`` counts every request that reached the handler."""

    def __init__(self, policy_path: Path = DEFAULT_POLICY_PATH) -> None:
        self.source = policy_path.read_text(encoding="utf-8")
        self.delay_s = 0.0  # sleep this long before answering
        self.fail_status: int | None = None  # answer this status (e.g. 500) instead of evaluating
        self.undefined = False  # answer {} (undefined) whatever the policy says
        self.hold: asyncio.Event | None = None  # when set, each request waits for this event first
        self.requests = 0
        self.arrived = asyncio.Event()  # set once a request has reached the handler
        self._policy: RegoPolicy | None = None
        self.app = web.Application()
        self.app.router.add_post("/v1/data/{path:.*}", self._data)

    def evaluate(self, path: str, document: Any, has_input: bool) -> tuple[bool, Any]:
        """(defined, value) of ``data.<path>`` for one input.

        The policy's own decision rule runs from a bundle compiled once (as OPA compiles on load); any
        other path gets a fresh interpreter and an ad-hoc query.
        """
        if path == DECISION_PATH and has_input:
            if self._policy is None:
                self._policy = RegoPolicy(self.source)
            return self._policy.evaluate(document)
        rego = regopy.Interpreter()
        rego.add_module("authhook.rego", self.source)
        if has_input:
            rego.set_input(regopy_safe(document))
        output = rego.query("data" + ("." + path.replace("/", ".") if path else ""))
        if not output.ok():
            raise RuntimeError(str(output))
        text = str(output)
        if text == "undefined":
            return False, None
        return True, strict_json(text)["expressions"][0]

    async def _data(self, request: web.Request) -> web.Response:
        self.requests += 1
        self.arrived.set()
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        if self.hold is not None:
            await self.hold.wait()
        if self.fail_status is not None:
            code = "internal_error" if self.fail_status >= 500 else "invalid_parameter"
            return web.json_response({"code": code, "message": "injected"}, status=self.fail_status)
        path = request.match_info["path"].strip("/")
        if path and not _PATH.match(path):
            return web.json_response({"code": "invalid_parameter", "message": "bad path"}, status=400)
        try:
            body = json.loads(await request.read() or b"{}")
        except ValueError:
            return web.json_response({"code": "invalid_parameter", "message": "body is not json"}, status=400)
        if not isinstance(body, dict):
            return web.json_response({"code": "invalid_parameter", "message": "body is not an object"}, status=400)
        if self.undefined:
            return web.json_response({})
        try:
            defined, value = self.evaluate(path, body.get("input"), "input" in body)
        except Exception as exc:
            return web.json_response({"code": "internal_error", "message": str(exc)[:200]}, status=500)
        return web.json_response({"result": value} if defined else {})
