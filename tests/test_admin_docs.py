"""docs/admin-api.md is what scripts/admin_api_docs.py generates from the route table."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path
from types import ModuleType

from gateway.admin.routes import OPERATIONS

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "admin_api_docs.py"
FIX = "python scripts/admin_api_docs.py"


def _script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("admin_api_docs", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


DOCS = _script()


def test_document_is_up_to_date() -> None:
    committed = DOCS.DOC.read_text(encoding="utf-8") if DOCS.DOC.exists() else ""
    assert committed == DOCS.generate(), (
        f"docs/admin-api.md is stale (the admin route table changed): run `{FIX}` and commit it"
    )


def test_every_operation_is_documented() -> None:
    text = DOCS.DOC.read_text(encoding="utf-8")
    missing = [
        f"{op.method} {op.path} ({op.operation_id})"
        for op in OPERATIONS
        if f"### `{op.method} {op.path}`" not in text
        or f"Operation id `{op.operation_id}`" not in text
    ]
    assert not missing, f"not in docs/admin-api.md: {missing}; run `{FIX}`"


def test_links_point_at_headings() -> None:
    text = DOCS.generate()
    seen: dict[str, int] = {}
    anchors = {DOCS._slug(h, seen) for h in re.findall(r"^#+ (.*)$", text, re.MULTILINE)}
    links = set(re.findall(r"\]\(#([^)]+)\)", text))
    assert links <= anchors, f"links to no heading: {sorted(links - anchors)}"
