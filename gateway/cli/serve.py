"""Commands that run things: run, demo, migrate, check-config."""

from __future__ import annotations

import argparse
import asyncio
import os

from gateway.cli._common import CliError, config_path, emit, settings, with_backend
from gateway.config import Settings, load_settings
from gateway.storage import Backend

__all__ = ["cmd_check_config", "cmd_demo", "cmd_migrate", "cmd_run"]


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def cmd_check_config(args: argparse.Namespace) -> None:
    config = load_settings(args.path)
    print(
        f"{args.path}: OK ({_count(len(config.routes), 'route')}, "
        f"{_count(len(config.upstreams), 'upstream')}, "
        f"storage {config.storage_kind}, limiter {config.limiter.kind})"
    )


def cmd_migrate(args: argparse.Namespace) -> None:
    async def work(backend: Backend, _: Settings) -> list[int]:
        return await backend.migrate()

    applied = with_backend(args, work)
    emit(
        args,
        {"applied": applied},
        f"applied migrations {', '.join(map(str, applied))}" if applied else "schema is up to date",
    )


def cmd_run(args: argparse.Namespace) -> None:
    from gateway.logs import configure_logging
    from gateway.server import serve

    config = settings(args, serving=True)
    if args.workers < 1:
        raise CliError("--workers must be at least 1")
    if args.workers > 1 and (config.limiter.kind == "memory" or config.storage_kind == "sqlite"):
        raise CliError(
            "--workers above 1 needs limiter: redis://... and storage: postgresql://...; "
            "with the in-process limiter and SQLite every worker would enforce its own limits"
        )
    configure_logging(config.logging)
    if args.workers > 1:
        from gateway.workers import supervise

        raise SystemExit(supervise(config_path(args), args.workers))
    install_uvloop()
    # A worker of a supervisor shares its listeners with its siblings.
    asyncio.run(serve(config, reuse_port=os.environ.get("GATEWAY_WORKER") == "1"))


def install_uvloop() -> None:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - optional on platforms without it
        return
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


def cmd_demo(args: argparse.Namespace) -> None:
    from gateway.demo import run_demo

    install_uvloop()
    run_demo(args)
