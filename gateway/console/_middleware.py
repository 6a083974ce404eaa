"""What every console request goes through: security headers, the session, CSRF, errors.

CSRF defence (the robust variant): every state-changing request is a POST that
must carry the session's own random token in a hidden form field, compared in
constant time. On top of that the session cookie is ``SameSite=Strict`` (a
cross-site request carries no session at all), and a browser's
``Sec-Fetch-Site`` / ``Origin`` headers, when present, must say the request
came from this origin. The sign-in form, which has no session yet, uses a
double-submit nonce (cookie plus hidden field) so no other site can sign a
browser in with a token of its choosing.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
from collections.abc import Awaitable, Callable

from aiohttp import web

from gateway.app import GATEWAY
from gateway.console._checks import read_form, same_origin
from gateway.console._layout import error_page, redirect
from gateway.console._state import PREFIX, SESSION, SESSION_COOKIE, SESSIONS
from gateway.manage import InputError
from gateway.storage import NotFound, StorageUnavailable

__all__ = ["CSP", "console_middleware"]

log = logging.getLogger("gateway.console")
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self'; "
    "object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
)
_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cross-Origin-Resource-Policy": "same-origin",
    "Permissions-Policy": "camera=(), microphone=(), geolocation=(), payment=()",
}
SIGN_IN = f"{PREFIX}/sign-in"
STATIC = f"{PREFIX}/static/"


def _is_console(path: str) -> bool:
    return path == PREFIX or path.startswith(PREFIX + "/")


async def _refused(request: web.Request) -> web.Response:
    return await error_page(
        request,
        403,
        "Request refused",
        "This form has expired or did not come from this console. Go back, reload the page "
        "and try again.",
    )


async def _route(request: web.Request, handler: Handler) -> web.StreamResponse:
    path = request.path
    if path.startswith(STATIC):
        return await handler(request)
    sessions = request.app[SESSIONS]
    session = sessions.get(request.cookies.get(SESSION_COOKIE))
    token_id = session.actor.token_id if session is not None else None
    if token_id is not None:
        # A revoked team token ends its console sessions at once.
        try:
            token = await request.app[GATEWAY].management.token(token_id)
            revoked = token.revoked_at is not None
        except (NotFound, InputError):
            revoked = True
        if revoked:
            sessions.end_for_token(token_id)
            session = None
    if session is not None:
        request[SESSION] = session
    if path == SIGN_IN:
        return await handler(request)
    if session is None:
        return redirect(SIGN_IN)
    if request.method not in ("GET", "HEAD"):
        form = await read_form(request)
        presented = form.get("csrf")
        if (
            not same_origin(request)
            or not isinstance(presented, str)
            or not hmac.compare_digest(presented.encode(), session.csrf.encode())
        ):
            log.warning("console: refused a form without a valid CSRF token: %s", path)
            return await _refused(request)
    return await handler(request)


@web.middleware
async def console_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Only for paths under ``/console``; the admin API's requests pass straight through."""
    if not _is_console(request.path):
        return await handler(request)
    response: web.StreamResponse
    try:
        response = await _route(request, handler)
    except asyncio.CancelledError:
        raise
    except (NotFound, InputError) as exc:
        # Unknown, or not the signed-in party's: the same page either way.
        status = exc.status if isinstance(exc, InputError) else 404
        message = exc.message if isinstance(exc, InputError) and status != 404 else "Not found"
        response = await error_page(request, status, message, _explain(status))
    except StorageUnavailable:
        response = await error_page(
            request, 503, "Database unavailable", "The database did not answer. Try again soon."
        )
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        response = await error_page(request, exc.status, exc.reason, _explain(exc.status))
    except Exception:
        log.exception("console request failed: %s %s", request.method, request.path)
        response = await error_page(
            request, 500, "Something went wrong", "The console hit an error; it has been logged."
        )
    for name, value in _HEADERS.items():
        response.headers.setdefault(name, value)
    if not request.path.startswith(STATIC):
        # Pages show balances, usage and (once) a new key: never kept by any cache.
        response.headers["Cache-Control"] = "no-store"
    return response


def _explain(status: int) -> str:
    if status == 404:
        return "There is no such page."
    if status == 405:
        return "This page does not accept that kind of request."
    if status == 413:
        return "The form sent too much data."
    return "The request could not be handled."
