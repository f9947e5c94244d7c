"""Output folders: a command only writes, replaces or deletes files it owns. Every test here
plants files of "the user" (beside and inside the outputs) and checks at the end that not one
of them was deleted or changed (the `user` fixture), whatever the command did."""
from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lr_tutorial import cli, files

sys.path.insert(0, str(Path(__file__).parent))


class User:
    """Files a user made; `check()` asserts each is still there, byte for byte."""

    def __init__(self):
        self.made: dict[Path, str] = {}

    def file(self, path: Path, text: str = "mine") -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        self.made[path] = hashlib.sha1(text.encode()).hexdigest()
        return path

    def check(self) -> None:
        for p, digest in self.made.items():
            assert p.is_file(), f"the user's {p} was deleted"
            assert hashlib.sha1(p.read_bytes()).hexdigest() == digest, f"the user's {p} changed"


@pytest.fixture
def user():
    u = User()
    yield u
    u.check()


def _tree(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _write(folder, names=("a.txt",), overwrite=False, what="output"):
    with files.atomic_folder(folder, overwrite, what=what) as tmp:
        for n in names:
            (tmp / n).parent.mkdir(parents=True, exist_ok=True)
            (tmp / n).write_text(f"{n} {what}")
    return folder


class _Reached(BaseException):
    pass


@pytest.fixture
def no_models(monkeypatch):
    """cli._validated stops the command: anything refused must be refused before it."""
    def stop(a):
        raise _Reached
    monkeypatch.setattr(cli, "_validated", stop)


# ----------------------------------------------------------------------------- atomic_folder
def test_a_folder_named_like_a_temporary_is_never_touched(tmp_path, user):
    user.file(tmp_path / "run.partial" / "notes.txt")
    user.file(tmp_path / ".run.partial")
    user.file(tmp_path / "run.old-1" / "x.txt")
    _write(tmp_path / "run")
    assert _tree(tmp_path / "run") == {"a.txt": b"a.txt output",
                                       files.MANIFEST: (tmp_path / "run" / files.MANIFEST).read_bytes()}
    manifest = files.read_manifest(tmp_path / "run")
    assert manifest["files"] == ["a.txt"]
    # nothing else beside: the temporaries are gone
    assert sorted(p.name for p in tmp_path.iterdir()) == [".run.partial", "run", "run.old-1",
                                                         "run.partial"]


def test_overwrite_replaces_own_files_and_refuses_a_folder_with_foreign_ones(tmp_path, user):
    out = _write(tmp_path / "run", ["a.txt", "sub/b.txt"])
    _write(out, ["c.txt"], overwrite=True)  # its own files only: replaced whole
    assert sorted(_tree(out)) == [files.MANIFEST, "c.txt"]
    user.file(out / "notes.md")
    user.file(out / "sub" / "keep.txt")
    before = _tree(out)
    with pytest.raises(files.OutputError) as e:
        _write(out, ["d.txt"], overwrite=True)
    assert "notes.md" in str(e.value) and "sub/keep.txt" in str(e.value)
    assert "did not write" in str(e.value)
    assert _tree(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # no temporary left


def test_without_overwrite_an_existing_output_is_refused_and_an_empty_folder_is_free(tmp_path, user):
    out = _write(tmp_path / "run")
    with pytest.raises(files.OutputError, match="overwrite=True"):
        _write(out)
    (tmp_path / "empty").mkdir()
    _write(tmp_path / "empty")  # nothing in it to lose
    assert (tmp_path / "empty" / "a.txt").is_file()


def test_a_folder_a_file_changed_during_the_work_is_not_replaced(tmp_path, user):
    out = _write(tmp_path / "run")
    with pytest.raises(files.OutputError, match="now holds files"):
        with files.atomic_folder(out, overwrite=True) as tmp:
            (tmp / "a.txt").write_text("new")
            user.file(out / "added-meanwhile.txt")
    assert (out / "a.txt").read_text() == "a.txt output"


def test_two_writers_on_one_path_never_mix_their_files(tmp_path, user):
    out = tmp_path / "run"
    with files.atomic_folder(out, overwrite=True) as first:
        (first / "first.txt").write_text("1")
        with files.atomic_folder(out, overwrite=True) as second:
            (second / "second.txt").write_text("2")
        assert sorted(_tree(out)) == [files.MANIFEST, "second.txt"]
    assert sorted(_tree(out)) == [files.MANIFEST, "first.txt"]  # the last rename wins, whole


def test_an_interrupted_write_leaves_the_earlier_output_and_no_temporary(tmp_path, user):
    out = _write(tmp_path / "run")
    before = _tree(out)
    with pytest.raises(KeyboardInterrupt):
        with files.atomic_folder(out, overwrite=True) as tmp:
            (tmp / "half.txt").write_text("half")
            raise KeyboardInterrupt
    assert _tree(out) == before and sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_outputs_without_a_manifest_are_replaced_only_when_every_file_is_of_their_kind(tmp_path, user):
    lora = tmp_path / "lora"  # e.g. a LoRA folder checked into git: no manifest
    for n in ("pytorch_lora_weights.safetensors", "dreambooth_config.json"):
        (lora / n).parent.mkdir(exist_ok=True)
        (lora / n).write_text("old")
    assert files.foreign_files(lora, "LoRA") == []
    _write(lora, ["pytorch_lora_weights.safetensors"], overwrite=True, what="LoRA")
    user.file(lora / "README.md")
    with pytest.raises(files.OutputError, match="README.md"):
        _write(lora, ["pytorch_lora_weights.safetensors"], overwrite=True, what="LoRA")


@pytest.mark.parametrize("make, words", [
    (lambda t: t / "afile" / "out", ["is a file", "no folder can be made"]),
    (lambda t: t / "afile", ["is a file, not a folder"]),
    (lambda t: t / ("x" * 300), ["longer than the 255 bytes"]),
    (lambda t: Path("/proc/no/such/out"), ["cannot write in /proc"]),
    (lambda t: "", ["is empty"]),
])
def test_impossible_outputs_are_refused_before_any_work(tmp_path, user, make, words):
    user.file(tmp_path / "afile")
    with pytest.raises(files.OutputError) as e:
        files.check_output(make(tmp_path), flag="--out")
    for w in words:
        assert w in str(e.value), (w, str(e.value))


def test_atomic_file_uses_a_unique_temporary_and_updates_the_manifest(tmp_path, user):
    out = _write(tmp_path / "run")
    user.file(out.parent / "final.partial.png")  # the old fixed temporary name
    with files.atomic_file(out / "final.png") as tmp:
        assert tmp.parent == out and tmp.name.startswith(".final.") and tmp.suffix == ".png"
        Image.new("RGB", (4, 4)).save(tmp)
    assert "final.png" in files.read_manifest(out)["files"]
    with pytest.raises(files.OutputError, match="exists"):
        with files.atomic_file(out / "final.png", overwrite=False):
            pass


def test_export_into_a_shared_folder_replaces_its_entries_and_keeps_the_rest(tmp_path, user):
    dst = tmp_path / "toy"
    user.file(dst / "README.md")
    user.file(dst / "lora" / "pytorch_lora_weights.safetensors")
    (dst / "unet").mkdir()
    (dst / "unet" / "old.bin").write_text("old")
    src = tmp_path / "export"
    (src / "unet").mkdir(parents=True)
    (src / "unet" / "new.bin").write_text("new")
    files.replace_entries(src, dst)
    assert [p.name for p in (dst / "unet").iterdir()] == ["new.bin"] and not src.exists()
    assert "unet/new.bin" in files.read_manifest(dst)["files"]
    # a foreign file inside an entry it would replace, for a writer without own names: refused
    (src / "unet").mkdir(parents=True)
    (src / "unet" / "newer.bin").write_text("newer")
    user.file(dst / "unet" / "notes.txt")
    with pytest.raises(files.OutputError, match="unet/notes.txt"):
        files.replace_entries(src, dst, what="something else")


# ----------------------------------------------------------------------------- the commands
def test_generate_refuses_folders_it_does_not_own_before_models_load(tmp_path, user, no_models,
                                                                     capsys):
    out = tmp_path / "out"
    user.file(out / "holiday.jpg")
    base = ["generate", "--prompt", "a sks star", "--out", str(out)]
    assert cli.main(base) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert cli.main(base + ["--overwrite"]) == 2
    err = capsys.readouterr().err
    assert "holiday.jpg" in err and "did not write" in err and err.count("\n") == 1
    user.file(tmp_path / "out.partial" / "x.txt")
    with pytest.raises(_Reached):  # a new folder beside a user's OUT.partial: goes ahead
        cli.main(["generate", "--prompt", "a sks star", "--out", str(tmp_path / "new")])


def test_demo_and_personalize_refuse_an_occupied_out_before_models_load(tmp_path, user, no_models,
                                                                         capsys):
    for cmd, extra in (("demo", []), ("personalize-toy", ["--steps", "1"])):
        out = tmp_path / cmd
        user.file(out / "mine.txt")
        assert cli.main([cmd, "--out", str(out), *extra]) == 2
        assert "--overwrite" in capsys.readouterr().err
        assert cli.main([cmd, "--out", str(out), "--overwrite", *extra]) == 2
        assert "mine.txt" in capsys.readouterr().err


def test_evaluate_overwrite_refuses_foreign_files_and_a_non_evaluation_folder(tmp_path, user,
                                                                              no_models, capsys):
    mine = tmp_path / "mine"
    user.file(mine / "samples" / "notes.txt")
    user.file(mine / "results.md", "my own results")
    for extra in ([], ["--overwrite"]):
        assert cli.main(["evaluate", "--out", str(mine), *extra]) == 2
        assert "not an evaluation folder" in capsys.readouterr().err
    ev = tmp_path / "ev"
    (ev / "samples" / "v" / "s").mkdir(parents=True)
    (ev / "spec.json").write_text("{}")
    (ev / "samples" / "v" / "s" / "000_s0.json").write_text("{}")
    user.file(ev / "samples" / "v" / "s" / "my-notes.txt")
    user.file(ev / "draft.docx")
    assert cli.main(["evaluate", "--out", str(ev), "--overwrite"]) == 2
    err = capsys.readouterr().err
    assert "draft.docx" in err and "my-notes.txt" in err and "did not write" in err


def test_evaluate_discards_only_its_own_files(tmp_path, user):
    from lr_tutorial import evaluate
    ev = tmp_path / "ev"
    (ev / "samples" / "v" / "s").mkdir(parents=True)
    (ev / "plots").mkdir()
    for rel in ("spec.json", "results.md", "results.csv", "rows.csv", "plots/a.png",
                "samples/v/s/000_s0.png", "samples/v/s/000_s0.json"):
        (ev / rel).write_text("x")
    assert evaluate.foreign_files(ev) == []
    evaluate._discard(ev)
    assert not ev.exists() or not any(ev.iterdir())


@pytest.mark.slow
def test_evaluate_redoes_a_damaged_sample_naming_it(tmp_path, user, capsys):
    from lr_tutorial import benchmarks, evaluate
    spec = benchmarks.shapeworld(steps=2, methods=["personalized"]).limit(prompts=2, seeds=1)
    out = tmp_path / "ev"
    evaluate.run(spec, out, progress=False)
    pngs = sorted(out.glob("samples/**/*.png"))
    assert len(pngs) == 2
    good = pngs[1].read_bytes()
    pngs[0].write_bytes(pngs[0].read_bytes()[:40])  # truncated by a crash
    js = pngs[1].with_suffix(".json")
    capsys.readouterr()
    evaluate.run(spec, out, progress=False)
    err = capsys.readouterr().err
    assert "redoing damaged sample personalized/sks_star/000_s0" in err and "decode" in err
    with Image.open(pngs[0]) as im:
        im.load()
    assert pngs[1].read_bytes() == good  # the intact sample is not redone
    js.write_text("{not json")
    evaluate.run(spec, out, progress=False)
    assert "does not parse" in capsys.readouterr().err
    assert json.loads(js.read_text())["key"].endswith("001_s0")


def test_result_save_writes_a_manifest_and_overwrites_only_its_own_folder(tmp_path, user):
    from types import SimpleNamespace

    from lr_tutorial.pipeline import Result
    img = np.zeros((8, 8, 3), np.uint8)
    fake = SimpleNamespace(
        images=[img], layout=SimpleNamespace(images=[img]),
        reference=SimpleNamespace(image=img, mask=SimpleNamespace(mask=np.zeros((2, 2)))),
        masks=SimpleNamespace(per_step=np.zeros((1, 1, 2, 2)),
                              context=[SimpleNamespace(mask=np.zeros((2, 2)))]),
        prompts=["p"], seeds=[0], config={}, versions={})
    out = Result.save(fake, tmp_path / "res")
    assert set(files.read_manifest(out)["files"]) == {"final_00.png", "layout_00.png",
                                                       "reference.png", "masks.npz", "result.json"}
    Result.save(fake, out, overwrite=True)
    user.file(out / "my-edit.png")
    with pytest.raises(files.OutputError, match="my-edit.png"):
        Result.save(fake, out, overwrite=True)


def test_outputs_get_the_modes_of_plain_files_and_folders(tmp_path):
    import os
    import stat
    old = os.umask(0o022)
    try:
        out = _write(tmp_path / "run")
        with files.atomic_file(out / "final.png") as tmp:
            tmp.write_bytes(b"x")
    finally:
        os.umask(old)
    mode = lambda p: stat.S_IMODE(p.stat().st_mode)  # noqa: E731
    assert mode(out) == 0o755 and mode(out / "final.png") == 0o644
    assert mode(out / files.MANIFEST) == 0o644


def test_train_toy_refuses_an_export_it_could_not_write_before_training(tmp_path, user, no_models,
                                                                       capsys):
    out = tmp_path / "toy"
    user.file(out / "unet" / "config.json", "{}")
    base = ["train-toy", "--ckpt-dir", str(tmp_path / "ckpt"), "--out", str(out)]
    assert cli.main(base) == 2
    err = capsys.readouterr().err
    assert "already holds toy weights" in err and "--overwrite" in err
    assert cli.main(["train-toy", "--ckpt-dir", str(tmp_path / "ckpt"), "--stage", "vae",
                     "--overwrite"]) == 2
    assert "--overwrite" in capsys.readouterr().err
    user.file(tmp_path / "afile")
    assert cli.main(["train-toy", "--ckpt-dir", str(tmp_path / "afile")]) == 2
    assert "is a file" in capsys.readouterr().err
    assert not (tmp_path / "ckpt").exists()  # nothing made before the checks passed


def test_a_manifest_owns_exactly_what_it_lists(tmp_path):
    """With a manifest, a user's file is foreign even when its name looks like an output's
    (final_draft.png matches final_*.png) or like a temporary of ours; without one, names are
    matched segment by segment (`*` never crosses a folder)."""
    from lr_tutorial import files
    out = tmp_path / "out"
    with files.atomic_folder(out, what="generate output") as tmp:
        (tmp / "final_00.png").write_bytes(b"x")
    for name in ("final_draft.png", ".notes.partial.txt"):
        (out / name).write_text("mine")
    assert sorted(files.foreign_files(out, "generate output")) == [".notes.partial.txt",
                                                                   "final_draft.png"]
    bare = tmp_path / "bare"
    (bare / "sub").mkdir(parents=True)
    (bare / "final_00.png").write_bytes(b"x")
    (bare / "sub" / "final_00.png").write_bytes(b"x")
    assert files.foreign_files(bare, "generate output") == ["sub/final_00.png"]
    assert files._matches("samples/v/s/000_s0.png", "samples/**/*.png")
    assert not files._matches("samples/000_s0.txt", "samples/**/*.png")
