"""lr_tutorial.notebook's helpers that let every notebook run on both backends: the toy path is
left exactly as it was, Stable Diffusion gets the bundle's subject, its photos from
$LR_SD_REFERENCE, CLIP / DINO stand-ins for the oracle, and one line for each skipped cell."""
import math
import re
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from lr_tutorial import notebook

ROOT = Path(__file__).resolve().parents[1]
SOURCES = sorted((ROOT / "notebooks" / "src").glob("[0-9][0-9]_*.py"))
TOY = SimpleNamespace(backend="toy", identifier="sks", class_noun="star", image_size=64,
                      device=torch.device("cpu"))
SD = SimpleNamespace(backend="sd", identifier="zwq", class_noun="dog", image_size=32,
                     device=torch.device("cpu"))


# ----------------------------------------------------------------------------- prompts_for
def test_prompts_for_leaves_toy_prompts_untouched():
    ps = ["a sks star on the left in the snow"]
    assert notebook.prompts_for(TOY, ps) is ps
    assert notebook.prompts_for(TOY, "a sks star") == "a sks star"


def test_prompts_for_uses_the_bundles_identifier_and_class_noun():
    assert notebook.prompts_for(SD, "a sks star on the left in the snow") == \
        "a zwq dog on the left in the snow"
    assert notebook.prompts_for(SD, ["a small sks star at night", "a star"]) == \
        ["a small zwq dog at night", "a dog"]
    # whole words only, and a class noun that contains the identifier is not rewritten twice
    assert notebook.prompts_for(SD, "a starry sks star, a starfish") == "a starry zwq dog, a starfish"
    sks = SimpleNamespace(backend="sd", identifier="sks", class_noun="sks-star-toy")
    assert notebook.prompts_for(sks, "a sks star") == "a sks sks-star-toy"


def test_prompts_for_needs_a_class_noun():
    with pytest.raises(ValueError, match="LR_SD_CLASS"):
        notebook.prompts_for(SimpleNamespace(backend="sd", identifier="sks", class_noun=None), "a sks star")


# ----------------------------------------------------------------------------- skipping
def test_toy_only_is_silent_on_toy_and_says_why_on_sd(capsys):
    assert notebook.toy_only(TOY, "the histogram") is True
    assert capsys.readouterr().out == ""
    assert notebook.toy_only(SD, "the histogram") is False
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and "skipped on Stable Diffusion: the histogram" in out
    assert "oracle" in out and "ShapeWorld" in out


def test_have_references(capsys):
    assert notebook.have_references(np.zeros((1, 8, 8, 3), np.uint8), "the swap") is True
    assert capsys.readouterr().out == ""
    assert notebook.have_references(None, "the swap") is False
    out = capsys.readouterr().out
    assert "skipped: the swap" in out and "LR_SD_REFERENCE" in out


# ----------------------------------------------------------------------------- references
def test_reference_images_toy_are_the_subjects_photos(capsys):
    from lr_tutorial.toy.subject import reference_images
    assert np.array_equal(notebook.reference_images(TOY), reference_images())
    assert capsys.readouterr().out == ""


