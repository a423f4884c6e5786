"""The web app in a real browser: app.py serves a tiny adapter on a free localhost port, headless Chromium
(Debian's chromium + chromium-driver, driven by Selenium, nothing downloaded) uploads a photo and reads the
answer the same classifier gives in-process, warning included, and the upload is gone afterwards."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
WAIT = 60  # seconds: upper bound for the server to start and for an answer, never a speed assertion

missing = [
    what
    for what, ok in (("chromium", Path(CHROMIUM).is_file()), ("chromedriver", Path(CHROMEDRIVER).is_file()))
    if not ok
]
pytestmark = pytest.mark.skipif(
    bool(missing), reason=f"no {' or '.join(missing)} (apt-get install chromium chromium-driver)"
)
pytest.importorskip("gradio", reason="the web app needs gradio: pip install '.[app]'")
pytest.importorskip("selenium", reason="the browser test needs selenium: pip install selenium")


@pytest.fixture(scope="module")
def adapter(prepared, tmp_path_factory) -> Path:
    """A 2-step tiny adapter trained on the prepared data."""
    from mushroomclip.config import load_train_config
    from mushroomclip.training.trainer import run_training

    run = tmp_path_factory.mktemp("app-runs") / "tiny"
    overrides = {
        "data.path": prepared[0],
        "training.output_dir": run,
        "training.max_steps": 2,
        "training.eval_steps": 2,
        "run.test_after": False,
        "data.num_workers": 0,
    }
    run_training(load_train_config(ROOT / "configs/tiny.yaml", [f"{k}={v}" for k, v in overrides.items()]))
    return run


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until_served(url: str, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + WAIT
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"app.py exited with {proc.returncode} before serving")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    pytest.fail(f"app.py did not serve {url} within {WAIT} s")


def upload(wait, elem_id: str, *files: Path) -> None:
    """Give ``files`` to the file input of component ``elem_id`` and wait until the page lists them as uploaded."""
    from selenium.webdriver.common.by import By

    field = wait.until(lambda d: d.find_element(By.CSS_SELECTOR, f"#{elem_id} input[type=file]"))
    field.send_keys("\n".join(map(str, files)))
    for file in files:
        wait.until(lambda d, f=file: d.find_elements(By.CSS_SELECTOR, f'#{elem_id} td.filename[aria-label="{f.name}"]'))


def test_browser_upload_shows_the_species_and_the_deadly_warning(adapter, prepared, tmp_path, monkeypatch):
    from selenium import webdriver
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    from mushroomclip.prediction.identify import identify, load_model

    monkeypatch.setenv("SE_OFFLINE", "true")  # Selenium Manager must never download a browser or driver

    # 1. the expected answer, in-process: a test photo with a dangerous species in its top 5 if there is one
    classifier, thresholds = load_model(str(adapter))
    candidates = sorted((prepared[0] / "test").glob("*/*.jpg"))
    answers = [(p, identify(classifier, [p], thresholds)[0]) for p in candidates]
    source, expected = next(((p, a) for p, a in answers if a.warning), answers[0])
    photo = Path(shutil.copy(source, tmp_path / "find-to-identify.jpg"))
    notes = tmp_path / "field-notes.txt"  # uploaded beside the photo: named as unusable, never fatal
    notes.write_text("cap 8 cm, white gills, volva at the base")

    # 2. the app, on a free localhost port, its uploads in a folder of this test
    tmp = tmp_path / "app-tmp"
    tmp.mkdir()
    port = free_port()
    env = os.environ | {"TMPDIR": str(tmp), "GRADIO_ANALYTICS_ENABLED": "False", "PYTHONPATH": str(ROOT)}
    log = open(tmp_path / "app.log", "w")
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "app.py"), "--model", str(adapter), "--runs", "--port", str(port)],
        cwd=tmp_path,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    driver = None
    try:
        url = f"http://127.0.0.1:{port}/"
        wait_until_served(url, proc)
        # 3. headless Chromium with the system driver: Selenium Manager never runs, nothing is downloaded
        options = webdriver.ChromeOptions()
        options.binary_location = CHROMIUM
        for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1100,1450"):
            options.add_argument(arg)
        driver = webdriver.Chrome(service=webdriver.ChromeService(CHROMEDRIVER), options=options)
        driver.get(url)
        wait = WebDriverWait(driver, WAIT)
        upload(wait, "photos", photo, notes)
        driver.find_element(By.ID, "identify").click()
        headline = wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#answer .mc-headline"))[0]
        page = driver.find_element(By.ID, "answer").text
        driver.save_screenshot(str(tmp_path / "app.png"))
        if os.environ.get("MUSHROOMCLIP_SCREENSHOT"):  # to refresh docs/app.png
            shutil.copy(tmp_path / "app.png", os.environ["MUSHROOMCLIP_SCREENSHOT"])

        # 4. the page says what the classifier says
        assert headline.text == expected.headline
        assert expected.rows[0].species in page
        assert f"{notes.name}: not usable as a photo" in page
        assert ("never eat on the basis of this app" in page) == (expected.warning is not None)
        if expected.warning:
            assert driver.find_element(By.CSS_SELECTOR, "#answer .mc-warning").text.endswith(expected.warning)
        # 5. nothing uploaded is kept once answered
        assert not [p for name in (photo.name, notes.name) for p in tmp.rglob(name)], "an upload is still on disk"

        # 6. the compare tab: the adapter beside the tiny zero-shot model, one photo
        tiny, tiny_thresholds = load_model("zero-shot:tiny-clip")
        zero_shot = identify(tiny, [photo], tiny_thresholds)[0]
        driver.find_element(By.XPATH, "//button[@role='tab'][normalize-space()='Compare']").click()
        upload(wait, "compare-photo", photo)
        driver.find_element(By.ID, "compare").click()
        sides = [
            wait.until(lambda d, side=side: d.find_elements(By.CSS_SELECTOR, f"#{side} .mc-headline"))[0].text
            for side in ("compare-a", "compare-b")
        ]
        assert sides == [expected.headline, zero_shot.headline]
        assert not [p for p in tmp.rglob(photo.name)]
    finally:
        if driver is not None:
            driver.quit()
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=20)
        log.close()
