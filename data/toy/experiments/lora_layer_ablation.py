"""Which of the shipped LoRA's layer groups break the subject at night? (data/toy/README.md)

First, does the LoRA damage prompts without the subject? The oracle's shape reading for two
such prompts, vanilla vs personalized, 8 seeds, 25 steps, at three guidance scales. Then it samples a few prompts with the personalized model (4 seeds, 20 steps, guidance 7.5), first with
the whole LoRA, then with one group of its layers switched off (peft's per-adapter `scaling`
set to 0, restored afterwards), and prints the mean identity and what the oracle reads.

    python data/toy/experiments/lora_layer_ablation.py
"""
import numpy as np
from peft.tuners.lora import LoraLayer

from lr_tutorial import sampling
from lr_tutorial.models import load_models
from lr_tutorial.toy import oracle

PROMPTS = ["a sks star at night", "a sks star on the grass", "a sks star in the snow"]
GROUPS = {"conv": lambda n: ".conv" in n, "attn": lambda n: ".attn" in n,
          "ff": lambda n: ".ff." in n, "proj": lambda n: ".proj_in" in n or ".proj_out" in n,
          "down": lambda n: n.startswith("down"), "mid": lambda n: n.startswith("mid"),
          "up": lambda n: n.startswith("up")}

bundle = load_models("toy")
layers = {n: m for n, m in bundle.unet.named_modules() if isinstance(m, LoraLayer)}


def measure(tag: str) -> None:
    out = []
    for p in PROMPTS:
        with bundle.using("personalized"):
            z, _ = sampling.sample(bundle, [p] * 4, list(range(4)), steps=20)
            images = sampling.decode(bundle, z)
        out.append(f"{p}: {np.mean([oracle.identity_score(i) for i in images]):.2f}")
    print(f"{tag:>13} | " + " | ".join(out), flush=True)


for prompt in ["a blue circle at night", "a red square on the grass"]:
    shape = prompt.split()[2]
    for guidance in (1.0, 3.0, 7.5):
        hits = {}
        for mode in ("vanilla", "personalized"):
            with bundle.using(mode):
                z, _ = sampling.sample(bundle, [prompt] * 8, list(range(8)), steps=25,
                                       guidance=guidance)
                hits[mode] = sum(oracle.analyze(i).shape == shape for i in sampling.decode(bundle, z))
        print(f"{prompt!r} guidance {guidance}: read as a {shape} in {hits['vanilla']}/8 (vanilla), "
              f"{hits['personalized']}/8 (personalized)", flush=True)

measure("whole LoRA")
for name, chosen in GROUPS.items():
    saved = {n: dict(m.scaling) for n, m in layers.items()}
    try:
        for n, m in layers.items():
            if chosen(n):
                m.scaling.update({k: 0.0 for k in m.scaling})
        measure("without " + name)
    finally:
        for n, m in layers.items():
            m.scaling.update(saved[n])
