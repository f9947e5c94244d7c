"""Every command-line flag and every config field fed NaN, infinity, a negative, zero, a huge
value, a wrong type and an empty value: each gives a clear error (one line naming the flag or
field, exit status 2 on the command line) or a result documented below, never a traceback and
never a silent change. The flags are read from the parser itself, the fields from the
dataclasses, so a new flag or field is covered the day it is added (and fails here until its
accepted odd values are documented).

No model loads: `cli._validated` (reached once every flag is checked, before any model loads)
is replaced by a stub that stops the command."""
from __future__ import annotations

import argparse
import dataclasses
import math

import pytest

from lr_tutorial import cli, validate

BAD = ["nan", "inf", "-1", "0", "1e308", "99999999999999999999", "abc", ""]

# A minimal valid command line per subcommand ({tmp}: the test's folder, {prompts}: a file).
BASE = {
    "generate": ["--prompt", "a sks star", "--out", "{tmp}/out"],
    "evaluate": ["--out", "{tmp}/eval"],
    "toy-report": ["--prompts", "{prompts}"],
    "personalize-toy": ["--out", "{tmp}/lora"],
    "train-toy": ["--ckpt-dir", "{tmp}/ckpt", "--out", "{tmp}/export"],
    "toy-references": ["--out", "{tmp}/refs"],
    "demo": ["--out", "{tmp}/demo"],
    "toy-diagnose": [],
}

# Flags that take a file or folder name: any non-empty name is a valid name of a new output
# (or a Hub id), so these values are accepted where the flag names something to create.
NAMES = {"abc", "nan", "inf", "-1", "0", "1e308", "99999999999999999999"}
# (command, flag) -> the odd values it accepts, and what they mean (docs/reliability.md).
ACCEPTED = {
    ("*", "--threads"): ({"0"}, "0: the automatic choice (threads.choose)"),
    ("*", "--out"): (NAMES, "a new folder of that name"),
    ("*", "--seed"): ({"0"}, "seed 0"),
    ("train-toy", "--ckpt-dir"): (NAMES, "a new checkpoint folder of that name"),
    ("evaluate", "--dino"): (NAMES, "a Hub id, looked up when the scorer loads"),
    ("evaluate", "--clip"): (NAMES, "a Hub id, looked up when the scorer loads"),
    ("evaluate", "--save-spec"): (NAMES, "the spec is written to a file of that name"),
    ("evaluate", "--prompts"): ({"0"}, "0: every prompt"),
    ("evaluate", "--seeds"): ({"0"}, "0: every seed"),
    ("evaluate", "--methods"): ({""}, "empty: every method"),
    ("evaluate", "--lambda1-sweep"): ({"0", ""}, "0: lambda1 = 0; empty: no sweep"),
    ("evaluate", "--subjects"): ({""}, "empty: every subject"),
    ("toy-report", "--limit"): ({"0"}, "0: every prompt"),
    ("toy-report", "--contact-sheet"): (set(), "a .png path"),
    ("toy-report", "--methods"): ({""}, "empty: no method rows"),
    ("toy-report", "--guidance"): ({"0"}, "0: the unconditional prediction only"),
    ("generate", "--guidance"): ({"0"}, "0: the unconditional prediction only"),
    ("evaluate", "--guidance"): ({"0"}, "0: the unconditional prediction only"),
    ("generate", "--lambda1"): ({"0"}, "0: no vanilla steps (stage 1 is the personalized model)"),
    ("generate", "--lambda2"): ({"0"}, "0: lambda2 is min_lambda2 (4) steps"),
    ("generate", "--lambda3"): ({"0"}, "0: latent blending off"),
    ("personalize-toy", "--targets"): (NAMES, "module names, checked by peft when the LoRA "
                                              "is attached (the toy loads in about 2 s)"),
    **{("personalize-toy", f): ({"0"}, "0: off") for f in (
        "--identifier-lr", "--uncond-prob", "--offset-noise", "--pyramid-noise",
        "--background-augment", "--layout-augment", "--layout-shift", "--num-class-images",
        "--augment-max-timestep")},
    ("personalize-toy", "--background-weight"): ({"0"}, "0: the background is not learned"),
    **{("train-toy", f): ({"0"}, "0: from the first step / none") for f in (
        "--vae-steps", "--unet-steps", "--pyramid-from", "--boost-from", "--token-id-from",
        "--looks-from", "--pairs-from", "--look-share", "--pair-share", "--diptychs-from",
        "--diptych-share", "--reads-from", "--read-pairs", "--repaint-share")},
}


