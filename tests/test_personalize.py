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
    with b2.using("personalized"):
        assert all(layer.merged for layer in b2._lora_layers[1])
    with b2.using("vanilla"):
        base = {k: v for k, v in b2.unet.state_dict().items() if "lora" not in k}
        assert all(torch.equal(v, before["unet"][k.replace(".base_layer", "")]) for k, v in base.items())
    with b2.using("personalized"):
        assert torch.equal(b2.text_encoder.get_input_embeddings().weight, before["emb"])


@pytest.mark.parametrize("kw, match", [
    ({"lr_schedule": "linear"}, "lr_schedule"),
    ({"uncond_prob": 1.0}, "uncond_prob"),
    ({"identifier_lr": -1.0}, "identifier_lr"),
    ({"identifier_lr": 1e-3, "instance_prompt": "a star"}, "does not contain the bundle's identifier"),
])
def test_bad_config_is_refused_before_training(kw, match):
    b = load_models("toy", personalized=None)
    imgs = np.zeros((2, 64, 64, 3), np.uint8)
    with pytest.raises(ValueError, match=match):
        dreambooth_lora(b, imgs, DreamBoothConfig(steps=1, **kw), progress=False)
    assert b.personalization == "none"


def test_cli_trains_the_toy_recipe_with_flag_overrides(tmp_path):
    import json

    from lr_tutorial import cli
    from lr_tutorial.personalize import ALL_UNET_TARGETS, toy_recipe
    out = tmp_path / "lora"
    assert cli.main(["personalize-toy", "--out", str(out), "--steps", "2", "--rank", "4",
                     "--identifier-lr", "1e-3"]) == 0
    cfg = json.loads((out / "dreambooth_config.json").read_text())
    recipe = toy_recipe()
    assert (cfg["steps"], cfg["rank"], cfg["alpha"], cfg["identifier_lr"]) == (2, 4, 4.0, 1e-3)
    assert (cfg["lr"], cfg["lr_schedule"]) == (recipe.lr, recipe.lr_schedule)  # unset flags
    assert tuple(cfg["target_modules"]) == ALL_UNET_TARGETS and (out / IDENTIFIER_FILE).is_file()
