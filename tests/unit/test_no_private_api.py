"""No private API of a dependency in the gateway or its plugins (issue 11, item 10).

A dependency's underscored names and internal modules change in any release, and no version
range protects against that (the 1.25 OTLP exporter the pins allow had none of the names an
earlier fast path read).  This test parses every module of ``inference_server/`` and
``plugins/*/src`` with :mod:`ast` (so comments and strings cannot fool it, and our own
underscored names stay allowed) and reports, with file and line:

* an import of an underscored module of a dependency, or of an underscored name from one
  (``from opentelemetry.exporter.otlp.proto.http._common import …``);
* ``x._name`` where ``x`` comes from a dependency: a name imported from one, a variable or
  attribute assigned from such an expression, or a parameter annotated with a dependency's type
  (``provider._active_span_processor``, ``child._sum``);
* ``self._name`` read in a subclass of a dependency's class when the subclass never assigns it
  (the base class's private state);
* ``x._name`` or ``getattr(x, "_name")`` where no module of ours defines ``_name`` at all: it
  can only be someone else's private name;
* ``x._name`` where ``x`` is a parameter typed ``Any`` or ``object`` or not at all (a private
  name of our own is read on a typed object of ours; ``child: Any`` is how a library's object
  slips past the rules above);
* an assignment to an attribute of a dependency's module or class (``values.ValueClass = …``:
  swapping a library's globals).
"""

from __future__ import annotations

import ast
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
#: Top-level packages of the gateway's and the plugins' runtime dependencies.
DEPENDENCIES = frozenset(
    {
        "aiohttp",
        "backoff",
        "dynaconf",
        "jinja2",
        "loguru",
        "marshmallow",
        "multidict",
        "opentelemetry",
        "orjson",
        "prometheus_client",
        "uvloop",
        "yarl",
    }
)
#: Underscored names that are public API (namedtuple's methods and fields).
PUBLIC_UNDERSCORED = frozenset({"_replace", "_asdict", "_fields", "_make", "_field_defaults"})
_ACCESSORS = frozenset({"getattr", "setattr", "hasattr", "delattr"})


def is_private(name: str) -> bool:
    """``_x`` but not a dunder and not namedtuple's public ``_replace`` & co."""
    dunder = name.startswith("__") and name.endswith("__")
    return name.startswith("_") and not dunder and name not in PUBLIC_UNDERSCORED


def sources() -> list[Path]:
    roots = [ROOT / "inference_server", *sorted((ROOT / "plugins").glob("*/src"))]
    return sorted(p for root in roots for p in root.rglob("*.py"))


def chain(node: ast.expr) -> str | None:
    """``a.b.c`` for a Name/Attribute chain (calls and subscripts keep their receiver's chain:
    ``a.b(…).c`` → ``a.b.c``), None when it does not start at a name."""
    parts: list[str] = []
    while True:
        if isinstance(node, ast.Attribute):
            parts.append(node.attr)
            node = node.value
        elif isinstance(node, ast.Call | ast.Subscript | ast.Await):
            node = node.func if isinstance(node, ast.Call) else node.value
        elif isinstance(node, ast.Name):
            parts.append(node.id)
            return ".".join(reversed(parts))
        else:
            return None


def prefixes(dotted: str) -> Iterator[str]:
    """``a``, ``a.b``, ``a.b.c`` for ``a.b.c``."""
    parts = dotted.split(".")
    for i in range(1, len(parts) + 1):
        yield ".".join(parts[:i])


def defined_names(trees: Iterable[ast.AST]) -> set[str]:
    """Every name our own code defines: functions, classes, variables, attributes it assigns,
    parameters, ``__slots__`` entries and import aliases it chooses."""
    names: set[str] = set()
    for tree in trees:
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                names.add(node.name)
            elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
                names.add(node.id)
            elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
                names.add(node.attr)
            elif isinstance(node, ast.arg):
                names.add(node.arg)
            elif isinstance(node, ast.alias) and node.asname:
                names.add(node.asname)
            elif isinstance(node, ast.Assign) and any(
                isinstance(t, ast.Name) and t.id == "__slots__" for t in node.targets
            ):
                for const in ast.walk(node.value):
                    if isinstance(const, ast.Constant) and isinstance(const.value, str):
                        names.add(const.value)
    return names


