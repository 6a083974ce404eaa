"""Checks on what a browser tells about a request, and on form input."""

from __future__ import annotations

from urllib.parse import urlsplit

from aiohttp import web
from aiohttp.web_request import FileField
from multidict import MultiDictProxy

from gateway.console._state import session_of
from gateway.manage import Actor
from gateway.manage.inputs import Fields, InputError
from gateway.proxy import ClientAddress

__all__ = [
    "LABELS",
    "PROXIES",
    "actor",
    "client_ip",
    "over_tls",
    "problems",
    "read_form",
    "same_origin",
    "text",
]

PROXIES = web.AppKey("console_proxies", ClientAddress)

# How a field of the admin API's rules is called on a form.
LABELS = {"name": "Name", "amount": "Amount", "reason": "Reason", "environment": "Environment"}


def same_origin(request: web.Request) -> bool:
    """False when the browser says the request came from another site.

    Browsers send ``Sec-Fetch-Site`` on every request; ``Origin`` on a form POST is
    ``null`` here, because the console's pages are served with ``Referrer-Policy:
    no-referrer``. Clients that send neither (curl) still need the CSRF token.
    """
    site = request.headers.get("Sec-Fetch-Site")
    if site is not None and site != "same-origin":
        return False
    origin = request.headers.get("Origin")
    # The host only: TLS may end at a proxy in front, so the schemes can differ.
    return origin is None or origin == "null" or urlsplit(origin).netloc == request.host


def over_tls(request: web.Request) -> bool:
    """Whether the browser's connection is TLS: ours, or a trusted proxy's (X-Forwarded-Proto)."""
    if request.secure:
        return True
    if not request.app[PROXIES].trusts(request.remote):
        return False
    forwarded = request.headers.get("X-Forwarded-Proto", "")
    return forwarded.split(",")[0].strip().lower() == "https"


def client_ip(request: web.Request) -> str:
    """The client's address, believing X-Forwarded-For only from ``trusted_proxies``."""
    return request.app[PROXIES].client_ip(request.remote, request.headers.get("X-Forwarded-For"))


def actor(request: web.Request) -> Actor:
    """Who is signed in, calling from this request's address, through the console."""
    return session_of(request).actor.at(client_ip(request), via="console")


async def read_form(request: web.Request) -> MultiDictProxy[str | bytes | bytearray | FileField]:
    """The posted form; undecodable bytes in it are a 400, not a crash."""
    try:
        return await request.post()
    except (UnicodeDecodeError, ValueError):
        raise InputError(400, "The form is not valid UTF-8") from None


def text(value: object) -> str:
    """A form field as text (a file upload or a missing field is the empty string)."""
    return value.strip() if isinstance(value, str) else ""


def problems(fields: Fields) -> dict[str, str]:
    """The admin API's validation messages, as ``{field: "Name must be …"}`` for a form."""
    try:
        fields.check()
    except InputError as exc:
        return {
            d["field"]: f"{LABELS.get(d['field'], d['field'])} {d['problem']}." for d in exc.details
        }
    return {}
