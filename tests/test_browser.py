"""A real browser runs notebook 02 in JupyterLab and scrubs the TimestepScrubber.

JupyterLab is started on a free localhost port with a random token and its own settings,
workspace, runtime and data folders; Debian's `chromium`, driven by Playwright, opens a copy of
notebooks/02_inside_the_unet.ipynb, clears its stored outputs, runs every cell, drags the
scrubber's step slider and checks that the displayed target x0 image changes. Screenshots go to
the test's tmp_path and to outputs/browser/ (scrubber.png is the one the README shows).

Skips, with the reason, where the machine has no Playwright package or no Chromium, or Chromium
cannot start; with LR_REQUIRE_BROWSER=1 (set by .ci/run when it installed Chromium) those
skips become failures. Chromium: $LR_CHROMIUM, else /usr/bin/chromium, else `chromium` on PATH.
"""
from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

pytestmark = pytest.mark.browser

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "notebooks" / "02_inside_the_unet.ipynb"
SHOTS = Path(os.environ.get("LR_BROWSER_SHOTS", ROOT / "outputs" / "browser"))
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage"]
REQUIRE = os.environ.get("LR_REQUIRE_BROWSER") == "1"


def _skip(reason: str):
    if REQUIRE:
        pytest.fail(f"LR_REQUIRE_BROWSER=1 but {reason}")
    pytest.skip(reason)


def _chromium() -> str | None:
    for c in (os.environ.get("LR_CHROMIUM"), "/usr/bin/chromium", shutil.which("chromium"),
              shutil.which("chromium-browser")):
        if c and os.path.isfile(c) and os.access(c, os.X_OK):
            return c
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def chromium():
    """Chromium's path, checked (with Playwright) before any server starts."""
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        _skip("the playwright Python package is not installed (pip install -r requirements-test.txt)")
    exe = _chromium()
    if exe is None:
        _skip("no Chromium found (apt-get install chromium, or set LR_CHROMIUM)")
    return exe


