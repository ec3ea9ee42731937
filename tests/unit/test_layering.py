"""Nothing outside `extensions/` reaches a concrete adapter: the service talks to
extensions only through the SDK (protocols, registry, manifests), so a third-party
extension is used, and validated, exactly like a shipped one."""

from __future__ import annotations

import ast
from pathlib import Path

from tests.paths import ROOT

CHECKED = ("sandboxer", "events", "projections", "bench")
# What the rest of the code base may import from the extensions package.
SDK_MODULES = {"extensions", "extensions.sdk", "extensions.registry", "extensions.manifest"}
EXTENSION_MODULES = {f"extensions.{p.stem}" for p in (ROOT / "extensions").glob("*.py")} - {
    "extensions.__init__"
}


def _imports(tree: ast.AST) -> list[tuple[int, str]]:
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.lineno, node.module))
            # `from extensions import compose_ssh` imports the module too
            found += [(node.lineno, f"{node.module}.{alias.name}") for alias in node.names]
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            # importlib.import_module("extensions.compose_ssh") and the like
            if node.value in EXTENSION_MODULES:
                found.append((node.lineno, node.value))
    return found


def _concrete(tree: ast.AST) -> list[tuple[int, str]]:
    return [
        (line, name)
        for line, name in _imports(tree)
        if name in EXTENSION_MODULES and name not in SDK_MODULES
    ]


def concrete_imports(folders: tuple[str, ...] = CHECKED) -> list[str]:
    bad: list[str] = []
    for folder in folders:
        for path in sorted((ROOT / folder).rglob("*.py")):
            tree = ast.parse(path.read_text(), filename=str(path))
            bad += [f"{path.relative_to(ROOT)}:{n} imports {name}" for n, name in _concrete(tree)]
    return bad


def test_the_checker_sees_every_form_of_import() -> None:
    source = (
        "import extensions.compose_ssh\n"
        "from extensions.vm_packer import parse_vms\n"
        "from extensions import saas_stub\n"
        "from extensions.ssh import SSHPool\n"
        "import importlib\n"
        "importlib.import_module('extensions.hosts')\n"
        "from extensions import ExtensionRegistry, StepContext\n"
        "from extensions.sdk import Commanding\n"
    )
    assert [line for line, _ in _concrete(ast.parse(source))] == [1, 2, 3, 4, 6]


def test_no_module_outside_extensions_imports_a_concrete_adapter() -> None:
    assert {"extensions.compose_ssh", "extensions.vm_packer"} <= EXTENSION_MODULES
    assert concrete_imports() == []


# A subject (or filter) written out: `sandboxer.<kind>...`, the whole stream, the
# workers' control subjects. Only events/subjects.py spells these.
SUBJECT_KINDS = ("sandbox", "ledger", "validation", "webhook", "reconcile", "deadletter")
SUBJECT_MODULES = {ROOT / "events" / "subjects.py"}


def _spelled_subjects(tree: ast.AST) -> list[tuple[int, str]]:
    found = []
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Constant) and isinstance(node.value, str)):
            continue
        text = node.value
        if text == "sandboxer.>" or text.startswith("sbxctl"):
            found.append((node.lineno, text))
        elif any(text.startswith(f"sandboxer.{kind}.") for kind in SUBJECT_KINDS):
            found.append((node.lineno, text))
    return found


def test_subjects_are_spelled_in_one_module() -> None:
    spelled = []
    for folder in ("sandboxer", "events", "projections", "extensions"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            if path in SUBJECT_MODULES:
                continue
            tree = ast.parse(path.read_text(), str(path))
            # docstrings name subjects in prose; only code counts
            docs = {
                id(n.body[0].value)
                for n in ast.walk(tree)
                if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
                and n.body
                and isinstance(n.body[0], ast.Expr)
                and isinstance(n.body[0].value, ast.Constant)
            }
            spelled += [
                f"{path.relative_to(ROOT)}:{line}: {text!r}"
                for line, text in _spelled_subjects(tree)
                if not any(
                    id(c) in docs
                    for c in ast.walk(tree)
                    if isinstance(c, ast.Constant) and c.lineno == line and c.value == text
                )
            ]
    assert spelled == []


def test_the_subject_check_sees_a_spelled_subject() -> None:
    tree = ast.parse('x = "sandboxer.ledger." + account\ny = f"sandboxer.sandbox.{i}.>"')
    assert [line for line, _ in _spelled_subjects(tree)] == [1, 2]


def _import_graph() -> dict[str, set[str]]:
    modules: dict[str, Path] = {}
    for package in ("sandboxer", "events", "extensions", "projections", "profiles"):
        for path in (ROOT / package).rglob("*.py"):
            name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
            modules[name.removesuffix(".__init__")] = path
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        for _, imported in _imports(ast.parse(path.read_text(), str(path))):
            if imported in modules and imported != name:
                graph[name].add(imported)
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[set[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[set[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for nxt in graph[node]:
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = set()
            while True:
                member = stack.pop()
                component.add(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(component)

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_no_import_cycles() -> None:
    assert _cycles(_import_graph()) == []


def test_the_cycle_check_sees_a_cycle() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert _cycles(graph) == [{"a", "b", "c"}]


def test_projections_and_events_depend_on_events_alone() -> None:
    """The folds (projections/) and the event contract (events/) import nothing of the
    service: a validator or a replay tool can use them without it."""
    graph = _import_graph()
    outside = {
        f"{name} imports {imported}"
        for name, imports in graph.items()
        if name.startswith(("projections", "events"))
        for imported in imports
        if not imported.startswith(("projections", "events"))
    }
    assert outside == set()
