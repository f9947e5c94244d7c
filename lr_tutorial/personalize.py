"""DreamBooth personalization with LoRA (peft) on the UNet: the toy backend on a CPU, Stable
Diffusion on a GPU, same function.

    z = E(x_ref) * s,  t ~ U{0..T-1},  z_t = sqrt(a_t) z + sqrt(1 - a_t) eps
    L = || eps - eps*(z_t, t, "a sks <class>") ||^2  (+ prior_weight * the same on class images)

eps is white noise, plus offset/pyramid noise when the base model was trained with them; with
`background_weight < 1` the instance loss is a masked mean, w = 1 on the subject and
background_weight elsewhere: sum(w * (eps - eps*)^2) / sum(w).

Only the LoRA matrices train (and, with `identifier_lr > 0`, the identifier token's input
embedding, textual-inversion style); the base UNet, VAE and the rest of the text encoder stay
frozen. With `uncond_prob > 0` that share of the instance captions is replaced by the empty
prompt, so the LoRA's unconditional prediction learns the subject too and classifier-free
guidance does not push the subject's colours away from it. The result is saved in diffusers'
LoRA format (pytorch_lora_weights.safetensors, plus identifier_embedding.safetensors when the
identifier was trained), which `load_models(..., personalized=DIR)` reads; any diffusers
pipeline's `load_lora_weights` reads the LoRA file.

Extra training images (`TrainingCopies`, e.g. augmented copies of the photos, which the toy
backend builds in `toy/personal.py`) are drawn with the photos; with a `max_timestep` they are
noised only below it, the photos alone at and above it. `init_lora` goes on from a saved LoRA.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from . import sampling
from .files import atomic_folder, refuse_existing
from .models import IDENTIFIER_FILE, ModelBundle


@dataclass
class DreamBoothConfig:
    """Knobs of DreamBooth-LoRA fine-tuning (Ruiz et al. 2023; diffusers' train_dreambooth_lora).
    The defaults are a mild, generic LoRA on the attention projections; the shipped toy LoRA
    uses `toy_recipe()` (data/toy/README.md)."""
    instance_prompt: str = "a sks star"
    # prior preservation: None (off), one class prompt ("a star") or several ("a star at night",
    # "a star on the grass", ...) that the class images cycle through
    class_prompt: str | tuple[str, ...] | None = None
    prior_weight: float = 1.0
    num_class_images: int = 32
    rank: int = 8
    alpha: float = 8.0
    target_modules: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0")
    steps: int = 400
    batch_size: int = 4
    lr: float = 1e-3
    lr_schedule: str = "constant"  # or "cosine" (to 0 at the last step)
    identifier_lr: float = 0.0  # > 0: also learn the identifier's input embedding at this lr
    uncond_prob: float = 0.0  # share of instance captions replaced by "" (CFG-aware LoRA)
    # the training noise: white + offset_noise * N(0, 1) per channel (diffusers' --offset_noise)
    # + pyramid_noise * N(0, 1) at 2x2, 4x4, 8x8 upsampled, to fine-tune with the noise the base
    # model was trained with. On the toy it did not change identity.
    offset_noise: float = 0.0
    pyramid_noise: float = 0.0
    # masked loss: the loss of the references' background pixels is weighted by this (1: plain
    # DreamBooth; < 1 needs `masks`, the subject's masks, e.g. from a Segmenter), so the
    # references' backdrop pulls the model's scenes less.
    background_weight: float = 1.0
    # a LoRA folder this function wrote: its LoRA matrices (and learned identifier embedding, if
    # any) start the training instead of a fresh init, to go on training a LoRA or to refine
    # one with other data (e.g. a toy LoRA with re-framed copies below a timestep).
    # Its rank and target modules must equal this config's; its dreambooth_config.json is
    # checked for that when present. The folder is only read, never written.
    init_lora: str | None = None
    seed: int = 0
    adapter_name: str = "personal"
    extra: dict = field(default_factory=dict)


# LoRA layers on every linear/conv projection of the UNet's resnets and transformer blocks
ALL_UNET_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj",
                    "ff.net.2", "conv1", "conv2")


def toy_recipe(**overrides) -> DreamBoothConfig:
    """The recipe of the shipped toy LoRA (`python -m lr_tutorial personalize-toy`); measured
    against weaker ones on the toy. Keyword arguments override single knobs. The toy's other
    LoRAs add augmented copies of the photos: `toy.personal.ToyPersonalConfig`."""
    recipe = dict(target_modules=ALL_UNET_TARGETS, rank=8, alpha=8.0, steps=4000, lr=3e-3,
                  lr_schedule="cosine", uncond_prob=0.0, identifier_lr=5e-3)
    return DreamBoothConfig(**{**recipe, **overrides})


@dataclass
class TrainingCopies:
    """Extra training images (m, H, W, 3) uint8 drawn with the photos: each step's instance rows
    are drawn uniformly from the photos and these, and with `max_timestep` every row noised at a
    timestep at or above it is moved onto a photo (`photos_above`), so the copies are trained
    only below it (None: at every timestep). `masks` ((m, H, W), True on the subject) are needed
    with the masked loss (background_weight < 1). `recipe`, the knobs that made the copies, is
    written with the LoRA's dreambooth_config.json."""
    images: np.ndarray
    max_timestep: int | None = None
    masks: np.ndarray | None = None
    recipe: dict = field(default_factory=dict)


def _save_lora(bundle: ModelBundle, out_dir: Path, cfg: DreamBoothConfig, overwrite: bool,
               recipe: dict | None = None) -> None:
    from diffusers import StableDiffusionPipeline
    from peft.utils import get_peft_model_state_dict

    layers = get_peft_model_state_dict(bundle.unet, adapter_name=cfg.adapter_name)
    with atomic_folder(out_dir, overwrite, what="LoRA") as tmp:
        StableDiffusionPipeline.save_lora_weights(tmp, unet_lora_layers=layers,
                                                  safe_serialization=True)
        if bundle.identifier_embedding is not None:  # {identifier: (D,)}, textual-inversion style
            from safetensors.torch import save_file
            save_file({bundle.identifier: bundle.identifier_embedding[1].contiguous()},
                      str(tmp / IDENTIFIER_FILE))
        with open(tmp / "dreambooth_config.json", "w") as f:
            json.dump({**asdict(cfg), **(recipe or {})}, f, indent=1)


def dreambooth_lora(bundle: ModelBundle, images: np.ndarray, cfg: DreamBoothConfig | None = None,
                    out_dir: str | Path | None = None, overwrite: bool = False,
                    progress: bool = True, masks: np.ndarray | None = None,
                    copies: TrainingCopies | None = None) -> ModelBundle:
    """Fine-tune a LoRA on `images` (uint8, (n, H, W, 3) at the model's resolution) and attach
    it to `bundle` as its personalized model. Saves it to `out_dir` when given. `masks` ((n, H,
    W), True on the subject) are needed when `cfg.background_weight < 1`. `copies`: extra
    training images drawn with the photos (TrainingCopies)."""
    from peft import LoraConfig

    cfg = cfg or DreamBoothConfig()
    check_config(cfg)
    images = check_images(bundle, images)
    n_photos = len(images)  # the first rows; the copies follow them
    if copies is not None:
        images, masks = _with_copies(images, masks, copies, cfg)
    weights = _loss_weights(bundle, images, masks, cfg)
    if out_dir is not None:  # fail before training, not after
        refuse_existing(out_dir, overwrite, what="LoRA")
    fused = bundle.fuse_lora
    bundle.set_fuse_lora(False)  # training needs the LoRA unmerged: its gradients flow through it
    if bundle.personalization == "lora" and cfg.adapter_name in getattr(bundle.unet, "peft_config", {}):
        bundle.unet.delete_adapters(cfg.adapter_name)
        bundle._lora_layers = None
        bundle.personalization, bundle.mode = "none", "vanilla"
    bundle.set_identifier_embedding(None)  # a previous LoRA's learned identifier goes too
    g = torch.Generator().manual_seed(cfg.seed)
    torch.manual_seed(cfg.seed)

    with bundle.using("vanilla") if bundle.has_personal else _nullctx():
        z_inst = sampling.encode(bundle, images)  # (n + m, 4, h, w): the photos, the copies
        z_class, cond_class = None, None
        prompts = class_prompts(cfg)
        if prompts:  # prior preservation: class images from the frozen base model
            seeds = [10_000 + cfg.seed * 1000 + i for i in range(cfg.num_class_images)]
            prompts = [prompts[i % len(prompts)] for i in range(len(seeds))]
            z_class, _ = sampling.sample(bundle, prompts, seeds, steps=25)  # (n, 4, h, w)
            cond_class = sampling.encode_prompts(bundle, prompts)  # (n, L, D)
    cond_empty = sampling.encode_prompts(bundle, [""])
    init = _read_init_lora(bundle, cfg) if cfg.init_lora else None  # (LoRA tensors, identifier row)
    if init is not None and init[1] is not None and cfg.identifier_lr == 0:
        # the identifier stays as the init LoRA learned it: personalized mode writes its row
        bundle.set_identifier_embedding(*init[1])
    token = _identifier_row(bundle, cfg) if cfg.identifier_lr > 0 else None
    encode_instance = _instance_encoder(bundle, cfg, token)

    unet = bundle.unet
    unet.add_adapter(LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, init_lora_weights="gaussian",
                                target_modules=list(cfg.target_modules)), adapter_name=cfg.adapter_name)
    if init is not None:
        _load_init_lora(unet, init, cfg)
        if token is not None and init[1] is not None:  # the identifier goes on from its learned row
            with torch.no_grad():
                token.weight[token.id] = init[1][1].to(token.weight)
    bundle.personalization, bundle.adapter_name = "lora", cfg.adapter_name
    bundle._lora_layers = None  # a new adapter: the next switch walks the UNet again
    bundle._apply("personalized")
    params = [p for n, p in unet.named_parameters() if "lora" in n]
    for p in params:
        p.requires_grad_(True)
        p.data = p.data.float()
    groups = [{"params": params, "lr": cfg.lr}]
    if token is not None:
        groups.append({"params": [token.weight], "lr": cfg.identifier_lr, "weight_decay": 0.0})
    opt = torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=1e-4)
    unet.train()
    try:
        _train(cfg, bundle, opt, z_inst, weights, z_class, cond_class, cond_empty, encode_instance,
               g, progress, n_photos, copies.max_timestep if copies is not None else None)
    finally:
        unet.eval()
        for p in params:
            p.requires_grad_(False)
        if token is not None:
            token.hook.remove()
            token.weight.requires_grad_(False)
    if token is not None:
        _finish_identifier(bundle, token)
    if out_dir is not None:
        _save_lora(bundle, Path(out_dir), cfg, overwrite, copies.recipe if copies else None)
    bundle.set_fuse_lora(fused)
    return bundle


