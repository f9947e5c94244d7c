"""Adaptive mask recipe (lr_tutorial/masks.py): normalization, SAM prompts, segmenters, fusion
rules, feathering, and the safety of loading SAM checkpoints."""
import warnings

import numpy as np
import pytest
import torch
from scipy import ndimage

from lr_tutorial.masks import (FusedMask, MaskConfig, SamSegmenter, ShapeWorldSegmenter, feather,
                               fuse, normalize, resize, segmenter_prompts, subject_mask)
from lr_tutorial.toy import world

H_LAT, H_IMG = 16, 64  # latent maps are 16x16, segmenter masks / images 64x64


def _square(side, y0, y1, x0, x1, value=1.0):
    a = np.zeros((side, side), np.float32)
    a[y0:y1, x0:x1] = value
    return a


def _iou(a, b):
    a, b = np.asarray(a, bool), np.asarray(b, bool)
    return (a & b).sum() / max((a | b).sum(), 1)


# ----------------------------------------------------------------------------- config
def test_mask_config_validates_thresholds_and_feather():
    MaskConfig()
    with pytest.raises(ValueError, match="tau_lo"):
        MaskConfig(tau_lo=0.8, tau_hi=0.5)
    with pytest.raises(ValueError, match="feather"):
        MaskConfig(feather=-1)


# ----------------------------------------------------------------------------- normalize / resize
def test_normalize_is_min_max_per_map():
    rng = np.random.default_rng(0)
    scale = np.array([1, 10, 0.1], np.float32)[:, None, None]
    a = rng.normal(size=(3, 8, 8)).astype(np.float32) * scale \
        + np.array([5, -3, 2], np.float32)[:, None, None]
    n = normalize(torch.as_tensor(a))
    assert n.shape == a.shape and n.dtype == np.float32
    for i in range(3):  # each map separately, not the batch jointly
        assert n[i].min() == pytest.approx(0, abs=1e-6) and n[i].max() == pytest.approx(1, abs=1e-6)
        expect = (a[i] - a[i].min()) / (a[i].max() - a[i].min())
        np.testing.assert_allclose(n[i], expect, atol=1e-5)
    # a single (h, w) map
    m = normalize(a[1])
    assert m.shape == (8, 8)
    np.testing.assert_allclose(m, n[1], atol=1e-6)
    # a constant map does not divide by zero
    c = normalize(np.full((4, 4), 3.0))
    assert np.isfinite(c).all() and np.all(c == 0)


def test_resize_shapes_and_area_downsampling_preserves_mean():
    rng = np.random.default_rng(1)
    mask = ndimage.binary_opening(rng.random((64, 64)) < 0.4, iterations=1)
    mask[20:45, 10:50] = True
    small = resize(mask, 16)
    assert small.shape == (16, 16)
    assert small.min() >= 0 and small.max() <= 1
    assert small.mean() == pytest.approx(mask.mean(), abs=1e-4)  # area pooling keeps the mean
    batch = resize(np.stack([mask, ~mask]).astype(np.float32), 16)
    assert batch.shape == (2, 16, 16)
    np.testing.assert_allclose(batch[0], small, atol=1e-6)
    np.testing.assert_allclose(batch[0] + batch[1], 1.0, atol=1e-5)
    up = resize(small, 64)  # bilinear when enlarging
    assert up.shape == (64, 64)
    assert up.mean() == pytest.approx(mask.mean(), abs=0.02)


