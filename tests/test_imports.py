"""The package's import graph, read with `ast` (every import, function-local ones too): no circles, the server
never imports the layers above it (the web UI, training, evaluation), evaluation never imports the server and
export never imports evaluation (both answer prompts through tunesmith/inference, below them)."""

from __future__ import annotations

import ast
from pathlib import Path

from tests.conftest import ROOT

NEVER = (("serve", "ui"), ("serve", "train"), ("serve", "evaluate"), ("evaluate", "serve"), ("export", "evaluate"))


def import_graph(package: Path) -> dict[str, set[str]]:
    """module -> the package's modules it imports (a name imported from a package counts as that package
    unless it is a module of its own)."""
    root = package.name
    modules: dict[str, Path] = {}
    for path in package.rglob("*.py"):
        parts = path.relative_to(package.parent).with_suffix("").parts
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path

    def resolve(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        here = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(here[:len(here) - node.level + 1] + ([base] if base else []))
                targets = [base, *(f"{base}.{alias.name}" for alias in node.names)]
            else:
                continue
            for target in targets:
                if target == root or target.startswith(root + "."):
                    found = resolve(target)
                    # A module importing its own package (`from tunesmith.serve import x` inside serve) is no arrow.
                    if found and found != name and not name.startswith(found + "."):
                        graph[name].add(found)
    return graph


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def forbidden(graph: dict[str, set[str]], root: str, never: tuple[tuple[str, str], ...]) -> list[str]:
    """Arrows from a module under `root.a` to one under `root.b`, for each (a, b) in `never`."""

    def under(module: str, part: str) -> bool:
        return module == f"{root}.{part}" or module.startswith(f"{root}.{part}.")

    return sorted(f"{m} -> {t}" for a, b in never for m, targets in graph.items() if under(m, a)
                  for t in targets if under(t, b))


def test_tunesmith_has_no_import_circle_and_no_forbidden_arrow():
    graph = import_graph(ROOT / "tunesmith")
    assert "tunesmith.serve.handlers" in graph and graph["tunesmith.app"] >= {"tunesmith.ui", "tunesmith.serve.routes"}
    assert circles(graph) == []
    assert forbidden(graph, "tunesmith", NEVER) == []


def _write(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root / "fake"


def test_the_checks_find_a_circle_and_a_forbidden_arrow(tmp_path):
    package = _write(tmp_path, {
        "fake/__init__.py": "",
        "fake/a.py": "from fake import b\n",
        "fake/b.py": "def late():\n    from . import c\n",  # function-local and relative: still an arrow
        "fake/c.py": "import fake.a\n",
        "fake/serve/__init__.py": "",
        "fake/serve/app.py": "from fake.ui.routes import install\nfrom fake.server import x\n",
        "fake/server.py": "x = 1\n",  # `server` is not under `serve`
        "fake/ui/__init__.py": "",
        "fake/ui/routes.py": "from fake.serve.app import create\n",
        "fake/evaluate/__init__.py": "",
        "fake/evaluate/run.py": "def answers():\n    from fake.serve.engine import open_llama\n",
        "fake/serve/engine.py": "",
        "fake/export.py": "from fake.evaluate.run import answers\n",
        "fake/inference.py": "from fake.serve import engine\n",  # below evaluate and export: no rule for it
    })
    graph = import_graph(package)
    assert graph["fake.b"] == {"fake.c"}
    assert circles(graph) == [["fake.a", "fake.b", "fake.c"], ["fake.serve.app", "fake.ui.routes"]]
    assert forbidden(graph, "fake", NEVER) == ["fake.evaluate.run -> fake.serve.engine",
                                               "fake.export -> fake.evaluate.run", "fake.serve.app -> fake.ui.routes"]


def test_a_package_without_circles_passes(tmp_path):
    package = _write(tmp_path, {"fake/__init__.py": "", "fake/a.py": "from fake import b\n", "fake/b.py": "",
                                "fake/ui.py": "from fake.serve import app\n", "fake/serve/__init__.py": "",
                                "fake/serve/app.py": "from fake import a\n"})
    graph = import_graph(package)
    assert circles(graph) == [] and forbidden(graph, "fake", NEVER) == []
    assert graph["fake.ui"] == {"fake.serve", "fake.serve.app"}  # importing from a package runs its __init__
