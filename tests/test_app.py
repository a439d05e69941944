"""The playground (python -m diffexp.app): its functions, and the page driven in a real headless Chromium.

The browser test starts the app as a user does and drives it with Selenium and Debian's chromium +
chromium-driver. Under CI=true missing packages are installed with apt-get (root); elsewhere it skips and says how
to run it: `sudo apt-get install chromium chromium-driver`, then
`DIFFEXP_TEST_BROWSER=1 python -m pytest -m slow tests/test_app.py`. Screenshots go to $DIFFEXP_ARTIFACTS
(default test-artifacts/) as the test's artefacts.
"""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from io import BytesIO
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests.conftest import ROOT, readme_command, run_script, user_env

gradio = pytest.importorskip("gradio")
from diffexp import app  # noqa: E402

IN_CI = os.environ.get("CI") == "true"
ARTIFACTS = Path(os.environ.get("DIFFEXP_ARTIFACTS", ROOT / "test-artifacts"))
SHIPPED_DIGITS = ROOT / "src" / "diffexp" / "pretrained" / "digits" / "model.safetensors"


def test_forward_process_view_follows_t_and_schedule():
    a = app.forward_process("digits", 5, None, "linear", 1000, 1e-4, 0.02, 0.008, False, 100)[0]
    b = app.forward_process("digits", 5, None, "linear", 1000, 1e-4, 0.02, 0.008, False, 900)[0]
    c = app.forward_process("digits", 5, None, "cosine", 1000, 1e-4, 0.02, 0.008, False, 100)[0]
    assert a.shape == b.shape == (256, 256) and not np.array_equal(a, b) and not np.array_equal(a, c)
    upload = (np.random.default_rng(0).random((50, 40, 3)) * 255).astype(np.uint8)
    assert app.forward_process("digits", 0, upload, "linear", 1000, 1e-4, 0.02, 0.008, True, 999)[0].shape == (256, 256, 3)
    with pytest.raises(gradio.Error, match="beta_start"):
        app.forward_process("digits", 0, None, "linear", 1000, 0.5, 0.02, 0.008, False, 10)
    with pytest.raises(gradio.Error, match="num_timesteps"):
        app.forward_process("digits", 0, None, "linear", 1, 1e-4, 0.02, 0.008, False, 0)


def test_forward_tab_formulations_noise_the_same_image_along_each_path():
    """formulation=vp|edm|flow: x_t = alpha x0 + sigma eps at t / (T - 1) of the path's clock (the same eps as the
    DDPM view), shown at unit scale; the strip holds every path with its log-SNR; a bad choice names the option."""
    import math

    image = app.image_of("digits", 5, None)
    eps = torch.randn(image.shape, generator=torch.Generator().manual_seed(0))
    fraction = 600 / 999
    low, high = 0.002 ** (1 / 7), 80 ** (1 / 7)
    t_flow, sigma_edm = 1e-3 + fraction * (1 - 1e-3), (low + fraction * (high - low)) ** 7
    angle = (fraction + 0.008) / 1.008 * math.pi / 2
    alpha_vp = math.cos(angle) / math.cos(0.008 / 1.008 * math.pi / 2)
    expected = {"flow": ((1 - t_flow) * image + t_flow * eps, (1 - t_flow) ** 2 + t_flow**2),
                "edm": (image + sigma_edm * eps, 1 + sigma_edm**2),
                "vp": (alpha_vp * image + math.sqrt(1 - alpha_vp**2) * eps, 1.0)}
    views, paths = {}, app.formulation_paths(app.make_schedule("linear", 1000, 1e-4, 0.02, 0.008, False))
    for name, (x_t, power) in expected.items():
        view, _, _, strip = app.forward_process("digits", 5, None, "linear", 1000, 1e-4, 0.02, 0.008, False, 600, name)
        torch.testing.assert_close(app.path_noised(image, paths[name], fraction)[1], x_t,
                                   rtol=1e-5, atol=1e-5)
        assert np.array_equal(view, app.as_view((x_t / math.sqrt(power))[None].float()))
        titles = [ax.get_title() for ax in strip.axes]
        assert [title.split(":")[0] for title in titles] == ["ddpm", "vp", "edm", "flow"]
        assert [ax.title.get_color() for ax in strip.axes][list(app.PATH_CHOICES).index(name)] == "red"
        views[name] = view
    assert not np.array_equal(views["flow"], views["vp"])
    ddpm = app.forward_process("digits", 5, None, "linear", 1000, 1e-4, 0.02, 0.008, False, 600, "ddpm")[0]
    assert np.array_equal(ddpm, app.forward_process("digits", 5, None, "linear", 1000, 1e-4, 0.02, 0.008, False, 600)[0])
    with pytest.raises(gradio.Error, match="formulation='ve'"):
        app.forward_process("digits", 5, None, "linear", 1000, 1e-4, 0.02, 0.008, False, 600, "ve")
    for t, message in [(-5, "t=-5 must be at least 0"), (float("nan"), "t=nan must be a finite number")]:
        with pytest.raises(gradio.Error, match=message):
            app.forward_process("digits", 5, None, "linear", 1000, 1e-4, 0.02, 0.008, False, t, "flow")
    grey = np.full((10, 12, 1), 200, dtype=np.uint8)  # one channel, and a float image in [0, 1]: both read as images
    torch.testing.assert_close(app.image_of("digits", 0, grey), app.image_of("digits", 0, grey[..., 0]))
    torch.testing.assert_close(app.image_of("digits", 0, grey / 255.0), app.image_of("digits", 0, grey), atol=0.01, rtol=0)
    with pytest.raises(gradio.Error, match=r"upload must be an H x W .* got shape \(5,\)"):
        app.forward_process("digits", 5, np.zeros(5), "linear", 1000, 1e-4, 0.02, 0.008, False, 600, "vp")


