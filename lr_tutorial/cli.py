"""Command line: `python -m lr_tutorial <command> ...` (`--help` on any command).

Every flag is checked before any model loads. A bad value gets one line on stderr that names
the flag, the value and the fix, and exit status 2; an error found later (a model that does
not fit its LoRA, say) is also one line, exit status 2. `--debug` shows the traceback instead.
Output folders are written whole or not at all, and `--overwrite` replaces only what the
command wrote itself (lr_tutorial/files.py). `--threads N` sets torch's CPU threads; the
default picks them from the cores the machine has free (lr_tutorial/threads.py).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import warnings
from pathlib import Path

from .validate import SEED_MAX


class UsageError(ValueError):
    """A flag's value or a combination of flags that the command refuses."""


# ----------------------------------------------------------------------------- flag types
def _int(lo: int | None = None, hi: int | None = None, example: int | str = 1):
    """An argparse type: a whole number in [lo, hi]."""
    def parse(s: str) -> int:
        t = str(s).strip()
        try:
            v = int(t)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"{s!r} is not a whole number; give e.g. {example}") from None
        if (lo is not None and v < lo) or (hi is not None and v > hi):
            rng = (f"from {lo} to {hi}" if hi is not None else f"{lo} or more")
            raise argparse.ArgumentTypeError(f"{s} is out of range; give a whole number {rng}, "
                                             f"e.g. {example}")
        return v
    parse.__name__ = "int"
    return parse


def _float(lo: float | None = None, hi: float | None = None, example: float | str = 1.0,
           lo_open: bool = False):
    """An argparse type: a finite number in [lo, hi] ((lo, hi] with lo_open)."""
    def parse(s: str) -> float:
        try:
            v = float(str(s).strip())
        except ValueError:
            raise argparse.ArgumentTypeError(f"{s!r} is not a number; give e.g. {example}") from None
        if not math.isfinite(v):
            raise argparse.ArgumentTypeError(f"{s!r} is not a finite number; give e.g. {example}")
        if (lo is not None and (v < lo or (lo_open and v == lo))) or (hi is not None and v > hi):
            left = "(" if lo_open else "["
            rng = f"{left}{lo if lo is not None else '-inf'}, {hi if hi is not None else 'inf'}]"
            raise argparse.ArgumentTypeError(f"{s} is outside {rng}; give e.g. {example}")
        return v
    parse.__name__ = "float"
    return parse


def _boundary(s: str) -> float | int:
    """A step boundary: '0.2' -> the fraction 0.2 of the steps, '10' -> 10 steps."""
    t = str(s).strip()
    try:
        if not any(c in t for c in ".eE") or t.lower() in ("inf", "-inf", "nan"):
            v: float | int = int(t)
        else:
            v = float(t)
    except ValueError:
        try:
            v = float(t)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"{s!r} is not a number; give a fraction of the steps (0.2) or a step count "
                "(10)") from None
    if isinstance(v, float):
        if not math.isfinite(v):
            raise argparse.ArgumentTypeError(f"{s!r} is not a finite number; give a fraction "
                                             "of the steps (0.2) or a step count (10)")
        if not 0 <= v <= 1:
            raise argparse.ArgumentTypeError(f"{s} as a fraction of the steps must be in "
                                             "[0, 1]; give a whole number for a step count")
    elif v < 0:
        raise argparse.ArgumentTypeError(f"{v} steps is negative; give a step count >= 0 or a "
                                         "fraction such as 0.2")
    return v


_boundary.__name__ = "step boundary"


def _text(example: str):
    def parse(s: str) -> str:
        if not str(s).strip() or "\x00" in s:
            raise argparse.ArgumentTypeError(f"{s!r} is empty; give e.g. {example!r}")
        return s
    parse.__name__ = "text"
    return parse


def _path(s: str) -> str:
    if not str(s).strip() or "\x00" in s:
        raise argparse.ArgumentTypeError(f"{s!r} is not a path; give a file or folder name")
    return s


_path.__name__ = "path"
_seed = _int(0, SEED_MAX, example=0)
_steps = _int(1, 1000, example=50)
_guidance = _float(0, 100, example="7.5 (Stable Diffusion) or 3 (toy)")
_count = _int(0, 10 ** 9, example=4)
_share = _float(0, 1, example=0.5)
_timestep = _int(0, 1000, example=600)
_threads = _int(0, 1024, example="0 (automatic) or 1")


class _Parser(argparse.ArgumentParser):
    """argparse with a one-line error (no usage block)."""

    def error(self, message):  # noqa: D102
        self.exit(2, f"error: {self.prog}: {message} (see `{self.prog} --help`)\n")


def _common() -> argparse.ArgumentParser:
    c = argparse.ArgumentParser(add_help=False)
    c.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                   help="show the full traceback of an error")
    c.add_argument("--threads", type=_threads, default=argparse.SUPPRESS,
                   help="torch CPU threads (default 0: chosen from the cores free now)")
    return c


def _exists(flag: str, value, kind: str = "any") -> Path:
    p = Path(os.path.expanduser(str(value)))
    if not p.exists():
        raise UsageError(f"{flag} {value}: no such {'folder' if kind == 'dir' else 'file or folder'}; "
                         "check the path")
    if kind == "dir" and not p.is_dir():
        raise UsageError(f"{flag} {value} is a file; give a folder")
    if kind == "file" and not p.is_file():
        raise UsageError(f"{flag} {value} is a folder; give a file")
    return p


def _only_with(a, flags: dict[str, str], condition: bool, why: str) -> None:
    """Refuse flags (dest -> flag) that were given but do nothing unless `condition`."""
    if condition:
        return
    for dest, flag in flags.items():
        if getattr(a, dest, None) not in (None, False, "", []):
            raise UsageError(f"{flag} {getattr(a, dest)!r} does nothing here: {why}; drop it")