def _read_init_lora(bundle: ModelBundle, cfg: DreamBoothConfig):
    """(LoRA tensors keyed like the UNet's peft state dict, (token row, learned (D,)) or None) of
    `cfg.init_lora`, after checking that it fits `cfg` and this base model (ValueError if not)."""
    from .models import check_lora, load_state_dict, read_identifier_embedding

    folder = Path(cfg.init_lora)
    file = folder / "pytorch_lora_weights.safetensors" if folder.is_dir() else folder
    if not file.is_file():
        raise FileNotFoundError(f"init_lora={cfg.init_lora!r}: no LoRA weights at {file}; give a "
                                "folder that personalize.dreambooth_lora wrote")
    saved = file.parent / "dreambooth_config.json"
    if saved.is_file():
        old = json.loads(saved.read_text())
        for knob in ("rank", "target_modules"):
            mine = list(getattr(cfg, knob)) if knob == "target_modules" else getattr(cfg, knob)
            if old.get(knob) is not None and old[knob] != mine:
                raise ValueError(f"init_lora={cfg.init_lora!r} was trained with {knob}={old[knob]}, "
                                 f"this config has {knob}={mine}; set the same {knob} to go on "
                                 "from it")
    check_lora(bundle.unet, file)
    tensors = {k.removeprefix("unet."): v for k, v in load_state_dict(file).items()
               if k.startswith("unet.")}
    learned = read_identifier_embedding(bundle, file.parent)  # (row, (D,)) or None
    return tensors, learned


