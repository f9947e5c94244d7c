"""The toy LoRAs' training data (toy/personal.py): ToyPersonalConfig's augmented copies of the
photos, the order the trainer draws them in, and `personalize-toy`'s flags for them."""
import dataclasses
import json

import numpy as np
import pytest

from lr_tutorial import load_models
from lr_tutorial.augment import paste_on_backdrops, reframe
from lr_tutorial.models import IDENTIFIER_FILE
from lr_tutorial.personalize import DreamBoothConfig
from lr_tutorial.toy import oracle, subject
from lr_tutorial.toy.personal import ToyPersonalConfig, train_lora, training_copies


def _masks(images):
    return np.stack([oracle.analyze(r).mask for r in images])


@pytest.mark.parametrize("kw, match", [
    ({"background_augment": 4}, "background_augment=4 needs the subject's masks"),
    ({"background_augment": -1}, "background_augment"),
    ({"layout_augment": -1}, "layout_augment"),
    ({"layout_augment": 2, "layout_scale": (0.0, 1.0)}, "layout_scale"),
    ({"layout_augment": 2, "layout_shift": 0.7}, "layout_shift"),
    ({"augment_max_timestep": 0}, "augment_max_timestep"),
])
def test_bad_toy_config_is_refused_before_training(kw, match):
    b = load_models("toy", personalized=None)
    imgs = np.zeros((2, 64, 64, 3), np.uint8)
    with pytest.raises(ValueError, match=match):
        train_lora(b, imgs, DreamBoothConfig(steps=1), ToyPersonalConfig(**kw), progress=False)
    assert b.personalization == "none"


def test_layout_augment_refuses_masks_it_would_misalign():
    b = load_models("toy", personalized=None)
    refs = subject.reference_images()[:2]
    masks = np.ones(refs.shape[:3], bool)
    with pytest.raises(ValueError, match="layout_augment moves the subject.*background_weight=1"):
        train_lora(b, refs, DreamBoothConfig(steps=1, background_weight=0.5),
                   ToyPersonalConfig(layout_augment=2), masks=masks, progress=False)


def test_training_copies_are_the_composites_then_the_reframed_copies():
    """The rows after the photos: background_augment's composites, then layout_augment's
    re-framed copies of the photos and composites, both drawn from the seed; trained below
    augment_max_timestep; their masks kept until a copy is re-framed."""
    refs = subject.reference_images()
    masks = _masks(refs)
    toy = ToyPersonalConfig(background_augment=4, layout_augment=6, layout_scale=(0.75, 1.05),
                            layout_shift=0.22, augment_max_timestep=600)
    copies = training_copies(refs, masks, toy, seed=3)
    both, _ = paste_on_backdrops(refs, masks, 4, 3)
    want = np.concatenate([both[5:], reframe(both, 6, (0.75, 1.05), 3, shift=0.22)])
    assert np.array_equal(copies.images, want) and copies.masks is None
    assert copies.max_timestep == 600 and copies.recipe == dataclasses.asdict(toy)
    backdrops = training_copies(refs, masks, ToyPersonalConfig(background_augment=2), seed=0)
    assert backdrops.max_timestep is None and np.array_equal(backdrops.masks, masks[:2])
    none = training_copies(refs, None, ToyPersonalConfig(), seed=0)
    assert none.images.shape == (0, 64, 64, 3) and none.max_timestep is None


def test_the_split_recipe_trains_and_records_its_knobs(tmp_path):
    """Both augmentations and the split, a few real steps; the saved config holds the generic
    and the toy's knobs, as the shipped LoRAs' dreambooth_config.json files do."""
    b = load_models("toy", personalized=None)
    refs = subject.reference_images()
    toy = ToyPersonalConfig(background_augment=2, layout_augment=3, layout_shift=0.2,
                            augment_max_timestep=500)
    train_lora(b, refs, DreamBoothConfig(steps=2), toy, masks=_masks(refs),
               out_dir=tmp_path / "lora", progress=False)
    assert b.has_personal
    saved = json.loads((tmp_path / "lora" / "dreambooth_config.json").read_text())
    assert (saved["steps"], saved["background_augment"], saved["layout_augment"]) == (2, 2, 3)
    assert (saved["layout_shift"], saved["augment_max_timestep"]) == (0.2, 500)


def test_cli_trains_the_toy_recipe_with_flag_overrides(tmp_path):
    from lr_tutorial import cli
    from lr_tutorial.personalize import ALL_UNET_TARGETS, toy_recipe
    out = tmp_path / "lora"
    assert cli.main(["personalize-toy", "--out", str(out), "--steps", "2", "--rank", "4",
                     "--identifier-lr", "1e-3", "--background-weight", "0.5", "--offset-noise",
                     "0.1", "--background-augment", "3", "--class-prompt", "a star", "a star at night",
                     "--num-class-images", "2", "--layout-augment", "0",
                     "--layout-scale", "0.6", "1.1"]) == 0
    cfg = json.loads((out / "dreambooth_config.json").read_text())
    recipe = toy_recipe()
    assert (cfg["steps"], cfg["rank"], cfg["alpha"], cfg["identifier_lr"]) == (2, 4, 4.0, 1e-3)
    assert (cfg["lr"], cfg["lr_schedule"]) == (recipe.lr, recipe.lr_schedule)  # unset flags
    assert tuple(cfg["target_modules"]) == ALL_UNET_TARGETS and (out / IDENTIFIER_FILE).is_file()
    assert (cfg["background_weight"], cfg["offset_noise"], cfg["pyramid_noise"]) == (0.5, 0.1, 0.0)
    assert cfg["class_prompt"] == ["a star", "a star at night"] and cfg["num_class_images"] == 2
    assert cfg["background_augment"] == 3
    assert cfg["layout_augment"] == 0 and cfg["layout_scale"] == [0.6, 1.1]


def test_cli_goes_on_from_a_lora_with_reframed_copies(tmp_path, capsys):
    from lr_tutorial import cli
    first, second = tmp_path / "first", tmp_path / "second"
    assert cli.main(["personalize-toy", "--out", str(first), "--steps", "1", "--rank", "4"]) == 0
    assert cli.main(["personalize-toy", "--out", str(second), "--steps", "2", "--rank", "4",
                     "--init-lora", str(first), "--layout-augment", "2", "--layout-shift", "0.2",
                     "--augment-max-timestep", "600"]) == 0
    cfg = json.loads((second / "dreambooth_config.json").read_text())
    assert cfg["init_lora"] == str(first) and cfg["augment_max_timestep"] == 600
    # the recipe's rank 8 against the init's 4: one line on stderr, exit status 2
    assert cli.main(["personalize-toy", "--out", str(tmp_path / "third"), "--steps", "1",
                     "--init-lora", str(first)]) == 2
    assert "rank=4" in capsys.readouterr().err
    assert not (tmp_path / "third").exists()
    # the masked loss with re-framed copies: refused naming both flags, before any model loads
    assert cli.main(["personalize-toy", "--out", str(tmp_path / "fourth"), "--layout-augment",
                     "2", "--background-weight", "0.5"]) == 2
    err = capsys.readouterr().err
    assert "--background-weight 0.5" in err and "--layout-augment 2" in err
