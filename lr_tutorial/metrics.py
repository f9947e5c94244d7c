"""The paper's metrics (docs/method.md "Evaluation") and their ShapeWorld analogues.

Real images (transformers checkpoints, loaded by `load_dino` / `load_clip`):
- I_DINO: mean cosine of DINO ViT-S/16 CLS embeddings, generated image vs the subject's real
  photos (`identity_similarity` of `DinoScorer` embeddings);
- I_CLIP: the same with CLIP ViT-B/32 image embeddings;
- T_CLIP: CLIP ViT-B/32 cosine of image and prompt, the identifier replaced by the class noun
  ("a sks dog on the beach" -> "a dog on the beach", `class_prompt`);
- diversity: mean pairwise (1 - DINO cosine) among the samples of one prompt
  (`pairwise_diversity`) and a layout diversity from subject masks (`layout_diversity`).

Preprocessing, exactly (`Protocol`; sizes scale with the checkpoint's input side S, 224 for the
real ones; bicubic resampling with PIL throughout):
- "ours": photos EXIF-rotated upright, RGB. DINO: shorter side resized to round(256 S / 224),
  centre crop S, [0, 1], ImageNet mean (0.485, 0.456, 0.406) / std (0.229, 0.224, 0.225).
  CLIP: shorter side to S, centre crop S, [0, 1], CLIP mean (0.4815, 0.4578, 0.4082) /
  std (0.2686, 0.2613, 0.2758). Embeddings: DINO's final-LayerNorm CLS token; CLIP's projected
  image / text embeddings. All L2-normalized.
- "dreammatcher" (its released evaluation code, for comparison with published tables): photos
  NOT EXIF-rotated; every image resized as a whole (aspect not kept, no crop) to
  round(256 S / 224) squared and scaled to [-1, 1]. DINO sees that [-1, 1] image directly (no
  ImageNet normalization; position embeddings interpolated). CLIP: back to [0, 1], shorter
  side to S, centre crop S, CLIP normalization. Its T_CLIP text is the template line itself
  with the literal "{}" (see benchmarks.Prompt.clip_text). Protocol-specific numbers.

ShapeWorld analogues (wrapping lr_tutorial.toy.report / oracle): prompt fidelity per attribute
(T_CLIP's analogue), identity score (I_DINO's), and the same layout diversity from the oracle's
subject masks.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageOps

DINO_ID = "facebook/dino-vits16"
CLIP_ID = "openai/clip-vit-base-patch32"
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
PROTOCOLS = ("ours", "dreammatcher")


class MetricModelNotFoundError(OSError):
    """A DINO / CLIP checkpoint could not be loaded (offline, not downloaded, wrong path)."""


# ----------------------------------------------------------------------------- preprocessing
def _pil(image) -> Image.Image:
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    a = np.asarray(image)
    if a.ndim != 3 or a.shape[2] != 3 or a.dtype != np.uint8:
        raise ValueError(f"expected a uint8 (H, W, 3) image, got {a.dtype} {a.shape}; "
                         "convert with lr_tutorial.images.prepare")
    return Image.fromarray(a)


def _short_side(img: Image.Image, side: int) -> Image.Image:
    w, h = img.size
    s = side / min(w, h)
    return img.resize((max(side, round(w * s)), max(side, round(h * s))), Image.BICUBIC)


def _centre_crop(img: Image.Image, side: int) -> Image.Image:
    w, h = img.size
    x0, y0 = (w - side) // 2, (h - side) // 2
    return img.crop((x0, y0, x0 + side, y0 + side))


def _tensor(img: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(img, np.float32) / 255.0).permute(2, 0, 1)


def _normalize(x: torch.Tensor, mean, std) -> torch.Tensor:
    return (x - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]


@dataclass
class Protocol:
    """How images become model inputs (module docstring). name: "ours" or "dreammatcher"."""
    name: str = "ours"

    def __post_init__(self):
        if self.name not in PROTOCOLS:
            raise ValueError(f"protocol must be one of {PROTOCOLS}, got {self.name!r}")

    def load_photo(self, path) -> Image.Image:
        """A real photo as the protocol reads it (EXIF rotation only under "ours")."""
        with Image.open(path) as im:
            im.load()
            img = ImageOps.exif_transpose(im) if self.name == "ours" else im.copy()
        return img.convert("RGB")

    def dino(self, images, side: int) -> torch.Tensor:
        """(N, 3, s, s) DINO inputs for a checkpoint of input side `side`."""
        big = round(256 * side / 224)
        out = []
        for im in map(_pil, images):
            if self.name == "ours":
                x = _normalize(_tensor(_centre_crop(_short_side(im, big), side)),
                               IMAGENET_MEAN, IMAGENET_STD)
            else:
                x = _tensor(im.resize((big, big), Image.BICUBIC)) * 2 - 1
            out.append(x)
        return torch.stack(out)

    def clip(self, images, side: int) -> torch.Tensor:
        """(N, 3, side, side) CLIP inputs."""
        big = round(256 * side / 224)
        out = []
        for im in map(_pil, images):
            if self.name == "dreammatcher":
                im = im.resize((big, big), Image.BICUBIC)
            x = _tensor(_centre_crop(_short_side(im, side), side))
            out.append(_normalize(x, CLIP_MEAN, CLIP_STD))
        return torch.stack(out)


# ----------------------------------------------------------------------------- models
def _local_only(name: str, local_files_only: bool | None) -> bool:
    if local_files_only is not None:
        return local_files_only
    offline = os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE")
    return offline or os.path.isdir(name)


def _not_found(what: str, name: str, option: str, default: str,
               err: BaseException) -> MetricModelNotFoundError:
    first = (str(err).strip().splitlines() or [""])[0][:300]
    looks_local = name.startswith(("/", ".", "~")) or os.path.isdir(name)
    download = (f"hf download {default} --local-dir {name}" if looks_local else f"hf download {name}")
    return MetricModelNotFoundError(
        f"Could not load the {what} checkpoint {name!r}: {type(err).__name__}: {first}\n"
        f"Fixes (any one):\n  1. on a machine with internet, pre-download it: `{download}`; a "
        f"Hub id is then read from the Hugging Face cache, offline too;\n  2. pass a local folder "
        f"holding it (config.json + weights): `{option} /path/to/folder` on the command line, "
        f"or the path as the first argument of load_{what.lower()}().")


def load_dino(name_or_path: str = DINO_ID, device: str = "cpu",
              local_files_only: bool | None = None) -> "DinoScorer":
    """DINO ViT-S/16 (transformers ViTModel) from the Hub cache or a local folder."""
    from transformers import ViTModel
    try:
        model = ViTModel.from_pretrained(name_or_path, add_pooling_layer=False,
                                         local_files_only=_local_only(name_or_path, local_files_only))
    except OSError as err:
        raise _not_found("DINO", name_or_path, "--dino", DINO_ID, err) from err
    return DinoScorer(model.to(device))


def load_clip(name_or_path: str = CLIP_ID, device: str = "cpu",
              local_files_only: bool | None = None) -> "ClipScorer":
    """CLIP ViT-B/32 (transformers CLIPModel + CLIPTokenizer) from the Hub cache or a folder."""
    from transformers import CLIPModel, CLIPTokenizer
    lo = _local_only(name_or_path, local_files_only)
    try:
        model = CLIPModel.from_pretrained(name_or_path, local_files_only=lo)
        tok = CLIPTokenizer.from_pretrained(name_or_path, local_files_only=lo)
    except OSError as err:
        raise _not_found("CLIP", name_or_path, "--clip", CLIP_ID, err) from err
    return ClipScorer(model.to(device), tok)


class DinoScorer:
    """L2-normalized DINO CLS embeddings of images under a protocol."""

    def __init__(self, model, protocol: Protocol | str = "ours", batch: int = 32):
        self.model = model.eval().requires_grad_(False)
        self.protocol = Protocol(protocol) if isinstance(protocol, str) else protocol
        self.batch = batch

    @torch.no_grad()
    def embed(self, images) -> torch.Tensor:
        side = int(self.model.config.image_size)
        images = list(images)
        out = []
        for i in range(0, len(images), self.batch):
            x = self.protocol.dino(images[i:i + self.batch], side).to(self.model.device,
                                                                     self.model.dtype)
            h = self.model(pixel_values=x, interpolate_pos_encoding=x.shape[-1] != side)
            out.append(h.last_hidden_state[:, 0].float().cpu())
        return torch.nn.functional.normalize(torch.cat(out), dim=-1)


class ClipScorer:
    """L2-normalized CLIP image and text embeddings under a protocol."""

    def __init__(self, model, tokenizer, protocol: Protocol | str = "ours", batch: int = 32):
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.protocol = Protocol(protocol) if isinstance(protocol, str) else protocol
        self.batch = batch

    @torch.no_grad()
    def embed(self, images) -> torch.Tensor:
        side = int(self.model.config.vision_config.image_size)
        images = list(images)
        out = []
        for i in range(0, len(images), self.batch):
            x = self.protocol.clip(images[i:i + self.batch], side).to(self.model.device,
                                                                     self.model.dtype)
            out.append(_features(self.model.get_image_features(pixel_values=x)).float().cpu())
        return torch.nn.functional.normalize(torch.cat(out), dim=-1)

    @torch.no_grad()
    def embed_text(self, texts: list[str]) -> torch.Tensor:
        limit = min(self.tokenizer.model_max_length,
                    self.model.config.text_config.max_position_embeddings)  # 77 for CLIP
        ids = self.tokenizer(list(texts), padding=True, truncation=True, max_length=limit,
                             return_tensors="pt")
        feats = self.model.get_text_features(**ids.to(self.model.device))
        return torch.nn.functional.normalize(_features(feats).float().cpu(), dim=-1)


def _features(out) -> torch.Tensor:
    """transformers < 5 returns the projected embedding from get_*_features; 5.x returns a model
    output whose pooler_output holds it."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output


