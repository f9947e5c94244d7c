"""Helpers for the course notebooks: the backend for this runtime, the glue that lets every
notebook run on both backends, and `show_source`, which quotes the package's code as it is."""
from __future__ import annotations

import os
from dataclasses import dataclass, field


BACKEND_ENV, PERSONALIZED_ENV = "LR_BACKEND", "LR_SD_PERSONALIZED"
SD_HINT = ("for Stable Diffusion, set LR_SD_PERSONALIZED to a LoRA folder (notebook 07 trains one on "
           "your photos into my_lora) and LR_SD_CLASS to its class noun, e.g. os.environ.update("
           "LR_SD_PERSONALIZED=\"my_lora\", LR_SD_CLASS=\"dog\"), then rerun this cell")


@dataclass
class BackendChoice:
    """What pick_backend loads: `backend` "toy" or "sd", the keyword arguments of load_models,
    whether the environment forced it, and a line to print (or None)."""
    backend: str
    kwargs: dict = field(default_factory=dict)
    forced: bool = False
    note: str | None = None


def choose_backend(env=None, cuda: bool | None = None) -> BackendChoice:
    """The notebooks' backend for this runtime, without loading anything. The course needs a
    personalized model, so Stable Diffusion is chosen only with one:
    - LR_BACKEND=toy, or no GPU: the toy backend;
    - a GPU and LR_SD_PERSONALIZED naming a folder (LoRA, DreamBooth or textual inversion):
      Stable Diffusion, from LR_SD_BASE (default: the hub's SD 1.5), class noun LR_SD_CLASS;
    - a GPU without it: the toy backend, with a line saying how to point the notebooks at SD;
    - LR_BACKEND=sd: Stable Diffusion even without a GPU; LR_SD_PERSONALIZED is then required."""
    env = os.environ if env is None else env
    if cuda is None:
        import torch
        cuda = torch.cuda.is_available()
    want = env.get(BACKEND_ENV, "auto").strip().lower() or "auto"
    if want not in ("auto", "toy", "sd"):
        raise ValueError(f"{BACKEND_ENV}={env[BACKEND_ENV]!r}: use toy, sd or auto (or unset it)")
    if want == "toy":
        return BackendChoice("toy", forced=True)
    personalized = env.get(PERSONALIZED_ENV, "").strip()
    if want == "sd" and not personalized:
        raise ValueError(f"{BACKEND_ENV}=sd needs a personalized model: set {PERSONALIZED_ENV} to a LoRA, "
                         "DreamBooth or textual-inversion folder (notebook 07 trains a LoRA into my_lora)")
    if want == "auto" and not cuda:
        note = None if not personalized else \
            f"{PERSONALIZED_ENV} is set but there is no GPU: toy backend ({BACKEND_ENV}=sd forces Stable Diffusion)"
        return BackendChoice("toy", note=note)
    if want == "auto" and not personalized:
        return BackendChoice("toy", note="GPU found, no personalized model: toy backend; " + SD_HINT)
    if want == "auto" and not os.path.exists(personalized):
        return BackendChoice("toy", note=f"{PERSONALIZED_ENV}={personalized!r} does not exist: toy backend; "
                                         + SD_HINT)
    kw = {"personalized": personalized, "class_noun": env.get("LR_SD_CLASS", "").strip() or "dog"}
    if env.get("LR_SD_BASE", "").strip():
        kw["base"] = env["LR_SD_BASE"].strip()
    return BackendChoice("sd", kw, forced=want == "sd")


def pick_backend(verbose: bool = True, env=None, cuda: bool | None = None):
    """Load the backend that choose_backend picks for this runtime and print one line naming it
    (and, on a GPU without a personalized model, how to point the notebooks at Stable Diffusion).
    Where Stable Diffusion cannot be loaded (no weights offline, a broken LoRA folder), the toy
    backend, saying why; with LR_BACKEND=sd the error is raised instead."""
    from . import models

    choice = choose_backend(env, cuda)
    if choice.note and verbose:
        print(choice.note)
    if choice.backend == "sd":
        try:
            bundle = models.load_models("sd", **choice.kwargs)
            if verbose:
                print(f"backend: Stable Diffusion ({bundle.personalization} personalization "
                      f"from {choice.kwargs['personalized']}), subject '{bundle.identifier} {bundle.class_noun}'")
            return bundle
        except Exception as e:  # no weights offline, an unreadable personalized model, ...
            if choice.forced:
                raise
            print(f"Stable Diffusion unavailable ({str(e).splitlines()[0][:160] if str(e) else type(e).__name__}); "
                  "using the toy backend")
    bundle = models.load_models("toy")
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


# ----------------------------------------------------------------------------- the code, quoted
def source_of(obj) -> tuple[str, str]:
    """(header, code) of a function, method or class of the package: the header names its file
    and qualified name ("lr_tutorial/swap.py, multi_source_attention"), the code is its current
    source (inspect.getsource, decorators included), dedented."""
    import inspect
    import textwrap

    target = inspect.unwrap(getattr(obj, "__func__", obj))  # a bound method: its function
    module = inspect.getmodule(target)
    if module is None:
        raise TypeError(f"{obj!r} has no module to read its source from")
    path = module.__name__.replace(".", "/")
    path += "/__init__.py" if os.path.basename(module.__file__ or "") == "__init__.py" else ".py"
    return f"{path}, {target.__qualname__}", textwrap.dedent(inspect.getsource(target))


def show_source(obj) -> None:
    """Show the package's own code for `obj`, as it is now: in Jupyter a highlighted Python block
    under a line naming the file and the function; elsewhere the same two, printed."""
    header, code = source_of(obj)
    try:
        from IPython import get_ipython
        shell = get_ipython()
    except ImportError:
        shell = None
    if getattr(shell, "kernel", None) is None:  # a script or a terminal: plain text
        print(f"# {header}\n{code}", end="" if code.endswith("\n") else "\n")
        return
    from IPython.display import Markdown, display
    fence = "```"
    while fence in code:
        fence += "`"
    display(Markdown(f"`{header}`\n\n{fence}python\n{code.rstrip()}\n{fence}"))
