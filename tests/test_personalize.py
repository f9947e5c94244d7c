"""DreamBooth-LoRA (personalize.py): what trains, what stays frozen, the learned identifier's
mode switch, and the saved folder round trip. A few steps on the toy backend."""
import numpy as np
import pytest
import torch

from lr_tutorial import load_models, sampling
from lr_tutorial.models import IDENTIFIER_FILE
from lr_tutorial.personalize import DreamBoothConfig, dreambooth_lora
from lr_tutorial.toy import subject


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("lora") / "lora"
    b = load_models("toy", personalized=None)
    before = {"unet": {k: v.clone() for k, v in b.unet.state_dict().items()},
              "emb": b.text_encoder.get_input_embeddings().weight.detach().clone()}
    cfg = DreamBoothConfig(steps=4, identifier_lr=5e-2, uncond_prob=0.5, lr_schedule="cosine",
                           target_modules=("to_q", "to_k", "to_v", "to_out.0", "conv1"))
    dreambooth_lora(b, subject.reference_images(), cfg, out_dir=out, progress=False)
    return b, before, out


def test_only_the_lora_and_the_identifier_row_learn(trained):
    b, before, _ = trained
    sks = b.tokenizer.convert_tokens_to_ids("sks")
    with b.using("vanilla"):
        base = {k: v for k, v in b.unet.state_dict().items() if "lora" not in k}
        assert all(torch.equal(v, before["unet"][k.replace(".base_layer", "")]) for k, v in base.items())
        assert torch.equal(b.text_encoder.get_input_embeddings().weight, before["emb"])
    with b.using("personalized"):
        w = b.text_encoder.get_input_embeddings().weight
        changed = (w != before["emb"]).any(dim=1).nonzero().flatten().tolist()
        assert changed == [sks]  # every other token's embedding is the base model's
    assert b.mode == "personalized"  # dreambooth_lora leaves the bundle personalized


def test_saved_folder_reloads_the_same_personalized_model(trained):
    b, before, out = trained
    assert (out / IDENTIFIER_FILE).is_file() and (out / "pytorch_lora_weights.safetensors").is_file()
    again = load_models("toy", personalized=out)
    for mode in ("vanilla", "personalized"):
        with b.using(mode), again.using(mode):
            z1, _ = sampling.sample(b, ["a sks star"], [0], steps=3)
            z2, _ = sampling.sample(again, ["a sks star"], [0], steps=3)
            torch.testing.assert_close(z1, z2)
    with again.using("personalized"):
        e_p = sampling.encode_prompts(again, ["a sks star", "a star"])
    e_v = sampling.encode_prompts(again, ["a sks star", "a star"])
    assert not torch.allclose(e_p[0], e_v[0])  # the learned identifier changes "a sks star"...
    torch.testing.assert_close(e_p[1], e_v[1])  # ...and nothing without it


def test_a_new_lora_drops_the_previous_identifier(trained, tmp_path):
    b, before, _ = trained
    b2 = load_models("toy", personalized=None)
    dreambooth_lora(b2, subject.reference_images(), DreamBoothConfig(steps=1, identifier_lr=1e-2),
                    progress=False)
    b2.set_fuse_lora(True)  # merged while personalized: training must unmerge, then merge again
    dreambooth_lora(b2, subject.reference_images(), DreamBoothConfig(steps=1), progress=False)
    assert b2.identifier_embedding is None and b2.fuse_lora
    with b2.using("personalized"):  # W + s B A in the base weights, the adapters off
        assert b2._holds_merged and all(layer.disable_adapters for layer in b2._lora_layers[1])
    with b2.using("vanilla"):
        base = {k: v for k, v in b2.unet.state_dict().items() if "lora" not in k}
        assert all(torch.equal(v, before["unet"][k.replace(".base_layer", "")]) for k, v in base.items())
    with b2.using("personalized"):
        assert torch.equal(b2.text_encoder.get_input_embeddings().weight, before["emb"])


