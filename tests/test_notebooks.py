"""The stored notebooks come from their sources in notebooks/src, are executed and stay small;
nbval re-executes them in `make test` (see the Makefile)."""
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NB = ROOT / "notebooks"
SOURCES = sorted((NB / "src").glob("[0-9][0-9]_*.py"))
BADGE = r"https://colab\.research\.google\.com/github/([^/\s)]+)/lr_tutorial/blob/main/notebooks/{}\.ipynb"


def _build():
    import sys
    sys.path.insert(0, str(NB))
    import build
    return build


def test_there_are_seven_notebooks():
    assert len(SOURCES) == 7


@pytest.mark.parametrize("src", SOURCES, ids=lambda p: p.stem)
def test_notebook_is_built_executed_small_with_badge_and_exercises(src):
    """Strict: fails until every notebook is built (python notebooks/build.py, after the final
    toy weights are in). Built from its current source, every code cell executed without an
    error, figures stored, under 1.5 MiB, the Colab badge first, one or more checked exercises
    (an exercise's stub says it is the learner's turn)."""
    import nbformat
    nb_path = NB / (src.stem + ".ipynb")
    assert nb_path.exists(), f"{nb_path.name} not built: python notebooks/build.py {src.stem[:2]}"
    assert _build().sources_match(nb_path, src), \
        f"{nb_path.name} is out of date: python notebooks/build.py {src.stem[:2]}"
    size = nb_path.stat().st_size
    assert size < 1.5 * 1024 * 1024, f"{nb_path.name} is {size / 2**20:.2f} MiB (limit 1.5)"
    nb = nbformat.read(nb_path, as_version=4)
    assert re.search(BADGE.format(re.escape(src.stem)), nb.cells[0].source), "badge not in the first cell"
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(c.execution_count is not None for c in code), "not executed top to bottom"
    errors = [o for c in code for o in c.outputs if o.output_type == "error"]
    assert not errors, f"error outputs: {[e.ename for e in errors]}"
    assert any("image/png" in o.get("data", {}) for c in code for o in c.outputs), "no figure"

    def text(c):
        return "".join(o.get("text", "") + o.get("data", {}).get("text/plain", "") for o in c.outputs)
    checked = [c for c in code if "exercises.check_" in c.source and "correct:" in text(c)
               or "exercises.attempt(" in c.source and re.search(r"^(your turn|correct): ", text(c), re.M)]
    assert len(checked) >= 1, f"{len(checked)} exercise checks ran in the stored outputs"


def _built_text(src) -> str:
    return "\n".join(c.source for c in _build().build(src).cells)


@pytest.mark.parametrize("src", SOURCES, ids=lambda p: p.stem)
def test_notebook_has_badge_goals_exercises_and_checks(src):
    text = _built_text(src)
    assert re.search(BADGE.format(re.escape(src.stem)), text) and "Learning goals" in text
    assert "Prerequisites" in text and ("pick_backend()" in text or "load_models(" in text)
    assert text.count("exercises.attempt(") >= 1  # a piece of the method, checked and plugged in
    assert "exercises.plugged(" in text
    assert "google.colab" in text  # the first cell installs the package in Colab


@pytest.mark.parametrize("src", SOURCES, ids=lambda p: p.stem)
def test_checked_outputs_are_stable(src):
    """nbval compares the outputs of cells marked NBVAL_CHECK_OUTPUT: each notebook has some,
    and none of them prints timings or progress bars."""
    cells = _build().parse(src.read_text())
    marked = [c.source for c in cells if c.cell_type == "code" and "# NBVAL_CHECK_OUTPUT" in c.source]
    assert marked, "no cell compares its output on re-execution"
    for s in marked:
        assert not re.search(r"time\.(time|perf_counter)\(|tqdm|progress=True", s), s[:200]


def test_readme_course_map_and_colab_links_match_the_notebooks():
    readme = (ROOT / "README.md").read_text()
    owners = set()
    for src in SOURCES:
        assert src.stem in readme, f"{src.stem} missing from the README's course map"
        m = re.search(BADGE.format(re.escape(src.stem)), _built_text(src))
        owners.add(m.group(1))
        assert m.group(0) in readme, f"README has no Colab link for {src.stem}"
    assert len(owners) == 1, f"notebooks use different GitHub owners: {owners}"
    assert "docs/scrubber.png" in readme