def _with_flags(e: Exception, a, dests) -> UsageError:
    """A library error about config fields, as a UsageError that starts with the flags (and
    their values) whose fields it names."""
    named = [d for d in dests if d in str(e) and getattr(a, d, None) is not None]
    flags = ", ".join(f"--{d.replace('_', '-')} {getattr(a, d)}" for d in named)
    return UsageError(f"{flags or 'the flags'}: {e}")


def _validated(a) -> None:
    """Reached once every flag is checked, before any model loads or any work starts."""


def _lr_config(a, steps: int):
    """The LRConfig of generate's flags; a knob's error names its flag and value."""
    from .config import LayoutConfig, LRConfig, MaskConfig, SwapConfig
    from .validate import check_config
    try:
        cfg = LRConfig(layout=LayoutConfig(lambda1=a.lambda1, steps=steps, guidance=a.guidance),
                       swap=SwapConfig(lambda2=a.lambda2), mask=MaskConfig(lambda3=a.lambda3))
        check_config(cfg)
    except (TypeError, ValueError) as e:
        knobs = [k for k in ("lambda1", "lambda2", "lambda3", "steps", "guidance")
                 if k in str(e)]
        flags = ", ".join(f"--{k} {getattr(a, k)}" for k in knobs) or "the flags"
        raise UsageError(f"{flags}: {e}") from e
    return cfg


def _say_noops(cfg, flag_of_steps: str = "--steps") -> None:
    """Print each no-op note (validate.noop_notes) once, before the work; the pipeline's own
    warning for it is then silenced."""
    from .validate import NoOpWarning, noop_notes
    for note in noop_notes(cfg):
        print(f"warning: {flag_of_steps} {cfg.layout.steps}: {note}", file=sys.stderr)
    warnings.filterwarnings("ignore", category=NoOpWarning)


# ----------------------------------------------------------------------------- commands
def _default_ckpt() -> str:
    return str(Path.home() / ".cache" / "lr_tutorial" / "train-toy")


def cmd_train_toy(a) -> int:
    from . import files
    from .models import data_dir
    from .toy import train
    from .validate import check_fields

    ckpt = Path(os.path.expanduser(a.ckpt_dir))
    if ckpt.exists() and not ckpt.is_dir():
        raise UsageError(f"--ckpt-dir {a.ckpt_dir} is a file; give a folder for the checkpoints")
    files._check_writable(ckpt / "x", "--ckpt-dir")
    cfg = train.ToyTrainConfig(ckpt_dir=str(ckpt), seed=a.seed)
    for k in ("vae_steps", "unet_steps", "dataset_size", "pyramid_from", "boost_from",
              "token_id_from", "looks_from", "look_share", "pairs_from", "pair_share",
              "diptychs_from", "diptych_share", "unet_batch", "read_pairs", "reads_from",
              "repaint_share"):
        if getattr(a, k) is not None:
            setattr(cfg, k, getattr(a, k))
    check_fields(cfg)
    try:
        train.check_shares(cfg)
    except ValueError as e:
        raise UsageError(f"--look-share/--pair-share/--diptych-share: {e}") from None
    out = Path(a.out) if a.out else data_dir() / "toy"
    if a.stage in ("all", "export"):
        if out.exists() and not out.is_dir():
            raise UsageError(f"--out {a.out} is a file; give a folder to export into")
        if (out / "unet").exists() and not a.overwrite:
            raise UsageError(f"--out {out} already holds toy weights; pass --overwrite to replace "
                             "them (other files there stay) or choose another --out")
        files._check_writable(out / "x", "--out")
    _only_with(a, {"overwrite": "--overwrite", "out": "--out"}, a.stage in ("all", "export"),
               "only --stage all or export writes the models")
    if a.from_export:
        _exists("--from-export", a.from_export, "dir")
        if (ckpt / "unet.pt").exists():
            raise UsageError(f"--ckpt-dir {ckpt} already holds checkpoints; resume from them "
                             "(drop --from-export) or give an empty --ckpt-dir")
    _validated(a)
    ckpt.mkdir(parents=True, exist_ok=True)
    if a.from_export:
        train.seed_from_export(cfg, a.from_export)
    print(f"checkpoints and log.jsonl in {cfg.ckpt_dir} (rerun the same command to resume)")
    if a.stage in ("all", "vae", "unet"):
        vae = train.train_vae(cfg)
        if a.stage != "vae":
            train.train_unet(cfg, *train.unet_data(cfg, vae))
    if a.stage in ("all", "export"):
        train.export(cfg, out, overwrite=a.overwrite)
        print(f"wrote the toy models to {out}")
    return 0


def cmd_references(a) -> int:
    from . import files
    from .toy import subject
    if a.out is not None:
        p = Path(a.out)
        if p.exists() and not p.is_dir():
            raise UsageError(f"--out {a.out} is a file; give a folder")
        files._check_writable(p / "x", "--out")
    _validated(a)
    paths = subject.write_references(a.out, overwrite=a.overwrite)
    print("\n".join(str(p) for p in paths))
    return 0


