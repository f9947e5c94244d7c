"""Build the course notebooks from their sources and execute them on the toy backend.

Sources live in notebooks/src/NN_name.py in the percent format (`# %%` starts a code cell,
`# %% [markdown]` a markdown cell whose lines start with `# `): plain Python files that diff and
review well. This script writes notebooks/NN_name.ipynb and executes it top to bottom, so the
stored outputs always come from the code in the repository.

    python notebooks/build.py            # every notebook
    python notebooks/build.py 01 03      # some of them
    python notebooks/build.py --check    # only verify that the .ipynb sources match src/
    python notebooks/build.py --out /tmp/nb 05   # write (and execute) into another folder
    python notebooks/build.py --no-execute       # write the cells only, without outputs
    python notebooks/build.py --refresh-setup    # rewrite only the badge and setup cells in place

Every notebook opens the same way, generated here rather than copied into seven sources: a source's
first markdown cell starts with the line `# <<colab-badge>>` and its first code cell is `# <<setup>>`.
The badge links to the notebook on Colab, and the setup cell clones the repository there and
installs the package (the slim runtime dependencies of requirements.txt, no test tools). The
repository's address is one setting, `repository` in pyproject.toml's [tool.lr_tutorial] table
(with `branch`); LR_TUTORIAL_REPOSITORY and LR_TUTORIAL_BRANCH override it for one build (a fork
building its own Colab links). While the owner in it is the placeholder OWNER, the badges point
nowhere and the setup cell stops in Colab with a line saying how to build with the real address.

Exercises: a cell where the learner writes a piece of the method holds a stub that raises
`exercises.YourTurn`, and hands the function to `exercises.attempt(...)`, which checks it, or, for
a stub, says so and continues with the package's solution. With LR_EXERCISE_SOLUTIONS=1 (set by
`make test` for nbval) every exercise runs the package's solution through its checker instead, and
fails where a stored cell holds an answer instead of the stub. The stored notebooks are executed
without it, so their outputs show what a learner sees.
"""
from __future__ import annotations

import argparse
import os
import re
import sys
import time
from pathlib import Path

import nbformat

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
BADGE_MARK = "<<colab-badge>>"
SETUP_MARK = "<<setup>>"
PLACEHOLDER_OWNER = "OWNER"
REPOSITORY_ENV, BRANCH_ENV = "LR_TUTORIAL_REPOSITORY", "LR_TUTORIAL_BRANCH"


def settings() -> dict:
    """{"repository": "https://github.com/<owner>/<name>", "owner", "name", "branch",
    "placeholder": bool}: pyproject.toml's [tool.lr_tutorial], overridden by the environment."""
    try:
        import tomllib
    except ImportError:  # Python 3.10
        import tomli as tomllib
    table = tomllib.loads((ROOT / "pyproject.toml").read_text()).get("tool", {}).get("lr_tutorial", {})
    repository = (os.environ.get(REPOSITORY_ENV) or table.get("repository", "")).strip().rstrip("/")
    branch = (os.environ.get(BRANCH_ENV) or table.get("branch", "main")).strip()
    m = re.fullmatch(r"https://github\.com/([\w.-]+)/([\w.-]+?)(\.git)?", repository)
    if not m:
        raise SystemExit(f"the repository address {repository!r} is not https://github.com/<owner>/<name>: "
                         f"set `repository` in pyproject.toml's [tool.lr_tutorial] or ${REPOSITORY_ENV}")
    if not re.fullmatch(r"[\w./-]+", branch):
        raise SystemExit(f"the branch {branch!r} is not a git branch name: fix `branch` in "
                         f"pyproject.toml's [tool.lr_tutorial] or ${BRANCH_ENV}")
    owner, name = m.group(1), m.group(2)
    return {"repository": f"https://github.com/{owner}/{name}", "owner": owner, "name": name,
            "branch": branch, "placeholder": owner == PLACEHOLDER_OWNER}


def colab_url(stem: str, cfg: dict | None = None) -> str:
    cfg = cfg or settings()
    return (f"https://colab.research.google.com/github/{cfg['owner']}/{cfg['name']}/blob/"
            f"{cfg['branch']}/notebooks/{stem}.ipynb")


def badge(stem: str, cfg: dict | None = None) -> str:
    return (f"[![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)]"
            f"({colab_url(stem, cfg)})")


