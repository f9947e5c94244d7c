"""Reliability: every bad input gets an error (or a notice) that names the problem and the fix,
nothing a user made is lost, results are reproducible, checkpoints load safely.
docs/reliability.md lists every case with the test that covers it."""
from __future__ import annotations

import ast
import json
import subprocess
import sys
import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from lr_tutorial import attention, files, images, memory, models, sampling
from lr_tutorial.attention import CaptureSpec
from lr_tutorial.config import SwapConfig
from lr_tutorial.layout import LayoutConfig, resolve_steps
from lr_tutorial.masks import MaskConfig
from lr_tutorial.pipeline import LayoutAndRetouch, LRConfig
from lr_tutorial.prompts import check_identifier, check_prompts, token_index

sys.path.insert(0, str(Path(__file__).parent))
from tiny_sd import make_tiny_lora, make_tiny_sd, tiny_tokenizer, tiny_unet  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "a sks dog on the beach"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny random SD 1.5-structured bundle with a LoRA (tests/tiny_sd.py)."""
    from lr_tutorial.sd import load_sd
    d = tmp_path_factory.mktemp("tiny")
    make_tiny_sd(d / "base")
    make_tiny_lora(tiny_unet(), d / "lora")
    return load_sd(str(d / "base"), personalized=str(d / "lora"), class_noun="dog",
                   local_files_only=True)


@pytest.fixture(scope="module")
def tiny_result(tiny):
    ref = (np.random.default_rng(0).random((64, 64, 3)) * 255).astype(np.uint8)
    return LayoutAndRetouch(tiny, LRConfig(layout=LayoutConfig(steps=2)))(PROMPT, ref, seed=0)


@pytest.fixture(scope="module")
def toy_tokenizer():
    from transformers import PreTrainedTokenizerFast
    return PreTrainedTokenizerFast.from_pretrained(models.data_dir() / "toy" / "tokenizer")


def _no_denoising(monkeypatch):
    """Make any denoising fail the test: errors must come before stage 1 starts."""
    from lr_tutorial import pipeline

    def boom(*a, **k):
        raise AssertionError("denoising started before the bad input was caught")
    monkeypatch.setattr(pipeline, "step_blended", boom)


# ============================================================================ 1. images
def _save(tmp_path, img, name):
    p = tmp_path / name
    img.save(p)
    return p


@pytest.mark.parametrize("mode", ["1", "CMYK", "YCbCr", "I", "F", "PA", "RGBX"])
def test_more_image_modes_become_rgb(tmp_path, mode):
    img = Image.new("RGB", (64, 64), (200, 30, 30)).convert(mode)
    suffix = ".tif" if mode in ("CMYK", "YCbCr", "F") else ".png"
    try:
        p = _save(tmp_path, img, "x" + suffix)
    except OSError:  # a mode this file format cannot hold: convert in memory instead
        out = images.prepare(img, 64)
    else:
        out = images.load_image(p, 64)
    assert out.shape == (64, 64, 3) and out.dtype == np.uint8


def test_sixteen_bit_image_keeps_its_brightness(tmp_path):
    """A dark 16-bit photo is scaled by 255/65535, not stretched to full white."""
    arr = np.full((64, 64), 10_000, np.uint16)
    out = images.load_image(_save(tmp_path, Image.fromarray(arr), "dark16.png"), 64)
    assert abs(int(out[0, 0, 0]) - round(10_000 / 257)) <= 1
    assert images.prepare(np.full((64, 64, 3), 65535, np.uint16), 64).min() == 255


def test_unconvertible_image_mode_is_refused_naming_mode_and_fix():
    la = Image.frombytes("La", (64, 64), bytes(64 * 64 * 2))  # premultiplied grayscale + alpha
    with pytest.raises(ValueError) as e:
        images.prepare(la, 64)
    assert "'La'" in str(e.value) and "RGB PNG or JPEG" in str(e.value)


def test_huge_image_is_refused_with_the_limit_and_the_fix(tmp_path, monkeypatch):
    p = _save(tmp_path, Image.new("RGB", (64, 64)), "huge.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 4096 px > 2x the limit: a "bomb"
    with pytest.raises(ValueError) as e:
        images.load_image(p, 64)
    msg = str(e.value)
    assert "safety limit" in msg and "downscale" in msg and "MAX_IMAGE_PIXELS" in msg


def test_large_photo_is_downscaled_without_fuss(tmp_path):
    p = _save(tmp_path, Image.new("RGB", (1500, 1400), (10, 200, 10)), "big.jpg")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # mildly non-square and large: no notice needed
        out = images.load_image(p, 64)
    assert out.shape == (64, 64, 3)


def test_strongly_non_square_image_is_cropped_with_a_notice():
    with pytest.warns(UserWarning, match=r"not square: centre-cropped to 40x40; crop it yourself"):
        out = images.prepare(np.zeros((40, 120, 3), np.uint8), 40)
    assert out.shape == (40, 40, 3)


def test_tensors_are_converted_from_torch_conventions():
    rgb = (np.random.default_rng(0).random((64, 64, 3)) * 255).astype(np.uint8)
    chw = torch.from_numpy(rgb).permute(2, 0, 1).float() / 255  # (3, H, W) in [0, 1]
    assert np.array_equal(images.prepare(chw, 64), rgb)
    assert np.array_equal(images.prepare(chw.half(), 64), images.prepare(chw.half().float(), 64))
    batch = images.as_batch(torch.stack([chw, chw]), 64)  # (N, 3, H, W)
    assert batch.shape == (2, 64, 64, 3) and np.array_equal(batch[1], rgb)
    assert np.array_equal(images.as_batch(rgb[None], 64)[0], rgb)  # (N, H, W, 3) numpy
    assert np.array_equal(images.prepare(rgb.astype(np.int64), 64), rgb)
    assert images.prepare(np.ones((64, 64), bool), 64).min() == 255
    assert images.prepare(rgb[..., :1], 64).shape == (64, 64, 3)  # (H, W, 1) grayscale


@pytest.mark.parametrize("bad, words", [
    (np.zeros((64, 64, 3), np.float32) - 0.5, ["range [-0.5, -0.5]", "(x + 1) / 2", "[0, 1]"]),
    (np.full((64, 64, 3), np.nan, np.float32), ["NaN", "finite"]),
    (np.full((64, 64, 3), 300, np.int64), ["int64", "[300, 300]", "uint8"]),
    (np.zeros((64, 64, 5), np.uint8), ["shape (64, 64, 5)", "(H, W, 3)"]),
    (np.zeros(64, np.uint8), ["shape (64,)", "(H, W, 3)"]),
    (np.zeros((64, 64, 3), np.complex64), ["complex64", "uint8"]),
    (torch.zeros(5, 64, 64), ["shape (5, 64, 64)", "(3, H, W)"]),
    (np.zeros((8, 8, 3), np.uint8), ["8x8", "too small", "at least 64x64"]),
    ([[0, 1], [2, 3]], ["list", "numpy array"]),
])
def test_bad_arrays_and_tensors_are_refused_naming_problem_and_fix(bad, words):
    with pytest.raises(ValueError) as e:
        images.prepare(bad, 64)
    for w in words:
        assert w in str(e.value), (w, str(e.value))


def test_missing_paths_and_empty_lists_are_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist; check the path"):
        images.as_batch([tmp_path / "nope.jpg"], 64)
    with pytest.raises(ValueError, match="at least one photo"):
        images.as_batch([], 64)
    (tmp_path / "x.jpg").write_bytes(b"\xff\xd8 truncated jpeg")
    with pytest.raises(ValueError, match="not a readable image.*PNG or JPEG"):
        images.as_batch(str(tmp_path / "x.jpg"), 64)


def test_pipeline_converts_reference_tensors_and_refuses_bad_ones_early(tiny, monkeypatch):
    rgb = (np.random.default_rng(1).random((32, 32, 3)) * 255).astype(np.uint8)
    lr = LayoutAndRetouch(tiny, LRConfig(layout=LayoutConfig(steps=2)))
    with pytest.warns(UserWarning, match="upscaled to 64 px"):
        ref = lr.reference(torch.from_numpy(rgb).permute(2, 0, 1).float() / 255)
    assert ref.image.shape == (64, 64, 3) and ref.image.dtype == np.uint8
    _no_denoising(monkeypatch)
    with pytest.raises(ValueError, match=r"\(x \+ 1\) / 2"):
        lr(PROMPT, np.zeros((64, 64, 3), np.float32) - 0.5)


# ============================================================================ 1. prompts
def test_prompt_without_identifier_names_it_and_shows_a_fixed_prompt(tiny):
    with pytest.raises(ValueError) as e:
        check_prompts(tiny, ["a dog on the beach"])
    assert "does not contain the identifier 'sks'" in str(e.value)
    assert "'a sks dog on the beach'" in str(e.value)


def test_identifier_not_in_the_tokenizer(toy_tokenizer, tiny):
    with pytest.raises(ValueError) as e:
        check_identifier(toy_tokenizer, "xyzzy")
    assert "not in the tokenizer's vocabulary" in str(e.value) and "<|unk|>" in str(e.value)
    assert "bundle.identifier" in str(e.value)
    check_identifier(toy_tokenizer, "sks")
    # through the pipeline's check, for a bundle whose identifier was changed by hand
    bundle = SimpleNamespace(tokenizer=toy_tokenizer, identifier="xyzzy", class_noun="star",
                             personalization="lora")
    with pytest.raises(ValueError, match="not in the tokenizer's vocabulary"):
        check_prompts(bundle, ["a xyzzy star"])
    # textual inversion: the identifier must be one added token, not pieces of words
    ti = SimpleNamespace(tokenizer=tiny.tokenizer, identifier="skdog", class_noun="dog",
                         personalization="textual_inversion")
    with pytest.raises(ValueError, match="not one token.*learned_embeds"):
        check_prompts(ti, ["a skdog dog"])


def test_class_noun_missing_from_prompt_or_bundle(tiny, monkeypatch):
    with pytest.raises(ValueError, match="does not contain the class noun 'dog'.*'a sks dog"):
        check_prompts(tiny, ["a sks on the beach"])
    monkeypatch.setattr(tiny, "class_noun", None)
    with pytest.raises(ValueError, match=r"no class noun.*class_noun='dog'"):
        check_prompts(tiny, ["a sks on the beach"])
    with pytest.raises(ValueError, match="class noun missing"):
        token_index(tiny.tokenizer, "a sks dog", None)


def test_empty_prompt_is_refused(tiny):
    with pytest.raises(ValueError, match="empty or not a string; write e.g."):
        check_prompts(tiny, ["  "])
    lr = LayoutAndRetouch(tiny, LRConfig(layout=LayoutConfig(steps=2)))
    with pytest.raises(ValueError, match="no prompt given"):
        lr([], np.zeros((64, 64, 3), np.uint8))


def test_long_prompt_warns_saying_what_is_cut(toy_tokenizer):
    bundle = SimpleNamespace(tokenizer=toy_tokenizer, identifier="sks", class_noun="star",
                             personalization="lora")
    long = "a sks star on the left in the snow " + "big red " * 6 + "at night"
    assert toy_tokenizer.model_max_length == 16
    with pytest.warns(UserWarning) as rec:
        idx = check_prompts(bundle, [long])
    msg = str(rec[0].message)
    assert "longer than the text encoder's 16" in msg
    assert "'red big red big red big red at night' will be ignored" in msg
    assert "shorten the prompt" in msg
    assert idx == [3]
    # the class noun itself past the limit: an error, since the mask would have no token
    with pytest.raises(ValueError, match="past the text encoder's limit of 16.*move 'star'"):
        token_index(toy_tokenizer, "a sks " + "big red " * 8 + "star", "star")


# ============================================================================ 1. config
@pytest.mark.parametrize("make, exc, words", [
    (lambda: LayoutConfig(lambda1=1.5), ValueError, ["lambda1 = 1.5", "[0, 1]", "int for a step"]),
    (lambda: LayoutConfig(lambda1=60, steps=50), ValueError, ["outside [0, 50]", "fraction"]),
    (lambda: LayoutConfig(lambda1=-1), ValueError, ["negative", ">= 0"]),
    (lambda: LayoutConfig(lambda1="0.2"), TypeError, ["'0.2' (str)", "fraction"]),
    (lambda: LayoutConfig(steps=0), ValueError, ["steps must be an int >= 1", "50"]),
    (lambda: LayoutConfig(steps=2.5), ValueError, ["steps must be an int >= 1"]),
    (lambda: LayoutConfig(guidance=-1), ValueError, ["guidance must be a number >= 0", "7.5"]),
    (lambda: LayoutConfig(guidance=float("nan")), ValueError, ["guidance"]),
    (lambda: SwapConfig(lambda2=2.0), ValueError, ["lambda2 = 2.0", "[0, 1]"]),
    (lambda: SwapConfig(retouch_layers=[]), ValueError, ["glob pattern", "up_blocks"]),
    (lambda: SwapConfig(min_lambda2=-1), ValueError, ["min_lambda2"]),
    (lambda: MaskConfig(lambda3=-0.1), ValueError, ["lambda3 = -0.1", "[0, 1]"]),
    (lambda: MaskConfig(attention_window=(0.8, 0.2)), ValueError, ["attention_window", "start"]),
    (lambda: MaskConfig(attention_fractions=()), ValueError, ["attention_fractions", "0.25"]),
    (lambda: MaskConfig(tau_lo=0.8, tau_hi=0.5), ValueError, ["tau_lo <= tau_hi", "0.3"]),
    (lambda: LRConfig(swap=SwapConfig(lambda2=0.5), mask=MaskConfig(lambda3=0.3)), ValueError,
     ["lambda3 = 0.3", "comes before", "lambda2 = 0.5", "lambda3 >= lambda2", "lambda3 = 0"]),
    (lambda: LRConfig(layout=LayoutConfig(steps=10), start_step=10), ValueError,
     ["start_step = 10", "[0, 9]"]),
    (lambda: LRConfig(reference_index=-1), ValueError, ["reference_index", ">= 0"]),
    (lambda: CaptureSpec(tokens=[-1]), ValueError, ["non-negative int", "[-1]"]),
])
def test_bad_config_is_refused_naming_knob_and_fix(make, exc, words):
    with pytest.raises(exc) as e:
        make()
    for w in words:
        assert w in str(e.value), (w, str(e.value))


def test_good_edge_configs_are_accepted():
    LRConfig(mask=MaskConfig(lambda3=0))  # blending off
    LRConfig(layout=LayoutConfig(lambda1=0, steps=1), swap=SwapConfig(lambda2=0))
    assert resolve_steps(np.float32(0.5), 50) == 25  # a numpy float is a fraction, not 0 steps
    assert resolve_steps(np.int64(7), 50) == 7


def test_config_changed_after_construction_is_checked_before_denoising(tiny, monkeypatch):
    lr = LayoutAndRetouch(tiny, LRConfig(layout=LayoutConfig(steps=4)))
    _no_denoising(monkeypatch)
    lr.config.layout.steps = 0  # e.g. from a slider
    with pytest.raises(ValueError, match="steps must be an int >= 1"):
        lr(PROMPT, np.zeros((64, 64, 3), np.uint8))
    lr.config.layout.steps, lr.config.mask.lambda3 = 4, 2.5
    with pytest.raises(ValueError, match="lambda3 = 2.5"):
        lr(PROMPT, np.zeros((64, 64, 3), np.uint8))


@pytest.mark.parametrize("cfg, words", [
    (LRConfig(swap=SwapConfig(retouch_layers="decoder.*")),
     ["no attention layer matches", "decoder.*", "up_blocks", "fix the pattern"]),
    (LRConfig(mask=MaskConfig(attention_fractions=(0.75,))),
     ["no attention layer matches", "resolutions=[6]", "at resolutions [1, 2, 4, 8]"]),
])
def test_layer_pattern_matching_nothing_fails_before_denoising(tiny, monkeypatch, cfg, words):
    cfg.layout.steps = 2
    _no_denoising(monkeypatch)
    with pytest.raises(ValueError) as e:
        LayoutAndRetouch(tiny, cfg)(PROMPT, np.zeros((64, 64, 3), np.uint8))
    for w in words:
        assert w in str(e.value), (w, str(e.value))


def test_token_index_out_of_range(tiny):
    spec = CaptureSpec(kind="cross", tokens=[100])
    with pytest.raises(IndexError) as e:
        with attention.capture(tiny.unet, spec) as store:
            sampling.sample(tiny, [PROMPT], [0], steps=1, observers=(store,))
    assert "token index 100 is out of range" in str(e.value) and "0..76" in str(e.value)
    assert "token_index(tokenizer, prompt, word)" in str(e.value)
    with attention.capture(tiny.unet, CaptureSpec(kind="cross")) as store:
        sampling.sample(tiny, [PROMPT], [0], steps=1, observers=(store,))
    with pytest.raises(IndexError, match="out of range: the stored maps hold 77 tokens"):
        store.cross_map(77, 8)


def test_reference_index_and_seeds_out_of_range(tiny):
    lr = LayoutAndRetouch(tiny, LRConfig(layout=LayoutConfig(steps=2), reference_index=3))
    with pytest.raises(IndexError, match="only 1 reference images were given; use 0..0"):
        lr(PROMPT, np.zeros((64, 64, 3), np.uint8))
    lr.config.reference_index = 0
    with pytest.raises(ValueError, match="1 prompts and 2 seeds; give one seed"):
        lr(PROMPT, np.zeros((64, 64, 3), np.uint8), seed=[0, 1])


# ============================================================================ 1. models
def test_personal_unet_of_another_architecture_is_refused(tiny):
    other = tiny_unet(block_out_channels=(16, 16, 32, 32))
    with pytest.raises(ValueError) as e:
        models.ModelBundle(tiny.tokenizer, tiny.text_encoder, tiny.vae, tiny_unet(),
                           tiny.scheduler, personalization="dreambooth", personal_unet=other)
    assert "another architecture" in str(e.value) and "block_out_channels" in str(e.value)
    assert "base=" in str(e.value)
    with pytest.raises(ValueError, match="needs personal_unet="):
        models.ModelBundle(tiny.tokenizer, tiny.text_encoder, tiny.vae, tiny_unet(),
                           tiny.scheduler, personalization="dreambooth", mode="personalized")


def test_lora_for_another_base_is_refused_on_any_backend(tiny, tmp_path):
    """attach_lora (used by the toy backend too) checks the LoRA against the UNet."""
    make_tiny_lora(tiny_unet(cross_attention_dim=64), tmp_path / "other")
    bundle = models.ModelBundle(tiny.tokenizer, tiny.text_encoder, tiny.vae, tiny_unet(),
                                tiny.scheduler)
    with pytest.raises(ValueError) as e:
        models.attach_lora(bundle, tmp_path / "other")
    assert "made for another base model" in str(e.value) and "attn2.to_k" in str(e.value)
    assert "retrain it on this one" in str(e.value)
    assert bundle.personalization == "none"  # nothing half-attached
    with pytest.raises(FileNotFoundError, match="no LoRA weights"):
        models.attach_lora(bundle, tmp_path / "missing")


def test_textual_inversion_embedding_for_another_text_encoder(tiny, tmp_path):
    from safetensors.torch import save_file

    from lr_tutorial.sd import _add_textual_inversion
    save_file({"<sks-dog>": torch.randn(1, 768)}, str(tmp_path / "learned_embeds.safetensors"))
    n = len(tiny.tokenizer)
    with pytest.raises(ValueError, match=r"shape \(1, 768\).*needs \(1, 32\).*another base"):
        _add_textual_inversion(tiny, tmp_path / "learned_embeds.safetensors")
    assert len(tiny.tokenizer) == n  # the tokenizer was not changed


@pytest.mark.parametrize("content", [b"\x89PNG\r\n\x1a\n not really", b""], ids=["png", "empty"])
def test_sam_checkpoint_that_is_not_a_checkpoint(tmp_path, content):
    from lr_tutorial.masks import SamSegmenter
    p = tmp_path / "sam_vit_b.pth"
    p.write_bytes(content)
    with pytest.raises(ValueError, match="is not a loadable SAM checkpoint"):
        SamSegmenter(checkpoint=p)


def test_missing_toy_weights_name_the_fix(tmp_path, monkeypatch):
    monkeypatch.setenv("LR_TUTORIAL_DATA", str(tmp_path))
    with pytest.raises(FileNotFoundError) as e:
        models.load_models("toy")
    assert "pip install -e ." in str(e.value) and "LR_TUTORIAL_DATA" in str(e.value)


# ============================================================================ 1. memory
def test_memory_estimate_adds_up(tiny):
    est = memory.estimate(tiny, LRConfig(), batch=2)
    assert est.rows == 10  # [reference (1); context (2); target (2)] x 2 (CFG)
    assert memory.estimate(tiny, LRConfig(), batch=2, stage2="cached").rows == 4  # targets only
    assert est.weights == sum(est.weights_by_model.values()) > 0
    assert est.total == est.weights + max(est.unet_activations + est.attention, est.vae_decode)
    big = memory.estimate(tiny, LRConfig(), batch=2,
                          capture=CaptureSpec(kind="self", resolutions=[8]))
    heads = tiny.unet.get_submodule(big.captured[0]).heads
    assert big.attention == 2 * 10 * heads * 64 * 64 * 4  # logits + probs, float32
    assert big.captured[0].endswith("attn1") and big.attention > est.attention
    assert big.total >= est.total  # (here the VAE decode is the peak either way)
    one = memory.estimate(tiny, LRConfig(layout=LayoutConfig(guidance=1.0)), batch=1)
    assert one.rows == 3


def test_memory_warning_names_concrete_options(tiny):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert memory.check(tiny, batch=1, free_bytes=1 << 40).total > 0  # fits: silent
    with pytest.warns(memory.MemoryWarning) as rec:
        memory.check(tiny, LRConfig(), batch=2, free_bytes=1000,
                     capture=CaptureSpec(kind="self", resolutions=[8]))
    msg = str(rec[0].message)
    assert "estimated to need about" in msg and "only 0.00 GiB is free" in msg
    for option in ("CaptureSpec(resolutions=[16])", "dtype=torch.float16", "2 -> 1",
                   "bundle.vae.to('cpu', torch.float32)", "saves about"):
        assert option in msg, option
    assert memory.check(tiny) is None  # on a CPU there is no free-memory figure: no check


def test_pipeline_checks_memory_before_a_run(tiny, monkeypatch):
    monkeypatch.setattr(memory, "free_memory", lambda device: 1000)
    _no_denoising(monkeypatch)
    lr = LayoutAndRetouch(tiny, LRConfig(layout=LayoutConfig(steps=2)))
    with pytest.warns(memory.MemoryWarning, match="probably run out of memory"):
        with pytest.raises(AssertionError, match="denoising started"):
            lr(PROMPT, np.zeros((64, 64, 3), np.uint8))


def test_memory_estimate_of_stable_diffusion_15_is_plausible():
    """SD 1.5's real configs on the meta device (no weights, no memory): fp16 weights about
    2 GB; capturing every 64x64 self-attention layer costs gigabytes and says so."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(
            sample_size=64, cross_attention_dim=768, attention_head_dim=8,
            block_out_channels=(320, 640, 1280, 1280)).half()
        vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), latent_channels=4,
                            layers_per_block=2, down_block_types=("DownEncoderBlock2D",) * 4,
                            up_block_types=("UpDecoderBlock2D",) * 4).half()
        te = CLIPTextModel(CLIPTextConfig(hidden_size=768, intermediate_size=3072,
                                          num_hidden_layers=12, num_attention_heads=12)).half()
    bundle = SimpleNamespace(unet=unet, _vanilla_unet=unet, personal_unet=None, vae=vae,
                             text_encoder=te, tokenizer=SimpleNamespace(model_max_length=77),
                             device=torch.device("meta"), dtype=torch.float16, latent_size=64)
    est = memory.estimate(bundle, LRConfig())
    assert 1.9e9 < est.weights < 2.3e9  # 860M + 84M + 123M parameters in fp16
    assert 2.5e9 < est.total < 8e9
    cap = memory.estimate(bundle, LRConfig(), capture=CaptureSpec(kind="self", resolutions=[64]))
    assert cap.attention > 4 * memory.GiB and "CaptureSpec" in memory.options(cap, bundle, 1)[0]
    # the scrubber's capture (every step, every layer's cross-attention) kept on the GPU until
    # it ends (offload="end"): the store's bytes, for stage 2's 2B + 1 rows, join the peak
    scrub = CaptureSpec(kind="cross")
    held = memory.estimate(bundle, LRConfig(), capture=scrub)
    assert held.stored == scrub.estimate(bundle, 50, batch=3) > 0
    # 622 MB held over stage 2's UNet call: the peak moves from the VAE decode to the UNet
    assert est.total == est.weights + est.vae_decode
    assert held.total == held.weights + held.unet_activations + held.attention + held.stored
    assert any("offload='step'" in o for o in memory.options(held, bundle, 1))
    assert memory.estimate(bundle, LRConfig(), capture=CaptureSpec(kind="cross", offload="step")
                           ).stored == 0
    # the cached stage 2's context keys/values of one image: the 9 decoder self-attention
    # layers, 2 CFG rows, steps 10..49 in fp16: 27.5 MB per row and step, 2.2 GB in all
    from lr_tutorial.attention import select_layers
    from lr_tutorial.memory import cache_bytes
    layers = select_layers(unet, "up_blocks.*attn1", "self")
    assert len(layers) == 9
    assert cache_bytes(unet, layers, range(10, 50), 2, 64, torch.float16) == 2 * 2 * 40 * (
        3 * 64 ** 2 * 320 + 3 * 32 ** 2 * 640 + 3 * 16 ** 2 * 1280) * 2 == 2_202_009_600
    # the layers' inputs instead (kv_store="hidden"; "auto" takes it
    # where keys/values would not fit the host's budget): half of that
    assert cache_bytes(unet, layers, range(10, 50), 2, 64, torch.float16,
                       store="hidden") == 1_101_004_800