def cmd_personalize_toy(a) -> int:
    import numpy as np

    from . import files
    from .models import data_dir, load_models
    from .personalize import toy_recipe
    from .prompts import check_vocabulary
    from .toy import subject
    from .toy.personal import ToyPersonalConfig, check_config, train_lora

    given = {k: getattr(a, k) for k in ("steps", "seed", "rank", "alpha", "lr", "lr_schedule",
                                         "identifier_lr", "uncond_prob", "offset_noise",
                                         "pyramid_noise", "background_weight", "num_class_images",
                                         "init_lora")}
    toy_given = {k: getattr(a, k) for k in ("background_augment", "layout_augment",
                                             "layout_shift", "augment_max_timestep")}
    if a.layout_scale:
        lo, hi = a.layout_scale
        if lo > hi:
            raise UsageError(f"--layout-scale {lo:g} {hi:g}: LOW is above HIGH; give e.g. 0.5 1.2")
        toy_given["layout_scale"] = tuple(a.layout_scale)
    if a.class_prompt:
        for p in a.class_prompt:
            try:
                check_vocabulary(_toy_tokenizer(), p)
            except ValueError as e:
                raise UsageError(f"--class-prompt: {e}") from e
        given["class_prompt"] = a.class_prompt[0] if len(a.class_prompt) == 1 else tuple(a.class_prompt)
    if a.targets is not None:
        names = tuple(t.strip() for t in a.targets.split(","))
        if not all(names):
            raise UsageError(f"--targets {a.targets!r}: give comma-separated module names, e.g. "
                             "to_q,to_k,to_v,to_out.0")
        given["target_modules"] = names
    if a.init_lora:
        _exists("--init-lora", a.init_lora, "dir")
    if a.alpha is None and a.rank is not None:
        given["alpha"] = float(a.rank)
    try:
        cfg = toy_recipe(**{k: v for k, v in given.items() if v is not None})
        toy = ToyPersonalConfig(**{k: v for k, v in toy_given.items() if v is not None})
        check_config(toy, cfg)
    except (TypeError, ValueError) as e:
        raise _with_flags(e, a, {**given, **toy_given}) from e
    out = Path(a.out) if a.out else data_dir() / "toy" / "lora"
    files.check_output(out, a.overwrite, "LoRA", "--out")
    _validated(a)
    bundle = load_models("toy", personalized=None)
    refs = subject.reference_images()
    masks = None
    if cfg.background_weight < 1 or toy.background_augment:  # the toy's masks: from the oracle
        from .toy import oracle
        masks = np.stack([oracle.analyze(r).mask for r in refs])
    train_lora(bundle, refs, cfg, toy, masks=masks, out_dir=out, overwrite=a.overwrite)
    print(f"wrote the LoRA to {out}")
    return 0


def _methods(value: str, allowed) -> tuple[str, ...]:
    methods = tuple(m.strip() for m in value.split(",") if m.strip())
    bad = [m for m in methods if m not in allowed]
    if bad:
        raise UsageError(f"--methods {value!r}: unknown {', '.join(map(repr, bad))}; choose from "
                         f"{', '.join(allowed)}")
    return methods


def cmd_toy_report(a) -> int:
    from .prompts import check_vocabulary, read_prompt_file
    from .toy import world

    methods = _methods(a.methods, ("stage1", "layout_and_retouch"))
    overrides = _overrides(a.set)
    config = None
    if overrides:
        from .config import LRConfig
        from .methods import apply_overrides
        from .validate import check_config
        if not methods:
            raise UsageError("--set changes the method rows only; add --methods "
                             "stage1,layout_and_retouch")
        config = apply_overrides(LRConfig(), overrides)
        check_config(config)
    if a.personalized and a.ckpt_dir:
        raise UsageError("--personalized and --ckpt-dir exclude each other (a checkpoint is "
                         "measured without a LoRA); give one")
    if a.personalized:
        _lora_folder("--personalized", a.personalized)
    if a.ckpt_dir:
        _exists("--ckpt-dir", a.ckpt_dir, "dir")
    try:
        prompts = read_prompt_file(a.prompts)
        tok = _toy_tokenizer()
        for p in prompts:
            check_vocabulary(tok, p)  # names each unknown word and the vocabulary
            world.parse_prompt(p)  # a caption the oracle can score
    except (OSError, ValueError) as e:
        raise UsageError(f"--prompts {a.prompts}: {e}") from e
    if a.limit:
        prompts = prompts[:a.limit]
    sheet = None
    if a.overwrite and not a.contact_sheet:
        raise UsageError("--overwrite replaces an existing --contact-sheet; without one it does "
                         "nothing: drop it")
    if a.contact_sheet:
        from . import files
        if Path(a.contact_sheet).suffix.lower() != ".png":
            raise UsageError(f"--contact-sheet {a.contact_sheet}: give a .png path")
        if Path(a.contact_sheet).exists() and not a.overwrite:
            raise UsageError(f"--contact-sheet {a.contact_sheet} exists; choose another path or "
                             "pass --overwrite to replace it")
        if a.ckpt_dir:
            raise UsageError("--contact-sheet needs a personalized model; drop --ckpt-dir")
        if Path(a.contact_sheet).is_dir():
            raise UsageError(f"--contact-sheet {a.contact_sheet} is a folder; give a .png path")
        files._check_writable(Path(a.contact_sheet), "--contact-sheet")
        sheet = a.contact_sheet
    _validated(a)
    from .models import load_models
    from .toy import report
    if a.ckpt_dir:  # watch a training run: the newest checkpoint's EMA weights, vanilla rows only
        from .toy import train
        bundle, step = train.checkpoint_bundle(train.ToyTrainConfig(ckpt_dir=a.ckpt_dir))
        print(f"training checkpoint {a.ckpt_dir}, UNet step {step}", file=sys.stderr)
    else:
        bundle = load_models("toy", **({"personalized": a.personalized} if a.personalized else {}))
    res = report.toy_report(bundle, prompts, list(range(a.seeds)), steps=a.steps,
                            guidance=a.guidance, progress=not a.json, methods=methods,
                            config=config)
    res["prompt_file"] = str(a.prompts)
    if overrides:
        res["config_overrides"] = overrides
    if sheet:
        from .files import atomic_file
        from .toy import contact
        with atomic_file(sheet, overwrite=True, what="contact sheet") as tmp:
            contact.contact_sheet(bundle, tmp, steps=a.steps, config=config)
        res["contact_sheet"] = str(sheet)
    print(json.dumps(res, indent=1) if a.json else _pretty(res))
    return 0


