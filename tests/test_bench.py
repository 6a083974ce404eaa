"""The benchmark scripts still start: a refactor that breaks one of their imports shows here,
not in the next session that needs the figures (bench/stage_latency.py once imported an
``app.create_app`` that no longer existed)."""

from __future__ import annotations

import py_compile
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"
SCRIPTS = sorted(BENCH.glob("*.py"))


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_a_benchmark_script_starts(script: Path) -> None:
    if "argparse" not in script.read_text("utf-8"):
        # A helper that takes no options (bench/otlp_sink.py): it must compile.
        py_compile.compile(str(script), doraise=True)
        return
    done = subprocess.run(
        [sys.executable, str(script), "--help"], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "usage:" in done.stdout