# ----------------------------------------------------------------------------- prompts
def test_segmenter_prompts_points_and_box():
    cfg = MaskConfig(n_positive=3, n_negative=2, tau_lo=0.3)
    attn = np.full((H_LAT, H_LAT), 0.1, np.float32)
    attn[4:9, 6:12] = 0.5  # support: rows 4..8, cols 6..11
    # peaks, in decreasing order, at (row, col)
    attn[5, 10], attn[7, 6], attn[4, 8] = 1.0, 0.9, 0.8
    # the two lowest pixels
    attn[14, 1], attn[0, 15] = 0.0, 0.01
    pts, labels, box = segmenter_prompts(attn, H_IMG, cfg)
    s = H_IMG / H_LAT
    assert pts.shape == (5, 2) and labels.tolist() == [1, 1, 1, 0, 0]
    expect_pos = [((c + 0.5) * s, (r + 0.5) * s) for r, c in [(5, 10), (7, 6), (4, 8)]]  # (x, y)
    expect_neg = [((c + 0.5) * s, (r + 0.5) * s) for r, c in [(14, 1), (0, 15)]]
    np.testing.assert_allclose(pts[:3], expect_pos)
    np.testing.assert_allclose(pts[3:], expect_neg)
    # the points lie on the pixels they were drawn from (x indexes columns, y rows)
    for (x, y), lab in zip(pts, labels):
        v = attn[int(y // s), int(x // s)]
        assert (v >= 0.8) if lab == 1 else (v <= 0.01)
    # the box covers the support exactly: [x0, y0, x1, y1] in image pixels
    np.testing.assert_allclose(box, [6 * s, 4 * s, 12 * s, 9 * s])
    ys, xs = np.nonzero(attn >= cfg.tau_lo)
    assert box[0] <= xs.min() * s and box[2] >= (xs.max() + 1) * s
    assert box[1] <= ys.min() * s and box[3] >= (ys.max() + 1) * s


# ----------------------------------------------------------------------------- fusion rules
def _blob_case():
    """Attention: a confident 6x6 blob plus stray noise; segmenter: the blob (at 64 px)."""
    attn = _square(H_LAT, 5, 11, 5, 11, 0.9)
    seg = _square(H_IMG, 20, 44, 20, 44) > 0
    return attn, seg


def test_fuse_drops_attention_noise_outside_the_segmenter_mask():
    cfg = MaskConfig(tau_lo=0.3, tau_hi=0.7, feather=1.0)
    attn, seg = _blob_case()
    attn[1, 1] = attn[1, 2] = 0.5  # above tau_lo, below tau_hi, where the segmenter says no
    attn[14, 13] = 0.6
    f = fuse(attn, seg, cfg)
    assert isinstance(f, FusedMask)
    assert f.mask.shape == f.support.shape == f.segmenter.shape == (H_LAT, H_LAT)
    for r, c in [(1, 1), (1, 2), (14, 13)]:
        assert attn[r, c] >= cfg.tau_lo and not f.segmenter[r, c]
        assert not f.support[r, c]
        assert f.mask[r, c] < 1e-6
    # inside, the support is the blob where both agree, and the mask is 1 deep inside
    np.testing.assert_array_equal(f.support, _square(H_LAT, 5, 11, 5, 11) > 0)
    assert f.mask[8, 8] == 1.0
    # without the segmenter the same noise would be kept: the rule is what drops it
    no_seg = fuse(attn, np.ones((H_IMG, H_IMG), bool), cfg)
    assert no_seg.support[1, 1] and no_seg.mask[1, 1] > 0.4


def test_fuse_keeps_noise_above_tau_hi_even_outside_the_segmenter_mask():
    cfg = MaskConfig(tau_lo=0.3, tau_hi=0.7, feather=1.0)
    attn, seg = _blob_case()
    attn[1, 1] = 0.75
    f = fuse(attn, seg, cfg)
    assert not f.support[1, 1] and f.mask[1, 1] == 1.0


def test_fuse_adds_back_confident_attention_the_segmenter_missed():
    cfg = MaskConfig(tau_lo=0.3, tau_hi=0.7, feather=2.0)
    attn = _square(H_LAT, 4, 12, 4, 12, 0.5)
    attn[4:12, 9:12] = 0.95  # the right part is confident ...
    seg = _square(H_IMG, 16, 48, 16, 36) > 0  # ... but the segmenter only found cols 4..8
    f = fuse(attn, seg, cfg)
    assert not f.support[4:12, 9:12].any()  # not in the support
    assert np.all(f.mask[4:12, 9:12] == 1.0)  # but in the final mask
    # the unconfident part the segmenter missed is not added back
    attn2 = attn.copy()
    attn2[4:12, 9:12] = 0.6
    g = fuse(attn2, seg, cfg)
    assert np.all(g.mask[4:12, 10:12] < 1.0)
    assert g.mask[4:12, 11].max() < 0.2
    # and M is a valid soft mask
    assert f.mask.dtype == np.float32 and f.mask.min() >= 0 and f.mask.max() <= 1


def test_fuse_resizes_the_segmenter_mask_by_majority():
    cfg = MaskConfig()
    attn = np.ones((H_LAT, H_LAT), np.float32) * 0.5
    seg = np.zeros((H_IMG, H_IMG), bool)
    seg[0:4, 0:4] = True  # a full latent pixel
    seg[0:4, 4:6] = True  # half of one (area 0.5 -> kept by >= 0.5)
    seg[0:1, 8:12] = True  # a quarter of one (dropped)
    f = fuse(attn, seg, cfg)
    assert f.segmenter[0, 0] and f.segmenter[0, 1] and not f.segmenter[0, 2]
    assert f.segmenter.sum() == 2


# ----------------------------------------------------------------------------- feather
def _disc(side=48, r=12.0):
    yy, xx = np.mgrid[:side, :side]
    return (yy - side / 2 + 0.5) ** 2 + (xx - side / 2 + 0.5) ** 2 <= r ** 2


@pytest.mark.parametrize("width", [0.5, 1.0, 2.0, 4.0])
def test_feather_is_monotone_and_bounded(width):
    b = _disc()
    m = feather(b, width)
    assert m.shape == b.shape and m.dtype == np.float32
    assert m.min() >= 0 and m.max() <= 1
    c = b.shape[0] // 2
    for line in (m[c, c:], m[c:, c], m[c, c::-1], np.diagonal(m)[c:]):  # centre outwards
        assert np.all(np.diff(line) <= 1e-6)
    assert m[c, c] == 1.0  # deep inside
    assert m[0, 0] == 0.0 and m[c, -1] == 0.0  # far outside
    assert np.all(m[b] >= 0.5) and np.all(m[~b] <= 0.5)  # the 0.5 level is the boundary


@pytest.mark.parametrize("width", [1.0, 2.0, 3.0])
def test_feather_is_one_half_at_the_boundary(width):
    b = np.zeros((20, 20), bool)
    b[:, :10] = True  # a straight edge between columns 9 and 10
    m = feather(b, width)
    row = m[10]
    # the pixels straddling the edge are 1/2 +- (1/2) / (2 w): their midpoint is 1/2
    assert row[9] == pytest.approx(0.5 + 0.25 / width)
    assert row[10] == pytest.approx(0.5 - 0.25 / width)
    assert (row[9] + row[10]) / 2 == pytest.approx(0.5)


def _scipy_normalize(a):
    flat = a.reshape(-1, a.shape[-2] * a.shape[-1]) if a.ndim == 3 else a.reshape(1, -1)
    lo, hi = flat.min(1, keepdims=True), flat.max(1, keepdims=True)
    return ((flat - lo) / np.maximum(hi - lo, 1e-8)).reshape(a.shape)


def _scipy_feather(binary, width):
    """The recipe with scipy's exact Euclidean distance transform: the reference numbers."""
    from scipy import ndimage
    if width <= 0 or not binary.any() or binary.all():
        return binary.astype(np.float32)
    sd = ndimage.distance_transform_edt(binary) - ndimage.distance_transform_edt(~binary)
    sd = np.where(binary, sd - 0.5, sd + 0.5)
    return np.clip(0.5 + sd / (2 * width), 0.0, 1.0).astype(np.float32)


def test_normalize_and_feather_match_numpy_and_scipy_exactly():
    """normalize_maps / feather_maps (torch, on the maps' device: stage 2's adaptive mask runs
    them on the GPU) and their host wrappers normalize / feather must give numpy's min-max and
    scipy's distance-transform numbers exactly, edge cases included: a constant map, an empty
    and a full mask, width 0, non-square maps."""
    from lr_tutorial.masks import feather_maps, normalize_maps
    rng = np.random.default_rng(0)
    for trial in range(40):
        h, w = (int(x) for x in rng.integers(1, 24, 2))
        a = (rng.random((3, h, w)) ** 3).astype(np.float32)
        a[1] = 0.25 if trial % 5 == 0 else a[1]  # constant: the 1e-8 floor
        want_n = _scipy_normalize(a)
        n = normalize_maps(torch.as_tensor(a))
        assert n.dtype == torch.float32 and np.array_equal(n.numpy(), want_n)
        assert np.array_equal(normalize(a), want_n) and np.array_equal(normalize(a[0]), want_n[0])
        for tau in (0.1, 0.3, 0.7):
            b = want_n >= tau
            if trial % 4 == 0:
                b[0], b[2] = True, False  # full and empty maps stay binary
            for width in (0.0, 0.5, 1.0, 2.5):
                want = np.stack([_scipy_feather(x, width) for x in b])
                got = feather_maps(torch.as_tensor(b), width)
                assert got.dtype == torch.float32 and np.array_equal(got.numpy(), want), \
                    (trial, tau, width)
                assert np.array_equal(feather(b[1], width), want[1])
    soft = feather(_disc(), 2.0)  # a real feathered edge, not only 0/1 pixels
    assert ((soft > 0) & (soft < 1)).sum() > 100
    assert np.array_equal(soft, _scipy_feather(_disc(), 2.0))
    with pytest.raises(ValueError, match="feather_maps"):
        feather(np.zeros((2, 4, 4), bool), 1.0)


def test_feather_width_zero_returns_the_binary_mask():
    b = _disc()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # returned directly, not via a division by zero
        np.testing.assert_array_equal(feather(b, 0), b.astype(np.float32))
    # empty and full masks have no boundary: returned as they are
    np.testing.assert_array_equal(feather(np.zeros((8, 8), bool), 2.0), 0)
    np.testing.assert_array_equal(feather(np.ones((8, 8), bool), 2.0), 1)


def test_wider_feather_gives_wider_transition():
    b = _disc()
    c = b.shape[0] // 2
    widths = [0.5, 1.0, 2.0, 4.0]
    ramp = [int(((feather(b, w)[c] > 0) & (feather(b, w)[c] < 1)).sum()) for w in widths]
    assert all(r1 < r2 for r1, r2 in zip(ramp, ramp[1:])), ramp
    soft = [int(((feather(b, w) > 0.01) & (feather(b, w) < 0.99)).sum()) for w in widths]
    assert all(s1 < s2 for s1, s2 in zip(soft, soft[1:])), soft
    # and the soft mask's mass stays close to the binary area (the ramp is centred on the edge)
    for w in widths:
        assert feather(b, w).sum() == pytest.approx(b.sum(), rel=0.05)


# ----------------------------------------------------------------------------- ShapeWorld segmenter
def _synthetic_attention(true_mask, rng, noise=0.05):
    """A cross-attention-like map at 16x16: the true mask pooled, blurred, with noise."""
    a = resize(true_mask.astype(np.float32), H_LAT)
    a = ndimage.gaussian_filter(a, 1.0)
    a = a + rng.normal(0, noise, a.shape).astype(np.float32)
    return normalize(a)


def test_shapeworld_segmenter_recovers_the_shape_from_attention_prompts():
    rng = np.random.default_rng(1234)
    seg, cfg = ShapeWorldSegmenter(), MaskConfig()
    ious = []
    for _ in range(50):
        scene = world.sample_scene(rng)
        image = world.render(scene)
        truth = world.shape_mask(scene.shape, scene.centre, scene.radius, scene.rotation) > 0.5
        attn = _synthetic_attention(truth, rng)
        seg.set_image(image)
        pts, labels, box = segmenter_prompts(attn, H_IMG, cfg)
        out, scores, logits = seg.predict(point_coords=pts, point_labels=labels, box=box,
                                          multimask_output=False)
        assert out.shape == (1, H_IMG, H_IMG) and out.dtype == bool
        assert scores.shape == (1,) and np.isfinite(scores).all()
        ious.append(_iou(out[0], truth))
    assert np.mean(ious) >= 0.9, (np.mean(ious), np.min(ious))
    assert np.min(ious) >= 0.6, np.min(ious)


def test_shapeworld_segmenter_falls_back_to_the_largest_component_in_the_box():
    scene = world.sample_scene(np.random.default_rng(3), position="left", size="big")
    image = world.render(scene)
    truth = world.shape_mask(scene.shape, scene.centre, scene.radius) > 0.5
    seg = ShapeWorldSegmenter()
    seg.set_image(image)
    ys, xs = np.nonzero(truth)
    box = np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], np.float32)
    out, scores, _ = seg.predict(box=box)  # no points at all
    assert scores[0] == 1.0 and _iou(out[0], truth) >= 0.85
    # a positive point on the background and a box of empty background finds nothing
    out, scores, _ = seg.predict(point_coords=np.array([[60.0, 60.0]]), point_labels=np.array([1]),
                                 box=np.array([54, 54, 64, 64], np.float32))
    assert scores[0] == 0.0 and not out.any()