def _properties(s: str) -> str:
    """toy-diagnose --only: property numbers 1-4, comma-separated."""
    parts = [x.strip() for x in str(s).split(",")]
    if not parts or not all(x in ("1", "2", "3", "4") for x in parts):
        raise argparse.ArgumentTypeError(f"{s!r}: give property numbers from 1 to 4, e.g. 1,3")
    return ",".join(parts)


_properties.__name__ = "property list"


def cmd_toy_diagnose(a) -> int:
    from .toy import properties

    if a.personalized:
        if not {"2", "4"} & set(a.only.split(",")):
            raise UsageError(f"--personalized is used by properties 2 and 4 only; --only {a.only} "
                             "measures the base model: drop it or add 2 or 4")
        _lora_folder("--personalized", a.personalized)
    if set(a.only.split(",")) == {"1"} and (a.prompts is not None or a.seeds != 2):
        print("note: property 1 switches a position word on its own 8 seeds; --prompts and "
              "--seeds apply to properties 2-4", file=sys.stderr)
    _validated(a)
    return properties.run(a)


def _pretty(res: dict) -> str:
    lines = [f"{res['prompts']} prompts x {len(res['seeds'])} seeds, {res['steps']} steps, "
             f"guidance {res['guidance']}"
             + (f", method rows with {res['config_overrides']}" if res.get("config_overrides") else "")]
    for k in ("vanilla", "vanilla_same_prompts", "personalized", "stage1", "layout_and_retouch"):
        if k in res:
            r = res[k]
            lines.append(f"{k:>22}: fidelity {r['fidelity']} identity {r['identity']} "
                         f"positions {r['position_hist']}")
            if k != "vanilla" and "identity_by" in r:
                lines.append(f"{'':>22}  identity by {r['identity_by']}")
    return "\n".join(lines)


def _lora_folder(flag: str, value) -> Path:
    from .sd import LORA_FILES
    p = _exists(flag, value, "dir")
    if not any((p / f).is_file() for f in LORA_FILES):
        held = sorted(x.name for x in p.iterdir())[:5]
        raise UsageError(f"{flag} {value} is not a LoRA folder (no {LORA_FILES[0]}; it holds "
                         f"{', '.join(held) or 'nothing'}); give a folder written by "
                         "`python -m lr_tutorial personalize-toy --out DIR`")
    return p


def _toy_tokenizer():
    """The toy text encoder's tokenizer alone (no model), case-insensitive as the loader makes it."""
    from transformers import PreTrainedTokenizerFast

    from .models import data_dir
    from .prompts import lowercase_tokenizer
    folder = data_dir() / "toy" / "tokenizer"
    if not folder.is_dir():
        raise FileNotFoundError(f"no toy tokenizer in {folder}; train and export the toy models "
                                "with `python -m lr_tutorial train-toy`")
    return lowercase_tokenizer(PreTrainedTokenizerFast.from_pretrained(folder))


def cmd_generate(a) -> int:
    from . import files, images
    from .prompts import check_personal_prompt, check_vocabulary

    out = files.check_output(a.out, a.overwrite, "generate output", "--out")
    toy = a.backend == "toy"
    _only_with(a, {"base": "--base", "class_noun": "--class-noun"}, not toy,
               "the toy backend's base model is data/toy and its class noun 'star'; add "
               "--backend sd for Stable Diffusion")
    if a.stage2 != "auto" and a.engine != "fast":
        raise UsageError(f"--stage2 {a.stage2} chooses the fast engine's stage 2; add --engine "
                         "fast (the reference engine runs the three branches together)")
    if toy:
        from .toy import world
        if a.personalized:
            _lora_folder("--personalized", a.personalized)
        try:
            with warnings.catch_warnings(record=True) as said:
                warnings.simplefilter("always")
                check_vocabulary(_toy_tokenizer(), a.prompt, a.allow_unknown_words)
            for w in said:
                print(f"warning: --prompt: {w.message}", file=sys.stderr)
        except ValueError as e:
            raise UsageError(f"--prompt: {e}") from e
        try:
            check_personal_prompt(a.prompt, world.SUBJECT_IDENTIFIER, world.SUBJECT_CLASS)
        except ValueError as e:
            raise UsageError(f"--prompt: {e}") from e
    else:
        from .sd import DEFAULT_MIRROR, detect_personalization, looks_local
        if not a.class_noun:
            raise UsageError("--backend sd needs --class-noun (the subject's class noun, e.g. "
                             "--class-noun dog): the method finds the subject by it")
        if a.personalized is not None:
            try:
                kind = detect_personalization(a.personalized)
            except (OSError, ValueError) as e:
                raise UsageError(f"--personalized: {e}") from e
            if kind != "textual_inversion":  # else the identifier is the embedding's own token
                try:
                    check_personal_prompt(a.prompt, "sks", a.class_noun)
                except ValueError as e:
                    raise UsageError(f"--prompt: {e}") from e
        base = a.base or DEFAULT_MIRROR
        if looks_local(base) and not Path(os.path.expanduser(base)).is_dir():
            raise UsageError(f"--base {base}: no such folder; check the path (a Hub id looks "
                             f"like {DEFAULT_MIRROR})")
        words = a.prompt.lower().split()
        if a.class_noun.lower() not in words:
            raise UsageError(f"--prompt {a.prompt!r} does not contain the class noun "
                             f"{a.class_noun!r}; write e.g. 'a sks {a.class_noun} on the beach'")
    try:
        refs = images.check_files(a.reference) if a.reference is not None else None
    except (OSError, ValueError) as e:
        raise UsageError(f"--reference: {e}") from e
    cfg = _lr_config(a, a.steps)
    _say_noops(cfg)
    if not toy and a.personalized is None:
        print("warning: no --personalized model: the personalized steps run the vanilla "
              "model, so nothing of your subject is learned", file=sys.stderr)
    _validated(a)

    import matplotlib
    matplotlib.use("Agg")
    from PIL import Image

    from .models import load_models
    from .pipeline import LayoutAndRetouch
    from .viz import result_panel
    if toy:
        bundle = load_models("toy", personalized=a.personalized or "default")
    else:
        extra = {k: v for k, v in dict(base=a.base, personalized=a.personalized,
                                       class_noun=a.class_noun).items() if v is not None}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # the vanilla-only notice, said above
            bundle = load_models("sd", **extra)
        bundle._warned_vanilla_only = True
    bundle.allow_unknown_words = a.allow_unknown_words
    if a.fuse_lora if a.fuse_lora is not None else a.engine == "fast":
        if a.fuse_lora and not bundle.has_personal:
            print("note: --fuse-lora has no LoRA to merge (no personalized model is loaded)",
                  file=sys.stderr)
        bundle.set_fuse_lora(True)
    ref_images = images.load_images(refs, bundle.image_size) if refs is not None else None
    cfg.engine = a.engine
    cfg.stage2 = one_call_stage2(a.stage2, bundle.device) if a.engine == "fast" else "auto"
    seeds = list(a.seed)
    result = LayoutAndRetouch(bundle, cfg)([a.prompt] * len(seeds), ref_images, seed=seeds)
    with files.atomic_folder(out, a.overwrite, what="generate output") as tmp:
        result.save(tmp, overwrite=True)  # final_00.png, layout_00.png, ... per image
        if len(seeds) == 1:
            Image.fromarray(result.images[0]).save(tmp / "final.png")
            result_panel(result, bundle).savefig(tmp / "panel.png", dpi=130)
        else:
            for i in range(len(seeds)):
                result_panel(result, bundle, index=i).savefig(tmp / f"panel_{i:02d}.png", dpi=130)
    if len(seeds) == 1:
        print(f"wrote {out / 'final.png'} and {out / 'panel.png'} (intermediates in {out})")
    else:
        print(f"wrote {len(seeds)} images (seeds {seeds}): {out}/final_NN.png and panel_NN.png, "
              f"NN = 00..{len(seeds) - 1:02d} (intermediates in {out})")
    return 0


