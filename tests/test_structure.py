"""The package's shape: its imports form no cycle, and the method path (the modules that hold
docs/method.md's equations) imports nothing from the fast engine."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "lr_tutorial"

# The modules a reader follows through the method; lr_tutorial/fast/ holds the speed work.
METHOD_MODULES = ("config", "sampling", "attention", "swap", "layout", "masks", "retouch",
                  "pipeline")
FAST = "lr_tutorial.fast"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path, modules: set[str]) -> set[str]:
    """The package modules `path` imports anywhere (at the top or inside a function)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([node.module] if node.module else []))
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                found.add(sub if sub in modules else base)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
    return {m for m in found if m in modules and m != name}


def import_graph() -> dict[str, set[str]]:
    files = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    return {name: imports(path, set(files)) for name, path in files.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle per strongly connected component of more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_the_package_imports_form_no_cycle():
    found = cycles(import_graph())
    assert not found, f"import cycles: {found}"


def test_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_the_method_path_imports_nothing_from_the_fast_engine():
    graph = import_graph()
    for name in METHOD_MODULES:
        assert f"lr_tutorial.{name}" in graph, name
        fast = sorted(m for m in graph[f"lr_tutorial.{name}"] if m.startswith(FAST))
        assert not fast, f"lr_tutorial/{name}.py imports {fast}"


def test_imports_are_found_at_the_top_and_inside_functions(tmp_path):
    pkg = tmp_path / "lr_tutorial"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from . import b\ndef f():\n    from .c import x\n")
    (pkg / "b.py").write_text("")
    (pkg / "c.py").write_text("x = 1\n")
    global ROOT
    saved, ROOT = ROOT, tmp_path
    try:
        assert imports(pkg / "a.py", {"lr_tutorial", "lr_tutorial.a", "lr_tutorial.b",
                                      "lr_tutorial.c"}) == {"lr_tutorial.b", "lr_tutorial.c"}
    finally:
        ROOT = saved
