"""The package's shape, read from its source with ``ast``: the layers docs/layout.md draws
are the ones the imports follow.

- no import cycles (imports inside functions included);
- each subpackage imports only its own layer's packages or lower ones;
- ``serve/`` and the bundle loader reach no training, method or engine code, even indirectly;
- no import inside a function except an optional heavy dependency, with a comment saying so;
- no file over 400 lines, no function over 60 lines of code (docstring aside).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "cascade"

#: the dependency order, lowest first; packages of one rank may import each other (acyclically)
LAYERS = {
    "core": 0, "contracts": 1, "nn": 2, "config": 2, "evaluation": 2, "runs": 2, "report": 3, "training": 4,
    "methods": 5, "engine": 6, "deploy": 7, "serve": 8, "cli": 9, "__main__": 10,
}
#: what deployment loads: a bundle and its server need none of the training side
DEPLOY_SIDE = ["cascade.serve", "cascade.deploy.bundle", "cascade.deploy.manifest", "cascade.deploy.pt2",
               "cascade.deploy.inputs"]
TRAINING_SIDE = ("cascade.training", "cascade.methods", "cascade.engine")
#: optional or heavy third-party modules that may be imported where they are needed
LAZY_OK = ("fastapi", "uvicorn", "onnx", "onnxruntime", "onnxscript", "matplotlib", "tensorboard", "scipy", "PIL",
           "torchvision",
           "torch.utils.tensorboard", "pyarrow", "schemathesis",
           "cascade.serve")  # the web stack (fastapi, uvicorn, httpx, prometheus_client): only `cascade serve` loads it
MAX_FILE_LINES = 400
MAX_FUNCTION_LINES = 60


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imported_modules(name: str, node: ast.Import | ast.ImportFrom) -> list[str]:
    """The cascade modules one import statement loads (``from pkg import mod`` names ``pkg.mod``)."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    base = node.module or ""
    if node.level:
        package = name if MODULES[name].name == "__init__.py" else name.rsplit(".", 1)[0]
        package = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1])
        base = f"{package}.{base}" if base else package
    out = [base]
    out += [f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in MODULES]
    return out


def import_graph() -> dict[str, set[str]]:
    """Module -> the cascade modules it imports, anywhere in it; importing ``a.b.c`` from outside
    ``a.b`` also runs ``a.b``'s ``__init__``."""
    graph: dict[str, set[str]] = {}
    for name, path in MODULES.items():
        edges: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                for target in imported_modules(name, node):
                    parts = target.split(".")
                    for i in range(1, len(parts) + 1):
                        candidate = ".".join(parts[:i])
                        inside = name == candidate or name.startswith(candidate + ".")
                        if candidate in MODULES and not inside:
                            edges.add(candidate)
        graph[name] = edges - {name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def layer(name: str) -> int | None:
    parts = name.split(".")
    return LAYERS.get(parts[1]) if len(parts) > 1 else None


def test_the_graph_reader_knows_a_cycle_and_its_absence():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set(), "c": {"a", "b"}}) == []
    assert "cascade.deploy.bundle" in import_graph()["cascade.serve.app"]


def test_no_import_cycles():
    assert cycles(import_graph()) == []


def test_every_subpackage_has_a_layer():
    assert {name.split(".")[1] for name in MODULES if name != "cascade"} <= set(LAYERS)


def test_imports_follow_the_layer_order():
    wrong = [f"{a} -> {b}" for a, edges in import_graph().items() for b in edges
             if layer(a) is not None and layer(b) is not None and layer(b) > layer(a)]
    assert wrong == []


def test_package_modules_do_not_import_the_top_level_package():
    graph = import_graph()
    assert [name for name, edges in graph.items() if "cascade" in edges] == []


def test_serving_a_bundle_reaches_no_training_code():
    graph = import_graph()
    starts = [m for m in MODULES if any(m == s or m.startswith(s + ".") for s in DEPLOY_SIDE)]
    seen, todo = set(starts), list(starts)
    while todo:
        for w in graph[todo.pop()]:
            if w not in seen:
                seen.add(w)
                todo.append(w)
    assert sorted(m for m in seen if m.startswith(TRAINING_SIDE)) == []


def function_level_imports(path: Path) -> list[tuple[int, str, bool]]:
    """(line, module, whether a comment is on that line or the four above) of each import inside a function."""
    lines = path.read_text().splitlines()
    found = []
    for fn in ast.walk(ast.parse(path.read_text())):
        if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for node in ast.walk(fn):
                if isinstance(node, (ast.Import, ast.ImportFrom)):
                    mod = node.names[0].name if isinstance(node, ast.Import) else (node.module or "")
                    near = "\n".join(lines[max(0, node.lineno - 5):node.lineno])
                    found.append((node.lineno, mod, "#" in near))
    return found


def test_imports_inside_functions_are_optional_heavy_dependencies_with_a_comment():
    wrong = []
    for name, path in MODULES.items():
        for line, mod, commented in function_level_imports(path):
            lazy = any(mod == ok or mod.startswith(ok + ".") for ok in LAZY_OK)
            if not lazy or not commented:
                wrong.append(f"{path.relative_to(PACKAGE.parent)}:{line} {mod}")
    assert sorted(set(wrong)) == []


def code_lines(fn: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    body = fn.body
    if isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) and isinstance(body[0].value.value, str):
        body = body[1:]
    return body[-1].end_lineno - body[0].lineno + 1 if body else 0


@pytest.mark.parametrize("name", sorted(MODULES))
def test_files_and_functions_are_short(name):
    path = MODULES[name]
    lines = len(path.read_text().splitlines())
    assert lines <= MAX_FILE_LINES, f"{lines} lines"
    long = [f"{fn.name} ({code_lines(fn)} lines)" for fn in ast.walk(ast.parse(path.read_text()))
            if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)) and code_lines(fn) > MAX_FUNCTION_LINES]
    assert long == []
