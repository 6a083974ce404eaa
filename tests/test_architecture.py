"""The structural rules of ARCHITECTURE.md ("Dependencies point one way", "Layout"),
checked on the source of gateway/ with ``ast``: nothing is imported or run.

What counts as an import of module A by module B:
- every ``import`` and ``from ... import`` statement in B, wherever it is: at
  the top, inside a function (a lazy import is still a dependency), or under
  ``if TYPE_CHECKING:``;
- relative imports, resolved against B's package;
- ``from pkg import name`` is an import of ``pkg.name`` when that is a module
  of ours, else of ``pkg``;
- ``importlib.import_module("gateway.x")`` with a literal name.

TYPE_CHECKING imports count for every rule: a type named in a signature is
still knowledge of the module that defines it, and the layering is about
what code knows. The one exception is Protocol typing: an import under
TYPE_CHECKING of names that are all ``Protocol`` classes of the target module
is exempt, since naming a Protocol is what a layer is supposed to do instead
of naming an implementation.

Only direct imports are checked (A imports B), not what B imports in turn.
tests/ and bench/ are outside these rules: they build concrete backends on
purpose.

Each rule lists the violations known today in ``KNOWN`` (each one with the
reason it is still there). ``test_rule`` fails on any violation not listed,
and on a listed one that is gone (so the list is pruned when one is fixed);
``test_rule_fully_holds`` is a strict xfail while a rule has known
violations, so it flips the moment the last one is fixed.
"""

from __future__ import annotations

import ast
import functools
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
GATEWAY = ROOT / "gateway"

# The pipeline is being rewritten from the module gateway/pipeline.py into the
# package gateway/pipeline/ (issue 15). Rules about its shape apply to the package.

LEAVES: dict[str, frozenset[str]] = {
    # leaf -> the modules of its own box it may import (each itself a leaf)
    "gateway.keys": frozenset(),
    # config_sections holds config's bounds and self-contained sections (re-exported).
    "gateway.config": frozenset({"gateway.config_sections"}),
    "gateway.config_sections": frozenset(),
    # local_metrics is the metrics box's own in-process metric types (its only
    # user, with no imports of ours); Layout puts both under observability/.
    "gateway.metrics": frozenset({"gateway.local_metrics"}),
    "gateway.local_metrics": frozenset(),
}

STORAGE_BACKENDS = (
    "gateway.storage.sqlite",  # a module, then a package
    "gateway.storage.postgres",  # the module the package replaced
    "gateway.storage.postgresql",  # the package the Layout names
)
# Rule 3b: the storage registry is the one place a storage URL becomes a backend.
STORAGE_REGISTRY = "gateway.storage.registry"
LIMITER_BACKENDS = ("gateway.limiter.redis", "gateway.limiter.memory", "gateway.limiter.fallback")
CONCRETE_BACKENDS = STORAGE_BACKENDS + LIMITER_BACKENDS
ADAPTERS = ("gateway.admin", "gateway.console", "gateway.cli")
WIRING = ("gateway.app", "gateway.server")

# Rule 3: who may name a concrete backend.
BACKEND_CHOOSERS = ("gateway.app", "gateway.storage.registry")
# The fallback limiter is the memory limiter standing in for Redis, by design.
COMPOSED_BACKENDS = frozenset({("gateway.limiter.fallback", "gateway.limiter.memory")})

# Rule 6: the one module that builds contract error bodies, and a module whose
# bodies are not the contract's: the demo upstream plays the assessment backend.
ERROR_RENDERER = "gateway.errors"
NOT_THE_CONTRACT = frozenset({"gateway.demo_upstream"})
RESPONSE_BUILDERS = frozenset({"json_response", "Response", "StreamResponse", "dumps"})

MAX_PIPELINE_MODULE_LINES = 300
MAX_PIPELINE_FUNCTION_LINES = 60


# --- reading the source ---------------------------------------------------------------


@dataclass(frozen=True)
class Module:
    name: str
    path: Path
    is_package: bool
    tree: ast.Module = field(repr=False, compare=False)

    @property
    def where(self) -> str:
        return str(self.path.relative_to(ROOT))


