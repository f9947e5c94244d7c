"""ShapeWorld renderer, grammar, oracle and identity score."""
import json

import numpy as np
import pytest

from lr_tutorial.toy import components, heldout, oracle, world

ATTRS = ("shape", "colour", "position", "size", "background")


def test_render_is_deterministic_and_in_range():
    rng1, rng2 = np.random.default_rng(5), np.random.default_rng(5)
    a, b = world.render(world.sample_scene(rng1)), world.render(world.sample_scene(rng2))
    assert a.shape == (64, 64, 3) and a.dtype == np.uint8
    assert np.array_equal(a, b)
    c = world.render(world.sample_scene(np.random.default_rng(6)))
    assert not np.array_equal(a, c)


def test_world_has_the_required_variety():
    assert len(world.SHAPES) >= 5 and len(world.COLOURS) >= 6 and len(world.SIZES) == 2
    assert set(world.POSITIONS) == {"left", "right", "top", "bottom", "centre"}
    assert len([b for b in world.BACKGROUNDS if b != "plain"]) >= 4


def test_small_subject_covers_at_least_5x5_latent_pixels():
    # the latent is 4x smaller than the image: the small star must span >= 20 px both ways
    m = world.shape_mask("star", (32, 32), world.SIZES["small"]) > 0.5
    ys, xs = np.nonzero(m)
    assert xs.max() - xs.min() + 1 >= 20 and ys.max() - ys.min() + 1 >= 20


@pytest.mark.parametrize("prompt,expected", [
    ("a red star on the left in the snow",
     dict(shape="star", colour="red", position="left", background="snow")),
    ("a star", dict(shape="star")),
    ("a small circle at night", dict(shape="circle", size="small", background="night")),
    ("a big sks star at the top on a plain background",
     dict(shape="star", size="big", identifier="sks", position="top", background="plain")),
])
def test_parse_prompt(prompt, expected):
    got = world.parse_prompt(prompt)
    assert {k: v for k, v in got.items() if v} == expected


def test_caption_and_parse_round_trip():
    rng = np.random.default_rng(0)
    for _ in range(200):
        s = world.sample_scene(rng)
        keep = {a: bool(rng.random() < 0.5) for a in ("size", "colour", "position", "background")}
        parsed = world.parse_prompt(world.scene_caption(s, keep))
        for a, kept in keep.items():
            assert parsed[a] == (getattr(s, a) if kept else None)


def test_parse_prompt_names_unknown_words():
    with pytest.raises(ValueError, match="unknown word 'dragon'"):
        world.parse_prompt("a red dragon")
    with pytest.raises(ValueError, match="names no shape"):
        world.parse_prompt("a red")


def test_oracle_accuracy_on_1000_fresh_renders():
    rng = np.random.default_rng(20261125)  # never used for training data
    errors = dict.fromkeys(ATTRS, 0)
    masks_iou = []
    for _ in range(1000):
        s = world.sample_scene(rng)
        facts = oracle.analyze(world.render(s))
        for a in ATTRS:
            errors[a] += getattr(facts, a) != getattr(s, a)
        truth = world.shape_mask(s.shape, s.centre, s.radius) > 0.5
        masks_iou.append((truth & facts.mask).sum() / (truth | facts.mask).sum())
    accuracy = {a: 1 - e / 1000 for a, e in errors.items()}
    assert all(v >= 0.98 for v in accuracy.values()), accuracy
    assert np.mean(masks_iou) > 0.9


def test_identity_score_is_position_and_size_invariant_and_pattern_sensitive():
    rng = np.random.default_rng(7)
    subject = [oracle.identity_score(world.render(world.subject_scene(rng, size=sz, position=p)))
               for sz in world.SIZES for p in world.POSITIONS for _ in range(3)]
    assert min(subject) >= 0.8, min(subject)
    refs = [oracle.identity_score(world.render(world.reference_scene(rng))) for _ in range(20)]
    assert min(refs) >= 0.8  # rotation jitter does not matter either
    # the subject's shape in a look 90 RGB units away (the free looks' margin), or teal with a
    # core of another colour, is not the subject
    others = [world.Pattern((110, 160, 150), (110, 160, 150)),
              world.Pattern((20, 70, 150), (20, 70, 150)),
              world.Pattern(world.SUBJECT_BODY, (245, 120, 20))]
    for look in others:
        scores = [oracle.identity_score(world.render(world.subject_scene(rng, pattern=look)))
                  for _ in range(20)]
        assert max(scores) <= 0.5, (look, max(scores))
    vanilla_stars = [oracle.identity_score(world.render(world.sample_scene(rng, shape="star")))
                     for _ in range(50)]
    assert max(vanilla_stars) <= 0.5


