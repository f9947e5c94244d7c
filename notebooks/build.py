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


def execute(nb: nbformat.NotebookNode, path: Path, timeout: int = 600) -> tuple[float, float]:
    """Execute `nb` in a fresh kernel and write it to `path`: (wall seconds, kernel CPU seconds)."""
    import os
    import resource
    from nbclient import NotebookClient
    # the kernel imports this checkout's lr_tutorial, whichever one the venv has installed
    os.environ["PYTHONPATH"] = os.pathsep.join(
        [str(HERE.parent)] + [p for p in [os.environ.get("PYTHONPATH")] if p])
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
    a = ap.parse_args(argv)
    a.only = [o[:2] for o in a.only + a.only_pos] if (a.only or a.only_pos) else []
    srcs = sorted((HERE / "src").glob("[0-9][0-9]_*.py"))
    if a.only:
        srcs = [s for s in srcs if s.name[:2] in a.only]
    bad = 0
    if not a.check:
        a.out.mkdir(parents=True, exist_ok=True)
    for src in srcs:
        out = a.out / (src.stem + ".ipynb")
        if a.check:
            ok = out.exists() and sources_match(out, src)
            bad += not ok
            print(f"{out.name}: {'matches' if ok else 'OUT OF DATE: run python notebooks/build.py'}")
            continue
        if a.no_execute:
            nbformat.write(build(src), out)
            print(f"{out.name}: written without outputs")
            continue
        from nbclient.exceptions import CellExecutionError, CellTimeoutError
        try:
            wall, cpu = execute(build(src), out, timeout=a.timeout)
        except (CellExecutionError, CellTimeoutError) as e:
            bad += 1
            print(f"{out.name}: FAILED (nothing written)\n{e}", flush=True)
            continue
        print(f"{out.name}: executed in {wall:.0f} s wall, {cpu:.0f} s kernel CPU, "
              f"{out.stat().st_size / 1024:.0f} KiB", flush=True)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