@pytest.fixture
def lab(tmp_path, chromium):
    """A JupyterLab server on 127.0.0.1 serving a copy of notebook 02; yields (url, token, log)."""
    pytest.importorskip("jupyterlab", reason="jupyterlab is not installed")
    if not NOTEBOOK.exists():
        pytest.skip(f"{NOTEBOOK.name} not built yet: python notebooks/build.py 02")
    work, home = tmp_path / "work", tmp_path / "jupyter"
    work.mkdir()
    shutil.copy(NOTEBOOK, work / NOTEBOOK.name)
    settings = home / "settings" / "@jupyterlab" / "apputils-extension"
    settings.mkdir(parents=True)
    (settings / "notification.jupyterlab-settings").write_text(
        json.dumps({"fetchNews": "false", "checkForUpdates": False}))
    port, token = _free_port(), secrets.token_hex(16)
    env = dict(os.environ, JUPYTER_CONFIG_DIR=str(home / "config"),
               JUPYTER_RUNTIME_DIR=str(home / "runtime"), OMP_NUM_THREADS="1", MKL_NUM_THREADS="1",
               # the kernel imports this checkout's lr_tutorial, whatever the venv has installed
               PYTHONPATH=os.pathsep.join([str(ROOT)] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
    log = open(tmp_path / "jupyterlab.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "jupyterlab", "--no-browser", "--ip=127.0.0.1", f"--port={port}",
         "--ServerApp.port_retries=0", f"--IdentityProvider.token={token}",
         f"--ServerApp.root_dir={work}", "--LabApp.expose_app_in_browser=True",
         f"--LabApp.user_settings_dir={home / 'settings'}",
         f"--LabApp.workspaces_dir={home / 'workspaces'}",
         "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
         "--LabApp.extension_manager=readonly", "--ServerApp.terminals_enabled=False",
         "--allow-root"],
        cwd=work, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while True:
            if proc.poll() is not None:
                pytest.fail(f"JupyterLab exited with {proc.returncode}:\n"
                            f"{(tmp_path / 'jupyterlab.log').read_text()[-3000:]}")
            try:
                urllib.request.urlopen(f"{url}/api/status?token={token}", timeout=5)
                break
            except OSError:
                if time.time() > deadline:
                    pytest.fail("JupyterLab did not answer within 120 s")
                time.sleep(0.5)
        yield url, token, tmp_path / "jupyterlab.log"
    finally:
        try:  # stops the kernels and the server
            urllib.request.urlopen(urllib.request.Request(
                f"{url}/api/shutdown?token={token}", method="POST"), timeout=10)
            proc.wait(timeout=30)
        except Exception:
            pass
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        log.close()


RUN_ALL = """async (name) => {
  const app = window.jupyterapp;
  const panel = Array.from(app.shell.widgets('main')).find(
      w => w.context && w.context.path.endsWith(name));
  if (!panel) return 'notebook panel not found';
  await panel.context.ready;
  await panel.sessionContext.ready;
  app.shell.activateById(panel.id);
  await app.commands.execute('notebook:clear-all-cell-outputs');
  const ok = await app.commands.execute('notebook:run-all-cells');
  return ok === false ? 'a cell raised an error' : 'ok';
}"""


KERNEL_IDLE = """(name) => {
  const panel = Array.from(window.jupyterapp.shell.widgets('main')).find(
      w => w.context && w.context.path.endsWith(name));
  const k = panel && panel.sessionContext.session && panel.sessionContext.session.kernel;
  return k && k.status === 'idle';
}"""


def settle(page, img, quiet_s: float = 1.0, timeout_s: float = 60):
    """Wait until the kernel is idle and the image is loaded and unchanged for quiet_s."""
    deadline, last, since = time.time() + timeout_s, None, time.time()
    while time.time() < deadline:
        ready = page.evaluate(KERNEL_IDLE, NOTEBOOK.name) and img.evaluate(
            "e => e.complete && e.naturalWidth > 0")
        src = img.get_attribute("src")
        if src != last or not ready:
            last, since = src, time.time()
        elif time.time() - since >= quiet_s:
            return
        time.sleep(0.2)
    raise AssertionError("the scrubber image did not settle")


def test_scrubber_slider_changes_the_image_in_a_real_browser(chromium, lab, tmp_path):
    from playwright.sync_api import sync_playwright
    exe, (url, token, log) = chromium, lab
    t0 = time.time()
    with sync_playwright() as p:
        try:
            ctx = p.chromium.launch_persistent_context(
                str(tmp_path / "chromium-profile"), executable_path=exe, headless=True,
                args=FLAGS, viewport={"width": 1400, "height": 1000})
        except Exception as e:  # missing shared libraries, no /dev/shm, ...
            _skip(f"Chromium at {exe} did not start: {str(e).splitlines()[0]}")
        try:
            page = ctx.pages[0] if ctx.pages else ctx.new_page()
            page.set_default_timeout(120_000)
            errors = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(f"{url}/lab/tree/{NOTEBOOK.name}?token={token}")
            page.wait_for_function("() => window.jupyterapp && Array.from("
                                   "window.jupyterapp.shell.widgets('main')).some(w => w.context)")
            page.wait_for_selector(".jp-NotebookPanel .jp-Cell")
            outcome = page.evaluate(RUN_ALL, NOTEBOOK.name)
            assert outcome == "ok", f"{outcome}; server log:\n{log.read_text()[-3000:]}"
            ran = time.time() - t0

            scrubber = page.locator(".lr-scrubber").first
            scrubber.wait_for(state="visible")
            scrubber.scroll_into_view_if_needed()
            img = scrubber.locator("img.lr-target-x0")
            readout = scrubber.locator(".lr-step .widget-readout")
            settle(page, img)
            step_before, src_before, shot_before = readout.inner_text(), img.get_attribute("src"), \
                img.screenshot()
            scrubber.screenshot(path=tmp_path / "scrubber_before.png")

            # drag the slider's handle to 40 % of its track, as a learner would
            track = scrubber.locator(".lr-step .noUi-target").bounding_box()
            handle = scrubber.locator(".lr-step .noUi-handle").bounding_box()
            page.mouse.move(handle["x"] + handle["width"] / 2, handle["y"] + handle["height"] / 2)
            page.mouse.down()
            page.mouse.move(track["x"] + 0.4 * track["width"], track["y"] + track["height"] / 2,
                            steps=10)
            page.mouse.up()

            page.wait_for_function("([e, s]) => e.getAttribute('src') !== s",
                                   arg=[img.element_handle(), src_before])
            settle(page, img)
            step_after, shot_after = readout.inner_text(), img.screenshot()
            assert step_after != step_before, "the slider did not move"
            assert shot_after != shot_before, \
                f"the target x0 image looks the same at step {step_before} and {step_after}"
            scrubber.screenshot(path=tmp_path / "scrubber.png")
            page.screenshot(path=tmp_path / "page.png")
            assert not errors, errors
        finally:
            ctx.close()
    SHOTS.mkdir(parents=True, exist_ok=True)
    for name in ("scrubber.png", "scrubber_before.png", "page.png"):
        shutil.copy(tmp_path / name, SHOTS / name)
    print(f"notebook ran in the browser in {ran:.0f} s; slider step {step_before} -> {step_after}; "
          f"screenshots in {tmp_path} and {SHOTS}")