def test_reference_images_sd_from_the_env_folder(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("LR_SD_REFERENCE", raising=False)
    assert notebook.reference_images(SD) is None
    assert "LR_SD_REFERENCE is not set" in capsys.readouterr().out
    monkeypatch.setenv("LR_SD_REFERENCE", str(tmp_path))
    assert notebook.reference_images(SD) is None
    assert "no images in" in capsys.readouterr().out
    for i, colour in enumerate([(255, 0, 0), (0, 0, 255)]):
        Image.new("RGB", (48, 40), colour).save(tmp_path / f"{i}.png")
    (tmp_path / "notes.txt").write_text("not a photo")
    refs = notebook.reference_images(SD)
    assert refs.shape == (2, 32, 32, 3) and refs.dtype == np.uint8
    assert refs[0, 16, 16, 0] > 200 and refs[1, 16, 16, 2] > 200  # sorted by name
    assert "2 from" in capsys.readouterr().out
    assert notebook.reference_images(SD, verbose=False) is not None
    assert capsys.readouterr().out == ""


# ----------------------------------------------------------------------------- scores
class _FakeClip:
    def __init__(self):
        self.texts = None

    def embed(self, images):
        return torch.tensor([[1.0, 0.0]] * len(images))

    def embed_text(self, texts):
        self.texts = list(texts)
        return torch.tensor([[0.6, 0.8]] * len(texts))


class _FakeDino:
    def embed(self, images):
        e = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
        return e[:len(images)]


@pytest.fixture
def fake_metrics(monkeypatch):
    from lr_tutorial import metrics
    clip = _FakeClip()
    monkeypatch.setattr(notebook, "_SCORERS", {})
    monkeypatch.setattr(metrics, "load_clip", lambda **kw: clip)
    monkeypatch.setattr(metrics, "load_dino", lambda **kw: _FakeDino())
    return clip


def test_real_scores_wiring(fake_metrics):
    images = np.zeros((2, 32, 32, 3), np.uint8)
    s = notebook.real_scores(SD, images, ["a zwq dog on the beach", "a dog"], refs=images[:1])
    assert fake_metrics.texts == ["a dog on the beach", "a dog"]  # T_CLIP without the identifier
    assert s["text"] == pytest.approx(0.6)
    assert s["identity"] == pytest.approx(0.5)  # cosines 1 and 0 to the one reference
    assert s["diversity"] == pytest.approx(1.0)
    assert notebook.real_scores(SD, images, ["a dog", "a dog"])["identity"] is None


def test_score_fn(fake_metrics):
    assert notebook.score_fn(TOY) is None  # LambdaExplorer's default: the oracle
    images = np.zeros((2, 32, 32, 3), np.uint8)
    f, i = notebook.score_fn(SD)(images, ["a dog", "a dog"])
    assert f == pytest.approx(0.6) and math.isnan(i)
    f, i = notebook.score_fn(SD, refs=images[:1])(images, ["a dog", "a dog"])
    assert i == pytest.approx(0.5)


def test_missing_metric_weights_skip_with_one_line(monkeypatch, capsys):
    from lr_tutorial import metrics

    def missing(**kw):
        raise metrics.MetricModelNotFoundError("Could not load the CLIP checkpoint\nFixes: ...")
    monkeypatch.setattr(notebook, "_SCORERS", {})
    monkeypatch.setattr(metrics, "load_clip", missing)
    images = np.zeros((2, 32, 32, 3), np.uint8)
    assert notebook.real_scores(SD, images, ["a dog"] * 2) is None
    assert capsys.readouterr().out == "skipped: CLIP / DINO scores (Could not load the CLIP checkpoint)\n"
    f, i = notebook.score_fn(SD)(images, ["a dog"] * 2)  # said once: silent now
    assert math.isnan(f) and math.isnan(i) and capsys.readouterr().out == ""


def test_generate_method_passes_reference_images(monkeypatch):
    from lr_tutorial import pipeline
    from lr_tutorial.toy import report
    seen = []

    class FakeLR:
        def __init__(self, bundle, cfg):
            pass

        def __call__(self, prompts, refs, seed):
            seen.append(refs)
            return SimpleNamespace(images=np.zeros((len(prompts), 4, 4, 3), np.uint8))
    monkeypatch.setattr(pipeline, "LayoutAndRetouch", FakeLR)
    refs = np.ones((1, 4, 4, 3), np.uint8)
    out = report.generate_method(SD, ["a dog"], [0, 1], "layout_and_retouch", progress=False,
                                 reference_images=refs)
    assert out.shape == (2, 4, 4, 3) and seen[0] is refs
    report.generate_method(SD, ["a dog"], [0], "layout_and_retouch", progress=False)
    assert seen[1] is None  # the toy default


# ----------------------------------------------------------------------------- the sources
def _code_cells(src):
    sys.path.insert(0, str(ROOT / "notebooks"))
    import build
    return [c.source for c in build.parse(src.read_text()) if c.cell_type == "code"]


GUARDED = [p for p in SOURCES if "pick_backend()" in p.read_text()]
TOY_ONLY = re.compile(r"oracle\.|report\.(score|summarize|toy_report)\(|heldout\.personal_prompts\(")
GUARD = re.compile(r"toy_only\(|bundle\.backend [!=]= \"toy\"")


def test_every_notebook_on_pick_backend_is_guarded():
    assert len(GUARDED) == 6


@pytest.mark.parametrize("src", GUARDED, ids=lambda p: p.stem)
def test_shapeworld_only_code_is_guarded(src):
    """A cell that reads images with the oracle checks the backend; a toy prompt goes through
    prompts_for; the pipeline is given the reference photos, behind have_references."""
    for code in _code_cells(src):
        if TOY_ONLY.search(code):
            assert GUARD.search(code), f"ShapeWorld-only cell without toy_only():\n{code[:300]}"
        if re.search(r"[\"']a (small |big )?sks star", code) and "toy_only(" not in code:
            assert "prompts_for(" in code, f"toy prompt not passed through prompts_for:\n{code[:300]}"
        if re.search(r"\blr\(|\.reference\(|generate_method\(", code):
            assert "have_references(" in code, f"needs the reference photos:\n{code[:300]}"


# ----------------------------------------------------------------------------- show_source
def test_source_of_is_the_functions_current_source_under_its_file_and_name():
    import inspect
    from lr_tutorial import swap
    header, code = notebook.source_of(swap.multi_source_attention)
    assert header == "lr_tutorial/swap.py, multi_source_attention"
    assert code == inspect.getsource(swap.multi_source_attention)


def test_source_of_a_method_is_dedented_and_named_with_its_class():
    import inspect
    import textwrap
    from lr_tutorial.pipeline import LayoutAndRetouch
    header, code = notebook.source_of(LayoutAndRetouch.__call__)
    assert header == "lr_tutorial/pipeline.py, LayoutAndRetouch.__call__"
    assert code == textwrap.dedent(inspect.getsource(LayoutAndRetouch.__call__))
    assert code.startswith("def __call__(self,")
    # a bound method and a decorated function read the same way
    bound = LayoutAndRetouch.__new__(LayoutAndRetouch).__call__
    assert notebook.source_of(bound) == (header, code)
    from lr_tutorial import retouch
    header, code = notebook.source_of(retouch.retouch)
    assert header == "lr_tutorial/retouch.py, retouch" and code.startswith("@torch.no_grad()\ndef retouch(")


def test_show_source_prints_outside_jupyter(capsys):
    from lr_tutorial import masks
    notebook.show_source(masks.fuse)
    header, code = notebook.source_of(masks.fuse)
    assert capsys.readouterr().out == f"# {header}\n{code}"


def test_show_source_displays_a_python_block_in_jupyter(monkeypatch):
    import IPython
    import IPython.display
    from lr_tutorial.swap import SwapProcessor
    shown = []
    monkeypatch.setattr(IPython, "get_ipython", lambda: SimpleNamespace(kernel=object()))
    monkeypatch.setattr(IPython.display, "display", shown.append)
    notebook.show_source(SwapProcessor.target_attention)
    header, code = notebook.source_of(SwapProcessor.target_attention)
    assert len(shown) == 1 and isinstance(shown[0], IPython.display.Markdown)
    first, rest = shown[0].data.split("\n", 1)
    assert first == f"`{header}`" and header == "lr_tutorial/swap.py, SwapProcessor.target_attention"
    assert rest == f"\n```python\n{code.rstrip()}\n```"