@dataclass
class Module:
    """One parsed module and what it knows about where its names come from."""

    path: str
    tree: ast.Module
    #: Names bound by importing a dependency (modules, classes, functions).
    imported: set[str] = field(default_factory=set)
    #: Dotted names holding values that come from a dependency (see the module docstring).
    tainted: set[str] = field(default_factory=set)

    def from_dependency(self, node: ast.expr) -> bool:
        dotted = chain(node)
        return dotted is not None and any(p in self.tainted for p in prefixes(dotted))


def _dependency(module: str | None) -> bool:
    return module is not None and module.split(".")[0] in DEPENDENCIES


def analyse(path: str, source: str, ours: set[str]) -> list[str]:
    """The private-API uses in one module, as ``path:line: what``."""
    tree = ast.parse(source, path)
    mod = Module(path, tree)
    problems: list[str] = []

    def report(node: ast.AST, what: str) -> None:
        problems.append(f"{path}:{getattr(node, 'lineno', 0)}: {what}")

    # 1. imports
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if _dependency(alias.name):
                    if any(is_private(part) for part in alias.name.split(".")):
                        report(node, f"imports the private module {alias.name}")
                    mod.imported.add(alias.asname or alias.name.split(".")[0])
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and _dependency(node.module):
            assert node.module is not None
            if any(is_private(part) for part in node.module.split(".")):
                report(node, f"imports from the private module {node.module}")
            for alias in node.names:
                if is_private(alias.name):
                    report(node, f"imports the private name {node.module}.{alias.name}")
                mod.imported.add(alias.asname or alias.name)
    mod.tainted |= mod.imported
    untyped = {
        a.arg
        for a in ast.walk(tree)
        if isinstance(a, ast.arg)
        and a.arg not in ("self", "cls")
        and (a.annotation is None or chain(a.annotation) in ("Any", "typing.Any", "object"))
    }

    # 2. what flows from a dependency: assignments and annotated parameters (to a fixpoint)
    changed = True
    while changed:
        changed = False
        for node in ast.walk(tree):
            targets: list[ast.expr] = []
            value: ast.expr | None = None
            if isinstance(node, ast.Assign):
                targets, value = node.targets, node.value
            elif isinstance(node, ast.AnnAssign):
                targets = [node.target]
                value = node.value if node.value is not None else node.annotation
            elif isinstance(node, ast.NamedExpr):
                targets, value = [node.target], node.value
            elif isinstance(node, ast.withitem) and node.optional_vars is not None:
                targets, value = [node.optional_vars], node.context_expr
            elif isinstance(node, ast.arg) and node.annotation is not None:
                if mod.from_dependency(node.annotation) and node.arg not in mod.tainted:
                    mod.tainted.add(node.arg)
                    changed = True
                continue
            if value is None or not mod.from_dependency(value):
                continue
            for target in targets:
                dotted = chain(target)
                if dotted is not None and dotted not in mod.tainted:
                    mod.tainted.add(dotted)
                    changed = True

    # 3. private attributes on a dependency's objects; monkeypatching its modules and classes
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute):
            if isinstance(node.ctx, ast.Store):
                root = chain(node.value)
                if root is not None and root.split(".")[0] in mod.imported:
                    report(node, f"assigns {root}.{node.attr} (a dependency's global)")
                continue
            if not is_private(node.attr):
                continue
            if mod.from_dependency(node.value):
                report(node, f"reads {chain(node.value)}.{node.attr} (a dependency's private)")
            elif node.attr not in ours:
                report(node, f"reads .{node.attr}, which none of our modules defines")
            elif isinstance(node.value, ast.Name) and node.value.id in untyped:
                report(node, f"reads {node.value.id}.{node.attr} on an untyped parameter")
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Name)
            and node.func.id in _ACCESSORS
            and len(node.args) >= 2
            and isinstance(node.args[1], ast.Constant)
            and isinstance(node.args[1].value, str)
            and is_private(node.args[1].value)
        ):
            name = node.args[1].value
            if name not in ours or mod.from_dependency(node.args[0]):
                report(node, f"{node.func.id}(…, {name!r}) on someone else's object")

    # 4. subclasses of a dependency's class reading the base class's private state
    for cls in ast.walk(tree):
        if not isinstance(cls, ast.ClassDef):
            continue
        if not any(mod.from_dependency(base) for base in cls.bases):
            continue
        own = {n.name for n in ast.walk(cls) if isinstance(n, ast.FunctionDef)}
        own |= {
            n.attr
            for n in ast.walk(cls)
            if isinstance(n, ast.Attribute)
            and isinstance(n.ctx, ast.Store)
            and isinstance(n.value, ast.Name)
            and n.value.id == "self"
        }
        own |= {
            n.id for n in ast.walk(cls) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store)
        }
        for n in ast.walk(cls):
            if (
                isinstance(n, ast.Attribute)
                and isinstance(n.ctx, ast.Load)
                and isinstance(n.value, ast.Name)
                and n.value.id == "self"
                and is_private(n.attr)
                and n.attr not in own
            ):
                report(n, f"{cls.name} reads self.{n.attr}, private state of its base class")
    return problems