SETUP = '''\
# Setup. In Colab: clone the course and install it (about a minute; only the packages the
# notebooks need). Locally: the installed package, or this checkout when run from notebooks/.
import os, subprocess, sys
REPOSITORY, BRANCH = "{repository}", "{branch}"
if "google.colab" in sys.modules:
    if not os.path.isdir("lr_tutorial"):
        if REPOSITORY.startswith("https://github.com/{placeholder}/"):
            raise RuntimeError("this notebook was built without the course's GitHub address (its owner "
                               "is the placeholder {placeholder}): set `repository` in pyproject.toml's "
                               "[tool.lr_tutorial], or {env}=https://github.com/<owner>/lr_tutorial, "
                               "and run python notebooks/build.py")
        subprocess.run(["git", "clone", "--depth", "1", "--branch", BRANCH, REPOSITORY, "lr_tutorial"],
                       check=True)
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "-e", "lr_tutorial"], check=True)
    sys.path.insert(0, os.path.abspath("lr_tutorial"))  # the editable install shows after a restart
else:
    try:
        import lr_tutorial
    except ImportError:
        sys.path.insert(0, os.path.abspath(".."))'''


def setup_cell(cfg: dict | None = None) -> str:
    """The first code cell of every notebook (see the module docstring)."""
    cfg = cfg or settings()
    return SETUP.format(repository=cfg["repository"], branch=cfg["branch"],
                        placeholder=PLACEHOLDER_OWNER, env=REPOSITORY_ENV)


def fill(cells: list, stem: str, cfg: dict | None = None) -> list:
    """Put the badge and the setup cell where a source marks them."""
    cfg = cfg or settings()
    for c in cells:
        if c.cell_type == "markdown" and BADGE_MARK in c.source:
            c.source = c.source.replace(BADGE_MARK, badge(stem, cfg))
        elif c.cell_type == "code" and c.source.strip() == f"# {SETUP_MARK}":
            c.source = setup_cell(cfg)
    return cells


def parse(src: str) -> list:
    """Percent-format text -> notebook cells."""
    cells, kind, lines = [], None, []

    def flush():
        text = "\n".join(lines).strip("\n")
        if kind == "markdown":
            text = "\n".join(ln[2:] if ln.startswith("# ") else ln.lstrip("#") for ln in text.splitlines())
            cells.append(nbformat.v4.new_markdown_cell(text))
        elif kind == "code" and text:
            cells.append(nbformat.v4.new_code_cell(text))

    for line in src.splitlines():
        if line.startswith("# %%"):
            flush()
            kind, lines = ("markdown" if "[markdown]" in line else "code"), []
        elif kind is not None:
            lines.append(line)
    flush()
    return cells


def build(src: Path, cfg: dict | None = None) -> nbformat.NotebookNode:
    nb = nbformat.v4.new_notebook()
    nb.cells = fill(parse(src.read_text()), src.stem, cfg)
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.metadata["language_info"] = {"name": "python"}
    return nb


def sources_match(nb_path: Path, src: Path) -> bool:
    built = build(src)
    stored = nbformat.read(nb_path, as_version=4)
    return [(c.cell_type, c.source) for c in built.cells] == \
           [(c.cell_type, c.source) for c in stored.cells]


SOLUTIONS_ENV = "LR_EXERCISE_SOLUTIONS"


def refresh_setup(nb_path: Path, src: Path) -> str:
    """Rewrite the badge and setup cells of a stored notebook from the current settings, keeping
    every other cell and its outputs: "refreshed", "unchanged", or why it was left alone."""
    built, stored = build(src), nbformat.read(nb_path, as_version=4)
    if len(built.cells) != len(stored.cells):
        return "left alone: its cells differ from the source (python notebooks/build.py)"
    changed = False
    marks = [c.cell_type == "markdown" and BADGE_MARK in c.source or
             c.cell_type == "code" and c.source.strip() == f"# {SETUP_MARK}"
             for c in parse(src.read_text())]
    for new, old, generated in zip(built.cells, stored.cells, marks):
        if new.cell_type != old.cell_type or (not generated and new.source != old.source):
            return "left alone: its cells differ from the source (python notebooks/build.py)"
        if generated and new.source != old.source:
            if new.cell_type == "code" and old.get("outputs"):
                return "left alone: its setup cell has outputs (python notebooks/build.py)"
            old.source, changed = new.source, True
    if changed:
        nbformat.write(stored, nb_path)
    return "refreshed" if changed else "unchanged"


