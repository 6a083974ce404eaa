"""The web console on the admin listener, at ``/console``: API keys, credits, usage,
requests and webhooks.

Signed in with the admin token (an operator: every team) or a team-scoped
management token (its own team only), checked as the admin API checks a bearer
token. Pages are rendered on the server with the standard library (see
``_html``); the one small script and the stylesheet ship in ``static/``, so a
strict Content-Security-Policy holds and nothing is fetched from elsewhere.
"""

from __future__ import annotations

from importlib.resources import files

from aiohttp import web

from gateway.app import GATEWAY
from gateway.console import _credits, _keys, _requests, _signin, _usage, _webhooks
from gateway.console._checks import PROXIES
from gateway.console._html import Templates
from gateway.console._middleware import console_middleware
from gateway.console._sessions import SessionStore
from gateway.console._state import PREFIX, SESSIONS, STATIC, TEMPLATES
from gateway.proxy import ClientAddress

__all__ = ["SESSIONS", "SessionStore", "console_middleware", "setup_console"]

_TYPES = {
    ".css": "text/css",
    ".js": "text/javascript",
    ".svg": "image/svg+xml",
}
_TEAM = PREFIX + "/teams/{team:[^/]+}"
_KEY = _TEAM + "/keys/{key_id:key_[0-9a-f]+}"


def _static_files() -> dict[str, tuple[bytes, str]]:
    """The static files by name, read once; only these names are ever served."""
    folder = files("gateway.console") / "static"
    found: dict[str, tuple[bytes, str]] = {}
    for entry in folder.iterdir():
        suffix = "." + entry.name.rpartition(".")[2]
        if suffix in _TYPES:
            found[entry.name] = (entry.read_bytes(), _TYPES[suffix])
    return found


def setup_console(app: web.Application) -> None:
    """Add the console's routes and state to the admin application.

    ``console_middleware`` must be among the application's middlewares (inside
    the admin API's error ladder) for the pages to be protected.
    """
    app[SESSIONS] = SessionStore()
    app[TEMPLATES] = Templates()
    app[STATIC] = _static_files()
    app[_signin.THROTTLE] = _signin.FailureThrottle()
    app[PROXIES] = ClientAddress(app[GATEWAY].settings.trusted_proxies)
    router = app.router
    router.add_get(PREFIX, _signin.index)
    router.add_get(PREFIX + "/", _signin.index)
    router.add_get(PREFIX + "/sign-in", _signin.sign_in_form)
    router.add_post(PREFIX + "/sign-in", _signin.sign_in)
    router.add_post(PREFIX + "/sign-out", _signin.sign_out)
    router.add_get(PREFIX + "/static/{name}", _signin.static)
    router.add_get(PREFIX + "/teams", _signin.teams)
    router.add_get(PREFIX + "/go", _signin.go)
    router.add_get(_TEAM + "/keys", _keys.keys)
    router.add_post(_TEAM + "/keys", _keys.create_key)
    router.add_get(_KEY + "/revoke", _keys.revoke_form)
    router.add_post(_KEY + "/revoke", _keys.revoke_key)
    router.add_get(_KEY + "/rotate", _keys.rotate_form)
    router.add_post(_KEY + "/rotate", _keys.rotate_key)
    router.add_get(_TEAM + "/credits", _credits.credits)
    router.add_post(_TEAM + "/credits", _credits.grant)
    router.add_get(_TEAM + "/usage", _usage.usage)
    router.add_get(_TEAM + "/requests", _requests.requests_page)
    router.add_get(_TEAM + "/webhooks", _webhooks.webhooks_page)
    router.add_post(_TEAM + "/webhooks/{webhook_id:whep_[0-9a-f]+}/test", _webhooks.send_test)
