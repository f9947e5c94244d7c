"""Train the toy backend's models on ShapeWorld: the VAE, then the text encoder + UNet.

Run with `python -m lr_tutorial train-toy --ckpt-dir DIR` (see `cli.py`). Every stage is
seeded, checkpoints atomically every `ckpt_every` steps into `ckpt_dir`, and resumes from the
newest checkpoint when started again; data for step s is drawn from a generator seeded with
(seed, s), so a resumed run sees exactly the batches an uninterrupted run would. Progress goes
to a tqdm bar and to `ckpt_dir/log.jsonl` (one JSON line per `log_every` steps).
"""
from __future__ import annotations

import json
import math
import os
import pickle
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .. import personalize
from ..files import atomic_folder, replace_entries
from . import components, heldout, world


@dataclass
class ToyTrainConfig:
    """Knobs of `train-toy` (data/toy/README.md, "How they were trained")."""
    ckpt_dir: str
    seed: int = 0
    # VAE
    vae_steps: int = 2500
    vae_batch: int = 16
    vae_lr: float = 5e-4  # 1e-3 was unstable (loss spikes, washed-out colours at step 500)
    vae_kl_weight: float = 1e-6
    # latents of a fixed set of scenes, encoded once
    dataset_size: int = 50_000
    # text encoder + UNet
    unet_steps: int = 15_000
    unet_batch: int = 64
    unet_lr: float = 3e-4
    unet_warmup: int = 500
    min_snr_gamma: float = 5.0  # min-SNR loss weighting (Hang et al. 2023)
    # Offset noise (Guttenberg 2023): SD's schedule leaves sqrt(alpha_bar_T) = 0.07 of the signal
    # at t = T, so a model can read an image's mean colour off the noise and ignore the prompt
    # for it; sampling starts from mean-free noise and then gives mid-grey scenes only. At step
    # 3000 of a run without it, "at night" and "in the snow" were never drawn (beach everywhere).
    offset_noise: float = 0.15
    # Multi-resolution ("pyramid") noise [ours, after Whitaker 2023]: the same leak at the
    # layout's frequencies. A blob on the left and one on the right differ mostly in 2x2 and
    # 4x4 block means of the latent; what is left of them at t = T is as large as white
    # noise's block means there, so the model reads the layout off the noise and the prompt's
    # position never matters (without it: position fidelity 27% at step 6,250, the same
    # place for a seed whatever the prompt). Extra noise of this std at 2x2, 4x4 and 8x8,
    # upsampled, drowns it; added from step `pyramid_from` on.
    pyramid_noise: float = 0.5
    pyramid_from: int = 6500
    # High-noise loss boost [ours]: with epsilon prediction an x0 error costs snr(t) times less
    # at high noise, where the layout is decided (at t = 900, 1%); from `boost_from` on, the
    # epsilon loss of steps with snr < 1 is weighted by min(1/snr, high_noise_boost) (1: off),
    # i.e. the x0 loss of truncated-SNR weighting (Salimans & Ho 2022), capped.
    high_noise_boost: float = 20.0
    boost_from: int = 7500
    # Token-identity loss on the text encoder [ours]: trained jointly from scratch, the text
    # encoder let the position words collapse (hidden states of "left" and "right" 0.5 apart,
    # colour words 10 apart, at step 8500), so no UNet could read the position. SD's frozen CLIP
    # keeps every word distinct; here a linear head must recover each token's id from its
    # output state (cross-entropy, this weight), from `token_id_from` on. 0: off.
    # Each of the three additions alone left positions ignored; with all three, the position
    # words' states were 12 apart 500 steps later and drove the UNet's x0. The shipped base
    # turned them on at step 2,500 (data/toy/README.md, "How they were trained").
    token_id_loss: float = 0.1
    token_id_from: int = 8500
    # Free looks [ours]: with only ShapeWorld's six named colours, a base model never draws
    # the subject's teal at night or on grass, and a DreamBooth-LoRA has to teach it a new colour
    # from five light-backdrop photos. Like Stable Diffusion, which has seen every colour on
    # every background, from `looks_from` on this share of each batch shows objects in random
    # colours and random two-colour patterns (captions leave the colour out; the subject's own
    # look is never drawn: `look_scene`).
    look_share: float = 0.0
    looks_from: int = 14_000
    look_dataset_size: int = 20_000
    # Look pairs [ours]: this share of each batch shows two small copies of one free-look
    # object at opposite places (`pair_image`), uncaptioned, so drawing the second copy right
    # needs the first one's look through self-attention. Diptychs (below) ask the same across
    # two whole scenes, as the retouch does across two images.
    pair_share: float = 0.0
    pairs_from: int = 14_000
    pair_dataset_size: int = 20_000
    # Diptychs [ours]: Stable Diffusion's self-attention carries appearance across images (the
    # MasaCtrl observation the retouch relies on) because natural images repeat looks. Here,
    # from `diptychs_from` on, this share of each batch is a 64x128 image of two panels, two
    # scenes side by side that show the same shape in the same uncaptioned free look, at
    # independent places, sizes and backdrops (one panel is often a photo-like close-up on a
    # plain backdrop, like a reference). The second copy can only be drawn right by reading
    # the first one's look through self-attention: exactly what the swap asks of the model
    # when a target reads a reference photo's keys and values.
    diptych_share: float = 0.0
    diptychs_from: int = 14_000
    diptych_dataset_size: int = 20_000
    # Reference reads [ours]: Stable Diffusion learned from web-scale data that its
    # self-attention can fetch a look from another image; a CPU-sized base does not learn it
    # from diptychs in hours. From `reads_from` on, each step adds `read_pairs` pairs of one
    # shape in one free look: a reference-like close-up and a random scene. They are denoised in
    # one call in which the scene's self-attention at the retouch layers (SwapConfig's
    # `retouch_layers`) reads the close-up's keys and values instead of its own: the
    # reference-only swap of docs/method.md, trained. The scene's caption leaves the look out,
    # so the close-up is its only source. 0: off.
    read_pairs: int = 0
    reads_from: int = 14_000
    read_dataset_size: int = 10_000
    # Repaints [ours]: in Stable Diffusion a look is decided late in denoising, so a swap that
    # starts at the hand-over can still change it; in ShapeWorld an object's colour is
    # committed with its layout. This share of the read pairs therefore noises the scene from
    # the same scene in another look (a named colour or another free look) at timesteps >=
    # `repaint_min_timestep`, while the target stays the close-up's look: reading the close-up
    # then repaints a committed object, as the retouch asks. 0: off.
    repaint_share: float = 0.0
    repaint_min_timestep: int = 300
    ema_decay: float = 0.999
    keep_prob: float = 0.7  # each attribute is stated in the caption with this probability
    uncond_prob: float = 0.1  # empty caption, for classifier-free guidance
    ckpt_every: int = 250
    log_every: int = 25
    unet_overrides: dict = field(default_factory=dict)