def test_shapeworld_segmenter_keeps_only_the_prompted_object_with_holes_filled():
    img = np.full((H_IMG, H_IMG, 3), world.BACKGROUNDS["plain"], np.uint8)
    ring = np.zeros((H_IMG, H_IMG), bool)
    ring[36:58, 4:26] = True
    ring[42:52, 10:20] = False  # a hole, filled in the output
    blob = np.zeros((H_IMG, H_IMG), bool)
    blob[4:26, 36:58] = True  # where the ring's point lands if x and y are swapped
    img[ring] = world.COLOURS["red"]
    img[blob] = world.COLOURS["blue"]
    filled = ring.copy()
    filled[42:52, 10:20] = True
    seg = ShapeWorldSegmenter()
    seg.set_image(img)
    # positive point on the ring (x=6, y=47), negative point on the background
    out, scores, _ = seg.predict(point_coords=np.array([[6.0, 47.0], [32.0, 32.0]]),
                                 point_labels=np.array([1, 0]))
    np.testing.assert_array_equal(out[0], filled)
    assert scores[0] == 1.0
    # a negative point on an object does not select it
    out, _, _ = seg.predict(point_coords=np.array([[6.0, 47.0], [47.0, 6.0]]),
                            point_labels=np.array([1, 0]))
    np.testing.assert_array_equal(out[0], filled)
    # both prompted: both kept
    out, _, _ = seg.predict(point_coords=np.array([[6.0, 47.0], [47.0, 6.0]]),
                            point_labels=np.array([1, 1]))
    np.testing.assert_array_equal(out[0], filled | blob)


