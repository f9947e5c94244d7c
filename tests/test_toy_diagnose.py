"""The toy world's diagnostics: diptych training data, the property checks' prompts, the sheet."""
import numpy as np
import pytest

from lr_tutorial.toy import contact, heldout, oracle, properties, train, world


def test_diptych_panels_show_one_shape_in_one_uncaptioned_look():
    for i in range(20):
        a, b = train.diptych_scenes(0, i)
        assert a.shape == b.shape and a.pattern == b.pattern and a.pattern is not None
        # never the subject's own look: the base model must not learn it
        assert a.pattern not in (world.SUBJECT_PATTERN,)
        img = train.diptych_image(0, i)
        assert img.shape == (world.SIZE, 2 * world.SIZE, 3) and img.dtype == np.uint8
        # each panel is a scene the oracle reads as that shape (the two halves are independent)
        left, right = oracle.analyze(img[:, :world.SIZE]), oracle.analyze(img[:, world.SIZE:])
        assert left.found and right.found
    assert np.array_equal(train.diptych_image(0, 3), train.diptych_image(0, 3))  # seeded
    caps = {train.diptych_caption(0, i) for i in range(40)}
    assert "" in caps and all(c == "" or c.split()[1] in world.SHAPES for c in caps)


def test_diptych_rows_train_beside_the_square_ones(tmp_path):
    """One training step with diptychs in the batch runs and checkpoints (16x32 latents)."""
    cfg = train.ToyTrainConfig(ckpt_dir=str(tmp_path), unet_steps=1, unet_batch=4,
                               diptych_share=0.5, diptychs_from=0, ckpt_every=1, log_every=1,
                               unet_overrides={})
    latents = torch_randn(8, 4, 16, 16)
    diptychs = torch_randn(8, 4, 16, 32)
    train.train_unet(cfg, latents, 1.0, diptychs=diptychs)
    assert (tmp_path / "unet.pt").exists()
    with pytest.raises(ValueError, match="diptych latents"):
        train.train_unet(train.ToyTrainConfig(ckpt_dir=str(tmp_path / "b"), unet_steps=1,
                                              unet_batch=4, diptych_share=0.5, diptychs_from=0),
                         latents, 1.0)


def torch_randn(*shape):
    import torch
    return torch.randn(*shape, generator=torch.Generator().manual_seed(0))


def test_diagnose_prompts_are_new_colour_free_subject_prompts():
    prompts = properties.diagnose_prompts()
    held = set(heldout.personal_prompts())
    assert len(prompts) == len(set(prompts)) >= 60
    for p in prompts:
        attrs = world.parse_prompt(p)
        assert p not in held and attrs["colour"] is None
        assert attrs["identifier"] == world.SUBJECT_IDENTIFIER and attrs["shape"] == "star"
    # both kinds the properties need: position stated, and position left free
    assert sum(world.parse_prompt(p)["position"] is None for p in prompts) >= 5
    assert properties.diagnose_prompts(10) == prompts[:10]  # seeded: a prefix of the same draw
    assert properties.diagnose_prompts(10, seed=1) != prompts[:10]


def test_property_line_says_whether_it_holds():
    p = properties.Property("1 something", 0.25, ">= 0.5", False, {})
    assert p.line().startswith("[NO ]") and "0.250" in p.line()
    assert properties.Property("x", 1.0, "<= 1", True, {}).line().startswith("[yes]")


def test_contact_sheet_labels_read_the_image_back():
    scene = world.subject_scene(np.random.default_rng(0), position="left", background="snow",
                                size="big")
    img = world.render(scene)
    text = contact.label(img, "a big sks star on the left in the snow")
    assert text.startswith("left, snow, big") and "4/4 stated" in text  # the shape counts
    score = oracle.identity_score(img)
    assert f"id {score:.2f}" in text and score > 0.8
    wrong = contact.label(img, "a small sks star on the right at night")
    assert "1/4 stated" in wrong  # only the shape


def test_contact_sheet_draws_a_png(tmp_path):
    rng = np.random.default_rng(0)
    prompts = ["a sks star", "a sks star on the left"]
    cols = {c: np.stack([world.render(world.subject_scene(rng)) for _ in prompts])
            for c in contact.COLUMNS}
    path = contact.draw(cols, prompts, tmp_path / "sheet.png")
    from PIL import Image
    im = Image.open(path)
    assert im.size[0] > 4 * 64 and im.size[1] > 2 * 64
