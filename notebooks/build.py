"""Build the course notebooks from their sources and execute them on the toy backend.

Sources live in notebooks/src/NN_name.py in the percent format (`# %%` starts a code cell,
`# %% [markdown]` a markdown cell whose lines start with `# `): plain Python files that diff and
review well. This script writes notebooks/NN_name.ipynb and executes it top to bottom, so the
stored outputs always come from the code in the repository.

    python notebooks/build.py            # every notebook
    python notebooks/build.py 01 03      # some of them
    python notebooks/build.py --check    # only verify that the .ipynb sources match src/
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import nbformat

HERE = Path(__file__).resolve().parent


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


def build(src: Path) -> nbformat.NotebookNode:
    nb = nbformat.v4.new_notebook()
    nb.cells = parse(src.read_text())
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.metadata["language_info"] = {"name": "python"}
    return nb


def sources_match(nb_path: Path, src: Path) -> bool:
    built = build(src)
    stored = nbformat.read(nb_path, as_version=4)
    return [(c.cell_type, c.source) for c in built.cells] == \
           [(c.cell_type, c.source) for c in stored.cells]


def execute(nb: nbformat.NotebookNode, path: Path, timeout: int = 600) -> float:
    import os
    from nbclient import NotebookClient
    # the kernel imports this checkout's lr_tutorial, whichever one the venv has installed
    os.environ["PYTHONPATH"] = os.pathsep.join(
        [str(HERE.parent)] + [p for p in [os.environ.get("PYTHONPATH")] if p])
    t0 = time.time()
    NotebookClient(nb, timeout=timeout, kernel_name="python3",
                   resources={"metadata": {"path": str(HERE)}}).execute()
    for cell in nb.cells:  # keep stored notebooks small and stable
        cell.metadata.pop("execution", None)
    nbformat.write(nb, path)
    return time.time() - t0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("only", nargs="*", help="notebook numbers, e.g. 01 03")
    ap.add_argument("--check", action="store_true")
    a = ap.parse_args(argv)
    srcs = sorted((HERE / "src").glob("[0-9][0-9]_*.py"))
    if a.only:
        srcs = [s for s in srcs if s.name[:2] in a.only]
    bad = 0
    for src in srcs:
        out = HERE / (src.stem + ".ipynb")
        if a.check:
            ok = out.exists() and sources_match(out, src)
            bad += not ok
            print(f"{out.name}: {'matches' if ok else 'OUT OF DATE: run python notebooks/build.py'}")
            continue
        secs = execute(build(src), out)
        print(f"{out.name}: executed in {secs:.0f} s, {out.stat().st_size / 1024:.0f} KiB")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
