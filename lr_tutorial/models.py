"""Loading the models: `load_models("toy")` (ShapeWorld, shipped in data/toy) or
`load_models("sd", ...)` (Stable Diffusion, lr_tutorial/sd.py), each a ModelBundle
(lr_tutorial/bundle.py: the components and the vanilla/personalized switch).

    bundle = load_models("toy")
    with bundle.using("vanilla"): ...            # eps   (base model)
    with bundle.using("personalized"): ...       # eps*  (LoRA on)
"""
from __future__ import annotations

import os
from pathlib import Path

from .bundle import (ARCH_KEYS, IDENTIFIER_FILE, MODES, ModelBundle, attach_lora,  # noqa: F401
                     check_lora, check_same_architecture, load_state_dict, other_base,
                     read_identifier_embedding)


def data_dir() -> Path:
    """The repository's data/ folder (override with LR_TUTORIAL_DATA)."""
    env = os.environ.get("LR_TUTORIAL_DATA")
    path = Path(env) if env else Path(__file__).resolve().parents[1] / "data"
    if not (path / "toy").is_dir():  # noqa: SIM102
        raise FileNotFoundError(
            f"ShapeWorld weights not found in {path / 'toy'}. The toy backend's weights live in "
            "the repository's data/ folder: clone the repository and install it with "
            "`pip install -e .`, or set LR_TUTORIAL_DATA to a folder that holds toy/.")
    return path


# The toy backend's guidance weight. Chosen on the vanilla model alone: the smallest weight at
# which its prompt fidelity is at the plateau it keeps up to Stable Diffusion's 7.5. Above it,
# the DreamBooth-LoRA's images on dark backdrops fall apart:
# classifier-free guidance multiplies a conditional direction the fine-tune has bent.
TOY_GUIDANCE = 3.0

# The toy backend's hand-over lambda1: on a 16x16 latent the vanilla model fixes an object's
# place later than Stable Diffusion does on 64x64 (the same noise hides more of a small
# latent's structure). Switching the position word after 0.4 N still moves 2 of 8 stars, after
# 0.5 N and 0.6 N none (`python -m lr_tutorial toy-diagnose --only 1`); at 0.6 N the
# personalized model also keeps the spread of the layouts it is handed (docs/results.md).
TOY_LAMBDA1 = 0.6


def backend_defaults(backend: str) -> dict:
    """What a backend's bundle fills in where a config leaves None: its hand-over lambda1 and
    its guidance weight (ModelBundle.lambda1, ModelBundle.guidance)."""
    if backend == "toy":
        return {"lambda1": TOY_LAMBDA1, "guidance": TOY_GUIDANCE}
    return {"lambda1": 0.2, "guidance": 7.5}  # Stable Diffusion (docs/method.md "Stage 1")

# The toy UNet's CPU convolutions use oneDNN in calls of at least this many rows only
# (ModelBundle.set_unet_onednn). Its forward without oneDNN took 0.70-0.81x the time at 2-5 rows
# (1-2 images under CFG, with or without the riding reference row), 0.89x at 6, 0.98x at 8,
# but 1.07x at 12 and 1.53x at 17 (8 images and the riding row).
TOY_ONEDNN_MIN_ROWS = 10


def load_toy(personalized: str | Path | None = "default", device: str = "cpu") -> ModelBundle:
    """The ShapeWorld models from data/toy (vanilla) plus the shipped `sks star` LoRA."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, PreTrainedTokenizerFast

    from .toy import world

    root = data_dir() / "toy"
    if not (root / "unet").is_dir():
        raise FileNotFoundError(
            f"no toy model weights in {root} (expected unet/, vae/, text_encoder/, tokenizer/, "
            "scheduler/). Train and export them with `python -m lr_tutorial train-toy`, or "
            "check out a revision of the repository that ships them.")
    bundle = ModelBundle(
        tokenizer=PreTrainedTokenizerFast.from_pretrained(root / "tokenizer"),
        text_encoder=CLIPTextModel.from_pretrained(root / "text_encoder").eval(),
        vae=AutoencoderKL.from_pretrained(root / "vae").eval(),
        unet=UNet2DConditionModel.from_pretrained(root / "unet").eval(),
        scheduler=DDIMScheduler.from_pretrained(root / "scheduler"),
        backend="toy", identifier=world.SUBJECT_IDENTIFIER, class_noun=world.SUBJECT_CLASS,
        source={"base": str(root)}, **backend_defaults("toy"),
        unet_onednn_min_rows=TOY_ONEDNN_MIN_ROWS,
    )
    for m in (bundle.text_encoder, bundle.vae, bundle.unet):
        m.requires_grad_(False)
    from .sd import explicit_settings
    explicit_settings(bundle)  # scheduler settings pinned and recorded; case-insensitive prompts
    if personalized == "default":
        personalized = root / "lora"
    if personalized is not None:
        attach_lora(bundle, personalized)
        bundle.source["personalized"] = str(personalized)
    return bundle.to(device)


def load_models(backend: str = "toy", **kwargs) -> ModelBundle:
    """`load_models("toy")` or `load_models("sd", base=..., personalized=..., ...)`."""
    if backend == "toy":
        return load_toy(**kwargs)
    if backend == "sd":
        from .sd import load_sd
        return load_sd(**kwargs)
    raise ValueError(f"backend must be 'toy' or 'sd', got {backend!r}")
