"""Adaptive mask blending: the subject's foreground mask from cross-attention and a segmenter.

docs/method.md "Adaptive mask blending" [paper: components; ours: the exact recipe]:
1. A = cross-attention map of the class token, min-max normalized          (attention_mask)
2. S = segmenter mask of the image, prompted from A (box, peak points,     (segmenter_prompts,
   background points)                                                        Segmenter.predict)
3. B = (A >= tau_lo) & S        keep only attention support SAM agrees with (fuse)
   M = clip(1/2 + sdt(B) / 2w)  feather with the signed distance transform
   M = max(M, A >= tau_hi)      add back confident attention SAM missed
4. latent blending z^t <- M z^t + (1 - M) z^c for k < lambda3               (retouch.py)

Segmenters share SAM's predictor interface: `set_image(uint8 HxWx3)`, then
`predict(point_coords, point_labels, box, multimask_output) -> (masks (K, H, W) bool, scores (K,),
logits)`. `SamSegmenter` wraps segment_anything.SamPredictor; `ShapeWorldSegmenter` is the toy
backend's stand-in with the same interface.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from .config import SOURCES, MaskConfig  # noqa: F401  (re-exported: masks.MaskConfig)

def normalize(a: torch.Tensor | np.ndarray) -> np.ndarray:
    """Min-max normalize each map of a (B, h, w) or (h, w) array to [0, 1] (normalize_maps,
    on the host)."""
    a = np.asarray(a, dtype=np.float32)
    flat = a.reshape(a.shape[0] if a.ndim == 3 else 1, -1)
    return normalize_maps(torch.from_numpy(np.ascontiguousarray(flat))).numpy().reshape(a.shape)


def resize(mask: np.ndarray, size: int) -> np.ndarray:
    """Resize (h, w) or (B, h, w) float/bool maps to size x size (area when shrinking)."""
    t = torch.as_tensor(np.asarray(mask, np.float32))
    squeeze = t.ndim == 2
    t = t[None, None] if squeeze else t[:, None]
    mode = "area" if size < t.shape[-1] else "bilinear"
    out = F.interpolate(t, size=(size, size), mode=mode, **({} if mode == "area" else {"align_corners": False}))
    out = out[0, 0] if squeeze else out[:, 0]
    return out.numpy()


# ----------------------------------------------------------------------------- segmenters
class Segmenter(Protocol):
    def set_image(self, image: np.ndarray) -> None: ...

    def predict(self, point_coords=None, point_labels=None, box=None,
                multimask_output: bool = False): ...


def segmenter_prompts(attn: np.ndarray, image_size: int, cfg: MaskConfig):
    """SAM prompts from a normalized attention map (h, w): positive points at the peaks,
    negative points in confident background, and the box of the support, in image pixels."""
    h = attn.shape[0]
    scale = image_size / h
    order = np.argsort(attn.ravel())
    pos = order[::-1][: cfg.n_positive]
    neg = order[: cfg.n_negative]
    pts = np.array([[(i % h + 0.5) * scale, (i // h + 0.5) * scale] for i in (*pos, *neg)],
                   dtype=np.float32)  # (x, y)
    labels = np.array([1] * len(pos) + [0] * len(neg))
    ys, xs = np.nonzero(attn >= cfg.tau_lo)
    box = np.array([xs.min() * scale, ys.min() * scale, (xs.max() + 1) * scale,
                    (ys.max() + 1) * scale], dtype=np.float32)
    return pts, labels, box


class ShapeWorldSegmenter:
    """The toy backend's segmenter, with SAM's predictor interface: the object is the region
    that differs from the background colour (the oracle's segmentation), restricted to the
    connected component holding the positive points (or, failing that, the largest in the box)."""

    def set_image(self, image: np.ndarray) -> None:
        from .toy import oracle
        img = oracle._as_array(image)
        _, bg = oracle._classify_background(img)
        diff = np.linalg.norm(img - bg, axis=-1) > oracle.FG_THRESHOLD
        self._labels, self._n = ndimage.label(diff)
        self._shape = diff.shape

    def predict(self, point_coords=None, point_labels=None, box=None, multimask_output=False):
        labels = self._labels
        keep = set()
        if point_coords is not None:
            for (x, y), lab in zip(np.asarray(point_coords), np.asarray(point_labels)):
                v = labels[min(int(y), labels.shape[0] - 1), min(int(x), labels.shape[1] - 1)]
                if lab == 1 and v > 0:
                    keep.add(int(v))
        if not keep and self._n > 0:
            region = np.ones(self._shape, bool)
            if box is not None:
                x0, y0, x1, y1 = (int(round(c)) for c in box)
                region = np.zeros(self._shape, bool)
                region[max(y0, 0):y1, max(x0, 0):x1] = True
            sizes = ndimage.sum(region, labels, range(1, self._n + 1))
            if sizes.max() > 0:
                keep.add(1 + int(np.argmax(sizes)))
        mask = ndimage.binary_fill_holes(np.isin(labels, list(keep))) if keep else np.zeros(self._shape, bool)
        return mask[None], np.array([1.0 if keep else 0.0], np.float32), None


class SamSegmenter:
    """segment_anything.SamPredictor behind the Segmenter interface.

    Build from a checkpoint file (`.pth` from the SAM release; loaded with
    torch.load(weights_only=True), so no code from the file runs) or from a `Sam` model.
    """

    def __init__(self, checkpoint: str | Path | None = None, model_type: str = "vit_b",
                 device: str = "cpu", sam=None):
        from segment_anything import SamPredictor, sam_model_registry

        if sam is None:
            if checkpoint is None:
                raise ValueError("give a SAM checkpoint path (e.g. sam_vit_b_01ec64.pth) or sam=")
            path = Path(checkpoint)
            if not path.is_file():
                raise FileNotFoundError(
                    f"SAM checkpoint {path} not found. Download it on a machine with internet "
                    f"(github.com/facebookresearch/segment-anything#model-checkpoints) and pass its "
                    f"path, or use ShapeWorldSegmenter on the toy backend")
            if model_type not in sam_model_registry:
                raise ValueError(f"model_type must be one of {list(sam_model_registry)}, got {model_type!r}")
            try:
                state = torch.load(path, map_location="cpu", weights_only=True)
            except Exception as e:  # not a tensor-only pickle, or not a checkpoint at all
                raise ValueError(f"{path} is not a loadable SAM checkpoint ({e.__class__.__name__}: "
                                 f"{str(e)[:200]})") from e
            if not isinstance(state, dict) or not any(k.startswith("image_encoder.") for k in state):
                raise ValueError(f"{path} is not a SAM checkpoint: no image_encoder.* weights")
            sam = sam_model_registry[model_type](checkpoint=None)
            try:
                sam.load_state_dict(state)
            except RuntimeError as e:
                raise ValueError(f"{path} does not fit SAM {model_type}: pass the model_type it "
                                 f"was made for (vit_b, vit_l or vit_h)") from e
        self.predictor = SamPredictor(sam.to(device).eval())

    def set_image(self, image: np.ndarray) -> None:
        self.predictor.set_image(np.asarray(image, np.uint8))

    def predict(self, point_coords=None, point_labels=None, box=None, multimask_output=False):
        masks, scores, logits = self.predictor.predict(
            point_coords=point_coords, point_labels=point_labels, box=box,
            multimask_output=multimask_output)
        return masks.astype(bool), scores, logits


def segment(segmenter: Segmenter, image: np.ndarray, attn: np.ndarray, cfg: MaskConfig) -> np.ndarray:
    """The segmenter's best mask (H, W) bool for `image`, prompted from the attention map."""
    segmenter.set_image(image)
    pts, labels, box = segmenter_prompts(attn, image.shape[0], cfg)
    masks, scores, _ = segmenter.predict(point_coords=pts, point_labels=labels, box=box,
                                         multimask_output=False)
    return masks[int(np.argmax(scores))]


# ----------------------------------------------------------------------------- fusion
def feather(binary: np.ndarray, width: float) -> np.ndarray:
    """Soft mask (h, w) float32 from the signed Euclidean distance to the boundary:
    1/2 + sd / (2 width), clipped to [0, 1]; sd > 0 inside. width 0, an empty or a full mask
    return the binary mask. (feather_maps, on the host.)"""
    binary = np.asarray(binary, bool)
    if binary.ndim != 2:
        raise ValueError(f"feather takes one (h, w) mask, got shape {binary.shape}; for a batch "
                         "of masks use feather_maps on a (B, h, w) tensor")
    return feather_maps(torch.from_numpy(binary)[None], width)[0].numpy()


# ------------------------------------------- on the maps' device (stage 2's loop stays on the GPU)
def normalize_maps(a: torch.Tensor) -> torch.Tensor:
    """Min-max normalize each of (B, ...) maps to [0, 1], float32, where they are."""
    a = a.float()
    flat = a.reshape(a.shape[0], -1)  # (B, hw)
    lo, hi = flat.amin(1, keepdim=True), flat.amax(1, keepdim=True)
    return ((flat - lo) / (hi - lo).clamp_min(1e-8)).reshape(a.shape)


def distance_to(feature: torch.Tensor) -> torch.Tensor:
    """Euclidean distance (float64) from each pixel of (B, h, w) to the nearest True pixel of
    `feature` (0 on them; inf where a map has none): exact, as the separable minimum of squared
    distances, first along rows then along columns:

        g[b, i', j] = min_j' (j - j')^2 + f[b, i', j']      f = 0 on feature, inf off it
        d[b, i, j]  = min_i' (i - i')^2 + g[b, i', j]
    """
    b, h, w = feature.shape
    f = torch.zeros(feature.shape, dtype=torch.float64, device=feature.device)
    f = f.masked_fill(~feature, float("inf"))
    jj = torch.arange(w, device=feature.device, dtype=torch.float64)
    ii = torch.arange(h, device=feature.device, dtype=torch.float64)
    g = (f[:, :, None, :] + (jj[:, None] - jj[None]) ** 2).amin(-1)  # (B, h, w[j]) over j'
    d = (g[:, None] + ((ii[:, None] - ii[None]) ** 2)[None, :, :, None]).amin(2)  # over i'
    return d.sqrt()


def feather_maps(binary: torch.Tensor, width: float) -> torch.Tensor:
    """`feather` of (B, h, w) boolean maps, where they are: on a GPU without a round trip
    through the host, so stage 2's adaptive mask does not make the CPU wait for the GPU at every
    step. The signed distance is exact: a test checks every
    number against scipy.ndimage.distance_transform_edt.

        sd = edt(B) - edt(~B), shifted by 1/2 to the boundary     edt: distance to the other set
        M  = clip(1/2 + sd / (2 width), 0, 1)
    """
    binary = binary.bool()
    if width <= 0:
        return binary.float()
    # scipy's edt(B): distance of each pixel to the nearest pixel outside B (0 outside)
    sd = distance_to(~binary) - distance_to(binary)
    sd = torch.where(binary, sd - 0.5, sd + 0.5)
    soft = (0.5 + sd / (2 * width)).clamp(0.0, 1.0).float()
    flat = binary.flatten(1)
    trivial = (~flat.any(1) | flat.all(1))[:, None, None]  # an empty or full map stays binary
    return torch.where(trivial, binary.float(), soft)


@dataclass
class FusedMask:
    """Every stage of the recipe, at latent resolution (h, w): attention A (normalized),
    segmenter S (resized), support B = (A >= tau_lo) & S, the final soft mask M."""
    attention: np.ndarray
    segmenter: np.ndarray
    support: np.ndarray
    mask: np.ndarray


def fuse(attn: np.ndarray, seg: np.ndarray, cfg: MaskConfig) -> FusedMask:
    """Mask fusion (docs/method.md "Adaptive mask blending"): a normalized attention map A
    (h, w) and a segmenter mask S (H, W) into M (h, w):

        B = (A >= tau_lo) & S;   M = max(feather(B, w), A >= tau_hi)"""
    h = attn.shape[-1]
    s = resize(seg.astype(np.float32), h) >= 0.5
    support = (attn >= cfg.tau_lo) & s
    m = feather(support, cfg.feather)
    m = np.maximum(m, (attn >= cfg.tau_hi).astype(np.float32))
    return FusedMask(attn, s, support, m)


def subject_mask(image: np.ndarray, attn: np.ndarray, segmenter: Segmenter | None,
                 cfg: MaskConfig) -> FusedMask:
    """The whole recipe for one image: normalized attention (h, w) -> FusedMask.
    Without a segmenter (or with cfg.source "attention"), the attention support alone is
    feathered; with cfg.source "segmenter", the segmenter's mask alone (the ablations)."""
    a = normalize(attn)
    if cfg.source == "segmenter":
        if segmenter is None:
            raise ValueError("mask source 'segmenter' needs a segmenter: pass segmenter= (SAM on "
                             "SD, ShapeWorldSegmenter on the toy backend) or use source 'fused'")
        seg = segment(segmenter, image, a, cfg)
        s = resize(seg.astype(np.float32), a.shape[-1]) >= 0.5
        return FusedMask(a, s, s, feather(s, cfg.feather))
    if segmenter is None or cfg.source == "attention":
        seg = resize((a >= cfg.tau_lo).astype(np.float32), image.shape[0]) >= 0.5
    else:
        seg = segment(segmenter, image, a, cfg)
    return fuse(a, seg, cfg)
