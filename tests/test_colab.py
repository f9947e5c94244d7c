"""Opening a notebook in Colab: the repository's address is one setting (the badges and the setup
cell's clone), the install is the slim runtime set, and the backend cell picks what the runtime
can run: the toy backend on a CPU, the toy backend with a line saying how to switch on a GPU
without a personalized model, Stable Diffusion on a GPU with a LoRA folder."""
import re
import subprocess
import sys
import types
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from lr_tutorial import models, notebook

ROOT = Path(__file__).resolve().parents[1]
NB = ROOT / "notebooks"
SOURCES = sorted((NB / "src").glob("[0-9][0-9]_*.py"))
TOOLS = ("jupyterlab", "nbval", "pytest", "pytest-xdist", "playwright")


@pytest.fixture
def build(monkeypatch):
    monkeypatch.delenv("LR_TUTORIAL_REPOSITORY", raising=False)
    monkeypatch.delenv("LR_TUTORIAL_BRANCH", raising=False)
    monkeypatch.syspath_prepend(str(NB))
    import build as b
    return b


def _names(req: Path) -> set[str]:
    return {re.split(r"[<>=\[ ;#]", ln.strip())[0].lower() for ln in req.read_text().splitlines()
            if ln.strip() and not ln.startswith(("#", "-"))}


# ----------------------------------------------------------------------------- the install
def test_runtime_requirements_hold_no_test_tools():
    runtime, test = _names(ROOT / "requirements.txt"), _names(ROOT / "requirements-test.txt")
    assert not runtime & set(TOOLS), f"test tools among the runtime dependencies: {runtime & set(TOOLS)}"
    assert set(TOOLS) <= test
    assert {"torch", "diffusers", "ipywidgets"} <= runtime


def test_pyproject_extras_and_setup_paths_install_the_test_tools():
    import tomllib
    py = tomllib.loads((ROOT / "pyproject.toml").read_text())
    dyn = py["tool"]["setuptools"]["dynamic"]
    assert dyn["dependencies"]["file"] == ["requirements.txt"]
    assert dyn["optional-dependencies"]["test"]["file"] == ["requirements-test.txt"]
    make = (ROOT / "Makefile").read_text()
    assert "REQS := -r requirements.txt -r requirements-test.txt" in make
    assert "$(PY) -m pip install -q $(REQS) -c $(LOCK)" in make
    assert re.search(r"run-tests:.*LR_EXERCISE_SOLUTIONS=1", make, re.S)
    ci = (ROOT / ".ci" / "run").read_text()
    assert "pip install -q -r requirements.txt -r requirements-test.txt -c requirements-lock.txt" in ci
    assert "cat requirements.txt requirements-test.txt requirements-lock.txt" in ci


# ----------------------------------------------------------------------------- one address
def test_the_address_is_one_setting_with_an_override(build, monkeypatch):
    cfg = build.settings()
    assert cfg["repository"] == "https://github.com/OWNER/lr_tutorial" and cfg["placeholder"]
    monkeypatch.setenv("LR_TUTORIAL_REPOSITORY", "https://github.com/someone/lr_tutorial.git")
    monkeypatch.setenv("LR_TUTORIAL_BRANCH", "course")
    cfg = build.settings()
    assert (cfg["owner"], cfg["name"], cfg["branch"], cfg["placeholder"]) == \
        ("someone", "lr_tutorial", "course", False)
    nb = build.build(SOURCES[0])
    assert "https://colab.research.google.com/github/someone/lr_tutorial/blob/course/notebooks/" \
           f"{SOURCES[0].stem}.ipynb" in nb.cells[0].source
    assert 'REPOSITORY, BRANCH = "https://github.com/someone/lr_tutorial", "course"' in nb.cells[1].source
    monkeypatch.setenv("LR_TUTORIAL_REPOSITORY", "gitlab.com/someone/lr_tutorial")
    with pytest.raises(SystemExit, match="LR_TUTORIAL_REPOSITORY"):
        build.settings()


@pytest.mark.parametrize("src", SOURCES, ids=lambda p: p.stem)
def test_every_source_takes_the_generated_badge_and_setup_cell(build, src):
    text = src.read_text()
    assert "github.com/" not in text.split("<<setup>>")[0], "an address written into the source"
    cells = build.build(src).cells
    assert cells[0].cell_type == "markdown" and cells[0].source.startswith(build.badge(src.stem))
    setup = next(c for c in cells if c.cell_type == "code")
    assert setup.source == build.setup_cell()


def _run_setup_cell(build, tmp_path, monkeypatch, colab: bool, repository=None):
    """Execute the generated setup cell in `tmp_path`, with or without a fake google.colab, and
    return the commands it ran."""
    if repository:
        monkeypatch.setenv("LR_TUTORIAL_REPOSITORY", repository)
    ran = []
    monkeypatch.setattr(subprocess, "run", lambda cmd, **kw: ran.append(cmd))
    monkeypatch.chdir(tmp_path)
    if colab:
        monkeypatch.setitem(sys.modules, "google.colab", types.ModuleType("google.colab"))
    else:
        monkeypatch.delitem(sys.modules, "google.colab", raising=False)
    monkeypatch.setattr(sys, "path", list(sys.path))
    exec(compile(build.setup_cell(), "setup-cell", "exec"), {})
    return ran


def test_setup_cell_in_colab_clones_the_configured_repository(build, tmp_path, monkeypatch):
    ran = _run_setup_cell(build, tmp_path, monkeypatch, True, "https://github.com/someone/lr_tutorial")
    assert ran[0] == ["git", "clone", "--depth", "1", "--branch", "main",
                      "https://github.com/someone/lr_tutorial", "lr_tutorial"]
    assert ran[1][1:] == ["-m", "pip", "install", "-q", "-e", "lr_tutorial"]  # no [test] extra
    assert sys.path[0] == str(tmp_path / "lr_tutorial")