def test_init_lora_starts_from_a_saved_lora(trained, tmp_path):
    """init_lora copies a saved LoRA's matrices and learned identifier into the fresh adapter:
    one step at a vanishing lr (1e-12) saves the init back unchanged, whether the identifier
    goes on learning (identifier_lr > 0) or stays as the init learned it (identifier_lr = 0)."""
    from lr_tutorial.models import load_state_dict
    _, _, out = trained
    targets = ("to_q", "to_k", "to_v", "to_out.0", "conv1")  # the fixture's
    for ident_lr in (1e-12, 0.0):
        b = load_models("toy", personalized=None)
        again = tmp_path / f"again_{ident_lr}"
        cfg = DreamBoothConfig(steps=1, lr=1e-12, identifier_lr=ident_lr, target_modules=targets,
                               init_lora=str(out))
        dreambooth_lora(b, subject.reference_images(), cfg, out_dir=again, progress=False)
        for name in ("pytorch_lora_weights.safetensors", IDENTIFIER_FILE):
            want, got = load_state_dict(out / name), load_state_dict(again / name)
            assert want.keys() == got.keys() and len(want) > 0
            for k in want:
                torch.testing.assert_close(got[k], want[k], atol=1e-8, rtol=0)
    with pytest.raises(ValueError, match="rank=8"):
        dreambooth_lora(load_models("toy", personalized=None), subject.reference_images(),
                        DreamBoothConfig(steps=1, rank=4, target_modules=targets, init_lora=str(out)),
                        progress=False)
    with pytest.raises(FileNotFoundError, match="no LoRA weights"):
        dreambooth_lora(load_models("toy", personalized=None), subject.reference_images(),
                        DreamBoothConfig(steps=1, init_lora=str(tmp_path / "nowhere")), progress=False)


def test_fixed_instance_prompt_reads_the_kept_identifier():
    """With a learned identifier kept fixed (init_lora, identifier_lr = 0) the instance prompt
    is encoded with the learned row, as the personalized model will read it; the text encoder
    is left with the base row."""
    from lr_tutorial.models import data_dir
    from lr_tutorial.personalize import _instance_encoder
    b = load_models("toy", personalized=data_dir() / "toy" / "lora")
    assert b.identifier_embedding is not None and b.mode == "vanilla"
    with b.using("personalized"):
        want = sampling.encode_prompts(b, ["a sks star"])
    base = sampling.encode_prompts(b, ["a sks star"])
    got = _instance_encoder(b, DreamBoothConfig(), None)()
    torch.testing.assert_close(got, want)
    assert not torch.allclose(got, base)
    torch.testing.assert_close(sampling.encode_prompts(b, ["a sks star"]), base)


@pytest.mark.parametrize("kw, match", [
    ({"lr_schedule": "linear"}, "lr_schedule"),
    ({"uncond_prob": 1.0}, "uncond_prob"),
    ({"identifier_lr": -1.0}, "identifier_lr"),
    ({"identifier_lr": 1e-3, "instance_prompt": "a star"}, "does not contain the bundle's identifier"),
    ({"background_weight": 0.5}, "no masks were given"),
    ({"background_weight": 1.5}, "background_weight"),
    ({"class_prompt": ("a star", ""), "num_class_images": 4}, "class_prompt"),
    ({"class_prompt": ("a star", "a star at night"), "num_class_images": 1}, "num_class_images"),
])
def test_bad_config_is_refused_before_training(kw, match):
    b = load_models("toy", personalized=None)
    imgs = np.zeros((2, 64, 64, 3), np.uint8)
    with pytest.raises(ValueError, match=match):
        dreambooth_lora(b, imgs, DreamBoothConfig(steps=1, **kw), progress=False)
    assert b.personalization == "none"


def test_masked_loss_weights_follow_the_subject_mask():
    """background_weight < 1: loss weights 1 on latent pixels inside the subject, the weight
    outside, the covered share in between (area average to the latent grid)."""
    from lr_tutorial.personalize import _loss_weights
    b = load_models("toy", personalized=None)
    imgs = np.zeros((1, 64, 64, 3), np.uint8)
    mask = np.zeros((1, 64, 64), bool)
    mask[0, 16:32, 16:34] = True  # latent (4x downsampled): rows 4-7 full, col 8 half covered
    w = _loss_weights(b, imgs, mask, DreamBoothConfig(background_weight=0.2))  # (1, 1, 16, 16)
    assert w.shape == (1, 1, 16, 16)
    assert torch.all(w[0, 0, 4:8, 4:8] == 1) and torch.all(w[0, 0, :4] == 0.2)
    torch.testing.assert_close(w[0, 0, 5, 8], torch.tensor(0.6))
    assert _loss_weights(b, imgs, None, DreamBoothConfig()) is None  # the plain loss
    with pytest.raises(ValueError, match="must be"):
        _loss_weights(b, imgs, mask[:, :32], DreamBoothConfig(background_weight=0.2))


