"""Broker adapters: thin translators from each broker's callback format to the core request and back.

Each adapter is one module in two parts: pure translation functions (wire fields in, core request out;
verdict in, wire answer out) and ``add_routes``, whose handlers parse, ask the PDP and answer. What they
share (body parsing that never raises, the translation memo, answers) is in ``common``. No policy lives here.
"""

from __future__ import annotations

from aiohttp import web

from authhook.brokers import emqx, mosquitto, rabbitmq, vernemq
from authhook.config import Settings
from authhook.pdp import PDP


def broker_routes(pdp: PDP, settings: Settings) -> web.RouteTableDef:
    """Every broker's endpoints, for the server to mount behind its edge; one PDP answers all brokers."""
    routes = web.RouteTableDef()
    for module in (emqx, vernemq, mosquitto, rabbitmq):
        module.add_routes(routes, pdp, settings)
    return routes


__all__ = ["broker_routes"]
