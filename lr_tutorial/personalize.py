"""DreamBooth personalization with LoRA (peft) on the UNet: the toy backend on a CPU, Stable
Diffusion on a GPU, same function.

    z = E(x_ref) * s,  t ~ U{0..T-1},  z_t = sqrt(a_t) z + sqrt(1 - a_t) eps
    L = || eps - eps*(z_t, t, "a sks <class>") ||^2  (+ prior_weight * the same on class images)

Only the LoRA matrices train; the base UNet, VAE and text encoder stay frozen. The result is
saved in diffusers' LoRA format (pytorch_lora_weights.safetensors), which `load_models(...,
personalized=DIR)` and any diffusers pipeline's `load_lora_weights` read.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from . import sampling
from .files import atomic_folder, refuse_existing
from .models import ModelBundle


@dataclass
class DreamBoothConfig:
    """Knobs of DreamBooth-LoRA fine-tuning (Ruiz et al. 2023; diffusers' train_dreambooth_lora).
    Defaults are the ones that produced the shipped toy LoRA (data/toy/README.md)."""
    instance_prompt: str = "a sks star"
    class_prompt: str | None = None  # e.g. "a star": enables prior preservation
    prior_weight: float = 1.0
    num_class_images: int = 32
    rank: int = 8
    alpha: float = 8.0
    target_modules: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0")
    steps: int = 400
    batch_size: int = 4
    lr: float = 1e-3
    seed: int = 0
    adapter_name: str = "personal"
    extra: dict = field(default_factory=dict)


def _save_lora(bundle: ModelBundle, out_dir: Path, cfg: DreamBoothConfig, overwrite: bool) -> None:
    from diffusers import StableDiffusionPipeline
    from peft.utils import get_peft_model_state_dict

    layers = get_peft_model_state_dict(bundle.unet, adapter_name=cfg.adapter_name)
    with atomic_folder(out_dir, overwrite, what="LoRA") as tmp:
        StableDiffusionPipeline.save_lora_weights(tmp, unet_lora_layers=layers,
                                                  safe_serialization=True)
        with open(tmp / "dreambooth_config.json", "w") as f:
            json.dump(asdict(cfg), f, indent=1)


def dreambooth_lora(bundle: ModelBundle, images: np.ndarray, cfg: DreamBoothConfig | None = None,
                    out_dir: str | Path | None = None, overwrite: bool = False,
                    progress: bool = True) -> ModelBundle:
    """Fine-tune a LoRA on `images` (uint8, (n, H, W, 3) at the model's resolution) and attach
    it to `bundle` as its personalized model. Saves it to `out_dir` when given."""
    from peft import LoraConfig

    cfg = cfg or DreamBoothConfig()
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
        raise ValueError(f"images must be uint8 of shape (n, H, W, 3), got {images.dtype} "
                         f"{images.shape}; use lr_tutorial.images.load_images to prepare files")
    if images.shape[1] != bundle.image_size or images.shape[2] != bundle.image_size:
        raise ValueError(f"images are {images.shape[1]}x{images.shape[2]} but the model works at "
                         f"{bundle.image_size}x{bundle.image_size}; resize them first")
    if out_dir is not None:  # fail before training, not after
        refuse_existing(out_dir, overwrite, what="LoRA")
    if bundle.personalization == "lora" and cfg.adapter_name in getattr(bundle.unet, "peft_config", {}):
        bundle.unet.delete_adapters(cfg.adapter_name)
    g = torch.Generator().manual_seed(cfg.seed)
    torch.manual_seed(cfg.seed)

    with bundle.using("vanilla") if bundle.has_personal else _nullctx():
        z_inst = sampling.encode(bundle, images)  # (n, 4, h, w)
        z_class, cond_class = None, None
        if cfg.class_prompt:  # prior preservation: class images from the frozen base model
            seeds = [10_000 + cfg.seed * 1000 + i for i in range(cfg.num_class_images)]
            z_class, _ = sampling.sample(bundle, [cfg.class_prompt] * len(seeds), seeds, steps=25)
            cond_class = sampling.encode_prompts(bundle, [cfg.class_prompt])
    cond_inst = sampling.encode_prompts(bundle, [cfg.instance_prompt])

    unet = bundle.unet
    unet.add_adapter(LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, init_lora_weights="gaussian",
                                target_modules=list(cfg.target_modules)), adapter_name=cfg.adapter_name)
    bundle.personalization, bundle.adapter_name = "lora", cfg.adapter_name
    bundle._apply("personalized")
    params = [p for n, p in unet.named_parameters() if "lora" in n]
    for p in params:
        p.requires_grad_(True)
        p.data = p.data.float()
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=1e-4)
    sched = bundle.scheduler
    unet.train()
    bar = tqdm(range(cfg.steps), desc="dreambooth-lora", disable=not progress)
    for step in bar:
        idx = torch.randint(0, len(z_inst), (cfg.batch_size,), generator=g)
        z0, cond = z_inst[idx], cond_inst.expand(cfg.batch_size, -1, -1)
        if z_class is not None:
            jdx = torch.randint(0, len(z_class), (cfg.batch_size,), generator=g)
            z0 = torch.cat([z0, z_class[jdx].to(z0)])
            cond = torch.cat([cond, cond_class.expand(cfg.batch_size, -1, -1)])
        noise = torch.randn(z0.shape, generator=g).to(z0)
        t = torch.randint(0, sched.config.num_train_timesteps, (len(z0),), generator=g).to(z0.device)
        target = noise if sched.config.prediction_type == "epsilon" else sched.get_velocity(z0, noise, t)
        pred = unet(sched.add_noise(z0, noise, t), t, encoder_hidden_states=cond).sample
        per = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
        loss = per[:cfg.batch_size].mean()
        if z_class is not None:
            loss = loss + cfg.prior_weight * per[cfg.batch_size:].mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        bar.set_postfix(loss=f"{loss.item():.4f}")
    unet.eval()
    for p in params:
        p.requires_grad_(False)
    if out_dir is not None:
        _save_lora(bundle, Path(out_dir), cfg, overwrite)
    return bundle


class _nullctx:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False