def test_training_noise_adds_a_per_channel_offset_and_block_noise():
    from lr_tutorial.personalize import training_noise
    shape = (2, 4, 16, 16)
    white = training_noise(shape, torch.Generator().manual_seed(0))
    torch.testing.assert_close(white, torch.randn(shape, generator=torch.Generator().manual_seed(0)))
    off = training_noise(shape, torch.Generator().manual_seed(0), offset=0.3) - white
    assert off.std(dim=(2, 3)).max() < 1e-6 and off.abs().max() > 0  # one value per channel
    pyr = training_noise(shape, torch.Generator().manual_seed(0), pyramid=0.5) - white
    assert pyr.std(dim=(2, 3)).min() > 0.05  # varies over the image, smoothly
    assert (pyr[..., 1:, :] - pyr[..., :-1, :]).abs().mean() < pyr.abs().mean()


def oracle_mask(image):
    from lr_tutorial.toy import oracle
    return oracle.analyze(image).mask


def test_prior_preservation_cycles_through_several_class_prompts(monkeypatch):
    """Several class prompts: class image i is sampled with prompt i mod P and trained with it."""
    from lr_tutorial import personalize
    seen = {}
    real = personalize._train

    def spy(cfg, bundle, opt, z_inst, weights, z_class, cond_class, *rest):
        seen["z"], seen["cond"] = z_class, cond_class
        return real(cfg, bundle, opt, z_inst, weights, z_class, cond_class, *rest)

    monkeypatch.setattr(personalize, "_train", spy)
    b = load_models("toy", personalized=None)
    prompts = ("a star at night", "a star on the grass")
    cfg = DreamBoothConfig(steps=1, class_prompt=prompts, num_class_images=3)
    dreambooth_lora(b, subject.reference_images(), cfg, progress=False)
    assert seen["z"].shape == (3, 4, 16, 16) and seen["cond"].shape[0] == 3
    with b.using("vanilla"):
        want = sampling.encode_prompts(b, [prompts[0], prompts[1], prompts[0]])
    torch.testing.assert_close(seen["cond"], want)


def test_photos_above_moves_only_the_rows_at_and_above_max_timestep_onto_photos():
    from lr_tutorial.personalize import photos_above
    g = torch.Generator().manual_seed(0)
    idx, t = torch.randint(0, 65, (4000,), generator=g), torch.randint(0, 1000, (4000,), generator=g)
    moved = photos_above(idx, t, n_photos=5, max_timestep=800)
    assert torch.equal(moved[t < 800], idx[t < 800])  # below: every image, as drawn
    assert moved[t >= 800].max() < 5  # at and above: the five photos only, each about as often
    counts = torch.bincount(moved[t >= 800], minlength=5)
    assert counts.min() > 0.8 * counts.float().mean()
    assert torch.equal(moved[t >= 800], idx[t >= 800] % 5)  # the photo the copy was made from


def _lora(b):
    return {k: v.detach().clone() for k, v in b.unet.named_parameters() if "lora" in k}


def test_copies_without_max_timestep_train_like_more_photos():
    """TrainingCopies(max_timestep=None): the copies are drawn with the photos at every
    timestep, the same rows (and LoRA) as passing photos and copies together as the photos."""
    from lr_tutorial.personalize import TrainingCopies
    refs = subject.reference_images()
    extra = refs[:, ::-1].copy()  # mirrored photos
    cfg = DreamBoothConfig(steps=2, identifier_lr=1e-2)
    a, b = load_models("toy", personalized=None), load_models("toy", personalized=None)
    dreambooth_lora(a, refs, cfg, progress=False, copies=TrainingCopies(extra))
    dreambooth_lora(b, np.concatenate([refs, extra]), cfg, progress=False)
    la, lb = _lora(a), _lora(b)
    assert la.keys() == lb.keys() and all(torch.equal(la[k], lb[k]) for k in la)
    assert torch.equal(a.identifier_embedding[1], b.identifier_embedding[1])


