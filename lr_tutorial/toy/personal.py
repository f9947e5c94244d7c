"""The toy LoRAs' training data: DreamBooth-LoRA (`personalize.dreambooth_lora`) on the subject's
photos plus augmented copies of them (`augment.py`), the knobs in `ToyPersonalConfig`.

    from lr_tutorial.personalize import toy_recipe
    from lr_tutorial.toy.personal import ToyPersonalConfig, train_lora
    train_lora(bundle, photos, toy_recipe(), ToyPersonalConfig(layout_augment=40,
               layout_scale=(0.75, 1.05), layout_shift=0.22, background_augment=20,
               augment_max_timestep=600), masks=masks, out_dir="lora_split600")

The copies are the subject pasted on solid backdrops (`background_augment`), then every image
so far re-framed (`layout_augment`: zoomed, moved, mirrored, the random crop and flip of
DreamBooth trainers). With `augment_max_timestep` they are trained only below that timestep and
the photos alone at and above it (`personalize.TrainingCopies`). This is not a DreamBooth
practice but a way to build a toy personalized model that behaves as the method assumes of a
Stable Diffusion DreamBooth model: from noise it composes like its photos (the paper's
collapse), and it paints the subject into any layout handed to it below that timestep.
`python -m lr_tutorial personalize-toy` takes these knobs as flags (data/toy/README.md, "How
they were trained").
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from ..augment import _check_scale, _check_shift, paste_on_backdrops, reframe
from ..models import ModelBundle
from ..personalize import DreamBoothConfig, TrainingCopies, check_images, check_masks
from ..personalize import check_config as check_dreambooth
from ..personalize import dreambooth_lora


@dataclass
class ToyPersonalConfig:
    """How the toy LoRAs' augmented copies of the photos are made and where they are trained.
    The defaults add none: the shipped default LoRA (data/toy/lora)."""
    # this many composites: each photo's subject (by its mask) pasted on a random solid
    # backdrop, so the subject is also seen on dark and coloured backdrops; needs the masks
    background_augment: int = 0
    # this many re-framed copies of the photos (and of the composites): each zoomed by a random
    # factor in [layout_scale[0], layout_scale[1]] (< 1: shrunk onto a canvas of the photo's
    # border colour; > 1: a crop), shifted at random and mirrored half of the time, so the LoRA
    # sees the subject at several places and sizes; not with the masked loss
    layout_augment: int = 0
    layout_scale: tuple[float, float] = (0.5, 1.2)
    # None: the zoomed photo stays inside the frame (or covers it). A float: its centre moves by
    # up to this fraction of the side in x and y whatever the zoom (0.22 reaches the toy world's
    # left/right/top/bottom positions)
    layout_shift: float | None = None
    # None: the copies are noised at every timestep like the photos. An int: only below it; at
    # and above it every training row is one of the photos
    augment_max_timestep: int | None = None

    def validate(self) -> None:
        if self.background_augment < 0:
            raise ValueError(f"background_augment is a number of extra images, got "
                             f"{self.background_augment}")
        if self.layout_augment < 0:
            raise ValueError(f"layout_augment is a number of extra images, got "
                             f"{self.layout_augment}")
        _check_scale(self.layout_scale)
        _check_shift(self.layout_shift)
        if self.augment_max_timestep is not None and self.augment_max_timestep < 1:
            raise ValueError(f"augment_max_timestep must be None or a timestep >= 1, got "
                             f"{self.augment_max_timestep}")


def check_config(toy: ToyPersonalConfig, cfg: DreamBoothConfig) -> None:
    """ValueError, naming the knob, for a bad DreamBoothConfig, a bad ToyPersonalConfig or a
    ToyPersonalConfig that does not go with the DreamBoothConfig."""
    check_dreambooth(cfg)
    toy.validate()
    if toy.layout_augment and cfg.background_weight < 1:
        raise ValueError("layout_augment moves the subject, so the masks of the masked loss "
                         "(background_weight < 1) would no longer fit; use background_weight=1 "
                         "with layout_augment")


def training_copies(images: np.ndarray, masks: np.ndarray | None, toy: ToyPersonalConfig,
                    seed: int = 0) -> TrainingCopies:
    """The augmented copies of the photos `images` ((n, H, W, 3) uint8; `masks` (n, H, W), True
    on the subject, needed by background_augment), drawn from `seed`: the composites, then the
    re-framed copies of the photos and composites (none with the default config). Their masks
    are kept while no copy is re-framed."""
    toy.validate()
    images = np.asarray(images)
    extra = images[:0]
    extra_masks = None if masks is None else np.asarray(masks, bool)[:0]
    if toy.background_augment:
        check_masks(images, masks, "background_augment", toy.background_augment)
        both, both_masks = paste_on_backdrops(images, masks, toy.background_augment, seed)
        extra, extra_masks = both[len(images):], both_masks[len(images):]
    if toy.layout_augment:  # the composites are re-framed too (on their own backdrops)
        reframed = reframe(np.concatenate([images, extra]), toy.layout_augment, toy.layout_scale,
                           seed, shift=toy.layout_shift)
        extra, extra_masks = np.concatenate([extra, reframed]), None  # the masks no longer fit
    return TrainingCopies(extra, toy.augment_max_timestep, extra_masks, recipe=asdict(toy))


def train_lora(bundle: ModelBundle, images: np.ndarray, cfg: DreamBoothConfig,
               toy: ToyPersonalConfig | None = None, masks: np.ndarray | None = None,
               out_dir: str | Path | None = None, overwrite: bool = False,
               progress: bool = True) -> ModelBundle:
    """`personalize.dreambooth_lora` on the photos `images` and their augmented copies
    (`training_copies`, seeded with cfg.seed). `masks` ((n, H, W), True on the subject) are
    needed by background_augment and the masked loss. The saved dreambooth_config.json holds
    both configs' knobs."""
    toy = toy or ToyPersonalConfig()
    check_config(toy, cfg)
    copies = training_copies(check_images(bundle, images), masks, toy, cfg.seed)
    return dreambooth_lora(bundle, images, cfg, out_dir=out_dir, overwrite=overwrite,
                           progress=progress, masks=masks, copies=copies)