def _load_init_lora(unet, init, cfg: DreamBoothConfig) -> None:
    """Copy init_lora's matrices into the fresh adapter; every one must land on a LoRA layer."""
    from peft import set_peft_model_state_dict

    tensors, _ = init
    result = set_peft_model_state_dict(unet, tensors, adapter_name=cfg.adapter_name)
    unexpected = [k for k in getattr(result, "unexpected_keys", []) if "lora_" in k]
    if unexpected:
        raise ValueError(f"init_lora={cfg.init_lora!r} has LoRA layers this config does not "
                         f"train, e.g. {unexpected[:2]}; use its target_modules")
    loaded = {k for k, _ in unet.named_parameters() if cfg.adapter_name in k}
    if len(tensors) != len(loaded):
        raise ValueError(f"init_lora={cfg.init_lora!r} has {len(tensors)} LoRA matrices, this "
                         f"config's adapter {len(loaded)}; use its rank and target_modules")


def check_images(bundle: ModelBundle, images) -> np.ndarray:
    """`images` as an array, after checking that they are uint8 (n, H, W, 3) photos at the
    model's resolution (ValueError if not)."""
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
        raise ValueError(f"images must be uint8 of shape (n, H, W, 3), got {images.dtype} "
                         f"{images.shape}; use lr_tutorial.images.load_images to prepare files")
    if images.shape[1] != bundle.image_size or images.shape[2] != bundle.image_size:
        raise ValueError(f"images are {images.shape[1]}x{images.shape[2]} but the model works at "
                         f"{bundle.image_size}x{bundle.image_size}; resize them first")
    return images


