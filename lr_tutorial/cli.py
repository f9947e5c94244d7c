"""Command line: `python -m lr_tutorial <command> ...` (`--help` on any command)."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _default_ckpt() -> str:
    return str(Path.home() / ".cache" / "lr_tutorial" / "train-toy")


def cmd_train_toy(a) -> int:
    import torch

    from .models import data_dir
    from .toy import train

    if a.threads:
        torch.set_num_threads(a.threads)
    cfg = train.ToyTrainConfig(ckpt_dir=a.ckpt_dir, seed=a.seed)
    for k in ("vae_steps", "unet_steps", "dataset_size", "pyramid_from", "boost_from",
              "token_id_from", "looks_from", "look_share", "pairs_from", "pair_share"):
        if getattr(a, k) is not None:
            setattr(cfg, k, getattr(a, k))
    Path(cfg.ckpt_dir).mkdir(parents=True, exist_ok=True)
    if a.from_export:
        if (Path(cfg.ckpt_dir) / "unet.pt").exists():
            print(f"error: {cfg.ckpt_dir} already holds checkpoints; resume from them instead",
                  file=sys.stderr)
            return 2
        train.seed_from_export(cfg, a.from_export)
    print(f"checkpoints and log.jsonl in {cfg.ckpt_dir} (rerun the same command to resume)")
    if a.stage in ("all", "vae", "unet"):
        vae = train.train_vae(cfg)
        if a.stage != "vae":
            train.train_unet(cfg, *train.unet_data(cfg, vae))
    if a.stage in ("all", "export"):
        out = Path(a.out) if a.out else data_dir() / "toy"
        train.export(cfg, out, overwrite=a.overwrite)
        print(f"wrote the toy models to {out}")
    return 0


def cmd_references(a) -> int:
    from .toy import subject
    paths = subject.write_references(a.out, overwrite=a.overwrite)
    print("\n".join(str(p) for p in paths))
    return 0


def cmd_personalize_toy(a) -> int:
    import numpy as np
    import torch

    from .models import data_dir, load_models
    from .personalize import dreambooth_lora, toy_recipe
    from .toy import subject

    if a.threads:
        torch.set_num_threads(a.threads)
    bundle = load_models("toy", personalized=None)
    given = {k: getattr(a, k) for k in ("steps", "seed", "rank", "alpha", "lr", "lr_schedule",
                                         "identifier_lr", "uncond_prob", "offset_noise",
                                         "pyramid_noise", "background_weight", "background_augment",
                                         "layout_augment", "layout_shift",
                                         "augment_max_timestep", "num_class_images",
                                         "recolour_share", "recolour_min_timestep",
                                         "recolour_max_timestep", "recolour_variants",
                                         "above_weight", "init_lora")}
    if a.backdrops_every_timestep:
        given["backdrops_every_timestep"] = True
    if a.layout_scale:
        given["layout_scale"] = tuple(a.layout_scale)
    if a.class_prompt:
        given["class_prompt"] = a.class_prompt[0] if len(a.class_prompt) == 1 else tuple(a.class_prompt)
    if a.targets:
        given["target_modules"] = tuple(a.targets.split(","))
    if a.alpha is None and a.rank is not None:
        given["alpha"] = float(a.rank)
    cfg = toy_recipe(**{k: v for k, v in given.items() if v is not None})
    out = Path(a.out) if a.out else data_dir() / "toy" / "lora"
    refs = subject.reference_images()
    masks = None
    if cfg.background_weight < 1 or cfg.background_augment or cfg.recolour_share:
        # the toy's masks: from the oracle
        from .toy import oracle
        masks = np.stack([oracle.analyze(r).mask for r in refs])
    dreambooth_lora(bundle, refs, cfg, out_dir=out, overwrite=a.overwrite, masks=masks)
    print(f"wrote the LoRA to {out}")
    return 0


def cmd_toy_report(a) -> int:
    import torch

    from .models import load_models
    from .toy import report

    # the method rows' config first: a bad --set fails before the models load
    methods = tuple(m for m in a.methods.split(",") if m)
    overrides = _overrides(a.set)
    if overrides is None:
        return 2
    config = None
    if overrides:
        from .methods import apply_overrides
        from .pipeline import LRConfig
        if not methods:
            print("error: --set changes the method rows only; add --methods "
                  "stage1,layout_and_retouch", file=sys.stderr)
            return 2
        try:
            config = apply_overrides(LRConfig(), overrides)
        except (TypeError, ValueError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.ckpt_dir:  # watch a training run: the newest checkpoint's EMA weights, vanilla rows only
        from .toy import train
        bundle, step = train.checkpoint_bundle(train.ToyTrainConfig(ckpt_dir=a.ckpt_dir))
        print(f"training checkpoint {a.ckpt_dir}, UNet step {step}", file=sys.stderr)
    else:
        bundle = load_models("toy", **({"personalized": a.personalized} if a.personalized else {}))
    prompts = report.read_prompts(a.prompts)
    if a.limit:
        prompts = prompts[:a.limit]
    res = report.toy_report(bundle, prompts, list(range(a.seeds)), steps=a.steps,
                            guidance=a.guidance, progress=not a.json, methods=methods,
                            config=config)
    res["prompt_file"] = str(a.prompts)
    if overrides:
        res["config_overrides"] = overrides
    print(json.dumps(res, indent=1) if a.json else _pretty(res))
    return 0


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


def cmd_generate(a) -> int:
    import matplotlib
    matplotlib.use("Agg")
    from PIL import Image

    from .swap import SwapConfig
    from .files import atomic_file
    from .images import load_images
    from .layout import LayoutConfig
    from .masks import MaskConfig
    from .models import load_models
    from .pipeline import LayoutAndRetouch, LRConfig
    from .viz import result_panel

    out = Path(a.out)
    if out.exists() and not a.overwrite:
        print(f"error: {out} exists; choose another --out or pass --overwrite", file=sys.stderr)
        return 2
    if a.backend == "toy":
        bundle = load_models("toy")
    else:
        extra = {k: v for k, v in dict(base=a.base, personalized=a.personalized,
                                       class_noun=a.class_noun).items() if v is not None}
        bundle = load_models("sd", **extra)
    if a.fuse_lora:
        bundle.set_fuse_lora(True)
    refs = load_images(a.reference, bundle.image_size) if a.reference else None
    cfg = LRConfig(layout=LayoutConfig(lambda1=_num(a.lambda1), steps=a.steps, guidance=a.guidance),
                   swap=SwapConfig(lambda2=_num(a.lambda2)), mask=MaskConfig(lambda3=_num(a.lambda3)),
                   stage2=one_call_stage2(a.stage2, bundle.device))
    seeds = list(a.seed)
    result = LayoutAndRetouch(bundle, cfg)([a.prompt] * len(seeds), refs, seed=seeds)
    result.save(out, overwrite=a.overwrite)  # final_00.png, layout_00.png, ... per image
    if len(seeds) == 1:
        with atomic_file(out / "final.png") as tmp:
            Image.fromarray(result.images[0]).save(tmp)
        with atomic_file(out / "panel.png") as tmp:
            result_panel(result, bundle).savefig(tmp, dpi=130)
        print(f"wrote {out / 'final.png'} and {out / 'panel.png'} (intermediates in {out})")
        return 0
    for i in range(len(seeds)):
        with atomic_file(out / f"panel_{i:02d}.png") as tmp:
            result_panel(result, bundle, index=i).savefig(tmp, dpi=130)
    print(f"wrote {len(seeds)} images (seeds {seeds}): {out}/final_NN.png and panel_NN.png, "
          f"NN = 00..{len(seeds) - 1:02d} (intermediates in {out})")
    return 0


def one_call_stage2(choice: str, device) -> str:
    """LRConfig.stage2 for a process that makes one call (`generate`). On a GPU the cached
    stage 2 keeps its keys/values in pinned host memory, which the first call in a process
    must pin: about 0.47 s per GB on an H200 machine, 2.2 GB per image and 1.1 GB per
    reference at 512 px, against the 0.17 s per image the cached path saves over the batched one with a new
    reference (bench/HISTORY.md, session 13). Only later calls, reusing that memory, gain."""
    return "batched" if choice == "auto" and str(device).startswith("cuda") else choice


def _overrides(pairs) -> dict | None:
    """--set KEY=VALUE pairs -> {dotted LRConfig field: value}; None (after printing why) when
    one is not KEY=VALUE. Numbers, lists and true/false are read as JSON; anything else is a
    string (e.g. none)."""
    out = {}
    for kv in pairs or ():
        key, sep, value = kv.partition("=")
        if not sep or not key:
            print(f"error: --set {kv!r} is not KEY=VALUE, e.g. --set mask.tau_lo=0.4", file=sys.stderr)
            return None
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def _num(s: str) -> float | int:
    """'10' -> 10 steps; '0.2' -> fraction 0.2 of the steps."""
    return float(s) if any(c in s for c in ".eE") else int(s)


def cmd_demo(a) -> int:
    from . import demo
    path = demo.run(Path(a.out))
    print(f"figures written to {path}")
    return 0


def cmd_evaluate(a) -> int:
    import matplotlib
    matplotlib.use("Agg")
    import torch

    from . import benchmarks, evaluate

    if a.threads:
        torch.set_num_threads(a.threads)
    extra = {}
    if a.steps is not None:
        extra["steps"] = a.steps
    if a.guidance is not None:
        extra["guidance"] = a.guidance
    if a.benchmark == "shapeworld":
        spec = benchmarks.shapeworld(**extra)
    elif a.benchmark == "vico":
        spec = benchmarks.vico(a.vico, personalized_dir=a.personalized_dir, base=a.base,
                               sam=a.sam, **extra)
    else:
        spec = benchmarks.Benchmark.load(a.benchmark)
        for k, v in extra.items():
            setattr(spec, k, v)
    if a.methods:
        spec.methods = [m for m in a.methods.split(",") if m]
    if a.lambda1_sweep:
        spec.lambda1_sweep = [float(x) for x in a.lambda1_sweep.split(",") if x]
    overrides = _overrides(a.set)
    if overrides is None:
        return 2
    spec.config.update(overrides)
    spec = benchmarks.Benchmark(**spec.to_dict())  # validate the edited spec
    spec = spec.limit(prompts=a.prompts or None, seeds=a.seeds or None,
                      subjects=a.subjects.split(",") if a.subjects else None)
    if a.save_spec:
        print(f"wrote {spec.save(a.save_spec)}")
        return 0
    try:
        out = evaluate.run(spec, a.out, overwrite=a.overwrite, batch=a.batch,
                           progress=not a.quiet, protocol=a.protocol, dino=a.dino, clip=a.clip)
    except FileExistsError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if (out / "results.md").is_file():
        print((out / "results.md").read_text())
        print(f"tables and plots in {out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m lr_tutorial", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train-toy", help="train the ShapeWorld VAE, text encoder and UNet")
    t.add_argument("--ckpt-dir", default=_default_ckpt())
    t.add_argument("--stage", choices=("all", "vae", "unet", "export"), default="all")
    t.add_argument("--out", default=None, help="where to export (default data/toy)")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--vae-steps", type=int)
    t.add_argument("--unet-steps", type=int)
    t.add_argument("--dataset-size", type=int)
    t.add_argument("--pyramid-from", type=int, help="UNet step that turns pyramid noise on")
    t.add_argument("--boost-from", type=int, help="UNet step that turns the high-noise boost on")
    t.add_argument("--token-id-from", type=int,
                   help="UNet step that turns the text encoder's token-identity loss on")
    t.add_argument("--looks-from", type=int,
                   help="UNet step from which free-look scenes (random colours/patterns) join")
    t.add_argument("--look-share", type=float, help="share of each batch with free looks")
    t.add_argument("--pairs-from", type=int,
                   help="UNet step from which look pairs (two copies of a free-look object) join")
    t.add_argument("--pair-share", type=float, help="share of each batch with look pairs")
    t.add_argument("--threads", type=int, default=0)
    t.add_argument("--overwrite", action="store_true")
    t.add_argument("--from-export", default=None,
                   help="seed empty checkpoints from exported weights (e.g. data/toy) to go on "
                        "training on a machine that lost --ckpt-dir")
    t.set_defaults(func=cmd_train_toy)

    r = sub.add_parser("toy-references", help="write the subject's reference photos (PNG)")
    r.add_argument("--out", default=None, help="default data/toy/reference")
    r.add_argument("--overwrite", action="store_true")
    r.set_defaults(func=cmd_references)

    q = sub.add_parser("personalize-toy", help="DreamBooth-LoRA on the subject's references")
    q.add_argument("--out", default=None, help="default data/toy/lora")
    # unset flags keep personalize.toy_recipe()'s values (the shipped LoRA's recipe)
    q.add_argument("--steps", type=int, default=None)
    q.add_argument("--rank", type=int, default=None)
    q.add_argument("--alpha", type=float, default=None, help="LoRA alpha (default: the rank)")
    q.add_argument("--lr", type=float, default=None)
    q.add_argument("--lr-schedule", choices=("constant", "cosine"), default=None)
    q.add_argument("--identifier-lr", type=float, default=None,
                   help="> 0: also learn the identifier's input embedding at this lr")
    q.add_argument("--uncond-prob", type=float, default=None,
                   help="share of instance captions replaced by the empty prompt")
    q.add_argument("--class-prompt", nargs="+", default=None,
                   help="e.g. 'a star' (or several): prior preservation with base-model class "
                        "images")
    q.add_argument("--num-class-images", type=int, default=None)
    q.add_argument("--offset-noise", type=float, default=None,
                   help="offset noise of the fine-tune (per sample and channel)")
    q.add_argument("--pyramid-noise", type=float, default=None,
                   help="pyramid noise (2x2, 4x4, 8x8) of the fine-tune")
    q.add_argument("--background-weight", type=float, default=None,
                   help="< 1: masked loss, the references' background weighted by this")
    q.add_argument("--background-augment", type=int, default=None,
                   help="this many extra images: the subject pasted on random solid backdrops")
    q.add_argument("--layout-augment", type=int, default=None,
                   help="this many extra images: the photos zoomed, shifted and mirrored at random")
    q.add_argument("--layout-scale", type=float, nargs=2, default=None, metavar=("LOW", "HIGH"),
                   help="zoom range of --layout-augment (default 0.5 1.2)")
    q.add_argument("--layout-shift", type=float, default=None,
                   help="--layout-augment moves each photo's centre by up to this fraction of "
                        "the side (default: the zoomed photo stays inside the frame)")
    q.add_argument("--augment-max-timestep", type=int, default=None,
                   help="train the augmented copies only at timesteps below this and only the "
                        "photos at and above it; a toy-construction knob, see DreamBoothConfig")
    q.add_argument("--backdrops-every-timestep", action="store_true",
                   help="with --augment-max-timestep: keep the --background-augment composites "
                        "at every timestep; only the re-framed copies are held below it")
    q.add_argument("--targets", default=None,
                   help="comma-separated module names that get LoRA layers")
    q.add_argument("--recolour-share", type=float, default=None,
                   help="share of the rows below --augment-max-timestep noised from the subject "
                        "painted one flat random colour, target the subject (DreamBoothConfig)")
    q.add_argument("--above-weight", type=float, default=None,
                   help="with --augment-max-timestep: loss weight of the rows at and above it")
    q.add_argument("--recolour-min-timestep", type=int, default=None)
    q.add_argument("--recolour-max-timestep", type=int, default=None)
    q.add_argument("--recolour-variants", type=int, default=None)
    q.add_argument("--init-lora", default=None, metavar="DIR",
                   help="start from this LoRA folder's weights (and learned identifier) instead "
                        "of a fresh init; same --rank and --targets")
    q.add_argument("--seed", type=int, default=None)
    q.add_argument("--threads", type=int, default=0)
    q.add_argument("--overwrite", action="store_true")
    q.set_defaults(func=cmd_personalize_toy)

    s = sub.add_parser("toy-report", help="oracle metrics of the toy models on a prompt file")
    s.add_argument("--prompts", required=True)
    s.add_argument("--seeds", type=int, default=4)
    s.add_argument("--steps", type=int, default=50)
    s.add_argument("--guidance", type=float, default=None,
                   help="classifier-free guidance (default: the backend's, 3.0 on the toy)")
    s.add_argument("--limit", type=int, default=0, help="use only the first N prompts")
    s.add_argument("--methods", default="", help="extra rows: stage1,layout_and_retouch")
    s.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="LRConfig override for the method rows, e.g. --set layout.lambda1=0.4")
    s.add_argument("--threads", type=int, default=0)
    s.add_argument("--personalized", default=None,
                   help="a LoRA folder to measure instead of data/toy/lora (personalize-toy --out)")
    s.add_argument("--ckpt-dir", default=None,
                   help="measure a train-toy checkpoint folder instead of data/toy (vanilla rows)")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_toy_report)

    g = sub.add_parser("generate", help="run Layout-and-Retouch on one prompt and seed")
    g.add_argument("--prompt", required=True, help="with the identifier, e.g. 'a sks star at night'")
    g.add_argument("--seed", type=int, nargs="+", default=[0],
                   help="one seed, or several: one image each, in one batch that shares the "
                        "reference's inversion (and, from 2 images, its cached keys/values)")
    g.add_argument("--out", required=True)
    g.add_argument("--backend", choices=("toy", "sd"), default="toy")
    g.add_argument("--base", default=None, help="sd: hub id or local folder of the base model")
    g.add_argument("--personalized", default=None, help="sd: LoRA file/folder or DreamBooth folder")
    g.add_argument("--class-noun", default=None, help="sd: the subject's class noun, e.g. dog")
    g.add_argument("--reference", nargs="*", default=None,
                   help="reference photos (default on toy: data/toy/reference)")
    g.add_argument("--lambda1", default="0.2", help="vanilla steps: fraction (0.2) or count (10)")
    g.add_argument("--lambda2", default="0.2", help="end of the structure phase")
    g.add_argument("--lambda3", default="0.8", help="end of latent blending")
    g.add_argument("--steps", type=int, default=50)
    g.add_argument("--guidance", type=float, default=None,
                   help="classifier-free guidance (default: the backend's: toy 3.0, sd 7.5)")
    g.add_argument("--fuse-lora", action=argparse.BooleanOptionalAction, default=True,
                   help="merge the LoRA into the weights while personalized (default: one toy "
                        "image in 4.3-4.6 s instead of 5.6 s on 2 cores, bench/README.md, "
                        "session 25; outputs differ from the unmerged LoRA's by float rounding)")
    g.add_argument("--stage2", choices=("auto", "cached", "batched"), default="auto",
                   help="LRConfig.stage2; auto: batched on a GPU (this command makes one call, "
                        "so the cached path would pin host memory it never reuses), else the "
                        "library's auto")
    g.add_argument("--overwrite", action="store_true")
    g.set_defaults(func=cmd_generate)

    e = sub.add_parser("evaluate", help="run a benchmark: every method, resumable, shardable "
                       "with `accelerate launch -m lr_tutorial evaluate ...`")
    e.add_argument("--benchmark", default="shapeworld",
                   help="shapeworld, vico, or a JSON/YAML spec file (lr_tutorial.benchmarks)")
    e.add_argument("--out", required=True, help="results folder (a rerun resumes it)")
    e.add_argument("--methods", default="", help="comma-separated subset of "
                   "lr_tutorial.methods.METHODS (default: all)")
    e.add_argument("--lambda1-sweep", default="", help="e.g. 0,0.1,0.2,0.3,0.5,0.7,1: extra "
                   "variants of stage1 and layout_and_retouch")
    e.add_argument("--prompts", type=int, default=0, help="first N prompts per subject "
                   "(categories interleaved)")
    e.add_argument("--seeds", type=int, default=0, help="first N seeds")
    e.add_argument("--subjects", default="", help="comma-separated subject names")
    e.add_argument("--steps", type=int, default=None)
    e.add_argument("--guidance", type=float, default=None)
    e.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="config override for every method, e.g. --set mask.tau_lo=0.4")
    e.add_argument("--batch", type=int, default=16, help="samples per model call")
    e.add_argument("--vico", default=None, help="local ViCo folder (DreamMatcher's inputs/ "
                   "layout); default: fetched into ~/.cache/lr_tutorial/vico")
    e.add_argument("--personalized-dir", default=None,
                   help="vico on sd: a folder with one LoRA/DreamBooth per concept name")
    e.add_argument("--base", default=None, help="sd: base model (hub id or folder)")
    e.add_argument("--sam", default=None, help="sd: SAM checkpoint (default: attention masks)")
    e.add_argument("--protocol", choices=("ours", "dreammatcher"), default="ours",
                   help="metric preprocessing (lr_tutorial.metrics)")
    e.add_argument("--dino", default="facebook/dino-vits16", help="DINO hub id or local folder")
    e.add_argument("--clip", default="openai/clip-vit-base-patch32", help="CLIP id or folder")
    e.add_argument("--save-spec", default=None, help="write the resolved spec (JSON/YAML), exit")
    e.add_argument("--threads", type=int, default=0)
    e.add_argument("--quiet", action="store_true", help="no progress bar")
    e.add_argument("--overwrite", action="store_true",
                   help="discard the results already in --out")
    e.set_defaults(func=cmd_evaluate)

    d = sub.add_parser("demo", help="render the demo figures (toy backend) under --out")
    d.add_argument("--out", default="outputs/demo")
    d.set_defaults(func=cmd_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    return a.func(a)


if __name__ == "__main__":
    sys.exit(main())