def _atomic_save(obj, path: Path) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def check_shares(cfg: ToyTrainConfig) -> None:
    """The free-look, look-pair and diptych rows share one batch: together at most all of it."""
    total = cfg.look_share + cfg.pair_share + cfg.diptych_share
    if total > 1:
        raise ValueError(f"look_share {cfg.look_share} + pair_share {cfg.pair_share} + "
                         f"diptych_share {cfg.diptych_share} = {total:g} is more than the whole "
                         "batch; lower them to a sum of at most 1")


class DamagedCheckpoint(OSError):
    """A checkpoint file that does not load (a disk filled up, a copy cut short)."""


def load_checkpoint(path: Path, what: str) -> dict:
    """torch.load of one of train-toy's own files, or DamagedCheckpoint naming it and the fix."""
    try:
        return torch.load(path, weights_only=True)
    except (RuntimeError, EOFError, OSError, ValueError, KeyError, pickle.UnpicklingError) as e:
        first = (str(e).strip().splitlines() or [""])[0][:120]
        raise DamagedCheckpoint(
            f"the {what} checkpoint {path} is damaged ({type(e).__name__}: {first}); move it away to "
            f"train the {what} again from its start, or restore it from a copy") from e


def _cached(path: Path, what: str) -> dict | None:
    """A cache of encoded latents, or None when there is none; a damaged one is set aside
    (renamed *.damaged, named on stderr) so that it is encoded again."""
    if not path.exists():
        return None
    try:
        return load_checkpoint(path, what)
    except DamagedCheckpoint as e:
        aside = path.with_name(path.name + ".damaged")
        os.replace(path, aside)
        tqdm.write(f"note: {e.args[0].split(';')[0]}; moved to {aside.name}, encoding again",
                   file=sys.stderr)
        return None


def _log(cfg: ToyTrainConfig, **row) -> None:
    with open(Path(cfg.ckpt_dir) / "log.jsonl", "a") as f:
        f.write(json.dumps(row) + "\n")


def to_tensor(images: list[np.ndarray]) -> torch.Tensor:
    """uint8 (H, W, 3) images -> float (B, 3, H, W) in [-1, 1]."""
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float()
    return x / 127.5 - 1.0


# ----------------------------------------------------------------------------- VAE
def vae_scene(rng: np.random.Generator) -> world.Scene:
    """VAE data: plain objects, the subject, and random two-colour patterns (so that any
    patterned subject a user brings survives the autoencoder, not just ours)."""
    u = rng.random()
    if u < 0.6:
        return world.sample_scene(rng)
    if u < 0.75:
        return world.subject_scene(rng) if rng.random() < 0.7 else world.reference_scene(rng)
    cols = rng.integers(0, 256, size=(2, 3))
    pattern = world.Pattern(tuple(int(c) for c in cols[0]), tuple(int(c) for c in cols[1]),
                            core_radius=float(rng.uniform(0.3, 0.55)))
    return world.sample_scene(rng, pattern=pattern, rotation=float(rng.uniform(-15, 15)))