def check_masks(images: np.ndarray, masks, knob: str, value) -> None:
    """Raise, naming `knob`, unless `masks` is (n, H, W) like the images."""
    if masks is None:
        raise ValueError(f"{knob}={value} needs the subject's masks, but no masks were given; "
                         "pass masks=(n, H, W) bool arrays (e.g. from a masks.Segmenter) or "
                         f"turn {knob} off")
    if np.asarray(masks).shape != images.shape[:3]:
        raise ValueError(f"masks must be (n, H, W) = {images.shape[:3]} like the images, got "
                         f"{np.asarray(masks).shape}")


def _with_copies(images: np.ndarray, masks, copies: TrainingCopies, cfg: DreamBoothConfig):
    """(photos + copies (n + m, H, W, 3), their masks or None) after checking the copies."""
    extra = np.asarray(copies.images)
    if extra.ndim != 4 or extra.shape[1:] != images.shape[1:] or extra.dtype != np.uint8:
        raise ValueError(f"copies.images must be uint8 of shape (m, *{images.shape[1:]}) like "
                         f"the photos, got {extra.dtype} {extra.shape}")
    if copies.max_timestep is not None and copies.max_timestep < 1:
        raise ValueError(f"copies.max_timestep must be None or a timestep >= 1, got "
                         f"{copies.max_timestep}")
    clash = sorted(set(copies.recipe) & set(asdict(cfg)))
    if clash:
        raise ValueError(f"copies.recipe names DreamBoothConfig fields {clash}; give the copies' "
                         "own knobs only")
    if cfg.background_weight == 1.0:
        return np.concatenate([images, extra]), None
    check_masks(images, masks, "background_weight", cfg.background_weight)
    if copies.masks is None:
        raise ValueError(f"background_weight={cfg.background_weight} needs the copies' masks, "
                         "but copies.masks is None; give them or use background_weight=1")
    check_masks(extra, copies.masks, "background_weight", cfg.background_weight)
    return np.concatenate([images, extra]), np.concatenate([np.asarray(masks), copies.masks])


def _loss_weights(bundle, images, masks, cfg) -> torch.Tensor | None:
    """Per-latent-pixel loss weights (n, 1, h, w) of the instance images: 1 on the subject,
    `background_weight` elsewhere (area-averaged to the latent grid); None for the plain loss."""
    if cfg.background_weight == 1.0:
        return None
    check_masks(images, masks, "background_weight", cfg.background_weight)
    masks = np.asarray(masks)
    m = torch.from_numpy(masks.astype(np.float32))[:, None]  # (n, 1, H, W)
    m = F.adaptive_avg_pool2d(m, bundle.latent_size)  # (n, 1, h, w): subject share per latent
    return (cfg.background_weight + (1 - cfg.background_weight) * m).to(bundle.device)


