"""Benchmark specs (lr_tutorial/benchmarks.py, methods.py): the ShapeWorld benchmark, ViCo read
from ../shared/data/vico (skipped when absent) or fetched, the reference-image path on its real
photos, spec files, and config overrides."""
import json
from pathlib import Path

import numpy as np
import pytest

from lr_tutorial import benchmarks, methods
from lr_tutorial.benchmarks import Benchmark, Prompt, Subject
from lr_tutorial.pipeline import LRConfig
from lr_tutorial.toy import world

VICO = Path(__file__).resolve().parents[2] / "shared" / "data" / "vico"
needs_vico = pytest.mark.skipif(not VICO.is_dir(),
                                reason="ViCo benchmark folder ../shared/data/vico absent")


# ----------------------------------------------------------------------------- ShapeWorld
def test_shapeworld_benchmark_has_held_out_normal_and_hard_prompts():
    spec = benchmarks.shapeworld()
    (sub,) = spec.subjects
    assert (sub.identifier, sub.class_noun) == ("sks", "star") and len(sub.references) == 5
    assert all(Path(r).is_file() for r in sub.references)
    cats = [p.category for p in sub.prompts]
    assert len(sub.prompts) >= 40 and cats.count("hard") >= 10 and len(set(spec.seeds)) >= 4
    heldout = set(Path(benchmarks._data() / "prompts" / "heldout_personal.txt").read_text().splitlines())
    for p in sub.prompts:
        text = p.personal(sub)
        assert text in heldout  # never a training caption
        facts = world.parse_prompt(text)
        hard = facts["size"] == "small" and facts["position"] not in (None, "centre")
        assert hard == (p.category == "hard")
    assert set(spec.methods) == set(methods.METHODS)


def test_limit_keeps_every_category_and_spec_files_round_trip(tmp_path):
    spec = benchmarks.shapeworld(lambda1_sweep=[0.1, 0.5], config={"mask.tau_lo": 0.4})
    small = spec.limit(prompts=4, seeds=2)
    cats = [p.category for p in small.subjects[0].prompts]
    assert len(cats) == 4 and cats.count("hard") == 2 and small.seeds == [0, 1]
    assert len(spec.subjects[0].prompts) == 48  # the original is untouched
    for name in ("spec.json", "spec.yaml"):
        again = Benchmark.load(small.save(tmp_path / name))
        assert again == small
    with pytest.raises(ValueError, match="unknown subjects"):
        spec.limit(subjects=["nope"])
    with pytest.raises(FileNotFoundError, match="shapeworld"):
        Benchmark.load(tmp_path / "absent.json")


def test_bad_specs_fail_clearly():
    sub = benchmarks.shapeworld().subjects[0]
    with pytest.raises(ValueError, match="unknown methods"):
        Benchmark("x", [sub], methods=["dreammatcher"])
    with pytest.raises(ValueError, match="sweep only"):
        Benchmark("x", [sub], lambda1_sweep=[0.5], sweep_methods=["vanilla"])
    with pytest.raises(ValueError, match="exactly once"):
        Prompt("a sks star on the left")
    with pytest.raises(ValueError, match="no reference"):
        Subject("s", "star", [], [])
    with pytest.raises(ValueError, match="source 3"):
        Subject("s", "star", ["a.png"], [], source=3)


def test_prompt_texts():
    sub = Subject("dog", "dog", ["a.jpg"], [Prompt("a {} on the beach")])
    p = sub.prompts[0]
    assert p.personal(sub) == "a sks dog on the beach"
    assert p.clip_text(sub) == "a dog on the beach"
    assert p.clip_text(sub, "dreammatcher") == "a {} on the beach"  # as its evaluate.py does


# ----------------------------------------------------------------------------- overrides
def test_config_overrides_and_method_precedence():
    cfg = methods.apply_overrides(LRConfig(), {"layout.lambda1": 0.3, "mask.tau_lo": 0.4,
                                               "mask.attention_fractions": [0.25],
                                               "reference_index": 2})
    assert cfg.layout.lambda1 == 0.3 and cfg.mask.tau_lo == 0.4 and cfg.reference_index == 2
    assert cfg.mask.attention_fractions == (0.25,)
    assert LRConfig().layout.lambda1 is None  # the base is not mutated (None: the backend's own)
    with pytest.raises(ValueError, match="no field 'tau'"):
        methods.apply_overrides(LRConfig(), {"mask.tau": 1})
    with pytest.raises(ValueError, match="tau_lo"):  # sub-config validation runs
        methods.apply_overrides(LRConfig(), {"mask.tau_lo": 0.9})
    # a method's own knobs win over a sweep's
    v = methods.method_config("vanilla", LRConfig(), {"layout.lambda1": 0.5})
    assert v.layout.lambda1 == 1.0
    s = methods.method_config("stage1", LRConfig(), {"layout.lambda1": 0.5})
    assert s.layout.lambda1 == 0.5
    assert methods.method_config("no_swap", LRConfig()).swap.mode == "none"
    assert methods.method_config("reference_swap", LRConfig()).swap.mode == "reference"
    assert methods.method_config("segmenter_mask", LRConfig()).mask.source == "segmenter"
    assert methods.method_config("attention_mask", LRConfig()).mask.source == "attention"
    assert methods.method_config("no_blending", LRConfig()).mask.lambda3 == 0
    assert methods.method_config("adaptive_mask", LRConfig()).mask.adaptive is True
    assert LRConfig().mask.adaptive is False  # docs/method.md "Adaptive mask blending"