@pytest.mark.slow
def test_sampling_stream_shows_every_step_and_ends_with_sample_py_grid(tmp_path):
    """The tab's generator yields one x_t / x_0 view per step, then the grid sample.py writes (same pixels)."""
    updates = list(app.sampling_stream("digits", "ddim", 10, 3, 4, "", 3.0))
    assert len(updates) == 11 and all(u[0].shape == (245, 245) for u in updates[:-1])
    grid = np.asarray(Image.open(updates[-1][2]))
    result = run_script("sample.py", f"ckpt={SHIPPED_DIGITS}", "sampler=ddim", "sampler.steps=10", "n=4", "seed=3",
                        f"out={tmp_path / 's'}", "progress=false", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert np.array_equal(grid, np.asarray(Image.open(tmp_path / "s" / "grid.png")))
    for bad, message in [("nope", "neither a shipped model"), (str(tmp_path), "folder without")]:
        with pytest.raises(gradio.Error, match=message):
            list(app.sampling_stream(bad, "ddim", 10, 0, 4, "", 3.0))
    with pytest.raises(gradio.Error, match="not text-conditioned"):
        list(app.sampling_stream("digits", "ddim", 10, 0, 4, "a red circle", 3.0))
    for args, message in [(("digits", "ddim", 10, 0, 0, "", 3.0), "images=0"), (("", "ddim", 10, 0, 4, "", 3.0),
                          "choose a checkpoint"), (("shapes_text", "ddim", 10, 0, 4, "", None), "guidance scale is empty"),
                          (("digits", "ddim", None, 0, 4, "", 3.0), "steps is empty")]:
        with pytest.raises(gradio.Error, match=message):
            list(app.sampling_stream(*args))


@pytest.mark.slow
def test_cli_refuses_bad_arguments():
    for args, env, message in [(["--ckpt", "/no/such/file"], {}, "--ckpt"), (["--port", "0"], {}, "--port 0"),
                               ([], {"GRADIO_SERVER_PORT": "abc"}, "GRADIO_SERVER_PORT='abc'")]:
        result = subprocess.run([sys.executable, "-m", "diffexp.app", *args], capture_output=True, text=True,
                                env=user_env(Path("/tmp"), **env), timeout=120)
        assert result.returncode != 0 and message in result.stderr and "Traceback" not in result.stderr


# ---------------------------------------------------------------------------------------------- in a browser
def browser_paths() -> tuple[str, str]:
    """(chromium, chromedriver): Debian's, installed under CI=true when missing; elsewhere skip with instructions."""
    def found():
        return (shutil.which("chromium") or shutil.which("chromium-browser"), shutil.which("chromedriver"))

    if not (IN_CI or os.environ.get("DIFFEXP_TEST_BROWSER") == "1"):
        pytest.skip("the browser test drives a headless Chromium; run it under CI=true (installs Debian's chromium) or "
                    "with `sudo apt-get install chromium chromium-driver` and DIFFEXP_TEST_BROWSER=1 "
                    "python -m pytest -m slow tests/test_app.py")
    chromium, driver = found()
    if IN_CI and not (chromium and driver):
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run(["apt-get", "update", "-q"], check=True, env=env, capture_output=True)
        subprocess.run(["apt-get", "install", "-y", "-q", "chromium", "chromium-driver"], check=True, env=env,
                       capture_output=True)
        chromium, driver = found()
    if not (chromium and driver):
        pytest.fail("chromium and chromedriver are not installed: apt-get install chromium chromium-driver")
    return chromium, driver


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def served_app(tmp_path):
    """The README's `python -m diffexp.app`, run as typed (a free port through $GRADIO_SERVER_PORT); yields its URL."""
    command = readme_command("python -m diffexp.app").split()
    port = free_port()
    log = open(tmp_path / "app.log", "w")
    proc = subprocess.Popen([sys.executable, *command[1:]], cwd=tmp_path, env=user_env(tmp_path, GRADIO_SERVER_PORT=str(port)),
                            stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.time() + 180
        while True:
            try:
                urllib.request.urlopen(url, timeout=5)
                break
            except OSError:
                if proc.poll() is not None or time.time() > deadline:
                    pytest.fail(f"the app did not start:\n{(tmp_path / 'app.log').read_text()[-3000:]}")
                time.sleep(1)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()


@pytest.fixture
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    chromium, driver = browser_paths()
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,1500"):
        options.add_argument(flag)
    session = webdriver.Chrome(service=Service(driver), options=options)
    try:
        yield session
    finally:
        session.quit()


def image_src(browser, elem_id: str) -> str | None:
    found = browser.find_elements("css selector", f"#{elem_id} img")
    return found[0].get_attribute("src") if found else None


def wait_for(predicate, timeout: float = 120, what: str = ""):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.5)
    pytest.fail(f"timed out waiting for {what}")


def set_slider(browser, elem_id: str, value: float) -> None:
    """Move a Gradio slider as a drag does: its range input's value, then the input and change events."""
    browser.execute_script(
        "const el = document.querySelector(`#${arguments[0]} input[type=range]`);"
        "el.value = arguments[1]; el.dispatchEvent(new Event('input', {bubbles: true}));"
        "el.dispatchEvent(new Event('change', {bubbles: true}));"
        "el.dispatchEvent(new PointerEvent('pointerup', {bubbles: true}));", elem_id, value)


def choose(browser, elem_id: str, label: str) -> None:
    for option in browser.find_elements("css selector", f"#{elem_id} label"):
        if option.text.strip() == label:
            option.click()
            return
    pytest.fail(f"no option {label!r} in #{elem_id}")


def fetch_png(src: str) -> np.ndarray:
    with urllib.request.urlopen(src, timeout=30) as response:
        return np.asarray(Image.open(BytesIO(response.read())))


@pytest.mark.slow
def test_playground_in_a_browser(served_app, browser, tmp_path):
    """Drag t and change the schedule (the shown x_t changes), then a 10-step DDIM sample equals sample.py's grid."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    browser.get(served_app)
    first = wait_for(lambda: image_src(browser, "fwd-image"), what="the forward-process image")
    set_slider(browser, "fwd-t", 700)
    after_t = wait_for(lambda: (s := image_src(browser, "fwd-image")) != first and s, what="x_t to follow t")
    choose(browser, "fwd-schedule", "cosine")
    wait_for(lambda: (s := image_src(browser, "fwd-image")) not in (first, after_t) and s,
             what="x_t to follow the schedule")
    assert not np.array_equal(fetch_png(first), fetch_png(image_src(browser, "fwd-image")))
    cosine = image_src(browser, "fwd-image")
    choose(browser, "fwd-path", "flow")  # the flow path at the same fraction, with the same noise
    wait_for(lambda: (s := image_src(browser, "fwd-image")) not in (first, after_t, cosine) and s,
             what="x_t to follow the formulation")
    assert browser.find_elements("css selector", "#fwd-paths img, #fwd-paths svg, #fwd-paths canvas"), \
        "the strip of every path is not shown"
    browser.save_screenshot(str(ARTIFACTS / "app_forward.png"))

    next(b for b in browser.find_elements("css selector", "button[role=tab]") if b.text.strip() == "Sampling").click()
    choose(browser, "smp-sampler", "ddim")
    set_slider(browser, "smp-steps", 10)
    set_slider(browser, "smp-n", 16)
    browser.find_element("css selector", "#smp-run").click()
    wait_for(lambda: "done" in browser.find_element("css selector", "#smp-status").text, timeout=300,
             what="the sample to finish")
    shown = fetch_png(wait_for(lambda: image_src(browser, "smp-final"), what="the final grid"))
    browser.save_screenshot(str(ARTIFACTS / "app_sampling.png"))

    result = run_script("sample.py", f"ckpt={SHIPPED_DIGITS}", "sampler=ddim", "sampler.steps=10", "n=16", "seed=0",
                        f"out={tmp_path / 'sample'}", "progress=false", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert np.array_equal(shown, np.asarray(Image.open(tmp_path / "sample" / "grid.png")))