def _accepted(command: str, flag: str) -> set[str]:
    for key in ((command, flag), ("*", flag)):
        if key in ACCEPTED:
            return ACCEPTED[key][0]
    return set()


def _value_flags(command: str):
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for action in sub.choices[command]._actions:
        if action.option_strings and action.nargs != 0 and action.dest != "help":
            yield max(action.option_strings, key=len), action


class _Reached(BaseException):
    pass


@pytest.fixture
def stopped(monkeypatch, tmp_path):
    def stop(a):
        raise _Reached
    monkeypatch.setattr(cli, "_validated", stop)
    monkeypatch.chdir(tmp_path)  # a flag naming a file would land here, never in the checkout
    (tmp_path / "p.txt").write_text("a sks star at night\n")
    return tmp_path


def _run(argv, capsys):
    try:
        rc = cli.main(argv)
    except _Reached:
        return "reached", ""
    err = capsys.readouterr().err
    return rc, err


@pytest.mark.parametrize("command", sorted(BASE))
def test_every_flag_refuses_bad_values_in_one_line_or_documents_them(command, stopped, capsys):
    base = [x.format(tmp=stopped, prompts=stopped / "p.txt") for x in BASE[command]]
    assert _run([command, *base], capsys)[0] == "reached"  # the base line itself is valid
    seen = 0
    for flag, action in _value_flags(command):
        for value in BAD:
            n = action.nargs if isinstance(action.nargs, int) else 1
            argv = [command, *base, flag, *([value] * n)]
            rc, err = _run(argv, capsys)
            seen += 1
            if rc == "reached":
                assert value in _accepted(command, flag), (
                    f"{flag} {value!r} was accepted silently; refuse it or document it in ACCEPTED")
                continue
            lines = err.strip().splitlines()
            assert rc == 2 and len(lines) == 1 and lines[0].startswith("error: "), (argv, rc, err)
            assert "Traceback" not in err
            assert flag in lines[0], (flag, lines[0])
            if value and value not in ("99999999999999999999", "1e308"):
                assert value in lines[0], (value, lines[0])
            else:  # the value as read (1e+308, a long int) or '' is named
                assert any(v in lines[0] for v in ("1e+308", "99999999999999999999",
                                                   "''", "'1e308'", "1e308")), lines[0]
    assert seen >= 8


def test_accepted_table_names_only_real_flags():
    known = {(c, f) for c in BASE for f, _ in _value_flags(c)}
    for (command, flag) in ACCEPTED:
        assert command == "*" or (command, flag) in known, (command, flag)


def test_debug_shows_the_traceback_and_errors_exit_two(stopped, capsys):
    assert cli.main(["generate", "--prompt", "a sks star", "--out", str(stopped / "o"),
                     "--steps", "x"]) == 2
    assert capsys.readouterr().err.count("\n") == 1
    with pytest.raises(ValueError, match="moon"):  # raised by the check itself with --debug
        cli.main(["generate", "--prompt", "a sks star on the moon", "--out", str(stopped / "o"),
                  "--debug"])


# ----------------------------------------------------------------------------- config fields
def _configs():
    from lr_tutorial.config import LayoutConfig, LRConfig, MaskConfig, SwapConfig
    from lr_tutorial.personalize import DreamBoothConfig
    from lr_tutorial.toy.personal import ToyPersonalConfig
    return [LRConfig, LayoutConfig, SwapConfig, MaskConfig, DreamBoothConfig, ToyPersonalConfig]


VALUES = [float("nan"), float("inf"), -float("inf"), -1, 0, 10 ** 30, 1e308, "x", "", None,
          [], True]