def test_setup_cell_in_colab_stops_on_the_placeholder(build, tmp_path, monkeypatch):
    with pytest.raises(RuntimeError, match="placeholder OWNER.*LR_TUTORIAL_REPOSITORY=") as e:
        _run_setup_cell(build, tmp_path, monkeypatch, True)
    assert "\n" not in str(e.value)


def test_setup_cell_outside_colab_runs_nothing(build, tmp_path, monkeypatch):
    assert _run_setup_cell(build, tmp_path, monkeypatch, False) == []


# ----------------------------------------------------------------------------- the backend
class _Loader:
    def __init__(self, fail_sd=False):
        self.calls, self.fail_sd = [], fail_sd

    def __call__(self, backend, **kw):
        self.calls.append((backend, kw))
        if backend == "sd" and self.fail_sd:
            raise OSError("We couldn't connect to 'https://huggingface.co'\nmore")
        return SimpleNamespace(backend=backend, personalization="lora" if backend == "sd" else "lora",
                               identifier="sks", class_noun=kw.get("class_noun", "star"))


@pytest.fixture
def runtime(monkeypatch):
    """A simulated runtime: runtime(gpu=..., **env) -> (bundle, printed, loader calls)."""
    def go(gpu: bool, fail_sd=False, **env):
        for k in ("LR_BACKEND", "LR_SD_PERSONALIZED", "LR_SD_BASE", "LR_SD_CLASS"):
            monkeypatch.delenv(k, raising=False)
        for k, v in env.items():
            monkeypatch.setenv(k, v)
        monkeypatch.setattr(torch.cuda, "is_available", lambda: gpu)
        loader = _Loader(fail_sd)
        monkeypatch.setattr(models, "load_models", loader)
        return loader
    return go


def test_cpu_runtime_is_the_toy_backend(runtime, capsys):
    loader = runtime(gpu=False)
    bundle = notebook.pick_backend()
    assert bundle.backend == "toy" and loader.calls == [("toy", {})]
    assert capsys.readouterr().out == "backend: toy (ShapeWorld), subject 'sks star'\n"


def test_gpu_runtime_without_a_personalized_model_is_the_toy_backend_with_one_hint(runtime, capsys):
    loader = runtime(gpu=True)
    assert notebook.pick_backend().backend == "toy" and loader.calls == [("toy", {})]
    hint, backend = capsys.readouterr().out.splitlines()
    assert "GPU found" in hint and "LR_SD_PERSONALIZED" in hint and "my_lora" in hint
    assert "LR_SD_CLASS" in hint and backend.startswith("backend: toy")


def test_gpu_runtime_with_a_lora_folder_is_stable_diffusion(runtime, tmp_path, capsys):
    lora = tmp_path / "my_lora"
    lora.mkdir()
    (lora / "pytorch_lora_weights.safetensors").write_bytes(b"")
    loader = runtime(gpu=True, LR_SD_PERSONALIZED=str(lora), LR_SD_CLASS="cat")
    bundle = notebook.pick_backend()
    assert bundle.backend == "sd"
    assert loader.calls == [("sd", {"personalized": str(lora), "class_noun": "cat"})]
    assert capsys.readouterr().out.startswith("backend: Stable Diffusion (lora personalization")


def test_gpu_runtime_whose_weights_cannot_load_falls_back_saying_why(runtime, tmp_path, capsys):
    loader = runtime(gpu=True, fail_sd=True, LR_SD_PERSONALIZED=str(tmp_path))
    assert notebook.pick_backend().backend == "toy" and [c[0] for c in loader.calls] == ["sd", "toy"]
    assert "Stable Diffusion unavailable (We couldn't connect" in capsys.readouterr().out


def test_choices_the_environment_forces(runtime, tmp_path):
    runtime(gpu=True)
    assert notebook.choose_backend({"LR_BACKEND": "toy", "LR_SD_PERSONALIZED": str(tmp_path)}, True).backend == "toy"
    with pytest.raises(ValueError, match="LR_BACKEND=sd needs a personalized model"):
        notebook.choose_backend({"LR_BACKEND": "sd"}, True)
    with pytest.raises(ValueError, match="use toy, sd or auto"):
        notebook.choose_backend({"LR_BACKEND": "stable"}, True)
    forced = notebook.choose_backend({"LR_BACKEND": "sd", "LR_SD_PERSONALIZED": "x"}, False)
    assert forced.backend == "sd" and forced.forced
    missing = notebook.choose_backend({"LR_SD_PERSONALIZED": str(tmp_path / "nope")}, True)
    assert missing.backend == "toy" and "does not exist" in missing.note
    cpu = notebook.choose_backend({"LR_SD_PERSONALIZED": str(tmp_path)}, False)
    assert cpu.backend == "toy" and "no GPU" in cpu.note
    base = notebook.choose_backend({"LR_SD_PERSONALIZED": str(tmp_path), "LR_SD_BASE": "sd15"}, True)
    assert base.kwargs == {"personalized": str(tmp_path), "class_noun": "dog", "base": "sd15"}


def test_forced_stable_diffusion_raises_its_load_error(runtime, tmp_path):
    runtime(gpu=False, fail_sd=True, LR_BACKEND="sd", LR_SD_PERSONALIZED=str(tmp_path))
    with pytest.raises(OSError, match="couldn't connect"):
        notebook.pick_backend()
