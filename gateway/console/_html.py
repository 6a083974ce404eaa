"""HTML rendering with the standard library: every value is escaped unless it is ``Markup``.

``Markup`` is only ever made from literals in this package or from the output of
``render``/``fmt``, so text from the store (team names, key names, reasons) can
never become markup: it goes through ``escape`` on its way into a template.
"""

from __future__ import annotations

import html
from collections.abc import Iterable
from importlib.resources import files
from string import Template

__all__ = ["Markup", "Templates", "escape", "fmt", "join"]


class Markup(str):
    """A string that is already HTML: inserted as it is."""

    __slots__ = ()


def escape(value: object) -> Markup:
    """``value`` as HTML text (quotes included, so it is safe inside attributes too)."""
    if isinstance(value, Markup):
        return value
    return Markup(html.escape("" if value is None else str(value), quote=True))


def fmt(template: str, **values: object) -> Markup:
    """A small fragment: ``$name`` placeholders, each value escaped."""
    return Markup(Template(template).substitute({k: escape(v) for k, v in values.items()}))


def join(parts: Iterable[Markup], separator: str = "") -> Markup:
    return Markup(separator.join(escape(p) for p in parts))


class Templates:
    """The page templates shipped in ``gateway/console/templates``, read once."""

    def __init__(self) -> None:
        folder = files("gateway.console") / "templates"
        self._templates = {
            entry.name.removesuffix(".html"): Template(entry.read_text(encoding="utf-8"))
            for entry in folder.iterdir()
            if entry.name.endswith(".html")
        }

    def render(self, template: str, /, **values: object) -> Markup:
        """Template ``template`` with every value escaped (a missing one is a bug: KeyError)."""
        return Markup(
            self._templates[template].substitute({k: escape(v) for k, v in values.items()})
        )
