"""Broker adapters: thin translators from each broker's callback format to the core request and back.

Each adapter has a pure ``translate`` module (wire fields in, core request out; verdict in, wire answer out)
and a ``routes`` module that parses, asks the PDP and answers. No policy lives here.
"""

from __future__ import annotations

from aiohttp import web

from authhook.brokers import emqx, mosquitto, rabbitmq, vernemq
from authhook.brokers.common import BROKER_PREFIXES, webhook_token_check
from authhook.config import Settings
from authhook.pdp import PDP


def add_broker_routes(app: web.Application, pdp: PDP, settings: Settings) -> None:
    """Mount every broker's endpoints; one PDP answers all brokers at once."""
    for module in (emqx, vernemq, mosquitto, rabbitmq):
        module.add_routes(app, pdp, settings)


__all__ = ["BROKER_PREFIXES", "add_broker_routes", "webhook_token_check"]
