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
    error, figures stored, under 1.5 MiB, the Colab badge first, two or more checked exercises."""
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
    checked = [c for c in code if "exercises.check_" in c.source and "correct:" in text(c)]
    assert len(checked) >= 2, f"{len(checked)} exercise checks passed in the stored outputs"


def _built_text(src) -> str:
    return "\n".join(c.source for c in _build().build(src).cells)


@pytest.mark.parametrize("src", SOURCES, ids=lambda p: p.stem)
def test_notebook_has_badge_goals_exercises_and_checks(src):
    text = _built_text(src)
    assert re.search(BADGE.format(re.escape(src.stem)), text) and "Learning goals" in text
    assert "Prerequisites" in text and ("pick_backend()" in text or "load_models(" in text)
    assert text.count("exercises.check_") >= 2
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
