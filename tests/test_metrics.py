"""Metrics (lr_tutorial/metrics.py) on tiny random-weight DINO / CLIP models built from configs,
the exact preprocessing of both protocols, diversity, the ShapeWorld analogues, clear errors
offline, and the real checkpoints when they are in the Hugging Face cache."""
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lr_tutorial import metrics
from lr_tutorial.metrics import (ClipScorer, DinoScorer, Protocol, class_prompt, identity_similarity,
                                 layout_diversity, mask_layout, pairwise_diversity, text_similarity)
from lr_tutorial.toy import world

from tiny_sd import tiny_tokenizer

VICO = Path(__file__).resolve().parents[2] / "shared" / "data" / "vico"


@pytest.fixture(scope="module")
def dino():
    from transformers import ViTConfig, ViTModel
    torch.manual_seed(0)
    cfg = ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2,
                    num_attention_heads=2, intermediate_size=37)
    return DinoScorer(ViTModel(cfg, add_pooling_layer=False))


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    from transformers import CLIPConfig, CLIPModel
    tok = tiny_tokenizer(tmp_path_factory.mktemp("tok"))
    torch.manual_seed(0)
    cfg = CLIPConfig(
        text_config=dict(vocab_size=len(tok), hidden_size=32, intermediate_size=37,
                         num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=77,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id),
        vision_config=dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=37,
                           num_hidden_layers=2, num_attention_heads=2),
        projection_dim=16)
    return ClipScorer(CLIPModel(cfg), tok)


def _images(n, seed=0, size=64):
    rng = np.random.default_rng(seed)
    return [world.render(world.sample_scene(rng)) for _ in range(n)] if size == 64 else \
        [(rng.random((size, size + 20, 3)) * 255).astype(np.uint8) for _ in range(n)]


# ----------------------------------------------------------------------------- preprocessing
def test_protocols_preprocess_exactly_as_documented():
    img = np.zeros((100, 200, 3), np.uint8)
    img[:, 50:150] = 255  # the centre square white, the sides black
    ours, dm = Protocol("ours"), Protocol("dreammatcher")
    x = ours.dino([img], 224)
    assert x.shape == (1, 3, 224, 224)
    # centre crop of the white square, ImageNet-normalized: (1 - mean) / std everywhere
    want = (1 - torch.tensor(metrics.IMAGENET_MEAN)) / torch.tensor(metrics.IMAGENET_STD)
    torch.testing.assert_close(x[0].mean((1, 2)), want, atol=1e-3, rtol=0)
    y = dm.dino([img], 224)
    assert y.shape == (1, 3, 256, 256)  # the whole image squashed to 256, no crop
    assert y.min() == pytest.approx(-1, abs=1e-3) and y.max() == pytest.approx(1, abs=1e-3)
    assert y[0, :, 128, 5].mean() < -0.9 and y[0, :, 128, 128].mean() > 0.9  # black sides kept
    c = ours.clip([img], 224)
    want = (1 - torch.tensor(metrics.CLIP_MEAN)) / torch.tensor(metrics.CLIP_STD)
    torch.testing.assert_close(c[0, :, 8:-8, 8:-8].mean((1, 2)), want, atol=1e-3, rtol=0)
    assert not torch.allclose(dm.clip([img], 224), c)  # the squash changes CLIP's view too
    with pytest.raises(ValueError, match="protocol"):
        Protocol("theirs")
    with pytest.raises(ValueError, match="uint8"):
        ours.dino([np.zeros((8, 8), np.float32)], 224)


def test_exif_is_applied_only_by_our_protocol(tmp_path):
    arr = np.zeros((20, 40, 3), np.uint8)
    img = Image.fromarray(arr)
    exif = img.getexif()
    exif[0x0112] = 6
    p = tmp_path / "rot.jpg"
    img.save(p, exif=exif)
    assert Protocol("ours").load_photo(p).size == (20, 40)
    assert Protocol("dreammatcher").load_photo(p).size == (40, 20)


# ----------------------------------------------------------------------------- tiny models
@pytest.mark.parametrize("protocol", ["ours", "dreammatcher"])
def test_dino_embeddings_are_unit_finite_and_identical_images_have_cosine_one(dino, protocol):
    dino.protocol = Protocol(protocol)
    imgs = _images(3)
    e = dino.embed(imgs)
    assert e.shape == (3, 32) and torch.isfinite(e).all()
    torch.testing.assert_close(e.norm(dim=-1), torch.ones(3))
    again = dino.embed([imgs[0], imgs[0]])
    sim = identity_similarity(again, e[:1])
    np.testing.assert_allclose(sim, [1.0, 1.0], atol=1e-5)
    s = (e @ e.T).numpy()
    np.testing.assert_allclose(s, s.T, atol=1e-6)  # symmetric
    assert not np.allclose(s[0, 1], 1.0)  # different images differ, so the test can fail
    dino.protocol = Protocol("ours")


def test_dino_batching_does_not_change_embeddings(dino):
    imgs = _images(5)
    dino.batch = 2
    a = dino.embed(imgs)
    dino.batch = 32
    torch.testing.assert_close(a, dino.embed(imgs), atol=1e-5, rtol=0)


def test_clip_image_and_text_scores(clip):
    imgs = _images(2)
    e = clip.embed(imgs)
    assert e.shape == (2, 16) and torch.isfinite(e).all()
    np.testing.assert_allclose(identity_similarity(clip.embed(imgs[:1]), e[:1]), [1.0], atol=1e-5)
    t = clip.embed_text(["a dog on the beach", "a red star"])
    assert t.shape == (2, 16)
    torch.testing.assert_close(t.norm(dim=-1), torch.ones(2))
    ts = text_similarity(e, t)
    assert ts.shape == (2,) and np.all(np.abs(ts) <= 1 + 1e-6)
    full = (e @ t.T).numpy()
    np.testing.assert_allclose(ts, np.diag(full), atol=1e-6)
    torch.testing.assert_close(clip.embed_text(["a red star"]), t[1:], atol=1e-5, rtol=0)


