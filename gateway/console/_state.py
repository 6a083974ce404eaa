"""What the console keeps on the admin application and on each request."""

from __future__ import annotations

from aiohttp import web

from gateway.console._html import Templates
from gateway.console._sessions import Session, SessionStore

__all__ = [
    "PREFIX",
    "SESSION",
    "SESSIONS",
    "SESSION_COOKIE",
    "SIGNIN_COOKIE",
    "STATIC",
    "TEMPLATES",
    "session_of",
]

PREFIX = "/console"
SESSION_COOKIE = "console_session"
# Holds the sign-in form's nonce (double submit): a page on another site cannot
# sign a browser in with the attacker's token.
SIGNIN_COOKIE = "console_signin"

SESSIONS = web.AppKey("console_sessions", SessionStore)
TEMPLATES = web.AppKey("console_templates", Templates)
STATIC = web.AppKey("console_static", dict[str, tuple[bytes, str]])
SESSION = web.RequestKey("console_session", Session)


def session_of(request: web.Request) -> Session:
    """The signed-in session (the middleware lets no request without one get here)."""
    return request[SESSION]
