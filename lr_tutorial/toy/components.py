"""The toy backend's components: Stable Diffusion's architecture at ShapeWorld's size.

Every component is the real library class, built from a config:
- tokenizer: a word-level `PreTrainedTokenizerFast` (so `pipe.tokenizer(...)` works);
- text encoder: transformers `CLIPTextModel`;
- VAE: diffusers `AutoencoderKL`, 64x64x3 -> 16x16x4 latents (downsampling factor 4);
- UNet: diffusers `UNet2DConditionModel` with SD 1.x's block types (three cross-attention
  down blocks, a plain one; mirrored up blocks): self- and cross-attention transformer blocks at
  the 16, 8 and 4 latent resolutions, so module paths read exactly as in SD 1.5
  (`up_blocks.1.attentions.0.transformer_blocks.0.attn1` and so on);
- scheduler: diffusers `DDIMScheduler` with SD 1.x's noise schedule.
"""
from __future__ import annotations

from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import CLIPTextConfig, CLIPTextModel, PreTrainedTokenizerFast

from . import world

BOS, EOS, UNK = "<|startoftext|>", "<|endoftext|>", "<|unk|>"
MAX_LENGTH = 16  # longest caption is 13 tokens with BOS and EOS

TEXT_CONFIG = dict(
    hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
    max_position_embeddings=MAX_LENGTH, projection_dim=64, hidden_act="quick_gelu",
)
VAE_CONFIG = dict(
    in_channels=3, out_channels=3, latent_channels=4, sample_size=world.SIZE,
    down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
    block_out_channels=(32, 64, 64), layers_per_block=1, norm_num_groups=16,
    scaling_factor=1.0,  # replaced by 1/std of the training latents after VAE training
)
UNET_CONFIG = dict(  # SD 1.x's block layout: attention at 16, 8, 4; none at 2
    sample_size=world.SIZE // 4, in_channels=4, out_channels=4,
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    block_out_channels=(32, 64, 64, 64), layers_per_block=1, norm_num_groups=16,
    cross_attention_dim=TEXT_CONFIG["hidden_size"], attention_head_dim=4,
)
SCHEDULER_CONFIG = dict(  # Stable Diffusion 1.x's schedule
    num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
    clip_sample=False, set_alpha_to_one=False, steps_offset=1, prediction_type="epsilon",
)


def build_tokenizer() -> PreTrainedTokenizerFast:
    """Word-level tokenizer over ShapeWorld's vocabulary; BOS/EOS added like CLIP's."""
    vocab = {tok: i for i, tok in enumerate([BOS, EOS, UNK, *world.vocabulary()])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A {EOS}", special_tokens=[(BOS, vocab[BOS]), (EOS, vocab[EOS])])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, unk_token=UNK, pad_token=EOS,
        model_max_length=MAX_LENGTH, do_lower_case=True)


def build_text_encoder(tokenizer: PreTrainedTokenizerFast) -> CLIPTextModel:
    cfg = CLIPTextConfig(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                         **TEXT_CONFIG)
    return CLIPTextModel(cfg)


def build_vae():
    from diffusers import AutoencoderKL
    return AutoencoderKL(**VAE_CONFIG)


def build_unet(**overrides):
    from diffusers import UNet2DConditionModel
    return UNet2DConditionModel(**{**UNET_CONFIG, **overrides})


def build_scheduler():
    from diffusers import DDIMScheduler
    return DDIMScheduler(**SCHEDULER_CONFIG)