# ----------------------------------------------------------------------------- scores
def class_prompt(prompt: str, identifier: str) -> str:
    """T_CLIP's text: the identifier dropped, so "sks dog" reads as the class noun "dog"."""
    from .prompts import strip_identifier
    return strip_identifier(prompt, identifier)


def identity_similarity(generated: torch.Tensor, references: torch.Tensor) -> np.ndarray:
    """Per generated image, the mean cosine to every reference (I_DINO / I_CLIP per image);
    the benchmark's number is the mean over images."""
    return (generated @ references.T).mean(1).numpy()


def text_similarity(images: torch.Tensor, texts: torch.Tensor) -> np.ndarray:
    """Row-wise cosine of image i with text i (T_CLIP per image)."""
    return (images * texts).sum(-1).numpy()


def pairwise_diversity(embeddings) -> float | None:
    """Mean over pairs i < j of (1 - cosine) among the samples of one prompt; None for < 2."""
    e = torch.nn.functional.normalize(torch.as_tensor(np.asarray(embeddings), dtype=torch.float32),
                                      dim=-1)
    n = len(e)
    if n < 2:
        return None
    iu = torch.triu_indices(n, n, 1)
    return float((1 - (e @ e.T)[iu[0], iu[1]]).mean())


def mask_layout(mask) -> dict | None:
    """Centroid (x, y) and area of a subject mask, as fractions of the image side / area;
    None when the mask is empty."""
    m = np.asarray(mask, np.float32) >= 0.5
    if not m.any():
        return None
    ys, xs = np.nonzero(m)
    h, w = m.shape
    return {"cx": float((xs.mean() + 0.5) / w), "cy": float((ys.mean() + 0.5) / h),
            "area": float(m.mean())}