def test_subject_mask_with_shapeworld_segmenter_matches_the_shape():
    rng = np.random.default_rng(7)
    scene = world.sample_scene(rng, size="big", position="centre")
    image = world.render(scene)
    truth = world.shape_mask(scene.shape, scene.centre, scene.radius) > 0.5
    attn = _synthetic_attention(truth, rng) * 7.3 - 2.0  # un-normalized, as aggregated
    f = subject_mask(image, attn, ShapeWorldSegmenter(), MaskConfig())
    lat_truth = resize(truth, H_LAT) >= 0.5
    assert f.attention.min() == pytest.approx(0) and f.attention.max() == pytest.approx(1)
    assert _iou(f.segmenter, lat_truth) >= 0.85
    assert _iou(f.mask > 0.5, lat_truth) >= 0.7
    # the ablation without a segmenter runs and gives the feathered attention support
    g = subject_mask(image, attn, None, MaskConfig())
    np.testing.assert_array_equal(g.support, f.attention >= MaskConfig().tau_lo)
    # mask sources (ablations): attention-only ignores the segmenter; segmenter-only is the
    # feathered segmenter mask, without attention support or confident regions
    a = subject_mask(image, attn, ShapeWorldSegmenter(), MaskConfig(source="attention"))
    np.testing.assert_array_equal(a.mask, g.mask)
    s = subject_mask(image, attn, ShapeWorldSegmenter(), MaskConfig(source="segmenter"))
    np.testing.assert_array_equal(s.support, f.segmenter)
    np.testing.assert_array_equal(s.mask, feather(f.segmenter, MaskConfig().feather))
    assert not np.array_equal(s.mask, f.mask) or not np.array_equal(a.mask, f.mask)
    with pytest.raises(ValueError, match="needs a segmenter"):
        subject_mask(image, attn, None, MaskConfig(source="segmenter"))
    with pytest.raises(ValueError, match="mask source"):
        MaskConfig(source="sam")


