"""Writing outputs without losing anything: never overwrite unasked, never leave half a file.

    with atomic_folder("outputs/run", overwrite=False) as tmp:   # FileExistsError if it exists
        (tmp / "result.json").write_text(...)                    # written into run.partial/
    # renamed to outputs/run only once everything is written

    with atomic_file("outputs/run/final.png") as tmp:
        image.save(tmp)

An exception (or Ctrl-C) inside the block deletes the temporary and leaves any existing output
untouched; a hard kill leaves only a `*.partial` temporary next to it, never a half-written
output under the real name. With overwrite=True the old output is moved aside, the new one
renamed into place, and only then the old one deleted.
"""
from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path


def refuse_existing(path: str | Path, overwrite: bool, what: str = "output") -> Path:
    """Raise FileExistsError if `path` exists and overwrite is False."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists and holds an earlier {what}; choose another path, "
                              "or pass overwrite=True (--overwrite on the command line) to "
                              "replace it")
    return path


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink()


def _swap_in(tmp: Path, target: Path) -> None:
    """Rename tmp to target; an existing target is moved aside first and deleted last."""
    old = None
    if target.exists() or target.is_symlink():
        old = target.with_name(f"{target.name}.old-{os.getpid()}")
        _remove(old)
        os.replace(target, old)
    try:
        os.replace(tmp, target)
    except BaseException:
        if old is not None:
            os.replace(old, target)
        raise
    if old is not None:
        _remove(old)


@contextlib.contextmanager
def atomic_folder(folder: str | Path, overwrite: bool = False, what: str = "output"):
    """Yield a temporary folder next to `folder`; rename it to `folder` when the block ends
    without an exception (see the module docstring)."""
    folder = refuse_existing(folder, overwrite, what)
    tmp = folder.with_name(folder.name + ".partial")
    _remove(tmp)  # left by a hard-killed earlier attempt
    tmp.mkdir(parents=True)
    try:
        yield tmp
        _swap_in(tmp, folder)
    except BaseException:
        _remove(tmp)
        raise


@contextlib.contextmanager
def atomic_file(path: str | Path, overwrite: bool = True, what: str = "file"):
    """Yield a temporary path next to `path` (same suffix, so writers that pick the format from
    it work); rename it to `path` when the block ends without an exception."""
    path = refuse_existing(path, overwrite, what)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.stem}.partial{path.suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        _remove(tmp)
        raise


def replace_entries(src: str | Path, dst: str | Path) -> None:
    """Move every entry of the finished folder `src` into `dst` (which may hold other things
    that stay), each entry replaced atomically; then remove `src`. For outputs that share a
    folder with files of other origin (e.g. the toy weights next to data/toy/lora)."""
    src, dst = Path(src), Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    for entry in sorted(src.iterdir()):
        _swap_in(entry, dst / entry.name)
    src.rmdir()
