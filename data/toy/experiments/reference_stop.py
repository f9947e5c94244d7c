"""How far the reference is inverted, and what it does to its subject mask M^r (session 22).

Stage 2 reads the reference only from the target's first step on, so its DDIM inversion could
stop there (LRConfig(reference_inversion="start")) instead of walking the photo on to pure
noise ("full", the default). M^r averages the class token's attention over the steps the
inversion ran, so stopping early drops the noisiest, widest maps. For each stop this prints the
UNet calls of the inversion, M^r's mean and its pixels over 0.5, and the attention support
(normalized map >= tau_lo) before the segmenter cuts it, for the default LoRA and
lora_identifier, 25 steps (acceptance_sweep.py's), the toy subject's first photo.

    python data/toy/experiments/reference_stop.py      # about 20 s on 2 cores

Its identity cost on the acceptance prompts: acceptance_sweep.py '{"reference_inversion":
"start"}' (and with "layout.lambda1": 0.4, --lora data/toy/lora_identifier), --limit 76
--seeds 4 --skip-baselines (data/toy/README.md, session 22).
"""
from lr_tutorial import load_models
from lr_tutorial.layout import LayoutConfig
from lr_tutorial.masks import normalize
from lr_tutorial.pipeline import LayoutAndRetouch, LRConfig
from lr_tutorial.prompts import token_index
from lr_tutorial.retouch import invert_reference

STEPS = 25
for lora in ("default", "data/toy/lora_identifier"):
    bundle = load_models("toy", personalized=lora)
    lr = LayoutAndRetouch(bundle, LRConfig(layout=LayoutConfig(steps=STEPS)))
    _, image, prompt = lr._reference_key(None)
    cls = token_index(bundle.tokenizer, prompt, bundle.class_noun)
    print(f"# {lora}, {STEPS} steps; the target starts at 5 (lambda1 0.2 N) or 10 (0.4 N)")
    for stop in (0, 5, 10):
        ref = invert_reference(bundle, image, prompt, cls, steps=STEPS, mask_cfg=lr.config.mask,
                               segmenter=lr.segmenter, stop=stop)
        m, support = ref.mask.mask, normalize(ref.attention) >= lr.config.mask.tau_lo
        print(f"stop {stop:>2} ({STEPS - stop} calls): M^r mean {m.mean():.3f}, "
              f"{int((m > 0.5).sum())} px over 0.5; attention support {int(support.sum())} px; "
              f"segmenter {int(ref.mask.segmenter.sum())} px")