def one_call_stage2(choice: str, device) -> str:
    """LRConfig.stage2 for a process that makes one call (`generate`). On a GPU the cached
    stage 2 keeps its keys/values in pinned host memory, which the first call in a process
    must pin (about 0.47 s per GB on an H200 machine; 2.2 GB per image and 1.1 GB per
    reference at 512 px), more than the 0.17 s per image the cached path saves over the
    batched one with a new reference. Only later calls, reusing that memory, gain."""
    return "batched" if choice == "auto" and str(device).startswith("cuda") else choice


def _overrides(pairs) -> dict:
    """--set KEY=VALUE pairs -> {dotted LRConfig field: value}. Numbers, lists and true/false
    are read as JSON (NaN and infinities refused); anything else is a string (e.g. none)."""
    out = {}
    for kv in pairs or ():
        key, sep, value = kv.partition("=")
        if not sep or not key.strip():
            raise UsageError(f"--set {kv!r} is not KEY=VALUE, e.g. --set mask.tau_lo=0.4")
        try:
            out[key.strip()] = json.loads(value, parse_constant=_no_constant)
        except json.JSONDecodeError:
            out[key.strip()] = value
        except ValueError as e:
            raise UsageError(f"--set {kv!r}: {e}") from None
    return out


def _no_constant(name: str):
    raise ValueError(f"{name} is not a finite number; give a finite value")


def cmd_demo(a) -> int:
    from . import demo, files
    out = files.check_output(a.out, a.overwrite, "demo", "--out")
    _validated(a)
    print(demo.summary(demo.run(out, overwrite=a.overwrite)))
    return 0


def cmd_evaluate(a) -> int:
    from . import benchmarks, evaluate, metrics
    from .methods import METHODS

    extra = {}
    if a.steps is not None:
        extra["steps"] = a.steps
    if a.guidance is not None:
        extra["guidance"] = a.guidance
    vico = a.benchmark == "vico"
    _only_with(a, {"vico": "--vico", "personalized_dir": "--personalized-dir"}, vico,
               "it applies to --benchmark vico only")
    _only_with(a, {"base": "--base", "sam": "--sam"}, a.benchmark != "shapeworld",
               "the shapeworld benchmark runs on the toy backend")
    if a.vico:
        _exists("--vico", a.vico, "dir")
    if a.personalized_dir:
        _exists("--personalized-dir", a.personalized_dir, "dir")
    if a.sam:
        _exists("--sam", a.sam, "file")
    methods = _methods(a.methods, tuple(METHODS)) if a.methods.strip() else ()
    sweep = []
    for x in (s.strip() for s in a.lambda1_sweep.split(",")):
        if x:
            try:
                sweep.append(_float(0, 1, example=0.2)(x))
            except argparse.ArgumentTypeError as e:
                raise UsageError(f"--lambda1-sweep {a.lambda1_sweep!r}: {e}") from None
    overrides = _overrides(a.set)
    if a.benchmark == "shapeworld":
        spec = benchmarks.shapeworld(**extra)
    elif vico:
        spec = benchmarks.vico(a.vico, personalized_dir=a.personalized_dir, base=a.base,
                               sam=a.sam, **extra)
    else:
        try:
            spec = benchmarks.Benchmark.load(a.benchmark)
        except (OSError, ValueError, TypeError) as e:
            raise UsageError(f"--benchmark {a.benchmark}: {e}") from e
        for k, v in extra.items():
            setattr(spec, k, v)
    if methods:
        spec.methods = list(methods)
    if sweep:
        spec.lambda1_sweep = sweep
    spec.config.update(overrides)
    spec = benchmarks.Benchmark(**spec.to_dict())  # validate the edited spec
    subjects = [s.strip() for s in a.subjects.split(",") if s.strip()] if a.subjects else None
    try:
        spec = spec.limit(prompts=a.prompts or None, seeds=a.seeds or None, subjects=subjects)
    except ValueError as e:
        raise UsageError(f"--subjects {a.subjects!r}: {e}") from e
    if a.save_spec:
        from . import files
        _validated(a)
        with files.atomic_file(a.save_spec, overwrite=a.overwrite, what="benchmark spec") as tmp:
            spec.save(tmp)
        print(f"wrote {a.save_spec}")
        return 0
    metrics.Protocol(a.protocol)
    evaluate.check_folder(Path(a.out), spec, a.protocol, a.overwrite)
    _validated(a)
    out = evaluate.run(spec, a.out, overwrite=a.overwrite, batch=a.batch,
                       progress=not a.quiet, protocol=a.protocol, dino=a.dino, clip=a.clip)
    if (out / "results.md").is_file():
        print((out / "results.md").read_text())
        print(f"tables and plots in {out}")
    return 0