def train_vae(cfg: ToyTrainConfig):
    ckdir = Path(cfg.ckpt_dir)
    ckdir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    vae = components.build_vae()
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr, weight_decay=0.0)
    start, path = 0, ckdir / "vae.pt"
    if path.exists():
        state = load_checkpoint(path, "VAE")
        vae.load_state_dict(state["model"]), opt.load_state_dict(state["opt"])
        start = state["step"]
    bar = tqdm(range(start, cfg.vae_steps), initial=start, total=cfg.vae_steps, desc="vae")
    t0, run = time.time(), []
    for step in bar:
        rng = np.random.default_rng([cfg.seed, 1, step])
        x = to_tensor([world.render(vae_scene(rng)) for _ in range(cfg.vae_batch)])
        lr = cfg.vae_lr * 0.5 * (1 + math.cos(math.pi * step / cfg.vae_steps))
        for g in opt.param_groups:
            g["lr"] = lr
        # decode the posterior mean: the diffusion model is trained on means too, and sampling
        # here washed the objects' colours out in a 500-step trial (KL still keeps latents O(1))
        post = vae.encode(x).latent_dist
        rec = vae.decode(post.mean).sample
        loss = F.mse_loss(rec, x) + 0.5 * F.l1_loss(rec, x) + cfg.vae_kl_weight * post.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        run.append(loss.item())
        if (step + 1) % cfg.log_every == 0:
            _log(cfg, stage="vae", step=step + 1, loss=float(np.mean(run)), lr=lr,
                 elapsed=time.time() - t0)
            bar.set_postfix(loss=f"{np.mean(run):.4f}")
            run = []
        if (step + 1) % cfg.ckpt_every == 0 or step + 1 == cfg.vae_steps:
            _atomic_save({"model": vae.state_dict(), "opt": opt.state_dict(), "step": step + 1}, path)
    return vae


# ----------------------------------------------------------------------------- latents
def dataset_scene(seed: int, i: int) -> world.Scene:
    return world.sample_scene(np.random.default_rng([seed, 2, i]))


@torch.no_grad()
def _encode_images(vae, image_of, n: int, what: str) -> torch.Tensor:
    """(n, 4, h, w) posterior means of the images image_of(0..n-1), 500 at a time."""
    vae.eval()
    out = []
    for s in tqdm(range(0, n, 500), desc=f"encode {what}"):
        imgs = [image_of(i) for i in range(s, min(s + 500, n))]
        out.append(vae.encode(to_tensor(imgs)).latent_dist.mean)
    return torch.cat(out)


@torch.no_grad()
def encode_dataset(cfg: ToyTrainConfig, vae) -> tuple[torch.Tensor, float]:
    """Latent means of `dataset_size` scenes, and the scaling factor 1/std of those latents."""
    path = Path(cfg.ckpt_dir) / "latents.pt"
    state = _cached(path, "latents")
    if state is not None:
        return state["latents"].float(), state["scaling_factor"]
    latents = _encode_images(vae, lambda i: world.render(dataset_scene(cfg.seed, i)),
                             cfg.dataset_size, "latents")
    scaling = float(1.0 / latents.std())
    _atomic_save({"latents": latents.half(), "scaling_factor": scaling}, path)
    return latents, scaling


LOOK_MIN_DIST = 90.0  # RGB distance a free look keeps from the subject's colours and the backdrop


def _far(a, b, d: float = LOOK_MIN_DIST) -> bool:
    return float(np.linalg.norm(np.subtract(a, b, dtype=np.float32))) >= d


def look_scene(seed: int, i: int) -> world.Scene:
    """A scene whose object has a free look: one random colour (half of them) or a random
    two-colour pattern, never near the subject's look (a body near the subject's body colour
    together with a core near its core colour is redrawn) and visible on its background."""
    rng = np.random.default_rng([seed, 4, i])
    scene = world.sample_scene(rng)
    bg = world.BACKGROUNDS[scene.background]
    while True:
        body = tuple(int(c) for c in rng.integers(0, 256, 3))
        core = body if rng.random() < 0.5 else tuple(int(c) for c in rng.integers(0, 256, 3))
        subject_like = not _far(body, world.SUBJECT_BODY) and not _far(core, world.SUBJECT_CORE)
        if _far(body, bg) and not subject_like:
            break
    pattern = world.Pattern(body, core, core_radius=float(rng.uniform(0.3, 0.55)))
    return world.with_attrs(scene, pattern=pattern)