@dataclass(frozen=True)
class Import:
    importer: Module
    target: str
    names: tuple[str, ...]
    line: int
    typing_only: bool

    def __str__(self) -> str:
        names = f" ({', '.join(self.names)})" if self.names else ""
        typing = " [under TYPE_CHECKING]" if self.typing_only else ""
        return (
            f"{self.importer.where}:{self.line}: {self.importer.name} imports "
            f"{self.target}{names}{typing}"
        )


def within(module: str, *prefixes: str) -> bool:
    """Whether ``module`` is one of ``prefixes`` or inside one of them."""
    return any(module == p or module.startswith(p + ".") for p in prefixes)


def read_module(path: Path, root: Path = ROOT) -> Module:
    parts = list(path.relative_to(root).with_suffix("").parts)
    is_package = parts[-1] == "__init__"
    if is_package:
        parts.pop()
    return Module(".".join(parts), path, is_package, ast.parse(path.read_text(), str(path)))


@functools.cache
def modules() -> dict[str, Module]:
    found = (read_module(path) for path in sorted(GATEWAY.rglob("*.py")))
    return {m.name: m for m in found}


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _absolute(module: Module, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    package = module.name.split(".") if module.is_package else module.name.split(".")[:-1]
    base = package[: len(package) - (node.level - 1)]
    return ".".join([*base, *([node.module] if node.module else [])])


def imports_in(module: Module, known: frozenset[str] | None = None) -> Iterator[Import]:
    """Every import of ``module``, wherever it is written, resolved to absolute names."""
    ours = known if known is not None else frozenset(modules())

    def visit(node: ast.AST, typing_only: bool) -> Iterator[Import]:
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.body:
                yield from visit(child, True)
            for child in node.orelse:
                yield from visit(child, typing_only)
            return
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield Import(module, alias.name, (), node.lineno, typing_only)
        elif isinstance(node, ast.ImportFrom):
            base = _absolute(module, node)
            by_target: dict[str, list[str]] = {}
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                if sub in ours:
                    by_target.setdefault(sub, [])
                else:
                    by_target.setdefault(base, []).append(alias.name)
            for target, names in by_target.items():
                yield Import(module, target, tuple(names), node.lineno, typing_only)
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute | ast.Name)
            and (node.func.attr if isinstance(node.func, ast.Attribute) else node.func.id)
            == "import_module"
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            yield Import(module, node.args[0].value, (), node.lineno, typing_only)
        for inner in ast.iter_child_nodes(node):
            yield from visit(inner, typing_only)

    yield from visit(module.tree, False)


@functools.cache
def protocols() -> dict[str, frozenset[str]]:
    """Module -> the names of the ``Protocol`` classes it defines."""

    def is_protocol(base: ast.expr) -> bool:
        if isinstance(base, ast.Subscript):
            base = base.value
        return (isinstance(base, ast.Name) and base.id == "Protocol") or (
            isinstance(base, ast.Attribute) and base.attr == "Protocol"
        )

    return {
        name: frozenset(
            node.name
            for node in ast.walk(m.tree)
            if isinstance(node, ast.ClassDef) and any(is_protocol(b) for b in node.bases)
        )
        for name, m in modules().items()
    }


def layering_imports(module: Module) -> Iterator[Import]:
    """The imports of ours the layering rules judge: all but TYPE_CHECKING Protocol typing."""
    for imp in imports_in(module):
        if not within(imp.target, "gateway"):
            continue
        if imp.typing_only and imp.names and set(imp.names) <= protocols().get(imp.target, set()):
            continue
        yield imp


def all_imports() -> Iterator[Import]:
    for module in modules().values():
        yield from layering_imports(module)


# --- the rules: each yields (key, message); the key is what KNOWN lists ----------------

Violation = tuple[tuple[str, str], str]


def leaves_import_nothing_of_ours() -> Iterator[Violation]:
    """Rule 1: keys, config and metrics are leaves."""
    for imp in all_imports():
        box = LEAVES.get(imp.importer.name)
        if box is not None and imp.target not in box:
            yield (imp.importer.name, imp.target), f"{imp} - a leaf imports nothing of ours"


def _pipeline_forbidden(target: str) -> bool:
    return within(target, *CONCRETE_BACKENDS, *ADAPTERS, *WIRING)


