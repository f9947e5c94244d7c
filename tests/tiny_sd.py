"""Tiny random-weight Stable Diffusion checkpoints for tests (the diffusers test-suite pattern).

    make_tiny_sd(folder)                                   # SD-1.5 layout, epsilon prediction
    make_tiny_sd(folder, v_prediction=True, linear_projection=True)   # SD-2 style variant
    make_tiny_lora(unet, out_dir)                          # diffusers-format LoRA for a UNet

The UNet keeps Stable Diffusion 1.5's block structure and module names (3 x CrossAttnDownBlock2D +
DownBlock2D, UNetMidBlock2DCrossAttn, UpBlock2D + 3 x CrossAttnUpBlock2D, 2 layers per block), so
code that addresses attention layers by name (e.g. "up_blocks.1.attentions.0") works on it; only the
widths are tiny. Latents are 4 x 8 x 8 and the VAE downsamples by 8, so images are 64 x 64.
Everything runs on a CPU in well under a second per call.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

CROSS_DIM = 32  # text-encoder hidden size = UNet cross_attention_dim
LATENT_SIZE = 8
IMAGE_SIZE = 64
# Whole-word tokens (any other lowercase word falls back to single characters).
WORDS = ("a", "an", "the", "of", "on", "in", "photo", "sks", "dog", "cat", "beach", "star",
         "red", "blue", "and", "with", "picture", "painting", "style")


def tiny_unet_config(linear_projection: bool = False, **overrides) -> dict:
    """UNet2DConditionModel kwargs: SD-1.5 structure, tiny widths. SD-2 style with
    `linear_projection=True` (use_linear_projection, per-block attention_head_dim tuple)."""
    cfg = dict(
        sample_size=LATENT_SIZE, in_channels=4, out_channels=4, layers_per_block=2,
        block_out_channels=(8, 8, 16, 16), norm_num_groups=4, cross_attention_dim=CROSS_DIM,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        attention_head_dim=2,  # (legacy diffusers name: the number of heads, as in SD-1.5's 8)
    )
    if linear_projection:
        cfg.update(use_linear_projection=True, attention_head_dim=(2, 2, 4, 4))
    cfg.update(overrides)
    return cfg


def tiny_unet(seed: int = 0, linear_projection: bool = False, **overrides):
    from diffusers import UNet2DConditionModel
    torch.manual_seed(seed)
    return UNet2DConditionModel(**tiny_unet_config(linear_projection, **overrides)).eval()


def tiny_tokenizer(folder: Path):
    """A CLIPTokenizer over a tiny vocabulary: the special tokens, single characters (with and
    without the end-of-word marker) and the whole words in WORDS (built by left-to-right merges)."""
    from transformers import CLIPTokenizer

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab: dict[str, int] = {}

    def add(tok: str) -> None:
        vocab.setdefault(tok, len(vocab))

    for tok in ("<|startoftext|>", "<|endoftext|>"):
        add(tok)
    for ch in "abcdefghijklmnopqrstuvwxyz0123456789,.!-'":
        add(ch)
        add(ch + "</w>")
    merges: list[str] = []
    for word in WORDS:
        parts = list(word[:-1]) + [word[-1] + "</w>"]
        while len(parts) > 1:  # merge the first two symbols until one token is left
            merge = f"{parts[0]} {parts[1]}"
            if merge not in merges:
                merges.append(merge)
            parts = [parts[0] + parts[1]] + parts[2:]
            add(parts[0])
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    return CLIPTokenizer.from_pretrained(str(folder), model_max_length=77)


def make_tiny_sd(folder, v_prediction: bool = False, linear_projection: bool = False,
                 seed: int = 0) -> Path:
    """Save a tiny random Stable Diffusion pipeline (diffusers layout) into `folder`; returns it."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline
    from transformers import CLIPTextConfig, CLIPTextModel

    folder = Path(folder)
    tokenizer = tiny_tokenizer(folder / "_tokenizer_src")
    unet = tiny_unet(seed, linear_projection)
    torch.manual_seed(seed + 1)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1,
        block_out_channels=(8, 8, 8, 8), norm_num_groups=4, sample_size=IMAGE_SIZE,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
    torch.manual_seed(seed + 2)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=CROSS_DIM, intermediate_size=37,
        num_attention_heads=4, num_hidden_layers=2, max_position_embeddings=77,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id)).eval()
    # Stable Diffusion 1.5's scheduler settings.
    scheduler = DDIMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
        set_alpha_to_one=False, steps_offset=1,
        prediction_type="v_prediction" if v_prediction else "epsilon")
    StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    ).save_pretrained(folder)
    return folder


def make_tiny_lora(unet, out_dir, seed: int = 0, rank: int = 4) -> Path:
    """Add a random (non-zero) LoRA to `unet`'s attention projections and save it in diffusers
    format (out_dir/pytorch_lora_weights.safetensors). The adapter is removed from `unet` again."""
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    torch.manual_seed(seed)
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights=False,
                                target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    StableDiffusionPipeline.save_lora_weights(
        str(out_dir), unet_lora_layers=get_peft_model_state_dict(unet), safe_serialization=True)
    unet.delete_adapters("default")
    return Path(out_dir)