# ----------------------------------------------------------------------------- SAM segmenter
def _tiny_sam():
    from functools import partial

    from segment_anything.modeling import (ImageEncoderViT, MaskDecoder, PromptEncoder, Sam,
                                           TwoWayTransformer)
    torch.manual_seed(0)
    sam = Sam(
        image_encoder=ImageEncoderViT(
            img_size=64, patch_size=8, embed_dim=32, depth=1, num_heads=2, out_chans=32,
            mlp_ratio=2.0, norm_layer=partial(torch.nn.LayerNorm, eps=1e-6), use_rel_pos=True,
            window_size=0, global_attn_indexes=(0,)),
        prompt_encoder=PromptEncoder(embed_dim=32, image_embedding_size=(8, 8),
                                     input_image_size=(64, 64), mask_in_chans=4),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=3, transformer_dim=32,
            transformer=TwoWayTransformer(depth=1, embedding_dim=32, mlp_dim=64, num_heads=2),
            iou_head_depth=2, iou_head_hidden_dim=16),
    )
    return sam.eval()


def test_sam_segmenter_with_a_tiny_model_has_the_predictor_interface():
    sam = _tiny_sam()
    seg = SamSegmenter(sam=sam)
    image = world.render(world.sample_scene(np.random.default_rng(0)))
    seg.set_image(image)
    pts = np.array([[30.0, 30.0], [2.0, 2.0]], np.float32)
    with torch.no_grad():
        out, scores, logits = seg.predict(point_coords=pts, point_labels=np.array([1, 0]),
                                          box=np.array([10, 10, 50, 50], np.float32))
    assert out.shape == (1, 64, 64) and out.dtype == bool
    assert scores.shape == (1,) and np.isfinite(scores).all()
    assert np.isfinite(logits).all()
    multi, mscores, _ = seg.predict(point_coords=pts, point_labels=np.array([1, 0]),
                                    multimask_output=True)
    assert multi.shape == (3, 64, 64) and mscores.shape == (3,)


