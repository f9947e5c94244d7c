"""Writing outputs without losing anything: a command only ever writes, replaces or deletes
files it owns, never leaves half a file, and says so before the work when it cannot write.

    check_output("outputs/run", overwrite=False, what="result")  # before any model loads
    with atomic_folder("outputs/run", overwrite=False) as tmp:     # FileExistsError if it holds files
        (tmp / "result.json").write_text(...)                      # a unique temporary beside it
    # renamed to outputs/run only once everything is written, with a manifest of its files

    with atomic_file("outputs/run/final.png") as tmp:
        image.save(tmp)

Ownership: a folder written by `atomic_folder` holds a manifest (`MANIFEST`) listing every file
in it. `overwrite=True` replaces such a folder only when everything in it is listed there (or
is one of the names the writer itself produces, `OUTPUT_NAMES[what]`, e.g. a shipped LoRA
folder); anything else in it is named in a FileExistsError and nothing is touched. An empty
folder counts as free (nothing in it can be lost).

Temporary names come from `tempfile` (`.NAME.XXXXXXXX.partial` beside the target), so they can
never be a name a user chose. An exception (or Ctrl-C) inside the block deletes the temporary
and leaves any existing output untouched; a hard kill leaves only such a hidden temporary,
never a half-written output under the real name. With overwrite=True the old folder is moved
aside (another temporary name), the new one renamed into place, and only then the old one
deleted. Two writers racing on one path each write a whole folder of their own; the last
rename wins, and their files never mix.
"""
from __future__ import annotations

import contextlib
import fnmatch
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

MANIFEST = ".lr_tutorial-manifest.json"

# Names each kind of output writes: a folder holding only these (and a manifest's entries) is
# this writer's own, also when it has no manifest (made before manifests, or shipped in git).
OUTPUT_NAMES: dict[str, tuple[str, ...]] = {
    "result": ("final_*.png", "layout_*.png", "reference.png", "masks.npz", "result.json"),
    "generate output": ("final_*.png", "layout_*.png", "reference.png", "masks.npz",
                        "result.json", "final.png", "panel.png", "panel_*.png"),
    "LoRA": ("pytorch_lora_weights.safetensors", "pytorch_lora_weights.bin",
             "identifier_embedding.safetensors", "dreambooth_config.json"),
    "demo": ("method_comparison.png", "intermediates.png", "final_images.npy"),
    "toy export": ("unet/*", "vae/*", "text_encoder/*", "tokenizer/*", "scheduler/*",
                   "model_index.json", "training.json"),
    "evaluation": ("spec.json", "results.csv", "results.md", "rows.csv", "plots/*.png",
                   "samples/**/*.png", "samples/**/*.json"),
}


class OutputError(FileExistsError):
    """An output path that cannot or must not be written (exists, holds foreign files,
    unwritable, a file where a folder is needed)."""


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _plain_mode(path: Path, folder: bool) -> None:
    """Give a tempfile-made file (0600) or folder (0700) the mode a plain open/mkdir would
    have given it under the user's umask."""
    os.chmod(path, (0o777 if folder else 0o666) & ~_umask())