def pipeline_imports_no_concrete_backend() -> Iterator[Violation]:
    """Rule 2: the pipeline knows Protocols, never a backend, an adapter or the wiring."""
    for imp in all_imports():
        if within(imp.importer.name, "gateway.pipeline") and _pipeline_forbidden(imp.target):
            yield (
                (imp.importer.name, imp.target),
                f"{imp} - the pipeline imports Protocols, never a concrete backend, "
                "an adapter or the app/server",
            )


def backends_are_chosen_in_the_app_factory() -> Iterator[Violation]:
    """Rule 3: only the app factory and the storage registry name a concrete backend."""
    for imp in all_imports():
        backend = next((b for b in CONCRETE_BACKENDS if within(imp.target, b)), None)
        if backend is None:
            continue
        importer = imp.importer.name
        if (
            within(importer, *BACKEND_CHOOSERS)
            or within(importer, backend)
            or (importer, backend) in COMPOSED_BACKENDS
        ):
            continue
        yield (
            (importer, imp.target),
            f"{imp} - concrete backends are picked by {' / '.join(BACKEND_CHOOSERS)} only",
        )


def storage_backends_are_chosen_in_the_registry() -> Iterator[Violation]:
    """Rule 3b: a concrete storage backend is imported only by the registry and its own package.

    Not even the app factory names one: it opens its store through the registry,
    as the CLI does, so the two cannot pick differently. Shared rules and row
    types live beside the Protocols, and a backend imports no other backend.
    """
    for imp in all_imports():
        backend = next((b for b in STORAGE_BACKENDS if within(imp.target, b)), None)
        if backend is None:
            continue
        importer = imp.importer.name
        if importer == STORAGE_REGISTRY or within(importer, backend):
            continue
        yield (
            (importer, imp.target),
            f"{imp} - a storage backend is imported only by {STORAGE_REGISTRY} and its own package",
        )


def backends_import_no_upper_layer() -> Iterator[Violation]:
    """Rule 4: storage and limiter code imports no pipeline, proxy, adapter or wiring."""
    upper = ("gateway.pipeline", "gateway.proxy", *ADAPTERS, *WIRING)
    for imp in all_imports():
        if within(imp.importer.name, "gateway.storage", "gateway.limiter") and within(
            imp.target, *upper
        ):
            yield (
                (imp.importer.name, imp.target),
                f"{imp} - a backend imports no pipeline, proxy, admin, console, cli, app "
                "or server code",
            )


def adapters_never_import_each_other() -> Iterator[Violation]:
    """Rule 5: admin, console and cli sit side by side over the management service."""
    for imp in all_imports():
        mine = next((a for a in ADAPTERS if within(imp.importer.name, a)), None)
        theirs = next((a for a in ADAPTERS if within(imp.target, a)), None)
        if mine and theirs and mine != theirs:
            yield (
                (imp.importer.name, imp.target),
                f"{imp} - adapters ({', '.join(ADAPTERS)}) never import each other",
            )


def _has_error_key(node: ast.AST) -> bool:
    return isinstance(node, ast.Dict) and any(
        isinstance(k, ast.Constant) and k.value == "error" for k in node.keys
    )


def _callee(call: ast.Call) -> str:
    func = call.func
    return func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")


