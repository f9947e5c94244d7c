"""The benchmark runner (lr_tutorial/evaluate.py, results.py, `python -m lr_tutorial evaluate`):
per-sample results, resuming, never overwriting, tables and plots, the sd path with tiny
DINO/CLIP, and sharding over two accelerate CPU processes equal to one process."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lr_tutorial import benchmarks, evaluate, results
from lr_tutorial.benchmarks import Benchmark, Prompt, Subject
from lr_tutorial.cli import main

ROOT = Path(__file__).resolve().parents[1]
FOUR = ["vanilla", "personalized", "stage1", "layout_and_retouch"]


def _spec(**kw):
    kw = {"steps": 3, "methods": FOUR, **kw}
    return benchmarks.shapeworld(**kw).limit(prompts=2, seeds=2)


def _pixels(folder: Path) -> dict:
    return {p.relative_to(folder).as_posix(): np.asarray(Image.open(p))
            for p in sorted(folder.glob("samples/**/*.png"))}


def _rows(folder: Path) -> dict:
    return {r["key"]: {k: v for k, v in r.items() if k != "elapsed_s"}
            for r in results.load_rows(folder)}


@pytest.fixture(scope="module")
def done(tmp_path_factory):
    out = tmp_path_factory.mktemp("eval") / "run"
    evaluate.run(_spec(), out, batch=3, progress=False)
    return out


def test_batches_are_fixed_by_the_spec():
    spec = _spec(lambda1_sweep=[0.5])
    names = [v.name for v in evaluate.variants(spec)]
    assert names == FOUR + ["stage1@lambda1=0.5", "layout_and_retouch@lambda1=0.5"]
    b = evaluate.batches(spec, 3)
    assert len(b) == 6 * 2 and [len(x) for x in b[:2]] == [3, 1]  # 4 samples per variant
    assert all(len({(it.variant.name, it.subject.name) for it in x}) == 1 for x in b)
    keys = [it.key for x in b for it in x]
    assert len(set(keys)) == len(keys) == 24
    with pytest.raises(ValueError, match="batch"):
        evaluate.batches(spec, 0)


def test_cli_builds_and_validates_the_spec(tmp_path, capsys):
    args = ["evaluate", "--out", str(tmp_path / "o"), "--save-spec", str(tmp_path / "s.json"),
            "--prompts", "3", "--seeds", "2", "--steps", "5", "--methods", "personalized,no_swap",
            "--lambda1-sweep", "0,0.5", "--set", "mask.tau_lo=0.4", "--set", "swap.mode=context"]
    assert main(args) == 0
    spec = Benchmark.load(tmp_path / "s.json")
    assert spec.methods == ["personalized", "no_swap"] and spec.lambda1_sweep == [0.0, 0.5]
    assert spec.config == {"mask.tau_lo": 0.4, "swap.mode": "context"} and spec.steps == 5
    assert len(spec.subjects[0].prompts) == 3 and spec.seeds == [0, 1]
    assert not (tmp_path / "o").exists()
    assert main(args[:-2] + ["--set", "oops"]) == 2
    assert "KEY=VALUE" in capsys.readouterr().err
    assert main(args[:-2] + ["--set", "mask.nope=1"]) == 2  # one line, no traceback
    assert "no field 'nope'" in capsys.readouterr().err
    assert main(args + ["--methods", "dreambooth"]) == 2
    assert "unknown 'dreambooth'" in capsys.readouterr().err


@pytest.mark.slow
def test_run_writes_every_sample_tables_and_plots(done):
    rows = results.load_rows(done)
    assert len(rows) == 16 and len(_pixels(done)) == 16
    for r in rows:
        assert 0 <= r["fidelity"] <= 1 and 0 <= r["identity"] <= 1 and r["settings"]
        assert r["category"] in ("normal", "hard") and "sks star" in r["prompt"]
    lam = {r["method"]: r["lambda1"] for r in rows}
    from lr_tutorial.models import TOY_LAMBDA1
    used = round(TOY_LAMBDA1 * 3) / 3  # the toy's hand-over on 3 steps, as a fraction (0.6 -> 2/3)
    assert lam == {"vanilla": 1.0, "personalized": 0.0, "stage1": used, "layout_and_retouch": used}
    tab = list(__import__("csv").DictReader(open(done / "results.csv")))
    assert [t["variant"] for t in tab if t["category"] == "all"] == FOUR
    assert {t["category"] for t in tab} == {"all", "normal", "hard"}
    allrow = next(t for t in tab if t["variant"] == "stage1" and t["category"] == "all")
    want = np.mean([r["identity"] for r in rows if r["variant"] == "stage1"])
    assert float(allrow["identity"]) == pytest.approx(want, abs=1e-4)
    md = (done / "results.md").read_text()
    assert all(f"| {m} |" in md for m in FOUR)
    assert (done / "plots" / "metrics_by_method.png").stat().st_size > 1000
    assert (done / "plots" / "lambda1_tradeoff.png").stat().st_size > 1000
    assert json.loads((done / "spec.json").read_text())["steps"] == 3
    back = results.read_table(done / "results.csv")  # what notebook 06 reads: numbers, not text
    for got, want_row in zip(back, results.table(results.load_rows(done, FOUR))):
        assert {k: got[k] for k in want_row} == want_row


@pytest.mark.slow
def test_vanilla_and_personalized_equal_plain_sampling(done):
    from lr_tutorial.models import load_models
    from lr_tutorial.toy import heldout, report
    spec = _spec()
    prompts = [p.personal(spec.subjects[0]) for p in spec.subjects[0].prompts]
    bundle = load_models("toy")
    got = _pixels(done)
    for mode, ps in (("vanilla", [heldout.strip_identifier(p) for p in prompts]),
                     ("personalized", prompts)):
        want = report.generate(bundle, ps, spec.seeds, mode, steps=3, batch=3, progress=False)
        mine = [got[f"samples/{mode}/sks_star/{i:03d}_s{s}.png"] for i in range(2) for s in spec.seeds]
        np.testing.assert_array_equal(np.stack(mine), want)


@pytest.mark.slow
def test_rerun_resumes_and_never_overwrites(done, tmp_path):
    before = {p: p.stat().st_mtime_ns for p in done.glob("samples/**/*.*")}
    pixels, rows = _pixels(done), _rows(done)
    gone = done / "samples" / "layout_and_retouch" / "sks_star" / "001_s1"
    gone.with_suffix(".json").unlink()  # an interrupted sample: its .json comes last
    evaluate.run(_spec(), done, batch=3, progress=False)
    after = {p: p.stat().st_mtime_ns for p in done.glob("samples/**/*.*")}
    changed = {p.relative_to(done).as_posix() for p in after if after[p] != before.get(p)}
    assert changed == {f"samples/layout_and_retouch/sks_star/001_s1.{x}" for x in ("json", "png")}
    assert _rows(done) == rows and all(np.array_equal(pixels[k], v) for k, v in _pixels(done).items())
    # other settings into the same folder: refused, the folder untouched
    with pytest.raises(FileExistsError, match="--overwrite"):
        evaluate.run(_spec(steps=2), done, batch=3, progress=False)
    assert {p: p.stat().st_mtime_ns for p in done.glob("samples/**/*.*")} == after
    # a folder that is not an evaluation folder
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    assert main(["evaluate", "--out", str(tmp_path / "mine"), "--prompts", "1", "--seeds", "1",
                 "--steps", "2", "--methods", "personalized", "--quiet"]) == 2
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


@pytest.mark.slow
def test_overwrite_discards_and_reruns(tmp_path):
    out = tmp_path / "run"
    spec = _spec(steps=2, methods=["personalized"]).limit(prompts=1, seeds=1)
    evaluate.run(spec, out, progress=False)
    spec3 = _spec(steps=3, methods=["personalized"]).limit(prompts=1, seeds=1)
    with pytest.raises(FileExistsError):
        evaluate.run(spec3, out, progress=False)
    evaluate.run(spec3, out, progress=False, overwrite=True)
    (row,) = results.load_rows(out)
    assert row["settings"] == evaluate.settings_hash(spec3, evaluate.batches(spec3, 1)[0][0], "ours")


@pytest.mark.slow
def test_sd_backend_with_tiny_dino_and_clip(tmp_path):
    from transformers import CLIPConfig, CLIPModel, ViTConfig, ViTModel

    from tiny_sd import make_tiny_lora, make_tiny_sd, tiny_tokenizer, tiny_unet
    make_tiny_sd(tmp_path / "base")
    make_tiny_lora(tiny_unet(), tmp_path / "lora")
    torch.manual_seed(0)
    ViTModel(ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=1,
                       num_attention_heads=2, intermediate_size=37),
             add_pooling_layer=False).save_pretrained(tmp_path / "dino")
    tok = tiny_tokenizer(tmp_path / "clip")
    CLIPModel(CLIPConfig(
        text_config=dict(vocab_size=len(tok), hidden_size=32, intermediate_size=37,
                         num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=77,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id),
        vision_config=dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=37,
                           num_hidden_layers=1, num_attention_heads=2),
        projection_dim=16)).save_pretrained(tmp_path / "clip")
    rng = np.random.default_rng(0)
    refs = []
    for i in range(2):
        refs.append(tmp_path / f"ref{i}.jpg")
        Image.fromarray((rng.random((90, 120, 3)) * 255).astype(np.uint8)).save(refs[-1])
    sub = Subject("dog", "dog", [str(r) for r in refs],
                  [Prompt("a {} on the beach"), Prompt("a {}", "challenging")],
                  personalized=str(tmp_path / "lora"))
    spec = Benchmark("tiny-sd", [sub], backend="sd", base=str(tmp_path / "base"), seeds=[0, 1],
                     methods=["personalized", "layout_and_retouch"], steps=3)
    out = evaluate.run(spec, tmp_path / "out", progress=False, dino=str(tmp_path / "dino"),
                       clip=str(tmp_path / "clip"))
    rows = results.load_rows(out)
    assert len(rows) == 8
    for r in rows:
        assert all(-1 <= r[k] <= 1 for k in ("i_dino", "i_clip", "t_clip"))
        assert len(r["dino"]) == 32
        assert r["layout"] is None or 0 < r["layout"]["area"] <= 1
    tab = results.table(rows)
    assert {t["category"] for t in tab} == {"all", "normal", "challenging"}
    div = [t["dino_diversity"] for t in tab]
    assert all(d is not None and 0 <= d <= 2 for d in div)


@pytest.mark.slow
def test_two_accelerate_processes_equal_one(tmp_path):
    args = ["evaluate", "--prompts", "2", "--seeds", "2", "--steps", "3", "--batch", "2",
            "--methods", "personalized,layout_and_retouch", "--quiet"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    accel = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes",
             "2", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
             "-m", "lr_tutorial"]
    p = subprocess.run(accel + args + ["--out", str(tmp_path / "two")], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    one = subprocess.run([sys.executable, "-m", "lr_tutorial"] + args + ["--out", str(tmp_path / "one")],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert one.returncode == 0, one.stderr[-3000:]
    a, b = _rows(tmp_path / "one"), _rows(tmp_path / "two")
    assert len(a) == 8 and a == b
    pa, pb = _pixels(tmp_path / "one"), _pixels(tmp_path / "two")
    assert pa.keys() == pb.keys() and all(np.array_equal(pa[k], pb[k]) for k in pa)
    strip = lambda t: [{k: v for k, v in r.items() if k != "seconds_per_image"} for r in t]  # noqa: E731
    assert strip(results.table(results.load_rows(tmp_path / "one"))) == \
        strip(results.table(results.load_rows(tmp_path / "two")))
    assert "| layout_and_retouch |" in p.stdout  # the main process printed the merged table
    assert "process 1/2: 2 of 4 batches" in p.stdout and "process 2/2: 2 of 4 batches" in p.stdout


@pytest.mark.slow
def test_killed_run_resumes_to_the_uninterrupted_result(done, tmp_path):
    """SIGKILL `evaluate` once some samples are on disk, run it again: the rows and pixels
    equal the uninterrupted run's (the `done` fixture: same spec, same batch)."""
    import signal
    import time

    import torch
    out = tmp_path / "killed"
    args = [sys.executable, "-m", "lr_tutorial", "evaluate", "--out", str(out), "--prompts", "2",
            "--seeds", "2", "--steps", "3", "--methods", ",".join(FOUR), "--batch", "3",
            "--quiet", "--threads", str(torch.get_num_threads())]  # the `done` run's: CPU float
    # sums depend on the thread count (`make test` runs one; a bare `pytest` may run more)
    proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 300
    while len(list(out.glob("samples/**/*.json"))) < 3 and proc.poll() is None \
            and time.time() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be interrupted"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    written = len(list(out.glob("samples/**/*.json")))
    assert 0 < written < len(_rows(done)), "the kill must land midway"
    assert main(args[3:]) == 0  # the same command, resumed in this process
    assert _rows(out) == _rows(done)
    assert all(np.array_equal(_pixels(done)[k], v) for k, v in _pixels(out).items())
    assert not list(out.rglob("*.tmp*")), "no half-written file may remain"
