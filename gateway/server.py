"""Running the listeners: public, status and admin, with a graceful shutdown."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from collections.abc import Awaitable, Callable

from aiohttp import web

from gateway.app import Gateway, PublicRunner
from gateway.config import Settings, parse_listen
from gateway.status import create_status_app

__all__ = ["parser_is_compiled", "serve"]

log = logging.getLogger("gateway")


def parser_is_compiled() -> bool:
    """True when aiohttp runs its C HTTP parser (the pure-Python one is slower and laxer)."""
    from aiohttp import http_parser

    return http_parser.HttpRequestParser.__module__ == "aiohttp._http_parser"


async def _site(runner: web.BaseRunner, listen: str, reuse_port: bool) -> web.TCPSite:
    host, port = parse_listen(listen)
    site = web.TCPSite(runner, host, port, reuse_port=reuse_port or None)
    await site.start()
    return site


def _runners(settings: Settings, gateway: Gateway) -> tuple[list[web.BaseRunner], list[str]]:
    """The listeners' runners and addresses: public first (it drains and flushes first)."""
    drain = settings.shutdown.drain_seconds
    runners: list[web.BaseRunner] = [PublicRunner(gateway, shutdown_timeout=drain)]
    listens = [settings.listen]
    runners.append(web.AppRunner(create_status_app(gateway), access_log=None, shutdown_timeout=1.0))
    listens.append(settings.status.listen)
    # Under a supervisor, only the worker told to serves the admin listener.
    if settings.admin.enabled and os.environ.get("GATEWAY_SERVE_ADMIN", "1") == "1":
        from gateway.listeners import create_admin_app

        runners.append(
            web.AppRunner(create_admin_app(gateway), access_log=None, shutdown_timeout=5.0)
        )
        listens.append(settings.admin.listen)
    return runners, listens


async def serve(
    settings: Settings,
    *,
    reuse_port: bool = False,
    on_ready: Callable[[Gateway], Awaitable[None]] | None = None,
    stop: asyncio.Event | None = None,
) -> None:
    """Serve until SIGTERM/SIGINT (or ``stop`` is set), then shut down gracefully.

    Shutdown: fail /readyz, wait ``readiness_delay_seconds`` so load balancers
    notice, stop accepting, let in-flight requests finish within
    ``drain_seconds``, then flush batched posts and close the backends.
    """
    if not parser_is_compiled():
        log.warning(
            "aiohttp is running its pure-Python HTTP parser: slower, and without the "
            "C parser's request-smuggling hardening. Install aiohttp's wheel for this platform."
        )
    gateway = Gateway(settings)
    runners, listens = _runners(settings, gateway)

    stop = stop if stop is not None else asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(signum, stop.set)

    started: list[web.BaseRunner] = []
    try:
        for runner, listen in zip(runners, listens, strict=True):
            await runner.setup()
            started.append(runner)
            await _site(runner, listen, reuse_port)
        log.info(
            "gateway listening",
            extra={
                "fields": {
                    "public": settings.listen,
                    "status": settings.status.listen,
                    "admin": settings.admin.listen if settings.admin.enabled else None,
                }
            },
        )
        if on_ready is not None:
            await on_ready(gateway)
        await stop.wait()
        log.info("shutting down: failing readiness first")
        gateway.ready = False
        await asyncio.sleep(settings.shutdown.readiness_delay_seconds)
    finally:
        # The public runner goes first: it stops accepting, drains, and its
        # gateway flushes the ledger before the status listener goes.
        for runner in started:
            await runner.cleanup()
        for signum in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.remove_signal_handler(signum)
    log.info("gateway stopped")