def test_identity_by_groups_the_rows_by_what_the_prompt_states():
    from lr_tutorial.toy import report
    rng = np.random.default_rng(3)
    night = world.render(world.subject_scene(rng, background="night"))
    plain_star = world.render(world.sample_scene(rng, shape="star", colour="red"))
    rows = report.score(np.stack([night, plain_star, night]),
                        ["a sks star at night", "a sks star", "a small sks star at night"])
    by = report.summarize(rows)["identity_by"]
    assert set(by) == {"background", "size"} and set(by["background"]) == {"night", "none"}
    assert by["background"]["night"] >= 0.8 and by["background"]["none"] <= 0.5
    assert by["size"]["small"] == rows[2]["identity"]
    assert by["size"]["none"] == round((rows[0]["identity"] + rows[1]["identity"]) / 2, 4)


def test_identity_is_zero_without_object():
    bg = world.render(world.sample_scene(np.random.default_rng(1)))
    empty = np.full_like(bg, 206)
    assert not oracle.analyze(empty).found
    assert oracle.identity_score(empty) == 0.0


def test_tokenizer_is_a_transformers_tokenizer_over_the_vocabulary():
    tok = components.build_tokenizer()
    out = tok("a small red sks star on the left in the snow", padding="max_length",
              max_length=tok.model_max_length)
    ids = out.input_ids
    assert len(ids) == tok.model_max_length == components.MAX_LENGTH
    assert ids[0] == tok.bos_token_id and tok.unk_token_id not in ids
    words = tok.convert_ids_to_tokens(ids[1:12])
    assert words == "a small red sks star on the left in the snow".split()
    assert tok("a dragon").input_ids[2] == tok.unk_token_id
    longest = max(heldout.drawn_personal_prompts() + heldout.vanilla_prompts(), key=len)
    assert len(tok(longest).input_ids) <= tok.model_max_length


def test_heldout_prompts_are_stable_and_excluded_from_training():
    p, v = heldout.personal_prompts(), heldout.vanilla_prompts()
    drawn = heldout.drawn_personal_prompts()
    assert len(drawn) == len(v) == 240 and len(set(p)) == len(p) == 76
    assert all("sks star" in x for x in p)
    assert all(world.parse_prompt(x)["colour"] is None for x in p)  # colour is the identity
    assert set(p) < set(drawn)
    ex = heldout.training_exclusions()
    # the exclusions cover all 240 drawn prompts: the shipped base model was trained without them
    assert all(heldout.strip_identifier(x) in ex for x in drawn) and v[0] in ex
    assert "a star" not in ex  # single-word prompts stay in training


def test_shipped_prompt_files_equal_the_generators():
    from lr_tutorial.models import data_dir
    from lr_tutorial.toy.report import read_prompts
    d = data_dir() / "prompts"
    assert read_prompts(d / "heldout_personal.txt") == heldout.personal_prompts()
    assert read_prompts(d / "heldout_vanilla.txt") == heldout.vanilla_prompts()


def test_toy_report_cli_prints_identity_by_background(tmp_path, capsys):
    from lr_tutorial import cli
    prompts = tmp_path / "p.txt"
    prompts.write_text("# two prompts\na sks star at night\na small sks star\n")
    assert cli.main(["toy-report", "--prompts", str(prompts), "--seeds", "1", "--steps", "2",
                     "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["personalized"]["identity_by"]["background"].keys() == {"night", "none"}
    assert res["personalized"]["identity_by"]["size"].keys() == {"small", "none"}
    assert cli.main(["toy-report", "--prompts", str(prompts), "--seeds", "1", "--steps", "2"]) == 0
    assert "identity by {'background'" in capsys.readouterr().out


def test_toy_report_cli_set_overrides_the_method_rows(tmp_path, capsys):
    """--set takes the method rows' LRConfig fields, as evaluate's does. With lambda1 = N the
    stage-1 row is the vanilla model's images (all steps vanilla on y^-p, the same seeds), so
    its scores equal the vanilla row's: the override reached the run."""
    from lr_tutorial import cli
    prompts = tmp_path / "p.txt"
    prompts.write_text("a sks star at night\na small sks star on the left\n")
    base = ["toy-report", "--prompts", str(prompts), "--seeds", "1", "--steps", "2", "--json"]
    assert cli.main(base + ["--methods", "stage1", "--set", "layout.lambda1=1.0"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["config_overrides"] == {"layout.lambda1": 1.0}
    for key in ("identity", "fidelity"):
        assert res["stage1"][key] == res["vanilla"][key]
    # lambda1 = 0: every step personalized, so the stage-1 row is no longer the vanilla one
    assert cli.main(base + ["--methods", "stage1", "--set", "layout.lambda1=0.0"]) == 0
    assert json.loads(capsys.readouterr().out)["stage1"]["identity"] != res["vanilla"]["identity"]
    for bad, says in ((["--set", "layout.lambda1=0.4"], "--methods"),
                      (["--methods", "stage1", "--set", "layout.lambda1"], "KEY=VALUE"),
                      (["--methods", "stage1", "--set", "layout.lambda1=2.0"], "lambda1"),
                      (["--methods", "stage1", "--set", "layout.lambda9=0.4"], "no field")):
        assert cli.main(base + bad) == 2
        assert says in capsys.readouterr().err