def test_copies_are_trained_only_below_max_timestep(monkeypatch, tmp_path):
    """Every instance row noised at or above max_timestep is a photo; the copies' recipe is
    saved with the LoRA's config."""
    import json

    from lr_tutorial import personalize
    from lr_tutorial.personalize import TrainingCopies
    rows, real = [], personalize.photos_above

    def spy(idx, t, n_photos, max_timestep):
        out = real(idx, t, n_photos, max_timestep)
        rows.append((out, t))
        return out

    monkeypatch.setattr(personalize, "photos_above", spy)
    refs = subject.reference_images()
    copies = TrainingCopies(np.zeros((20, 64, 64, 3), np.uint8), max_timestep=500,
                            recipe={"made_by": "zeros"})
    cfg = DreamBoothConfig(steps=6, batch_size=8)
    dreambooth_lora(load_models("toy", personalized=None), refs, cfg, out_dir=tmp_path / "l",
                    progress=False, copies=copies)
    assert len(rows) == 6
    idx, t = torch.cat([r[0] for r in rows]), torch.cat([r[1] for r in rows])
    assert (idx[t >= 500] < len(refs)).all() and (idx[t < 500] >= len(refs)).any()
    saved = json.loads((tmp_path / "l" / "dreambooth_config.json").read_text())
    assert saved["made_by"] == "zeros" and saved["steps"] == 6


@pytest.mark.parametrize("kw, match", [
    ({"images": np.zeros((2, 32, 32, 3), np.uint8)}, "copies.images must be uint8"),
    ({"max_timestep": 0}, "copies.max_timestep"),
    ({"recipe": {"steps": 3}}, "DreamBoothConfig fields"),
])
def test_bad_copies_are_refused_before_training(kw, match):
    from lr_tutorial.personalize import TrainingCopies
    b = load_models("toy", personalized=None)
    copies = TrainingCopies(**{"images": np.zeros((2, 64, 64, 3), np.uint8), **kw})
    with pytest.raises(ValueError, match=match):
        dreambooth_lora(b, subject.reference_images(), DreamBoothConfig(steps=1), progress=False,
                        copies=copies)
    assert b.personalization == "none"


def test_masked_loss_needs_the_copies_masks():
    from lr_tutorial.personalize import TrainingCopies
    refs = subject.reference_images()
    masks = np.stack([oracle_mask(r) for r in refs])
    cfg = DreamBoothConfig(steps=1, background_weight=0.5)
    with pytest.raises(ValueError, match="needs the copies' masks"):
        dreambooth_lora(load_models("toy", personalized=None), refs, cfg, progress=False,
                        masks=masks, copies=TrainingCopies(refs[:2]))
    b = load_models("toy", personalized=None)
    dreambooth_lora(b, refs, cfg, progress=False, masks=masks,
                    copies=TrainingCopies(refs[:2], masks=masks[:2]))
    assert b.has_personal


def test_init_lora_reads_the_shipped_configs_knobs_it_does_not_know():
    """The shipped LoRA's dreambooth_config.json holds keys that are not DreamBoothConfig
    fields (the toy's augmentation knobs among them): going on from it reads only rank and
    target_modules."""
    import dataclasses
    import json

    from lr_tutorial.models import data_dir
    from lr_tutorial.personalize import toy_recipe
    folders = sorted(p.parent for p in (data_dir() / "toy").glob("*/dreambooth_config.json"))
    assert folders  # data/toy/lora
    known = {f.name for f in dataclasses.fields(DreamBoothConfig)}
    assert any(set(json.loads((f / "dreambooth_config.json").read_text())) - known for f in folders)
    for folder in folders:
        b = load_models("toy", personalized=None)
        dreambooth_lora(b, subject.reference_images(),
                        toy_recipe(steps=1, lr=1e-12, init_lora=str(folder)), progress=False)
        assert b.has_personal