def test_class_prompt_replaces_the_identifier_by_the_class_noun():
    assert class_prompt("a sks dog on the beach", "sks") == "a dog on the beach"
    assert class_prompt("a photo of sks dog", "sks") == "a photo of dog"


# ----------------------------------------------------------------------------- diversity
def test_pairwise_diversity():
    e = torch.eye(3)
    assert pairwise_diversity(e) == pytest.approx(1.0)  # orthogonal: 1 - 0
    assert pairwise_diversity(torch.ones(4, 5)) == pytest.approx(0.0, abs=1e-6)
    assert pairwise_diversity(torch.ones(1, 5)) is None
    two = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    assert pairwise_diversity(two) == pytest.approx(1 - 2 ** -0.5)


def test_layout_diversity_from_masks():
    def square(x0, y0, s):
        m = np.zeros((64, 64), bool)
        m[y0:y0 + s, x0:x0 + s] = True
        return m

    d = mask_layout(square(0, 0, 32))
    assert d == pytest.approx({"cx": 0.25, "cy": 0.25, "area": 0.25})
    assert mask_layout(np.zeros((8, 8))) is None
    same = layout_diversity([mask_layout(square(10, 10, 20))] * 3)
    assert same["centroid_spread"] == pytest.approx(0) and same["area_spread"] == pytest.approx(0)
    spread = layout_diversity([mask_layout(square(0, 0, 16)), mask_layout(square(48, 48, 16)), None])
    assert spread["centroid_spread"] == pytest.approx(np.hypot(0.375, 0.375))
    assert spread["area_spread"] == pytest.approx(0)
    sizes = layout_diversity([mask_layout(square(0, 0, 16)), mask_layout(square(0, 0, 32))])
    assert sizes["area_spread"] == pytest.approx((0.25 - 0.0625) / 2)
    assert layout_diversity([None, mask_layout(square(0, 0, 4))])["centroid_spread"] is None


# ----------------------------------------------------------------------------- ShapeWorld
def test_toy_scores_read_rendered_scenes():
    rng = np.random.default_rng(3)
    scenes = [world.subject_scene(rng, position="left", size="big", background="snow"),
              world.sample_scene(rng, shape="circle", colour="red", position="right",
                                 background="grass")]
    imgs = np.stack([world.render(s) for s in scenes])
    rows = metrics.toy_scores(imgs, ["a big sks star on the left in the snow",
                                     "a blue circle at the top on the grass"])
    assert rows[0]["fidelity"] == 1.0 and rows[0]["identity"] > 0.8
    assert rows[1]["fidelity"] == 0.5  # shape, background yes; colour, position no
    assert rows[1]["identity"] < 0.3
    assert rows[0]["layout"]["cx"] < 0.4 < 0.6 < rows[1]["layout"]["cx"]
    s = metrics.toy_summary(rows)
    assert s["images"] == 2 and s["fidelity"]["shape"] == 1.0


# ----------------------------------------------------------------------------- loading
def test_missing_checkpoints_fail_with_the_fix():
    for load, option in ((metrics.load_dino, "--dino"), (metrics.load_clip, "--clip")):
        with pytest.raises(metrics.MetricModelNotFoundError) as e:
            load("lr-tutorial-tests/no-such-model", local_files_only=True)
        msg = str(e.value)
        assert "hf download lr-tutorial-tests/no-such-model" in msg and option in msg
    with pytest.raises(metrics.MetricModelNotFoundError, match="--local-dir /nope/dino"):
        metrics.load_dino("/nope/dino")


def test_tiny_models_load_from_a_local_folder(tmp_path, dino):
    dino.model.save_pretrained(tmp_path / "dino")
    loaded = metrics.load_dino(str(tmp_path / "dino"))
    imgs = _images(2)
    torch.testing.assert_close(loaded.embed(imgs), dino.embed(imgs))


def _cached(repo: str) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache
        return isinstance(try_to_load_from_cache(repo, "config.json"), str)
    except Exception:
        return False


@pytest.mark.slow
@pytest.mark.skipif(not (_cached(metrics.DINO_ID) and _cached(metrics.CLIP_ID)),
                    reason=f"real checkpoints not in the Hugging Face cache (pre-download: "
                           f"hf download {metrics.DINO_ID}; hf download {metrics.CLIP_ID})")
@pytest.mark.skipif(not VICO.is_dir(), reason="ViCo benchmark folder ../shared/data/vico absent")
def test_real_checkpoints_rank_a_subjects_own_photos_first():
    dino, clip = metrics.load_dino(local_files_only=True), metrics.load_clip(local_files_only=True)
    p = Protocol("ours")
    dogs = [p.load_photo(f) for f in sorted((VICO / "brown_dog").iterdir())[:3]]
    barn = [p.load_photo(f) for f in sorted((VICO / "barn").iterdir())[:3]]
    for scorer in (dino, clip):
        e_dog, e_barn = scorer.embed(dogs), scorer.embed(barn)
        assert identity_similarity(e_dog[:1], e_dog[1:]) > identity_similarity(e_dog[:1], e_barn)
    t = clip.embed_text(["a photo of a dog", "a photo of a barn"])
    assert (clip.embed(dogs[:1]) @ t.T).argmax() == 0
