"""Shared pieces of the benchmarks: the checkout on sys.path, UNet row counting, interleaved
timing, peak memory, and Stable Diffusion 1.5's architecture with random weights.

Run the benchmarks from the repository root (`python bench/pipeline.py`); this module puts the
checkout first on sys.path, so the lr_tutorial next to bench/ is measured (not another install).
"""
from __future__ import annotations

import functools
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402


def machine() -> str:
    """One line: CPU model and count (or GPU), threads, torch version."""
    cpu = platform.processor() or platform.machine()
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        info = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
        cpu = f"{info.get('Model name', cpu).strip()}, {info.get('CPU(s)', '?').strip()} CPUs"
    except (OSError, ValueError):
        pass
    gpu = f", GPU {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    return (f"{cpu}{gpu}; torch {torch.__version__}, {torch.get_num_threads()} threads, "
            f"load average {os.getloadavg()[0]:.2f} at start")


class UNetCounter:
    """Counts UNet forward calls and batch rows (forward pre-hook, public torch API) on every
    UNet of a bundle (the vanilla one and a DreamBooth UNet, if any)."""

    def __init__(self, *unets):
        self.calls = self.rows = 0
        self.handles = [u.register_forward_pre_hook(self.hook) for u in unets if u is not None]

    def hook(self, module, args):
        self.calls += 1
        self.rows += int(args[0].shape[0])

    def reset(self):
        self.calls = self.rows = 0


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


class Phases:
    """Wall time and UNet rows spent inside named functions, outermost call only (a function
    called from inside another timed one counts for the outer). Wraps module attributes."""

    def __init__(self, counter: UNetCounter):
        self.counter = counter
        self.depth = 0
        self.time: dict[str, float] = {}
        self.rows: dict[str, int] = {}

    def reset(self):
        self.time, self.rows = {}, {}

    def wrap(self, module, name: str, label: str):
        fn = getattr(module, name)

        @functools.wraps(fn)
        def timed(*args, **kwargs):
            if self.depth:
                return fn(*args, **kwargs)
            self.depth += 1
            sync()
            t0, r0 = time.perf_counter(), self.counter.rows
            try:
                return fn(*args, **kwargs)
            finally:
                sync()
                self.time[label] = self.time.get(label, 0.0) + time.perf_counter() - t0
                self.rows[label] = self.rows.get(label, 0) + self.counter.rows - r0
                self.depth -= 1
        setattr(module, name, timed)


def timed(fn, counter: UNetCounter) -> tuple[float, int]:
    """(seconds, UNet rows) of one call of fn()."""
    counter.reset()
    sync()
    t0 = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - t0, counter.rows


def median(xs):
    return statistics.median(xs) if xs else float("nan")


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss_bytes() -> int:
    """Peak RSS since the last reset_peak_rss() (VmHWM), else since the process started."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0: write 5 to /proc/self/clear_refs)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def exact_malloc_env() -> None:
    """Re-exec once with glibc's mmap threshold fixed at 128 KiB, so freed tensors go back to
    the OS and RSS follows live allocations (by default glibc raises the threshold after the
    first frees and keeps large blocks, which hides later peaks)."""
    if os.environ.get("MALLOC_MMAP_THRESHOLD_") is None and sys.platform.startswith("linux"):
        env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072")
        os.execve(sys.executable, [sys.executable, *sys.argv], env)


# ----------------------------------------------------------------------------- SD 1.5, random
# runwayml/stable-diffusion-v1-5 unet/config.json, written out (the hub is not reachable):
# 860M parameters; attention at 64, 32, 16 (two transformer blocks per down block, three per
# up block) and 8 (mid block); 8 heads; text tokens 77 x 768 (CLIP ViT-L/14).
SD15_UNET_CONFIG = dict(
    sample_size=64, in_channels=4, out_channels=4, center_input_sample=False,
    flip_sin_to_cos=True, freq_shift=0,
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, downsample_padding=1,
    mid_block_scale_factor=1, act_fn="silu", norm_num_groups=32, norm_eps=1e-5,
    cross_attention_dim=768, attention_head_dim=8,
)
SD15_TEXT_LENGTH = 77


def sd15_unet(latent: int = 64):
    """Stable Diffusion 1.5's UNet (random weights, seed 0) for `latent` x `latent` latents."""
    from diffusers import UNet2DConditionModel
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**dict(SD15_UNET_CONFIG, sample_size=latent))
    return unet.eval().requires_grad_(False)


def sd15_random(latent: int, device: str, dtype, lora_rank: int = 4, text_layers: int = 12):
    """Stable Diffusion 1.5's UNet and VAE configs with random weights, SD's DDIM schedule,
    CLIP ViT-L's text-encoder shape (random) with the tests' tiny tokenizer, and a random LoRA
    (rank `lora_rank` on to_q/k/v/out, diffusers' DreamBooth-LoRA targets) so that "personalized"
    switches an adapter as a real LoRA does. No download."""
    import tempfile

    from diffusers import AutoencoderKL, DDIMScheduler
    from transformers import CLIPTextConfig, CLIPTextModel

    from lr_tutorial.models import ModelBundle
    sys.path.insert(0, str(ROOT / "tests"))
    from tiny_sd import tiny_tokenizer

    unet = sd15_unet(latent)
    vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), layers_per_block=2,
                        down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=4,
                        sample_size=latent * 8, scaling_factor=0.18215)
    tok = tiny_tokenizer(Path(tempfile.mkdtemp()))
    te = CLIPTextModel(CLIPTextConfig(vocab_size=len(tok), hidden_size=768, intermediate_size=3072,
                                      num_hidden_layers=text_layers, num_attention_heads=12,
                                      max_position_embeddings=77))
    sched = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                          clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    personalization = "none"
    if lora_rank:
        from peft import LoraConfig
        unet.add_adapter(LoraConfig(r=lora_rank, lora_alpha=lora_rank, init_lora_weights="gaussian",
                                    target_modules=["to_q", "to_k", "to_v", "to_out.0"]),
                         adapter_name="personal")
        personalization = "lora"
    for m in (unet, vae, te):
        m.requires_grad_(False)
    b = ModelBundle(tok, te.eval(), vae.eval(), unet.eval(), sched, backend="sd",
                    identifier="sks", class_noun="dog", personalization=personalization)
    return b.to(device, dtype)


def small_workload(backend: str, device: str, dtype, latent: int, images: int):
    """(bundle, prompts, seeds, reference) for the per-step counters (ops.py, syncs.py): the toy
    models with their own reference photos, or sd15_random with a random reference image;
    `images` prompts cycled over two, seeds 0..images-1."""
    import numpy as np

    from lr_tutorial import load_models
    if backend == "toy":
        bundle, ref = load_models("toy", device=device), None
        prompts = ["a sks star on the left in the snow", "a sks star at night"]
    else:
        bundle = sd15_random(latent, device, dtype)
        prompts = ["a sks dog on the beach", "a photo of a sks dog"]
        ref = (np.random.default_rng(0).random((1, latent * 8, latent * 8, 3)) * 255
               ).astype(np.uint8)
    return bundle, [prompts[i % len(prompts)] for i in range(images)], list(range(images)), ref