@torch.no_grad()
def _encode_cached(cfg: ToyTrainConfig, vae, scaling: float, name: str, image_of, n: int,
                   what: str) -> torch.Tensor:
    """Latent means of images image_of(0..n-1) (unscaled, like `encode_dataset`), encoded once
    into ckpt_dir/latents_{name}.pt and read from there afterwards."""
    path = Path(cfg.ckpt_dir) / f"latents_{name}.pt"
    state = _cached(path, f"{what} latents")
    if state is not None:
        return state["latents"].float()
    latents = _encode_images(vae, image_of, n, what)
    _atomic_save({"latents": latents.half(), "scaling_factor": scaling}, path)
    return latents


def encode_looks(cfg: ToyTrainConfig, vae, scaling: float) -> torch.Tensor:
    """Latent means of `look_dataset_size` free-look scenes."""
    return _encode_cached(cfg, vae, scaling, "looks", lambda i: world.render(look_scene(cfg.seed, i)),
                          cfg.look_dataset_size, "free-look")


PAIR_SPOTS = (("left", "right"), ("top", "bottom"))  # small objects there never overlap


def pair_scenes(seed: int, i: int) -> tuple[world.Scene, world.Scene]:
    """Two copies of one small free-look object (`look_scene`'s look, same shape, size and
    rotation) at opposite places on one backdrop."""
    rng = np.random.default_rng([seed, 5, i])
    first, second = PAIR_SPOTS[int(rng.integers(len(PAIR_SPOTS)))]
    if rng.random() < 0.5:
        first, second = second, first
    a = world.with_attrs(look_scene(seed, 1_000_000 + i), size="small", position=first)
    b = world.with_attrs(a, position=second, dx=float(rng.uniform(-2, 2)),
                         dy=float(rng.uniform(-2, 2)))
    return a, b


def pair_image(seed: int, i: int) -> np.ndarray:
    """`pair_scenes` rendered together: (64, 64, 3) uint8."""
    a, b = pair_scenes(seed, i)
    covered = world.shape_mask(b.shape, b.centre, b.radius, b.rotation)[..., None] > 0
    return np.where(covered, world.render(b), world.render(a))  # same backdrop in both


@torch.no_grad()
def encode_pairs(cfg: ToyTrainConfig, vae, scaling: float) -> torch.Tensor:
    """Latent means of `pair_dataset_size` look pairs."""
    return _encode_cached(cfg, vae, scaling, "pairs", lambda i: pair_image(cfg.seed, i),
                          cfg.pair_dataset_size, "look-pair")


def diptych_scenes(seed: int, i: int) -> tuple[world.Scene, world.Scene]:
    """Two scenes with one shape in one free look (`look_scene`'s): the first panel is a
    reference-like close-up (big, near the centre, plain backdrop, rotated a little) 40% of the
    time, else a random scene; the second is a random scene. Their order is random."""
    rng = np.random.default_rng([seed, 6, i])
    look = look_scene(seed, 2_000_000 + i)
    if rng.random() < 0.4:
        a = world.with_attrs(world.reference_scene(rng), shape=look.shape, pattern=look.pattern)
    else:
        a = world.sample_scene(rng, shape=look.shape, pattern=look.pattern,
                               rotation=float(rng.uniform(-15, 15)))
    b = world.sample_scene(rng, shape=look.shape, pattern=look.pattern,
                           rotation=float(rng.uniform(-15, 15)))
    return (a, b) if rng.random() < 0.5 else (b, a)


def diptych_image(seed: int, i: int) -> np.ndarray:
    """`diptych_scenes` side by side: (64, 128, 3) uint8."""
    a, b = diptych_scenes(seed, i)
    return np.concatenate([world.render(a), world.render(b)], axis=1)


def diptych_caption(seed: int, i: int) -> str:
    """Half of the diptychs name their shape ('a star'), half are uncaptioned."""
    shape = diptych_scenes(seed, i)[0].shape
    return f"a {shape}" if np.random.default_rng([seed, 7, i]).random() < 0.5 else ""


def read_scenes(seed: int, i: int) -> tuple[world.Scene, world.Scene, world.Scene]:
    """A reference-like close-up (big, near the centre, plain backdrop, rotated a little), a
    random scene of the same shape in the same free look (`look_scene`'s), and that scene in
    another look (a named colour half of the time, else another free look): the repaint's
    starting point."""
    rng = np.random.default_rng([seed, 8, i])
    look = look_scene(seed, 3_000_000 + i)
    ref = world.with_attrs(world.reference_scene(rng), shape=look.shape, pattern=look.pattern)
    scene = world.sample_scene(rng, shape=look.shape, pattern=look.pattern,
                               rotation=float(rng.uniform(-15, 15)))
    if rng.random() < 0.5:
        other = world.with_attrs(scene, pattern=None, colour=str(rng.choice(list(world.COLOURS))))
    else:
        other = world.with_attrs(scene, pattern=look_scene(seed, 4_000_000 + i).pattern)
    return ref, scene, other