def _train(cfg, bundle, opt, z_inst, weights, z_class, cond_class, cond_empty, encode_instance, g,
           progress, n_photos, max_timestep=None):
    """The DreamBooth loop (module docstring): LoRA (and identifier) steps on noised latents.
    z_inst's first `n_photos` rows are the photos, the rest copies (TrainingCopies), trained only
    below `max_timestep` when it is given."""
    unet, sched = bundle.unet, bundle.scheduler
    bar = tqdm(range(cfg.steps), desc="dreambooth-lora", disable=not progress)
    for step in bar:
        scale = 0.5 * (1 + math.cos(math.pi * step / cfg.steps)) if cfg.lr_schedule == "cosine" else 1.0
        for group, lr in zip(opt.param_groups, (cfg.lr, cfg.identifier_lr)):
            group["lr"] = lr * scale
        idx = torch.randint(0, len(z_inst), (cfg.batch_size,), generator=g)
        z0, cond = z_inst[idx], encode_instance().expand(cfg.batch_size, -1, -1)
        if cfg.uncond_prob > 0:  # (B, 1, 1): True where the caption is dropped
            drop = (torch.rand(cfg.batch_size, generator=g) < cfg.uncond_prob).view(-1, 1, 1)
            cond = torch.where(drop.to(cond.device), cond_empty.expand_as(cond), cond)
        if z_class is not None:
            jdx = torch.randint(0, len(z_class), (cfg.batch_size,), generator=g)
            z0 = torch.cat([z0, z_class[jdx].to(z0)])
            cond = torch.cat([cond, cond_class[jdx]])
        noise = training_noise(z0.shape, g, cfg.offset_noise, cfg.pyramid_noise).to(z0)
        t = torch.randint(0, sched.config.num_train_timesteps, (len(z0),), generator=g).to(z0.device)
        if max_timestep is not None:  # at t >= max the instance rows are photos
            idx = photos_above(idx, t[:len(idx)].cpu(), n_photos, max_timestep)
            z0 = torch.cat([z_inst[idx], z0[len(idx):]])
        noisy = sched.add_noise(z0, noise, t)
        target = noise if sched.config.prediction_type == "epsilon" else sched.get_velocity(z0, noise, t)
        pred = unet(noisy, t, encoder_hidden_states=cond).sample
        se = F.mse_loss(pred.float(), target.float(), reduction="none")  # (B', C, h, w)
        per = se.mean(dim=(1, 2, 3))
        if weights is not None:  # masked loss on the instance rows, normalized by the weights
            w = weights[idx]  # (B, 1, h, w)
            per = torch.cat([(se[:cfg.batch_size] * w).mean(dim=(1, 2, 3)) / w.mean(dim=(1, 2, 3)),
                             per[cfg.batch_size:]])
        loss = per[:cfg.batch_size].mean()
        if z_class is not None:
            loss = loss + cfg.prior_weight * per[cfg.batch_size:].mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        bar.set_postfix(loss=f"{loss.item():.4f}")


def photos_above(idx: torch.Tensor, t: torch.Tensor, n_photos: int, max_timestep: int) -> torch.Tensor:
    """The training rows' image indices (B,) with every row whose timestep t (B,) is at or above
    `max_timestep` moved onto a photo (index mod `n_photos`; the photos are the first rows, the
    copies follow them), so the copies are trained only below it and the photos alone above it
    (TrainingCopies.max_timestep). Uniform over the photos when n_photos divides the number of
    images."""
    return torch.where(t >= max_timestep, idx % n_photos, idx)


def training_noise(shape, gen: torch.Generator, offset: float = 0.0,
                   pyramid: float = 0.0) -> torch.Tensor:
    """White noise + offset noise (one value per sample and channel) + pyramid noise (2x2, 4x4,
    8x8, bilinearly upsampled), drawn from `gen` in that order."""
    noise = torch.randn(shape, generator=gen)  # (B, C, h, w)
    if offset:
        noise = noise + offset * torch.randn((*shape[:2], 1, 1), generator=gen)
    if pyramid:
        for side in (2, 4, 8):
            low = torch.randn((*shape[:2], side, side), generator=gen)
            noise = noise + pyramid * F.interpolate(low, size=shape[-2:], mode="bilinear",
                                                    align_corners=False)
    return noise


@dataclass
class _TrainableIdentifier:
    """The text encoder's input-embedding matrix, trainable in the identifier's row only."""
    id: int
    weight: torch.nn.Parameter  # (vocab, D); a gradient hook zeroes every other row
    base: torch.Tensor  # (D,) the row before training, restored afterwards
    hook: object