# (class, field) -> the odd values it accepts (by repr) and why.
FIELD_ACCEPTED = {
    ("LRConfig", "reference_index"): ({"0", str(10 ** 30)},
                                      "an index, checked against the images at the call"),
    ("LRConfig", "start_step"): ({"None", "0"}, "None: at lambda2; 0: from z_0"),
    ("LRConfig", "kv_budget_gb"): ({"None", "0", str(10 ** 30), "1e+308"},
                                   "None: half the memory; 0: never cache; huge: always cache"),
    ("LRConfig", "kv_dtype"): ({"None"}, "None: the model's dtype"),
    ("LayoutConfig", "lambda1"): ({"None", "0"}, "None: the backend's hand-over; 0: no vanilla steps"),
    ("LayoutConfig", "guidance"): ({"None", "0"}, "None: the backend's; 0: unconditional"),
    ("SwapConfig", "lambda2"): ({"0"}, "0: min_lambda2 steps"),
    ("SwapConfig", "min_lambda2"): ({"0"}, "0: no minimum"),
    ("MaskConfig", "lambda3"): ({"0"}, "0: blending off"),
    ("MaskConfig", "tau_lo"): ({"0"}, "0: every pixel is support"),
    ("MaskConfig", "feather"): ({"0"}, "0: a hard edge"),
    ("MaskConfig", "n_negative"): ({"0"}, "0: no background points"),
    ("MaskConfig", "adaptive_reach"): ({"None", "0"}, "None: unbounded; 0: the context object"),
    ("MaskConfig", "adaptive"): ({"True"}, "a flag: the per-step target mask on"),
    ("LRConfig", "reference_prompt"): ({"None", "'x'"}, "any prompt; its class noun is looked "
                                                       "up before the inversion starts"),
    ("SwapConfig", "structure_layers"): ({"'x'"}, "a pattern, matched against the UNet before "
                                                  "denoising (an error lists example paths)"),
    ("SwapConfig", "retouch_layers"): ({"'x'"}, "a pattern, as structure_layers"),
    ("DreamBoothConfig", "instance_prompt"): ({"'x'"}, "any caption"),
    ("DreamBoothConfig", "class_prompt"): ({"'x'", "None"}, "any caption; None: no prior "
                                                            "preservation"),
    ("DreamBoothConfig", "init_lora"): ({"'x'", "None"}, "a folder, read before the first "
                                                         "training step"),
    ("DreamBoothConfig", "adapter_name"): ({"'x'"}, "any adapter name"),
}


def _field_cases():
    for cls in _configs():
        for f in dataclasses.fields(cls):
            yield pytest.param(cls, f.name, id=f"{cls.__name__}.{f.name}")


@pytest.mark.parametrize("cls, name", list(_field_cases()))
def test_every_config_field_refuses_bad_values_naming_it_or_documents_them(cls, name):
    check = validate.check_config
    if cls.__name__ == "DreamBoothConfig":
        from lr_tutorial.personalize import check_config as own

        def check(cfg):
            validate.check_fields(cfg)
            own(cfg)
    for value in VALUES:
        cfg = cls()
        setattr(cfg, name, value)
        try:
            check(cfg)
        except (TypeError, ValueError) as e:
            msg = str(e)
            assert name in msg, (name, value, msg)
            assert "\n" not in msg.strip() or len(msg) < 2000
            continue
        accepted, _why = FIELD_ACCEPTED.get((cls.__name__, name), (set(), ""))
        documented_default = not isinstance(value, float) or math.isfinite(value)
        assert repr(value) in accepted or _dreambooth_ok(cls, name, value), (
            f"{cls.__name__}.{name} = {value!r} accepted silently; refuse it or document it")
        assert documented_default


def _dreambooth_ok(cls, name, value) -> bool:
    """DreamBoothConfig's and ToyPersonalConfig's fields: 0 switches an augmentation or a
    learning rate off, None is the default where the annotation allows it."""
    if cls.__name__ not in ("DreamBoothConfig", "ToyPersonalConfig"):
        return False
    return (value == 0 and not isinstance(value, bool)) or value is None


def test_toy_diagnose_says_when_prompts_and_seeds_do_not_apply(stopped, capsys):
    assert _run(["toy-diagnose", "--only", "1", "--seeds", "4"], capsys)[0] == "reached"
    assert "property 1" in capsys.readouterr().err
    assert _run(["toy-diagnose", "--only", "1,3", "--seeds", "4"], capsys)[0] == "reached"
    assert capsys.readouterr().err == ""