@torch.no_grad()
def encode_reads(cfg: ToyTrainConfig, vae, scaling: float) -> torch.Tensor:
    """Latent means (n, 3, 4, 16, 16) of `read_dataset_size` reference-read triples
    [close-up, scene, scene in another look]."""
    flat = _encode_cached(cfg, vae, scaling, "reads3",
                          lambda j: world.render(read_scenes(cfg.seed, j // 3)[j % 3]),
                          3 * cfg.read_dataset_size, "reference-read")
    return flat.view(-1, 3, *flat.shape[1:])


class ReadsReference:
    """Training-time self-attention processor for a batch [close-ups (n); scenes (n)]: the
    close-ups attend to themselves, each scene to its close-up's keys and values."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                 temb=None, *args, **kwargs):
        from ..attention import output, project_qkv
        q, k, v = project_qkv(attn, hidden_states)  # (2n, heads, HW, d)
        k, v = torch.cat([k[: len(k) // 2]] * 2), torch.cat([v[: len(v) // 2]] * 2)
        o = F.scaled_dot_product_attention(q, k, v, scale=attn.scale)
        return output(attn, o, hidden_states)


def read_layers(unet) -> list[str]:
    """The self-attention layers a reference read replaces: the swap's retouch layers."""
    from ..attention import select_layers
    from ..config import SwapConfig
    return select_layers(unet, SwapConfig().retouch_layers, "self")


def read_loss(cfg: ToyTrainConfig, unet, te, tok, reads: torch.Tensor, scaling: float,
              sched, w: torch.Tensor, rng: np.random.Generator, gen: torch.Generator,
              step: int, layers: list[str], excluded: frozenset[str]) -> torch.Tensor:
    """Per-row losses (2n,) of `read_pairs` reference-read pairs (see ToyTrainConfig) at the
    self-attention `layers` (`read_layers`); `excluded`: the held-out captions."""
    from ..attention import processors

    n = cfg.read_pairs
    rdx = rng.integers(0, len(reads), size=n)
    triples = [read_scenes(cfg.seed, int(j)) for j in rdx]
    caps = [f"a {ref.shape}" for ref, _, _ in triples] + [
        training_caption(scene, rng, cfg, excluded) for _, scene, _ in triples]
    ids = tok(caps, padding="max_length", max_length=tok.model_max_length,
              return_tensors="pt").input_ids
    r = reads[torch.from_numpy(rdx)] * scaling  # (n, 3, 4, 16, 16)
    r0 = torch.cat([r[:, 0], r[:, 1]])  # (2n, ...): [close-ups; scenes]
    noise = training_noise(r0.shape, gen, cfg, step)
    t = torch.randint(0, sched.config.num_train_timesteps, (n,), generator=gen).repeat(2)
    zt = sched.add_noise(r0, noise, t)
    target = noise
    repaint = (torch.rand(n, generator=gen) < cfg.repaint_share) & (t[n:] >= cfg.repaint_min_timestep)
    if repaint.any():  # noised from the scene in another look; x0 stays the close-up's look
        rows = n + torch.nonzero(repaint)[:, 0]
        zt[rows] = sched.add_noise(r[repaint, 2], noise[rows], t[rows])
        a = sched.alphas_cumprod[t[rows]].view(-1, 1, 1, 1)
        target = noise.clone()
        target[rows] = (zt[rows] - a.sqrt() * r0[rows]) / (1 - a).sqrt()
    with processors(unet, {p: ReadsReference() for p in layers}):
        pred = unet(zt, t, te(ids)[0]).sample
    return w[t] * (pred - target).pow(2).mean(dim=(1, 2, 3))


@torch.no_grad()
def encode_diptychs(cfg: ToyTrainConfig, vae, scaling: float) -> torch.Tensor:
    """Latent means (n, 4, 16, 32) of `diptych_dataset_size` diptychs."""
    return _encode_cached(cfg, vae, scaling, "diptychs", lambda i: diptych_image(cfg.seed, i),
                          cfg.diptych_dataset_size, "diptych")


def unet_data(cfg: ToyTrainConfig, vae):
    """(latents, scaling factor, and the free-look, look-pair and diptych latents, each None when
    unused): what `train_unet` reads."""
    latents, scaling = encode_dataset(cfg, vae)
    needs_looks = cfg.look_share > 0 and cfg.looks_from < cfg.unet_steps
    needs_pairs = cfg.pair_share > 0 and cfg.pairs_from < cfg.unet_steps
    needs_diptychs = cfg.diptych_share > 0 and cfg.diptychs_from < cfg.unet_steps
    needs_reads = cfg.read_pairs > 0 and cfg.reads_from < cfg.unet_steps
    return (latents, scaling, encode_looks(cfg, vae, scaling) if needs_looks else None,
            encode_pairs(cfg, vae, scaling) if needs_pairs else None,
            encode_diptychs(cfg, vae, scaling) if needs_diptychs else None,
            encode_reads(cfg, vae, scaling) if needs_reads else None)


# ----------------------------------------------------------------------------- UNet
def training_caption(scene: world.Scene, rng: np.random.Generator, cfg: ToyTrainConfig,
                     excluded: frozenset[str]) -> str:
    if rng.random() < cfg.uncond_prob:
        return ""
    keep = {a: bool(rng.random() < cfg.keep_prob) for a in heldout.ATTRS}
    cap = world.scene_caption(scene, keep)
    while cap in excluded:  # a held-out prompt: state one attribute fewer
        stated = [a for a in heldout.ATTRS if keep[a]]
        keep[stated[int(rng.integers(len(stated)))]] = False
        cap = world.scene_caption(scene, keep)
    return cap


def training_noise(shape, gen: torch.Generator, cfg: ToyTrainConfig, step: int) -> torch.Tensor:
    """White noise + offset noise (1x1) [+ pyramid noise at 2x2, 4x4, 8x8 from pyramid_from]."""
    pyramid = cfg.pyramid_noise if step >= cfg.pyramid_from else 0.0
    return personalize.training_noise(shape, gen, cfg.offset_noise, pyramid)


def train_unet(cfg: ToyTrainConfig, latents: torch.Tensor, scaling: float,
               looks: torch.Tensor | None = None, pairs: torch.Tensor | None = None,
               diptychs: torch.Tensor | None = None, reads: torch.Tensor | None = None):
    check_shares(cfg)
    ckdir = Path(cfg.ckpt_dir)
    torch.manual_seed(cfg.seed)
    tok = components.build_tokenizer()
    te = components.build_text_encoder(tok)
    unet = components.build_unet(**cfg.unet_overrides)
    sched = components.build_scheduler()
    params = list(unet.parameters()) + list(te.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.unet_lr, weight_decay=0.01)
    ema = [p.detach().clone() for p in params]
    head = torch.nn.Linear(te.config.hidden_size, len(tok))  # token-identity probe (not shipped)
    head_opt = torch.optim.AdamW(head.parameters(), lr=cfg.unet_lr)
    start, warm_start, path = 0, 0, ckdir / "unet.pt"
    if path.exists():
        state = load_checkpoint(path, "UNet")
        unet.load_state_dict(state["unet"]), te.load_state_dict(state["text_encoder"])
        opt.load_state_dict(state["opt"])
        ema = state["ema"]
        start = state["step"]
        warm_start = state.get("warm_start", 0)  # set by seed_from_export: fresh optimizer
        if "head" in state:
            head.load_state_dict(state["head"]), head_opt.load_state_dict(state["head_opt"])
    excluded = heldout.training_exclusions()
    layers = read_layers(unet) if cfg.read_pairs else []
    alphas = sched.alphas_cumprod
    snr = alphas / (1 - alphas)
    weight = torch.clamp(snr, max=cfg.min_snr_gamma) / snr  # (1000,)
    boosted = weight * torch.clamp(1 / snr, min=1.0, max=cfg.high_noise_boost)
    bar = tqdm(range(start, cfg.unet_steps), initial=start, total=cfg.unet_steps, desc="unet")
    t0, run = time.time(), []
    for step in bar:
        rng = np.random.default_rng([cfg.seed, 3, step])
        n_look = round(cfg.look_share * cfg.unet_batch) if step >= cfg.looks_from else 0
        n_pair = round(cfg.pair_share * cfg.unet_batch) if step >= cfg.pairs_from else 0
        n_dip = round(cfg.diptych_share * cfg.unet_batch) if step >= cfg.diptychs_from else 0
        if n_dip and diptychs is None:
            raise ValueError("diptych_share > 0 from diptychs_from on needs the diptych latents "
                             "(train.encode_diptychs)")
        if n_look and looks is None:
            raise ValueError("look_share > 0 from looks_from on needs the free-look latents "
                             "(train.encode_looks)")
        if n_pair and pairs is None:
            raise ValueError("pair_share > 0 from pairs_from on needs the look-pair latents "
                             "(train.encode_pairs)")
        idx = rng.integers(0, len(latents), size=cfg.unet_batch - n_look - n_pair - n_dip)
        scenes = [dataset_scene(cfg.seed, int(i)) for i in idx]
        z0 = latents[torch.from_numpy(idx)]
        if n_look:  # the batch's last n_look rows show free looks
            jdx = rng.integers(0, len(looks), size=n_look)
            scenes += [look_scene(cfg.seed, int(j)) for j in jdx]
            z0 = torch.cat([z0, looks[torch.from_numpy(jdx)]])
        caps = [training_caption(sc, rng, cfg, excluded) for sc in scenes]
        if n_pair:  # then the last n_pair rows: look pairs, uncaptioned
            kdx = rng.integers(0, len(pairs), size=n_pair)
            z0 = torch.cat([z0, pairs[torch.from_numpy(kdx)]])
            caps += [""] * n_pair
        ids = tok(caps, padding="max_length", max_length=tok.model_max_length,
                  return_tensors="pt").input_ids
        z0 = z0 * scaling  # (B, 4, 16, 16)
        gen = torch.Generator().manual_seed(cfg.seed * 100_003 + step)
        noise = training_noise(z0.shape, gen, cfg, step)
        t = torch.randint(0, sched.config.num_train_timesteps, (len(z0),), generator=gen)
        zt = sched.add_noise(z0, noise, t)
        lr = cfg.unet_lr * min(1.0, (step + 1 - warm_start) / cfg.unet_warmup)
        for g in opt.param_groups:
            g["lr"] = lr
        hidden = te(ids)[0]  # (B, L, D)
        pred = unet(zt, t, hidden).sample
        w = boosted if step >= cfg.boost_from else weight
        per_row = w[t] * (pred - noise).pow(2).mean(dim=(1, 2, 3))  # (B,)
        if n_dip:  # diptychs are 16x32 latents: a call of their own, the same loss
            ddx = rng.integers(0, len(diptychs), size=n_dip)
            d_ids = tok([diptych_caption(cfg.seed, int(j)) for j in ddx], padding="max_length",
                        max_length=tok.model_max_length, return_tensors="pt").input_ids
            d0 = diptychs[torch.from_numpy(ddx)] * scaling  # (n_dip, 4, 16, 32)
            d_noise = training_noise(d0.shape, gen, cfg, step)
            d_t = torch.randint(0, sched.config.num_train_timesteps, (n_dip,), generator=gen)
            d_pred = unet(sched.add_noise(d0, d_noise, d_t), d_t, te(d_ids)[0]).sample
            per_row = torch.cat([per_row, w[d_t] * (d_pred - d_noise).pow(2).mean(dim=(1, 2, 3))])
        if cfg.read_pairs and step >= cfg.reads_from:
            if reads is None:
                raise ValueError("read_pairs > 0 from reads_from on needs the reference-read "
                                 "latents (train.encode_reads)")
            per_row = torch.cat([per_row, read_loss(cfg, unet, te, tok, reads, scaling, sched, w,
                                                    rng, gen, step, layers, excluded)])
        loss = per_row.mean()
        total = loss
        if cfg.token_id_loss and step >= cfg.token_id_from:
            total = total + cfg.token_id_loss * F.cross_entropy(head(hidden).flatten(0, 1),
                                                                ids.flatten())
        opt.zero_grad(set_to_none=True)
        head_opt.zero_grad(set_to_none=True)
        total.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        head_opt.step()
        decay = min(cfg.ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            for e, p in zip(ema, params):
                e.mul_(decay).add_(p.detach(), alpha=1 - decay)
        run.append(loss.item())
        if (step + 1) % cfg.log_every == 0:
            _log(cfg, stage="unet", step=step + 1, loss=float(np.mean(run)), lr=lr,
                 elapsed=time.time() - t0)
            bar.set_postfix(loss=f"{np.mean(run):.4f}")
            run = []
        if (step + 1) % cfg.ckpt_every == 0 or step + 1 == cfg.unet_steps:
            _atomic_save({"unet": unet.state_dict(), "text_encoder": te.state_dict(),
                          "opt": opt.state_dict(), "ema": ema, "step": step + 1,
                          "head": head.state_dict(), "head_opt": head_opt.state_dict(),
                          "warm_start": warm_start, "config": asdict(cfg)}, path)
    return unet, te


def ema_models(cfg: ToyTrainConfig):
    """(tokenizer, text_encoder, unet) from the newest UNet checkpoint, with EMA weights."""
    state = load_checkpoint(Path(cfg.ckpt_dir) / "unet.pt", "UNet")
    tok = components.build_tokenizer()
    te = components.build_text_encoder(tok)
    unet = components.build_unet(**cfg.unet_overrides)
    params = list(unet.parameters()) + list(te.parameters())
    with torch.no_grad():
        for p, e in zip(params, state["ema"]):
            p.copy_(e)
    return tok, te.eval(), unet.eval(), state["step"]


def trained_vae(cfg: ToyTrainConfig, scaling: float | None = None):
    vae = components.build_vae()
    vae.load_state_dict(load_checkpoint(Path(cfg.ckpt_dir) / "vae.pt", "VAE")["model"])
    if scaling is not None:
        vae.register_to_config(scaling_factor=scaling)
    return vae.eval()


def train_all(cfg: ToyTrainConfig) -> None:
    with open(Path(cfg.ckpt_dir) / "config.json", "w") as f:
        json.dump(asdict(cfg), f, indent=1)
    vae = train_vae(cfg)
    train_unet(cfg, *unet_data(cfg, vae))


def export(cfg: ToyTrainConfig, out_dir: str | Path, overwrite: bool = False) -> Path:
    """Write the trained models (EMA weights) in the diffusers pipeline layout, as safetensors:
    out_dir/{tokenizer,text_encoder,vae,unet,scheduler}/ + model_index.json, so both
    `load_models("toy")` and `StableDiffusionPipeline.from_pretrained(out_dir)` read them."""
    from diffusers import StableDiffusionPipeline

    out = Path(out_dir)
    if (out / "unet").exists() and not overwrite:
        raise FileExistsError(f"{out} already holds toy weights; pass overwrite=True "
                              "(--overwrite) to replace them")
    scaling = load_checkpoint(Path(cfg.ckpt_dir) / "latents.pt", "latents")["scaling_factor"]
    tok, te, unet, unet_step = ema_models(cfg)
    pipe = StableDiffusionPipeline(
        vae=trained_vae(cfg, scaling), text_encoder=te, tokenizer=tok, unet=unet,
        scheduler=components.build_scheduler(), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False)
    log = [json.loads(x) for x in open(Path(cfg.ckpt_dir) / "log.jsonl")]
    last = {st: [r for r in log if r["stage"] == st][-1] for st in ("vae", "unet")
            if any(r["stage"] == st for r in log)}
    ck = load_checkpoint(Path(cfg.ckpt_dir) / "unet.pt", "UNet")
    meta = {"config": ck.get("config", asdict(cfg)),  # the recipe the last steps ran with
            "unet_step": unet_step, "scaling_factor": scaling,
            "resumed_from_export_at": ck.get("warm_start") or None,
            "last_logged": last, "command": "python -m lr_tutorial train-toy"}
    # written aside, then moved in entry by entry: an interrupted export leaves no half model
    with atomic_folder(out.with_name(out.name + ".export"), overwrite=True) as tmp:
        pipe.save_pretrained(tmp, safe_serialization=True)
        (tmp / "training.json").write_text(json.dumps(meta, indent=1))
    replace_entries(out.with_name(out.name + ".export"), out)
    return out


def seed_from_export(cfg: ToyTrainConfig, export_dir: str | Path) -> None:
    """Recreate the checkpoints from exported weights, for resuming on a machine that lost
    ckpt_dir: the VAE counts as finished, the UNet resumes at the exported step from its EMA
    weights with a fresh optimizer, warmed up again from that step (so the result is not
    bit-identical to an unbroken run)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    src = Path(export_dir)
    meta = json.loads((src / "training.json").read_text())
    ck = Path(cfg.ckpt_dir)
    ck.mkdir(parents=True, exist_ok=True)
    vae = AutoencoderKL.from_pretrained(src / "vae")
    _atomic_save({"model": vae.state_dict(), "opt": torch.optim.AdamW(vae.parameters()).state_dict(),
                  "step": cfg.vae_steps}, ck / "vae.pt")
    unet = UNet2DConditionModel.from_pretrained(src / "unet")
    te = CLIPTextModel.from_pretrained(src / "text_encoder")
    params = list(unet.parameters()) + list(te.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.unet_lr, weight_decay=0.01)
    _atomic_save({"unet": unet.state_dict(), "text_encoder": te.state_dict(), "opt": opt.state_dict(),
                  "ema": [p.detach().clone() for p in params], "step": meta["unet_step"],
                  "warm_start": meta["unet_step"], "config": asdict(cfg)}, ck / "unet.pt")


def checkpoint_bundle(cfg: ToyTrainConfig):
    """A vanilla ModelBundle straight from the newest checkpoints (to watch training)."""
    from ..models import TOY_ONEDNN_MIN_ROWS, ModelBundle, backend_defaults

    scaling = load_checkpoint(Path(cfg.ckpt_dir) / "latents.pt", "latents")["scaling_factor"]
    tok, te, unet, step = ema_models(cfg)
    bundle = ModelBundle(tokenizer=tok, text_encoder=te, vae=trained_vae(cfg, scaling), unet=unet,
                         scheduler=components.build_scheduler(), backend="toy",
                         unet_onednn_min_rows=TOY_ONEDNN_MIN_ROWS,
                         identifier=world.SUBJECT_IDENTIFIER, class_noun=world.SUBJECT_CLASS,
                         **backend_defaults("toy"))
    return bundle, step
