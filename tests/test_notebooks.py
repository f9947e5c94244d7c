"""The stored notebooks come from their sources in notebooks/src and stay small; nbval
re-executes them in `make test` (see the Makefile)."""
from pathlib import Path

import pytest

NB = Path(__file__).resolve().parents[1] / "notebooks"
SOURCES = sorted((NB / "src").glob("[0-9][0-9]_*.py"))


def test_there_are_seven_notebooks():
    assert len(SOURCES) == 7


@pytest.mark.parametrize("src", SOURCES, ids=lambda p: p.stem)
def test_notebook_is_built_from_its_source_and_small(src):
    import sys
    sys.path.insert(0, str(NB))
    import build
    nb = NB / (src.stem + ".ipynb")
    if not nb.exists():  # each is executed once the final toy weights are in
        pytest.skip(f"{nb.name} not built yet: python notebooks/build.py {src.stem[:2]}")
    assert build.sources_match(nb, src), f"{nb.name} is out of date: python notebooks/build.py {src.stem[:2]}"
    assert nb.stat().st_size < 1.5 * 1024 * 1024


@pytest.mark.parametrize("src", SOURCES, ids=lambda p: p.stem)
def test_notebook_has_badge_goals_exercises_and_checks(src):
    text = src.read_text()
    assert "colab.research.google.com" in text and "Learning goals" in text
    assert "Prerequisites" in text and ("pick_backend()" in text or "load_models(" in text)
    assert text.count("exercises.check_") >= 2
    assert "google.colab" in text  # the first cell installs the package in Colab
