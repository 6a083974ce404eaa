"""What every command shares: config loading, the store, output, errors."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, NoReturn, TypeVar

import orjson

from gateway.config import DEFAULT_CONFIG_PATH, Settings, load_settings
from gateway.manage import Management
from gateway.storage import Backend
from gateway.storage.registry import open_backend

__all__ = ["CliError", "config_path", "emit", "fail", "settings", "table", "with_management"]

T = TypeVar("T")


class CliError(Exception):
    """One clear sentence for stderr."""


def fail(message: str, code: int = 1) -> NoReturn:
    print(f"gateway: {message}", file=sys.stderr)
    raise SystemExit(code)


def config_path(args: argparse.Namespace) -> str:
    return str(args.config or os.environ.get("GATEWAY_CONFIG") or DEFAULT_CONFIG_PATH)


def settings(args: argparse.Namespace, *, serving: bool = False) -> Settings:
    return load_settings(config_path(args), serving=serving)


def table(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> str:
    # Ten lines of formatting; not worth a dependency.
    cells = [[("" if r.get(c) is None else str(r.get(c))) for c in columns] for r in rows]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(columns)]
    lines = ["  ".join(c.upper().ljust(w) for c, w in zip(columns, widths, strict=True))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)) for row in cells]
    return "\n".join(line.rstrip() for line in lines)


def emit(args: argparse.Namespace, data: Any, text: str) -> None:
    if args.json:
        sys.stdout.write(orjson.dumps(data, option=orjson.OPT_INDENT_2).decode() + "\n")
    else:
        print(text)


def with_backend(args: argparse.Namespace, work: Callable[[Backend, Settings], Awaitable[T]]) -> T:
    """Run ``work`` against the configured store, opened (and migrated) for the occasion."""
    config = settings(args)

    async def run() -> T:
        backend = open_backend(
            config.storage, lease_seconds=config.lease_seconds, postgres=config.postgres
        )
        await backend.open()
        try:
            if config.storage_kind == "sqlite" or config.postgres.migrate_on_start:
                await backend.migrate()
            return await work(backend, config)
        finally:
            await backend.close()

    return asyncio.run(run())


def with_management(args: argparse.Namespace, work: Callable[[Management], Awaitable[T]]) -> T:
    async def run(backend: Backend, config: Settings) -> T:
        return await work(Management(backend, config))

    return with_backend(args, run)