# ----------------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m lr_tutorial", description=__doc__,
                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)
    common = [_common()]

    t = sub.add_parser("train-toy", parents=common,
                       help="train the ShapeWorld VAE, text encoder and UNet")
    t.add_argument("--ckpt-dir", type=_path, default=_default_ckpt())
    t.add_argument("--stage", choices=("all", "vae", "unet", "export"), default="all")
    t.add_argument("--out", type=_path, default=None, help="where to export (default data/toy)")
    t.add_argument("--seed", type=_seed, default=0)
    t.add_argument("--vae-steps", type=_count)
    t.add_argument("--unet-steps", type=_count)
    t.add_argument("--dataset-size", type=_int(1, 10 ** 8, example=50000))
    t.add_argument("--pyramid-from", type=_count, help="UNet step that turns pyramid noise on")
    t.add_argument("--boost-from", type=_count, help="UNet step that turns the high-noise boost on")
    t.add_argument("--token-id-from", type=_count,
                   help="UNet step that turns the text encoder's token-identity loss on")
    t.add_argument("--looks-from", type=_count,
                   help="UNet step from which free-look scenes (random colours/patterns) join")
    t.add_argument("--look-share", type=_share, help="share of each batch with free looks")
    t.add_argument("--pairs-from", type=_count,
                   help="UNet step from which look pairs (two copies of a free-look object) join")
    t.add_argument("--pair-share", type=_share, help="share of each batch with look pairs")
    t.add_argument("--diptychs-from", type=_count,
                   help="UNet step from which diptychs (two scenes, one shape in one uncaptioned "
                        "look) join")
    t.add_argument("--diptych-share", type=_share, help="share of each batch with diptychs")
    t.add_argument("--reads-from", type=_count,
                   help="UNet step from which reference reads (a scene whose retouch-layer "
                        "self-attention reads a close-up's keys and values) join")
    t.add_argument("--read-pairs", type=_int(0, 4096, example=16),
                   help="reference-read pairs added to each batch (0: none)")
    t.add_argument("--repaint-share", type=_share,
                   help="share of the read pairs noised from the scene in another look")
    t.add_argument("--unet-batch", type=_int(1, 4096, example=64), default=None,
                   help="UNet batch size (default 64)")
    t.add_argument("--overwrite", action="store_true")
    t.add_argument("--from-export", type=_path, default=None,
                   help="seed empty checkpoints from exported weights (e.g. data/toy) to go on "
                        "training on a machine that lost --ckpt-dir")
    t.set_defaults(func=cmd_train_toy)

    r = sub.add_parser("toy-references", parents=common,
                       help="write the subject's reference photos (PNG)")
    r.add_argument("--out", type=_path, default=None, help="default data/toy/reference")
    r.add_argument("--overwrite", action="store_true")
    r.set_defaults(func=cmd_references)

    q = sub.add_parser("personalize-toy", parents=common,
                       help="DreamBooth-LoRA on the subject's references")
    q.add_argument("--out", type=_path, default=None, help="default data/toy/lora")
    # unset flags keep personalize.toy_recipe()'s values (the shipped LoRA's recipe)
    q.add_argument("--steps", type=_int(1, 10 ** 7, example=4000), default=None)
    q.add_argument("--rank", type=_int(1, 1024, example=8), default=None)
    q.add_argument("--alpha", type=_float(0, 1e4, example=8, lo_open=True), default=None,
                   help="LoRA alpha (default: the rank)")
    q.add_argument("--lr", type=_float(0, 1, example=3e-3, lo_open=True), default=None)
    q.add_argument("--lr-schedule", choices=("constant", "cosine"), default=None)
    q.add_argument("--identifier-lr", type=_float(0, 1, example=5e-3), default=None,
                   help="> 0: also learn the identifier's input embedding at this lr")
    q.add_argument("--uncond-prob", type=_share, default=None,
                   help="share of instance captions replaced by the empty prompt")
    q.add_argument("--class-prompt", nargs="+", type=_text("a star"), default=None,
                   help="e.g. 'a star' (or several): prior preservation with base-model class "
                        "images")
    q.add_argument("--num-class-images", type=_count, default=None)
    q.add_argument("--offset-noise", type=_float(0, 10, example=0.1), default=None,
                   help="offset noise of the fine-tune (per sample and channel)")
    q.add_argument("--pyramid-noise", type=_float(0, 10, example=0.5), default=None,
                   help="pyramid noise (2x2, 4x4, 8x8) of the fine-tune")
    q.add_argument("--background-weight", type=_share, default=None,
                   help="< 1: masked loss, the references' background weighted by this")
    q.add_argument("--background-augment", type=_int(0, 10 ** 5, example=3), default=None,
                   help="this many extra images: the subject pasted on random solid backdrops")
    q.add_argument("--layout-augment", type=_int(0, 10 ** 5, example=3), default=None,
                   help="this many extra images: the photos zoomed, shifted and mirrored at random")
    q.add_argument("--layout-scale", type=_float(0, 10, example=0.5, lo_open=True), nargs=2,
                   default=None, metavar=("LOW", "HIGH"),
                   help="zoom range of --layout-augment (default 0.5 1.2)")
    q.add_argument("--layout-shift", type=_share, default=None,
                   help="--layout-augment moves each photo's centre by up to this fraction of "
                        "the side (default: the zoomed photo stays inside the frame)")
    q.add_argument("--augment-max-timestep", type=_timestep, default=None,
                   help="train the augmented copies only at timesteps below this and only the "
                        "photos at and above it (toy.personal.ToyPersonalConfig)")
    q.add_argument("--targets", default=None,
                   help="comma-separated module names that get LoRA layers")
    q.add_argument("--init-lora", type=_path, default=None, metavar="DIR",
                   help="start from this LoRA folder's weights (and learned identifier) instead "
                        "of a fresh init; same --rank and --targets")
    q.add_argument("--seed", type=_seed, default=None)
    q.add_argument("--overwrite", action="store_true",
                   help="replace an earlier LoRA in --out (files it did not write are refused)")
    q.set_defaults(func=cmd_personalize_toy)

    s = sub.add_parser("toy-report", parents=common,
                       help="oracle metrics of the toy models on a prompt file")
    s.add_argument("--prompts", type=_path, required=True,
                   help="a UTF-8 text file, one prompt per line ('#' starts a comment)")
    s.add_argument("--seeds", type=_int(1, 10 ** 6, example=4), default=4)
    s.add_argument("--steps", type=_steps, default=50)
    s.add_argument("--guidance", type=_guidance, default=None,
                   help="classifier-free guidance (default: the backend's, 3.0 on the toy)")
    s.add_argument("--limit", type=_count, default=0, help="use only the first N prompts")
    s.add_argument("--methods", default="", help="extra rows: stage1,layout_and_retouch")
    s.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="LRConfig override for the method rows, e.g. --set layout.lambda1=0.4")
    s.add_argument("--personalized", type=_path, default=None,
                   help="a LoRA folder to measure instead of data/toy/lora (personalize-toy --out)")
    s.add_argument("--ckpt-dir", type=_path, default=None,
                   help="measure a train-toy checkpoint folder instead of data/toy (vanilla rows)")
    s.add_argument("--json", action="store_true")
    s.add_argument("--contact-sheet", type=_path, default=None, metavar="PNG",
                   help="also draw vanilla | personalized | stage 1 | Layout-and-Retouch for six "
                        "prompts, titled with the oracle's reading (e.g. "
                        "data/results/shapeworld/contact_sheet.png)")
    s.add_argument("--overwrite", action="store_true", help="replace an existing --contact-sheet")
    s.set_defaults(func=cmd_toy_report)

    x = sub.add_parser("toy-diagnose", parents=common,
                       help="measure the four properties of the toy world the method relies on "
                            "(exit status 3 when one does not hold)")
    x.add_argument("--personalized", type=_path, default=None,
                   help="a LoRA folder instead of data/toy/lora (personalize-toy --out)")
    x.add_argument("--only", type=_properties, default="1,2,3,4",
                   help="which properties, e.g. 1,3")
    x.add_argument("--prompts", type=_int(1, 10 ** 4, example=24), default=None,
                   help="how many of the diagnostic's 74 prompts (default: all)")
    x.add_argument("--seeds", type=_int(1, 10 ** 4, example=2), default=2, help="seeds per prompt")
    x.add_argument("--steps", type=_steps, default=25)
    x.add_argument("--json", action="store_true")
    x.set_defaults(func=cmd_toy_diagnose)

    g = sub.add_parser("generate", parents=common,
                       help="run Layout-and-Retouch on one prompt and seed")
    g.add_argument("--prompt", type=_text("a sks star at night"), required=True,
                   help="with the identifier, e.g. 'a sks star at night'")
    g.add_argument("--seed", type=_seed, nargs="+", default=[0],
                   help="one seed, or several: one image each, in one batch that shares the "
                        "reference's inversion (and, from 2 images, its cached keys/values)")
    g.add_argument("--out", type=_path, required=True,
                   help="a new (or empty) folder; with --overwrite, an earlier generate output")
    g.add_argument("--backend", choices=("toy", "sd"), default="toy")
    g.add_argument("--base", type=_path, default=None,
                   help="sd: hub id or local folder of the base model")
    g.add_argument("--personalized", type=_path, default=None,
                   help="toy: a LoRA folder (personalize-toy --out; default data/toy/lora); "
                        "sd: LoRA file/folder, DreamBooth folder or textual-inversion embedding")
    g.add_argument("--class-noun", type=_text("dog"), default=None,
                   help="sd: the subject's class noun, e.g. dog")
    g.add_argument("--reference", type=_path, nargs="+", default=None,
                   help="reference photos, or folders of them (default on toy: data/toy/reference)")
    g.add_argument("--lambda1", type=_boundary, default=None,
                   help="vanilla steps: fraction (0.2) or count (10); default: the backend's "
                        "own hand-over (Stable Diffusion 0.2, the toy 0.4)")
    g.add_argument("--lambda2", type=_boundary, default=0.2, help="end of the structure phase")
    g.add_argument("--lambda3", type=_boundary, default=0.8, help="end of latent blending")
    g.add_argument("--steps", type=_steps, default=50)
    g.add_argument("--guidance", type=_guidance, default=None,
                   help="classifier-free guidance (default: the backend's: toy 3.0, sd 7.5)")
    g.add_argument("--engine", choices=("reference", "fast"), default="reference",
                   help="reference (default): the method as docs/method.md writes it; fast: the "
                        "same result with key/value caches and a merged LoRA (LRConfig.engine)")
    g.add_argument("--fuse-lora", action=argparse.BooleanOptionalAction, default=None,
                   help="merge the LoRA into the weights while personalized (default: with "
                        "--engine fast; faster on the CPU, outputs differ from the unmerged "
                        "LoRA's by float rounding)")
    g.add_argument("--stage2", choices=("auto", "cached", "batched"), default="auto",
                   help="with --engine fast: LRConfig.stage2; auto: batched on a GPU (this "
                        "command makes one call, so the cached path would pin host memory it "
                        "never reuses), else the library's auto")
    g.add_argument("--allow-unknown-words", action="store_true",
                   help="warn instead of refusing a prompt word outside the text encoder's "
                        "vocabulary (toy: the ShapeWorld words)")
    g.add_argument("--overwrite", action="store_true",
                   help="replace an earlier generate output in --out (other files are refused)")
    g.set_defaults(func=cmd_generate)

    e = sub.add_parser("evaluate", parents=common,
                       help="run a benchmark: every method, resumable, shardable "
                       "with `accelerate launch -m lr_tutorial evaluate ...`")
    e.add_argument("--benchmark", type=_path, default="shapeworld",
                   help="shapeworld, vico, or a JSON/YAML spec file (lr_tutorial.benchmarks)")
    e.add_argument("--out", type=_path, required=True, help="results folder (a rerun resumes it)")
    e.add_argument("--methods", default="", help="comma-separated subset of "
                   "lr_tutorial.methods.METHODS (default: all)")
    e.add_argument("--lambda1-sweep", default="", help="e.g. 0,0.1,0.2,0.3,0.5,0.7,1: extra "
                   "variants of stage1 and layout_and_retouch")
    e.add_argument("--prompts", type=_count, default=0, help="first N prompts per subject "
                   "(categories interleaved)")
    e.add_argument("--seeds", type=_count, default=0, help="first N seeds")
    e.add_argument("--subjects", default="", help="comma-separated subject names")
    e.add_argument("--steps", type=_steps, default=None)
    e.add_argument("--guidance", type=_guidance, default=None)
    e.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="config override for every method, e.g. --set mask.tau_lo=0.4")
    e.add_argument("--batch", type=_int(1, 4096, example=16), default=16,
                   help="samples per model call")
    e.add_argument("--vico", type=_path, default=None, help="local ViCo folder (DreamMatcher's "
                   "inputs/ layout); default: fetched into ~/.cache/lr_tutorial/vico")
    e.add_argument("--personalized-dir", type=_path, default=None,
                   help="vico on sd: a folder with one LoRA/DreamBooth per concept name")
    e.add_argument("--base", type=_path, default=None, help="sd: base model (hub id or folder)")
    e.add_argument("--sam", type=_path, default=None,
                   help="sd: SAM checkpoint (default: attention masks)")
    e.add_argument("--protocol", choices=("ours", "dreammatcher"), default="ours",
                   help="metric preprocessing (lr_tutorial.metrics)")
    e.add_argument("--dino", type=_path, default="facebook/dino-vits16",
                   help="DINO hub id or local folder")
    e.add_argument("--clip", type=_path, default="openai/clip-vit-base-patch32",
                   help="CLIP id or folder")
    e.add_argument("--save-spec", type=_path, default=None,
                   help="write the resolved spec (JSON/YAML), exit")
    e.add_argument("--quiet", action="store_true", help="no progress bar")
    e.add_argument("--overwrite", action="store_true",
                   help="discard the results already in --out (a folder holding other files "
                        "is refused)")
    e.set_defaults(func=cmd_evaluate)

    d = sub.add_parser("demo", parents=common,
                       help="render the demo figures (toy backend) under --out")
    d.add_argument("--out", type=_path, default="outputs/demo")
    d.add_argument("--overwrite", action="store_true",
                   help="replace an earlier demo output in --out (other files are refused)")
    d.set_defaults(func=cmd_demo)
    return p