def test_no_private_api_of_dependencies() -> None:
    files = sources()
    assert any(p.name == "metrics.py" for p in files), "the scan found no sources"
    texts = {p: p.read_text() for p in files}
    ours = defined_names(ast.parse(t) for t in texts.values())
    problems = [
        problem
        for p, text in texts.items()
        for problem in analyse(str(p.relative_to(ROOT)), text, ours)
    ]
    assert problems == [], "private API of a dependency:\n" + "\n".join(problems)


# --- the checker itself: each rule fires, and our own names, comments and strings do not ---

OURS = {"_ours", "_state"}


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("from opentelemetry.exporter.otlp.proto.http._common import x", "private module"),
        ("import prometheus_client._internal", "private module"),
        ("from prometheus_client import _private_thing", "private name"),
        ("from opentelemetry.sdk.trace import TracerProvider\n"
         "p = TracerProvider()\n"
         "f = p._active_span_processor.on_end", "p._active_span_processor"),
        ("from opentelemetry.sdk.trace import TracerProvider\n"
         "class T:\n"
         "    def __init__(self) -> None:\n"
         "        self.provider = TracerProvider()\n"
         "    def f(self) -> None:\n"
         "        self.provider._ours.on_end()", "self.provider._ours"),
        ("from prometheus_client import Histogram\n"
         "def w(child: Histogram) -> None:\n"
         "    child._ours.inc(1)", "child._ours"),
        ("from prometheus_client import values\nvalues.ValueClass = object", "a dependency's global"),
        ("from typing import Any\ndef w(child: Any) -> None:\n    child._ours.inc(1)", "untyped"),
        ("def f(x: object) -> object:\n    return x._dq", "none of our modules"),
        ("def f(x: object) -> object:\n    return getattr(x, '_dq', None)", "getattr"),
        ("from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter\n"
         "class E(OTLPSpanExporter):\n"
         "    def export(self) -> None:\n"
         "        if self._ours:\n"
         "            return", "private state of its base class"),
    ],
)  # fmt: skip
def test_the_checker_finds(source: str, expected: str) -> None:
    problems = analyse("snippet.py", source, OURS)
    assert problems, source
    assert any(expected in p for p in problems), problems


@pytest.mark.parametrize(
    "source",
    [
        "# provider._active_span_processor and values.ValueClass = x in a comment\n",
        "TEXT = 'from prometheus_client import _private; x._dq'\n",
        "class A:\n"
        "    def __init__(self) -> None:\n"
        "        self._state = 1\n"
        "    def f(self, other: 'A') -> int:\n"
        "        return self._state + other._state + self._ours()\n"
        "    def _ours(self) -> int:\n"
        "        return 0\n",
        "from opentelemetry.sdk.trace import TracerProvider\n"
        "p = TracerProvider()\n"
        "f = p.add_span_processor\n",
        "from opentelemetry.sdk.trace.export import SpanExporter\n"
        "class E(SpanExporter):\n"
        "    def __init__(self) -> None:\n"
        "        self._state = 0\n"
        "    def export(self) -> int:\n"
        "        return self._state\n",
        "from collections import namedtuple\nP = namedtuple('P', 'a')\nq = P(1)._replace(a=2)\n",
    ],
)
def test_the_checker_allows(source: str) -> None:
    assert analyse("snippet.py", source, OURS) == []
