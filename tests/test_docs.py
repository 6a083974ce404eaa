"""The README and docs/: relative links lead somewhere, and the headline benchmark rows are real."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCUMENTS = [README, *sorted((ROOT / "docs").glob("*.md"))]

FENCE = re.compile(r"^```.*?^```[^\n]*$", re.M | re.S)
CODE_SPAN = re.compile(r"`[^`\n]*`")
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def prose(text: str) -> str:
    """The text outside fenced code blocks."""
    return FENCE.sub("", text)


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    found = set()
    for heading in re.findall(r"^#{1,6} +(.+?) *#*$", prose(path.read_text("utf-8")), re.M):
        base = slug(heading)
        n = seen.get(base, 0)
        seen[base] = n + 1
        found.add(base if n == 0 else f"{base}-{n}")
    return found


def links(path: Path) -> list[str]:
    text = CODE_SPAN.sub("", prose(path.read_text("utf-8")))
    return [target for target in LINK.findall(text) if not re.match(r"[a-z][a-z0-9+.-]*:", target)]


def test_the_slug_is_githubs() -> None:
    assert slug("Money: how a charge is decided") == "money-how-a-charge-is-decided"
    assert slug("`POST /admin/v1/teams/{team}/keys`") == "post-adminv1teamsteamkeys"
    assert slug("History: what changed the figures") == "history-what-changed-the-figures"


@pytest.mark.parametrize("document", DOCUMENTS, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_lead_to_files_and_headings(document: Path) -> None:
    broken = []
    for target in links(document):
        file_part, _, anchor = target.partition("#")
        resolved = (document.parent / file_part).resolve() if file_part else document
        if not resolved.exists():
            broken.append(f"{target}: no such file")
        elif anchor and resolved.suffix == ".md" and anchor not in anchors(resolved):
            broken.append(f"{target}: no heading #{anchor} in {resolved.relative_to(ROOT)}")
    assert not broken, f"{document.relative_to(ROOT)}: " + "; ".join(broken)


def test_the_link_checker_sees_a_broken_link(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    page.write_text("# Title\n\n[ok](#title) [gone](missing.md) [x](https://example.org)\n")
    assert links(page) == ["#title", "missing.md"]
    assert anchors(page) == {"title"}


def test_the_readme_shows_the_latest_benchmark_rows_as_they_are() -> None:
    """The README's headline rows are copied from docs/benchmarks.md's latest table."""

    def table_rows(text: str) -> list[str]:
        return [line for line in text.splitlines() if line.startswith("| ")]

    readme = README.read_text("utf-8")
    section = readme[readme.index("\n## Benchmarks\n") :].split("\n## ", 2)[1]
    headline = table_rows(section)
    full = (ROOT / "docs" / "benchmarks.md").read_text("utf-8")
    latest = full[full.index("\n## Latest run\n") :].split("\n## ", 2)[1]
    rows = table_rows(latest)
    assert len(headline) >= 5, "the README's Benchmarks section shows no headline rows"
    assert headline[0] == rows[0], "the README's benchmark columns differ from the full table"
    stale = [row for row in headline if row not in rows]
    assert not stale, f"README rows not in docs/benchmarks.md's latest table: {stale}"
