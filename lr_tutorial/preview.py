"""Fast latent -> RGB previews: a linear map fitted once per VAE, instead of a decode per frame.

    rgb ~ W z + b        (per latent pixel; W: 3 x C, fitted by least squares)

The map is fitted on the VAE's own decodes of a few latents (our generated or encoded images),
so it works for any AutoencoderKL, SD's or the toy's. It is what a scrubber needs: a frame in
microseconds, where a VAE decode at 512 px costs tens of milliseconds on a GPU.
"""
from __future__ import annotations

import numpy as np
import torch

_CACHE: dict[int, tuple[np.ndarray, np.ndarray]] = {}


@torch.no_grad()
def fit_linear_preview(bundle, latents: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Fit (W (C, 3), b (3,)) mapping latent pixels to the decoded image's pixels, area-
    downsampled to the latent grid. latents: (B, C, h, w) scaled latents of real images."""
    from .masks import resize
    from .sampling import decode

    imgs = decode(bundle, latents).astype(np.float32) / 255  # (B, H, W, 3)
    h = latents.shape[-1]
    small = np.stack([np.stack([resize(im[..., c], h) for c in range(3)], -1) for im in imgs])
    x = latents.float().cpu().permute(0, 2, 3, 1).reshape(-1, latents.shape[1]).numpy()
    y = small.reshape(-1, 3)
    xa = np.concatenate([x, np.ones((len(x), 1), np.float32)], 1)
    sol, *_ = np.linalg.lstsq(xa, y, rcond=None)
    return sol[:-1], sol[-1]


def linear_preview(bundle, z: torch.Tensor, fit_latents: torch.Tensor | None = None,
                   upscale: int = 1) -> np.ndarray:
    """uint8 previews (B, h*upscale, w*upscale, 3) of latents z (B, C, h, w)."""
    key = id(bundle.vae)
    if key not in _CACHE:
        if fit_latents is None:
            raise ValueError("the first preview for a VAE needs fit_latents (a few clean latents)")
        _CACHE[key] = fit_linear_preview(bundle, fit_latents)
    w, b = _CACHE[key]
    rgb = z.float().cpu().permute(0, 2, 3, 1).numpy() @ w + b
    rgb = (np.clip(rgb, 0, 1) * 255).round().astype(np.uint8)
    if upscale > 1:
        rgb = rgb.repeat(upscale, 1).repeat(upscale, 2)
    return rgb