def error_bodies_only_in_errors() -> Iterator[Violation]:
    """Rule 6: one module renders every error body of the contract.

    Outside gateway.errors: no aiohttp ``web.json_response`` (a second JSON
    encoder for responses), and no dict literal with an ``"error"`` key handed,
    at any depth, to a response builder (``json_response``, ``Response``,
    ``StreamResponse``, ``dumps``). A body built in a variable first and passed
    later is not seen; readiness reports that carry an ``"error"`` field about
    a dependency are not error bodies and are not flagged.
    """
    for name, module in modules().items():
        if name == ERROR_RENDERER or name in NOT_THE_CONTRACT:
            continue
        for node in ast.walk(module.tree):
            where = f"{module.where}:{getattr(node, 'lineno', 0)}: {name}"
            if (
                isinstance(node, ast.ImportFrom)
                and node.module in ("aiohttp", "aiohttp.web")
                and any(a.name == "json_response" for a in node.names)
            ):
                yield (
                    (name, "aiohttp.web.json_response"),
                    (f"{where} imports aiohttp's json_response - use gateway.errors"),
                )
            if not isinstance(node, ast.Call):
                continue
            func = node.func
            if (
                isinstance(func, ast.Attribute)
                and func.attr == "json_response"
                and (
                    (isinstance(func.value, ast.Name) and func.value.id == "web")
                    or (isinstance(func.value, ast.Attribute) and func.value.attr == "web")
                )
            ):
                yield (
                    (name, "aiohttp.web.json_response"),
                    (f"{where} calls web.json_response - responses go through gateway.errors"),
                )
            if _callee(node) in RESPONSE_BUILDERS:
                arguments = [*node.args, *(k.value for k in node.keywords)]
                if any(_has_error_key(n) for a in arguments for n in ast.walk(a)):
                    yield (
                        (name, f'{{"error": ...}} -> {_callee(node)}'),
                        (
                            f'{where} builds an {{"error": ...}} body for {_callee(node)}() - '
                            "render it with a function of gateway.errors"
                        ),
                    )


AUDIT_AUTHOR = "gateway.manage.audit"
AUDIT_WRITERS = frozenset({"gateway.storage.sqlite.core", "gateway.storage.postgresql.core"})


def audit_entries_only_from_the_service() -> Iterator[Violation]:
    """Rule 8: the management service says every audit entry; the store only writes it.

    Only gateway.manage.audit builds an ``AuditRecord``, and only each backend's
    core holds the statement that inserts one (inside the change's transaction).
    """
    for name, module in modules().items():
        for node in ast.walk(module.tree):
            where = f"{module.where}:{getattr(node, 'lineno', 0)}: {name}"
            if (
                isinstance(node, ast.Call)
                and _callee(node) == "AuditRecord"
                and name != AUDIT_AUTHOR
            ):
                yield (name, "AuditRecord"), f"{where} builds an audit entry - use {AUDIT_AUTHOR}"
            if (
                isinstance(node, ast.Constant)
                and isinstance(node.value, str)
                and "INSERT INTO audit_log" in node.value
                and name not in AUDIT_WRITERS
            ):
                yield (name, "INSERT INTO audit_log"), f"{where} writes the audit log by hand"


def events_only_through_one_writer() -> Iterator[Violation]:
    """Rule 9: an event row is inserted by one function per backend (``insert_event`` in
    its core), always inside the caller's transaction; the balance triggers are SQL."""
    for name, module in modules().items():
        for node in ast.walk(module.tree):
            if (
                isinstance(node, ast.Constant)
                and isinstance(node.value, str)
                and "INSERT INTO events" in node.value
                and name not in AUDIT_WRITERS
            ):
                where = f"{module.where}:{getattr(node, 'lineno', 0)}: {name}"
                yield (name, "INSERT INTO events"), f"{where} writes events by hand"


RULES: dict[str, Callable[[], Iterator[Violation]]] = {
    "1-leaves": leaves_import_nothing_of_ours,
    "2-pipeline-protocols-only": pipeline_imports_no_concrete_backend,
    "3-backends-chosen-in-app": backends_are_chosen_in_the_app_factory,
    "3b-storage-backends-chosen-in-registry": storage_backends_are_chosen_in_the_registry,
    "4-backends-below-everything": backends_import_no_upper_layer,
    "5-adapters-apart": adapters_never_import_each_other,
    "6-one-error-renderer": error_bodies_only_in_errors,
    "8-one-audit-author": audit_entries_only_from_the_service,
    "9-one-event-writer": events_only_through_one_writer,
}

# Violations known today: rule -> {(importer, target): why it is still there}. None are left;
# a violation that cannot be mended at once is listed here with its reason, and test_rule
# fails as soon as it is mended so that the entry is deleted.
KNOWN: dict[str, dict[tuple[str, str], str]] = {}


def _found(rule: str) -> dict[tuple[str, str], list[str]]:
    found: dict[tuple[str, str], list[str]] = {}
    for key, message in RULES[rule]():
        found.setdefault(key, []).append(message)
    return found


