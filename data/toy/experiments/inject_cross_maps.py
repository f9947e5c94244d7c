"""Does the personalized toy model follow injected cross-attention maps? (issue 3, session 10)

A Prompt-to-Prompt-style test, not a method knob. A context is denoised with lambda1 = N (the
vanilla model on y^-p) while its cross-attention probabilities (conditional half, every layer,
every step) are recorded. Then a target is denoised from the same noise by the personalized
model on y^p, its cross-attention probabilities replaced by the context's for the first
--until steps (the identifier reads the class noun's map). If the layout came from those maps,
the target would put the subject where the context put its object. Prints fidelity and
identity of the targets on the first --limit held-out prompts x --seeds seeds.

    python data/toy/experiments/inject_cross_maps.py --until 25
    python data/toy/experiments/inject_cross_maps.py --until 10
"""
import argparse

import torch

from lr_tutorial import attention, sampling
from lr_tutorial.models import load_models
from lr_tutorial.prompts import strip_identifier
from lr_tutorial.toy import report

ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
ap.add_argument("--until", type=int, default=25, help="inject for steps k < until")
ap.add_argument("--limit", type=int, default=8)
ap.add_argument("--seeds", type=int, default=2)
ap.add_argument("--steps", type=int, default=25)
a = ap.parse_args()

bundle = load_models("toy")
prompts = report.read_prompts("data/prompts/heldout_personal.txt")[: a.limit]
flat = [p for p in prompts for _ in range(a.seeds)]
seeds = [s for _ in prompts for s in range(a.seeds)]
maps: dict = {}  # (step, layer path) -> context probabilities (B, heads, HW, T), cond half
state = {"step": 0, "inject": False}


class CrossMaps:
    """Records the context's cross-attention probabilities, or replaces the target's by them."""

    def __init__(self, path, token_map):
        self.path, self.token_map = path, token_map

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                 temb=None, *args, **kwargs):
        q, k, v = attention.project_qkv(attn, hidden_states, encoder_hidden_states)
        p = attention.attention_probs(attn, q, k)  # (2B, heads, HW, T): [uncond; cond]
        half = p.shape[0] // 2
        key = (state["step"], self.path)
        if not state["inject"]:
            maps[key] = p[half:].clone()
        elif state["step"] < a.until:
            src = maps[key][..., self.token_map]  # target token j reads context token map[j]
            p[half:] = src / src.sum(-1, keepdim=True)
        return attention.output(attn, p.to(v.dtype) @ v, hidden_states)


ids = sampling.prompt_ids(bundle, flat[:1])[0].tolist()
ident = ids.index(bundle.tokenizer.convert_tokens_to_ids(bundle.identifier))
# y^-p lacks the identifier: tokens after it shift by one; the identifier reads the class noun
token_map = [j if j <= ident else j - 1 for j in range(len(ids))]
procs = {p: CrossMaps(p, token_map) for p in attention.select_layers(bundle.unet, "*", "cross")}
uncond = sampling.encode_prompts(bundle, [""] * len(flat))
with bundle.using("vanilla"):
    cond_v = sampling.encode_prompts(bundle, [strip_identifier(p, bundle.identifier) for p in flat])
with bundle.using("personalized"):
    cond_p = sampling.encode_prompts(bundle, flat)


@torch.no_grad()
def denoise(mode, cond, inject):
    sched = sampling.make_scheduler(bundle, a.steps)
    z = sampling.initial_noise(bundle, seeds)
    state["inject"] = inject
    with attention.processors(bundle.unet, procs), bundle.using(mode):
        for k, t in enumerate(sched.timesteps):
            state["step"] = k
            eps = sampling.guided_eps(bundle.unet, z, t, cond, uncond, bundle.guidance)
            z = sched.step(eps, t, z).prev_sample
    return sampling.decode(bundle, z)


for name, images in (("context (vanilla)", denoise("vanilla", cond_v, False)),
                     (f"target, maps for k < {a.until}", denoise("personalized", cond_p, True))):
    s = report.summarize(report.score(images, flat))
    f = " ".join(f"{k} {v:.2f}" for k, v in s["fidelity"].items())
    print(f"{name:28s} fidelity {s['fidelity_mean']:.3f} identity {s['identity']:.3f} | {f}")