def _attempted(tree):
    """(function name, exercise name) of each exercises.attempt(fn[, name=...]) call."""
    import ast
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and \
                node.func.attr == "attempt" and node.args and isinstance(node.args[0], ast.Name):
            kw = {k.arg: k.value for k in node.keywords}
            name = kw["name"].value if isinstance(kw.get("name"), ast.Constant) else \
                (node.args[1].value if len(node.args) > 1 and isinstance(node.args[1], ast.Constant)
                 else node.args[0].id)
            yield node.args[0].id, name


def _is_stub(fn) -> bool:
    """A body of an optional docstring and `raise exercises.YourTurn(...)`, nothing else."""
    import ast
    body = [b for b in fn.body if not (isinstance(b, ast.Expr) and isinstance(b.value, ast.Constant))]
    return len(body) == 1 and isinstance(body[0], ast.Raise) and "YourTurn" in ast.unparse(body[0])


def exercise_cell_problems(code: str) -> list[str]:
    """Why an exercise cell would ship an answer or name no exercise: [] when it is fine."""
    import ast
    from lr_tutorial.exercises import EXERCISES
    tree = ast.parse(code)
    defs = {n.name: n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)}
    out = []
    if "# NBVAL_CHECK_OUTPUT" in code and "exercises.attempt(" in code:
        out.append("an exercise cell prints the learner's view when built and the solution's under "
                   "make test: do not mark it # NBVAL_CHECK_OUTPUT")
    for fn, name in _attempted(tree):
        if name not in EXERCISES:
            out.append(f"exercises.attempt({fn}): no exercise named {name!r} in exercises.EXERCISES")
        if fn not in defs:
            out.append(f"exercises.attempt({fn}): {fn} is not defined in the same cell")
        elif not _is_stub(defs[fn]):
            out.append(f"{fn} holds an answer: the cell ships the stub (raise exercises.YourTurn())")
    return out


def test_exercise_cell_rule_catches_an_answer_and_passes_a_stub():
    stub = "def latent_blend(z_t, z_c, m):\n    \"\"\"doc\"\"\"\n    raise exercises.YourTurn()\n" \
           "latent_blend = exercises.attempt(latent_blend)\n"
    assert exercise_cell_problems(stub) == []
    answer = "def latent_blend(z_t, z_c, m):\n    return z_t\nlatent_blend = exercises.attempt(latent_blend)\n"
    assert "holds an answer" in exercise_cell_problems(answer)[0]
    assert "NBVAL_CHECK_OUTPUT" in exercise_cell_problems("# NBVAL_CHECK_OUTPUT\n" + stub)[0]
    other = stub.replace("exercises.attempt(latent_blend)", "exercises.attempt(latent_blend, name='blend')")
    assert "no exercise named 'blend'" in exercise_cell_problems(other)[0]


@pytest.mark.parametrize("src", SOURCES, ids=lambda p: p.stem)
def test_exercise_cells_ship_the_stub(src):
    """Every cell that hands a function to exercises.attempt defines it as the stub."""
    problems = [p for c in _build().parse(src.read_text()) if c.cell_type == "code"
                for p in exercise_cell_problems(c.source)]
    assert not problems, "\n".join(problems)


# ----------------------------------------------------------------------------- the code, quoted
def _dotted(node) -> str | None:
    """`a.b.c` of a Name / Attribute chain, else None."""
    import ast
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    return ".".join([node.id, *reversed(parts)]) if isinstance(node, ast.Name) else None


def _bound_by_imports(tree, name: str):
    """The object a notebook's `from lr_tutorial... import` / `import lr_tutorial...` binds to
    `name`, or None."""
    import ast
    import importlib
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "lr_tutorial":
            for a in node.names:
                if (a.asname or a.name) == name:
                    module = importlib.import_module(node.module)
                    return getattr(module, a.name, None) or importlib.import_module(f"{node.module}.{a.name}")
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name.split(".")[0] == "lr_tutorial" and (a.asname or a.name.split(".")[0]) == name:
                    return importlib.import_module(a.name if a.asname else "lr_tutorial")
    return None