@pytest.mark.parametrize("rule", sorted(RULES))
def test_rule(rule: str) -> None:
    """No violation beyond the known ones, and no known one that is already fixed."""
    found = _found(rule)
    known = KNOWN.get(rule, {})
    new = [m for key, messages in sorted(found.items()) if key not in known for m in messages]
    fixed = [f"{a} -> {b}" for a, b in sorted(set(known) - set(found))]
    assert not new, f"rule {rule} broken:\n  " + "\n  ".join(new)
    assert not fixed, f"rule {rule}: fixed, now delete from KNOWN:\n  " + "\n  ".join(fixed)


# --- rule 7: the pipeline package reads in screens ------------------------------------


def _pipeline_modules() -> list[Module]:
    assert (GATEWAY / "pipeline" / "__init__.py").exists(), "gateway/pipeline/ is a package"
    assert not (GATEWAY / "pipeline.py").exists(), "no gateway/pipeline.py beside the package"
    return [m for name, m in modules().items() if within(name, "gateway.pipeline")]


def test_pipeline_modules_are_at_most_300_lines() -> None:
    too_long = [
        f"{m.where}: {m.name} has {n} lines (at most {MAX_PIPELINE_MODULE_LINES})"
        for m in _pipeline_modules()
        if (n := len(m.path.read_text().splitlines())) > MAX_PIPELINE_MODULE_LINES
    ]
    assert not too_long, "\n".join(too_long)


def test_pipeline_functions_are_at_most_60_lines() -> None:
    too_long = []
    for m in _pipeline_modules():
        for node in ast.walk(m.tree):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                n = (node.end_lineno or node.lineno) - node.lineno + 1
                if n > MAX_PIPELINE_FUNCTION_LINES:
                    too_long.append(
                        f"{m.where}:{node.lineno}: {m.name}.{node.name} has {n} lines "
                        f"(at most {MAX_PIPELINE_FUNCTION_LINES})"
                    )
    assert not too_long, "\n".join(too_long)


# --- the reader itself -----------------------------------------------------------------


def test_the_reader_finds_every_kind_of_import(tmp_path: Path) -> None:
    package = tmp_path / "gateway" / "pipeline"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text(
        "from typing import TYPE_CHECKING\n"
        "from . import auth\n"
        "from .. import errors\n"
        "from ..storage import Ledger\n"
        "if TYPE_CHECKING:\n"
        "    from gateway.limiter.memory import MemoryLimiter\n"
        "def later() -> None:\n"
        "    import gateway.cli\n"
        "    importlib.import_module('gateway.app')\n"
    )
    (package / "auth.py").write_text("from .limits import x\n")
    init = read_module(package / "__init__.py", tmp_path)
    auth = read_module(package / "auth.py", tmp_path)
    known = frozenset({"gateway.pipeline.auth", "gateway.errors", "gateway.storage"})
    assert (init.name, init.is_package, auth.name) == (
        "gateway.pipeline",
        True,
        "gateway.pipeline.auth",
    )
    found = {(i.target, i.names, i.typing_only) for i in imports_in(init, known)}
    assert found == {
        ("typing", ("TYPE_CHECKING",), False),
        ("gateway.pipeline.auth", (), False),
        ("gateway.errors", (), False),
        ("gateway.storage", ("Ledger",), False),
        ("gateway.limiter.memory", ("MemoryLimiter",), True),
        ("gateway.cli", (), False),
        ("gateway.app", (), False),
    }
    assert [i.target for i in imports_in(auth, known)] == ["gateway.pipeline.limits"]


def test_the_reader_sees_the_app_factory_pick_backends() -> None:
    targets = {i.target for i in imports_in(modules()["gateway.app"])}
    assert {"gateway.storage.registry", "gateway.limiter.memory"} <= targets
    assert "Backend" in protocols()["gateway.storage"]


def test_the_reader_sees_the_registry_pick_storage_backends() -> None:
    """Rule 3b is not vacuous: the registry's imports of both packages are seen, and allowed."""
    targets = {i.target for i in imports_in(modules()[STORAGE_REGISTRY])}
    assert {"gateway.storage.sqlite", "gateway.storage.postgresql"} <= targets
    assert {"gateway.storage.sqlite.core", "gateway.storage.postgresql.core"} <= set(modules())