def _identifier_row(bundle: ModelBundle, cfg: DreamBoothConfig) -> _TrainableIdentifier:
    ident = bundle.identifier
    if not ident or ident not in cfg.instance_prompt.split():
        raise ValueError(f"identifier_lr > 0 learns the identifier's embedding, but the instance "
                         f"prompt {cfg.instance_prompt!r} does not contain the bundle's identifier "
                         f"{ident!r}; write the prompt with it (e.g. 'a {ident or 'sks'} dog')")
    ids = bundle.tokenizer(ident, add_special_tokens=False).input_ids
    if len(ids) != 1:
        raise ValueError(f"the identifier {ident!r} is {len(ids)} tokens for this tokenizer; "
                         "learning its embedding needs a single-token identifier such as 'sks'")
    weight = bundle.text_encoder.get_input_embeddings().weight
    if weight.dtype != torch.float32:
        raise ValueError(f"the text encoder is in {weight.dtype}; load the models in float32 to "
                         "learn the identifier's embedding, or set identifier_lr=0")
    mask = torch.zeros_like(weight[:, :1])  # (vocab, 1)
    mask[ids[0]] = 1
    weight.requires_grad_(True)
    hook = weight.register_hook(lambda grad: grad * mask)
    return _TrainableIdentifier(ids[0], weight, weight[ids[0]].detach().clone(), hook)


def _finish_identifier(bundle: ModelBundle, token: _TrainableIdentifier) -> None:
    """Take the learned row out of the text encoder and give it to the bundle, which writes it
    in personalized mode and restores the base row in vanilla mode."""
    learned = token.weight[token.id].detach().clone()
    with torch.no_grad():
        token.weight[token.id] = token.base
    bundle.set_identifier_embedding(token.id, learned)


def _instance_encoder(bundle: ModelBundle, cfg: DreamBoothConfig, token):
    """() -> (1, L, D) instance-prompt embedding: fixed, or re-encoded each step (with grad)
    while the identifier's embedding learns."""
    if token is None:
        emb = bundle.identifier_embedding  # (row, (D,)) kept from init_lora, else None
        weight = bundle.text_encoder.get_input_embeddings().weight
        saved = weight[emb[0]].detach().clone() if emb else None
        try:
            if emb:
                with torch.no_grad():
                    weight[emb[0]] = emb[1].to(weight)
            fixed = sampling.encode_prompts(bundle, [cfg.instance_prompt])
        finally:
            if emb:
                with torch.no_grad():
                    weight[emb[0]] = saved
        return lambda: fixed
    ids = sampling.prompt_ids(bundle, [cfg.instance_prompt])
    return lambda: bundle.text_encoder(ids)[0].to(bundle.device, bundle.dtype)


def class_prompts(cfg: DreamBoothConfig) -> list[str]:
    """The prior-preservation prompts of `cfg` as a list ([] when prior preservation is off)."""
    if cfg.class_prompt is None:
        return []
    prompts = [cfg.class_prompt] if isinstance(cfg.class_prompt, str) else list(cfg.class_prompt)
    return [p for p in prompts if p]


def check_config(cfg: DreamBoothConfig) -> None:
    if cfg.class_prompt is not None and not isinstance(cfg.class_prompt, str) and not all(
            isinstance(p, str) and p for p in cfg.class_prompt):
        raise ValueError(f"class_prompt must be a prompt or a sequence of non-empty prompts, got "
                         f"{cfg.class_prompt!r}")
    if class_prompts(cfg) and cfg.num_class_images < len(class_prompts(cfg)):
        raise ValueError(f"num_class_images={cfg.num_class_images} is fewer than the "
                         f"{len(class_prompts(cfg))} class prompts; raise it so each gets an image")
    if cfg.lr_schedule not in ("constant", "cosine"):
        raise ValueError(f"lr_schedule must be 'constant' or 'cosine', got {cfg.lr_schedule!r}")
    if not 0 <= cfg.uncond_prob < 1:
        raise ValueError(f"uncond_prob is a probability in [0, 1), got {cfg.uncond_prob}")
    if not 0 <= cfg.background_weight <= 1:
        raise ValueError(f"background_weight is a loss weight in [0, 1], got {cfg.background_weight}")
    if cfg.identifier_lr < 0 or cfg.lr <= 0 or cfg.steps < 1 or cfg.rank < 1:
        raise ValueError(f"need lr > 0, identifier_lr >= 0, steps >= 1, rank >= 1; got lr={cfg.lr}, "
                         f"identifier_lr={cfg.identifier_lr}, steps={cfg.steps}, rank={cfg.rank}")


class _nullctx:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False