# ----------------------------------------------------------------------------- ownership
def read_manifest(folder: str | Path) -> dict | None:
    """The folder's manifest ({'writer', 'files', 'time'}), None if it has none or it is
    unreadable."""
    try:
        data = json.loads((Path(folder) / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and isinstance(data.get("files"), list) else None


def _all_files(folder: Path) -> list[str]:
    """Relative paths (POSIX) of every file and symlink under `folder`, and of empty folders."""
    out = []
    for root, dirs, names in os.walk(folder, followlinks=False):
        rel = Path(root).relative_to(folder)
        for d in list(dirs):
            p = Path(root) / d
            if p.is_symlink():
                out.append((rel / d).as_posix())
                dirs.remove(d)
            elif not any(p.iterdir()):
                out.append((rel / d).as_posix() + "/")
        out += [(rel / n).as_posix() for n in names]
    return sorted(out)


def foreign_files(folder: str | Path, what: str = "output") -> list[str]:
    """Files in `folder` that its writer does not own. With a manifest, the writer owns exactly
    the files it lists; without one (an output written before manifests), the names an output
    of kind `what` has (OUTPUT_NAMES), matched segment by segment, and our temporaries."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    manifest = read_manifest(folder)
    if manifest:
        listed = set(manifest["files"])
        return [rel for rel in _all_files(folder) if rel != MANIFEST and rel not in listed]
    patterns = OUTPUT_NAMES.get(what, ())
    return [rel for rel in _all_files(folder)
            if not _is_temporary(rel) and not any(_matches(rel, p) for p in patterns)]


def _matches(rel: str, pattern: str) -> bool:
    """fnmatch per path segment, so `*` never crosses a `/`; a `**` segment spans any number
    of folders (`samples/**/*.png`)."""
    def match(parts, pats):
        if not pats:
            return not parts
        if pats[0] == "**":
            return any(match(parts[i:], pats[1:]) for i in range(len(parts) + 1))
        return bool(parts) and fnmatch.fnmatchcase(parts[0], pats[0]) and match(parts[1:], pats[1:])
    return match(rel.split("/"), pattern.split("/"))


def _is_temporary(rel: str) -> bool:
    """A temporary of ours (a hidden `.NAME.*.partial` file) left by a hard kill."""
    name = rel.rsplit("/", 1)[-1]
    return name.startswith(".") and (".partial" in name)


def _describe(names: list[str], limit: int = 5) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def check_output(path: str | Path, overwrite: bool = False, what: str = "output",
                 flag: str = "--out") -> Path:
    """Check, before any work, that an output folder can be written: refuse (OutputError,
    naming the path and the fix) a path that is a file, a folder that holds files without
    `overwrite`, a folder with files its writer does not own even with `overwrite` (naming
    them), and a place where nothing can be created (permission, read-only disk, a file in
    the way, a name too long). An empty existing folder is accepted."""
    if path is None or str(path).strip() == "":
        raise OutputError(f"{flag} is empty; give a folder path, e.g. {flag} outputs/run")
    path = Path(os.path.expanduser(str(path)))
    for part in path.parts:
        if len(os.fsencode(part)) > 255:
            raise OutputError(f"{flag} {str(path)[:80]}...: the name {part[:40]!r}... is longer "
                              "than the 255 bytes a file name may have; choose a shorter name")
    if path.exists() or path.is_symlink():
        if not path.is_dir():
            raise OutputError(f"{flag} {path} is a file, not a folder; choose another {flag}")
        held = _all_files(path)
        if held:
            if not overwrite:
                how = ("--overwrite" if flag.startswith("--")
                       else "overwrite=True (--overwrite on the command line)")
                raise OutputError(
                    f"{path} exists and holds an earlier {what} ({_describe(held, 3)}); choose "
                    f"another {flag}, or pass {how} to replace it")
            foreign = foreign_files(path, what)
            if foreign:
                raise OutputError(
                    f"{path} holds files this command did not write: {_describe(foreign)}; "
                    f"--overwrite only replaces the command's own files. Move them away or "
                    f"choose another {flag}")
    _check_writable(path, flag)
    return path


def _check_writable(path: Path, flag: str) -> None:
    """Try to create (and remove) a temporary folder where `path`'s folder will be made."""
    parent = path.parent if str(path.parent) else Path(".")
    anc = parent
    while not anc.exists():
        if anc.is_symlink():
            raise OutputError(f"{flag} {path}: {anc} is a broken link; choose another {flag}")
        if anc.parent == anc:
            break
        anc = anc.parent
    if anc.exists() and not anc.is_dir():
        raise OutputError(f"{flag} {path}: {anc} is a file, so no folder can be made under it; "
                          f"choose another {flag}")
    try:
        probe = tempfile.mkdtemp(dir=anc, prefix=".lr_tutorial-probe.", suffix=".partial")
        os.rmdir(probe)
    except OSError as e:
        raise OutputError(f"{flag} {path}: cannot write in {anc} ({e.strerror or e}); choose a "
                          f"folder you can write to with {flag}") from e


def refuse_existing(path: str | Path, overwrite: bool, what: str = "output") -> Path:
    """check_output for library calls (the message says overwrite=True)."""
    return check_output(path, overwrite, what, flag="the output path")


def write_manifest(folder: str | Path, writer: str = "lr_tutorial") -> Path:
    """Write `folder`'s manifest listing every file now in it (atomically)."""
    folder = Path(folder)
    files = [f for f in _all_files(folder) if f != MANIFEST and not _is_temporary(f)]
    data = {"writer": writer, "files": files, "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f"{MANIFEST}.", suffix=".partial")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=1)
    _plain_mode(Path(tmp), folder=False)
    os.replace(tmp, folder / MANIFEST)
    return folder / MANIFEST


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink()


def _aside(target: Path) -> Path:
    """A fresh unique empty folder beside `target` (rename() may replace an empty folder)."""
    return Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.", suffix=".old.partial"))


def _swap_in(tmp: Path, target: Path) -> None:
    """Rename tmp to target; an existing target is moved aside first and deleted last."""
    old = None
    if target.exists() or target.is_symlink():
        if target.is_dir() and not target.is_symlink():
            old = _aside(target)
        else:
            fd, name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.",
                                        suffix=".old.partial")
            os.close(fd)
            old = Path(name)
        os.replace(target, old)
    try:
        os.replace(tmp, target)
    except OSError as e:
        if old is not None and not (target.exists() or target.is_symlink()):
            os.replace(old, target)
            old = None
        raise OutputError(f"could not put the new output at {target} ({e.strerror or e}); "
                          "did another process write it at the same time? The earlier "
                          "output is untouched") from e
    finally:
        if old is not None and (target.exists() or target.is_symlink()):
            _remove(old)


@contextlib.contextmanager
def atomic_folder(folder: str | Path, overwrite: bool = False, what: str = "output",
                  writer: str | None = None):
    """Yield a new unique temporary folder beside `folder`; when the block ends without an
    exception, write its manifest and rename it to `folder` (see the module docstring).
    Refused before the block (OutputError) as `check_output` says."""
    folder = Path(folder)
    check_output(folder, overwrite, what, flag="the output path")
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}.", suffix=".partial"))
    _plain_mode(tmp, folder=True)
    try:
        yield tmp
        write_manifest(tmp, writer or f"lr_tutorial {what}")
        if folder.is_dir() and _all_files(folder):  # it may have changed during the work
            foreign = foreign_files(folder, what)
            if foreign:
                raise OutputError(f"{folder} now holds files this command did not write: "
                                  f"{_describe(foreign)}; nothing was replaced")
        _swap_in(tmp, folder)
    except BaseException:
        _remove(tmp)
        raise


@contextlib.contextmanager
def atomic_file(path: str | Path, overwrite: bool = True, what: str = "file"):
    """Yield a unique temporary path beside `path` (same suffix, so writers that pick the
    format from it work); rename it to `path` when the block ends without an exception. A
    file written into a folder with a manifest is added to it."""
    path = Path(path)
    if (path.exists() or path.is_symlink()) and not overwrite:
        raise OutputError(f"{path} exists and holds an earlier {what}; choose another path, "
                          "or pass overwrite=True (--overwrite on the command line) to replace it")
    if path.is_dir():
        raise OutputError(f"{path} is a folder; a file of that name cannot replace it")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.",
                                suffix=f".partial{path.suffix}")
    os.close(fd)
    tmp = Path(name)
    _plain_mode(tmp, folder=False)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        _remove(tmp)
        raise
    manifest = read_manifest(path.parent)
    if manifest is not None and path.name not in manifest["files"]:
        write_manifest(path.parent, manifest.get("writer", "lr_tutorial"))


