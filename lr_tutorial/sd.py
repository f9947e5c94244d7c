"""The Stable Diffusion backend: `load_sd()` builds a ModelBundle from diffusers weights.

    bundle = load_sd()                                            # vanilla SD-1.5 only
    bundle = load_sd(personalized="out/sks-dog-lora", class_noun="dog")        # + LoRA
    bundle = load_sd(personalized="out/sks-dog-dreambooth", class_noun="dog")  # + DreamBooth UNet

`base` is a Hub id or a local folder in the diffusers layout (unet/, vae/, text_encoder/,
tokenizer/, scheduler/). `personalized` is a local path; with personalization="auto" its kind is
detected: a folder with unet/ is a full DreamBooth pipeline (only its UNet is used), a
pytorch_lora_weights.* file (or folder holding one) is a LoRA, and any other .safetensors/.bin
holding {token: embedding} is a textual-inversion embedding. Nothing touches the network at import.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from .bundle import (ARCH_KEYS, ModelBundle, attach_lora, check_lora,  # noqa: F401
                     check_same_architecture, load_state_dict, other_base)

PERSONALIZATIONS = ("auto", "none", "lora", "dreambooth", "textual_inversion")
LORA_FILES = ("pytorch_lora_weights.safetensors", "pytorch_lora_weights.bin")
TI_FILES = ("learned_embeds.safetensors", "learned_embeds.bin")
# runwayml took its repositories down in 2024; this mirror holds the same files.
DEFAULT_MIRROR = "stable-diffusion-v1-5/stable-diffusion-v1-5"
MOVED = {"runwayml/stable-diffusion-v1-5": DEFAULT_MIRROR}


class WeightsNotFoundError(OSError):
    """Stable Diffusion weights could not be loaded (offline, not downloaded, wrong path)."""


def _hub_errors() -> tuple[type[BaseException], ...]:
    """Exceptions that mean "these weights are not available here" (OSError covers the
    Hub's HTTP / offline / missing-file errors; the others are not OSErrors)."""
    from huggingface_hub.errors import EntryNotFoundError, HFValidationError
    return (OSError, EntryNotFoundError, HFValidationError)


def _not_found(base: str, part: str, err: BaseException) -> WeightsNotFoundError:
    first = (str(err).strip().splitlines() or [""])[0][:300]
    repo = MOVED.get(base, base)
    note, download = "", f"`huggingface-cli download {repo}` (or `hf download {repo}`)"
    if base in MOVED:
        note = f"\n(Note: {base} was removed from the Hub in 2024; use base={MOVED[base]!r}.)"
    elif Path(base).is_dir():
        note = f"\n(Note: the folder {base} exists; is its {part}/ complete, in the diffusers layout?)"
    elif looks_local(base):
        note = (f"\n(Note: {base!r} looks like a local path, but there is no such folder: "
                "check the path for a typo.)")
        download = (f"`hf download {DEFAULT_MIRROR} --local-dir {base}` (to download the "
                    "weights into that folder)")
    return WeightsNotFoundError(
        f"Could not load the Stable Diffusion weights {base!r} ({part}): "
        f"{type(err).__name__}: {first}{note}\n"
        "Fixes (any one):\n"
        f"  1. on a machine with internet, pre-download them: {download}; a Hub id is then "
        "read from the Hugging Face cache, offline too;\n"
        "  2. pass a local folder in the diffusers layout (unet/, vae/, text_encoder/, tokenizer/, "
        "scheduler/): load_models(\"sd\", base=\"/path/to/stable-diffusion-v1-5\");\n"
        "  3. use the toy backend, which needs no download: load_models(\"toy\").")


def looks_local(base: str) -> bool:
    """A model name that is meant as a local path rather than a Hub id ('org/name')."""
    base = str(base)
    return (base.startswith(("/", ".", "~")) or "\\" in base or base.count("/") > 1
            or Path(base).suffix in (".safetensors", ".bin", ".ckpt", ".pt", ".pth"))


# Scheduler settings the inversion depends on, set explicitly whatever the folder's config says
# (a config without `clip_sample` gets diffusers' default True, which clips the predicted x0 in
# sampling but not in the inversion, so the two trajectories would differ).
INVERSION_SCHEDULER = {"clip_sample": False, "thresholding": False}
SCHEDULER_RECORD = ("clip_sample", "thresholding", "timestep_spacing", "prediction_type",
                    "steps_offset", "set_alpha_to_one", "beta_schedule", "num_train_timesteps",
                    "rescale_betas_zero_snr")


def pin_scheduler(bundle: ModelBundle) -> ModelBundle:
    """Rebuild the bundle's DDIM scheduler with INVERSION_SCHEDULER and an explicit timestep
    spacing and prediction type (the folder's value, else diffusers' defaults "leading" and
    "epsilon"), and record those settings in `bundle.source["scheduler"]`, which every run
    writes to result.json."""
    from diffusers import DDIMScheduler
    cfg = dict(bundle.scheduler.config)
    settings = {**INVERSION_SCHEDULER,
                "timestep_spacing": cfg.get("timestep_spacing") or "leading",
                "prediction_type": cfg.get("prediction_type") or "epsilon"}
    bundle.scheduler = DDIMScheduler.from_config(bundle.scheduler.config, **settings)
    record = {k: bundle.scheduler.config.get(k) for k in SCHEDULER_RECORD}
    if isinstance(getattr(bundle, "source", None), dict):
        bundle.source["scheduler"] = record
    return bundle


def explicit_settings(bundle: ModelBundle) -> ModelBundle:
    """What every loader does to a fresh bundle: the scheduler pinned (pin_scheduler) and a
    tokenizer without a normalizer made case-insensitive (prompts.lowercase_tokenizer), so
    'SKS' and 'Star' read as 'sks' and 'star' on the toy backend as on CLIP."""
    from .prompts import lowercase_tokenizer
    lowercase_tokenizer(bundle.tokenizer)
    return pin_scheduler(bundle)


def _from_pretrained(cls, path: str, subfolder: str, **kwargs):
    """cls.from_pretrained(path, subfolder=...), with every "not available" error turned into
    one WeightsNotFoundError."""
    try:
        return cls.from_pretrained(path, subfolder=subfolder, **kwargs)
    except _hub_errors() as err:
        raise _not_found(str(path), subfolder, err) from err


def detect_personalization(path: str | Path) -> str:
    """"dreambooth", "lora" or "textual_inversion" for a local file or folder."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(
            f"personalized={str(path)!r} does not exist. It must be a local file or folder; "
            "fetch a Hub repository first with `hf download REPO --local-dir DIR`.")
    if path.is_dir():
        if (path / "unet" / "config.json").is_file():
            return "dreambooth"
        if any((path / f).is_file() for f in LORA_FILES):
            return "lora"
        if any((path / f).is_file() for f in TI_FILES):
            return "textual_inversion"
        raise ValueError(
            f"cannot tell what {path} holds: expected a DreamBooth pipeline (unet/config.json), "
            f"a LoRA ({' or '.join(LORA_FILES)}) or a textual-inversion embedding "
            f"({' or '.join(TI_FILES)}); pass personalization=... explicitly if the names differ")
    keys = load_state_dict(path).keys()
    return "lora" if any("lora" in k for k in keys) else "textual_inversion"


def _find_file(path: Path, names: tuple[str, ...]) -> Path:
    if path.is_file():
        return path
    for name in names:
        if (path / name).is_file():
            return path / name
    raise FileNotFoundError(f"{path} holds none of {names}")


def _add_textual_inversion(bundle: ModelBundle, file: Path) -> None:
    """Add the learned token of a {token: (D,) or (1, D)} embedding file to the tokenizer."""
    embeds = load_state_dict(file)
    if len(embeds) != 1:
        raise ValueError(f"{file}: expected one {{token: embedding}} entry, found keys {list(embeds)[:5]}")
    (token, vec), = embeds.items()
    vec = vec.reshape(-1, vec.shape[-1])
    emb = bundle.text_encoder.get_input_embeddings()
    if vec.shape != (1, emb.embedding_dim):
        raise ValueError(f"{file}: embedding of shape {tuple(vec.shape)}, this text encoder needs "
                         f"(1, {emb.embedding_dim}) (one vector; made for another base model?)")
    if bundle.tokenizer.add_tokens(token) != 1:
        raise ValueError(f"token {token!r} of {file} is already in the tokenizer; rename it")
    bundle.text_encoder.resize_token_embeddings(len(bundle.tokenizer))
    with torch.no_grad():
        emb = bundle.text_encoder.get_input_embeddings()
        emb.weight[bundle.tokenizer.convert_tokens_to_ids(token)] = vec[0].to(emb.weight)
    bundle.identifier = token


def load_sd(base: str = DEFAULT_MIRROR, personalized: str | None = None,
            personalization: str = "auto", identifier: str = "sks", class_noun: str | None = None,
            device: str | None = None, dtype=None, local_files_only: bool | None = None,
            ) -> ModelBundle:
    """Load Stable Diffusion (tokenizer, text encoder, VAE, UNet, DDIM scheduler) from `base`,
    plus an optional personalized model (see the module docstring). All models in eval mode,
    frozen, on `device` (default cuda if available) in `dtype` (default fp16 on cuda, fp32 on cpu).
    `local_files_only` defaults to True when HF_HUB_OFFLINE is set or `base` is a local folder.
    For textual inversion, `bundle.identifier` becomes the learned token."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    if personalization not in PERSONALIZATIONS:
        raise ValueError(f"personalization must be one of {PERSONALIZATIONS}, got {personalization!r}")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = dtype or (torch.float16 if str(device).startswith("cuda") else torch.float32)
    if local_files_only is None:
        offline = os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE")
        local_files_only = offline or Path(base).is_dir()
    kind = "none" if personalized is None or personalization == "none" else personalization
    if kind == "auto":
        kind = detect_personalization(personalized)

    kw = dict(local_files_only=local_files_only)
    bundle = ModelBundle(  # cheap parts first, so a missing download fails fast
        scheduler=_from_pretrained(DDIMScheduler, base, "scheduler", **kw),
        tokenizer=_from_pretrained(CLIPTokenizer, base, "tokenizer", **kw),
        text_encoder=_from_pretrained(CLIPTextModel, base, "text_encoder", **kw),  # cast below
        vae=_from_pretrained(AutoencoderKL, base, "vae", torch_dtype=dtype, **kw),
        unet=_from_pretrained(UNet2DConditionModel, base, "unet", torch_dtype=dtype, **kw),
        backend="sd", identifier=identifier, class_noun=class_noun,
        source={"base": str(base), "personalized": None if personalized is None else str(personalized)})

    if kind == "lora":
        file = _find_file(Path(personalized), LORA_FILES)
        attach_lora(bundle, file)  # a file path: on a folder diffusers looks for the .bin only
    elif kind == "dreambooth":
        cfg = UNet2DConditionModel.load_config(str(personalized), subfolder="unet")
        check_same_architecture(bundle.unet.config, cfg, personalized)
        bundle.personal_unet = _from_pretrained(UNet2DConditionModel, str(personalized), "unet",
                                                torch_dtype=dtype, local_files_only=True)
        bundle.personalization = "dreambooth"
    elif kind == "textual_inversion":
        _add_textual_inversion(bundle, _find_file(Path(personalized), TI_FILES))
        bundle.personalization = "textual_inversion"

    for m in (bundle.text_encoder, bundle.vae, bundle.unet, bundle.personal_unet):
        if m is not None:
            m.eval().requires_grad_(False)
    explicit_settings(bundle)
    return bundle.to(device, dtype)
