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