def quoted_code(src: Path) -> list[tuple[int, str, object]]:
    """(code cell index, dotted name as written, the object) of each show_source(...) in a
    notebook source; AssertionError where a name does not resolve through its imports."""
    import ast
    code = [c.source for c in _build().parse(src.read_text()) if c.cell_type == "code"]
    tree = ast.parse("\n".join(code))
    out = []
    for i, cell in enumerate(code):
        for node in ast.walk(ast.parse(cell)):
            if isinstance(node, ast.Call) and _dotted(node.func) in ("show_source", "notebook.show_source"):
                assert len(node.args) == 1, f"{src.name}: {ast.unparse(node)} quotes one object"
                dotted = _dotted(node.args[0])
                assert dotted, f"{src.name}: {ast.unparse(node)} quotes a dotted name"
                head, *rest = dotted.split(".")
                obj = _bound_by_imports(tree, head)
                assert obj is not None, f"{src.name}: {head} (in show_source({dotted})) is not imported from lr_tutorial"
                for part in rest:
                    assert hasattr(obj, part), f"{src.name}: show_source({dotted}): no {part}"
                    obj = getattr(obj, part)
                out.append((i, dotted, obj))
    return out


def method_table() -> set[str]:
    """docs/method.md's equation table as show_source headers, "lr_tutorial/swap.py, multi_source_attention"."""
    text = (ROOT / "docs" / "method.md").read_text()
    table = text.split("<!-- equations -->")[1].split("<!-- /equations -->")[0]
    rows = re.findall(r"^\| .+? \| `(lr_tutorial/\w+\.py)` `([\w.]+)` \| \d+ \|$", table, re.M)
    assert len(rows) >= 10, table
    return {f"{path}, {qualname}" for path, qualname in rows}


@pytest.mark.parametrize("src", SOURCES, ids=lambda p: p.stem)
def test_quoted_functions_exist_and_the_method_notebooks_quote_the_method(src):
    """Every show_source(...) of a notebook names a function of the package that exists and has
    source; notebooks 03-06 each quote at least one function of docs/method.md's table."""
    from lr_tutorial.notebook import source_of
    headers = {source_of(obj)[0] for _, _, obj in quoted_code(src)}
    if src.stem[:2] in ("03", "04", "05", "06"):
        assert headers & method_table(), \
            f"{src.name} quotes none of docs/method.md's functions (it quotes {sorted(headers)})"


@pytest.mark.parametrize("src", SOURCES, ids=lambda p: p.stem)
def test_an_exercises_function_is_quoted_only_after_the_exercise(src):
    """A package function that an exercise of the same notebook stands in for is shown after
    that exercise, never before it (it is the exercise's answer)."""
    import ast
    import importlib
    from lr_tutorial.exercises import EXERCISES
    code = [c.source for c in _build().parse(src.read_text()) if c.cell_type == "code"]
    quotes = quoted_code(src)
    for i, cell in enumerate(code):
        for _, name in _attempted(ast.parse(cell)):
            target = EXERCISES[name].plugs_into
            if not target:
                continue
            module, attr = target.split(":")
            fn = getattr(importlib.import_module(module), attr)
            early = [d for j, d, obj in quotes if obj is fn and j <= i]
            assert not early, f"{src.name}: show_source({early[0]}) comes before exercise {name}"


def test_quote_checks_catch_a_missing_function_and_an_early_answer(tmp_path):
    bad = tmp_path / "09_bad.py"
    bad.write_text("# %%\nfrom lr_tutorial import swap\nfrom lr_tutorial.notebook import show_source\n"
                   "show_source(swap.no_such_function)\n")
    with pytest.raises(AssertionError, match="no no_such_function"):
        quoted_code(bad)
    early = tmp_path / "09_early.py"
    early.write_text("# %%\nfrom lr_tutorial import layout, exercises\nfrom lr_tutorial.notebook import show_source\n"
                     "show_source(layout.stage1_loop)\n\n# %%\ndef stage1_loop(bundle, z, l1, n, y_minus_p, y_p, denoise):\n"
                     "    raise exercises.YourTurn()\nstage1_loop = exercises.attempt(stage1_loop)\n")
    with pytest.raises(AssertionError, match="before exercise stage1_loop"):
        test_an_exercises_function_is_quoted_only_after_the_exercise(early)
    assert [d for _, d, _ in quoted_code(early)] == ["layout.stage1_loop"]