def execute(nb: nbformat.NotebookNode, path: Path, timeout: int = 600,
            solutions: bool = False) -> tuple[float, float]:
    """Execute `nb` in a fresh kernel and write it to `path`: (wall seconds, kernel CPU seconds).
    The exercises run as a learner finds them (their stubs), unless `solutions`."""
    import resource
    from nbclient import NotebookClient
    # the kernel imports this checkout's lr_tutorial, whichever one the venv has installed
    os.environ["PYTHONPATH"] = os.pathsep.join(
        [str(HERE.parent)] + [p for p in [os.environ.get("PYTHONPATH")] if p])
    os.environ.pop(SOLUTIONS_ENV, None)
    if solutions:
        os.environ[SOLUTIONS_ENV] = "1"
    t0, c0 = time.time(), resource.getrusage(resource.RUSAGE_CHILDREN)
    NotebookClient(nb, timeout=timeout, kernel_name="python3",
                   resources={"metadata": {"path": str(HERE)}}).execute()
    wall, c1 = time.time() - t0, resource.getrusage(resource.RUSAGE_CHILDREN)
    for cell in nb.cells:  # keep stored notebooks small and stable
        cell.metadata.pop("execution", None)
    nbformat.write(nb, path)
    return wall, (c1.ru_utime - c0.ru_utime) + (c1.ru_stime - c0.ru_stime)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("only_pos", metavar="only", nargs="*", help="notebook numbers, e.g. 01 03")
    ap.add_argument("--check", action="store_true")
    ap.add_argument("--out", type=Path, default=HERE,
                    help="folder for the .ipynb files (default: notebooks/); the kernels still "
                         "run in notebooks/, so relative paths in the sources resolve the same")
    ap.add_argument("--only", nargs="+", default=[], help="same as the positional numbers")
    ap.add_argument("--timeout", type=int, default=600, help="seconds per cell")
    ap.add_argument("--no-execute", action="store_true", help="write the notebooks without outputs")
    ap.add_argument("--refresh-setup", action="store_true",
                    help="rewrite only the badge and setup cells of the stored notebooks (no execution)")
    ap.add_argument("--solutions", action="store_true",
                    help=f"execute with the package's exercise solutions ({SOLUTIONS_ENV}=1), to try "
                         "them; the stored notebooks are built without")
    a = ap.parse_args(argv)
    a.only = [o[:2] for o in a.only + a.only_pos] if (a.only or a.only_pos) else []
    srcs = sorted((HERE / "src").glob("[0-9][0-9]_*.py"))
    if a.only:
        srcs = [s for s in srcs if s.name[:2] in a.only]
    bad = 0
    cfg = settings()
    if cfg["placeholder"] and not a.check:
        print(f"note: the repository's owner is the placeholder {PLACEHOLDER_OWNER}: the Colab badges point "
              f"nowhere (set `repository` in pyproject.toml's [tool.lr_tutorial] or ${REPOSITORY_ENV})")
    if not a.check:
        a.out.mkdir(parents=True, exist_ok=True)
    for src in srcs:
        out = a.out / (src.stem + ".ipynb")
        if a.check:
            ok = out.exists() and sources_match(out, src)
            bad += not ok
            print(f"{out.name}: {'matches' if ok else 'OUT OF DATE: run python notebooks/build.py'}")
            continue
        if a.refresh_setup:
            why = refresh_setup(out, src) if out.exists() else "not built (python notebooks/build.py)"
            bad += not why.startswith(("refreshed", "unchanged"))
            print(f"{out.name}: {why}")
            continue
        if a.no_execute:
            nbformat.write(build(src), out)
            print(f"{out.name}: written without outputs")
            continue
        from nbclient.exceptions import CellExecutionError, CellTimeoutError
        try:
            wall, cpu = execute(build(src), out, timeout=a.timeout, solutions=a.solutions)
        except (CellExecutionError, CellTimeoutError) as e:
            bad += 1
            print(f"{out.name}: FAILED (nothing written)\n{e}", flush=True)
            continue
        print(f"{out.name}: executed in {wall:.0f} s wall, {cpu:.0f} s kernel CPU, "
              f"{out.stat().st_size / 1024:.0f} KiB", flush=True)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