# ----------------------------------------------------------------------------- ViCo
@needs_vico
def test_vico_local_folder():
    spec = benchmarks.vico(VICO)
    assert spec.backend == "sd" and len(spec.seeds) == 8
    names = [s.name for s in spec.subjects]
    assert len(names) == 15 and "tortoise_plushy" not in names
    sources = json.loads((VICO / "imgs_source.txt").read_text())
    for s in spec.subjects:
        assert 4 <= len(s.references) <= 12
        assert Path(s.references[s.source]).name == sources[s.name]
        cats = [p.category for p in s.prompts]
        assert cats.count("normal") == 31 and cats.count("challenging") == 24
    dog = next(s for s in spec.subjects if s.name == "brown_dog")
    assert dog.class_noun == "dog" and dog.prompts[0].personal(dog) == "a sks dog in the jungle"
    barn = next(s for s in spec.subjects if s.name == "barn")
    live = (VICO / "prompts_live_objects_challenging.txt").read_text().splitlines()
    nonlive = (VICO / "prompts_nonlive_objects_challenging.txt").read_text().splitlines()
    assert [p.template for p in dog.prompts[31:]] == [x.strip() for x in live if x.strip()]
    assert [p.template for p in barn.prompts[31:]] == [x.strip() for x in nonlive if x.strip()]
    assert live != nonlive
    only = benchmarks.vico(VICO, categories=("challenging",), personalized_dir="/loras")
    assert {p.category for p in only.subjects[0].prompts} == {"challenging"}
    assert only.subjects[0].personalized == "/loras/barn"


def test_vico_missing_folder_and_offline_fetch_fail_with_the_fix(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="--vico"):
        benchmarks.vico(tmp_path / "absent")
    with pytest.raises(FileNotFoundError, match="inputs/ layout"):
        benchmarks.vico(tmp_path)
    # offline: the public source is unreachable (a closed local port)
    with pytest.raises(ConnectionError, match="--vico PATH"):
        benchmarks.fetch_vico(tmp_path / "cache", base_url="http://127.0.0.1:9/", timeout=2)
    assert not any((tmp_path / "cache").rglob("*.jpg"))


@needs_vico
def test_fetch_vico_downloads_and_checks_the_files(tmp_path, monkeypatch):
    import lr_tutorial.vico_files as vf
    keep = [k for k in vf.FILES if k.startswith(("brown_dog/", "prompts_", "imgs_source"))]
    monkeypatch.setattr(vf, "FILES", {k: vf.FILES[k] for k in keep})
    root = benchmarks.fetch_vico(tmp_path / "cache", base_url=VICO.as_uri() + "/")
    for k in keep:
        assert (root / k).read_bytes() == (VICO / k).read_bytes()
    spec = benchmarks.vico(cache=tmp_path / "cache")  # complete cache: no download
    assert [s.name for s in spec.subjects] == ["brown_dog"]
    (root / keep[0]).write_bytes(b"tampered")  # a kept file is not fetched again
    benchmarks.fetch_vico(tmp_path / "cache", base_url="http://127.0.0.1:9/")
    monkeypatch.setattr(vf, "FILES", {keep[0]: "0" * 64})
    (root / keep[0]).unlink()
    with pytest.warns(UserWarning, match="differs"):
        benchmarks.fetch_vico(tmp_path / "cache", base_url=VICO.as_uri() + "/")


@pytest.mark.slow
@needs_vico
def test_real_photos_through_the_reference_path(tmp_path):
    """Loading (JPEG, large, mixed sizes), orientation, centre crop, resize to the model's
    resolution, DDIM inversion and the subject mask, on a tiny SD model."""
    from PIL import Image, ImageOps

    from lr_tutorial.images import load_images
    from lr_tutorial.pipeline import LayoutAndRetouch
    from lr_tutorial.sd import load_sd
    from tiny_sd import make_tiny_lora, make_tiny_sd, tiny_unet

    spec = benchmarks.vico(VICO).limit(subjects=["brown_dog", "barn"])
    make_tiny_sd(tmp_path / "base")
    make_tiny_lora(tiny_unet(), tmp_path / "lora")
    for sub in spec.subjects:
        bundle = load_sd(str(tmp_path / "base"), personalized=str(tmp_path / "lora"),
                         class_noun=sub.class_noun, local_files_only=True)
        refs = load_images(sub.references, bundle.image_size)
        assert refs.shape == (len(sub.references), 64, 64, 3) and refs.dtype == np.uint8
        with Image.open(sub.references[sub.source]) as im:
            up = ImageOps.exif_transpose(im).convert("RGB")
        w, h = up.size
        s = min(w, h)
        crop = up.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s))
        want = np.asarray(crop.resize((64, 64), Image.LANCZOS), np.float32)
        assert np.abs(refs[sub.source].astype(np.float32) - want).mean() < 1.0
        lr = LayoutAndRetouch(bundle, methods.apply_overrides(
            LRConfig(), {"layout.steps": 3, "reference_index": sub.source}))
        ref = lr.reference(refs)
        assert ref.mask.mask.shape == (8, 8) and np.isfinite(ref.mask.mask).all()
        assert ref.mask.mask.max() == 1.0  # the attention peak is always kept (tau_hi)
        np.testing.assert_array_equal(ref.image, refs[sub.source])
