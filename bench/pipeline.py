"""Per-image cost of Layout-and-Retouch against plain personalized sampling, from one run.

    python bench/pipeline.py --backend toy            # the shipped toy models, CPU
    python bench/pipeline.py --backend sd15-random    # SD 1.5's real UNet/VAE architecture,
                                                      # random weights (no download needed)

For a batch of prompts x seeds sharing one reference, it times (a) plain personalized sampling,
(b) stage 1 only, (c) the full method (reference inversion included, amortized over the batch),
all with the same steps and guidance, and counts UNet evaluations (rows through the UNet).
Prints each ratio to (a). Timings are wall-clock on whatever machine runs it: say which.
"""
from __future__ import annotations

import argparse
import platform
import time

import numpy as np
import torch


class UNetCounter:
    """Counts UNet forward calls and batch rows through a forward pre-hook (public torch API)."""

    def __init__(self, unet):
        self.calls = self.rows = 0
        self.handle = unet.register_forward_pre_hook(self.hook)

    def hook(self, module, args):
        self.calls += 1
        self.rows += int(args[0].shape[0])

    def reset(self):
        self.calls = self.rows = 0


def sd15_random(latent: int, device: str, dtype):
    """Stable Diffusion 1.5's UNet and VAE configs with random weights; a tiny text encoder."""
    import sys
    import tempfile
    from pathlib import Path

    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from lr_tutorial.models import ModelBundle
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from tiny_sd import tiny_tokenizer

    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=latent, cross_attention_dim=768)  # SD 1.5 defaults
    vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), layers_per_block=2,
                        down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=4,
                        sample_size=latent * 8)
    tok = tiny_tokenizer(Path(tempfile.mkdtemp()))
    te = CLIPTextModel(CLIPTextConfig(vocab_size=len(tok), hidden_size=768, intermediate_size=3072,
                                      num_hidden_layers=12, num_attention_heads=12,
                                      max_position_embeddings=77))
    sched = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                          clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    b = ModelBundle(tok, te.eval(), vae.eval(), unet.eval(), sched, backend="sd",
                    identifier="sks", class_noun="dog")
    return b.to(device, dtype)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--backend", choices=("toy", "sd15-random"), default="toy")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--images", type=int, default=8, help="prompts x seeds sharing a reference")
    ap.add_argument("--latent", type=int, default=16, help="sd15-random: latent side (64 = 512 px)")
    ap.add_argument("--guidance", type=float, default=7.5)
    a = ap.parse_args()

    from lr_tutorial import load_models, sampling
    from lr_tutorial.layout import LayoutConfig, step_blended
    from lr_tutorial.pipeline import LayoutAndRetouch, LRConfig

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if a.backend == "toy":
        bundle = load_models("toy", device=device)
        prompts = ["a sks star on the left in the snow", "a sks star at the top at night",
                   "a small sks star on the right on the beach", "a sks star at the bottom"]
        ref = None
    else:
        bundle = sd15_random(a.latent, device, torch.float16 if device == "cuda" else torch.float32)
        prompts = ["a sks dog on the beach", "a photo of a sks dog", "a sks dog in the snow",
                   "a red sks dog"]
        ref = (np.random.default_rng(0).random((1, a.latent * 8, a.latent * 8, 3)) * 255).astype(np.uint8)
    prompts = [prompts[i % len(prompts)] for i in range(a.images)]
    seeds = list(range(a.images))
    counter = UNetCounter(bundle.unet)
    cfg = LRConfig(layout=LayoutConfig(steps=a.steps, guidance=a.guidance))

    def timed(fn):
        counter.reset()
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        return (time.perf_counter() - t0) / a.images, counter.rows / a.images

    def plain():
        with bundle.using("personalized" if bundle.has_personal else "vanilla"):
            z, _ = sampling.sample(bundle, prompts, seeds, steps=a.steps, guidance=a.guidance)
            sampling.decode(bundle, z)

    def stage1():
        step_blended(bundle, prompts, seeds, cfg.layout)

    def full():
        LayoutAndRetouch(bundle, cfg)(prompts, ref, seed=seeds)

    plain()  # warm-up
    rows = {name: timed(fn) for name, fn in
            (("plain personalized", plain), ("stage 1 only", stage1), ("Layout-and-Retouch", full))}
    base_t, base_r = rows["plain personalized"]
    print(f"# {a.backend}, {a.images} images sharing one reference, {a.steps} steps, "
          f"CFG {a.guidance}, device {device} ({platform.processor() or platform.machine()}, "
          f"{torch.get_num_threads()} threads), torch {torch.__version__}")
    print(f"{'method':<22}{'s/image':>10}{'UNet rows/image':>18}{'time ratio':>12}{'UNet ratio':>12}")
    for name, (t, r) in rows.items():
        print(f"{name:<22}{t:>10.3f}{r:>18.1f}{t / base_t:>12.2f}{r / base_r:>12.2f}")


if __name__ == "__main__":
    main()
