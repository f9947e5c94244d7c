"""Helpers for the course notebooks: backend choice and a little display glue."""
from __future__ import annotations

import os


def pick_backend(verbose: bool = True):
    """The toy backend without a GPU (and in CI); Stable Diffusion with a GPU when the weights
    are reachable. Environment: LR_BACKEND=toy|sd forces one; LR_SD_BASE (hub id or folder),
    LR_SD_PERSONALIZED (LoRA/DreamBooth path) and LR_SD_CLASS (class noun) configure SD."""
    import torch

    from .models import load_models

    want = os.environ.get("LR_BACKEND", "auto")
    if want == "sd" or (want == "auto" and torch.cuda.is_available()):
        try:
            kw = {k: v for k, v in dict(base=os.environ.get("LR_SD_BASE"),
                                        personalized=os.environ.get("LR_SD_PERSONALIZED"),
                                        class_noun=os.environ.get("LR_SD_CLASS", "dog")).items() if v}
            bundle = load_models("sd", **kw)
            if verbose:
                print(f"backend: Stable Diffusion ({bundle.personalization} personalization)")
            return bundle
        except Exception as e:  # no weights offline, no personalized model, ...
            if want == "sd":
                raise
            print(f"Stable Diffusion unavailable ({str(e).splitlines()[0][:160]}); using the toy backend")
    bundle = load_models("toy")
    if verbose:
        print("backend: toy (ShapeWorld), subject 'sks star'")
    return bundle
