"""Does the toy UNet listen to each attribute word? A training diagnostic.

    python -m lr_tutorial.toy.diagnose --ckpt-dir DIR [--raw]     # a train-toy checkpoint
    python -m lr_tutorial.toy.diagnose --shipped                   # data/toy (vanilla)

For a base prompt and prompts that change one word (position, colour, shape, size), it prints
(1) how far apart the text encoder's output states are at the changed word, and (2) how much the
UNet's x0 prediction from the same noise changes, relative to its norm, at a few timesteps. A word
whose states barely differ, or that barely moves x0 at high noise, is a word the model cannot
follow (the position words, before the position additions of `ToyTrainConfig`).
"""
from __future__ import annotations

import argparse

import torch

from .. import sampling

BASE = "a big red circle on the left"
CHANGES = {"position": "a big red circle on the right", "position2": "a big red circle at the top",
           "colour": "a big blue circle on the left", "shape": "a big red square on the left",
           "size": "a small red circle on the left", "empty": ""}


@torch.no_grad()
def diagnose(bundle, timesteps=(981, 801, 601, 401), batch: int = 8, seed: int = 0) -> dict:
    enc = lambda p, n=1: sampling.encode_prompts(bundle, [p] * n)  # noqa: E731
    base_ids = bundle.tokenizer(BASE).input_ids
    out = {"text_distance": {}, "x0_change": {}}
    for name, p in CHANGES.items():
        if not p:
            continue
        ids = bundle.tokenizer(p).input_ids
        at = next(i for i, (a, b) in enumerate(zip(base_ids, ids)) if a != b)
        out["text_distance"][name] = round(float((enc(BASE)[0, at] - enc(p)[0, at]).norm()), 3)
    ab = bundle.scheduler.alphas_cumprod
    z = torch.randn(batch, 4, bundle.latent_size, bundle.latent_size,
                    generator=torch.Generator().manual_seed(seed))

    def x0(prompt, t):
        eps = bundle.unet(z, torch.tensor(t), enc(prompt, batch)).sample
        return (z - (1 - ab[t]).sqrt() * eps) / ab[t].sqrt()
    for t in timesteps:
        base = x0(BASE, t)
        out["x0_change"][t] = {name: round(float((x0(p, t) - base).norm() / base.norm()), 3)
                               for name, p in CHANGES.items()}
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ckpt-dir", help="a train-toy checkpoint folder (EMA weights)")
    ap.add_argument("--raw", action="store_true", help="the raw weights, not the EMA")
    ap.add_argument("--shipped", action="store_true", help="the shipped weights in data/toy")
    a = ap.parse_args(argv)
    if bool(a.ckpt_dir) == a.shipped:
        ap.error("give exactly one of --ckpt-dir and --shipped")
    if a.shipped:
        from ..models import load_toy
        bundle, step = load_toy(personalized=None), "shipped"
    else:
        from . import train
        cfg = train.ToyTrainConfig(ckpt_dir=a.ckpt_dir)
        bundle, step = train.checkpoint_bundle(cfg)
        if a.raw:
            state = torch.load(f"{a.ckpt_dir}/unet.pt", weights_only=True)
            bundle.unet.load_state_dict(state["unet"])
            bundle.text_encoder.load_state_dict(state["text_encoder"])
    r = diagnose(bundle)
    print(f"step {step}{' (raw)' if a.raw else ''}")
    print("text encoder: distance of output states at the changed word", r["text_distance"])
    for t, row in r["x0_change"].items():
        print(f"x0 change at t={t}:", row)


if __name__ == "__main__":
    main()
