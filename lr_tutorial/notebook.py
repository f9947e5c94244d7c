"""Helpers for the course notebooks: backend choice and a little display glue."""
from __future__ import annotations

import os


def pick_backend(verbose: bool = True):
    """The toy backend without a GPU (and in CI); Stable Diffusion with a GPU when the weights
    are reachable. Environment: LR_BACKEND=toy|sd forces one; LR_SD_BASE (hub id or folder),
    LR_SD_PERSONALIZED (LoRA/DreamBooth path) and LR_SD_CLASS (class noun) configure SD."""
    import torch

    from .models import load_models

    want = os.environ.get("LR_BACKEND", "auto")
    if want == "sd" or (want == "auto" and torch.cuda.is_available()):
        try:
            kw = {k: v for k, v in dict(base=os.environ.get("LR_SD_BASE"),
                                        personalized=os.environ.get("LR_SD_PERSONALIZED"),
                                        class_noun=os.environ.get("LR_SD_CLASS", "dog")).items() if v}
            bundle = load_models("sd", **kw)
            if verbose:
                print(f"backend: Stable Diffusion ({bundle.personalization} personalization)")
            return bundle
        except Exception as e:  # no weights offline, no personalized model, ...
            if want == "sd":
                raise
            print(f"Stable Diffusion unavailable ({str(e).splitlines()[0][:160]}); using the toy backend")
    bundle = load_models("toy")
    if verbose:
        print("backend: toy (ShapeWorld), subject 'sks star'")
    return bundle


# ----------------------------------------------------------------------------- both backends
# The notebooks run top to bottom on either backend. On Stable Diffusion the backend-agnostic
# cells (sampling, attention capture, stage 1, the swap, masks, widgets) run with the bundle's
# own subject; the ShapeWorld-only cells (the oracle, the toy subject's pattern) say they skip.
REFERENCE_ENV = "LR_SD_REFERENCE"
ORACLE_WHY = ("the oracle that reads shape, position, background and the subject's pattern back "
              "from an image exists only in ShapeWorld")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def is_toy(bundle) -> bool:
    return getattr(bundle, "backend", None) == "toy"


def toy_only(bundle, what: str, why: str = ORACLE_WHY) -> bool:
    """True on the toy backend; otherwise prints one line saying that `what` is skipped on
    Stable Diffusion and why, and returns False. Use as `if toy_only(bundle, "..."):`."""
    if is_toy(bundle):
        return True
    print(f"skipped on Stable Diffusion: {what} ({why})")
    return False


def prompts_for(bundle, toy_prompts):
    """The course's ShapeWorld prompts, for this bundle's subject. Toy: returned unchanged (the
    same object). Otherwise the toy subject's identifier and class noun become the bundle's
    ("a sks star on the left in the snow" -> "a sks dog on the left in the snow"); a str gives
    a str, a list a list."""
    if is_toy(bundle):
        return toy_prompts
    import re

    from .toy.world import SUBJECT_CLASS, SUBJECT_IDENTIFIER
    if not bundle.class_noun:
        raise ValueError("this bundle has no class noun: load it with class_noun=... "
                         "(or set LR_SD_CLASS, e.g. LR_SD_CLASS=dog)")
    words = {SUBJECT_IDENTIFIER: bundle.identifier or SUBJECT_IDENTIFIER,
             SUBJECT_CLASS: bundle.class_noun}
    pattern = re.compile(r"(?<![\w<])(" + "|".join(map(re.escape, words)) + r")(?![\w>])")

    def one(p: str) -> str:
        return pattern.sub(lambda m: words[m.group(1)], p)
    return one(toy_prompts) if isinstance(toy_prompts, str) else [one(p) for p in toy_prompts]


def reference_images(bundle, verbose: bool = True):
    """Photos of the subject, uint8 (n, size, size, 3). Toy: the ShapeWorld subject's five.
    Otherwise the images in the folder named by $LR_SD_REFERENCE (resized to the model's
    side), or None, with a line saying so, when it is unset, missing or holds no image."""
    if is_toy(bundle):
        from .toy.subject import reference_images as toy_references
        return toy_references()
    from pathlib import Path
    folder = os.environ.get(REFERENCE_ENV)
    files = sorted(p for p in Path(folder).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES) \
        if folder and Path(folder).is_dir() else []
    if not files:
        if verbose:
            where = f"no images in {folder!r}" if folder else f"${REFERENCE_ENV} is not set"
            print(f"reference photos: none ({where}); set {REFERENCE_ENV} to a folder of 3-5 "
                  f"photos of your {bundle.class_noun or 'subject'}. The cells that need them skip.")
        return None
    from .images import load_images
    images = load_images(files, bundle.image_size)
    if verbose:
        print(f"reference photos: {len(images)} from {folder}")
    return images


def have_references(refs, what: str) -> bool:
    """True when reference photos were found; otherwise prints why `what` is skipped."""
    if refs is not None:
        return True
    print(f"skipped: {what} needs photos of your subject (set {REFERENCE_ENV} to a folder of them)")
    return False


_SCORERS: dict = {}


def real_scores(bundle, images, prompts: list[str], refs=None) -> dict | None:
    """The paper's metrics on real images (lr_tutorial.metrics), where the toy oracle does not
    exist: `text` the mean T_CLIP (image vs prompt with the identifier dropped), `identity` the
    mean I_DINO to `refs` (None without them), `diversity` the mean pairwise DINO distance.
    None, with a line saying why, when the CLIP / DINO checkpoints cannot be loaded."""
    from . import metrics
    device = str(bundle.device)
    if "error" in _SCORERS:  # said once already
        return None
    try:
        if "clip" not in _SCORERS:
            _SCORERS["clip"] = metrics.load_clip(device=device)
        if "dino" not in _SCORERS:
            _SCORERS["dino"] = metrics.load_dino(device=device)
    except metrics.MetricModelNotFoundError as err:
        _SCORERS["error"] = err
        print(f"skipped: CLIP / DINO scores ({str(err).splitlines()[0][:200]})")
        return None
    clip, dino = _SCORERS["clip"], _SCORERS["dino"]
    texts = [metrics.class_prompt(p, bundle.identifier) if bundle.identifier else p for p in prompts]
    t = metrics.text_similarity(clip.embed(images), clip.embed_text(texts))
    emb = dino.embed(images)
    ident = None if refs is None else float(metrics.identity_similarity(emb, dino.embed(refs)).mean())
    return {"text": float(t.mean()), "identity": ident, "diversity": metrics.pairwise_diversity(emb)}


def score_fn(bundle, refs=None):
    """`scores(images, prompts) -> (prompt fidelity, identity)` for widgets.LambdaExplorer:
    None on the toy backend (the explorer's default, the oracle); otherwise T_CLIP and I_DINO
    from real_scores, nan where they cannot be had (no CLIP / DINO weights, no photos)."""
    if is_toy(bundle):
        return None
    nan = float("nan")

    def scores(images, prompts):
        s = real_scores(bundle, images, prompts, refs)
        if s is None:
            return nan, nan
        return s["text"], nan if s["identity"] is None else s["identity"]
    return scores