# ============================================================================ 2. nothing lost
def test_result_save_never_overwrites_unasked_and_survives_interruption(tiny_result, tmp_path,
                                                                         monkeypatch):
    out = tiny_result.save(tmp_path / "run")
    before = (out / "result.json").read_text()
    with pytest.raises(FileExistsError, match="overwrite=True.*--overwrite"):
        tiny_result.save(out)

    def interrupted(*a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr(np, "savez_compressed", interrupted)
    with pytest.raises(KeyboardInterrupt):
        tiny_result.save(out, overwrite=True)
    assert (out / "result.json").read_text() == before and (out / "masks.npz").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # no half-written leftovers
    with pytest.raises(KeyboardInterrupt):
        tiny_result.save(tmp_path / "new")
    assert not (tmp_path / "new").exists()


def test_atomic_file_and_entries(tmp_path):
    p = tmp_path / "a.txt"
    p.write_text("old")
    with pytest.raises(RuntimeError):
        with files.atomic_file(p) as tmp:
            tmp.write_text("half")
            raise RuntimeError("killed")
    assert p.read_text() == "old" and sorted(x.name for x in tmp_path.iterdir()) == ["a.txt"]
    with pytest.raises(FileExistsError):
        with files.atomic_file(p, overwrite=False):
            pass
    dst, src = tmp_path / "toy", tmp_path / "export"
    (dst / "lora").mkdir(parents=True)
    (dst / "unet").mkdir()
    (dst / "unet" / "old.bin").write_text("old")
    (src / "unet").mkdir(parents=True)
    (src / "unet" / "new.bin").write_text("new")
    files.replace_entries(src, dst)
    assert sorted(x.name for x in dst.iterdir()) == [files.MANIFEST, "lora", "unet"]
    assert [x.name for x in (dst / "unet").iterdir()] == ["new.bin"] and not src.exists()


def test_personalize_refuses_an_existing_output_before_training(tiny, tmp_path):
    from lr_tutorial.personalize import DreamBoothConfig, dreambooth_lora
    (tmp_path / "lora").mkdir()
    (tmp_path / "lora" / "pytorch_lora_weights.safetensors").write_bytes(b"an earlier LoRA")
    imgs = np.zeros((2, 64, 64, 3), np.uint8)
    with pytest.raises(FileExistsError, match="earlier LoRA.*overwrite=True"):
        dreambooth_lora(tiny, imgs, DreamBoothConfig(steps=1), out_dir=tmp_path / "lora")


def test_cli_generate_refuses_an_existing_output(tmp_path, capsys):
    from lr_tutorial import cli
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "final.png").write_bytes(b"an earlier image")
    assert cli.main(["generate", "--prompt", "a sks star", "--out", str(tmp_path / "out")]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert (tmp_path / "out" / "final.png").read_bytes() == b"an earlier image"


def test_toy_references_are_not_overwritten_unasked(tmp_path):
    from lr_tutorial.toy import subject
    subject.write_references(tmp_path)
    with pytest.raises(FileExistsError, match="--overwrite"):
        subject.write_references(tmp_path)


# ============================================================================ 3. reproducible
@pytest.mark.slow
def test_toy_pipeline_is_bit_for_bit_reproducible():
    from lr_tutorial import load_models
    bundle = load_models("toy")
    cfg = LRConfig(layout=LayoutConfig(steps=4))
    a = LayoutAndRetouch(bundle, cfg)("a sks star in the snow", seed=3)
    b = LayoutAndRetouch(bundle, LRConfig(layout=LayoutConfig(steps=4)))(
        "a sks star in the snow", seed=3)
    assert np.array_equal(a.images, b.images) and np.array_equal(a.layout.images, b.layout.images)
    for za, zb in zip(a.target.latents + a.layout.trajectory.latents,
                      b.target.latents + b.layout.trajectory.latents):
        assert torch.equal(za, zb)
    assert np.array_equal(a.masks.per_step, b.masks.per_step)
    c = LayoutAndRetouch(bundle, cfg)("a sks star in the snow", seed=4)
    assert not np.array_equal(a.images, c.images)  # the seed matters, so the test can fail
    assert a.config == b.config


def test_result_records_versions_and_the_full_config(tiny_result, tmp_path):
    v = tiny_result.versions
    for name in ("lr_tutorial", "diffusers", "transformers", "torch", "peft", "numpy", "python"):
        assert v.get(name), name
    import diffusers
    assert v["diffusers"] == diffusers.__version__
    c = tiny_result.config
    assert c["layout"]["steps"] == 2 and c["swap"]["mode"] == "multi" and "lambda3" in c["mask"]
    m = c["models"]
    assert (m["backend"], m["identifier"], m["class_noun"], m["personalization"]) == (
        "sd", "sks", "dog", "lora")
    assert m["source"]["base"].endswith("base") and m["prediction_type"] == "epsilon"
    assert c["segmenter"] is None and len(c["reference_sha1"]) == 40
    saved = json.loads((tiny_result.save(tmp_path / "r") / "result.json").read_text())
    assert saved["config"] == c and saved["versions"] == v and saved["seeds"] == [0]


# ============================================================================ 4. safe loading
def _calls(tree, attr):
    return [n for n in ast.walk(tree) if isinstance(n, ast.Call)
            and isinstance(n.func, ast.Attribute) and n.func.attr == attr]


def test_source_audit_torch_load_is_weights_only_and_no_remote_code():
    files_ = sorted((ROOT / "lr_tutorial").rglob("*.py")) + sorted((ROOT / "bench").rglob("*.py"))
    loads = 0
    for f in files_:
        src = f.read_text()
        tree = ast.parse(src)
        for call in _calls(tree, "load"):
            if getattr(call.func.value, "id", None) == "torch":
                loads += 1
                kw = {k.arg: k.value for k in call.keywords}
                safe = isinstance(kw.get("weights_only"), ast.Constant) and \
                    kw["weights_only"].value is True
                assert safe, f"{f}:{call.lineno}: torch.load without weights_only=True"
        for bad in ("trust_remote_code=True", "allow_pickle=True", "pickle.load", "custom_pipeline"):
            assert bad not in src, f"{f}: {bad}"
    assert loads >= 4  # the audit sees the loads that exist (SAM, LoRA .bin, train-toy checkpoints, ...)


_RAN = []


def _mark_ran():
    _RAN.append(1)
    return torch.zeros(1)


class _Payload:
    """Unpickling this calls _mark_ran: code from the file would run."""

    def __reduce__(self):
        return (_mark_ran, ())


def test_pickled_weights_with_code_are_refused_without_running_it(tmp_path):
    p = tmp_path / "pytorch_lora_weights.bin"
    torch.save({"unet.x.lora_A.weight": _Payload()}, p)
    with pytest.raises(Exception, match="(?i)weights only|unpickl"):
        models.load_state_dict(p)
    assert _RAN == []
    torch.load(p, weights_only=False)  # an unsafe load does run it: the test can fail
    assert _RAN == [1]


def test_shipped_toy_weights_are_safetensors():
    toy = models.data_dir() / "toy"
    weights = [p for p in toy.rglob("*") if p.suffix in (".bin", ".pt", ".pth", ".ckpt", ".pkl")]
    assert weights == []
    assert len(list(toy.rglob("*.safetensors"))) >= 4


@pytest.mark.slow
def test_import_touches_no_network():
    """Every lr_tutorial module imports with socket connections made impossible."""
    code = r"""
import socket, pkgutil, importlib
def refuse(*a, **k):
    raise AssertionError("network access at import time")
socket.socket.connect = refuse
socket.socket.connect_ex = refuse
socket.create_connection = refuse
socket.getaddrinfo = refuse
import lr_tutorial
names = [m.name for m in pkgutil.walk_packages(lr_tutorial.__path__, "lr_tutorial.")]
for n in names:
    if n != "lr_tutorial.__main__":
        importlib.import_module(n)
print(len(names))
"""
    env = {"PATH": "/usr/bin:/bin", "HOME": str(Path.home()), "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert int(out.stdout.split()[-1]) >= 20


# ============================================================================ 5. prompts, backends
def test_identifier_is_case_insensitive_on_both_backends(toy_tokenizer, tiny):
    from lr_tutorial.prompts import check_personal_prompt, lowercase_tokenizer, strip_identifier
    assert strip_identifier("a SKS dog on the beach", "sks") == "a dog on the beach"
    assert strip_identifier("a Sks dog", "sks") == "a dog"
    assert strip_identifier("a sksx dog", "sks") == "a sksx dog"  # whole words only
    check_personal_prompt("A Sks Dog at night", "sks", "dog")
    tok = lowercase_tokenizer(toy_tokenizer)
    assert tok("a SKS Star").input_ids == tok("a sks star").input_ids
    assert tok.unk_token_id not in tok("a SKS Star").input_ids
    assert check_prompts(tiny, ["a SKS Dog on the beach"]) == check_prompts(tiny, [PROMPT])


def test_unknown_words_are_named_with_the_vocabulary(toy_tokenizer):
    from lr_tutorial.prompts import check_vocabulary, lowercase_tokenizer
    tok = lowercase_tokenizer(toy_tokenizer)
    with pytest.raises(ValueError) as e:
        check_vocabulary(tok, "a sks stär on the moon")
    msg = str(e.value)
    assert "'stär', 'moon'" in msg and "known words: a at" in msg and "star" in msg
    assert "--allow-unknown-words" in msg
    with pytest.warns(UserWarning, match="'moon'"):
        check_vocabulary(tok, "a sks star on the moon", allow_unknown=True)
    check_vocabulary(tok, "a SKS Star at night")  # case is not a reason


def test_toy_generate_refuses_unknown_words_before_models_load(tmp_path, capsys, monkeypatch):
    from lr_tutorial import cli
    monkeypatch.setattr(cli, "_validated", lambda a: (_ for _ in ()).throw(AssertionError("ran")))
    assert cli.main(["generate", "--prompt", "a sks star on the moon", "--out",
                     str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --prompt") and "'moon'" in err and "known words" in err


@pytest.mark.parametrize("data, ok", [
    ("a sks star\n# note\n\na small sks star\n".encode("utf-8"), True),
    ("a sks star\r\na small sks star\r\n".encode("utf-8-sig"), True),
    ("a sks star\na small sks star\n".encode("utf-16"), "UTF-16"),
    ("a sks star café\n".encode("latin-1"), "not UTF-8"),
    (b"a sks star\x00\x00", "NUL"),
    (b"# only a comment\n", "holds no prompts"),
])
def test_prompt_files_are_utf8_with_or_without_bom(tmp_path, data, ok):
    from lr_tutorial.prompts import read_prompt_file
    p = tmp_path / "prompts.txt"
    p.write_bytes(data)
    if ok is True:
        assert read_prompt_file(p) == ["a sks star", "a small sks star"]
    else:
        with pytest.raises(ValueError, match=ok) as e:
            read_prompt_file(p)
        assert str(p) in str(e.value) and ("UTF-8" in str(e.value) or "prompt" in str(e.value))


def test_toy_generate_honours_personalized_and_refuses_sd_flags(tmp_path, capsys, monkeypatch):
    from lr_tutorial import cli, models
    seen = {}

    def fake_load(backend, **kw):
        seen.update(kw, backend=backend)
        raise KeyboardInterrupt  # stop right after the models would load
    monkeypatch.setattr(models, "load_models", fake_load)
    lora = tmp_path / "mylora"
    lora.mkdir()
    base = ["generate", "--prompt", "a sks star", "--out", str(tmp_path / "o")]
    assert cli.main(base + ["--personalized", str(lora)]) == 2
    assert "not a LoRA folder" in capsys.readouterr().err
    (lora / "pytorch_lora_weights.safetensors").write_bytes(b"")
    assert cli.main(base + ["--personalized", str(lora)]) == 130
    assert seen == {"backend": "toy", "personalized": str(lora)}
    for flag, value in (("--base", "runwayml/x"), ("--class-noun", "dog")):
        assert cli.main(base + [flag, value]) == 2
        err = capsys.readouterr().err
        assert flag in err and "does nothing" in err and "--backend sd" in err


def test_a_stage_that_never_runs_is_said(tmp_path, capsys, monkeypatch):
    from lr_tutorial import cli, validate
    monkeypatch.setattr(cli, "_validated", lambda a: (_ for _ in ()).throw(KeyboardInterrupt))
    assert cli.main(["generate", "--prompt", "a sks star", "--steps", "4", "--out",
                     str(tmp_path / "o")]) == 130
    err = capsys.readouterr().err
    assert "warning: --steps 4" in err and "retouch phase never runs" in err
    with pytest.warns(validate.NoOpWarning, match="final image equals the layout"):
        validate.check_call(LRConfig(layout=LayoutConfig(steps=4)))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        validate.check_call(LRConfig(layout=LayoutConfig(steps=5)))  # one retouch step


def test_seeds_outside_the_generators_range_are_refused_before_denoising(tiny, monkeypatch):
    from lr_tutorial.validate import SEED_MAX, check_seeds
    assert check_seeds([0, SEED_MAX]) == [0, SEED_MAX]
    for bad, exc in (([-1], ValueError), ([SEED_MAX + 1], ValueError), (["1"], TypeError),
                     ([1.5], TypeError), ([], ValueError)):
        with pytest.raises(exc, match="seed"):
            check_seeds(bad)
    _no_denoising(monkeypatch)
    with pytest.raises(ValueError, match="outside"):
        LayoutAndRetouch(tiny, LRConfig(layout=LayoutConfig(steps=2)))(
            PROMPT, np.zeros((64, 64, 3), np.uint8), seed=-1)


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory):
    d = tmp_path_factory.mktemp("tinybase") / "base"
    make_tiny_sd(d)
    return d


def test_sd_without_a_personalized_model_warns_once(tiny_base):
    from lr_tutorial.sd import load_sd
    bundle = load_sd(str(tiny_base), class_noun="dog", local_files_only=True)
    with pytest.warns(UserWarning, match="no personalized model") as rec:
        check_prompts(bundle, [PROMPT])
        check_prompts(bundle, [PROMPT])
    assert sum("no personalized model" in str(w.message) for w in rec) == 1


def test_scheduler_settings_for_the_inversion_are_pinned_and_recorded(tiny_base, tmp_path,
                                                                     tiny_result):
    import shutil

    from lr_tutorial.sd import load_sd
    base = tmp_path / "base"
    shutil.copytree(tiny_base, base)
    cfg_file = base / "scheduler" / "scheduler_config.json"
    cfg = json.loads(cfg_file.read_text())
    for k in ("clip_sample", "timestep_spacing", "prediction_type"):
        cfg.pop(k, None)  # diffusers' defaults would clip x0 in sampling only
    cfg_file.write_text(json.dumps(cfg))
    bundle = load_sd(str(base), class_noun="dog", local_files_only=True)
    sc = bundle.scheduler.config
    assert (sc.clip_sample, sc.thresholding, sc.timestep_spacing, sc.prediction_type) == (
        False, False, "leading", "epsilon")
    rec = bundle.source["scheduler"]
    assert rec["clip_sample"] is False and rec["timestep_spacing"] == "leading"
    saved = tiny_result.config["models"]["source"]["scheduler"]  # what result.json holds
    assert saved["clip_sample"] is False and saved["prediction_type"] == "epsilon"


def test_threads_follow_the_free_cores_and_the_user(monkeypatch):
    from lr_tutorial import threads
    monkeypatch.delenv("LR_TUTORIAL_THREADS", raising=False)
    monkeypatch.setattr(threads, "cores", lambda: 2)
    for load, want in ((0.1, 2), (0.9, 1), (2.3, 1), (7.0, 1)):
        monkeypatch.setattr(threads, "load", lambda v=load: v)
        assert threads.choose() == want, load
    monkeypatch.setattr(threads, "cores", lambda: 8)
    monkeypatch.setattr(threads, "load", lambda: 3.0)
    assert threads.choose() == 5 and threads.choose(3) == 3
    monkeypatch.setenv("LR_TUTORIAL_THREADS", "6")
    assert threads.choose() == 6
    monkeypatch.setenv("LR_TUTORIAL_THREADS", "many")
    with pytest.raises(ValueError, match="LR_TUTORIAL_THREADS='many'"):
        threads.choose()


# ============================================================================ 6. reference images
def _frames(path, n=2):
    imgs = [Image.new("RGB", (64, 64), (40 * i, 0, 0)) for i in range(n)]
    imgs[0].save(path, save_all=True, append_images=imgs[1:], duration=100)
    return path


@pytest.mark.parametrize("make, note", [
    (lambda p: _frames(p / "a.gif", 3), "animated (3 frames): using the first frame"),
    (lambda p: _save(p, Image.new("P", (64, 64), 3), "p.png"), "palette image: converted to RGB"),
    (lambda p: _save(p, Image.new("RGBA", (64, 64), (9, 9, 9, 0)), "t.png"),
     "transparent pixels: composited on white"),
    (lambda p: _save(p, Image.fromarray(np.full((64, 64), 40000, np.uint16)), "d.png"),
     "16 bits per channel: scaled to 8 bits"),
])
def test_converted_references_get_a_one_line_note(tmp_path, make, note):
    path = make(tmp_path)
    with pytest.warns(images.ImageNote) as rec:
        out = images.load_image(path, 64)
    assert out.shape == (64, 64, 3) and out.dtype == np.uint8
    said = [str(w.message) for w in rec if issubclass(w.category, images.ImageNote)]
    assert len(said) == 1 and note in said[0] and str(path) in said[0] and "\n" not in said[0]


def test_opaque_rgba_and_plain_rgb_convert_without_a_note(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        images.load_image(_save(tmp_path, Image.new("RGBA", (64, 64), (9, 9, 9, 255)), "o.png"), 64)
        images.load_image(_save(tmp_path, Image.new("RGB", (64, 64)), "r.png"), 64)


def test_a_reference_folder_without_a_usable_image_is_an_error(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="holds no image file.*it is empty"):
        images.check_files(empty)
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "notes.txt").write_text("x")
    with pytest.raises(ValueError, match=r"holds no image file \(notes.txt\)"):
        images.load_images(tmp_path / "docs", 64)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "a.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match="a.png is not a readable image"):
        images.check_files(bad)
    good = tmp_path / "good"
    good.mkdir()
    for n in ("b.png", "a.jpg"):
        Image.new("RGB", (64, 64)).save(good / n)
    (good / ".hidden.png").write_bytes(b"x")
    assert [p.name for p in images.check_files(good)] == ["a.jpg", "b.png"]
    assert images.as_batch(str(good), 64).shape == (2, 64, 64, 3)


def test_sd_generate_flags_are_checked_before_any_model_loads(tmp_path, capsys, monkeypatch):
    from lr_tutorial import cli
    monkeypatch.setattr(cli, "_validated", lambda a: (_ for _ in ()).throw(KeyboardInterrupt))
    make_tiny_lora(tiny_unet(), tmp_path / "lora")
    base = ["generate", "--backend", "sd", "--out", str(tmp_path / "o")]
    cases = [
        (["--prompt", "a sks dog"], ["needs --class-noun", "--class-noun dog"]),
        (["--prompt", "a sks dog", "--class-noun", "dog", "--base", "./no/such/base"],
         ["--base ./no/such/base: no such folder", "check the path"]),
        (["--prompt", "a sks dog", "--class-noun", "dog", "--personalized", str(tmp_path / "x")],
         ["--personalized", "does not exist"]),
        (["--prompt", "a dog", "--class-noun", "dog", "--personalized", str(tmp_path / "lora")],
         ["--prompt", "identifier 'sks'"]),
        (["--prompt", "a sks cat", "--class-noun", "dog"], ["class noun 'dog'"]),
    ]
    for extra, words in cases:
        assert cli.main(base + extra) == 2, extra
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and all(w in err for w in words), (words, err)
    assert cli.main(base + ["--prompt", "a SKS Dog", "--class-noun", "dog", "--personalized",
                            str(tmp_path / "lora")]) == 130  # valid: stopped where models load


def test_more_threads_than_cores_is_said(tmp_path, capsys, monkeypatch):
    from lr_tutorial import cli, threads
    monkeypatch.setattr(cli, "_validated", lambda a: (_ for _ in ()).throw(KeyboardInterrupt))
    n = threads.cores() + 3
    try:
        assert cli.main(["demo", "--out", str(tmp_path / "d"), "--threads", str(n)]) == 130
    finally:
        torch.set_num_threads(1)
    assert f"warning: --threads {n} is more than the {threads.cores()} cores" in capsys.readouterr().err
