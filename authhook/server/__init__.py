"""HTTP server: the aiohttp app the broker adapters mount on."""

from authhook.server.app import create_app, serve

__all__ = ["create_app", "serve"]
