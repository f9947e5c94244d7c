"""Reference-photo loading: orientation, modes, crops, clear errors; the real ViCo photos."""
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lr_tutorial.images import load_image, load_images, prepare

VICO = Path(__file__).resolve().parents[2] / "shared" / "data" / "vico"


def _save(tmp_path, img, name):
    p = tmp_path / name
    img.save(p)
    return p


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L", "P", "LA"])
def test_modes_are_converted_to_rgb(tmp_path, mode):
    img = Image.new("RGB", (80, 60), (200, 30, 30)).convert(mode)
    out = load_image(_save(tmp_path, img, f"x_{mode}.png"), 64)
    assert out.shape == (64, 64, 3) and out.dtype == np.uint8


def test_rgba_is_composited_on_white(tmp_path):
    img = Image.new("RGBA", (64, 64), (0, 0, 0, 0))
    out = load_image(_save(tmp_path, img, "clear.png"), 64)
    assert out.min() == 255


def test_sixteen_bit_is_scaled(tmp_path):
    arr = (np.linspace(0, 65535, 64 * 64).reshape(64, 64)).astype(np.uint16)
    out = load_image(_save(tmp_path, Image.fromarray(arr), "deep.png"), 64)
    assert out.max() == 255 and out.min() == 0


def test_non_square_is_centre_cropped(tmp_path):
    arr = np.zeros((40, 120, 3), np.uint8)
    arr[:, 40:80] = 255  # the centre square is white, the sides black
    out = load_image(_save(tmp_path, Image.fromarray(arr), "wide.png"), 40)
    assert out.min() == 255


def test_exif_orientation_is_applied(tmp_path):
    arr = np.zeros((20, 40, 3), np.uint8)
    arr[:, :20] = 255  # white left half
    img = Image.fromarray(arr)
    exif = img.getexif()
    exif[0x0112] = 6  # rotate 90 CW when displayed: the white half ends up on top
    p = tmp_path / "rot.jpg"
    img.save(p, exif=exif, quality=95)
    raw = np.asarray(Image.open(p).convert("RGB"))
    upright = load_image(p, 20)
    assert raw.shape[:2] == (20, 40)
    assert upright[:5].mean() > 200 and upright[-5:].mean() < 50


def test_missing_and_corrupt_files_fail_clearly(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_image(tmp_path / "nope.png", 64)
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image at all")
    with pytest.raises(ValueError, match="not a readable image"):
        load_image(bad, 64)


def test_tiny_images_are_rejected_and_small_ones_upscaled_with_a_notice(tmp_path):
    with pytest.raises(ValueError, match="too small"):
        prepare(np.zeros((8, 8, 3), np.uint8), 64)
    with pytest.warns(UserWarning, match="upscaled"):
        out = prepare(np.zeros((32, 32, 3), np.uint8), 64)
    assert out.shape == (64, 64, 3)


def test_arrays_wrong_shape_or_range_fail(tmp_path):
    with pytest.raises(ValueError, match="shape"):
        prepare(np.zeros((64, 64, 5), np.uint8), 64)
    with pytest.raises(ValueError, match="dtype"):
        prepare(np.full((64, 64, 3), 300.0), 64)
    assert prepare(np.ones((64, 64, 3), np.float32), 64).min() == 255


@pytest.mark.skipif(not VICO.is_dir(), reason="ViCo benchmark folder ../shared/data/vico absent")
def test_real_vico_photos_load_at_model_resolution():
    paths = sorted(p for p in VICO.rglob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    assert len(paths) > 50
    sizes = set()
    for p in paths[::7]:  # a sample of every concept's photos: JPEG, 567 px to ~2500 px
        with Image.open(p) as im:
            sizes.add(im.size)
        out = load_image(p, 64)
        assert out.shape == (64, 64, 3) and out.dtype == np.uint8
        assert out.std() > 5  # not blank
    assert len(sizes) > 3
    batch = load_images(paths[:3], 64)
    assert batch.shape == (3, 64, 64, 3)
