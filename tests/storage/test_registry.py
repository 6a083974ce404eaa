"""The storage registry: a URL scheme picks the backend, anything else is refused."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.storage import StorageError
from gateway.storage.registry import open_backend
from gateway.storage.sqlite import SqliteBackend


async def test_a_sqlite_url_opens_sqlite_at_its_path(tmp_path: Path) -> None:
    backend = open_backend(f"sqlite:///{tmp_path / 'g.db'}", lease_seconds=60)
    assert isinstance(backend, SqliteBackend)
    await backend.open()
    try:
        await backend.migrate()
        await backend.ping()
    finally:
        await backend.close()
    assert (tmp_path / "g.db").exists()


@pytest.mark.parametrize("url", ["mysql://db/gateway", "sqlite:relative.db", "memory"])
def test_an_unknown_scheme_is_refused_naming_it(url: str) -> None:
    with pytest.raises(StorageError, match="is not available in this build"):
        open_backend(url, lease_seconds=60)