def write_bytes_atomic(path: str | Path, data: bytes) -> None:
    """`path` replaced by `data` in one rename (a unique temporary beside it)."""
    with atomic_file(path) as tmp:
        tmp.write_bytes(data)


def replace_entries(src: str | Path, dst: str | Path, what: str = "toy export") -> None:
    """Move every entry of the finished folder `src` into `dst` (which may hold other things
    that stay), each entry replaced atomically; then remove `src`. For outputs that share a
    folder with files of other origin (e.g. the toy weights next to data/toy/lora). A replaced
    folder entry must hold only files its writer owns (the new entry's names, a manifest's
    entries, OUTPUT_NAMES[what]); otherwise OutputError names them and nothing moves."""
    src, dst = Path(src), Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    manifest = read_manifest(dst)
    listed = set(manifest["files"]) if manifest else set()
    patterns = OUTPUT_NAMES.get(what, ())
    entries = [e for e in sorted(src.iterdir()) if e.name != MANIFEST]
    foreign = []
    for entry in entries:
        old = dst / entry.name
        if old.is_dir() and not old.is_symlink():
            new = {f"{entry.name}/{r}" for r in _all_files(entry)} if entry.is_dir() else set()
            for r in _all_files(old):
                rel = f"{entry.name}/{r}"
                if not (rel in new or rel in listed or _is_temporary(rel)
                        or any(fnmatch.fnmatchcase(rel, p) for p in patterns)):
                    foreign.append(rel)
    if foreign:
        raise OutputError(f"{dst} holds files this command did not write: {_describe(foreign)}; "
                          "move them away first (nothing was replaced)")
    for entry in entries:
        _swap_in(entry, dst / entry.name)
    _remove(src)
    files = set(listed)
    for e in entries:
        new = dst / e.name
        files |= ({f"{e.name}/{r}" for r in _all_files(new)} if new.is_dir() and not new.is_symlink()
                  else {e.name})
    data = {"writer": f"lr_tutorial {what}", "files": sorted(files),
            "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
    fd, tmp = tempfile.mkstemp(dir=dst, prefix=f"{MANIFEST}.", suffix=".partial")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=1)
    _plain_mode(Path(tmp), folder=False)
    os.replace(tmp, dst / MANIFEST)
