"""load_sd on tiny random-weight checkpoints (tests/tiny_sd.py): CPU only, no network, seconds."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from tiny_sd import CROSS_DIM, LATENT_SIZE, make_tiny_lora, make_tiny_sd, tiny_unet  # noqa: E402

from lr_tutorial.models import load_models  # noqa: E402
from lr_tutorial.sampling import encode_prompts, sample  # noqa: E402
from lr_tutorial.sd import WeightsNotFoundError, load_sd  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def sd1(tmp_path_factory) -> Path:
    return make_tiny_sd(tmp_path_factory.mktemp("tiny_sd1"))


@pytest.fixture(scope="module")
def lora_dir(sd1, tmp_path_factory) -> Path:
    from diffusers import UNet2DConditionModel
    unet = UNet2DConditionModel.from_pretrained(sd1, subfolder="unet")
    return make_tiny_lora(unet, tmp_path_factory.mktemp("lora"), seed=1)


def unet_out(unet, prompt_emb, seed=0):
    """One UNet call on fixed noise. -> (1, 4, 8, 8)"""
    z = torch.randn(1, 4, LATENT_SIZE, LATENT_SIZE, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return unet(z, 500, encoder_hidden_states=prompt_emb).sample


def test_vanilla_loads_samples_and_runs_pipeline(sd1):
    bundle = load_sd(str(sd1), local_files_only=True, class_noun="dog")
    assert (bundle.backend, bundle.personalization, bundle.identifier) == ("sd", "none", "sks")
    assert bundle.class_noun == "dog" and bundle.device.type == "cpu" and bundle.dtype == torch.float32
    assert not bundle.unet.training and not any(p.requires_grad for p in bundle.unet.parameters())
    assert bundle.image_size == 64

    z, traj = sample(bundle, ["a sks dog"], [0], steps=2, guidance=7.5)
    assert z.shape == (1, 4, LATENT_SIZE, LATENT_SIZE) and torch.isfinite(z).all()
    assert len(traj) == 2 and len(traj.latents) == 3

    images = bundle.pipeline()("a sks dog on the beach", num_inference_steps=2, output_type="np",
                               generator=torch.Generator().manual_seed(0)).images
    assert images.shape == (1, 64, 64, 3) and np.isfinite(images).all()
    with pytest.raises(ValueError, match="no personalized model"):
        bundle.using("personalized").__enter__()


def test_lora_switches_and_vanilla_is_the_base_unet(sd1, lora_dir):
    from diffusers import UNet2DConditionModel
    bundle = load_models("sd", base=str(sd1), personalized=str(lora_dir), local_files_only=True)
    assert bundle.personalization == "lora"
    emb = encode_prompts(bundle, ["a sks dog"])  # (1, 77, 32)
    assert emb.shape == (1, 77, CROSS_DIM)
    with bundle.using("vanilla"):
        vanilla = unet_out(bundle.unet, emb)
    with bundle.using("personalized"):
        personal = unet_out(bundle.unet, emb)
        z, _ = sample(bundle, ["a sks dog"], [0], steps=2)
        assert torch.isfinite(z).all()
    assert bundle.mode == "vanilla"  # restored
    base = UNet2DConditionModel.from_pretrained(sd1, subfolder="unet").eval()
    assert torch.equal(vanilla, unet_out(base, emb))
    assert (vanilla - personal).abs().max() > 1e-4


def test_lora_file_path_and_auto_detection(sd1, lora_dir):
    bundle = load_sd(str(sd1), personalized=str(lora_dir / "pytorch_lora_weights.safetensors"),
                     local_files_only=True)
    assert bundle.personalization == "lora"


def test_dreambooth_folder(sd1, tmp_path):
    db = tmp_path / "dreambooth"
    tiny_unet(seed=7).save_pretrained(db / "unet")
    bundle = load_sd(str(sd1), personalized=str(db), local_files_only=True)
    assert bundle.personalization == "dreambooth"
    emb = encode_prompts(bundle, ["a sks dog"])
    with bundle.using("personalized"):
        assert bundle.unet is bundle.personal_unet
        personal = unet_out(bundle.unet, emb)
    assert not torch.equal(unet_out(bundle.unet, emb), personal)
    assert not any(p.requires_grad for p in bundle.personal_unet.parameters())


def test_dreambooth_other_architecture_names_the_keys(sd1, tmp_path):
    db = tmp_path / "dreambooth_other"
    tiny_unet(block_out_channels=(16, 16, 32, 32), cross_attention_dim=64).save_pretrained(db / "unet")
    with pytest.raises(ValueError, match="another architecture") as info:
        load_sd(str(sd1), personalized=str(db), local_files_only=True)
    assert "block_out_channels" in str(info.value) and "cross_attention_dim" in str(info.value)
    assert "sample_size" not in str(info.value)


def test_lora_for_another_base_model(sd1, tmp_path):
    other = tiny_unet(cross_attention_dim=64)  # like an SD-2 LoRA (1024) on SD-1.5 (768)
    make_tiny_lora(other, tmp_path / "lora_other")
    with pytest.raises(ValueError, match="made for another base model") as info:
        load_sd(str(sd1), personalized=str(tmp_path / "lora_other"), local_files_only=True)
    assert "attn2.to_k" in str(info.value)


def test_textual_inversion_embedding(sd1, tmp_path):
    from safetensors.torch import save_file
    vec = torch.randn(1, CROSS_DIM)
    save_file({"<sks-dog>": vec}, str(tmp_path / "learned_embeds.safetensors"))
    bundle = load_sd(str(sd1), personalized=str(tmp_path), local_files_only=True)
    assert bundle.personalization == "textual_inversion" and bundle.identifier == "<sks-dog>"
    ids = bundle.tokenizer("a <sks-dog>").input_ids
    token_id = bundle.tokenizer.convert_tokens_to_ids("<sks-dog>")
    assert token_id in ids
    assert torch.equal(bundle.text_encoder.get_input_embeddings().weight[token_id], vec[0])


def test_offline_missing_weights_give_one_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(WeightsNotFoundError) as info:
        load_sd("lr-tutorial-tests/no-such-model", device="cpu")
    msg = str(info.value)
    assert isinstance(info.value, OSError)
    assert 'load_models("toy")' in msg and "local folder" in msg
    assert "huggingface-cli download lr-tutorial-tests/no-such-model" in msg


def test_missing_local_folder(tmp_path):
    with pytest.raises(WeightsNotFoundError, match="no such folder"):
        load_sd(str(tmp_path / "nope"), device="cpu")
    (tmp_path / "half").mkdir()
    with pytest.raises(WeightsNotFoundError, match="scheduler"):
        load_sd(str(tmp_path / "half"), device="cpu")


def test_v_prediction_linear_projection_variant(tmp_path):
    folder = make_tiny_sd(tmp_path / "sd2", v_prediction=True, linear_projection=True)
    bundle = load_sd(str(folder), local_files_only=True)
    assert bundle.scheduler.config.prediction_type == "v_prediction"
    assert bundle.unet.config.use_linear_projection is True
    assert list(bundle.unet.config.attention_head_dim) == [2, 2, 4, 4]
    z, _ = sample(bundle, ["a sks dog on the beach"], [3], steps=2, guidance=7.5)
    assert z.shape == (1, 4, LATENT_SIZE, LATENT_SIZE) and torch.isfinite(z).all()


def test_fused_lora_matches_unfused_and_vanilla_stays_bit_exact(sd1, lora_dir):
    """set_fuse_lora(True) merges the LoRA into the weights while personalized; switching back
    copies the base weights in exactly. Measured on this tiny model: fused vs unfused outputs
    differ by about 1e-6 of their scale (float rounding); the bound is 1e-4."""
    bundle = load_models("sd", base=str(sd1), personalized=str(lora_dir), local_files_only=True)
    emb = encode_prompts(bundle, ["a sks dog"])
    weights = {n: p.detach().clone() for n, p in bundle.unet.named_parameters()}
    with bundle.using("personalized"):
        unfused = unet_out(bundle.unet, emb)
    with bundle.using("vanilla"):
        vanilla = unet_out(bundle.unet, emb)
    bundle.set_fuse_lora(True)
    with bundle.using("personalized"):
        fused = unet_out(bundle.unet, emb)
        layers = bundle._lora_layers[1]
        # W + s B A in the base layers' weights, the adapters off (no B A x on top of it)
        assert layers and all(layer.disable_adapters for layer in layers)
        changed = {n for n, p in bundle.unet.named_parameters() if not torch.equal(weights[n], p)}
        assert changed and all(".base_layer." in n for n in changed)
    scale = unfused.abs().max()
    assert 0 < (fused - unfused).abs().max() / scale < 1e-4 or torch.equal(fused, unfused)
    with bundle.using("vanilla"):
        assert torch.equal(unet_out(bundle.unet, emb), vanilla)
    assert all(torch.equal(weights[n], p) for n, p in bundle.unet.named_parameters())
    with bundle.using("personalized"):  # the kept merge: the same weights, bit for bit
        assert torch.equal(unet_out(bundle.unet, emb), fused)
    bundle.set_fuse_lora(False)
    with bundle.using("personalized"):
        assert torch.equal(unet_out(bundle.unet, emb), unfused)
        assert not any(layer.merged or layer.disable_adapters for layer in bundle._lora_layers[1])
    assert all(torch.equal(weights[n], p) for n, p in bundle.unet.named_parameters())


def test_fused_lora_notices_a_changed_lora_or_base_weight(sd1, lora_dir):
    """The merged weights are computed once and kept (ModelBundle._merge); a write to the LoRA's
    weights, its scaling or a base weight afterwards is noticed at the next switch and merged
    afresh, so the fused model always equals the unfused one (to float rounding)."""
    bundle = load_models("sd", base=str(sd1), personalized=str(lora_dir), local_files_only=True)
    emb = encode_prompts(bundle, ["a sks dog"])
    bundle.set_fuse_lora(True)
    with bundle.using("personalized"):  # the first merge: the entries are kept from here on
        unet_out(bundle.unet, emb)
    layer = bundle._lora_layers[1][0]
    name = bundle.adapter_name
    for what, change in (
            ("lora_B written in place", lambda: layer.lora_B[name].weight.mul_(3.0)),
            ("scaling changed", lambda: layer.scaling.__setitem__(name, layer.scaling[name] * 2)),
            ("base weight written", lambda: layer.get_base_layer().weight.mul_(-2.0))):
        with bundle.using("personalized"):
            before = unet_out(bundle.unet, emb)  # the merge as it stands
        with torch.no_grad(), bundle.using("vanilla"):
            change()
        with bundle.using("personalized"):
            got = unet_out(bundle.unet, emb)
        bundle.set_fuse_lora(False)
        with bundle.using("personalized"):
            want = unet_out(bundle.unet, emb)
        bundle.set_fuse_lora(True)
        assert (want - before).abs().max() > 1e-4, what  # the change matters: can fail
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4, msg=what)
    # moved while merged: the merge is made again in the new dtype, vanilla is W's cast
    with bundle.using("personalized"):
        before = unet_out(bundle.unet, emb)
        bundle.to(dtype=torch.float64)
        z = torch.randn(1, 4, LATENT_SIZE, LATENT_SIZE, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():  # unet_out's noise, in float64
            moved = bundle.unet(z.double(), 500, encoder_hidden_states=emb.double()).sample
    assert moved.dtype == torch.float64 and all(
        f.merged.dtype == torch.float64 for f in bundle._fused.values())
    torch.testing.assert_close(moved.float(), before, atol=1e-5, rtol=1e-4)
    with bundle.using("vanilla"):
        weights = {n: p.detach().clone() for n, p in bundle.unet.named_parameters()}
    bundle.set_fuse_lora(False)
    with bundle.using("vanilla"):
        assert all(torch.equal(weights[n], p) for n, p in bundle.unet.named_parameters())


def test_unet_onednn_off_only_inside_the_unet_and_restored_after_an_error(sd1, lora_dir):
    """set_unet_onednn(False): each UNet forward runs its convolutions without oneDNN and puts
    the process's flag back on exit, also when the forward raises; the VAE keeps the flag.
    Measured on this tiny model: the outputs differ from oneDNN's by about 5e-7 of their scale
    (float rounding); the bound is 1e-5."""
    bundle = load_models("sd", base=str(sd1), personalized=str(lora_dir), local_files_only=True)
    assert bundle.unet_onednn and not bundle._onednn_hooks  # torch's default for SD
    emb = encode_prompts(bundle, ["a sks dog"])
    seen = []
    record = lambda m, a: seen.append(torch.backends.mkldnn.enabled)  # noqa: E731
    conv = next(m for m in bundle.unet.modules() if isinstance(m, torch.nn.Conv2d))
    vae_conv = next(m for m in bundle.vae.decoder.modules() if isinstance(m, torch.nn.Conv2d))
    handles = [conv.register_forward_pre_hook(record), vae_conv.register_forward_pre_hook(record)]
    try:
        with_onednn = unet_out(bundle.unet, emb)
        bundle.set_unet_onednn(False)
        without = unet_out(bundle.unet, emb)
        assert torch.backends.mkldnn.enabled  # back after the forward
        bundle.vae.decode(torch.zeros(1, 4, LATENT_SIZE, LATENT_SIZE))
        assert seen == [True, False, True]  # UNet with, UNet without, the VAE as the process
        scale = with_onednn.abs().max()
        assert (without - with_onednn).abs().max() / scale < 1e-5
        boom = conv.register_forward_hook(lambda *a: 1 / 0)
        with pytest.raises(ZeroDivisionError):
            unet_out(bundle.unet, emb)
        boom.remove()
        assert torch.backends.mkldnn.enabled and seen[-1] is False  # restored after the error
        torch.backends.mkldnn.enabled = False  # a caller's own setting is kept, not forced on
        unet_out(bundle.unet, emb)
        assert torch.backends.mkldnn.enabled is False
        torch.backends.mkldnn.enabled = True
        bundle.set_unet_onednn(True)  # the hooks are gone
        assert not bundle._onednn_hooks
        torch.testing.assert_close(unet_out(bundle.unet, emb), with_onednn, atol=0, rtol=0)
        assert seen[-1] is True
    finally:
        torch.backends.mkldnn.enabled = True
        for h in handles:
            h.remove()


def test_unet_onednn_min_rows_keeps_it_for_large_calls_only(sd1, lora_dir):
    """set_unet_onednn(True, min_rows=3): a UNet call of fewer rows runs without oneDNN, one of
    3 or more rows with it (the toy's TOY_ONEDNN_MIN_ROWS policy), `sample` given by position
    or by keyword; the process's flag is back after each; a bad min_rows is refused."""
    bundle = load_models("sd", base=str(sd1), personalized=str(lora_dir), local_files_only=True)
    emb = encode_prompts(bundle, ["a sks dog"])
    seen = []
    conv = next(m for m in bundle.unet.modules() if isinstance(m, torch.nn.Conv2d))
    handle = conv.register_forward_pre_hook(lambda m, a: seen.append(torch.backends.mkldnn.enabled))
    z = torch.randn(3, 4, LATENT_SIZE, LATENT_SIZE, generator=torch.Generator().manual_seed(0))
    try:
        bundle.set_unet_onednn(True, min_rows=3)
        assert bundle.unet_onednn_min_rows == 3 and len(bundle._onednn_hooks) == 2
        with torch.no_grad():
            for rows in (1, 2, 3):
                bundle.unet(z[:rows], 500, encoder_hidden_states=emb.expand(rows, -1, -1))
                assert torch.backends.mkldnn.enabled
            bundle.unet(sample=z[:1], timestep=500, encoder_hidden_states=emb)
        assert seen == [False, False, True, False]  # fewer than 3 rows: off; 3 rows: on
        for bad in (0, True, 2.0):
            with pytest.raises(ValueError, match="min_rows"):
                bundle.set_unet_onednn(True, min_rows=bad)
        bundle.set_unet_onednn(True)  # min_rows 1: every call, no hooks
        assert not bundle._onednn_hooks and bundle.unet_onednn_min_rows == 1
    finally:
        torch.backends.mkldnn.enabled = True
        handle.remove()