# Errors that mean "this input cannot be used": one line, exit status 2. Anything else is a
# bug: one line naming its type, exit status 1, and --debug for the traceback.
EXPECTED = (ValueError, TypeError, OSError, IndexError, KeyError, ImportError)


def _one_line(e: BaseException) -> str:
    text = str(e) if not isinstance(e, KeyError) else str(e.args[0] if e.args else e)
    text = " ".join(ln.strip() for ln in text.strip().splitlines() if ln.strip())
    return text or type(e).__name__


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        a = parser.parse_args(argv)
    except SystemExit as e:  # --help (0) or a bad flag (2, after its one line)
        return int(e.code or 0)
    debug = getattr(a, "debug", False) or os.environ.get("LR_TUTORIAL_DEBUG") == "1"
    try:
        from . import threads
        n = threads.apply(getattr(a, "threads", 0))
        if n > threads.cores():
            print(f"warning: --threads {n} is more than the {threads.cores()} cores this process "
                  "may use; threads then wait for each other (0 picks them automatically)",
                  file=sys.stderr)
        return int(a.func(a) or 0)
    except KeyboardInterrupt:
        if debug:
            raise
        print("interrupted: outputs not finished were not written", file=sys.stderr)
        return 130
    except EXPECTED as e:
        if debug:
            raise
        print(f"error: {_one_line(e)}", file=sys.stderr)
        return 2
    except Exception as e:  # noqa: BLE001
        if debug:
            raise
        print(f"error: {type(e).__name__}: {_one_line(e)} (unexpected: rerun with --debug for "
              "the traceback and report it)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
