"""PostgreSQL: following key changes as they commit (``LISTEN/NOTIFY``)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TYPE_CHECKING

import asyncpg
import orjson

from gateway.storage import (
    KeyChange,
)
from gateway.storage import rows as model
from gateway.storage.postgresql.core import CANNOT_CONNECT, PostgresCore, log

if TYPE_CHECKING:
    pass

__all__ = ["NOTIFY_CHANNEL", "PostgresListen"]

NOTIFY_CHANNEL = "gateway_key_changes"

# The listener's checks: a dropped connection is noticed within about this long.
_LISTEN_CHECK_SECONDS = 0.5
_RECONNECT_FIRST_SECONDS = 0.1
_RECONNECT_MAX_SECONDS = 2.0


def _key_change(payload: str) -> KeyChange:
    return model.key_change(orjson.loads(payload))


class PostgresListen(PostgresCore):
    """Key changes pushed to this process (PushesKeyChanges)."""

    async def listen_key_changes(
        self,
        on_change: Callable[[KeyChange], None],
        on_connected: Callable[[], None],
        on_lost: Callable[[], None],
    ) -> None:
        """Follow key changes as they commit, until cancelled.

        Runs on a connection of its own (``listen_dsn`` when set: LISTEN needs a
        session, which a pool behind PgBouncer cannot promise). ``on_connected``
        is called once LISTEN is active, after every (re)connection: whatever
        changed while there was no connection was not announced, so the caller
        re-checks everything it holds. ``on_lost`` is called when an established
        connection drops, noticed within about half a second.
        """
        listen_dsn = self._settings.listen_dsn
        dsn = listen_dsn.get_secret_value() if listen_dsn is not None else self._dsn
        delay = _RECONNECT_FIRST_SECONDS
        failing = False
        while True:
            connected = False
            try:
                conn = await asyncpg.connect(
                    dsn,
                    timeout=self._settings.command_timeout_seconds,
                    statement_cache_size=0,
                    server_settings={"application_name": "gateway-listen"},
                )
            except CANNOT_CONNECT as exc:
                if not failing:
                    log.warning("cannot listen for key changes, retrying: %s", exc)
                failing = True
            else:
                try:
                    lost = await self._subscribe(conn, on_change)
                    on_connected()
                    connected, failing = True, False
                    await self._watch(conn, lost)
                except CANNOT_CONNECT as exc:
                    log.warning("lost the key change connection, reconnecting: %s", exc)
                finally:
                    conn.terminate()
            if connected:
                on_lost()
                delay = _RECONNECT_FIRST_SECONDS
            await asyncio.sleep(delay)
            delay = min(delay * 2, _RECONNECT_MAX_SECONDS)

    @staticmethod
    async def _subscribe(
        conn: asyncpg.Connection[asyncpg.Record], on_change: Callable[[KeyChange], None]
    ) -> asyncio.Event:
        """LISTEN on ``conn``; the event is set when the connection closes."""
        lost = asyncio.Event()

        def deliver(_conn: object, _pid: int, _channel: str, payload: object) -> None:
            try:
                change = _key_change(str(payload))
            except (ValueError, KeyError, TypeError):
                log.error("ignoring a malformed key change notification: %r", payload)
                return
            on_change(change)

        conn.add_termination_listener(lambda _conn: lost.set())
        await conn.add_listener(NOTIFY_CHANNEL, deliver)
        return lost

    @staticmethod
    async def _watch(conn: asyncpg.Connection[asyncpg.Record], lost: asyncio.Event) -> None:
        """Return (or raise) once the connection is gone."""
        while not conn.is_closed():
            # The termination listener fires when the server closes the
            # connection; the ping catches a network that silently went away.
            try:
                await asyncio.wait_for(lost.wait(), _LISTEN_CHECK_SECONDS)
            except TimeoutError:
                await conn.execute("SELECT 1", timeout=_LISTEN_CHECK_SECONDS * 2)
            else:
                return