def test_subject_mask_runs_end_to_end_with_sam_segmenter():
    seg = SamSegmenter(sam=_tiny_sam())
    rng = np.random.default_rng(2)
    scene = world.sample_scene(rng)
    image = world.render(scene)
    truth = world.shape_mask(scene.shape, scene.centre, scene.radius, scene.rotation) > 0.5
    attn = _synthetic_attention(truth, rng)
    f = subject_mask(image, attn, seg, MaskConfig())
    assert f.mask.shape == f.segmenter.shape == f.support.shape == (H_LAT, H_LAT)
    assert np.isfinite(f.mask).all() and f.mask.min() >= 0 and f.mask.max() <= 1
    assert np.array_equal(f.support, (f.attention >= MaskConfig().tau_lo) & f.segmenter)
    # the confident attention is in M whatever the random SAM said
    assert np.all(f.mask[f.attention >= MaskConfig().tau_hi] == 1.0)


# ----------------------------------------------------------------------------- checkpoint safety
def test_sam_checkpoint_missing_file_says_how_to_get_one(tmp_path):
    with pytest.raises(FileNotFoundError) as e:
        SamSegmenter(checkpoint=tmp_path / "sam_vit_b_01ec64.pth")
    msg = str(e.value)
    assert "Download" in msg and "segment-anything" in msg
    assert "ShapeWorldSegmenter" in msg
    with pytest.raises(ValueError, match="checkpoint"):
        SamSegmenter()


def test_sam_checkpoint_without_image_encoder_is_refused(tmp_path):
    p = tmp_path / "foo.pth"
    torch.save({"foo": torch.zeros(1)}, p)
    with pytest.raises(ValueError, match="not a SAM checkpoint"):
        SamSegmenter(checkpoint=p)


class _Payload:
    """Would record that it ran if unpickling executed code from the file."""
    ran = False

    def __reduce__(self):
        return (_mark_ran, ())


def _mark_ran():
    _Payload.ran = True
    return {"image_encoder.x": torch.zeros(1)}


class _Plain:
    def __init__(self):
        self.image_encoder = torch.zeros(1)


@pytest.mark.parametrize("obj", [_Payload(), _Plain()], ids=["reduce-callable", "class-instance"])
def test_sam_checkpoint_with_python_objects_is_refused_without_running_code(tmp_path, obj):
    p = tmp_path / "evil.pth"
    torch.save(obj, p)
    _Payload.ran = False
    with pytest.raises(ValueError, match="not a loadable SAM checkpoint"):
        SamSegmenter(checkpoint=p)
    assert not _Payload.ran
    # the same file does run code with a full (unsafe) load: the test would catch a regression
    if isinstance(obj, _Payload):
        torch.load(p, weights_only=False)
        assert _Payload.ran


def test_sam_checkpoint_for_another_model_type_names_model_type(tmp_path):
    p = tmp_path / "wrong.pth"
    torch.save({"image_encoder.patch_embed.proj.weight": torch.zeros(8, 3, 2, 2),
                "image_encoder.pos_embed": torch.zeros(1, 2, 2, 8)}, p)
    with pytest.raises(ValueError, match="model_type") as e:
        SamSegmenter(checkpoint=p, model_type="vit_b")
    assert "vit_b" in str(e.value)
    # right shapes but only part of the model: refused too, not loaded half-random
    part = tmp_path / "part.pth"
    torch.save({"image_encoder.patch_embed.proj.weight": torch.zeros(768, 3, 16, 16)}, part)
    with pytest.raises(ValueError, match="model_type"):
        SamSegmenter(checkpoint=part, model_type="vit_b")
    with pytest.raises(ValueError, match="model_type must be one of"):
        SamSegmenter(checkpoint=p, model_type="vit_xl")