def layout_diversity(layouts: list[dict | None]) -> dict:
    """From the `mask_layout`s of one prompt's samples: centroid_spread, the mean distance of
    the centroids from their mean (fraction of the image side), and area_spread, the standard
    deviation of the areas (fraction of the image); None with fewer than 2 found subjects."""
    found = [d for d in layouts if d is not None]
    if len(found) < 2:
        return {"centroid_spread": None, "area_spread": None}
    c = np.array([[d["cx"], d["cy"]] for d in found])
    areas = np.array([d["area"] for d in found])
    return {"centroid_spread": float(np.linalg.norm(c - c.mean(0), axis=1).mean()),
            "area_spread": float(areas.std())}


# ----------------------------------------------------------------------------- ShapeWorld
def toy_scores(images: np.ndarray, prompts: list[str]) -> list[dict]:
    """Oracle rows per image (toy.report.score: stated and read attributes, per-attribute
    match, identity) plus the subject mask's `layout` (mask_layout) and `fidelity`, the share
    of the prompt's stated attributes the image satisfies."""
    from .toy import oracle, report
    rows = report.score(images, prompts)
    for row, img in zip(rows, images):
        row["layout"] = mask_layout(oracle.analyze(img).mask)
        row["fidelity"] = float(np.mean(list(row["match"].values()))) if row["match"] else None
    return rows


def toy_summary(rows: list[dict]) -> dict:
    """toy.report.summarize over oracle rows: fidelity per attribute, identity, found, where
    position-free prompts put the subject (position_hist, centroid_spread_px)."""
    from .toy import report
    return report.summarize(rows)
