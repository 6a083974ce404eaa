"""The admin listener's application: the admin API and the console side by side.

Both are adapters over the management service and never import each other;
this is where they are mounted together, inside the admin API's error ladder.
"""

from __future__ import annotations

from aiohttp import web

from gateway.admin import MAX_BODY, add_admin_api, error_middleware
from gateway.admin.auth import auth_middleware
from gateway.app import GATEWAY, Gateway
from gateway.console import console_middleware, setup_console

__all__ = ["create_admin_app"]


def create_admin_app(gateway: Gateway) -> web.Application:
    app = web.Application(
        middlewares=[error_middleware, auth_middleware(gateway), console_middleware],
        client_max_size=MAX_BODY,
    )
    app[GATEWAY] = gateway
    add_admin_api(app, gateway)
    setup_console(app)
    return app
