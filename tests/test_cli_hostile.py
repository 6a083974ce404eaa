"""The CLI with hostile arguments: the admin API's bounds, one sentence on stderr, no traceback.

``gateway.cli.main`` runs in this process (a process per case would take
minutes); it exits through SystemExit as the real command does.
"""

from __future__ import annotations

import io
import sys
from pathlib import Path

import pytest

from gateway.cli import main

from .test_cli import cli_config

CASES = [
    ("teams", "create", ""),
    ("teams", "create", "x" * 5000),
    ("teams", "create", "bell\x07"),
    ("teams", "create", "ok", "--rate-limit", "1000000000000"),
    ("teams", "create", "ok", "--rate-limit", "٣"),
    ("teams", "update", "acme", "--rate-limit", "0"),
    ("keys", "create", "--team", "acme", "--name", "k", "--rate-limit", "1000000000000"),
    ("keys", "create", "--team", "acme", "--name", "k", "--expires-at", "10000-01-01T00:00:00Z"),
    (
        "keys",
        "create",
        "--team",
        "acme",
        "--name",
        "k",
        "--expires-at",
        "9999-12-31T23:59:59-12:00",
    ),
    ("keys", "create", "--team", "acme", "--name", "\x00"),
    ("keys", "create", "--team", "nobody", "--name", "k"),
    ("keys", "update", "key_0123", "--name", ""),
    ("keys", "rotate", "key_0123", "--grace", "99999999"),
    ("keys", "rotate", "key_0123", "--grace", "-1"),
    ("keys", "list", "--team", "a\x01b"),
    ("tokens", "create", "--team", "acme", "--name", "y" * 101),
    ("credits", "grant", "--team", "acme", "--amount", str(2**63 - 1), "--reason", "x"),
    ("credits", "grant", "--team", "acme", "--amount", "²", "--reason", "x"),
    ("credits", "grant", "--team", "acme", "--amount", "0", "--reason", "x"),
    ("credits", "grant", "--team", "acme", "--amount", "5", "--reason", ""),
    ("credits", "balance", "--team", "acme", "--history", "9" * 5000),
    ("credits", "balance", "--team", "acme", "--history", "-1"),
    ("audit", "--limit", "-1"),
    ("audit", "--limit", "10000000000000000000"),
    ("usage", "--team", "acme", "--buckets", "1e9"),
    ("usage", "--team", "acme", "--buckets", "1000000000"),
    ("requests", "--team", "acme", "--since", "1 hour"),
    ("requests", "--team", "acme", "--since", "99999999999d"),
    ("requests", "--team", "acme", "--status", "4x"),
    ("requests", "--team", "acme", "--client-ip", "10.0.0.0/99"),
    ("requests", "--team", "acme", "--path-prefix", "no-slash"),
    ("requests", "--team", "acme", "--limit", "0"),
    ("requests", "--team", "nobody"),
]


@pytest.fixture(scope="module")
def config(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = cli_config(tmp_path_factory.mktemp("cli-hostile"))
    main(["teams", "create", "acme", "--config", str(path)])  # returns on success
    return path


@pytest.mark.parametrize("args", CASES, ids=lambda a: " ".join(a)[:60])
def test_hostile_arguments_are_one_sentence_and_a_failure(
    config: Path, args: tuple[str, ...], monkeypatch: pytest.MonkeyPatch
) -> None:
    err = io.StringIO()
    monkeypatch.setattr(sys, "stderr", err)
    monkeypatch.setattr(sys, "stdout", io.StringIO())
    with pytest.raises(SystemExit) as done:
        main([*args, "--config", str(config)])
        raise SystemExit(0)
    text = err.getvalue()
    assert done.value.code not in (0, None), text
    assert text.startswith("gateway: ") and text.count("\n") == 1, text
    assert "Traceback" not in text and len(text) < 300, text
